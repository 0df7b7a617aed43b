//! What a process holds, read from /proc: the figures the resource tests
//! assert on and print.

use anyhow::{Context, Result};

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// Resident memory of `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS:")
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> Result<u64> {
    status_field(pid, "Threads:")
}

/// A numeric field of /proc/PID/status.
fn status_field(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    field_in(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A numeric field of a status file's text (a trailing "kB" ignored).
fn field_in(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Descriptors and memory of a process at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Result<Self> {
        Ok(Self {
            fds: fd_count(pid)?,
            rss_kib: rss_kib(pid)?,
        })
    }

    /// The larger of each figure.
    pub fn max(self, other: Self) -> Self {
        Self {
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mib, tenths) = (self.rss_kib / 1024, self.rss_kib % 1024 * 10 / 1024);
        write!(f, "{} fds, {mib}.{tenths} MiB RSS", self.fds)
    }
}

/// CPU time `pid` has used so far (user + system, all its threads), in
/// seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. utime and stime are fields 14 and 15 (1-based).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / per_second)
}

/// Context switches (voluntary and involuntary) of every thread `pid` has
/// now. A thread that has exited no longer counts, so read this around a
/// load on a process whose threads live as long as it does (the agents'
/// runtime workers).
pub fn context_switches(pid: u32) -> Result<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing /proc/{pid}/task"))?;
    let mut total = 0;
    for task in tasks {
        let path = task?.path().join("status");
        // A thread may exit between the listing and the read.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        for field in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            total += field_in(&status, field)
                .with_context(|| format!("no {field} in {}", path.display()))?;
        }
    }
    Ok(total)
}
