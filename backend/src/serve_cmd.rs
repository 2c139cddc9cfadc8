//! `vhost-thin serve`: open the pool, resolve the disks, run the daemon.

use crate::blk::disk::{Disk, DiskOptions};
use crate::daemon::{self, parse_disk_spec, DiskSpec};
use crate::offline::{load_registry, open_pool, PoolPaths};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use thinpool::registry::make_serial;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// A disk to serve (repeat for more):
    /// `id=N|name=NAME,socket=PATH[,size=SIZE][,num-queues=N][,queue-size=N][,read-only][,serial=S]`.
    /// Size and serial default to the registry's.
    #[arg(long = "disk", value_parser = parse_disk_spec, required = true)]
    disks: Vec<DiskSpec>,
    /// Commit the pool at least this often (milliseconds; dm-thin uses 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
    commit_interval_ms: u64,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    daemon::block_signals();
    let pool = Arc::new(open_pool(&a.paths, true)?);
    let reg = load_registry(&a.paths, &pool)?;
    let mut disks = Vec::new();
    for spec in &a.disks {
        let id = match (spec.id, &spec.name) {
            (Some(id), _) => id,
            (None, Some(name)) => reg
                .as_ref()
                .and_then(|r| r.find(name))
                .with_context(|| format!("no disk named {name:?} in the registry"))?,
            (None, None) => unreachable!("checked by the parser"),
        };
        pool.device(id)
            .with_context(|| format!("cannot serve thin device {id}"))?;
        let entry = reg.as_ref().and_then(|r| r.devices.get(&id));
        let size = spec
            .size
            .or(entry.map(|e| e.size).filter(|&s| s > 0))
            .with_context(|| {
                format!("the size of thin device {id} is not known: give size= in --disk")
            })?;
        if size % 512 != 0 || size == 0 {
            bail!("thin device {id}: size {size} is not a positive multiple of 512");
        }
        let serial = spec
            .serial
            .clone()
            .or(entry.map(|e| e.serial.clone()))
            .unwrap_or_else(|| make_serial(id, 0, 0));
        let name = spec
            .name
            .clone()
            .or(entry.and_then(|e| e.name.clone()))
            .unwrap_or_else(|| format!("thin{id}"));
        let read_only = spec.read_only || entry.is_some_and(|e| e.read_only);
        let disk = Arc::new(Disk::new(
            pool.clone(),
            DiskOptions {
                name,
                thin_id: id,
                size,
                read_only,
                serial,
                num_queues: spec.num_queues.unwrap_or(1),
                queue_size: spec.queue_size.unwrap_or(256),
            },
        ));
        println!(
            "serving thin device {id} ({}, {} bytes{}) on {}\n  qemu: -chardev socket,id=c{id},path={},reconnect=1 -device vhost-user-blk-pci,chardev=c{id},num-queues={}\n  (guest memory must be shared: -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem)",
            disk.name,
            size,
            if read_only { ", read-only" } else { "" },
            spec.socket.display(),
            spec.socket.display(),
            disk.num_queues
        );
        disks.push((disk, spec.socket.clone()));
    }
    daemon::run(pool, disks, Duration::from_millis(a.commit_interval_ms))?;
    Ok(ExitCode::SUCCESS)
}
