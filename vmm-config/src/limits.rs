//! Ranges shared by the configuration file, the command line and the management socket, so
//! that every way of asking for a disk or a policy accepts exactly the same values.

/// What a name is (disks, snapshots, pools; job IDs the same, longer): the engine's rule
/// (it owns the registry and the streams names are kept in), the one every way in uses.
pub use thinpool::names::{
    check_job_id, check_name, NameError, JOB_ID_RULE, MAX_JOB_ID_LEN, MAX_NAME_LEN, NAME_RULE,
};

/// The largest disk, in bytes: 4 EiB, what the engine serves (`thinpool::pool::MAX_DEVICE_BYTES`).
pub const MAX_DISK_SIZE: u64 = thinpool::pool::MAX_DEVICE_BYTES;

/// [`MAX_DISK_SIZE`] for people, in the units sizes are written in.
pub const MAX_DISK_SIZE_TEXT: &str = "4 EiB (4194304TiB)";

/// Why `size` cannot be a disk's size, if it cannot: sizes are whole 512-byte sectors, at
/// least one, at most [`MAX_DISK_SIZE`]. The message is a clause ("1000 is not a multiple of
/// 512").
pub fn disk_size_problem(size: u64) -> Option<String> {
    if size == 0 {
        Some("it is 0".into())
    } else if size % 512 != 0 {
        Some(format!("{size} is not a multiple of 512"))
    } else if size > MAX_DISK_SIZE {
        Some(format!("{size} is larger"))
    } else {
        None
    }
}

/// What [`disk_size_problem`] checks, for messages.
pub const DISK_SIZE_RULE: &str = "a positive multiple of 512 bytes, at most 4 EiB (4194304TiB)";

/// Longest out-of-space queue timeout, in seconds (one year). Longer ones would overflow a
/// deadline computed from now; 0 already means "hold writes forever".
pub const MAX_QUEUE_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// Checks an out-of-space queue timeout in seconds (0 = forever).
pub fn check_queue_timeout(secs: u64) -> Result<(), String> {
    if secs > MAX_QUEUE_TIMEOUT_SECS {
        return Err(format!(
            "a timeout of {secs} seconds is too long: at most {MAX_QUEUE_TIMEOUT_SECS} (one year); 0 holds writes forever"
        ));
    }
    Ok(())
}

/// Most virtqueues of one disk.
pub const MAX_NUM_QUEUES: usize = 64;
/// Queue sizes: powers of two in this range (virtio's split queues go up to 32768).
pub const MIN_QUEUE_SIZE: usize = 2;
pub const MAX_QUEUE_SIZE: usize = 32768;
/// Used when a disk does not say.
pub const DEFAULT_NUM_QUEUES: usize = 1;
pub const DEFAULT_QUEUE_SIZE: usize = 256;

/// Whether a disk may have `n` queues.
pub fn num_queues_ok(n: usize) -> bool {
    (1..=MAX_NUM_QUEUES).contains(&n)
}

/// Whether `q` is a valid queue size.
pub fn queue_size_ok(q: usize) -> bool {
    q.is_power_of_two() && (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(num_queues_ok(1) && num_queues_ok(64));
        assert!(!num_queues_ok(0) && !num_queues_ok(65));
        assert!(queue_size_ok(2) && queue_size_ok(256) && queue_size_ok(32768));
        assert!(!queue_size_ok(1) && !queue_size_ok(100) && !queue_size_ok(65536));
        assert!(check_queue_timeout(MAX_QUEUE_TIMEOUT_SECS).is_ok());
        assert!(check_queue_timeout(MAX_QUEUE_TIMEOUT_SECS + 1).is_err());
        assert_eq!(disk_size_problem(512), None);
        assert_eq!(disk_size_problem(MAX_DISK_SIZE), None);
        assert_eq!(crate::parse_size("4194304TiB"), Ok(MAX_DISK_SIZE));
        for bad in [0, 1000, MAX_DISK_SIZE + 512, MAX_DISK_SIZE - 1, u64::MAX] {
            assert!(disk_size_problem(bad).is_some(), "{bad}");
        }
    }
}
