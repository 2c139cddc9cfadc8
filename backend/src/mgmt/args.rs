//! Command arguments, checked the way QEMU's QMP checks them, with its messages.

use super::QmpError;
use serde_json::{Map, Value};

/// The arguments not taken yet: each getter removes its key, so what is left at
/// [`Args::finish`] is what no handler asked for.
pub struct Args {
    map: Map<String, Value>,
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Self {
        Args { map }
    }

    fn get(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k)
    }

    fn missing(k: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{k}' is missing"))
    }

    fn bad_type(k: &str, want: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{k}', expected: {want}"
        ))
    }

    /// QEMU words a bad number differently from a bad string or boolean (its uint64 visitor
    /// reports a bad value, not a bad type); so do we.
    fn bad_number(k: &str, want: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{k}' expects {want}"))
    }

    pub fn opt_str(&mut self, k: &str) -> Result<Option<String>, QmpError> {
        match self.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::bad_type(k, "string")),
        }
    }

    pub fn str(&mut self, k: &str) -> Result<String, QmpError> {
        self.opt_str(k)?.ok_or_else(|| Self::missing(k))
    }

    pub fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, QmpError> {
        match self.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(Self::bad_type(k, "boolean")),
        }
    }

    pub fn bool(&mut self, k: &str) -> Result<bool, QmpError> {
        self.opt_bool(k)?.ok_or_else(|| Self::missing(k))
    }

    pub fn opt_u64(&mut self, k: &str) -> Result<Option<u64>, QmpError> {
        match self.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::bad_number(k, "uint64")),
            Some(_) => Err(Self::bad_number(k, "uint64")),
        }
    }

    /// A byte size: a number, or a string such as "10GiB".
    pub fn opt_size(&mut self, k: &str) -> Result<Option<u64>, QmpError> {
        match self.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::bad_number(k, "size")),
            Some(Value::String(s)) => crate::size::parse_size(&s)
                .map(Some)
                .map_err(|e| QmpError::generic(format!("Parameter '{k}': {e}"))),
            Some(_) => Err(Self::bad_number(k, "size")),
        }
    }

    pub fn size(&mut self, k: &str) -> Result<u64, QmpError> {
        self.opt_size(k)?.ok_or_else(|| Self::missing(k))
    }

    /// A list of strings (a command's argv).
    pub fn opt_str_list(&mut self, k: &str) -> Result<Option<Vec<String>>, QmpError> {
        match self.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(Self::bad_type(k, "array of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(Self::bad_type(k, "array of strings")),
        }
    }

    /// Errors on any argument no handler asked for.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        let Value::Object(m) = v else { unreachable!() };
        Args::new(m)
    }

    #[test]
    fn what_no_handler_took_is_unexpected() {
        let mut a = args(json!({"name": "d", "size": "1MiB", "force": true}));
        assert_eq!(a.str("name").unwrap(), "d");
        assert_eq!(a.size("size").unwrap(), 1 << 20);
        assert_eq!(
            a.finish().unwrap_err().desc,
            "Parameter 'force' is unexpected"
        );
        let mut a = args(json!({"name": "d", "force": null}));
        assert_eq!(a.str("name").unwrap(), "d");
        assert_eq!(a.opt_bool("force").unwrap(), None);
        assert_eq!(a.opt_u64("absent").unwrap(), None);
        a.finish().unwrap();
        let mut a = args(json!({}));
        assert_eq!(
            a.str("name").unwrap_err().desc,
            "Parameter 'name' is missing"
        );
        let mut a = args(json!({"argv": ["ssh", "h"], "bad": ["x", 1]}));
        assert_eq!(a.opt_str_list("argv").unwrap().unwrap(), ["ssh", "h"]);
        assert_eq!(
            a.opt_str_list("bad").unwrap_err().desc,
            "Invalid parameter type for 'bad', expected: array of strings"
        );
    }
}
