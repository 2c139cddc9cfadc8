//! One writer per pool: advisory locks on the pool's files.
//!
//! A process that changes a pool takes an exclusive `flock` on its metadata and data
//! files; one that only reads takes a shared lock. A second daemon, or an offline command
//! that would change a served pool behind the daemon's back (whose transaction in memory
//! would then overwrite it, or be overwritten), is refused before it reads a byte. The
//! lock goes with the open file, so it is released when the process ends however it ends.
//! `flock` on a block device locks its inode the same way.

use super::FileStorage;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Readers: any number at once, none while a writer holds the file.
    Shared,
    /// The one writer.
    Exclusive,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("it is in use by {}", holder_text(*.pid))]
    Held { pid: Option<u32> },
    #[error("cannot lock it: {0}")]
    Io(#[source] io::Error),
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => match command_of(pid) {
            Some(cmd) => format!("process {pid} ({cmd})"),
            None => format!("process {pid}"),
        },
        None => "another process".into(),
    }
}

/// The command line of a process, for the error message (best effort).
fn command_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .take(3)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

impl FileStorage {
    /// Takes the lock without waiting; it is held until the storage is dropped.
    pub fn try_lock(&self, kind: LockKind) -> Result<(), LockError> {
        let op = match kind {
            LockKind::Shared => libc::LOCK_SH,
            LockKind::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        loop {
            // SAFETY: flock only takes the descriptor, which `self.file` keeps open.
            let r = unsafe { libc::flock(self.file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    return Err(LockError::Held {
                        pid: self.lock_holder(),
                    })
                }
                _ => return Err(LockError::Io(e)),
            }
        }
    }

    /// Who holds a lock on this file, from `/proc/locks` (whose device numbers are
    /// `major:minor` in hex, then the inode).
    fn lock_holder(&self) -> Option<u32> {
        let m = self.file.metadata().ok()?;
        let dev = m.dev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let want = format!("{major:02x}:{minor:02x}:{}", m.ino());
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        let me = std::process::id();
        locks.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters start "->".
            let i = f.iter().position(|w| *w == "FLOCK")?;
            let pid: u32 = f.get(i + 3)?.parse().ok()?;
            (f.get(i + 4) == Some(&want.as_str()) && pid != me).then_some(pid)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_or_shared_lock_is_refused_while_one_writer_holds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let a = FileStorage::create(&path, 4096).unwrap();
        a.try_lock(LockKind::Exclusive).unwrap();
        let b = FileStorage::open(&path).unwrap();
        assert!(matches!(
            b.try_lock(LockKind::Exclusive),
            Err(LockError::Held { .. })
        ));
        let c = FileStorage::open_read_only(&path).unwrap();
        assert!(matches!(
            c.try_lock(LockKind::Shared),
            Err(LockError::Held { .. })
        ));
        drop(a);
        b.try_lock(LockKind::Exclusive).unwrap();
    }

    #[test]
    fn readers_share_the_file_and_keep_a_writer_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        drop(FileStorage::create(&path, 4096).unwrap());
        let r1 = FileStorage::open_read_only(&path).unwrap();
        let r2 = FileStorage::open_read_only(&path).unwrap();
        r1.try_lock(LockKind::Shared).unwrap();
        r2.try_lock(LockKind::Shared).unwrap();
        let w = FileStorage::open(&path).unwrap();
        assert!(matches!(
            w.try_lock(LockKind::Exclusive),
            Err(LockError::Held { .. })
        ));
    }
}
