//! The management socket server: QMP framing, greeting, capabilities negotiation, commands,
//! events. Each client has a reader thread (commands, in order) and a writer thread fed by a
//! bounded queue: a client that does not read blocks only itself, and loses events rather
//! than holding anybody up.

use super::args::Args;
use super::commands::{execute, version};
use super::events::CLIENT_QUEUE;
use super::framing::{Frame, Splitter};
use super::QmpError;
use crate::manager::Manager;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Binds the socket (mode `mode`, e.g. 0o600) and serves clients in the background.
pub fn spawn(
    m: Arc<Manager>,
    path: &Path,
    mode: u32,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    log::info!("management socket {}", path.display());
    std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        let m = m.clone();
                        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
                        let _ = std::thread::Builder::new()
                            .name(format!("qmp-{id}"))
                            .spawn(move || client(m, s, id));
                    }
                    Err(e) => log::warn!("management socket: accept failed: {e}"),
                }
            }
        })
}

fn reply(id: Option<Value>, body: Result<Value, QmpError>) -> String {
    let mut o = Map::new();
    match body {
        Ok(v) => o.insert("return".into(), v),
        Err(e) => o.insert("error".into(), e.to_json()),
    };
    if let Some(id) = id {
        o.insert("id".into(), id);
    }
    Value::Object(o).to_string()
}

fn client(m: Arc<Manager>, stream: UnixStream, id: u64) {
    let Ok(mut writer_stream) = stream.try_clone() else {
        return;
    };
    let (tx, rx) = sync_channel::<String>(CLIENT_QUEUE);
    let writer = std::thread::spawn(move || {
        for msg in rx {
            if writer_stream.write_all(msg.as_bytes()).is_err()
                || writer_stream.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = writer_stream.shutdown(std::net::Shutdown::Both);
    });
    log::debug!("management client {id} connected");
    let _ = tx.send(json!({"QMP": {"version": version(), "capabilities": []}}).to_string());
    let mut negotiated = false;
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 65536];
    let mut reader = stream;
    'conn: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for frame in splitter.push(&buf[..n]) {
            let out = handle(&m, frame, &mut negotiated, id, &tx);
            if tx.send(out).is_err() {
                break 'conn;
            }
        }
    }
    m.events.unsubscribe(id);
    drop(tx);
    let _ = writer.join();
    log::debug!("management client {id} left");
}

fn handle(
    m: &Arc<Manager>,
    frame: Frame,
    negotiated: &mut bool,
    client: u64,
    tx: &SyncSender<String>,
) -> String {
    let v = match frame {
        Frame::Invalid(msg) => return reply(None, Err(QmpError::generic(msg))),
        Frame::Value(v) => v,
    };
    let Value::Object(mut obj) = v else {
        return reply(
            None,
            Err(QmpError::generic("QMP input must be a JSON object")),
        );
    };
    let id = obj.remove("id");
    if let Some(k) = obj.keys().find(|k| *k != "execute" && *k != "arguments") {
        return reply(
            id,
            Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            ))),
        );
    }
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return reply(
                id,
                Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                )),
            )
        }
        None => {
            return reply(
                id,
                Err(QmpError::generic("QMP input lacks member 'execute'")),
            )
        }
    };
    let args = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => {
            return reply(
                id,
                Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                )),
            )
        }
    };
    if name == "qmp_capabilities" {
        if *negotiated {
            return reply(
                id,
                Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                }),
            );
        }
        let mut a = Args::new(args);
        // We offer no capabilities; asking for one is an error, as in QEMU.
        let r = match a.opt_str("enable") {
            Err(_) => Err(QmpError::generic("Capability 'oob' not available")),
            Ok(_) => a.finish(),
        };
        if r.is_ok() {
            *negotiated = true;
            m.events.subscribe(client, tx.clone());
        }
        return reply(id, r.map(|_| json!({})));
    }
    if !*negotiated {
        return reply(
            id,
            Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            }),
        );
    }
    let t0 = std::time::Instant::now();
    let r = execute(m, &name, Args::new(args));
    match &r {
        Ok(_) => log::info!("qmp {name}: ok ({:?})", t0.elapsed()),
        Err(e) => log::info!("qmp {name}: {} ({})", e.class, e.desc),
    }
    reply(id, r)
}
