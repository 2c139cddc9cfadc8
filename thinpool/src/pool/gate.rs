//! A thin device's gate: the pool operations in flight on one device that change it
//! (writes, write-zeroes, discards), counted so that
//! - a snapshot can wait for those begun before it was made, without holding those begun
//!   after ([`DeviceGate::new_epoch`], [`EarlierWrites::wait`]): the guest's writes go on
//!   while the snapshot settles;
//! - a change that needs the device quiet (deleting it, changing its external origin) can
//!   wait for all of them and hold new ones ([`DeviceGate::close`]).
//!
//! Each operation counts in the epoch current when it began, the way dm-thin's deferred
//! sets are kept; a snapshot starts a new epoch and waits until no operation of an
//! earlier one is left.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// The epoch operations that begin now count in.
    epoch: u64,
    /// Operations in flight per epoch, oldest first (an entry may be down to zero); one or
    /// two epochs at a time. A deque keeps its room, so counting allocates nothing once
    /// warm: every write of the device passes here.
    in_flight: VecDeque<(u64, u64)>,
    /// Held by [`DeviceGate::close`]: new operations wait.
    closed: bool,
    /// The device was deleted ([`Closed::retire`]): operations that waited for it, or
    /// come with this gate still in hand, fail instead of reaching a device made again
    /// with the same id.
    retired: bool,
    /// Threads waiting on the condition variable (a release wakes them only if any).
    waiters: u32,
}

impl State {
    fn any_before(&self, epoch: u64) -> bool {
        self.in_flight.iter().any(|&(e, n)| e < epoch && n > 0)
    }

    fn any(&self) -> bool {
        self.in_flight.iter().any(|&(_, n)| n > 0)
    }
}

#[derive(Default)]
pub(super) struct DeviceGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// One operation in flight on the device, counted until dropped.
pub(super) struct Entered<'a> {
    gate: &'a DeviceGate,
    epoch: u64,
}

/// The device held quiet: nothing in flight, new operations wait until dropped.
pub(super) struct Closed<'a> {
    gate: &'a DeviceGate,
}

/// The operations that were in flight on a device when an epoch ended (a snapshot was
/// made), to be waited for.
pub struct EarlierWrites {
    gate: Arc<DeviceGate>,
    before: u64,
}

impl DeviceGate {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.waiters += 1;
        st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        st.waiters -= 1;
        st
    }

    fn wake(&self, st: MutexGuard<'_, State>) {
        let any = st.waiters > 0;
        drop(st);
        if any {
            self.changed.notify_all();
        }
    }

    /// Threads waiting on the gate: for tests that must know a thread is held there.
    #[cfg(test)]
    pub(super) fn waiters(&self) -> u32 {
        self.state().waiters
    }

    /// Waits while the device is held quiet; None if it was deleted meanwhile.
    fn wait_open(&self) -> Option<MutexGuard<'_, State>> {
        let mut st = self.state();
        while st.closed {
            st = self.wait(st);
        }
        (!st.retired).then_some(st)
    }

    /// Counts an operation in flight; waits while the device is held quiet. None if the
    /// device was deleted meanwhile.
    pub(super) fn enter(&self) -> Option<Entered<'_>> {
        let mut st = self.wait_open()?;
        let epoch = st.epoch;
        match st.in_flight.back_mut() {
            Some((e, n)) if *e == epoch => *n += 1,
            _ => st.in_flight.push_back((epoch, 1)),
        }
        Some(Entered { gate: self, epoch })
    }

    /// Waits for every operation in flight and holds new ones until the guard is dropped.
    /// None if the device was deleted meanwhile: the gate is not that of any device now.
    pub(super) fn close(&self) -> Option<Closed<'_>> {
        let mut st = self.wait_open()?;
        st.closed = true;
        while st.any() {
            st = self.wait(st);
        }
        Some(Closed { gate: self })
    }

    /// Ends the current epoch: operations that begin from now on are not among the
    /// earlier ones returned (None when none is in flight). Waits for nothing.
    pub(super) fn new_epoch(self: &Arc<Self>) -> Option<EarlierWrites> {
        let mut st = self.state();
        st.epoch += 1;
        let before = st.epoch;
        st.any_before(before).then(|| EarlierWrites {
            gate: self.clone(),
            before,
        })
    }
}

