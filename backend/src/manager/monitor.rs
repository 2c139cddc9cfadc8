//! The pool monitor: a thread that watches each pool's usage and mode, and tells
//! management clients when something they act on changes (a low-water mark crossed, out
//! of data space, a mode change), and wakes writes held for space when blocks are freed.

use super::{lock, Manager, PoolHandle};
use crate::blk::disk::OutOfSpace;
use crate::events::{Event, EventBus};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thinpool::pool::PoolMode;

/// How often the pools are looked at.
const PERIOD: Duration = Duration::from_millis(200);

/// What the monitor last saw of a pool, to report changes once.
struct PoolWatch {
    data_low: bool,
    metadata_low: bool,
    full: bool,
    mode: String,
    needs_check: bool,
    data_used: u64,
}

impl Manager {
    /// Watches each pool: low-water crossings, out of space, mode changes; wakes held
    /// writes when blocks are freed. Runs until `stop`.
    pub fn monitor(self: &Arc<Self>, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("pool-monitor".into())
            .spawn(move || {
                let mut seen: BTreeMap<String, PoolWatch> = BTreeMap::new();
                while !stop.load(Ordering::SeqCst) {
                    for p in me.pools.values() {
                        watch_pool(p, &mut seen, &me.events);
                    }
                    std::thread::sleep(PERIOD);
                }
            })
    }
}

/// One look at pool `p`: events for what changed since the last look.
fn watch_pool(p: &PoolHandle, seen: &mut BTreeMap<String, PoolWatch>, events: &EventBus) {
    let st = p.pool().status();
    let u = &st.usage;
    let (lw_d, lw_m) = *lock(&p.low_water);
    let data_pct = u.data_used * 100 / u.data_blocks.max(1);
    let meta_pct = u.metadata_used * 100 / u.metadata_blocks.max(1);
    if u.data_used < u.data_blocks && p.space.timed_out() {
        p.space.space_available();
    }
    let (mode, reason) = effective_mode(p, &st);
    let last = seen.entry(p.name.clone()).or_insert(PoolWatch {
        data_low: false,
        metadata_low: false,
        full: false,
        mode: mode.clone(),
        needs_check: st.needs_check,
        data_used: u.data_used,
    });
    let data_low = data_pct >= u64::from(lw_d);
    let metadata_low = meta_pct >= u64::from(lw_m);
    for (kind, low, was_low, used_percent, threshold) in [
        ("data", data_low, last.data_low, data_pct, lw_d),
        ("metadata", metadata_low, last.metadata_low, meta_pct, lw_m),
    ] {
        if low && !was_low {
            events.emit(Event::PoolLowWatermark {
                pool: p.name.clone(),
                kind,
                used_percent,
                threshold,
            });
        }
    }
    let full = u.data_used >= u.data_blocks || p.space.waiting.load(Ordering::SeqCst) > 0;
    if full && !last.full {
        events.emit(Event::PoolOutOfSpace {
            pool: p.name.clone(),
            data_blocks: u.data_blocks,
            queued_writes: p.space.waiting.load(Ordering::SeqCst),
        });
    }
    if mode != last.mode || st.needs_check != last.needs_check {
        events.emit(Event::PoolModeChanged {
            pool: p.name.clone(),
            mode: mode.clone(),
            needs_check: st.needs_check,
            rolled_back: st.rolled_back,
            reason,
        });
    }
    if u.data_used < last.data_used {
        p.space.space_changed();
    }
    *last = PoolWatch {
        data_low,
        metadata_low,
        full,
        mode,
        needs_check: st.needs_check,
        data_used: u.data_used,
    };
}

/// The mode a person or a script sees, as dm-thin's status reports it: the engine's, or
/// `out-of-data-space` while a writable pool has no free data block (or writes wait for
/// one), with what writes that need one do meanwhile.
pub(super) fn effective_mode(
    p: &PoolHandle,
    st: &thinpool::pool::PoolStatus,
) -> (String, Option<String>) {
    let engine = || {
        (
            serde_json::to_value(st.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            st.mode_reason.clone(),
        )
    };
    let full = st.usage.data_used >= st.usage.data_blocks
        || p.space.waiting.load(Ordering::SeqCst) > 0
        || p.space.timed_out();
    if st.mode != PoolMode::Write || !full {
        return engine();
    }
    let what = match (p.space.policy(), p.space.timed_out()) {
        (OutOfSpace::Queue { .. }, true) => {
            "the queue timeout passed: writes that need a block fail until space is added".into()
        }
        (OutOfSpace::Queue { timeout: Some(t) }, false) => format!(
            "writes that need a block are queued for up to {} s",
            t.as_secs()
        ),
        (OutOfSpace::Queue { timeout: None }, false) => {
            "writes that need a block are queued until space is added".into()
        }
        (OutOfSpace::Error, _) => "writes that need a block fail".into(),
    };
    (
        "out-of-data-space".into(),
        Some(format!(
            "no free data block ({} in use); {what} (pool-grow, or free blocks)",
            st.usage.data_blocks
        )),
    )
}
