//! Writes parked for pool space, and what wakes their queues.
//!
//! With inflight tracking (see [`super::inflight`]) a write that finds the pool full under
//! policy `queue` is parked rather than held in its queue's worker, which goes on with the
//! queue's later requests: reads and overwrites of mapped blocks complete while the write
//! waits, as with dm-thin, which holds only the bios that need space. A worker waits in its
//! epoll set, so something must tell it when to try its parked writes again: a watcher
//! thread, running only while writes are parked, waits on the pool's space policy and
//! writes to the wake eventfd of each queue with parked writes, which the queue's worker
//! watches next to its kick. The watcher wakes the queues on every change of space or
//! policy, and otherwise every 200 ms (the step of [`SpacePolicy::wait`]), which is when
//! the workers also see a queue timeout pass.
//!
//! [`SpacePolicy::wait`]: super::disk::SpacePolicy::wait

use super::disk::{Disk, SpacePolicy};
use super::request::Op;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A write waiting for pool space. It holds no I/O gate: it takes the gate when retried.
pub struct Parked {
    pub head: u16,
    pub op: Op,
    /// Guest address of the status byte.
    pub status: u64,
    /// When the policy's queue timeout passes (None: never).
    pub deadline: Option<Instant>,
    /// Why it waits, for the log when it fails.
    pub error: thinpool::Error,
    /// The policy whose count of held writes (`waiting`) counts this one.
    pub space: Arc<SpacePolicy>,
}

/// The wake eventfds of a connection's queues and the watcher that writes them.
pub struct Waker {
    disk: Arc<Disk>,
    /// Per queue; None if the eventfd could not be made (the queue then holds writes in its
    /// worker, as without inflight tracking).
    events: Vec<Option<EventFd>>,
    /// Per queue: how many writes are parked.
    parked: Vec<AtomicUsize>,
    /// Per queue: its worker watches the wake eventfd (only then can it park writes).
    watched: Vec<AtomicBool>,
    /// The connection is over: the watcher leaves.
    exiting: AtomicBool,
    /// A watcher thread runs.
    watching: Mutex<bool>,
}

impl Waker {
    pub fn new(disk: Arc<Disk>, queues: usize) -> Self {
        let events = (0..queues)
            .map(|q| match EventFd::new(EFD_NONBLOCK) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(
                        "{}: queue {q}: no wake eventfd ({e}): writes waiting for space hold \
                         the queue",
                        disk.name
                    );
                    None
                }
            })
            .collect();
        Waker {
            disk,
            events,
            parked: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            watched: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            exiting: AtomicBool::new(false),
            watching: Mutex::new(false),
        }
    }

    /// Queue `q`'s wake eventfd, for its worker's epoll set.
    pub fn event(&self, q: usize) -> Option<&EventFd> {
        self.events.get(q)?.as_ref()
    }

    /// Queue `q`'s worker watches its wake eventfd.
    pub fn set_watched(&self, q: usize) {
        if let Some(w) = self.watched.get(q) {
            w.store(self.event(q).is_some(), Ordering::SeqCst);
        }
    }

    /// Whether queue `q` can park writes: its worker is woken when they may go on.
    pub fn can_wake(&self, q: usize) -> bool {
        self.watched
            .get(q)
            .is_some_and(|w| w.load(Ordering::SeqCst))
            && !self.exiting()
    }

    /// Consumes a wake of queue `q`.
    pub fn consume(&self, q: usize) {
        if let Some(e) = self.event(q) {
            let _ = e.read();
        }
    }

    pub fn exit(&self) {
        self.exiting.store(true, Ordering::SeqCst);
    }

    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// Queue `q` now has `n` parked writes: a watcher runs while any has some.
    pub fn set_parked(self: &Arc<Self>, q: usize, n: usize) {
        let Some(count) = self.parked.get(q) else {
            return;
        };
        count.store(n, Ordering::SeqCst);
        if n == 0 || self.exiting() {
            return;
        }
        // The count is stored before the flag is looked at, and the watcher looks at the
        // counts under the same lock before it leaves: either it sees this one, or this
        // sees it gone and starts another.
        let mut watching = self.watching.lock().unwrap_or_else(|p| p.into_inner());
        if *watching {
            return;
        }
        let me = self.clone();
        match std::thread::Builder::new()
            .name(format!("space-{}", self.disk.name))
            .spawn(move || me.watch())
        {
            Ok(_) => *watching = true,
            Err(e) => tracing::warn!(
                "{}: cannot start the thread that wakes writes waiting for space: {e}; they \
                 are tried again on the queue's next request",
                self.disk.name
            ),
        }
    }

    fn watch(&self) {
        loop {
            {
                let mut watching = self.watching.lock().unwrap_or_else(|p| p.into_inner());
                let any = self.parked.iter().any(|c| c.load(Ordering::SeqCst) > 0);
                if !any || self.exiting() {
                    *watching = false;
                    return;
                }
            }
            // The policy of the disk's pool now: a disk moved to another pool wakes the
            // old policy's waiters, and the next round waits on the new one.
            self.disk.space().wait(None);
            for (q, count) in self.parked.iter().enumerate() {
                if count.load(Ordering::SeqCst) > 0 {
                    if let Some(e) = self.event(q) {
                        let _ = e.write(1);
                    }
                }
            }
        }
    }
}
