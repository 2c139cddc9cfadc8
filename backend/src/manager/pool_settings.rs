//! What an operator set on a pool at run time (`pool-set-policy`: the out-of-space policy
//! and the low-water marks), kept in a file of the daemon's own beside the pool
//! (`METADATA.settings.json`, for a metadata file; none for a block device) so that a
//! restart keeps it. The engine's registry is not the place: these are the daemon's.

use crate::blk::disk::OutOfSpace;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PoolSettings {
    /// "error" or "queue".
    pub out_of_space: Policy,
    /// Seconds a write is queued; 0: until space appears. Only with `queue`.
    #[serde(default)]
    pub timeout: u64,
    pub low_water_data: u8,
    pub low_water_metadata: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Error,
    Queue,
}

impl PoolSettings {
    pub fn new(mode: OutOfSpace, (low_water_data, low_water_metadata): (u8, u8)) -> Self {
        let (out_of_space, timeout) = match mode {
            OutOfSpace::Error => (Policy::Error, 0),
            OutOfSpace::Queue { timeout } => (Policy::Queue, timeout.map_or(0, |t| t.as_secs())),
        };
        PoolSettings {
            out_of_space,
            timeout,
            low_water_data,
            low_water_metadata,
        }
    }

    pub fn mode(&self) -> OutOfSpace {
        match self.out_of_space {
            Policy::Error => OutOfSpace::Error,
            Policy::Queue => OutOfSpace::Queue {
                timeout: (self.timeout > 0).then(|| Duration::from_secs(self.timeout)),
            },
        }
    }

    pub fn low_water(&self) -> (u8, u8) {
        (self.low_water_data, self.low_water_metadata)
    }
}

/// Where a pool's settings are kept: beside a metadata file, none for a block device.
pub fn path_for(metadata: &Path) -> Option<PathBuf> {
    let regular = std::fs::metadata(metadata).is_ok_and(|m| m.is_file());
    regular.then(|| {
        let mut p = metadata.as_os_str().to_owned();
        p.push(".settings.json");
        PathBuf::from(p)
    })
}

/// The settings kept at `path`, if any. A file that cannot be read or parsed is an error
/// (the operator's setting must not silently fall back to a default).
pub fn load(path: &Path) -> Result<Option<PoolSettings>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let s: PoolSettings = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: {e} (remove the file to use the configured settings)",
            path.display()
        )
    })?;
    if s.low_water_data > 100 || s.low_water_metadata > 100 {
        return Err(format!(
            "{}: low-water marks are percentages, 0 to 100",
            path.display()
        ));
    }
    if s.out_of_space == Policy::Queue {
        vmm_config::limits::check_queue_timeout(s.timeout)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Some(s))
}

/// Writes `s` at `path` durably: a temporary file, synced, renamed over, the directory
/// synced; mode 0600.
pub fn save(path: &Path, s: &PoolSettings) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let text = serde_json::to_string_pretty(s).map_err(std::io::Error::other)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("p.meta");
        std::fs::write(&meta, b"").unwrap();
        let path = path_for(&meta).unwrap();
        assert_eq!(load(&path).unwrap(), None);
        let s = PoolSettings::new(
            OutOfSpace::Queue {
                timeout: Some(Duration::from_secs(30)),
            },
            (70, 90),
        );
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        assert_eq!(load(&path).unwrap().unwrap().mode(), s.mode());
        std::fs::write(&path, b"{\"out-of-space\": \"sometimes\"}").unwrap();
        assert!(load(&path).unwrap_err().contains("remove the file"));
        assert_eq!(path_for(Path::new("/dev/null")), None);
    }
}
