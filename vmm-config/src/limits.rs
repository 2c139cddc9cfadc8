//! Ranges shared by the configuration file, the command line and the management socket, so
//! that every way of asking for a disk or a policy accepts exactly the same values.

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
    }
}
