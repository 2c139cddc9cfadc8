//! Checks across fields and against the engine's limits, after parsing.

use crate::error::{suggest, ConfigError};
use crate::limits;
use crate::model::Config;
use std::collections::HashSet;

/// The 1-based line of the first line of `text` that holds `key: value` (a YAML scalar),
/// to point errors found after parsing at their source.
fn find_line(text: &str, key: &str, value: &str) -> Option<usize> {
    let value_of = |l: &str| {
        let t = l.trim_start().trim_start_matches("- ").trim();
        t.strip_prefix(key)
            .and_then(|r| r.trim_start().strip_prefix(':'))
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
    };
    let exact = text
        .lines()
        .position(|l| value_of(l).as_deref() == Some(value));
    exact
        .or_else(|| {
            text.lines()
                .position(|l| value.is_empty() && value_of(l).is_some())
        })
        .map(|i| i + 1)
}

/// Where the configuration came from, to point an error at its line.
struct Source<'a> {
    text: &'a str,
    file: &'a str,
}

impl Source<'_> {
    /// An error in `field`, at the first line that holds `key: value`.
    fn err(
        &self,
        field: String,
        key: &str,
        value: &str,
        message: String,
        hint: Option<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: find_line(self.text, key, value),
            column: None,
            field: Some(field),
            message,
            hint,
        }
    }

    /// A name that is not one, refused where it is written (see limits::check_name).
    fn check_name(&self, field: String, key: &str, name: &str) -> Result<(), ConfigError> {
        limits::check_name(name).map_err(|why| {
            self.err(
                field,
                key,
                name,
                format!("{name:?} is not a valid name: {why}"),
                Some(format!("a name is {}", limits::NAME_RULE)),
            )
        })
    }
}

pub(crate) fn validate(cfg: &Config, text: &str, file: &str) -> Result<(), ConfigError> {
    let at = &Source { text, file };
    check_pools(at, cfg)?;
    check_disks(at, cfg)?;
    check_management(at, cfg)?;
    check_mode(at, "disk-sockets.mode", &cfg.disk_sockets.mode, true)
}

fn check_pools(at: &Source, cfg: &Config) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, p) in cfg.pools.iter().enumerate() {
        at.check_name(format!("pools[{i}].name"), "name", &p.name)?;
        if !names.insert(p.name.as_str()) {
            return Err(at.err(
                format!("pools[{i}].name"),
                "name",
                &p.name,
                format!("pool `{}` is defined twice", p.name),
                Some("give each pool its own name".into()),
            ));
        }
        let bs = p.block_size.0;
        if bs % (64 << 10) != 0 || !((64 << 10)..=(1 << 30)).contains(&bs) {
            return Err(at.err(
                format!("pools[{i}].block-size"),
                "block-size",
                "",
                format!("{bs} bytes is not a valid block size"),
                Some("use 64KiB to 1GiB in multiples of 64KiB".into()),
            ));
        }
        if p.metadata == p.data {
            return Err(at.err(
                format!("pools[{i}].data"),
                "data",
                &p.data.display().to_string(),
                "metadata and data are the same path".into(),
                Some("dm-thin pools need two devices or files".into()),
            ));
        }
        if let Err(m) = crate::limits::check_queue_timeout(p.out_of_space.timeout) {
            return Err(at.err(
                format!("pools[{i}].out-of-space.timeout"),
                "timeout",
                &p.out_of_space.timeout.to_string(),
                m,
                None,
            ));
        }
        for (what, v) in [
            ("data", p.low_water.data),
            ("metadata", p.low_water.metadata),
        ] {
            if v > 100 {
                return Err(at.err(
                    format!("pools[{i}].low-water.{what}"),
                    what,
                    &v.to_string(),
                    format!("{v} is not a percentage"),
                    Some("use 0 to 100".into()),
                ));
            }
        }
    }
    Ok(())
}

/// Names, pools and sockets across disks; then each disk's own fields.
fn check_disks(at: &Source, cfg: &Config) -> Result<(), ConfigError> {
    let pool_names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
    let mut disk_names = HashSet::new();
    let mut sockets = HashSet::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let f = |k: &str| format!("disks[{i}].{k}");
        at.check_name(f("name"), "name", &d.name)?;
        if let Some(c) = &d.clone_from {
            at.check_name(f("clone-from"), "clone-from", c)?;
        }
        if !disk_names.insert(d.name.as_str()) {
            return Err(at.err(
                f("name"),
                "name",
                &d.name,
                format!("disk `{}` is defined twice", d.name),
                Some("give each disk its own name".into()),
            ));
        }
        match &d.pool {
            Some(p) if !pool_names.contains(&p.as_str()) => {
                let hint = suggest(p, &pool_names)
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("defined pools: {}", pool_names.join(", ")));
                return Err(at.err(
                    f("pool"),
                    "pool",
                    p,
                    format!("no pool named `{p}`"),
                    Some(hint),
                ));
            }
            None if cfg.pools.len() != 1 => {
                return Err(at.err(
                    f("pool"),
                    "name",
                    &d.name,
                    "which pool?".into(),
                    Some(format!(
                        "add `pool:` naming one of: {}",
                        pool_names.join(", ")
                    )),
                ));
            }
            _ => {}
        }
        check_disk_fields(at, d, &f)?;
        if !sockets.insert(d.socket.clone()) {
            return Err(at.err(
                f("socket"),
                "socket",
                &d.socket.display().to_string(),
                "two disks on one socket".into(),
                Some("give each disk its own socket path".into()),
            ));
        }
        check_disk_origin(at, d, &f)?;
    }
    Ok(())
}

