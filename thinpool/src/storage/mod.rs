//! The storage seam: everything the engine reads or writes goes through [`Storage`].
//!
//! Both the metadata device and the data device are `Storage`. The file implementation
//! serves real pools (regular files and block devices); the memory implementation and the
//! test stores in [`testing`] make the engine testable without a kernel: fault injection,
//! and a recording store that can rebuild the image a crash would leave at any point.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::RwLock;

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
}

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
        Ok(FileStorage { file, len })
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

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(offset, total, self.len())?;
        let iov = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        self.transfer(iov, offset, Direction::Read)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(offset, total, self.len())?;
        let iov = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        self.transfer(iov, offset, Direction::Write)
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
    fn transfer(&self, mut iov: Vec<libc::iovec>, offset: u64, dir: Direction) -> io::Result<()> {
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

/// Storage in memory; its length can be changed to test growing a device.
#[derive(Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new(len: u64) -> Self {
        MemStorage {
            bytes: RwLock::new(vec![0; len as usize]),
        }
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        MemStorage {
            bytes: RwLock::new(v),
        }
    }

    pub fn set_len(&self, len: u64) {
        self.bytes.write().unwrap().resize(len as usize, 0);
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.read().unwrap().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap();
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&bytes[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap();
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        bytes[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.bytes.read().unwrap().len() as u64
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
    fn mem_bounds() {
        let s = MemStorage::new(100);
        assert!(s.write_at(&[1; 10], 95).is_err());
        s.write_at(&[1; 10], 90).unwrap();
        let mut b = [0; 10];
        s.read_at(&mut b, 90).unwrap();
        assert_eq!(b, [1; 10]);
    }
}
