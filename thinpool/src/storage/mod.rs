//! The storage seam: everything the engine reads or writes goes through [`Storage`].
//!
//! Both the metadata device and the data device are `Storage`. The file implementation
//! serves real pools (regular files and block devices); the memory implementation and the
//! test stores in [`testing`] and [`held`] make the engine testable without a kernel: fault injection,
//! and a recording store that can rebuild the image a crash would leave at any point.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::RwLock;

pub mod held;
pub mod lock;
pub mod testing;

/// Byte-addressed, fixed-length storage. All methods take `&self`: implementations are
/// shared between threads and must be safe for concurrent use on disjoint ranges.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Starts writing back completed writes and waits for it, without the device cache
    /// flush that [`Storage::sync`] adds: done ahead of a sync that must hold other work
    /// up, so that the sync finds little left to write. Durability comes only from `sync`.
    fn writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Length in bytes.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the length again (a file or device that was grown) and returns it.
    fn refresh_len(&self) -> io::Result<u64> {
        Ok(self.len())
    }

    /// Reads into several buffers laid out back to back from `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Writes several buffers back to back from `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Gives the space of `len` bytes at `offset` back to the host (discard passdown): a
    /// hole punched in a file, a discard sent to a block device. Only for bytes whose
    /// contents no longer matter: what they read afterwards depends on the [`Punched`].
    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        let _ = (offset, len);
        Ok(Punched::Unsupported)
    }

    /// Whether a [`Storage::punch`] holds a lock that writes to the storage wait for (a
    /// file's inode lock, which a hole punch holds throughout): long runs are then given back
    /// in pieces (see `Pool`). A block device's discard holds none, and is best sent whole.
    fn punch_blocks_writes(&self) -> bool {
        false
    }

    /// Makes `len` bytes at `offset` read as zeroes without writing them, where the
    /// storage can (a file's `FALLOC_FL_ZERO_RANGE`); false, doing nothing, where it
    /// cannot: the caller writes zeroes instead.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }

    /// The byte ranges `[start, end)` known to be holes (they read as zeroes and take no
    /// space), in order; None when the storage cannot tell (a block device), and then
    /// nothing may be assumed of any byte. A range left out may still be a hole.
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// What [`Storage::punch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punched {
    /// The range is a hole now: it reads as zeroes and takes no space (a file).
    Hole,
    /// The device was told the range is unused (a block device): its space may be
    /// returned, and what it reads is unspecified.
    Discarded,
    /// Not supported by the storage; nothing was done.
    Unsupported,
}

/// Holes found in a file are reported up to this many data extents; past them the rest of
/// the file counts as data (an open must not take long on a very fragmented file).
const MAX_HOLE_SCAN_EXTENTS: usize = 1 << 20;

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("access of {len} bytes at {offset} is beyond the end ({size} bytes)"),
        )),
    }
}

/// A regular file or a block device.
pub struct FileStorage {
    file: File,
    len: std::sync::atomic::AtomicU64,
    /// A regular file (not a block device).
    is_file: bool,
}

impl FileStorage {
    /// Opens an existing file or block device for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_mode(path, true)
    }

    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::open_mode(path, false)
    }

    fn open_mode(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let len = device_len(&file)?.into();
        let is_file = file.metadata()?.file_type().is_file();
        Ok(FileStorage { file, len, is_file })
    }

    /// Creates (or truncates) a regular file of `len` bytes, sparse. A new file is readable
    /// and writable by its owner only, whatever the umask: it holds a VM's disks.
    pub fn create(path: &Path, len: u64) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len)?;
        Ok(FileStorage {
            file,
            len: len.into(),
            is_file: true,
        })
    }
}