/// A disk's size, queues, serial and origin.
fn check_disk_fields(
    at: &Source,
    d: &crate::model::DiskConfig,
    f: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if d.size.0 == 0 || d.size.0 % 512 != 0 {
        return Err(at.err(
            f("size"),
            "size",
            "",
            format!("{} bytes is not a disk size", d.size.0),
            Some("use a positive multiple of 512 bytes, like 10GiB".into()),
        ));
    }
    if d.size.0 > limits::MAX_DISK_SIZE {
        return Err(at.err(
            f("size"),
            "size",
            "",
            format!("{} bytes is larger than the largest disk", d.size.0),
            Some(format!("use at most {}", limits::MAX_DISK_SIZE_TEXT)),
        ));
    }
    if !limits::num_queues_ok(d.num_queues as usize) {
        return Err(at.err(
            f("num-queues"),
            "num-queues",
            &d.num_queues.to_string(),
            format!("{} queues", d.num_queues),
            Some(format!("use 1 to {}", limits::MAX_NUM_QUEUES)),
        ));
    }
    if !limits::queue_size_ok(d.queue_size as usize) {
        return Err(at.err(
            f("queue-size"),
            "queue-size",
            &d.queue_size.to_string(),
            format!("{} is not a power of two", d.queue_size),
            Some(format!(
                "use {} to {}, a power of two ({} is usual)",
                limits::MIN_QUEUE_SIZE,
                limits::MAX_QUEUE_SIZE,
                limits::DEFAULT_QUEUE_SIZE
            )),
        ));
    }
    if let Some(s) = &d.serial {
        if s.len() > 20 || !s.is_ascii() {
            return Err(at.err(
                f("serial"),
                "serial",
                s,
                "the serial must be at most 20 ASCII bytes".into(),
                None,
            ));
        }
    }
    Ok(())
}
/// A clone is not its own origin, and reads its origin's external origin.
fn check_disk_origin(
    at: &Source,
    d: &crate::model::DiskConfig,
    f: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if d.clone_from.as_deref() == Some(d.name.as_str()) {
        return Err(at.err(
            f("clone-from"),
            "clone-from",
            &d.name,
            "a disk cannot be a clone of itself".into(),
            None,
        ));
    }
    if let (Some(_), Some(o)) = (&d.clone_from, &d.external_origin) {
        return Err(at.err(
            f("external-origin"),
            "external-origin",
            &o.display().to_string(),
            "a clone reads its origin's external origin".into(),
            Some("give either clone-from or external-origin".into()),
        ));
    }
    Ok(())
}

fn check_management(at: &Source, cfg: &Config) -> Result<(), ConfigError> {
    if let Some(m) = &cfg.management {
        check_mode(at, "management.mode", &m.mode, false)?;
        if let Some(dirs) = &m.file_dirs {
            for (i, d) in dirs.iter().enumerate() {
                if !d.is_absolute() {
                    return Err(at.err(
                        format!("management.file-dirs[{i}]"),
                        "file-dirs",
                        "",
                        format!("`{}` is not an absolute path", d.display()),
                        Some("give directories as absolute paths".into()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// An octal file mode for a socket. For a disk's socket, no permission for other users:
/// connecting to it is writing to the VM's disk (give the socket a group instead).
fn check_mode(at: &Source, field: &str, mode: &str, disk: bool) -> Result<(), ConfigError> {
    let parsed = u32::from_str_radix(mode, 8).ok().filter(|v| *v <= 0o777);
    let Some(v) = parsed else {
        return Err(at.err(
            field.into(),
            "mode",
            mode,
            format!("`{mode}` is not an octal file mode"),
            Some("like \"0600\"".into()),
        ));
    };
    if disk && v & 0o007 != 0 {
        return Err(at.err(
            field.into(),
            "mode",
            mode,
            format!("`{mode}` lets every local user connect to the disks, and so write to them"),
            Some(
                "give the sockets a `group` (the one QEMU runs as) and a mode like \"0660\"".into(),
            ),
        ));
    }
    Ok(())
}
