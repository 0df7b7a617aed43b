//! The mesh benchmark: the same client and server pods, once talking
//! directly (an un-enrolled client) and once through the Ambit agent (an
//! enrolled client), measured in one run on one testbed.
//!
//! `mesh-bench` drives the testbed; it re-executes itself inside pods as
//! `mesh-bench echo-server PORT` and `mesh-bench connect-latency ADDR N`,
//! because capture applies to processes in the pod's cgroup, not to a thread
//! of this one.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use ambit_testbed::{Host, Pod, Testbed, WorkloadEntry, stderr};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
const CONNECTIONS: usize = 2000;
const IPERF_SECONDS: &str = "5";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo-server") => echo_server(args[2].parse()?),
        Some("connect-latency") => connect_latency(args[2].parse()?, args[3].parse()?),
        None => run_benchmark(),
        Some(other) => bail!("unknown mode {other}"),
    }
}

/// Echoes whatever each connection sends until it closes.
fn echo_server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("::", port))?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Times `count` sequential connect + 1-byte round trip + close, and prints
/// the latencies in microseconds as a JSON array.
fn connect_latency(addr: SocketAddr, count: usize) -> Result<()> {
    let mut micros = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.write_all(b"x")?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        drop(stream);
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", serde_json::to_string(&micros)?);
    Ok(())
}

struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    }
}

fn run_benchmark() -> Result<()> {
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?;
    let mut tb = Testbed::new(1)?;
    let enrolled = tb.add_pod(0, "client-mesh")?;
    let plain = tb.add_pod(0, "client-plain")?;
    let server = tb.add_pod(0, "server")?;
    tb.spawn(
        &server,
        "echo",
        &[me, "echo-server", &ECHO_PORT.to_string()],
    )?;
    tb.wait_for_listener(&server, ECHO_PORT)?;
    tb.spawn(
        &server,
        "iperf3",
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
    )?;
    tb.wait_for_listener(&server, IPERF_PORT)?;
    let agent = tb.start_agent(
        0,
        &[
            WorkloadEntry::enrolled(&enrolled),
            WorkloadEntry::opted_out(&plain),
            WorkloadEntry::enrolled(&server),
        ],
    )?;
    println!(
        "mesh-bench: one node, {CONNECTIONS} connections per latency run, {IPERF_SECONDS}s iperf3 per throughput run"
    );
    println!("| path | connect+RTT p50 (µs) | p90 | p99 | iperf3 1 stream (Gbit/s) |");
    println!("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (label, client) in [
        ("direct (not enrolled)", &plain),
        ("Ambit plain relay", &enrolled),
    ] {
        let lat = latency(&tb, client, me, &server)?;
        let gbps = throughput(&tb, client, &server)?;
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {gbps:.2} |",
            lat.p50, lat.p90, lat.p99
        );
        rows.push((lat, gbps));
    }
    let (direct, relay) = (&rows[0], &rows[1]);
    println!(
        "\nratios (relay / direct): p50 latency {:.2}x, p99 latency {:.2}x, throughput {:.2}x",
        relay.0.p50 / direct.0.p50,
        relay.0.p99 / direct.0.p99,
        relay.1 / direct.1
    );
    ensure!(
        agent.records("outbound connection captured").len() >= CONNECTIONS,
        "the enrolled client's connections were not captured"
    );
    Ok(())
}

fn latency(tb: &Testbed, client: &Pod, me: &str, server: &Pod) -> Result<Percentiles> {
    let addr = SocketAddr::new(server.ipv4.into(), ECHO_PORT).to_string();
    let out = tb.run_within(
        client,
        &[me, "connect-latency", &addr, &CONNECTIONS.to_string()],
        Duration::from_secs(300),
    )?;
    ensure!(
        out.status.success(),
        "latency client in {}: {}",
        client.label(),
        stderr(&out)
    );
    Ok(percentiles(serde_json::from_slice(&out.stdout)?))
}

fn throughput(tb: &Testbed, client: &Pod, server: &Pod) -> Result<f64> {
    let out = tb.run_within(
        client,
        &[
            "iperf3",
            "-c",
            &server.ipv4.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            IPERF_SECONDS,
            "-J",
        ],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "iperf3 in {}: {}",
        client.label(),
        stderr(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 report has no end.sum_received.bits_per_second")
}
