//! A thin device's gate: the pool operations in flight on one device that change it
//! (writes, write-zeroes, discards), counted so that
//! - a snapshot can wait for those begun before it was made, without holding those begun
//!   after ([`DeviceGate::wait_for_earlier`]): the guest's writes go on while the
//!   snapshot settles;
//! - a change that needs the device quiet (deleting it, changing its external origin) can
//!   wait for all of them and hold new ones ([`DeviceGate::close`]).
//!
//! The count is kept in two halves, by epoch, the way dm-thin's deferred sets are: each
//! operation counts in the epoch current when it began; a snapshot starts a new epoch and
//! waits for the old one's count to reach zero.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// Which half of `in_flight` operations that begin now count in.
    epoch: usize,
    in_flight: [u64; 2],
    /// Held by [`DeviceGate::close`]: new operations wait.
    closed: bool,
    /// Threads waiting on the condition variable (a release wakes them only if any).
    waiters: u32,
}

#[derive(Default)]
pub(super) struct DeviceGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// One operation in flight on the device, counted until dropped.
pub(super) struct Entered<'a> {
    gate: &'a DeviceGate,
    epoch: usize,
}

/// The device held quiet: nothing in flight, new operations wait until dropped.
pub(super) struct Closed<'a> {
    gate: &'a DeviceGate,
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

    /// Counts an operation in flight; waits while the device is held quiet.
    pub(super) fn enter(&self) -> Entered<'_> {
        let mut st = self.state();
        while st.closed {
            st = self.wait(st);
        }
        let epoch = st.epoch;
        st.in_flight[epoch] += 1;
        Entered { gate: self, epoch }
    }

    /// Waits for every operation in flight and holds new ones until the guard is dropped.
    pub(super) fn close(&self) -> Closed<'_> {
        let mut st = self.state();
        while st.closed {
            st = self.wait(st);
        }
        st.closed = true;
        while st.in_flight.iter().sum::<u64>() > 0 {
            st = self.wait(st);
        }
        Closed { gate: self }
    }

    /// Waits for the operations that began before this call; those that begin meanwhile
    /// go on and are not waited for.
    pub(super) fn wait_for_earlier(&self) {
        let mut st = self.state();
        // The other half may still count operations of an epoch before the current one
        // (two waits at once): they began earlier too, and the half is reused below.
        let other = 1 - st.epoch;
        while st.in_flight[other] > 0 {
            st = self.wait(st);
        }
        let earlier = st.epoch;
        st.epoch = other;
        while st.in_flight[earlier] > 0 {
            st = self.wait(st);
        }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state();
        st.in_flight[self.epoch] -= 1;
        self.gate.wake(st);
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
    use std::sync::Arc;

    #[test]
    fn a_wait_for_earlier_operations_ignores_later_ones() {
        let g = Arc::new(DeviceGate::default());
        let earlier = g.enter();
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let g = g.clone();
            std::thread::spawn(move || {
                g.wait_for_earlier();
                tx.send(()).unwrap();
            })
        };
        // Once the waiter waits, entering does not wait for it, and is not waited for:
        // with the later operation still in flight, dropping the earlier one ends the wait.
        while g.state().waiters == 0 {
            std::thread::yield_now();
        }
        let later = g.enter();
        assert!(
            rx.try_recv().is_err(),
            "the wait ended with an earlier operation in flight"
        );
        drop(earlier);
        rx.recv().unwrap();
        waiter.join().unwrap();
        drop(later);
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
                let closed = g.close();
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