fn device_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block devices report size 0 in metadata; ask the kernel.
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 through the pointer we pass, which is valid for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn writeback(&self) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range only reads the descriptor, which `self.file` keeps open;
        // offset 0 and length 0 mean the whole file.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, flags) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refresh_len(&self) -> io::Result<u64> {
        let len = device_len(&self.file)?;
        self.len.store(len, std::sync::atomic::Ordering::Relaxed);
        Ok(len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        check_range(offset, len as usize, self.len())?;
        let fd = self.file.as_raw_fd();
        if self.is_file {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate only reads its scalar arguments; the descriptor is open.
            let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            if r == 0 {
                return Ok(Punched::Hole);
            }
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(Punched::Unsupported),
                _ => Err(e),
            };
        }
        // BLKDISCARD = _IO(0x12, 119): a range of two u64, offset and length.
        const BLKDISCARD: libc::c_ulong = 0x1277;
        let range: [u64; 2] = [offset, len];
        // SAFETY: the ioctl reads two u64 through the pointer, valid for the call.
        let r = unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) };
        if r == 0 {
            return Ok(Punched::Discarded);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(Punched::Unsupported),
            _ => Err(e),
        }
    }

    fn punch_blocks_writes(&self) -> bool {
        self.is_file
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        check_range(offset, len as usize, self.len())?;
        if !self.is_file {
            // BLKZEROOUT may write the zeroes itself: no better than a write.
            return Ok(false);
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its scalar arguments; the descriptor is open.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(e),
        }
    }

    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        if !self.is_file {
            return Ok(None);
        }
        let (fd, len) = (self.file.as_raw_fd(), self.len());
        let seek = |pos: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
            // SAFETY: lseek only reads its scalar arguments; the file's offset is not used
            // by this storage (every transfer gives its own).
            let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None),
                    _ => Err(e),
                };
            }
            Ok(Some(r as u64))
        };
        let mut holes = Vec::new();
        let mut pos = 0;
        for _ in 0..MAX_HOLE_SCAN_EXTENTS {
            if pos >= len {
                break;
            }
            match seek(pos, libc::SEEK_DATA)? {
                None => {
                    holes.push((pos, len));
                    break;
                }
                Some(data) => {
                    if data > pos {
                        holes.push((pos, data.min(len)));
                    }
                    pos = seek(data, libc::SEEK_HOLE)?.unwrap_or(len);
                }
            }
        }
        Ok(Some(holes))
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(offset, total, self.len())?;
        let iov = |b: &mut IoSliceMut<'_>| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        // One buffer (a 4 KiB read of one block): no Vec, so no allocation per request.
        if let [b] = bufs {
            return self.transfer(&mut [iov(b)], offset, Direction::Read);
        }
        let mut v: Vec<libc::iovec> = bufs.iter_mut().map(iov).collect();
        self.transfer(&mut v, offset, Direction::Read)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(offset, total, self.len())?;
        let iov = |b: &IoSlice<'_>| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
        if let [b] = bufs {
            return self.transfer(&mut [iov(b)], offset, Direction::Write);
        }
        let mut v: Vec<libc::iovec> = bufs.iter().map(iov).collect();
        self.transfer(&mut v, offset, Direction::Write)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl FileStorage {
    /// Moves the bytes `iov` describes at `offset` (1024 buffers per call at most, as the
    /// kernel allows), going on after short transfers and interruptions.
    fn transfer(&self, iov: &mut [libc::iovec], offset: u64, dir: Direction) -> io::Result<()> {
        let mut first = 0;
        let mut at = offset;
        while first < iov.len() {
            if iov[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let window = &iov[first..iov.len().min(first + 1024)];
            let (fd, cnt, pos) = (
                self.file.as_raw_fd(),
                window.len() as libc::c_int,
                at as libc::off_t,
            );
            // SAFETY: every iovec points into a live buffer of the stated length, borrowed by
            // the caller (exclusively for a read) for the whole call; pwritev only reads it.
            let n = unsafe {
                match dir {
                    Direction::Read => libc::preadv(fd, window.as_ptr(), cnt, pos),
                    Direction::Write => libc::pwritev(fd, window.as_ptr(), cnt, pos),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(match dir {
                    Direction::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
                    Direction::Write => io::Error::new(io::ErrorKind::WriteZero, "short write"),
                });
            }
            at += n as u64;
            let mut n = n as usize;
            while n > 0 {
                let v = &mut iov[first];
                if n < v.iov_len {
                    // SAFETY: n is less than the buffer's length: the pointer stays inside it.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                } else {
                    n -= v.iov_len;
                    first += 1;
                }
            }
        }
        Ok(())
    }
}

/// Storage in memory; its length can be changed to test growing a device. It models a
/// sparse file: each 4 KiB page is allocated once written and a hole again once punched
/// whole; a new store is all holes, one made from bytes all allocated.
#[derive(Default)]
pub struct MemStorage {
    inner: RwLock<MemInner>,
}

#[derive(Default)]
struct MemInner {
    bytes: Vec<u8>,
    /// Per page: written since the store was made or the page last punched.
    allocated: Vec<bool>,
}

/// The page size of [`MemStorage`]'s hole model.
pub const MEM_PAGE: u64 = 4096;

impl MemInner {
    fn pages(len: u64) -> usize {
        len.div_ceil(MEM_PAGE) as usize
    }

    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, end) = (offset / MEM_PAGE, (offset + len).div_ceil(MEM_PAGE));
        self.allocated[first as usize..end as usize].fill(true);
    }
}

