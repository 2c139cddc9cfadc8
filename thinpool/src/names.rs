//! What a name is: the one rule for the names of disks, snapshots and pools, and for job IDs,
//! wherever they come from (the registry file, a stream header, the command line, the
//! configuration, the management socket).
//!
//! The engine owns it because the engine owns the files names are kept in (the registry)
//! and carried by (streams): it must refuse a bad name there even when no daemon or
//! configuration is involved. The configuration crate and the daemon use this same function
//! (`vmm_config::limits` re-exports it), so every way in accepts exactly the same names.
//!
//! A name ends up in paths (a disk's socket is `<socket dir>/<name>.sock`), thread names
//! (which cannot hold a NUL), command lines and log lines, hence: 1 to [`MAX_NAME_LEN`]
//! bytes; no control characters and no whitespace but the plain space (nothing invisible
//! or line-breaking); no `/` and not `.` or `..` (no path traversal); no leading `-` (not
//! mistaken for an option).

/// The longest name of a disk, snapshot or pool, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The longest job ID, in bytes: room for the IDs the daemon makes itself,
/// `replicate-<disk>-<seq>` with a disk name of [`MAX_NAME_LEN`] bytes.
pub const MAX_JOB_ID_LEN: usize = 128;

/// What a name may be, for messages ("a name is …").
pub const NAME_RULE: &str =
    "1 to 64 printable characters, without '/', not '.' or '..', and not starting with '-'";

/// What a job ID may be, for messages ("a job ID is …").
pub const JOB_ID_RULE: &str =
    "1 to 128 printable characters, without '/', not '.' or '..', and not starting with '-'";

/// Why a string is not a name. The message is a clause ("it contains '/'"), to follow
/// "… is not a valid name: ".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long, more than {max}")]
    TooLong { len: usize, max: usize },
    #[error("it contains a control character ({})", code_point(.0))]
    Control(char),
    #[error("it contains whitespace other than a space ({})", code_point(.0))]
    Whitespace(char),
    #[error("it contains '/'")]
    Slash,
    #[error("it is '.' or '..'")]
    Dots,
    #[error("it starts with '-'")]
    LeadingDash,
}

/// `U+0000`: a character that does not print, shown by its number.
fn code_point(c: &char) -> String {
    format!("U+{:04X}", u32::from(*c))
}

/// Checks a disk, snapshot or pool name against the rule ([`NAME_RULE`]).
pub fn check_name(s: &str) -> Result<(), NameError> {
    check(s, MAX_NAME_LEN)
}

/// Checks a job ID: the rule of names, up to [`MAX_JOB_ID_LEN`] bytes ([`JOB_ID_RULE`]).
pub fn check_job_id(s: &str) -> Result<(), NameError> {
    check(s, MAX_JOB_ID_LEN)
}

fn check(s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > max {
        return Err(NameError::TooLong { len: s.len(), max });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(NameError::Control(c));
    }
    if let Some(c) = s.chars().find(|&c| c.is_whitespace() && c != ' ') {
        return Err(NameError::Whitespace(c));
    }
    if s.contains('/') {
        return Err(NameError::Slash);
    }
    if s == "." || s == ".." {
        return Err(NameError::Dots);
    }
    if s.starts_with('-') {
        return Err(NameError::LeadingDash);
    }
    Ok(())
}

/// Why a name cannot be given to a snapshot of a disk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotNameError {
    /// The name puts the snapshot in another disk's namespace (`vm2@x` for one of `vm1`).
    #[error("'{name}' names a snapshot of {owner}, not of {disk}: name it {disk}@… or give a name without '@'")]
    Foreign {
        name: String,
        owner: String,
        disk: String,
    },
    /// `@` alone, or `@a@b`: no name within the disk's namespace.
    #[error(
        "'{name}' is not a snapshot name: after '@' comes the snapshot's name, without another '@'"
    )]
    Malformed { name: String },
}

/// Splits `disk@snap` at its last `@` (a disk's name may hold one itself): the disk and
/// the snapshot's name within it. `None` for a name without `@` (a flat name).
pub fn split_snapshot_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('@')
        .filter(|(disk, snap)| !disk.is_empty() && !snap.is_empty())
}

