//! One round of the per-mode measurements: latency under constant-rate
//! load, throughput, connection rate and the cost of a new connection, with
//! the data plane's CPU read around the loads. Rounds interleave the modes
//! (the order rotates each round) so noise on the shared machine hits all.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    load::{ConnCost, ConnRate, OpenLoop},
    modes::{Bench, IPERF_PORT, Mode},
    results::{Config, Recorder},
};

/// A named request rate (e.g. `1000rps`).
#[derive(Clone, Debug)]
pub struct Rate {
    pub label: String,
    pub rps: f64,
}

/// Keep-alive connections for a rate: 500 req/s each at most.
fn connections_for(rps: f64) -> usize {
    ((rps / 500.0).ceil() as usize).clamp(1, 16)
}

fn open_loop(b: &Bench, mode: Mode, rps: f64, seconds: f64) -> Result<OpenLoop> {
    let lane = b.lane(mode);
    let (addr, rate) = (lane.server_addr().to_string(), rps.to_string());
    let (secs, conns) = (seconds.to_string(), connections_for(rps).to_string());
    b.run_in(
        &lane.client,
        &["open-loop", &addr, &rate, &secs, &conns],
        Duration::from_secs_f64(seconds * 10.0 + 60.0),
    )
}

/// The rates measured: 100 and 1,000 req/s, and the highest of a few
/// candidates that every mode sustains (achieves 97% of it without errors,
/// p99 under 50 ms, in a 2 s trial); quick runs take 2,000 untried.
pub fn rates(b: &Bench, modes: &[Mode], cfg: &Config, rec: &mut Recorder) -> Result<Vec<Rate>> {
    let mut rates = vec![
        Rate {
            label: "100rps".into(),
            rps: 100.0,
        },
        Rate {
            label: "1000rps".into(),
            rps: 1000.0,
        },
    ];
    let candidates: &[f64] = if cfg.quick {
        &[2000.0]
    } else {
        &[8000.0, 5000.0, 3000.0, 2000.0]
    };
    let mut high = *candidates.last().unwrap();
    if !cfg.quick {
        'candidates: for &rps in candidates {
            for &mode in modes {
                let run = open_loop(b, mode, rps, 2.0)?;
                let sustained = run.counts.errors == 0
                    && run.achieved_rps >= 0.97 * rps
                    && run.latency_us.p99 < 50_000.0;
                println!(
                    "  calibration: {} at {rps} req/s achieved {:.0}, p99 {:.0} µs, {} errors",
                    mode.key(),
                    run.achieved_rps,
                    run.latency_us.p99,
                    run.counts.errors
                );
                if !sustained {
                    continue 'candidates;
                }
            }
            high = rps;
            break;
        }
    }
    rec.record("latency.high.rate", "req/s", high);
    rates.push(Rate {
        label: "high".into(),
        rps: high,
    });
    Ok(rates)
}

/// Every per-mode measurement once for `mode`.
pub fn round(
    b: &Bench,
    mode: Mode,
    rates: &[Rate],
    cfg: &Config,
    rec: &mut Recorder,
) -> Result<()> {
    let m = mode.key();
    for rate in rates {
        let (run, spent) = b.spent(mode, &rate.label, || {
            open_loop(b, mode, rate.rps, cfg.latency_seconds)
        })?;
        let cores = spent.cpu_s / spent.elapsed.as_secs_f64();
        let key = format!("latency.{}.{m}", rate.label);
        let p = run.latency_us;
        for (q, v) in [
            ("p50", p.p50),
            ("p90", p.p90),
            ("p99", p.p99),
            ("p999", p.p999),
        ] {
            rec.record(format!("{key}.{q}"), "µs", v);
        }
        rec.record(format!("{key}.achieved_rps"), "req/s", run.achieved_rps);
        rec.record_counts(&key, "requests", run.counts);
        // Cores the data plane used, and per 1,000 req/s of this load.
        rec.record(format!("cpu.{}.{m}.cores", rate.label), "cores", cores);
        rec.record(
            format!("cpu.{}.{m}.cores_per_1k_rps", rate.label),
            "cores",
            cores * 1000.0 / run.achieved_rps.max(1.0),
        );
        rec.record(
            format!("cpu.{}.{m}.switches_per_req", rate.label),
            "switches",
            spent.switches as f64 / (run.counts.requests.max(1) as f64),
        );
    }
    for streams in [1, 4] {
        let gbps = iperf(b, mode, streams, cfg.iperf_seconds)?;
        rec.record(format!("iperf.{streams}.{m}.gbps"), "Gbit/s", gbps);
    }
    let lane = b.lane(mode);
    let addr = lane.server_addr().to_string();
    // The cost of one connection before the rate run, whose thousands of
    // closed connections (TIME_WAIT) would weigh on plaintext's connects.
    let cost: ConnCost = b.run_in(
        &lane.client,
        &["conn-cost", &addr, &cfg.conn_cost_count.to_string()],
        Duration::from_secs(300),
    )?;
    rec.record(format!("conn_cost.{m}.p50"), "µs", cost.latency_us.p50);
    rec.record(format!("conn_cost.{m}.p99"), "µs", cost.latency_us.p99);
    rec.record_counts(&format!("conn_cost.{m}"), "connections", cost.counts);
    let (rate, spent) = b.spent(mode, "conn_rate", || {
        b.run_in::<ConnRate>(
            &lane.client,
            &[
                "conn-rate",
                &addr,
                &cfg.conn_rate_seconds.to_string(),
                &cfg.conn_rate_clients.to_string(),
            ],
            Duration::from_secs_f64(cfg.conn_rate_seconds + 120.0),
        )
    })?;
    rec.record(format!("conn_rate.{m}.per_s"), "conn/s", rate.per_second);
    rec.record_counts(&format!("conn_rate.{m}"), "connections", rate.counts);
    rec.record(
        format!("conn_rate.{m}.cpu_us_per_conn"),
        "µs",
        spent.cpu_s * 1e6 / (rate.counts.requests.max(1) as f64),
    );
    rec.record(
        format!("conn_rate.{m}.switches_per_conn"),
        "switches",
        spent.switches as f64 / (rate.counts.requests.max(1) as f64),
    );
    Ok(())
}

fn iperf(b: &Bench, mode: Mode, streams: u32, seconds: u32) -> Result<f64> {
    let lane = b.lane(mode);
    let out = b.tb.run_within(
        &lane.client,
        &[
            "iperf3",
            "-c",
            &lane.server.ipv4.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
        Duration::from_secs(u64::from(seconds) + 60),
    )?;
    ensure!(
        out.status.success(),
        "iperf3 in {}: {}",
        lane.client.name,
        ambit_testbed::stderr(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 report has no end.sum_received.bits_per_second")
}
