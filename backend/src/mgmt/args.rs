//! Command arguments, checked the way QEMU's QMP checks them, with its messages: every
//! string and number a client sends is checked here, as it is read (names against the
//! engine's rule, sizes against what the engine serves, paths for a NUL), before any
//! command runs. Nothing here touches the daemon's
//! state, so the fuzz target (fuzz/fuzz_targets/qmp.rs) runs it without one.

use super::QmpError;
use crate::manager::device_state::ReplicationTarget;
use crate::manager::transfer::Destination;
use serde_json::{Map, Value};
use std::path::PathBuf;
use vmm_config::limits;

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

    /// A value of the right type that is not one the command can take: QEMU's "expects"
    /// wording, the rule, and what is wrong with this one.
    fn bad_value(k: &str, want: &str, why: impl std::fmt::Display) -> QmpError {
        QmpError::generic(format!("Parameter '{k}' expects {want}: {why}"))
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

    /// The name of a disk, snapshot or pool, new or referred to: held to the engine's rule
    /// (`thinpool::names`), so that what cannot be a name is refused for what it is,
    /// never looked up, created, or made into a path.
    pub fn opt_name(&mut self, k: &str) -> Result<Option<String>, QmpError> {
        let s = self.opt_str(k)?;
        if let Some(n) = &s {
            limits::check_name(n).map_err(|why| {
                Self::bad_value(k, &format!("a name ({})", limits::NAME_RULE), why)
            })?;
        }
        Ok(s)
    }

    pub fn name(&mut self, k: &str) -> Result<String, QmpError> {
        self.opt_name(k)?.ok_or_else(|| Self::missing(k))
    }

    /// A job ID: the rule of names, longer (it also names the job's thread, which cannot
    /// hold a NUL).
    pub fn opt_job_id(&mut self, k: &str) -> Result<Option<String>, QmpError> {
        let s = self.opt_str(k)?;
        if let Some(n) = &s {
            limits::check_job_id(n).map_err(|why| {
                Self::bad_value(k, &format!("a job ID ({})", limits::JOB_ID_RULE), why)
            })?;
        }
        Ok(s)
    }

    pub fn job_id(&mut self, k: &str) -> Result<String, QmpError> {
        self.opt_job_id(k)?.ok_or_else(|| Self::missing(k))
    }

    /// A path on the daemon's host: not empty, and without a NUL (no path can hold one;
    /// the system calls would refuse it later, with a vaguer error).
    pub fn opt_path(&mut self, k: &str) -> Result<Option<String>, QmpError> {
        let s = self.opt_str(k)?;
        if let Some(p) = &s {
            if p.is_empty() {
                return Err(Self::bad_value(k, "a path", "it is empty"));
            }
            if p.contains('\0') {
                return Err(Self::bad_value(k, "a path", "it contains a NUL"));
            }
        }
        Ok(s)
    }

    pub fn path(&mut self, k: &str) -> Result<String, QmpError> {
        self.opt_path(k)?.ok_or_else(|| Self::missing(k))
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

    pub fn u64(&mut self, k: &str) -> Result<u64, QmpError> {
        self.opt_u64(k)?.ok_or_else(|| Self::missing(k))
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

    /// A count held in a usize (queues): a uint64 that fits, refused rather than cut.
    pub fn opt_usize(&mut self, k: &str) -> Result<Option<usize>, QmpError> {
        self.opt_u64(k)?
            .map(|n| usize::try_from(n).map_err(|_| Self::bad_number(k, "uint64")))
            .transpose()
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

    /// A disk's size: a size the engine can serve ([`limits::disk_size_problem`]), so that
    /// no disk is made or grown past what its reads and writes can address.
    pub fn opt_disk_size(&mut self, k: &str) -> Result<Option<u64>, QmpError> {
        let s = self.opt_size(k)?;
        if let Some(why) = s.and_then(limits::disk_size_problem) {
            return Err(Self::bad_value(k, limits::DISK_SIZE_RULE, why));
        }
        Ok(s)
    }

    pub fn disk_size(&mut self, k: &str) -> Result<u64, QmpError> {
        self.opt_disk_size(k)?.ok_or_else(|| Self::missing(k))
    }

    /// A list of strings (a command's argv), none with a NUL (no argument can hold one).
    pub fn opt_str_list(&mut self, k: &str) -> Result<Option<Vec<String>>, QmpError> {
        let list = match self.get(k) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(Self::bad_type(k, "array of strings")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(Self::bad_type(k, "array of strings")),
        };
        if list.iter().any(|s| s.contains('\0')) {
            return Err(Self::bad_value(
                k,
                "an array of strings",
                "one contains a NUL",
            ));
        }
        Ok(Some(list))
    }

    /// Errors on any argument no handler asked for. Calling it again is harmless: a
    /// reader that checks how its arguments combine refuses leftovers first.
    pub fn finish(&mut self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

/// Where `snapshot-send` sends its stream: exactly one of `file`, `command` or `pool`
/// (with `name`). Arguments left over are refused first, then how they combine.
pub fn destination(a: &mut Args) -> Result<Destination, QmpError> {
    let file = a.opt_path("file")?;
    let command = a.opt_str_list("command")?;
    let pool = a.opt_name("pool")?;
    let target_name = a.opt_name("name")?;
    a.finish()?;
    let dest = match (file, command, pool) {
        (Some(f), None, None) => Destination::File(PathBuf::from(f)),
        (None, Some(c), None) => Destination::Command(c),
        (None, None, Some(p)) => Destination::Pool {
            pool: p,
            name: target_name.clone().ok_or_else(|| {
                QmpError::generic(
                    "a copy into another pool needs 'name': names are unique across the daemon",
                )
            })?,
        },
        _ => {
            return Err(QmpError::generic(
                "say where the stream goes: exactly one of 'file', 'command' or 'pool'",
            ))
        }
    };
    if target_name.is_some() && !matches!(dest, Destination::Pool { .. }) {
        return Err(QmpError::generic(
            "'name' goes with 'pool' (a receiver names what it receives)",
        ));
    }
    Ok(dest)
}

/// Where `replication-start` sends the replicas of `disk`: exactly one of `pool` (with an
/// optional `prefix`) or `command`. Arguments left over are refused first, then how they
/// combine.
pub fn replication_target(a: &mut Args, disk: &str) -> Result<ReplicationTarget, QmpError> {
    let pool = a.opt_name("pool")?;
    // A name; the manager also keeps it short and without '@', as copies are named
    // `<prefix>@r<seq>`.
    let prefix = a.opt_name("prefix")?;
    let command = a.opt_str_list("command")?;
    a.finish()?;
    match (pool, command) {
        (Some(pool), None) => Ok(ReplicationTarget::Pool {
            prefix: prefix.unwrap_or_else(|| format!("{disk}-replica")),
            pool,
        }),
        (None, Some(argv)) if prefix.is_none() => Ok(ReplicationTarget::Command { argv }),
        (None, Some(_)) => Err(QmpError::generic(
            "'prefix' goes with 'pool' (a command's receiver names what it receives)",
        )),
        _ => Err(QmpError::generic(
            "say where replicas go: exactly one of 'pool' or 'command'",
        )),
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

    #[test]
    fn names_sizes_job_ids_and_paths_are_checked_as_they_are_read() {
        let rule = limits::NAME_RULE;
        let mut a = args(json!({"name": "../x", "pool": "p", "job": "a\u{0}b"}));
        assert_eq!(
            a.name("name").unwrap_err().desc,
            format!("Parameter 'name' expects a name ({rule}): it contains '/'")
        );
        assert_eq!(a.opt_name("pool").unwrap().as_deref(), Some("p"));
        assert!(a
            .opt_job_id("job")
            .unwrap_err()
            .desc
            .ends_with("it contains a control character (U+0000)"));
        let mut a = args(json!({"s": 1u64 << 63, "t": "1000", "u": 0, "v": "4194304TiB"}));
        let e = a.disk_size("s").unwrap_err().desc;
        assert_eq!(
            e,
            format!(
                "Parameter 's' expects {}: 9223372036854775808 is larger",
                limits::DISK_SIZE_RULE
            )
        );
        assert!(a
            .disk_size("t")
            .unwrap_err()
            .desc
            .ends_with("1000 is not a multiple of 512"));
        assert!(a.disk_size("u").unwrap_err().desc.ends_with("it is 0"));
        assert_eq!(a.disk_size("v").unwrap(), limits::MAX_DISK_SIZE);
        let mut a = args(json!({"f": "", "g": "a\u{0}", "c": ["x", "y\u{0}"]}));
        assert!(a.path("f").unwrap_err().desc.ends_with("it is empty"));
        assert!(a.path("g").unwrap_err().desc.ends_with("it contains a NUL"));
        assert!(a.opt_str_list("c").is_err());
    }
}
