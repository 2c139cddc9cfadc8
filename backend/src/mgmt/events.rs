//! Events pushed to every negotiated management client, QMP-style:
//! `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}`.
//!
//! Emitting never blocks: each client has a bounded queue, and a client too slow to take
//! its events loses the ones that do not fit (a warning is logged once per client).

use serde_json::{json, Value};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Events a client may have queued before it loses some.
pub const CLIENT_QUEUE: usize = 1024;

/// One client's queue: its id, the sender, and whether it was warned about lost events.
struct Subscriber {
    id: u64,
    tx: SyncSender<String>,
    warned: bool,
}

#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

/// Locks the subscriber list, recovering from poisoning: a panic elsewhere while it was
/// held must not make every later event (and command) panic too.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn timestamp() -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

impl EventBus {
    /// A queue for one client; `id` names it in logs.
    pub fn subscribe(&self, id: u64, sender: SyncSender<String>) {
        lock(&self.subscribers).push(Subscriber {
            id,
            tx: sender,
            warned: false,
        });
    }

    pub fn unsubscribe(&self, id: u64) {
        lock(&self.subscribers).retain(|s| s.id != id);
    }

    pub fn emit(&self, name: &str, data: Value) {
        tracing::info!("event {name} {data}");
        let msg = json!({"event": name, "data": data, "timestamp": timestamp()}).to_string();
        let mut subs = lock(&self.subscribers);
        subs.retain_mut(|s| match s.tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                if !s.warned {
                    tracing::warn!(
                        "management client {} does not read its events; dropping some",
                        s.id
                    );
                    s.warned = true;
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}
