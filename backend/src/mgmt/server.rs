//! The management socket server: QMP framing, greeting, capabilities negotiation, commands,
//! events. Each client has a reader thread (commands, in order) and a writer thread fed by a
//! bounded queue: a client that does not read blocks only itself, and loses events rather
//! than holding anybody up.

use super::args::Args;
use super::commands::{self, version};
use super::events::CLIENT_QUEUE;
use super::framing::{Frame, Splitter};
use super::message::Message;
use super::QmpError;
use crate::manager::Manager;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Binds the socket (with `access`, e.g. mode 0o600) and serves clients in the background.
/// Returns the socket file made, for the daemon to remove when it stops.
pub fn spawn(
    m: Arc<Manager>,
    path: &Path,
    access: crate::socket::Access,
) -> std::io::Result<crate::socket::SocketFile> {
    let l = crate::socket::listen(path, access, crate::socket::Stale::Replace)?;
    let file = l.file();
    let listener = l.listener;
    tracing::info!("management socket {}", path.display());
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
                    Err(e) => tracing::warn!("management socket: accept failed: {e}"),
                }
            }
        })?;
    Ok(file)
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

/// Who is on the other end of a connection, for the log.
struct Peer {
    /// Connection number, counted from 1 since the daemon started.
    id: u64,
    /// The client's process id (SO_PEERCRED), 0 when the kernel did not say.
    pid: i32,
    uid: u32,
}

impl Peer {
    fn of(stream: &UnixStream, id: u64) -> Peer {
        let mut cred = libc::ucred {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            cred.pid = 0;
        }
        Peer {
            id,
            pid: cred.pid,
            uid: cred.uid,
        }
    }
}

fn client(m: Arc<Manager>, stream: UnixStream, id: u64) {
    let peer = Peer::of(&stream, id);
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
    tracing::debug!(
        client = id,
        pid = peer.pid,
        uid = peer.uid,
        "management client connected"
    );
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
            let out = handle(&m, frame, &mut negotiated, &peer, &tx);
            if tx.send(out).is_err() {
                break 'conn;
            }
        }
    }
    m.events.unsubscribe(id);
    drop(tx);
    let _ = writer.join();
    tracing::debug!(client = id, "management client left");
}

/// Longest command name or argument text put in a log line; longer ones are cut (with "…").
const LOGGED_MAX: usize = 200;

/// Handles one message and returns the reply. Every message is logged on one line: the
/// command (or `-` when the input was not a command), the client, the time taken and the
/// outcome, so that what a management tool did can be read back from the daemon's log.
fn handle(
    m: &Arc<Manager>,
    frame: Frame,
    negotiated: &mut bool,
    client: &Peer,
    tx: &SyncSender<String>,
) -> String {
    let t0 = std::time::Instant::now();
    let Request {
        id,
        name,
        args,
        result,
    } = dispatch(m, frame, negotiated, client.id, tx);
    let elapsed_ms = (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    // A client names the command: an unknown one may be long too.
    let command = cut(name.unwrap_or_else(|| "-".into()));
    match &result {
        Ok(_) => tracing::info!(
            command = ?command,
            client = client.id,
            pid = client.pid,
            args = %args,
            elapsed_ms,
            outcome = "ok",
            "qmp"
        ),
        Err(e) => tracing::info!(
            command = ?command,
            client = client.id,
            pid = client.pid,
            args = %args,
            elapsed_ms,
            outcome = "error",
            class = e.class,
            desc = ?e.desc,
            "qmp"
        ),
    }
    reply(id, result)
}

/// The arguments as compact JSON, cut short: a log line stays one readable line whatever
/// a client sends.
fn args_for_log(args: Option<&Map<String, Value>>) -> String {
    match args.filter(|a| !a.is_empty()) {
        None => "{}".into(),
        Some(a) => cut(serde_json::to_string(a).unwrap_or_default()),
    }
}

/// `s`, cut at [`LOGGED_MAX`] bytes (on a character boundary) with "…" appended.
fn cut(mut s: String) -> String {
    if s.len() > LOGGED_MAX {
        let mut at = LOGGED_MAX;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
    s
}

/// One message, taken apart: what the log line and the reply need.
struct Request {
    id: Option<Value>,
    /// The command, when the message named one.
    name: Option<String>,
    /// The arguments as logged (see [`args_for_log`]).
    args: String,
    result: Result<Value, QmpError>,
}

fn dispatch(
    m: &Arc<Manager>,
    frame: Frame,
    negotiated: &mut bool,
    client: u64,
    tx: &SyncSender<String>,
) -> Request {
    let msg = match Message::from_frame(frame) {
        Ok(msg) => msg,
        Err(r) => {
            return Request {
                id: r.id,
                name: r.name,
                args: args_for_log(None),
                result: Err(r.error),
            }
        }
    };
    let Message {
        id,
        execute: name,
        arguments,
    } = msg;
    // Made before the arguments go to the command: a log line needs at most LOGGED_MAX
    // bytes of them, not a copy of them all.
    let logged = args_for_log(Some(&arguments));
    let result = guarded(&name, || {
        run_command(m, &name, arguments, negotiated, client, tx)
    });
    Request {
        id,
        name: Some(name),
        args: logged,
        result,
    }
}

/// Runs one command, turning a panic in it into an error reply: the client gets an answer,
/// the daemon and its other clients carry on (the manager's locks recover from poisoning).
fn guarded(name: &str, f: impl FnOnce() -> Result<Value, QmpError>) -> Result<Value, QmpError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!("command {name:?} panicked: {what}");
        Err(QmpError::generic(format!("internal error: {what}")))
    })
}

fn run_command(
    m: &Arc<Manager>,
    name: &str,
    args: Map<String, Value>,
    negotiated: &mut bool,
    client: u64,
    tx: &SyncSender<String>,
) -> Result<Value, QmpError> {
    if name == "qmp_capabilities" {
        if *negotiated {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            });
        }
        // Only its arguments are checked: the negotiation itself is the connection's.
        let _checked = commands::parse(name, Args::new(args))?;
        *negotiated = true;
        super::events::subscribe(&m.events, client, tx.clone());
        return Ok(json!({}));
    }
    // Before negotiation no command is looked at further, its arguments included.
    if !*negotiated {
        return Err(QmpError {
            class: "CommandNotFound",
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        });
    }
    commands::parse(name, Args::new(args))?(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_command_is_answered_with_an_internal_error() {
        let r = guarded("boom", || panic!("the manager broke"));
        let e = r.unwrap_err();
        assert_eq!(e.class, "GenericError");
        assert_eq!(e.desc, "internal error: the manager broke");
        let r = guarded("fine", || Ok(json!({"x": 1})));
        assert_eq!(r.unwrap(), json!({"x": 1}));
    }

    #[test]
    fn long_log_fields_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short".into()), "short");
        // 'é' is two bytes: byte LOGGED_MAX falls inside one.
        let s = format!("a{}", "é".repeat(LOGGED_MAX));
        let c = cut(s);
        assert!(
            c.ends_with('…') && c.len() <= LOGGED_MAX + '…'.len_utf8(),
            "{c}"
        );
        let mut args = Map::new();
        args.insert("name".into(), json!("x".repeat(5000)));
        assert!(args_for_log(Some(&args)).len() < 300);
        assert_eq!(args_for_log(None), "{}");
    }
}
