use super::*;
use std::time::{Duration, Instant};

/// A client that connects the moment the path appears is never refused. (Bound in place,
/// a socket refused about one such connect in twenty here: it exists between bind(2) and
/// listen(2).)
#[test]
fn a_socket_accepts_connections_as_soon_as_its_path_exists() {
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
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        assert!(Instant::now() < deadline, "{} never appeared", p.display());
                    }
                    Err(e) => return Err(format!("round {i}: {e}")),
                }
            }
        });
        let l = listen(&path, Access::default(), Stale::Refuse).unwrap();
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
fn a_dead_socket_is_replaced_only_where_allowed_and_nothing_else_ever() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    drop(listen(&path, Access::default(), Stale::Refuse).unwrap());
    let e = listen(&path, Access::default(), Stale::Refuse)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let l = listen(&path, Access::default(), Stale::Replace).unwrap();
    UnixStream::connect(&path).unwrap();
    // Live: never replaced.
    let e = listen(&path, Access::default(), Stale::Replace)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    drop(l);
    let file = dir.path().join("data");
    std::fs::write(&file, b"keep").unwrap();
    let e = listen(&file, Access::default(), Stale::Replace)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn spellings_of_one_socket_resolve_to_one_path_and_symlinks_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let plain = resolve(&dir.join("disk0.sock")).unwrap();
    assert_eq!(
        resolve(&dir.join("..").join("state").join("disk0.sock")).unwrap(),
        plain
    );
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    assert_eq!(resolve(&link.join("disk0.sock")).unwrap(), plain);
    std::os::unix::fs::symlink(dir.join("disk0.sock"), dir.join("alias.sock")).unwrap();
    assert!(resolve(&dir.join("alias.sock")).is_err());
    assert!(resolve(&dir.join("..")).is_err());
    assert!(resolve(Path::new("")).is_err());
    assert!(resolve(&base.path().join("missing").join("x.sock")).is_err());
}

#[test]
fn the_daemon_removes_only_the_socket_file_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let l = listen(&path, Access::default(), Stale::Refuse).unwrap();
    let mine = l.file();
    drop(l);
    // Another program took the path over.
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    mine.remove();
    assert!(path.exists());
    drop(theirs);
    let l = listen(&path, Access::default(), Stale::Replace).unwrap();
    l.file().remove();
    assert!(!path.exists());
}

#[test]
fn a_socket_gets_its_mode_and_group_before_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sock");
    let gid = std::fs::metadata(dir.path()).unwrap().gid();
    let l = listen(
        &path,
        Access {
            mode: 0o660,
            gid: Some(gid),
        },
        Stale::Refuse,
    )
    .unwrap();
    let m = std::fs::metadata(&l.path).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), gid);
}

#[test]
fn groups_are_found_by_name_or_number() {
    assert_eq!(group_id("1234").unwrap(), 1234);
    assert_eq!(group_id("root").unwrap(), 0);
    assert!(group_id("no-such-group-here").is_err());
}
