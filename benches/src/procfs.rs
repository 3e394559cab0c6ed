//! Resource samples of a process from `/proc/{pid}`: resident memory and CPU
//! time. Used for the server under test (`--server-pid`) and for the
//! generator itself, so a report can say what one delivery cost each side.

use std::time::Instant;

/// One reading of a process's resident set and consumed CPU time.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    pub rss_bytes: u64,
    pub cpu_secs: f64,
}

/// Reads `/proc/{pid}` (`"self"` for this process). `None` if it is gone.
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let cpu_ticks = parse_cpu_ticks(&stat)?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcSample {
        at: Instant::now(),
        rss_bytes: resident_pages * page_size(),
        cpu_secs: cpu_ticks as f64 / clock_ticks_per_sec(),
    })
}

/// utime + stime from a `/proc/{pid}/stat` line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After ')': state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as f64
    } else {
        100.0
    }
}

/// What a process used between two samples.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcUsage {
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub cpu_secs: f64,
    /// CPU time over wall time; 100 = one full core.
    pub cpu_pct: f64,
}

impl ProcUsage {
    pub fn between(a: &ProcSample, b: &ProcSample) -> Self {
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let cpu = (b.cpu_secs - a.cpu_secs).max(0.0);
        ProcUsage {
            rss_start_kib: a.rss_bytes / 1024,
            rss_end_kib: b.rss_bytes / 1024,
            cpu_secs: cpu,
            cpu_pct: 100.0 * cpu / wall,
        }
    }
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "1234 (my (odd) proc) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 4 0 100 1000 50";
        assert_eq!(parse_cpu_ticks(line), Some(281));
    }

    #[test]
    fn samples_this_process() {
        let s = sample("self").expect("own /proc entry");
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_secs >= 0.0);
    }

    #[test]
    fn nofile_limit_can_be_raised_to_hard() {
        let soft = raise_nofile_limit().unwrap();
        assert!(soft >= 1024);
    }
}
