//! External origins are kept by path in the registry ([`DeviceEntry::external_origin`]) and
//! in memory by the pool ([`Pool::set_external_origin`]): joining the two when a pool is
//! opened (or an image was rewritten) is the catalog's, which owns both.
//!
//! [`DeviceEntry::external_origin`]: crate::registry::DeviceEntry::external_origin

use super::Catalog;
use crate::origin::{ExternalOrigin, OriginError};
use crate::pool::Pool;
use crate::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// One device whose external origin could not be attached.
#[derive(Debug)]
pub struct AttachFailure {
    pub id: u32,
    pub path: String,
    /// Shared by the devices that name the same path.
    pub error: Arc<OriginError>,
}

impl std::fmt::Display for AttachFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "thin device {}: {}", self.id, self.error)
    }
}

impl Catalog {
    /// Gives every device of the pool the external origin its registry entry names (and
    /// takes it away from entries that name none). Each path is opened once and shared by
    /// the devices that name it. A device whose origin cannot be opened gets an unavailable
    /// one (its reads of unmapped blocks fail rather than read zeros) and is reported; the
    /// others are attached regardless. Registry entries without a pool device are skipped
    /// (reconciliation reports them).
    pub fn attach_origins(&self) -> Vec<AttachFailure> {
        attach(&self.pool, &self.lock_registry())
    }
}

fn attach(pool: &Pool, reg: &Registry) -> Vec<AttachFailure> {
    let pool_ids: HashSet<u32> = pool.devices().into_iter().map(|(id, _)| id).collect();
    let mut opened: HashMap<&str, Result<Arc<ExternalOrigin>, Arc<OriginError>>> = HashMap::new();
    let mut failures = Vec::new();
    for (&id, entry) in &reg.devices {
        if !pool_ids.contains(&id) {
            continue;
        }
        let origin = match &entry.external_origin {
            None => None,
            Some(path) => {
                let got = opened.entry(path.as_str()).or_insert_with(|| {
                    ExternalOrigin::open(Path::new(path))
                        .map(Arc::new)
                        .map_err(Arc::new)
                });
                match got {
                    Ok(o) => Some(o.clone()),
                    Err(e) => {
                        failures.push(AttachFailure {
                            id,
                            path: path.clone(),
                            error: e.clone(),
                        });
                        Some(Arc::new(ExternalOrigin::unavailable(path, e.to_string())))
                    }
                }
            }
        };
        if let Err(e) = pool.set_external_origin(id, origin) {
            failures.push(AttachFailure {
                id,
                path: entry.external_origin.clone().unwrap_or_default(),
                error: Arc::new(e.into()),
            });
        }
    }
    failures
}
