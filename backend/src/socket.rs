//! The daemon's listening sockets: the management socket and the disks' sockets.
//!
//! A socket path comes from the operator (configuration, `--disk`, `--qmp`) or from a
//! management client (`disk-add`). Whoever gives it, the daemon
//! - resolves it first ([`resolve`]): the directory to its canonical path (no symlinks, no
//!   `..`), the file name plain and not itself a symlink, so that two spellings of one
//!   socket are seen to be one;
//! - never replaces anything that is not a socket, nor a socket some program listens on,
//!   and replaces a dead one only where the caller says it may ([`Stale`]): its own socket
//!   directory, or a path the operator configured for that very socket;
//! - gives the socket its mode (and group) before it appears, under a temporary name
//!   renamed into place, so it is never open wider than asked and accepts connections as
//!   soon as the path exists;
//! - removes only the socket file it made ([`SocketFile::remove`], by device and inode, its inode held), not
//!   whatever another program put at the path since.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};

/// The longest socket path, with its terminating NUL (`sun_path` of `sockaddr_un`).
const SUN_PATH_MAX: usize = 108;

/// Who may connect: the socket's file mode, and the group it is given (None: the daemon's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub mode: u32,
    pub gid: Option<u32>,
}

impl Default for Access {
    /// The daemon's user only.
    fn default() -> Self {
        Access {
            mode: 0o600,
            gid: None,
        }
    }
}

/// What to do with a socket nobody listens on at the path (left by a run that crashed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// It is this daemon's: replace it.
    Replace,
    /// It may be someone else's: refuse.
    Refuse,
}

/// A socket this process listens on.
pub struct Listening {
    pub listener: UnixListener,
    /// The resolved path.
    pub path: PathBuf,
    /// The socket file made (see [`Pinned`]).
    id: Pinned,
}

/// The socket file made here, held open (`O_PATH`) so that its inode cannot be freed and
/// its number reused by a file made later at the same path: comparing device and inode
/// then tells the two apart.
#[derive(Clone, Debug)]
struct Pinned {
    /// Held, never read: the pin itself.
    _file: std::sync::Arc<std::fs::File>,
    dev: u64,
    ino: u64,
}

impl PartialEq for Pinned {
    fn eq(&self, o: &Self) -> bool {
        (self.dev, self.ino) == (o.dev, o.ino)
    }
}

impl Eq for Pinned {}

fn pin(path: &Path) -> io::Result<Pinned> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let m = file.metadata()?;
    Ok(Pinned {
        _file: std::sync::Arc::new(file),
        dev: m.dev(),
        ino: m.ino(),
    })
}

impl Listening {
    /// The part of the socket the daemon keeps after it hands the listener over.
    pub fn file(&self) -> SocketFile {
        SocketFile {
            path: self.path.clone(),
            id: self.id.clone(),
        }
    }
}

/// A socket file this process made, which it alone may remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFile {
    pub path: PathBuf,
    id: Pinned,
}

impl SocketFile {
    /// Removes the socket file if it is still the one made here: a path another program
    /// took over since (after this one stopped serving it) is left alone.
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == (self.id.dev, self.id.ino) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The path a socket given as `path` has: its directory resolved to a canonical path, its
/// file name kept. The directory must exist; the name must be a plain file name, and what
/// is at the path, if anything, must not be a symlink.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let invalid = |why: &str| io::Error::new(ErrorKind::InvalidInput, why.to_string());
    if path.as_os_str().is_empty() {
        return Err(invalid("the path is empty"));
    }
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) => n,
        _ => return Err(invalid("the path does not end in a file name")),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("its directory {}: {e}", dir.display())))?;
    let resolved = dir.join(name);
    if let Ok(m) = std::fs::symlink_metadata(&resolved) {
        if m.file_type().is_symlink() {
            return Err(invalid("it is a symbolic link; give the path it points to"));
        }
    }
    Ok(resolved)
}

/// Listens on the socket `path` (resolved with [`resolve`]) with `access`.
///
/// A socket already at the path is replaced only when nobody listens on it and `stale`
/// allows it; anything else there (a file, a directory, a typo pointing at data, another
/// program's socket) is refused and left alone.
pub fn listen(path: &Path, access: Access, stale: Stale) -> io::Result<Listening> {
    let path = resolve(path)?;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    ErrorKind::AddrInUse,
                    "another program listens on it",
                ));
            }
            if stale == Stale::Refuse {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    "a socket nobody listens on is there, outside the daemon's socket directory; remove it if it is yours to replace",
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                ErrorKind::AlreadyExists,
                "it exists and is not a socket; not replacing it",
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = publish(&path, access)?;
    let id = pin(&path)?;
    Ok(Listening { listener, path, id })
}

/// Binds under a temporary name beside `path`, sets the access, then renames it into
/// place: clients (QEMU, scripts) wait for the path and connect at once, and a socket
/// bound in place exists between bind(2) and listen(2), where a connect is refused; and
/// it must not be reachable before its mode is set.
fn publish(path: &Path, access: Access) -> io::Result<UnixListener> {
    let set_access = |p: &Path| -> io::Result<()> {
        if let Some(gid) = access.gid {
            std::os::unix::fs::chown(p, None, Some(gid))?;
        }
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(access.mode))
    };
    let tmp = staging_path(path);
    // Where the temporary name would not fit but the path does, it is bound in place.
    if tmp.as_os_str().len() >= SUN_PATH_MAX {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let l = UnixListener::bind(path)?;
        set_access(path)?;
        return Ok(l);
    }
    // Left by a run that died between its bind and its rename.
    let _ = std::fs::remove_file(&tmp);
    let published = UnixListener::bind(&tmp).and_then(|l| {
        set_access(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    if published.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    published
}

/// Where [`publish`] binds before it renames to `path`: a hidden name in the same
/// directory (a rename does not cross file systems), unique to this process.
fn staging_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// The numeric id of a group given by name or number (`/etc/group`; names only the system
/// databases know, e.g. from LDAP, must be given by number).
pub fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::NotFound,
                format!("no group named {group:?} in /etc/group (give its number)"),
            )
        })
}

#[cfg(test)]
mod tests;