impl std::fmt::Debug for EarlierWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlierWrites")
            .field("before_epoch", &self.before)
            .finish()
    }
}

impl EarlierWrites {
    /// Waits until every one of them has ended.
    pub fn wait(self) {
        let mut st = self.gate.state();
        while st.any_before(self.before) {
            st = self.gate.wait(st);
        }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state();
        if let Some((_, n)) = st.in_flight.iter_mut().find(|(e, _)| *e == self.epoch) {
            *n -= 1;
        }
        while st.in_flight.front().is_some_and(|&(_, n)| n == 0) {
            st.in_flight.pop_front();
        }
        self.gate.wake(st);
    }
}

impl Closed<'_> {
    /// The device is gone: the gate opens, and every operation waiting for it, or coming
    /// to it later, fails.
    pub(super) fn retire(self) {
        self.gate.state().retired = true;
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state();
        st.closed = false;
        self.gate.wake(st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_wait_for_earlier_operations_ignores_later_ones() {
        let g = Arc::new(DeviceGate::default());
        assert!(
            g.new_epoch().is_none(),
            "nothing in flight, nothing to wait for"
        );
        let earlier = g.enter();
        let waited = g.new_epoch().expect("one in flight");
        let later = g.enter();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            waited.wait();
            tx.send(()).unwrap();
        });
        // With the later operation still in flight, ending the earlier one ends the wait.
        drop(earlier);
        rx.recv().unwrap();
        waiter.join().unwrap();
        drop(later);
    }

    /// Epochs ended one after another, each waited for by its own thread: each waits for
    /// every operation begun before its epoch ended, and for no later one.
    #[test]
    fn each_wait_covers_every_earlier_operation() {
        let g = Arc::new(DeviceGate::default());
        let e0 = g.enter();
        let a = g.new_epoch().unwrap();
        let e1 = g.enter();
        let b = g.new_epoch().unwrap();
        let c = g.new_epoch().unwrap();
        let e3 = g.enter();
        let (tx, rx) = mpsc::channel();
        let spawn = |name: &'static str, w: EarlierWrites| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                w.wait();
                tx.send(name).unwrap();
            })
        };
        let threads = [spawn("a", a), spawn("b", b), spawn("c", c)];
        drop(e0);
        assert_eq!(rx.recv().unwrap(), "a");
        // e1 began before b's and c's epochs ended: both wait for it.
        assert!(rx.try_recv().is_err());
        drop(e1);
        let mut rest = [rx.recv().unwrap(), rx.recv().unwrap()];
        rest.sort();
        assert_eq!(rest, ["b", "c"], "e3, begun after, is not waited for");
        for t in threads {
            t.join().unwrap();
        }
        drop(e3);
        assert!(!g.state().any());
    }

    #[test]
    fn closing_waits_for_all_and_holds_new_operations() {
        let g = Arc::new(DeviceGate::default());
        let a = g.enter();
        let (tx, rx) = mpsc::channel();
        let (open_tx, open) = mpsc::channel::<()>();
        let closer = {
            let g = g.clone();
            std::thread::spawn(move || {
                let closed = g.close().unwrap();
                tx.send(()).unwrap();
                // Held until the test says so.
                open.recv().unwrap();
                drop(closed);
            })
        };
        assert!(rx.try_recv().is_err());
        drop(a);
        rx.recv().unwrap();
        let (tx2, rx2) = mpsc::channel();
        let entering = {
            let g = g.clone();
            std::thread::spawn(move || {
                let _e = g.enter();
                tx2.send(()).unwrap();
            })
        };
        assert!(rx2.try_recv().is_err(), "entered a closed gate");
        open_tx.send(()).unwrap();
        closer.join().unwrap();
        rx2.recv().unwrap();
        entering.join().unwrap();
    }
}
