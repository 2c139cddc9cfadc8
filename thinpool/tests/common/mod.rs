//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Debian's thin-provisioning-tools.
pub const THIN_CHECK: &str = "/usr/sbin/thin_check";
const SBIN: &str = "/usr/sbin";

/// Runs `tool` (a path, or a name in /usr/sbin) with `args`; it must succeed. Returns its
/// stdout.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    checked(tool, args, "")
}

/// Runs `tool` with `args` and then a temporary file holding the metadata `image`; it
/// must succeed (`what`, the image, is named if it does not). Returns its stdout.
pub fn run_tool_on(tool: &str, args: &[&str], image: &[u8], what: &str) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), image).unwrap();
    let mut all = args.to_vec();
    all.push(f.path().to_str().unwrap());
    checked(tool, &all, &format!(" on {what}"))
}

/// Runs `tool` (a path, or a name in /usr/sbin) with `args`; the caller checks the outcome.
pub fn tool_output(tool: &str, args: &[&str]) -> Output {
    Command::new(Path::new(SBIN).join(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"))
}

fn checked(tool: &str, args: &[&str], on: &str) -> String {
    let out = tool_output(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed{on} ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether the real tools are there; panics when they are missing but required
/// (VHOST_THIN_REQUIRE_TOOLS=1, as in CI). `skipping` says what is skipped otherwise.
pub fn tools_available(skipping: &str) -> bool {
    if Path::new(THIN_CHECK).exists() {
        return true;
    }
    if std::env::var("VHOST_THIN_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{THIN_CHECK} is missing and VHOST_THIN_REQUIRE_TOOLS=1");
    }
    eprintln!("notice: {THIN_CHECK} not found; skipping {skipping}");
    false
}

/// xorshift64: deterministic, seedable, good enough to pick operations and offsets.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(len);
    out
}
