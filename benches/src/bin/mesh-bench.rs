//! The mesh benchmark: two nodes, identical client and server pods on each
//! side, once outside the mesh (plaintext TCP across the link) and once
//! enrolled (captured by eBPF, carried in the mTLS HBONE tunnel), measured
//! in one run on one testbed.
//!
//! `mesh-bench` drives the testbed; it re-executes itself inside pods as
//! `mesh-bench echo-server PORT`, `mesh-bench connect-latency ADDR N` and
//! `mesh-bench rate-latency ADDR RATE SECONDS`, because capture applies to
//! processes in the pod's cgroup, not to a thread of this one.

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
        Some("rate-latency") => rate_latency(args[2].parse()?, args[3].parse()?, args[4].parse()?),
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

/// Request latency on one persistent connection at a fixed rate: a 1-byte
/// request every 1/RATE s, timed from its scheduled send time so a stall
/// counts against every request it delays (no coordinated omission).
fn rate_latency(addr: SocketAddr, rate: u32, seconds: u32) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let count = rate * seconds;
    let start = Instant::now();
    let mut micros = Vec::with_capacity(count as usize);
    for i in 0..count {
        let scheduled = start + interval * i;
        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        stream.write_all(b"x")?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        micros.push(scheduled.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", serde_json::to_string(&micros)?);
    Ok(())
}

struct Percentiles {
    p50: f64,
    p99: f64,
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    }
}

const RATE: &str = "500";
const RATE_SECONDS: &str = "10";

/// One side of the comparison: a client pod on node 0, a server pod on node 1.
struct Path {
    label: &'static str,
    client: Pod,
    server: Pod,
}

struct Row {
    connect: Percentiles,
    request: Percentiles,
    one_stream: f64,
    four_streams: f64,
}

fn run_benchmark() -> Result<()> {
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?;
    let mut tb = Testbed::new(2)?;
    let paths = [
        Path {
            label: "plaintext (not enrolled)",
            client: tb.add_pod(0, "client-plain")?,
            server: tb.add_pod(1, "server-plain")?,
        },
        Path {
            label: "Ambit mTLS HBONE tunnel",
            client: tb.add_pod(0, "client-mesh")?,
            server: tb.add_pod(1, "server-mesh")?,
        },
    ];
    for path in &paths {
        let name = &path.server.name;
        tb.spawn(
            &path.server,
            &format!("echo-{name}"),
            &[me, "echo-server", &ECHO_PORT.to_string()],
        )?;
        tb.wait_for_listener(&path.server, ECHO_PORT)?;
        tb.spawn(
            &path.server,
            &format!("iperf3-{name}"),
            &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
        )?;
        tb.wait_for_listener(&path.server, IPERF_PORT)?;
    }
    let entries = [
        WorkloadEntry::opted_out(&paths[0].client),
        WorkloadEntry::opted_out(&paths[0].server),
        WorkloadEntry::enrolled(&paths[1].client),
        WorkloadEntry::enrolled(&paths[1].server),
    ];
    let _ca = tb.start_ca(&entries, 3600)?;
    let agent0 = tb.start_agent(0, &entries)?;
    let agent1 = tb.start_agent(1, &entries)?;
    println!(
        "mesh-bench: two nodes; {CONNECTIONS} sequential connections, {RATE} req/s for {RATE_SECONDS}s \
         on one connection, iperf3 {IPERF_SECONDS}s with 1 and 4 streams"
    );
    println!(
        "| path | connect+RTT p50 / p99 (µs) | request p50 / p99 at {RATE}/s (µs) | iperf3 1 stream (Gbit/s) | 4 streams (Gbit/s) |"
    );
    println!("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for path in &paths {
        let row = Row {
            connect: latency(&tb, &path.client, me, &path.server)?,
            request: rate(&tb, &path.client, me, &path.server)?,
            one_stream: throughput(&tb, &path.client, &path.server, "1")?,
            four_streams: throughput(&tb, &path.client, &path.server, "4")?,
        };
        println!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.2} |",
            path.label,
            row.connect.p50,
            row.connect.p99,
            row.request.p50,
            row.request.p99,
            row.one_stream,
            row.four_streams
        );
        rows.push(row);
    }
    let (plain, mesh) = (&rows[0], &rows[1]);
    println!(
        "\nratios (tunnel / plaintext): connect p50 {:.2}x, p99 {:.2}x; request p50 {:.2}x, p99 {:.2}x; \
         throughput 1 stream {:.2}x, 4 streams {:.2}x",
        mesh.connect.p50 / plain.connect.p50,
        mesh.connect.p99 / plain.connect.p99,
        mesh.request.p50 / plain.request.p50,
        mesh.request.p99 / plain.request.p99,
        mesh.one_stream / plain.one_stream,
        mesh.four_streams / plain.four_streams,
    );
    let captured = agent0.records("outbound connection captured").len();
    let handshakes = agent0.records("tunnel established").len();
    println!("pooling: {captured} captured connections used {handshakes} tunnel handshake(s)");
    ensure!(
        captured >= CONNECTIONS,
        "the enrolled client's connections were not captured"
    );
    agent1.stop_with(15)?;
    policy_and_audit_cost(&tb, me, &paths[1])
}

