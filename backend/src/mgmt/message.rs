//! One QMP message taken apart, with QEMU's checks of the request object itself: an object,
//! `execute` a string, `arguments` an object, nothing else but `id`. What the command then
//! makes of its arguments is [`super::commands::parse`].

use super::framing::Frame;
use super::QmpError;
use serde_json::{Map, Value};

/// A request: the command named, its arguments, and the id to echo.
#[derive(Debug)]
pub struct Message {
    pub id: Option<Value>,
    pub execute: String,
    pub arguments: Map<String, Value>,
}

/// A message refused before any command runs: the error, the id to echo (when the input
/// was an object that had one) and the command (when it named one), for the reply and the
/// log line.
#[derive(Debug)]
pub struct Refused {
    pub id: Option<Value>,
    pub name: Option<String>,
    pub error: QmpError,
}

impl Message {
    pub fn from_frame(frame: Frame) -> Result<Message, Refused> {
        let refused = |id, error| Refused {
            id,
            name: None,
            error,
        };
        let v = match frame {
            Frame::Invalid(msg) => return Err(refused(None, QmpError::generic(msg))),
            Frame::Value(v) => v,
        };
        let Value::Object(mut obj) = v else {
            return Err(refused(
                None,
                QmpError::generic("QMP input must be a JSON object"),
            ));
        };
        let id = obj.remove("id");
        if let Some(k) = obj.keys().find(|k| *k != "execute" && *k != "arguments") {
            let e = QmpError::generic(format!("QMP input member '{k}' is unexpected"));
            return Err(refused(id, e));
        }
        let execute = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                let e = QmpError::generic("QMP input member 'execute' must be a string");
                return Err(refused(id, e));
            }
            None => {
                return Err(refused(
                    id,
                    QmpError::generic("QMP input lacks member 'execute'"),
                ))
            }
        };
        let arguments = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(a)) => a,
            Some(_) => {
                return Err(Refused {
                    id,
                    name: Some(execute),
                    error: QmpError::generic("QMP input member 'arguments' must be an object"),
                })
            }
        };
        Ok(Message {
            id,
            execute,
            arguments,
        })
    }
}
