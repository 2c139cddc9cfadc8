//! The offline CLI: pool and thin-device commands that work on the metadata and data
//! devices directly (the daemon must not be serving the pool at the same time). Opening
//! pools and committing changes is `crate::pools`, shared with the daemon.

pub mod pool_cmd;
pub mod stream_cmd;
pub mod thin_cmd;

use crate::usage::UsageError;
use anyhow::{Context, Result};
use std::io::IsTerminal;
use std::path::Path;

/// Binary data (a stream, an export) is not written to a terminal, as `zfs send` refuses
/// to: "-" must be redirected or piped.
pub fn refuse_terminal_output(path: &Path) -> Result<()> {
    if path.as_os_str() == "-" && std::io::stdout().is_terminal() {
        return Err(UsageError(
            "standard output is a terminal: redirect it (> FILE, | ssh HOST vhost-thin receive …) \
             or give -o FILE"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// A stream is not read from a terminal (it would wait for typing that never comes).
pub fn refuse_terminal_input(path: &Path) -> Result<()> {
    if path.as_os_str() == "-" && std::io::stdin().is_terminal() {
        return Err(UsageError(
            "standard input is a terminal: pipe a stream in (… | vhost-thin receive …) or give \
             -i FILE"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// A buffered writer to `path`, or to standard output for "-".
pub fn output_stream(path: &Path) -> Result<Box<dyn std::io::Write>> {
    refuse_terminal_output(path)?;
    let w: Box<dyn std::io::Write> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            {
                use std::os::unix::fs::OpenOptionsExt;
                // Exports and streams hold a VM's data: the owner's alone.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)
            }
            .with_context(|| format!("cannot create {}", path.display()))?,
        )
    };
    Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, w)))
}

/// A buffered reader of `path`, or of standard input for "-".
pub fn input_stream(path: &Path) -> Result<Box<dyn std::io::Read>> {
    refuse_terminal_input(path)?;
    let r: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )
    };
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, r)))
}

/// A name given on the command line (`--name`, `--disk name=`): held to the rule of names
/// (see `thinpool::names`) before anything is opened, as everywhere else names come in.
pub fn parse_name(s: &str) -> Result<String, String> {
    vmm_config::limits::check_name(s)
        .map(|()| s.to_string())
        .map_err(|why| {
            format!(
                "{s:?} is not a valid name: {why}; a name is {}",
                vmm_config::limits::NAME_RULE
            )
        })
}
