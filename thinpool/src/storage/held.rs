//! Storage whose next write, once armed, is held in flight until the test lets it go:
//! for tests of what may and may not wait for a write under way.
//!
//! In the library (not under `#[cfg(test)]`) for the same reason as [`super::testing`].

use super::{Punched, Storage};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Condvar, Mutex};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hold {
    /// Writes go straight through.
    Off,
    /// The next write (or, `punch`, the next punch) will be held.
    Armed { punch: bool },
    /// A write is held.
    Holding,
    /// The held write may go on.
    Released,
}

pub struct HeldWrite<S> {
    inner: S,
    hold: Mutex<Hold>,
    changed: Condvar,
}

impl<S: Storage> HeldWrite<S> {
    pub fn new(inner: S) -> Self {
        HeldWrite {
            inner,
            hold: Mutex::new(Hold::Off),
            changed: Condvar::new(),
        }
    }

    /// Holds the next write (of data, or a zeroing of a range) until [`Self::release`].
    pub fn hold_next_write(&self) {
        self.set(Hold::Armed { punch: false });
    }

    /// Holds the next punch (discard passdown) until [`Self::release`]; writes go through.
    /// Called while one is held, lets that one go.
    pub fn hold_next_punch(&self) {
        self.set(Hold::Armed { punch: true });
    }

    /// Waits until a write is being held.
    pub fn wait_until_holding(&self) {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        while *h != Hold::Holding {
            h = self.changed.wait(h).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets the held write (or, if none has come yet, the next one) go on.
    pub fn release(&self) {
        self.set(Hold::Released);
    }

    fn set(&self, to: Hold) {
        *self.hold.lock().unwrap_or_else(|p| p.into_inner()) = to;
        self.changed.notify_all();
    }

    /// Called before every write (`punch` false) and punch: holds it if armed for it.
    fn before(&self, punch: bool) {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if *h != (Hold::Armed { punch }) {
            return;
        }
        *h = Hold::Holding;
        self.changed.notify_all();
        while *h == Hold::Holding {
            h = self.changed.wait(h).unwrap_or_else(|p| p.into_inner());
        }
        // Armed again meanwhile: let go, and the next one is held.
        if *h == Hold::Released {
            *h = Hold::Off;
        }
    }
}

impl<S: Storage> Storage for HeldWrite<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before(false);
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.before(false);
        self.inner.write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn writeback(&self) -> io::Result<()> {
        self.inner.writeback()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn refresh_len(&self) -> io::Result<u64> {
        self.inner.refresh_len()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        self.before(true);
        self.inner.punch(offset, len)
    }
    fn punch_blocks_writes(&self) -> bool {
        self.inner.punch_blocks_writes()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.before(false);
        self.inner.zero_range(offset, len)
    }
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.inner.holes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    #[test]
    fn a_held_write_lands_only_once_released() {
        let s = Arc::new(HeldWrite::new(MemStorage::new(4096)));
        s.hold_next_write();
        let w = {
            let s = s.clone();
            std::thread::spawn(move || s.write_at(&[7; 16], 0))
        };
        s.wait_until_holding();
        let mut b = [0u8; 16];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 16], "the held write landed before its release");
        s.release();
        w.join().unwrap().unwrap();
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 16]);
        // Not armed: straight through.
        s.write_at(&[8; 16], 0).unwrap();
    }
}
