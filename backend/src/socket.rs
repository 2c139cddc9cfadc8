//! Unix socket helpers shared by the management socket and the disks' sockets.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Listens on a socket path, replacing a socket left there by an earlier run. Anything
/// else at the path (a file, a directory, a typo pointing at data) is left alone and
/// refused: removing it could destroy what the operator meant to keep.
///
/// The socket appears at `path` only once it listens, with `mode` (if given) already
/// set: clients (QEMU, scripts, the tests) wait for the file and then connect, and a
/// socket bound in place exists between bind(2) and listen(2), where a connect is refused.
/// So it is bound and set up under a temporary name beside `path`, then renamed over it.
pub fn listen(path: &Path, mode: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a socket; not replacing it",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = staging_path(path);
    // A socket path is limited (108 bytes with its NUL): where the temporary name would not
    // fit but the path does, it is bound in place, as before.
    if tmp.as_os_str().len() >= SUN_PATH_MAX {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let l = UnixListener::bind(path)?;
        if let Some(mode) = mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        return Ok(l);
    }
    // Left by a run that died between its bind and its rename.
    let _ = std::fs::remove_file(&tmp);
    let published = UnixListener::bind(&tmp).and_then(|l| {
        if let Some(mode) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    if published.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    published
}

/// The longest socket path, with its terminating NUL (`sun_path` of `sockaddr_un`).
const SUN_PATH_MAX: usize = 108;

/// Where [`listen`] binds before it publishes at `path`: a hidden name in the same
/// directory (a rename does not cross file systems), unique to this process.
fn staging_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// A client that connects the moment the path appears is never refused. (Bound in
    /// place, a socket refused about one such connect in twenty here: it exists between
    /// bind(2) and listen(2).)
    #[test]
    fn a_socket_accepts_connections_as_soon_as_its_path_exists() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut refused = Vec::new();
        for i in 0..1000 {
            let path = dir.path().join(format!("s{i}.sock"));
            let p = path.clone();
            let client = std::thread::spawn(move || {
                // A liveness bound only: the path appears within microseconds.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match UnixStream::connect(&p) {
                        Ok(_) => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            assert!(Instant::now() < deadline, "{} never appeared", p.display());
                        }
                        Err(e) => return Err(format!("round {i}: {e}")),
                    }
                }
            });
            let l = listen(&path, Some(0o600)).unwrap();
            refused.extend(client.join().unwrap().err());
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            drop(l);
        }
        assert!(refused.is_empty(), "{} refused: {refused:?}", refused.len());
        // Nothing is left beside the sockets.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".sock"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn listen_replaces_a_stale_socket_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        drop(listen(&path, None).unwrap());
        let l = listen(&path, None).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(l);
        let file = dir.path().join("data");
        std::fs::write(&file, b"keep").unwrap();
        let e = listen(&file, None).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
