//! `vhost-thin`: thin-provisioned VM disks: the daemon (`serve`), its client (`ctl`) and the
//! offline pool, device and stream commands.

use vhost_thin::offline;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "vhost-thin",
    version,
    about = "Thin-provisioned VM disks with instant snapshots, on a dm-thin-compatible pool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pool commands: create, check, status, dump, restore.
    #[command(subcommand)]
    Pool(offline::pool_cmd::PoolCmd),
    /// Thin device commands: create, snapshot, delete, ls, import, export.
    #[command(subcommand)]
    Thin(offline::thin_cmd::ThinCmd),
    /// Write a snapshot as a stream (full, or incremental with --base), to a file or stdout.
    #[command(
        after_help = "Example:\n  vhost-thin send -m pool.meta -d pool.data -i s1 s2 | ssh dr vhost-thin receive -m dr.meta -d dr.data"
    )]
    Send(offline::stream_cmd::SendArgs),
    /// Read a stream into a pool as a new snapshot (resumable with -s).
    #[command(after_help = "Example:\n  vhost-thin receive -m dr.meta -d dr.data -i s2.stream")]
    Receive(offline::stream_cmd::ReceiveArgs),
    /// Serve thin devices to VMs over vhost-user-blk.
    #[command(
        after_help = "Example:\n  vhost-thin serve   (the quickstart: ./vhost-thin-state)\n  vhost-thin serve --config vhost-thin.yaml\n  vhost-thin serve -m pool.meta -d pool.data --disk name=disk0,socket=/run/disk0.sock --qmp /run/qmp.sock"
    )]
    Serve(vhost_thin::serve_cmd::ServeArgs),
    /// Talk to a running daemon: disks, snapshots, clones, events.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock disks")]
    Ctl(vhost_thin::ctl::CtlArgs),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a configuration file without running anything.
    #[command(after_help = "Example:\n  vhost-thin config check vhost-thin.yaml")]
    Check {
        /// The configuration file (YAML, see docs/CONFIG.md).
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // Everything vhost-thin creates holds VM data or controls it (pools, registries,
    // journals, streams, exports, sockets, state directories): its owner's alone, whatever
    // umask the invoker had. Wider access is given explicitly (a socket's configured mode
    // and group), never by default.
    // SAFETY: umask only sets this process's file-creation mask; set before any thread
    // starts.
    unsafe {
        libc::umask(0o077);
    }
    let default_level = if matches!(std::env::args().nth(1).as_deref(), Some("serve")) {
        "info"
    } else {
        "warn"
    };
    vhost_thin::logging::init(default_level);
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Pool(c) => offline::pool_cmd::run(c),
        Cmd::Thin(c) => offline::thin_cmd::run(c),
        Cmd::Send(a) => offline::stream_cmd::send(a),
        Cmd::Receive(a) => offline::stream_cmd::receive(a),
        Cmd::Serve(a) => vhost_thin::serve_cmd::run(a),
        Cmd::Ctl(a) => vhost_thin::ctl::run(a),
        Cmd::Config(ConfigCmd::Check { file }) => match vmm_config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: valid ({} pools, {} disks)",
                    file.display(),
                    c.pools.len(),
                    c.disks.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(1))
            }
        },
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-thin: error: {e:#}");
            vhost_thin::usage::failure_status(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument of every subcommand says what it is in `--help`, and every command
    /// shows an example.
    #[test]
    fn every_argument_is_described_and_every_command_has_an_example_in_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                let example = sub
                    .get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"));
                if sub.get_subcommands().next().is_none() && !example {
                    missing.push(format!("{path} {} (an example)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "vhost-thin", &mut missing);
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }
}
