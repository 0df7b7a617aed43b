//! How busy the host was while the rounds ran: the share of this VM's CPU
//! time stolen by the hypervisor and spent waiting for I/O, from the
//! `cpu` line of /proc/stat. A run whose plaintext lane was slowed by
//! either measures the machine, not the mesh; the report says so.

use anyhow::{Context, Result};

/// Cumulative CPU time of all CPUs, in clock ticks, by kind.
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    total: u64,
    iowait: u64,
    steal: u64,
}

impl CpuTimes {
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&stat)
    }

    /// The aggregate `cpu` line: user nice system idle iowait irq softirq
    /// steal guest guest_nice (guest time is already in user and nice).
    fn parse(stat: &str) -> Result<Self> {
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no aggregate cpu line")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {line:?}"))?;
        anyhow::ensure!(ticks.len() >= 8, "too few fields in {line:?}");
        Ok(Self {
            total: ticks[..8].iter().sum(),
            iowait: ticks[4],
            steal: ticks[7],
        })
    }

    /// Percentages of the CPU time since `earlier`: (steal, iowait).
    pub fn busy_since(&self, earlier: &Self) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 * 100.0 / total;
        (
            pct(self.steal, earlier.steal),
            pct(self.iowait, earlier.iowait),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_and_iowait_are_shares_of_all_cpu_time_between_readings() {
        let before = CpuTimes::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n").unwrap();
        let after = CpuTimes::parse("cpu  300 0 150 1350 60 0 0 140 0 0\n").unwrap();
        // 1,000 ticks passed: 100 stolen, 50 waiting for I/O.
        assert_eq!(after.busy_since(&before), (10.0, 5.0));
    }

    #[test]
    fn a_stat_without_the_aggregate_line_is_an_error() {
        assert!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n").is_err());
    }
}