/// The full name of a snapshot of `disk` asked for as `name`, as ZFS's `fs@snap`:
/// `@nightly` is `disk@nightly`; `disk@nightly` is itself; a name naming another disk
/// (`other@x`) is refused; a name without `@` is a flat name and stays as it is.
pub fn snapshot_name(disk: &str, name: &str) -> Result<String, SnapshotNameError> {
    if let Some(short) = name.strip_prefix('@') {
        if short.is_empty() || short.contains('@') {
            return Err(SnapshotNameError::Malformed {
                name: name.to_string(),
            });
        }
        return Ok(format!("{disk}@{short}"));
    }
    match split_snapshot_name(name) {
        Some((owner, _)) if owner != disk => Err(SnapshotNameError::Foreign {
            name: name.to_string(),
            owner: owner.to_string(),
            disk: disk.to_string(),
        }),
        _ => Ok(name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_live_in_their_disks_namespace() {
        assert_eq!(snapshot_name("vm1", "@nightly").unwrap(), "vm1@nightly");
        assert_eq!(snapshot_name("vm1", "vm1@nightly").unwrap(), "vm1@nightly");
        assert_eq!(snapshot_name("vm1", "nightly").unwrap(), "nightly");
        assert_eq!(snapshot_name("a@b", "a@b@x").unwrap(), "a@b@x");
        assert!(matches!(
            snapshot_name("vm1", "vm2@x"),
            Err(SnapshotNameError::Foreign { owner, .. }) if owner == "vm2"
        ));
        for bad in ["@", "@a@b"] {
            assert!(matches!(
                snapshot_name("vm1", bad),
                Err(SnapshotNameError::Malformed { .. })
            ));
        }
        assert_eq!(split_snapshot_name("vm1@x"), Some(("vm1", "x")));
        assert_eq!(split_snapshot_name("@x"), None);
        assert_eq!(split_snapshot_name("x@"), None);
        assert_eq!(split_snapshot_name("x"), None);
    }

    #[test]
    fn names_and_not_names() {
        for ok in [
            "disk0",
            "before-upgrade",
            "vm@r12",
            "a b",
            "x..y",
            ".hidden",
            "é",
            "n".repeat(MAX_NAME_LEN).as_str(),
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok:?}");
        }
        let long = "n".repeat(MAX_NAME_LEN + 1);
        for (bad, want) in [
            ("", NameError::Empty),
            (
                long.as_str(),
                NameError::TooLong {
                    len: 65,
                    max: MAX_NAME_LEN,
                },
            ),
            ("a\0b", NameError::Control('\0')),
            ("a\nb", NameError::Control('\n')),
            ("a\u{7f}", NameError::Control('\u{7f}')),
            ("a\u{85}", NameError::Control('\u{85}')),
            ("a\u{2028}b", NameError::Whitespace('\u{2028}')),
            ("a/b", NameError::Slash),
            ("../../x", NameError::Slash),
            (".", NameError::Dots),
            ("..", NameError::Dots),
            ("-x", NameError::LeadingDash),
        ] {
            assert_eq!(check_name(bad), Err(want), "{bad:?}");
        }
        // Length is in bytes: 33 two-byte characters are too many.
        assert!(check_name(&"é".repeat(33)).is_err());
        assert_eq!(
            NameError::Control('\0').to_string(),
            "it contains a control character (U+0000)"
        );
        // Job IDs: the same rule, longer.
        assert_eq!(check_job_id(&long), Ok(()));
        assert!(check_job_id(&"j".repeat(MAX_JOB_ID_LEN + 1)).is_err());
        assert!(check_job_id("a\0b").is_err());
        // The messages say the limits the constants set.
        assert!(NAME_RULE.starts_with(&format!("1 to {MAX_NAME_LEN} ")));
        assert!(JOB_ID_RULE.starts_with(&format!("1 to {MAX_JOB_ID_LEN} ")));
    }
}
