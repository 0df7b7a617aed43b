//! Issue 11's memory per connection: the node-mode client holds N idle
//! captured connections (each carried one request) to the node-mode server,
//! and each node agent's RSS is read before and while they are open.

use std::time::Duration;

use ambit_testbed::{procfs, wait_until};
use anyhow::{Context, Result};

use crate::{
    load::Counts,
    modes::{Bench, Mode},
    results::{Config, Recorder},
};

pub fn run(b: &Bench, cfg: &Config, rec: &mut Recorder) -> Result<()> {
    let lane = b.lane(Mode::Node);
    let before: Vec<u64> = b
        .agents
        .iter()
        .map(|a| procfs::rss_kib(a.pid))
        .collect::<Result<_>>()?;
    let name = "idle-conns";
    let addr = lane.server_addr().to_string();
    let pid = b.tb.spawn(
        &lane.client,
        name,
        &[
            &b.me,
            "idle-conns",
            &addr,
            &cfg.idle_connections.to_string(),
        ],
    )?;
    wait_until(Duration::from_secs(600), || {
        Ok(!b.tb.stdout_of(name).is_empty())
    })
    .with_context(|| format!("idle-conns never reported: {}", b.tb.stderr_of(name)))?;
    let counts: Counts = serde_json::from_str(b.tb.stdout_of(name).trim())?;
    // Let the agents' buffers settle to what an idle connection holds.
    std::thread::sleep(Duration::from_secs(2));
    let during: Vec<u64> = b
        .agents
        .iter()
        .map(|a| procfs::rss_kib(a.pid))
        .collect::<Result<_>>()?;
    // SAFETY: kill(2) on the child we just spawned (the testbed reaps it).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    rec.record_counts("idle.node", "connections", counts);
    for (side, (before, during)) in ["client_agent", "server_agent"]
        .iter()
        .zip(before.iter().zip(&during))
    {
        rec.record(
            format!("idle.node.{side}.rss_mib_before"),
            "MiB",
            *before as f64 / 1024.0,
        );
        rec.record(
            format!("idle.node.{side}.rss_mib"),
            "MiB",
            *during as f64 / 1024.0,
        );
        rec.record(
            format!("idle.node.{side}.kib_per_conn"),
            "KiB",
            during.saturating_sub(*before) as f64 / counts.requests.max(1) as f64,
        );
    }
    println!(
        "  idle: {} connections held ({} failed), agents' RSS {:?} -> {:?} KiB",
        counts.requests, counts.errors, before, during
    );
    // Give the agents time to close them all before the next phase.
    std::thread::sleep(Duration::from_secs(3));
    Ok(())
}
