//! External origins: a read-only device (a golden image) under a thin device, as dm-thin's
//! `external_origin_dev` table parameter gives one.
//!
//! For a device with an external origin, an unmapped block reads from the origin (bytes
//! past the origin's end read as zeros), and the first write to it copies the bytes the
//! write does not cover from the origin into the new block. The origin is not part of the
//! dm-thin metadata — the kernel takes it from the table line — so the pool keeps it in
//! memory ([`crate::pool::Pool::set_external_origin`]) and the registry keeps its path
//! ([`crate::registry::DeviceEntry::external_origin`]);
//! [`crate::catalog::Catalog::attach_origins`] joins the two when a pool is opened. This
//! module is the data path's: it knows storage, not pools or registries.

use crate::storage::{FileStorage, Storage};
use std::io::{self, IoSliceMut};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The kernel addresses devices in 512-byte sectors: an origin must be whole sectors.
const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    #[error("external origin {path}: no such file or device")]
    NotFound { path: PathBuf },
    #[error("external origin {path} cannot be opened for reading: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("external origin {path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: PathBuf },
    #[error("external origin {path} is {len} bytes, not a whole number of 512-byte sectors")]
    Unaligned { path: PathBuf, len: u64 },
    #[error(transparent)]
    Pool(#[from] crate::Error),
}

/// A read-only device that unmapped blocks of a thin device read from.
pub struct ExternalOrigin {
    storage: Arc<dyn Storage>,
    len: u64,
    path: PathBuf,
    /// Device and inode of the file, to tell whether two origins are the same file.
    identity: Option<(u64, u64)>,
    /// Why the origin could not be opened, when it stands in for one that is missing.
    unavailable: Option<String>,
}

impl std::fmt::Debug for ExternalOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalOrigin")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

/// The metadata of an image path: a regular file or a block device (anything else, or nothing,
/// is refused with the error that says which).
pub(crate) fn image_metadata(path: &Path) -> Result<std::fs::Metadata, OriginError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => OriginError::NotFound { path: path.into() },
        _ => OriginError::Open {
            path: path.into(),
            source,
        },
    })?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(OriginError::NotFileOrDevice { path: path.into() });
    }
    Ok(meta)
}

impl ExternalOrigin {
    /// Opens a regular file or a block device read-only.
    pub fn open(path: &Path) -> Result<Self, OriginError> {
        let meta = image_metadata(path)?;
        let storage = FileStorage::open_read_only(path).map_err(|source| OriginError::Open {
            path: path.into(),
            source,
        })?;
        let mut origin = Self::from_storage(Arc::new(storage), path)?;
        origin.identity = Some((meta.dev(), meta.ino()));
        Ok(origin)
    }

    /// An origin on any storage (tests, or a device the caller opened itself). `path` is
    /// only for display.
    pub fn from_storage(
        storage: Arc<dyn Storage>,
        path: impl Into<PathBuf>,
    ) -> Result<Self, OriginError> {
        let path = path.into();
        let len = storage.len();
        if len % SECTOR != 0 {
            return Err(OriginError::Unaligned { path, len });
        }
        Ok(ExternalOrigin {
            storage,
            len,
            path,
            identity: None,
            unavailable: None,
        })
    }

    /// Stands in for an origin that cannot be opened: every read of it fails with `why`.
    /// A device whose origin is missing must not read zeros (or copy zeros into new
    /// blocks) where its image has data; with this in place its mapped blocks still work
    /// and everything that needs the origin fails.
    pub fn unavailable(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        let why = why.into();
        ExternalOrigin {
            storage: Arc::new(Unavailable(why.clone())),
            // Nothing is known to read as zeros: no part of the device is past the end.
            len: u64::MAX,
            path: path.into(),
            identity: None,
            unavailable: Some(why),
        }
    }

    /// Length in bytes (`u64::MAX` for an unavailable origin).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Why the origin is unavailable, if it is.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// True when both are the same origin: the same object, or the same file.
    pub fn same_as(&self, other: &ExternalOrigin) -> bool {
        std::ptr::eq(self, other)
            || (self.identity.is_some() && self.identity == other.identity)
            || (Arc::ptr_eq(&self.storage, &other.storage))
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_vectored_at(&mut [IoSliceMut::new(buf)], offset)
    }

    /// Reads into buffers laid out back to back from `offset`; bytes past the end read as
    /// zeros.
    pub fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut avail = self.len.saturating_sub(offset);
        let mut head: Vec<IoSliceMut<'_>> = Vec::with_capacity(bufs.len());
        for b in bufs.iter_mut() {
            let k = avail.min(b.len() as u64) as usize;
            let (inside, past) = b.split_at_mut(k);
            past.fill(0);
            if k > 0 {
                head.push(IoSliceMut::new(inside));
            }
            avail -= k as u64;
        }
        if head.is_empty() {
            return Ok(());
        }
        self.storage.read_vectored_at(&mut head, offset)
    }
}

/// The storage of an unavailable origin.
struct Unavailable(String);

impl Storage for Unavailable {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::NotFound, self.0.clone()))
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::NotFound, self.0.clone()))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        u64::MAX
    }
}

#[cfg(test)]
mod tests;
