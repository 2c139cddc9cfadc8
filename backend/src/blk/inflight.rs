//! Inflight I/O tracking (vhost-user protocol feature `INFLIGHT_SHMFD`, split virtqueues).
//!
//! A backend that completes requests out of order cannot be restarted the way an in-order
//! one can: QEMU, finding the backend gone, resumes each queue at the used index in guest
//! memory, which then says nothing of which requests were taken. So the backend records in
//! a region of shared memory which heads it has taken and not yet completed; the frontend
//! keeps the region (it only holds the file) and hands it to the next backend process,
//! which takes the records up: it completes the request whose completion was cut short,
//! executes again the ones that were in flight (in the order they were taken) and resumes
//! the avail ring after them.
//!
//! The layout is the one the vhost-user specification describes for split queues
//! ("Inflight I/O tracking"), version 1, one region per queue aligned to 64 bytes:
//! `{ u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! DescStateSplit desc[desc_num] }`, `DescStateSplit { u8 inflight; u8 padding[5];
//! u16 next; u64 counter }`. The frontend never reads it, so only this backend's own
//! records are ever found there; they are checked all the same, since the frontend could
//! write anything into it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::mmap::MmapRegion;
use vm_memory::AtomicInteger;
use vm_memory::{FileOffset, VolatileMemory};

/// The version of the records this backend writes.
pub const VERSION: u16 = 1;
/// Each queue's records start at a multiple of this (what libvhost-user uses too).
const QUEUE_ALIGN: u64 = 64;
/// The per-queue header: features, version, desc_num, last_batch_head, used_idx.
const HEADER_LEN: u64 = 16;
/// One `DescStateSplit`.
const DESC_LEN: u64 = 16;
// Offsets in the header.
const AT_VERSION: u64 = 8;
const AT_DESC_NUM: u64 = 10;
const AT_LAST_BATCH_HEAD: u64 = 12;
const AT_USED_IDX: u64 = 14;
// Offsets in one DescStateSplit.
const AT_INFLIGHT: u64 = 0;
const AT_COUNTER: u64 = 8;
/// A split virtqueue has at most this many entries (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's records, `queue_size` entries.
pub fn queue_len(queue_size: u16) -> u64 {
    (HEADER_LEN + DESC_LEN * u64::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the whole region.
pub fn region_len(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_len(queue_size)
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(
        "{num_queues} queues of {queue_size} entries: this disk has 1 to {max_queues} queues, \
         and a queue's size is a power of two up to {MAX_QUEUE_SIZE}"
    )]
    Geometry {
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    },
    #[error("the region is {have} bytes; {num_queues} queues of {queue_size} entries need {need}")]
    TooSmall {
        have: u64,
        need: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("the region must be a regular file (a memfd), not {0}")]
    NotAFile(String),
    #[error(
        "the region's file can shrink (no F_SEAL_SHRINK): a frontend shrinking it under the \
         mapping would kill the daemon (SIGBUS); pass the sealed memfd GET_INFLIGHT_FD gave"
    )]
    NotSealed,
    #[error(
        "the region ({size} bytes at offset {offset}) goes past the end of its file ({len} bytes)"
    )]
    PastEnd { size: u64, offset: u64, len: u64 },
    #[error("queue {queue}: records of version {version} (this backend knows version {VERSION})")]
    Version { queue: usize, version: u16 },
    #[error("queue {queue}: records for {desc_num} entries, but the queue has {queue_size}")]
    DescNum {
        queue: usize,
        desc_num: u16,
        queue_size: u16,
    },
    #[error("queue {queue}: last batch head {head} is not below the queue size {queue_size}")]
    Head {
        queue: usize,
        head: u16,
        queue_size: u16,
    },
    #[error("cannot map the region: {0}")]
    Map(String),
    #[error("cannot make the region: {0}")]
    Create(io::Error),
}

fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(), InflightError> {
    if num_queues == 0
        || usize::from(num_queues) > max_queues
        || !queue_size.is_power_of_two()
        || queue_size > MAX_QUEUE_SIZE
    {
        return Err(InflightError::Geometry {
            num_queues,
            queue_size,
            max_queues,
        });
    }
    Ok(())
}

