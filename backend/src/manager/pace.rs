//! Pacing of bulk writers into a pool's data file that guests write as well: the migration's
//! background copy (into the new pool, which the mirror writes the guest's requests into)
//! and every stream received into a pool (`snapshot-receive`, the copies of snapshots that
//! a migration or a replication makes). Each pauses for a few microseconds after every
//! [`PACE_EVERY_CPU`] of its own CPU time.
//!
//! Why: a buffered write holds the file's inode lock while it copies its data into the page
//! cache, and the kernel may preempt the writer there, at a voluntary preemption point of
//! the write loop, once its time slice is used up. The guests' writes into the same file
//! then wait until the bulk writer is scheduled again: several scheduler ticks on a busy
//! host, every request of a guest's queue held meanwhile (docs/BENCHMARKS.md, "Where the
//! guest waits during the move now"). A thread that sleeps, however briefly, is given a
//! fresh slice when it wakes; one that has run for less than a slice since is not preempted
//! inside its next write. `sched_yield` is no substitute: under EEVDF it moves the thread's
//! deadline a slice back, and a copy that yields as often gets little CPU at all (tried:
//! the move took up to twice as long, with more written twice).

use std::time::Duration;

/// CPU time a writer runs between pauses: well under the scheduler's base slice (0.75 ms
/// times 1 + log2 of the CPUs, up to 8), so a slice begun at a pause is not used up before
/// the next one.
pub const PACE_EVERY_CPU: Duration = Duration::from_micros(500);

/// How long a writer sleeps at each pause (with the thread's timer slack set to 1 µs, see
/// [`Pacer::for_this_thread`]): about 5 % of its time.
const PAUSE: Duration = Duration::from_micros(20);

/// Counts a thread's CPU time and pauses it once [`PACE_EVERY_CPU`] has gone by.
pub struct Pacer<C: FnMut() -> Duration, S: FnMut(Duration)> {
    cpu_time: C,
    sleep: S,
    since: Duration,
}

impl Pacer<fn() -> Duration, fn(Duration)> {
    /// Paces the calling thread (only that thread may call [`Pacer::step`]). Sets its timer
    /// slack to 1 µs, so that a pause lasts about what it asks (the default, 50 µs, would
    /// more than triple it). The slack stays with the thread, which only makes its other
    /// sleeps more exact.
    pub fn for_this_thread() -> Self {
        // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only the calling thread's
        // timer slack; no memory is passed.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        Pacer::new(thread_cpu_time, std::thread::sleep)
    }
}

impl<C: FnMut() -> Duration, S: FnMut(Duration)> Pacer<C, S> {
    /// A pacer over a clock of the thread's CPU time and a way to sleep (tests pass their
    /// own).
    pub fn new(mut cpu_time: C, sleep: S) -> Self {
        let since = cpu_time();
        Pacer {
            cpu_time,
            sleep,
            since,
        }
    }

    /// Between two steps of the writer (with no lock held): pauses if the thread has run for
    /// [`PACE_EVERY_CPU`] since the last pause. Returns whether it paused.
    pub fn step(&mut self) -> bool {
        if (self.cpu_time)().saturating_sub(self.since) < PACE_EVERY_CPU {
            return false;
        }
        (self.sleep)(PAUSE);
        self.since = (self.cpu_time)();
        true
    }
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is, and keeps no pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        // Cannot happen for this clock on Linux; a writer that cannot pace goes on unpaced.
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_copy_pauses_once_per_budget_of_cpu_time_and_not_between() {
        let now = Cell::new(Duration::from_millis(7));
        let pauses = Cell::new(Vec::new());
        let mut p = Pacer::new(
            || now.get(),
            |d| {
                let mut v = pauses.take();
                v.push(d);
                pauses.set(v);
            },
        );
        let mut paused_at = Vec::new();
        // Steps of 120 µs of CPU time each: a pause at the step that reaches 500 µs since
        // the last one (the 5th, 10th, …), none in between.
        for i in 1..=20u32 {
            now.set(now.get() + Duration::from_micros(120));
            if p.step() {
                paused_at.push(i);
            }
        }
        assert_eq!(paused_at, [5, 10, 15, 20]);
        assert_eq!(pauses.take(), vec![PAUSE; 4]);
    }

    #[test]
    fn time_spent_off_the_cpu_does_not_count() {
        // A clock of CPU time stands still while the thread waits (for a lock, for
        // write-back): steps that take no CPU never pause.
        let mut p = Pacer::new(|| Duration::from_secs(3), |_| panic!("paused"));
        for _ in 0..1000 {
            assert!(!p.step());
        }
    }

    #[test]
    fn the_thread_cpu_clock_advances_with_work_and_not_with_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - t0;
        let mut x = 0u64;
        let t1 = thread_cpu_time();
        while thread_cpu_time() - t1 < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(
            slept < Duration::from_millis(30),
            "30 ms asleep counted as {slept:?} of CPU time"
        );
        assert!(x > 0);
    }
}
