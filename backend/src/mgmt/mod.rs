//! The management socket: QMP's wire protocol (so `qemu.qmp` and `socat` work unchanged),
//! the commands, and the events.

pub mod args;
pub mod commands;
pub mod events;
pub mod framing;
pub mod message;
pub mod server;

use serde_json::{json, Value};

/// A QMP error: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "DeviceNotFound",
            desc: desc.into(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"class": self.class, "desc": self.desc})
    }
}

impl From<crate::manager::Error> for QmpError {
    fn from(e: crate::manager::Error) -> Self {
        match e {
            crate::manager::Error::NotFound(d) => QmpError::not_found(d),
            crate::manager::Error::Failed(d) => QmpError::generic(d),
        }
    }
}
