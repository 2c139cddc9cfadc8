//! Unix socket helpers shared by the management socket and the disks' sockets.

use std::os::unix::net::UnixListener;
use std::path::Path;

/// Listens on a socket path, replacing a socket left there by an earlier run. Anything
/// else at the path (a file, a directory, a typo pointing at data) is left alone and
/// refused: removing it could destroy what the operator meant to keep.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a socket; not replacing it",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}
