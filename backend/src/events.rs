//! The daemon's events (a disk connected, a job changed status, a pool ran out of space…)
//! and the bus that hands each to every subscriber. Neutral of any protocol: `mgmt` formats
//! them as QMP events for its clients.
//!
//! Emitting never blocks: a subscriber takes an event or refuses it (its queue is full, or
//! it is gone); a full subscriber loses that event (a warning is logged once), a gone one is
//! dropped.

use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One event: its name (QMP's event names: `DISK_CONNECTED`, `JOB_STATUS_CHANGE`, …),
/// its data, and when it happened.
#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub at: SystemTime,
}

/// What a subscriber did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Taken,
    /// Its queue is full: this event is lost to it.
    Full,
    /// It is gone: it is dropped from the bus.
    Gone,
}

type Deliver = Box<dyn FnMut(&Event) -> Delivery + Send>;

struct Subscriber {
    id: u64,
    deliver: Deliver,
    warned: bool,
}

#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl EventBus {
    /// Adds a subscriber; `id` names it in logs and in [`EventBus::unsubscribe`].
    pub fn subscribe(&self, id: u64, deliver: impl FnMut(&Event) -> Delivery + Send + 'static) {
        crate::sync::lock(&self.subscribers).push(Subscriber {
            id,
            deliver: Box::new(deliver),
            warned: false,
        });
    }

    pub fn unsubscribe(&self, id: u64) {
        crate::sync::lock(&self.subscribers).retain(|s| s.id != id);
    }

    pub fn emit(&self, name: &str, data: Value) {
        tracing::info!("event {name} {data}");
        let ev = Event {
            name: name.to_string(),
            data,
            at: SystemTime::now(),
        };
        crate::sync::lock(&self.subscribers).retain_mut(|s| match (s.deliver)(&ev) {
            Delivery::Taken => true,
            Delivery::Full => {
                if !s.warned {
                    tracing::warn!(
                        "management client {} does not read its events; dropping some",
                        s.id
                    );
                    s.warned = true;
                }
                true
            }
            Delivery::Gone => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_subscriber_loses_events_and_a_gone_one_is_dropped() {
        let bus = EventBus::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1);
        bus.subscribe(1, move |ev| match tx.try_send(ev.name.clone()) {
            Ok(()) => Delivery::Taken,
            Err(std::sync::mpsc::TrySendError::Full(_)) => Delivery::Full,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Delivery::Gone,
        });
        bus.emit("A", json!({}));
        bus.emit("B", json!({}));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["A"]);
        drop(rx);
        bus.emit("C", json!({}));
        assert!(crate::sync::lock(&bus.subscribers).is_empty());
    }
}
