//! Which regions the background copy of a mirror has yet to settle on the secondary: a
//! guest write to one of them goes to the primary alone, and the copy moves the region
//! (again) from the primary (see the mirror's comment, "Deferred regions").

use std::ops::Range;

/// One bit per region.
struct Bits {
    words: Vec<u64>,
}

impl Bits {
    fn new(regions: u64) -> Self {
        Bits {
            words: vec![0; regions.div_ceil(64) as usize],
        }
    }

    fn word(&self, k: u64) -> Option<(usize, u64)> {
        let i = usize::try_from(k / 64).ok()?;
        (i < self.words.len()).then_some((i, 1 << (k % 64)))
    }

    fn get(&self, k: u64) -> bool {
        self.word(k)
            .is_some_and(|(i, bit)| self.words[i] & bit != 0)
    }

    /// Regions past the end are never set: they are not the copy's.
    fn set(&mut self, k: u64) {
        if let Some((i, bit)) = self.word(k) {
            self.words[i] |= bit;
        }
    }

    fn clear(&mut self, k: u64) {
        if let Some((i, bit)) = self.word(k) {
            self.words[i] &= !bit;
        }
    }

    fn ones(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                v.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
        }
        v
    }
}

/// The copy's regions not yet settled on the secondary. A region is *settled* once its
/// copy is written back; until then a guest write to it would write the secondary's pages
/// that the copy made and that write-back is writing out.
pub(super) struct Deferral {
    /// Regions the copy has to move: not copied yet, or written by the guest (to the
    /// primary alone) since their copy began.
    todo: Bits,
    /// Regions copied whose secondary's data is not written back yet.
    unsettled: Bits,
    /// Those, to settle once the write-back that follows their copy is done.
    batch: Vec<u64>,
    /// The region whose copy is writing the secondary (its lock let go).
    copying: Option<u64>,
}

impl Deferral {
    /// For a disk of `regions` regions, the copy to move `runs`.
    pub(super) fn new(regions: u64, runs: &[Range<u64>]) -> Self {
        let mut todo = Bits::new(regions);
        for k in runs.iter().cloned().flatten() {
            todo.set(k);
        }
        Deferral {
            todo,
            unsettled: Bits::new(regions),
            batch: Vec::new(),
            copying: None,
        }
    }

    fn unsettled(&self, k: u64) -> bool {
        self.todo.get(k) || self.unsettled.get(k) || self.copying == Some(k)
    }

    /// Whether a guest request on regions `first..end` (held) goes to the primary alone:
    /// if any of them is unsettled, all are left to the copy.
    pub(super) fn defers(&mut self, first: u64, end: u64) -> bool {
        if !(first..end).any(|k| self.unsettled(k)) {
            return false;
        }
        for k in first..end {
            self.todo.set(k);
        }
        true
    }

    /// Whether region `k` is still to be copied.
    pub(super) fn is_todo(&self, k: u64) -> bool {
        self.todo.get(k)
    }

    /// The copy of region `k` begins (its lock held).
    pub(super) fn start_copy(&mut self, k: u64) {
        self.todo.clear(k);
        self.copying = Some(k);
    }

    /// The copy of region `k` ended; a failed one leaves the region to copy.
    pub(super) fn end_copy(&mut self, k: u64, ok: bool) {
        self.copying = None;
        if ok {
            self.unsettled.set(k);
            self.batch.push(k);
        } else {
            self.todo.set(k);
        }
    }

    /// Every copy so far is written back.
    pub(super) fn settle(&mut self) {
        for k in self.batch.drain(..) {
            self.unsettled.clear(k);
        }
    }

    /// The regions still to copy, in ascending order.
    pub(super) fn todo(&self) -> Vec<u64> {
        self.todo.ones()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_settled_once_copied_and_written_back_unless_written_meanwhile() {
        let mut d = Deferral::new(200, &[3..5, 130..131]);
        assert_eq!(d.todo(), [3, 4, 130]);
        // Not the copy's: the guest's writes go to both sides.
        assert!(!d.defers(0, 3));
        assert!(!d.defers(199, 200));
        // Not copied yet.
        assert!(d.defers(4, 5));
        d.start_copy(3);
        assert!(d.defers(3, 4), "being copied");
        d.end_copy(3, true);
        d.start_copy(4);
        d.end_copy(4, true);
        assert_eq!(d.todo(), [3, 130], "3 was written during its copy");
        assert!(d.defers(4, 5), "copied, not written back");
        d.start_copy(130);
        d.end_copy(130, false);
        d.settle();
        // 4 was written after its copy, 130's copy failed: both to copy again, with 3.
        assert_eq!(d.todo(), [3, 4, 130]);
        d.start_copy(3);
        d.end_copy(3, true);
        d.settle();
        assert!(!d.defers(3, 4));
        // A request across a settled region and an unsettled one leaves both to the copy.
        assert!(d.defers(3, 5));
        assert_eq!(d.todo(), [3, 4, 130]);
    }

    #[test]
    fn regions_past_the_disks_end_are_never_the_copys() {
        let mut d = Deferral::new(64, std::slice::from_ref(&(60..70)));
        assert_eq!(d.todo(), [60, 61, 62, 63]);
        assert!(!d.defers(64, 70));
        assert!(!d.defers(u64::MAX - 1, u64::MAX));
    }
}
