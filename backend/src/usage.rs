//! Exit statuses, as zfs and most command-line tools use them: 0 done, 1 the operation
//! failed, 2 the command line was wrong (clap's own errors exit 2 as well).

use std::process::ExitCode;

/// A command line that asks for something impossible or incomplete, found after clap
/// parsed it: exits 2 like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status of a command that failed with `e`.
pub fn failure_status(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
