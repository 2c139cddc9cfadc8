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
