//! Polling of a queue after a pass: before its worker goes to sleep waiting for the
//! driver's next kick, it watches the avail ring for a while, with the driver's kicks
//! suppressed. At a steady queue depth the driver submits again within microseconds of
//! hearing of its completions, and the worker then finds the requests without a sleep and a
//! wake-up, which on a virtual machine cost about as much CPU as serving a batch of small
//! reads (docs/BENCHMARKS.md, "One queue on a RAM-backed pool").
//!
//! A queue is watched only while watching pays: a watch that finds a request keeps the
//! window open; [`EMPTY_TO_CLOSE`] empty ones in a row close it (one empty watch is
//! usually a driver preempted for a moment). A closed window is tried again once every
//! [`PROBE_EVERY`] passes, so an idle queue costs no CPU at all (no pass, no watch) and one
//! whose driver is slow (a request every 100 µs, say) spends at most [`EMPTY_TO_CLOSE`]
//! watches in [`PROBE_EVERY`] passes.
//!
//! At most half the host's CPUs' worth of workers watch at once ([`Watch`]): with more busy
//! queues than cores, workers spinning for their queues took the CPU from the drivers'
//! threads and the other workers (4 queues on 2 cores lost up to a quarter of their IOPS).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The default limit, in µs: QEMU's default `poll-max-ns` for iothreads is 32 µs.
pub const DEFAULT_MAX_US: u64 = 32;

/// The longest a worker watches a queue after a pass (serve --poll-max-us), in ns.
static MAX_NS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_US * 1000);

/// A closed window is tried again after this many passes.
const PROBE_EVERY: u32 = 16;

/// Empty watches in a row that close the window.
const EMPTY_TO_CLOSE: u32 = 4;

/// Sets the limit for every queue from now on; 0 turns polling off.
pub fn set_max(max: Duration) {
    MAX_NS.store(
        max.as_nanos().min(u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
}

/// Whether queues are watched at all.
pub fn enabled() -> bool {
    MAX_NS.load(Ordering::Relaxed) > 0
}

/// Workers watching a queue now.
static WATCHING: AtomicUsize = AtomicUsize::new(0);

/// A worker's turn to watch its queue; ends when dropped.
#[must_use]
pub struct Watch(&'static AtomicUsize);

impl Watch {
    /// A turn, unless half the host's CPUs' worth of workers are watching already.
    pub fn take() -> Option<Watch> {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        let limit = *LIMIT.get_or_init(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        });
        Self::take_within(&WATCHING, limit)
    }

    fn take_within(watching: &'static AtomicUsize, limit: usize) -> Option<Watch> {
        if watching.fetch_add(1, Ordering::AcqRel) >= limit {
            watching.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Watch(watching))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One queue's window.
#[derive(Debug, Default)]
pub struct PollWindow {
    open: bool,
    /// Empty watches in a row while open; passes since it closed.
    count: u32,
}

impl PollWindow {
    /// How long to watch the ring after the pass that just ended (zero: not at all).
    pub fn after_pass(&mut self) -> Duration {
        self.next_within(MAX_NS.load(Ordering::Relaxed))
    }

    /// A window open already, as after a watch that found work.
    #[cfg(test)]
    pub fn opened() -> PollWindow {
        PollWindow {
            open: true,
            count: 0,
        }
    }

    fn next_within(&mut self, max: u64) -> Duration {
        if max == 0 {
            return Duration::ZERO;
        }
        if self.open {
            return Duration::from_nanos(max);
        }
        self.count += 1;
        if self.count < PROBE_EVERY {
            return Duration::ZERO;
        }
        self.count = 0;
        Duration::from_nanos(max)
    }

    /// What the watch of [`PollWindow::after_pass`]'s window found.
    pub fn watched(&mut self, found: bool) {
        if found {
            (self.open, self.count) = (true, 0);
        } else if self.open {
            self.count += 1;
            if self.count >= EMPTY_TO_CLOSE {
                (self.open, self.count) = (false, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 32_000;

    fn windows(w: &mut PollWindow, passes: u32) -> Vec<u64> {
        (0..passes)
            .map(|_| w.next_within(MAX).as_nanos() as u64)
            .collect()
    }

    #[test]
    fn a_closed_window_is_tried_once_in_a_while_and_opens_when_a_watch_finds_work() {
        let mut w = PollWindow::default();
        let seen = windows(&mut w, PROBE_EVERY);
        assert!(seen[..PROBE_EVERY as usize - 1].iter().all(|&n| n == 0));
        assert_eq!(
            seen[PROBE_EVERY as usize - 1],
            MAX,
            "the probe watches the limit"
        );
        w.watched(true);
        assert_eq!(
            windows(&mut w, 3),
            [MAX, MAX, MAX],
            "open while watches find work"
        );
    }

    #[test]
    fn empty_watches_in_a_row_close_the_window_and_one_that_finds_work_resets_the_count() {
        let mut w = PollWindow::default();
        w.watched(true);
        for _ in 0..EMPTY_TO_CLOSE - 1 {
            w.watched(false);
        }
        w.watched(true);
        for _ in 0..EMPTY_TO_CLOSE - 1 {
            w.watched(false);
            assert_eq!(w.next_within(MAX), Duration::from_nanos(MAX));
        }
        w.watched(false);
        assert_eq!(w.next_within(MAX), Duration::ZERO, "closed");
    }

    #[test]
    fn a_slow_queue_watches_a_few_times_in_probe_every_passes() {
        let mut w = PollWindow::default();
        let mut watched = 0;
        for _ in 0..PROBE_EVERY * 10 {
            if !w.next_within(MAX).is_zero() {
                watched += 1;
                w.watched(false);
            }
        }
        assert_eq!(watched, 10, "a probe that finds nothing does not open it");
    }

    #[test]
    fn a_limit_of_zero_never_watches() {
        let mut w = PollWindow::default();
        w.watched(true);
        for _ in 0..PROBE_EVERY * 2 {
            assert_eq!(w.next_within(0), Duration::ZERO);
        }
    }

    #[test]
    fn no_more_workers_watch_at_once_than_the_limit() {
        // A count of its own: the process's is the backend tests' as well.
        static WATCHING: AtomicUsize = AtomicUsize::new(0);
        let first = Watch::take_within(&WATCHING, 2).expect("a first turn");
        let second = Watch::take_within(&WATCHING, 2).expect("a second turn");
        assert!(
            Watch::take_within(&WATCHING, 2).is_none(),
            "a third beyond the limit"
        );
        drop(first);
        let third = Watch::take_within(&WATCHING, 2).expect("a turn given back is taken again");
        drop((second, third));
        assert_eq!(WATCHING.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_lower_limit_caps_a_window_already_open() {
        let mut w = PollWindow::default();
        w.watched(true);
        assert_eq!(w.next_within(6_000), Duration::from_micros(6));
    }
}
