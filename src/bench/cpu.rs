//! CPU time of another process (the appliance under test).
//!
//! Only reads: nothing here signals or otherwise touches the process.

use std::time::Duration;

/// CPU time (user + system, all threads, living and exited) of a process.
///
/// Read from the process's CPU-time clock (`clock_getcpuclockid`), which has
/// nanosecond resolution; `/proc/<pid>/stat` counts in 10 ms ticks, too coarse
/// for a short run of a fast appliance, and is only the fallback.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_clock(pid).or_else(|| proc_stat_cpu(pid))
}

fn cpu_clock(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer for the duration of the call.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id only yields an error.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

fn proc_stat_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Clock ticks are 100 per second on every Linux this runs on (USER_HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Measures a process's CPU time over a stretch of work.
pub struct CpuMeter {
    pid: Option<u32>,
    before: Option<Duration>,
}

impl CpuMeter {
    /// Starts measuring `pid` (none: nothing is measured).
    pub fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            before: pid.and_then(process_cpu),
        }
    }

    /// CPU-seconds used since `start`.
    pub fn seconds(&self) -> Option<f64> {
        let after = self.pid.and_then(process_cpu)?;
        Some(after.saturating_sub(self.before?).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// This thread's own CPU time.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer for the duration of the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn reads_its_own_cpu_time() {
        let pid = std::process::id();
        let meter = CpuMeter::start(Some(pid));
        // Burn a quarter second of this thread's CPU, however busy the machine
        // (the wall-clock deadline only stops a runaway).
        let begin = thread_cpu();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut x = 0u64;
        while thread_cpu() - begin < Duration::from_millis(250) && Instant::now() < deadline {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let spun = (thread_cpu() - begin).as_secs_f64();
        let used = meter.seconds().expect("own CPU time");
        // The process's clock counts this thread's time, and more.
        assert!(used >= spun, "{used} s < {spun} s ({x})");
        assert!(process_cpu(u32::MAX).is_none());
        assert!(CpuMeter::start(None).seconds().is_none());
        // The precise clock and the tick counter tell the same story.
        let clock = cpu_clock(pid).expect("CPU clock");
        let ticks = proc_stat_cpu(pid).expect("/proc/self/stat");
        let gap = clock.abs_diff(ticks);
        assert!(gap < Duration::from_millis(100), "{clock:?} vs {ticks:?}");
    }
}
