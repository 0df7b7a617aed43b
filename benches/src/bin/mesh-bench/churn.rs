//! Churn: node-mode pods on node 1 enrolled and removed over and over (one
//! enrolment and one removal per step) while the node-mode client keeps
//! opening and closing connections through the agents; node 1's agent's
//! RSS and descriptors are sampled throughout and must come back to their
//! baseline.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_testbed::{procfs, wait_until};
use anyhow::{Context, Result};

use crate::{
    load::Counts,
    modes::{Bench, Mode},
    results::{Config, Recorder, Sample},
};

/// Names of the churned pods (the entries `Bench::set_enrolled` replaces).
pub const POD_PREFIX: &str = "churn-";
const PODS: usize = 8;
/// Long enough for the agents' 100 ms reload to see every step.
const STEP: Duration = Duration::from_millis(150);

pub fn run(b: &mut Bench, cfg: &Config, rec: &mut Recorder) -> Result<Vec<Sample>> {
    let pods = (0..PODS)
        .map(|i| b.tb.add_pod(1, &format!("{POD_PREFIX}{i}")))
        .collect::<Result<Vec<_>>>()?;
    b.register_with_ca(&pods)?;
    let agent = b.agents[1].pid;
    let lane = b.lane(Mode::Node);
    let stop = b.tb.dir.path().join("churn-stop");
    let addr = lane.server_addr().to_string();
    let looper = "churn-conn-loop";
    b.tb.spawn(
        &lane.client,
        looper,
        &[&b.me, "conn-loop", &addr, stop.to_str().context("path")?],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, done) = (Arc::clone(&samples), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(usage) = procfs::Usage::of(agent) {
                    samples.lock().unwrap().push(Sample {
                        t_s: started.elapsed().as_secs_f64(),
                        rss_kib: usage.rss_kib,
                        fds: usage.fds,
                    });
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let baseline = procfs::Usage::of(agent)?;
    // Half the pods enrolled at any time; each step enrolls the next and
    // removes the one enrolled longest ago.
    let half = PODS / 2;
    for step in 0..cfg.churn_cycles {
        let enrolled: Vec<_> = (0..half).map(|k| pods[(step + k) % PODS].clone()).collect();
        b.set_enrolled(&enrolled)?;
        std::thread::sleep(STEP);
    }
    b.set_enrolled(&[])?;
    // Let the last removals and the connections' close records settle.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&stop, "")?;
    wait_until(Duration::from_secs(30), || {
        Ok(!b.tb.stdout_of(looper).is_empty())
    })?;
    let counts: Counts = serde_json::from_str(b.tb.stdout_of(looper).trim())?;
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler panicked");
    let end = procfs::Usage::of(agent)?;
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let peak = samples.iter().fold(baseline, |max, s| {
        max.max(procfs::Usage {
            fds: s.fds,
            rss_kib: s.rss_kib,
        })
    });
    rec.record("churn.cycles", "cycles", cfg.churn_cycles as f64);
    for (stage, usage) in [("baseline", baseline), ("peak", peak), ("end", end)] {
        rec.record(
            format!("churn.rss_mib.{stage}"),
            "MiB",
            usage.rss_kib as f64 / 1024.0,
        );
        rec.record(format!("churn.fds.{stage}"), "fds", usage.fds as f64);
    }
    rec.record_counts("churn.conns", "connections", counts);
    println!(
        "  churn: {} cycles, agent baseline {baseline}, peak {peak}, end {end}; {} connections, {} errors",
        cfg.churn_cycles, counts.requests, counts.errors
    );
    Ok(samples)
}
