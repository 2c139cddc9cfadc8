//! `vhost-thin ctl`: a small client of the management socket, human tables by default,
//! `--json` for scripts.

use crate::size::{human, parse_size};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Management socket (default: $VHOST_THIN_QMP, else ./vhost-thin-state/qmp.sock).
    #[arg(long, short = 's', value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the raw JSON result.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// List disks.
    Disks,
    /// List snapshots.
    Snapshots,
    /// Show pools.
    Pools,
    /// Snapshot a disk (running or not).
    Snapshot { disk: String, name: String },
    /// A new disk as a clone of a snapshot or disk.
    Clone {
        from: String,
        name: String,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        num_queues: Option<u64>,
    },
    /// A new empty disk.
    Add {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        num_queues: Option<u64>,
    },
    /// Remove a disk (and its data).
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Grow a disk.
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Delete a snapshot.
    DeleteSnapshot { name: String },
    /// Make a disconnected disk's contents those of a snapshot.
    Revert { disk: String, snapshot: String },
    /// Print events as they come.
    Watch,
    /// Any command: `ctl exec pool-set-policy '{"out-of-space": "queue", "timeout": 30}'`.
    Exec {
        command: String,
        arguments: Option<String>,
    },
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &PathBuf) -> Result<Client> {
        let s = UnixStream::connect(path).with_context(|| {
            format!("cannot connect to the management socket {}", path.display())
        })?;
        let mut c = Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            bail!(
                "{} did not greet like a QMP server: {greeting}",
                path.display()
            );
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the daemon closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let m = self.read()?;
            if m.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(e) = m.get("error") {
                bail!(
                    "{}: {}",
                    e["class"].as_str().unwrap_or("Error"),
                    e["desc"].as_str().unwrap_or("")
                );
            }
            return Ok(m["return"].clone());
        }
    }
}

fn default_socket() -> PathBuf {
    std::env::var_os("VHOST_THIN_QMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("vhost-thin-state/qmp.sock"))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn run(a: CtlArgs) -> Result<ExitCode> {
    let path = a.socket.clone().unwrap_or_else(default_socket);
    let mut c = Client::connect(&path)?;
    let (cmd, args) = match &a.cmd {
        CtlCmd::Disks => ("query-disks", json!({})),
        CtlCmd::Snapshots => ("query-snapshots", json!({})),
        CtlCmd::Pools => ("query-pools", json!({})),
        CtlCmd::Snapshot { disk, name } => ("snapshot-create", json!({"disk": disk, "name": name})),
        CtlCmd::Clone {
            from,
            name,
            socket,
            num_queues,
        } => (
            "disk-add",
            json!({"name": name, "clone-from": from, "socket": socket, "num-queues": num_queues}),
        ),
        CtlCmd::Add {
            name,
            size,
            socket,
            num_queues,
        } => (
            "disk-add",
            json!({"name": name, "size": size, "socket": socket, "num-queues": num_queues}),
        ),
        CtlCmd::Remove { name, force } => ("disk-remove", json!({"name": name, "force": force})),
        CtlCmd::Resize { name, size } => ("disk-resize", json!({"name": name, "size": size})),
        CtlCmd::DeleteSnapshot { name } => ("snapshot-delete", json!({"name": name})),
        CtlCmd::Revert { disk, snapshot } => (
            "snapshot-revert",
            json!({"disk": disk, "snapshot": snapshot}),
        ),
        CtlCmd::Exec { command, arguments } => {
            let args: Value = match arguments {
                Some(t) => serde_json::from_str(t).context("arguments must be a JSON object")?,
                None => json!({}),
            };
            (command.as_str(), args)
        }
        CtlCmd::Watch => loop {
            let m = c.read()?;
            if m.get("event").is_some() {
                if a.json {
                    println!("{m}");
                } else {
                    println!(
                        "{} {} {}",
                        m["timestamp"]["seconds"],
                        s(&m["event"]),
                        m["data"]
                    );
                }
                std::io::stdout().flush()?;
            }
        },
    };
    // Leave out null arguments (optional ones not given).
    let args = match args {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        v => v,
    };
    let r = c.execute(cmd, args)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &a.cmd {
        CtlCmd::Disks => {
            println!(
                "{:<16} {:>10} {:>10} {:>10} {:<9} {:<20} SOCKET",
                "NAME", "SIZE", "MAPPED", "EXCLUSIVE", "GUEST", "ORIGIN"
            );
            for d in r.as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>10} {:>10} {:>10} {:<9} {:<20} {}",
                    s(&d["name"]),
                    human(d["size"].as_u64().unwrap_or(0)),
                    human(d["mapped-bytes"].as_u64().unwrap_or(0)),
                    human(d["exclusive-bytes"].as_u64().unwrap_or(0)),
                    if d["connected"] == json!(true) {
                        "connected"
                    } else {
                        "-"
                    },
                    s(&d["origin"]),
                    s(&d["socket"]),
                );
            }
        }
        CtlCmd::Snapshots => {
            println!(
                "{:<20} {:<16} {:>10} {:>10}",
                "NAME", "OF", "SIZE", "EXCLUSIVE"
            );
            for d in r.as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<16} {:>10} {:>10}",
                    s(&d["name"]),
                    s(&d["origin"]),
                    human(d["size"].as_u64().unwrap_or(0)),
                    human(d["exclusive-bytes"].as_u64().unwrap_or(0)),
                );
            }
        }
        CtlCmd::Pools => {
            for p in r.as_array().into_iter().flatten() {
                let bs = p["block-size"].as_u64().unwrap_or(0);
                println!(
                    "{}: data {} of {} used, metadata {} of {} blocks, mode {}{}, transaction {}",
                    s(&p["name"]),
                    human(p["data-used"].as_u64().unwrap_or(0) * bs),
                    human(p["data-blocks"].as_u64().unwrap_or(0) * bs),
                    p["metadata-used"],
                    p["metadata-blocks"],
                    s(&p["mode"]),
                    if p["needs-check"] == json!(true) {
                        " (needs check)"
                    } else {
                        ""
                    },
                    p["transaction-id"],
                );
            }
        }
        CtlCmd::Snapshot { disk, name } => println!(
            "snapshot {name} of {disk} taken (writes held {} µs)",
            r["pause-us"]
        ),
        CtlCmd::Clone { name, .. } | CtlCmd::Add { name, .. } => {
            println!("disk {name} served on {}", s(&r["socket"]))
        }
        _ => println!(
            "{}",
            if r == json!({}) {
                "ok".to_string()
            } else {
                r.to_string()
            }
        ),
    }
    Ok(ExitCode::SUCCESS)
}
