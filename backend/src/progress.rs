//! A progress line on stderr for long work, shown only when stderr is a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    total: u64,
    tty: bool,
    last: Instant,
    start: Instant,
}

impl Progress {
    pub fn new(what: &'static str, total: u64) -> Self {
        // SAFETY: isatty only inspects the file descriptor number.
        let tty = unsafe { libc::isatty(2) } == 1;
        let now = Instant::now();
        Progress {
            what,
            total,
            tty,
            last: now - Duration::from_secs(1),
            start: now,
        }
    }

    /// For work whose size is known only once it has started.
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Shown on a terminal, for work of a known size.
    fn enabled(&self) -> bool {
        self.tty && self.total > 0
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled() || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let pct = done as f64 * 100.0 / self.total as f64;
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r{} {:5.1}% ({} of {}, {}/s)   ",
            self.what,
            pct,
            crate::size::human(done),
            crate::size::human(self.total),
            crate::size::human(rate as u64)
        );
        let _ = std::io::stderr().flush();
    }

    pub fn finish(&mut self) {
        if self.enabled() {
            eprintln!(
                "\r{} done in {:.1?}{}",
                self.what,
                self.start.elapsed(),
                " ".repeat(40)
            );
        }
    }
}