impl MemStorage {
    pub fn new(len: u64) -> Self {
        MemStorage {
            inner: RwLock::new(MemInner {
                bytes: vec![0; len as usize],
                allocated: vec![false; MemInner::pages(len)],
            }),
        }
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let pages = MemInner::pages(v.len() as u64);
        MemStorage {
            inner: RwLock::new(MemInner {
                bytes: v,
                allocated: vec![true; pages],
            }),
        }
    }

    /// Grows (with holes) or shrinks the store.
    pub fn set_len(&self, len: u64) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.bytes.resize(len as usize, 0);
        g.allocated.resize(MemInner::pages(len), false);
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .clone()
    }

    /// The space the store takes, as `du` would say of a file: its allocated pages.
    pub fn allocated_bytes(&self) -> u64 {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.allocated.iter().filter(|&&a| a).count() as u64 * MEM_PAGE
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        check_range(offset, buf.len(), g.bytes.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&g.bytes[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        check_range(offset, buf.len(), g.bytes.len() as u64)?;
        let o = offset as usize;
        g.bytes[o..o + buf.len()].copy_from_slice(buf);
        g.mark(offset, buf.len() as u64);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .len() as u64
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        check_range(offset, len as usize, g.bytes.len() as u64)?;
        let o = offset as usize;
        g.bytes[o..o + len as usize].fill(0);
        let (first, end) = (offset.div_ceil(MEM_PAGE), (offset + len) / MEM_PAGE);
        if first < end {
            g.allocated[first as usize..end as usize].fill(false);
        }
        Ok(Punched::Hole)
    }

    /// A model of a sparse file.
    fn punch_blocks_writes(&self) -> bool {
        true
    }

    /// As a file's: the range reads as zeroes and takes space (unwritten extents).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        check_range(offset, len as usize, g.bytes.len() as u64)?;
        let o = offset as usize;
        g.bytes[o..o + len as usize].fill(0);
        g.mark(offset, len);
        Ok(true)
    }

    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let len = g.bytes.len() as u64;
        let mut holes: Vec<(u64, u64)> = Vec::new();
        for (i, &a) in g.allocated.iter().enumerate() {
            if a {
                continue;
            }
            let (s, e) = (i as u64 * MEM_PAGE, ((i as u64 + 1) * MEM_PAGE).min(len));
            match holes.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => holes.push((s, e)),
            }
        }
        Ok(Some(holes))
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn writeback(&self) -> io::Result<()> {
        (**self).writeback()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn refresh_len(&self) -> io::Result<u64> {
        (**self).refresh_len()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        (**self).punch(offset, len)
    }
    fn punch_blocks_writes(&self) -> bool {
        (**self).punch_blocks_writes()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).zero_range(offset, len)
    }
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        (**self).holes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_vectored_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("f"), 1 << 20).unwrap();
        let a = vec![1u8; 1000];
        let b = vec![2u8; 5000];
        s.write_vectored_at(&[IoSlice::new(&a), IoSlice::new(&b)], 4096)
            .unwrap();
        let mut x = vec![0u8; 3000];
        let mut y = vec![0u8; 3000];
        s.read_vectored_at(
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
            4096,
        )
        .unwrap();
        assert_eq!(&x[..1000], &a[..]);
        assert!(x[1000..].iter().all(|&v| v == 2));
        assert!(y.iter().all(|&v| v == 2));
        assert!(s.write_at(&[0; 2], (1 << 20) - 1).is_err());
    }

    #[test]
    fn a_punched_file_range_reads_zeroes_and_frees_its_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let s = FileStorage::create(&path, 4 << 20).unwrap();
        s.write_at(&vec![7u8; 2 << 20], 1 << 20).unwrap();
        s.sync().unwrap();
        let before = allocated(&path);
        assert!(before >= 2 << 20, "{before}");
        assert_eq!(s.punch(1 << 20, 1 << 20).unwrap(), Punched::Hole);
        let after = allocated(&path);
        assert!(before - after >= 1 << 20, "{before} -> {after}");
        let mut b = vec![1u8; 1 << 20];
        s.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&v| v == 0));
        s.read_at(&mut b, 2 << 20).unwrap();
        assert!(b.iter().all(|&v| v == 7));
        assert_eq!(s.len(), 4 << 20, "the size is kept");
    }

    #[test]
    fn a_file_reports_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("f"), 4 << 20).unwrap();
        assert_eq!(s.holes().unwrap(), Some(vec![(0, 4 << 20)]));
        s.write_at(&[1u8; 4096], 1 << 20).unwrap();
        let holes = s.holes().unwrap().unwrap();
        // The filesystem may allocate more than the page written, never less.
        assert!(holes
            .iter()
            .all(|&(a, e)| e <= 1 << 20 || a >= (1 << 20) + 4096));
        assert_eq!(holes.first().unwrap().0, 0);
        assert_eq!(holes.last().unwrap().1, 4 << 20);
    }

    #[test]
    fn a_zeroed_file_range_reads_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("f"), 1 << 20).unwrap();
        s.write_at(&[9u8; 1 << 18], 0).unwrap();
        if !s.zero_range(4096, 65536).unwrap() {
            return; // a filesystem without it (tmpfs): nothing to check
        }
        let mut b = vec![1u8; 1 << 18];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&v| v == 9));
        assert!(b[4096..69632].iter().all(|&v| v == 0));
        assert!(b[69632..].iter().all(|&v| v == 9));
    }

    fn allocated(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn memory_storage_models_holes_and_punches() {
        let s = MemStorage::new(64 << 10);
        assert_eq!(s.holes().unwrap(), Some(vec![(0, 64 << 10)]));
        assert_eq!(s.allocated_bytes(), 0);
        s.write_at(&[1; 100], 5000).unwrap();
        assert_eq!(s.allocated_bytes(), 4096);
        assert_eq!(s.holes().unwrap(), Some(vec![(0, 4096), (8192, 64 << 10)]));
        s.write_at(&[2; 8192], 16384).unwrap();
        // A punch zeroes its range; only whole pages become holes.
        assert_eq!(s.punch(4096, 18432).unwrap(), Punched::Hole);
        assert_eq!(s.allocated_bytes(), 4096);
        let mut b = [9u8; 8192];
        s.read_at(&mut b, 16384).unwrap();
        assert_eq!(b[..6144], [0; 6144]);
        assert_eq!(b[6144..], [2; 2048]);
        assert!(s.punch(60 << 10, 8192).is_err());
        // An image of unknown history: nothing is known to be a hole.
        let v = MemStorage::from_vec(vec![0; 8192]);
        assert_eq!(v.holes().unwrap(), Some(vec![]));
        assert_eq!(v.allocated_bytes(), 8192);
    }

    #[test]
    fn mem_bounds() {
        let s = MemStorage::new(100);
        assert!(s.write_at(&[1; 10], 95).is_err());
        s.write_at(&[1; 10], 90).unwrap();
        let mut b = [0; 10];
        s.read_at(&mut b, 90).unwrap();
        assert_eq!(b, [1; 10]);
    }
}
