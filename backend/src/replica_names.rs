//! The names of replicas: `<disk>@r<seq>`, made by scheduled replication.

/// The replicas of `base` among named items: those named `<base>@r<seq>`, with their
/// sequence numbers, oldest first. (The daemon prunes its own with it, `receive
/// --keep-last` a target's.)
pub fn series<'a, T: Ord>(named: impl Iterator<Item = (&'a str, T)>, base: &str) -> Vec<(u64, T)> {
    let prefix = format!("{base}@r");
    let mut v: Vec<(u64, T)> = named
        .filter_map(|(n, t)| Some((n.strip_prefix(&prefix)?.parse::<u64>().ok()?, t)))
        .collect();
    v.sort();
    v
}
