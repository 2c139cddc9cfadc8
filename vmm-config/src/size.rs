//! Byte sizes: a plain number of bytes, or a string with a binary unit (`64KiB`, `10GiB`).

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// What a size may be written as, for messages and `--help`.
pub const SIZE_UNITS: &str = "bytes, or a number with a unit: K, M, G, T, P (or KiB, MiB, GiB, \
TiB, PiB; any case), all powers of 1024, as qemu-img and lvcreate read them; a fraction is \
allowed where the result is whole bytes (1.5T)";

/// Parses a size: `4096`, `64KiB`, `10g`, `10G`, `1.5T`, `1PiB`. Every unit is a power of
/// 1024 (as qemu-img's and lvcreate's); `GB` and the like are refused rather than guessed
/// (powers of 1000 to some, of 1024 to others).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{s:?}: a size cannot be negative"));
    }
    let not_a_size = || format!("{s:?} is not a size: write {SIZE_UNITS}");
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) if !f.is_empty() && !f.contains('.') => (w, f),
        Some(_) => return Err(not_a_size()),
        None => (num, ""),
    };
    if whole.is_empty() {
        return Err(not_a_size());
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        u @ ("kb" | "mb" | "gb" | "tb" | "pb") => {
            let binary = format!("{}iB", u[..1].to_ascii_uppercase());
            return Err(format!(
                "{s:?}: {u:?} means powers of 1000 to some and of 1024 to others: write \
                 {binary} (or {}) for powers of 1024",
                &binary[..1]
            ));
        }
        u => {
            return Err(format!(
                "{s:?} has an unknown unit {u:?}: write {SIZE_UNITS}"
            ))
        }
    };
    let too_large = || format!("{s:?} is too large");
    // Exact arithmetic: whole.frac × 2^shift must be a whole number of bytes.
    if frac.len() > 18 {
        return Err(not_a_size());
    }
    let scale = 10u128.pow(frac.len() as u32);
    let w: u128 = whole.parse().map_err(|_| too_large())?;
    let f: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| not_a_size())?
    };
    let scaled = w
        .checked_mul(scale)
        .and_then(|v| v.checked_add(f))
        .and_then(|v| v.checked_mul(1u128 << shift))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a size: {SIZE_UNITS}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_as_qemu_img_and_lvcreate_users_write_them() {
        for (s, want) in [
            ("4096", 4096u64),
            ("512B", 512),
            ("64KiB", 64 << 10),
            ("64k", 64 << 10),
            ("10g", 10 << 30),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("10gib", 10 << 30),
            ("1.5T", 3 << 39),
            ("1.5TiB", 3 << 39),
            ("0.5m", 512 << 10),
            ("1PiB", 1 << 50),
            ("2p", 2 << 50),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_reason() {
        for (s, words) in [
            ("-5", "negative"),
            ("-1G", "negative"),
            ("", "not a size"),
            ("GiB", "not a size"),
            ("1.", "not a size"),
            ("1.2.3G", "not a size"),
            ("0.3K", "whole number of bytes"),
            ("10GB", "GiB"),
            ("10XB", "unknown unit"),
            ("99999999999999999999", "too large"),
            ("20000000T", "too large"),
            ("16385PiB", "too large"),
        ] {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(words), "{s}: {e}");
        }
    }
}
