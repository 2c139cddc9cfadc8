//! Events pushed to every negotiated management client, QMP-style:
//! `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}`.
//! The events themselves and their bus are `crate::events`; this is their wire form.

use crate::events::{Delivery, Emitted, EventBus};
use serde_json::{json, Value};
use std::sync::mpsc::{SyncSender, TrySendError};

/// Events a client may have queued before it loses some.
pub const CLIENT_QUEUE: usize = 1024;

/// QMP's timestamp of a moment.
pub fn timestamp(at: std::time::SystemTime) -> Value {
    let t = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()})
}

/// An event as a QMP message.
pub fn to_qmp(ev: &Emitted) -> String {
    json!({"event": ev.name, "data": ev.data, "timestamp": timestamp(ev.at)}).to_string()
}

/// Subscribes client `id`, whose outgoing messages go through `tx` (bounded: a client that
/// does not read loses events rather than holding up the daemon).
pub fn subscribe(bus: &EventBus, id: u64, tx: SyncSender<String>) {
    bus.subscribe(id, move |ev| match tx.try_send(to_qmp(ev)) {
        Ok(()) => Delivery::Taken,
        Err(TrySendError::Full(_)) => Delivery::Full,
        Err(TrySendError::Disconnected(_)) => Delivery::Gone,
    });
}