/// The server-side agent restarted twice: once deciding nothing (mesh
/// default allow, audit to /dev/null), once with 1,000 policies (default
/// deny, one ALLOW for this client) and the audit log on disk; the
/// difference in connection latency is what policy and audit add.
fn policy_and_audit_cost(tb: &Testbed, me: &str, path: &Path) -> Result<()> {
    let policies = tb.dir.path().join("bench-policies");
    std::fs::create_dir_all(&policies)?;
    let policy = |name: &str, app: &str, sa: &str| {
        format!(
            "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{ name: {name}, namespace: default }}\nspec:\n\
             \x20 selector: {{ matchLabels: {{ app: {app} }} }}\n  action: ALLOW\n  rules:\n\
             \x20   - from: [ {{ principals: [\"spiffe://cluster.local/ns/default/sa/{sa}\"] }} ]\n"
        )
    };
    let mut docs: Vec<String> = (0..999)
        .map(|i| policy(&format!("p{i}"), &format!("other-{i}"), &format!("c{i}")))
        .collect();
    docs.push(policy("allow-bench", &path.server.name, &path.client.name));
    std::fs::write(policies.join("bench.yaml"), docs.join("---\n"))?;
    let policies = policies.display().to_string();
    let configs: [(&str, Vec<&str>); 2] = [
        (
            "no policy, audit to /dev/null",
            vec![
                "--default-policy",
                "allow",
                "--audit-log",
                "/dev/null",
                // Never rotate: rotation would rename the path.
                "--audit-max-bytes",
                "1000000000000000",
            ],
        ),
        (
            "1,000 policies + audit log on disk",
            vec!["--default-policy", "deny", "--policies", &policies],
        ),
    ];
    println!("\n| server-side agent | connect+RTT p50 / p99 (µs) |\n|---|---|");
    let mut p50s = Vec::new();
    for (label, args) in &configs {
        let agent = tb.start_agent_with(1, args)?;
        let lat = latency(tb, &path.client, me, &path.server)?;
        ensure!(
            agent.records("inbound connection accepted").len() >= CONNECTIONS,
            "connections were not allowed under {label}"
        );
        println!("| {label} | {:.0} / {:.0} |", lat.p50, lat.p99);
        p50s.push(lat.p50);
        agent.stop_with(15)?;
    }
    println!(
        "policy + audit add {:.0} µs per connection at p50 ({:.2}x)",
        p50s[1] - p50s[0],
        p50s[1] / p50s[0]
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

fn rate(tb: &Testbed, client: &Pod, me: &str, server: &Pod) -> Result<Percentiles> {
    let addr = SocketAddr::new(server.ipv4.into(), ECHO_PORT).to_string();
    let out = tb.run_within(
        client,
        &[me, "rate-latency", &addr, RATE, RATE_SECONDS],
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "rate client in {}: {}",
        client.label(),
        stderr(&out)
    );
    Ok(percentiles(serde_json::from_slice(&out.stdout)?))
}

fn throughput(tb: &Testbed, client: &Pod, server: &Pod, streams: &str) -> Result<f64> {
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
            "-P",
            streams,
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
