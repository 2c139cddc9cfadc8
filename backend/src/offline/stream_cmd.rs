//! `vhost-thin send` and `vhost-thin receive`: snapshots as streams, between pools, files
//! and pipes (`send … | ssh host vhost-thin receive …`). Format: docs/STREAMS.md.

use super::{input_stream, output_stream};
use crate::pools::{open_catalog, PoolPaths};
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use thinpool::catalog::Catalog;
use thinpool::registry::Registry;
use thinpool::stream::{self, ReceiveError, ReceiveOptions, ResumeToken, SendOptions};

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub paths: PoolPaths,
    /// Send only what changed since this snapshot (name or thin id); the receiver must
    /// have received it.
    #[arg(long, short = 'i', value_name = "SNAPSHOT")]
    pub base: Option<String>,
    /// Send the rest of an interrupted receive (the token it printed).
    #[arg(long, value_name = "TOKEN")]
    pub resume: Option<ResumeToken>,
    /// Where the stream goes ("-": standard output).
    #[arg(long, short = 'o', default_value = "-", value_name = "FILE")]
    pub output: PathBuf,
    /// Print what was sent as JSON on stderr at the end.
    #[arg(long)]
    pub json: bool,
    /// The snapshot to send (name or thin id).
    pub snapshot: String,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    #[command(flatten)]
    pub paths: PoolPaths,
    /// Name of the received snapshot (default: the sender's).
    #[arg(long, value_name = "NAME", value_parser = super::parse_name)]
    pub name: Option<String>,
    /// Keep what arrived if the stream is cut off, and print a token to resume from.
    #[arg(long, short = 's')]
    pub resumable: bool,
    /// Drop an interrupted receive (its token) instead of receiving.
    #[arg(long, value_name = "TOKEN", conflicts_with_all = ["name", "resumable", "input"])]
    pub abort: Option<ResumeToken>,
    /// Where the stream comes from ("-": standard input).
    #[arg(long, short = 'i', default_value = "-", value_name = "FILE")]
    pub input: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// After receiving `<disk>@r<n>` (a replication round), delete this pool's older
    /// `<disk>@r<n>` snapshots, keeping the newest N (the next round's base among them).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_last: Option<u32>,
}

/// The `<disk>@r<n>` snapshots of the same disk as `name`, oldest first.
pub fn replica_series(reg: &Registry, name: &str) -> Vec<(u64, u32)> {
    let Some((disk, _)) = name.rsplit_once("@r") else {
        return Vec::new();
    };
    let received = reg
        .devices
        .iter()
        .filter(|(_, e)| e.snapshot && e.receiving.is_none())
        .filter_map(|(&id, e)| Some((e.name.as_deref()?, id)));
    crate::replica_names::series(received, disk)
}

/// A device by name (registry) or thin id.
fn resolve(reg: &Registry, what: &str) -> Result<u32> {
    if let Some(id) = reg.find(what) {
        return Ok(id);
    }
    match what.parse::<u32>() {
        Ok(id) if reg.devices.contains_key(&id) => Ok(id),
        _ => bail!("no snapshot named {what:?} in the pool's registry"),
    }
}

/// The pool with its registry, which send and receive need.
fn open_with_registry(paths: &PoolPaths) -> Result<Catalog> {
    let cat = open_catalog(paths, true)?;
    if !cat.has_registry_file() {
        bail!(
            "the pool {} has no registry: send and receive need one (names, sizes, identities)",
            paths.metadata.display()
        );
    }
    Ok(cat)
}

pub fn send(a: SendArgs) -> Result<ExitCode> {
    // Before anything is opened: the first send of a snapshot writes its identity.
    super::refuse_terminal_output(&a.output)?;
    // Writable: a snapshot gets its identity (guid) at its first send.
    let cat = open_with_registry(&a.paths)?;
    let (snap, base) = {
        let reg = cat.registry();
        let snap = resolve(&reg, &a.snapshot)?;
        (
            snap,
            a.base.as_deref().map(|b| resolve(&reg, b)).transpose()?,
        )
    };
    let ids: Vec<u32> = std::iter::once(snap).chain(base).collect();
    stream::ensure_guids(&cat, &ids)?;
    let reg = cat.registry();
    let resume_offset = match &a.resume {
        None => 0,
        Some(t) => {
            let guid = reg.devices[&snap].guid.as_deref().unwrap_or_default();
            if t.guid != guid {
                bail!(
                    "the token {t} resumes snapshot {}, not {} ({guid})",
                    t.guid,
                    a.snapshot
                );
            }
            t.offset
        }
    };
    let mut out = output_stream(&a.output)?;
    let mut progress = Progress::new("sending", 0);
    let opts = SendOptions {
        base,
        resume_offset,
    };
    let stats = stream::send(
        cat.pool(),
        &reg,
        snap,
        &opts,
        &mut out,
        &mut |done, total| {
            progress.set_total(total);
            progress.update(done);
        },
    )
    .with_context(|| format!("cannot send {}", a.snapshot))?;
    out.flush().context("writing the stream")?;
    progress.finish();
    if a.json {
        eprintln!("{}", serde_json::to_string(&stats)?);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn receive(a: ReceiveArgs) -> Result<ExitCode> {
    if a.abort.is_none() {
        super::refuse_terminal_input(&a.input)?;
    }
    let cat = open_with_registry(&a.paths)?;
    if let Some(t) = &a.abort {
        let id = stream::abort(&cat, &t.guid)?;
        println!("dropped the interrupted receive (thin device {id})");
        return Ok(ExitCode::SUCCESS);
    }
    let input = input_stream(&a.input)?;
    let opts = ReceiveOptions {
        name: a.name.clone(),
        resumable: a.resumable,
        ..Default::default()
    };
    let mut progress = Progress::new("receiving", 0);
    let r = stream::receive(&cat, input, &opts, &mut |done, total| {
        progress.set_total(total);
        progress.update(done);
    });
    progress.finish();
    match r {
        Ok(got) => {
            if let Some(keep) = a.keep_last {
                let series = replica_series(&cat.registry(), &got.name);
                let old: Vec<u32> = series
                    .iter()
                    .rev()
                    .skip(keep as usize)
                    .map(|(_, id)| *id)
                    .collect();
                if !old.is_empty() {
                    cat.change(|devices, reg| -> Result<()> {
                        for id in &old {
                            devices.delete(*id)?;
                            reg.remove(*id);
                        }
                        Ok(())
                    })?;
                    eprintln!("deleted {} older replicas (--keep-last {keep})", old.len());
                }
            }
            if a.json {
                println!("{}", serde_json::to_string(&got)?);
            } else {
                println!(
                    "received snapshot {} (thin device {}{}), {} records, {} stream bytes",
                    got.name,
                    got.id,
                    got.base
                        .map(|b| format!(", on top of thin device {b}"))
                        .unwrap_or_default(),
                    got.records,
                    got.stream_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ReceiveError::Interrupted(i)) => {
            eprintln!("vhost-thin: error: {i}");
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"resume-token": i.token.to_string()})
                );
            }
            Ok(ExitCode::from(3))
        }
        Err(ReceiveError::Failed(e)) => Err(e).context("receive failed; nothing was kept"),
    }
}