/// A new, zero-filled region for `num_queues` queues of `queue_size` entries: the file to
/// hand to the frontend (`GET_INFLIGHT_FD`) and its size. It is sealed against shrinking,
/// so that no one can cut a mapping of it short (a page past the end of a file raises
/// SIGBUS when touched).
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(File, u64), InflightError> {
    check_geometry(num_queues, queue_size, max_queues)?;
    let len = region_len(num_queues, queue_size);
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new
    // descriptor (or -1), which is owned from here on.
    let fd = unsafe {
        libc::memfd_create(
            c"vhost-thin-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just made and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).map_err(InflightError::Create)?;
    // SAFETY: fcntl on a descriptor we own, adding seals to its memfd.
    if unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    } != 0
    {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    Ok((file, len))
}

/// A region handed to this backend (`SET_INFLIGHT_FD`), mapped.
pub struct Region {
    map: MmapRegion,
    num_queues: u16,
    queue_size: u16,
}

impl Region {
    /// Maps `size` bytes at `offset` of `file`, the records of `num_queues` queues of
    /// `queue_size` entries, after checking that they lie within the file and that each
    /// queue's records are this backend's (or none yet, which it then starts).
    pub fn open(
        file: File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<Region, InflightError> {
        check_geometry(num_queues, queue_size, max_queues)?;
        let need = region_len(num_queues, queue_size);
        if size < need {
            return Err(InflightError::TooSmall {
                have: size,
                need,
                num_queues,
                queue_size,
            });
        }
        let meta = file
            .metadata()
            .map_err(|e| InflightError::NotAFile(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(InflightError::NotAFile(format!("{:?}", meta.file_type())));
        }
        // The size is checked once, then the file is mapped: only a file that cannot shrink
        // keeps that check true while it is mapped.
        // SAFETY: fcntl on a descriptor `file` owns, reading its seals only.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        if offset.checked_add(need).is_none_or(|end| end > meta.len()) {
            return Err(InflightError::PastEnd {
                size: need,
                offset,
                len: meta.len(),
            });
        }
        // Only what the records need is mapped: a larger size the frontend names is unused.
        let len = usize::try_from(need).map_err(|e| InflightError::Map(e.to_string()))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        let region = Region {
            map,
            num_queues,
            queue_size,
        };
        for q in 0..usize::from(num_queues) {
            region.start_queue(q)?;
        }
        Ok(region)
    }

    pub fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Checks queue `q`'s header, or writes it if the queue has no records yet.
    fn start_queue(&self, q: usize) -> Result<(), InflightError> {
        let version = self
            .header::<AtomicU16>(q, AT_VERSION)
            .load(Ordering::Acquire);
        let desc_num = self.header::<AtomicU16>(q, AT_DESC_NUM);
        match version {
            0 => {
                desc_num.store(self.queue_size, Ordering::Relaxed);
                self.header::<AtomicU16>(q, AT_VERSION)
                    .store(VERSION, Ordering::Release);
                Ok(())
            }
            VERSION => {
                let n = desc_num.load(Ordering::Relaxed);
                if n != self.queue_size {
                    return Err(InflightError::DescNum {
                        queue: q,
                        desc_num: n,
                        queue_size: self.queue_size,
                    });
                }
                let head = self
                    .header::<AtomicU16>(q, AT_LAST_BATCH_HEAD)
                    .load(Ordering::Relaxed);
                if head >= self.queue_size {
                    return Err(InflightError::Head {
                        queue: q,
                        head,
                        queue_size: self.queue_size,
                    });
                }
                Ok(())
            }
            version => Err(InflightError::Version { queue: q, version }),
        }
    }

    /// A field of queue `q`'s header. `q` is below `num_queues` and `at` one of the header
    /// offsets: the layout keeps it within the mapping and aligned (the mapping starts on a
    /// page, each queue on 64 bytes).
    fn header<T: AtomicInteger>(&self, q: usize, at: u64) -> &T {
        let off = q as u64 * queue_len(self.queue_size) + at;
        self.map
            .get_atomic_ref::<T>(off as usize)
            .expect("a header field lies within the mapping, aligned")
    }

    /// A field of entry `head` of queue `q`, None for a head beyond the queue.
    fn desc<T: AtomicInteger>(&self, q: usize, head: u16, at: u64) -> Option<&T> {
        if head >= self.queue_size || q >= self.num_queues() {
            return None;
        }
        let off =
            q as u64 * queue_len(self.queue_size) + HEADER_LEN + u64::from(head) * DESC_LEN + at;
        self.map.get_atomic_ref::<T>(off as usize).ok()
    }
}

/// What a new backend takes up from a queue's records.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The heads that were taken and not completed, in the order they were taken: to be
    /// executed again.
    pub heads: Vec<u16>,
    /// Where the avail ring resumes: after the used entries and the heads above.
    pub next_avail: u16,
    /// Records found that name no head of the ring (beyond its size): dropped.
    pub dropped: Vec<u16>,
    /// The used index the records held (the previous backend's last completion).
    pub recorded_used: u16,
}

/// The records of one queue, kept by that queue's worker.
pub struct Tracker {
    region: Arc<Region>,
    queue: usize,
    /// The order in which heads were taken; the next head taken gets the next value.
    counter: u64,
}

impl Tracker {
    /// The records of queue `queue` of `region`, None if the region has none for it.
    pub fn new(region: Arc<Region>, queue: usize) -> Option<Tracker> {
        (queue < region.num_queues()).then_some(Tracker {
            region,
            queue,
            counter: 0,
        })
    }

    pub fn queue_size(&self) -> u16 {
        self.region.queue_size
    }

    /// Head `head` was taken from the avail ring: recorded, its place in the order first
    /// and then the flag, so that a flag is never seen without its order.
    pub fn taken(&mut self, head: u16) {
        let (Some(counter), Some(flag)) = (
            self.region.desc::<AtomicU64>(self.queue, head, AT_COUNTER),
            self.region.desc::<AtomicU8>(self.queue, head, AT_INFLIGHT),
        ) else {
            return;
        };
        // The counter starts from records the frontend could write: it wraps, never panics.
        self.counter = self.counter.wrapping_add(1);
        counter.store(self.counter, Ordering::Relaxed);
        flag.store(1, Ordering::Release);
    }

    /// Head `head` is about to be put in the used ring: named as the one whose record a
    /// new backend clears if the used index moved past the record's (see
    /// [`Tracker::recover`]).
    pub fn completing(&self, head: u16) {
        self.region
            .header::<AtomicU16>(self.queue, AT_LAST_BATCH_HEAD)
            .store(head, Ordering::Relaxed);
        // Before the used ring's entry and index, which the caller writes next.
        fence(Ordering::SeqCst);
    }

    /// Head `head` is in the used ring, whose index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        // After the used ring's index.
        fence(Ordering::SeqCst);
        if let Some(flag) = self.region.desc::<AtomicU8>(self.queue, head, AT_INFLIGHT) {
            flag.store(0, Ordering::Release);
        }
        self.region
            .header::<AtomicU16>(self.queue, AT_USED_IDX)
            .store(used_idx, Ordering::Release);
    }

    /// Takes up the records a previous backend left, with the used ring's index now
    /// `ring_used` and the ring `ring_size` entries long: a completion that was cut short
    /// after its used entry was published is finished, and what was in flight is returned
    /// in the order it was taken. Later heads get later places in the order.
    pub fn recover(&mut self, ring_used: u16, ring_size: u16) -> Recovery {
        let used_idx = self.region.header::<AtomicU16>(self.queue, AT_USED_IDX);
        let recorded_used = used_idx.load(Ordering::Acquire);
        if recorded_used != ring_used {
            // The previous backend published a used entry and died before clearing its
            // record: the record names a completed request.
            let head = self
                .region
                .header::<AtomicU16>(self.queue, AT_LAST_BATCH_HEAD)
                .load(Ordering::Acquire);
            if let Some(flag) = self.region.desc::<AtomicU8>(self.queue, head, AT_INFLIGHT) {
                flag.store(0, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            used_idx.store(ring_used, Ordering::Release);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        let mut dropped = Vec::new();
        for head in 0..self.region.queue_size {
            let inflight = self
                .region
                .desc::<AtomicU8>(self.queue, head, AT_INFLIGHT)
                .is_some_and(|f| f.load(Ordering::Acquire) == 1);
            if !inflight {
                continue;
            }
            if head >= ring_size {
                if let Some(f) = self.region.desc::<AtomicU8>(self.queue, head, AT_INFLIGHT) {
                    f.store(0, Ordering::Release);
                }
                dropped.push(head);
                continue;
            }
            let counter = self
                .region
                .desc::<AtomicU64>(self.queue, head, AT_COUNTER)
                .map_or(0, |c| c.load(Ordering::Relaxed));
            found.push((counter, head));
        }
        found.sort_unstable();
        self.counter = self.counter.max(found.last().map_or(0, |&(c, _)| c));
        let heads: Vec<u16> = found.into_iter().map(|(_, h)| h).collect();
        Recovery {
            next_avail: ring_used.wrapping_add(heads.len() as u16),
            heads,
            dropped,
            recorded_used,
        }
    }
}

/// The inflight state of one connection, shared by the relay (which negotiates it and
/// receives the region) and the backend's workers (which keep the records).
#[derive(Default)]
pub struct Inflight {
    /// The frontend acknowledged `INFLIGHT_SHMFD` in `SET_PROTOCOL_FEATURES`.
    acked: AtomicBool,
    /// The region of the last `SET_INFLIGHT_FD`, with a number that tells regions apart:
    /// each one is taken up anew by every queue.
    region: Mutex<Option<(u64, Arc<Region>)>>,
    generation: AtomicU64,
}

impl Inflight {
    pub fn set_acked(&self, acked: bool) {
        self.acked.store(acked, Ordering::SeqCst);
    }

    pub fn set_region(&self, region: Region) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((generation, Arc::new(region)));
    }

    /// The region to keep records in, when the frontend negotiated tracking and gave one.
    pub fn region(&self) -> Option<(u64, Arc<Region>)> {
        if !self.acked.load(Ordering::SeqCst) {
            return None;
        }
        self.region
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(file: &File, num_queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        Region::open(
            file.try_clone().unwrap(),
            region_len(num_queues, queue_size),
            0,
            num_queues,
            queue_size,
            8,
        )
    }

    #[test]
    fn a_new_region_is_zeroed_sealed_and_sized_for_every_queue() {
        let (file, len) = create(2, 128, 8).unwrap();
        // 16 + 16 × 128 bytes per queue, rounded up to 64.
        assert_eq!(len, 2 * 2112);
        assert_eq!(file.metadata().unwrap().len(), len);
        assert!(file.set_len(len - 1).is_err(), "the region can be shrunk");
        let r = open(&file, 2, 128).unwrap();
        assert_eq!(
            r.header::<AtomicU16>(1, AT_VERSION).load(Ordering::SeqCst),
            1
        );
        assert_eq!(
            r.header::<AtomicU16>(1, AT_DESC_NUM).load(Ordering::SeqCst),
            128
        );
        assert!(create(0, 128, 8).is_err());
        assert!(create(2, 100, 8).is_err());
        assert!(create(9, 128, 8).is_err());
    }

    #[test]
    fn records_left_by_a_dead_backend_give_the_heads_in_flight_in_the_order_taken() {
        let (file, _) = create(1, 8, 1).unwrap();
        let mut t = Tracker::new(Arc::new(open(&file, 1, 8).unwrap()), 0).unwrap();
        // Taken: 5, 2, 7, 1; 2 completed (used idx 1); 7's completion cut short after its
        // used entry was published (used idx 2 in the ring, 1 in the records).
        for h in [5, 2, 7, 1] {
            t.taken(h);
        }
        t.completing(2);
        t.completed(2, 1);
        t.completing(7);
        drop(t);
        let mut t = Tracker::new(Arc::new(open(&file, 1, 8).unwrap()), 0).unwrap();
        let r = t.recover(2, 8);
        assert_eq!(
            r,
            Recovery {
                heads: vec![5, 1],
                next_avail: 4,
                dropped: vec![],
                recorded_used: 1,
            }
        );
        // New heads come after the recovered ones.
        t.taken(3);
        let mut again = Tracker::new(Arc::new(open(&file, 1, 8).unwrap()), 0).unwrap();
        assert_eq!(again.recover(2, 8).heads, vec![5, 1, 3]);
    }

    /// A file the frontend could shrink under the mapping would make the next record
    /// access a SIGBUS, which kills every disk the daemon serves.
    #[test]
    fn a_region_whose_file_can_shrink_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(region_len(1, 64)).unwrap();
        assert!(matches!(open(&file, 1, 64), Err(InflightError::NotSealed)));
        let (sealed, _) = create(1, 64, 1).unwrap();
        assert!(open(&sealed, 1, 64).is_ok());
    }

    #[test]
    fn records_that_the_ring_cannot_hold_are_dropped() {
        let (file, _) = create(1, 8, 1).unwrap();
        let mut t = Tracker::new(Arc::new(open(&file, 1, 8).unwrap()), 0).unwrap();
        t.taken(6);
        t.taken(1);
        let r = t.recover(0, 4);
        assert_eq!((r.heads, r.dropped, r.next_avail), (vec![1], vec![6], 1));
    }

    #[test]
    fn a_region_that_does_not_hold_what_the_frontend_says_is_refused() {
        let (file, len) = create(1, 8, 4).unwrap();
        // Too small for two queues.
        let e = Region::open(file.try_clone().unwrap(), len, 0, 2, 8, 4)
            .err()
            .unwrap();
        assert!(matches!(e, InflightError::TooSmall { .. }), "{e}");
        // A size the file does not have.
        let e = Region::open(file.try_clone().unwrap(), 2 * len, 0, 2, 8, 4)
            .err()
            .unwrap();
        assert!(matches!(e, InflightError::PastEnd { .. }), "{e}");
        // Not a regular file.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = Region::open(File::from(OwnedFd::from(a)), len, 0, 1, 8, 4)
            .err()
            .unwrap();
        assert!(matches!(e, InflightError::NotAFile(_)), "{e}");
        // Records of another queue size, a head beyond the queue, an unknown version.
        drop(open(&file, 1, 8).unwrap());
        let e = open(&file, 1, 4).err().unwrap();
        assert!(
            matches!(
                e,
                InflightError::DescNum { .. } | InflightError::TooSmall { .. }
            ),
            "{e}"
        );
        let r = open(&file, 1, 8).unwrap();
        r.header::<AtomicU16>(0, AT_LAST_BATCH_HEAD)
            .store(8, Ordering::SeqCst);
        let e = open(&file, 1, 8).err().unwrap();
        assert!(matches!(e, InflightError::Head { head: 8, .. }), "{e}");
        r.header::<AtomicU16>(0, AT_LAST_BATCH_HEAD)
            .store(0, Ordering::SeqCst);
        r.header::<AtomicU16>(0, AT_VERSION)
            .store(7, Ordering::SeqCst);
        let e = open(&file, 1, 8).err().unwrap();
        assert!(
            matches!(e, InflightError::Version { version: 7, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_head_recorded_beyond_the_queue_is_ignored() {
        let (file, _) = create(1, 8, 1).unwrap();
        let r = Arc::new(open(&file, 1, 8).unwrap());
        let mut t = Tracker::new(r.clone(), 0).unwrap();
        // A frontend writing a bad head into the records after they were checked.
        r.header::<AtomicU16>(0, AT_LAST_BATCH_HEAD)
            .store(u16::MAX, Ordering::SeqCst);
        r.header::<AtomicU16>(0, AT_USED_IDX)
            .store(9, Ordering::SeqCst);
        t.taken(9);
        t.completed(u16::MAX, 3);
        assert_eq!(t.recover(0, 8).heads, Vec::<u16>::new());
    }
}
