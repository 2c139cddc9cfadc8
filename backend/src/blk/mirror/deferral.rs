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

    /// Grows to take a region past the end. Not expected: `disk-resize` waits for a
    /// migration to end (both take the manager's operation lock); should a disk ever grow
    /// during the copy, the requests that reach past the old end are within the disk, which
    /// bounds the growth.
    fn set(&mut self, k: u64) {
        let i = (k / 64) as usize;
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        self.words[i] |= 1 << (k % 64);
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
    /// Regions copied whose secondary's data is not written back yet (all of them are
    /// settled by the next write-back: the copy is one caller, and writes back after its
    /// own copies).
    unsettled: Bits,
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
            copying: None,
        }
    }

    fn unsettled(&self, k: u64) -> bool {
        self.todo.get(k) || self.unsettled.get(k) || self.copying == Some(k)
    }

    /// Whether a guest request on regions `first..end` (held) goes to the primary alone,
    /// `near` being those regions and the ones that share a block of the secondary with
    /// them (no more, unless its blocks are bigger than a region): if any of those is
    /// unsettled, the request's regions are left to the copy.
    pub(super) fn defers(&mut self, first: u64, end: u64, mut near: Range<u64>) -> bool {
        debug_assert!(near.start <= first && end <= near.end);
        if !near.any(|k| self.unsettled(k)) {
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

    /// The copy of region `k` ended: `Some(wrote)` if it succeeded, `wrote` whether it
    /// wrote the secondary's data device (a region of zeroes that unmapped whole blocks did
    /// not, and is settled at once); a failed one leaves the region to copy.
    pub(super) fn end_copy(&mut self, k: u64, done: Option<bool>) {
        self.copying = None;
        match done {
            Some(true) => self.unsettled.set(k),
            Some(false) => {}
            None => self.todo.set(k),
        }
    }

    /// Every copy so far is written back.
    pub(super) fn settle(&mut self) {
        self.unsettled.words.fill(0);
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
        let defers = |d: &mut Deferral, k: u64| d.defers(k, k + 1, k..k + 1);
        // Not the copy's: the guest's writes go to both sides.
        assert!(!d.defers(0, 3, 0..3));
        assert!(!defers(&mut d, 199));
        // Not copied yet.
        assert!(defers(&mut d, 4));
        d.start_copy(3);
        assert!(defers(&mut d, 3), "being copied");
        d.end_copy(3, Some(true));
        d.start_copy(4);
        d.end_copy(4, Some(true));
        assert_eq!(d.todo(), [3, 130], "3 was written during its copy");
        assert!(defers(&mut d, 4), "copied, not written back");
        d.start_copy(130);
        d.end_copy(130, None);
        d.settle();
        // 4 was written after its copy, 130's copy failed: both to copy again, with 3.
        assert_eq!(d.todo(), [3, 4, 130]);
        d.start_copy(3);
        d.end_copy(3, Some(true));
        d.settle();
        assert!(!defers(&mut d, 3));
        // A request across a settled region and an unsettled one leaves both to the copy.
        assert!(d.defers(3, 5, 3..5));
        assert_eq!(d.todo(), [3, 4, 130]);
        // A copy that wrote nothing (zeroes, whole blocks unmapped) is settled at once.
        d.start_copy(130);
        d.end_copy(130, Some(false));
        assert!(!defers(&mut d, 130));
    }

    #[test]
    fn a_request_sharing_a_block_of_the_secondary_with_an_unsettled_region_is_deferred() {
        // Secondary blocks of two regions: 4 and 5 share one.
        let mut d = Deferral::new(8, std::slice::from_ref(&(4..5)));
        assert!(!d.defers(5, 6, 5..6), "alone, 5 is not the copy's");
        assert!(d.defers(5, 6, 4..6), "its block's other half is");
        assert_eq!(d.todo(), [4, 5]);
    }

    #[test]
    fn a_request_past_the_disks_size_when_the_copy_began_is_tracked() {
        // The disk grew during the copy; a write across its old end, where region 63 is
        // still to copy, leaves 64 to the copy as well.
        let mut d = Deferral::new(64, std::slice::from_ref(&(60..64)));
        assert!(!d.defers(64, 70, 64..70));
        assert!(d.defers(63, 65, 63..65));
        assert_eq!(d.todo(), [60, 61, 62, 63, 64]);
    }
}
