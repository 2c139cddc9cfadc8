//! A daemon serving two pools from a configuration file, for the data-service tests: `a`
//! (64 KiB blocks) and `b` (256 KiB blocks), 256 MiB each, with disk `vm` created in `a`
//! and a management socket; started, stopped (SIGTERM) or killed (SIGKILL) at will.

use super::{bin, sigterm};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TwoPools {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TwoPools {
    /// Writes the configuration (disk `vm` of `disk_mib` MiB with `queues` queues); the
    /// daemon is not started.
    pub fn new(disk_mib: u64, queues: usize) -> TwoPools {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("cfg.yaml"),
            format!(
                "pools:\n\
                 \x20 - name: a\n    metadata: {d}/a.meta\n    data: {d}/a.data\n    block-size: 64KiB\n    create:\n      data-size: 256MiB\n\
                 \x20 - name: b\n    metadata: {d}/b.meta\n    data: {d}/b.data\n    block-size: 256KiB\n    create:\n      data-size: 256MiB\n\
                 disks:\n  - name: vm\n    pool: a\n    size: {disk_mib}MiB\n    socket: {d}/vm.sock\n    num-queues: {queues}\n\
                 management:\n  socket: {d}/qmp.sock\n  allow-commands: true\n"
            ),
        )
        .unwrap();
        TwoPools { dir, child: None }
    }

    /// Starts the daemon and waits for its sockets, which accept connections once they
    /// exist (the daemon binds each under another name and renames it into place).
    pub fn spawn(&mut self) {
        // A daemon killed with SIGKILL leaves its sockets: wait for new ones.
        for s in ["qmp.sock", "vm.sock"] {
            let _ = std::fs::remove_file(self.path(s));
        }
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(self.path("cfg.yaml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for s in ["qmp.sock", "vm.sock"] {
            self.wait_socket(s);
        }
    }

    /// Waits for socket `name` to appear; a daemon that exits first fails the test at once,
    /// with its status (and its error on the test's stderr).
    fn wait_socket(&mut self, name: &str) {
        let path = self.path(name);
        // A bound on hanging, not a speed figure.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the daemon exited before making {name}: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, which must end the daemon cleanly.
    pub fn stop(&mut self) {
        let out = sigterm(self.child.take().unwrap());
        assert!(out.status.success(), "daemon exit: {:?}", out.status);
    }

    /// SIGTERM, and its exit status if it ends within `patience` (else SIGKILL and None).
    pub fn stop_within(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take().unwrap();
        // SAFETY: a signal to our own child, which has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if t0.elapsed() > patience {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    pub fn client(&self) -> vhost_thin::ctl::Client {
        vhost_thin::ctl::Client::connect(&self.path("qmp.sock")).unwrap()
    }

    /// Pool `p`'s metadata and data files.
    pub fn pool_files(&self, p: &str) -> (String, String) {
        (
            self.path(&format!("{p}.meta")).display().to_string(),
            self.path(&format!("{p}.data")).display().to_string(),
        )
    }
}

impl Drop for TwoPools {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for job `id` to conclude (at most `patience`); its query-jobs entry.
pub fn wait_job(c: &mut vhost_thin::ctl::Client, id: &str, patience: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let jobs = c.execute("query-jobs", json!({})).unwrap();
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("job {id} not listed: {jobs}"));
        if j["status"] == "concluded" {
            return j;
        }
        assert!(t0.elapsed() < patience, "job {id} never ended: {j}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
