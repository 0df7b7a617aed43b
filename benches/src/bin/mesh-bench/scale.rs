//! Node mode and sidecar mode as the pods per node grow: the data plane's
//! total memory, its CPU per 1,000 requests spread over every pod, and the
//! time from a pod's start to its first served connection. Node mode's
//! memory slope per added pod comes from a linear fit over the steps.

use std::{net::SocketAddr, time::Duration};

use ambit_testbed::Pod;
use ambit_testbed::wait_until;
use anyhow::{Context, Result};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    load::{Counts, FirstServed, unix_micros},
    modes::{Bench, HTTP_PORT, Mode},
    results::{Config, Recorder},
    stats::linear_fit,
};

pub fn run(b: &mut Bench, modes: &[Mode], cfg: &Config, rec: &mut Recorder) -> Result<()> {
    let scaled: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|&m| m != Mode::Plaintext)
        .collect();
    let mut pods: Vec<(Mode, Vec<Pod>)> = scaled.iter().map(|&m| (m, Vec::new())).collect();
    let mut node_points = vec![(0.0, b.data_plane_rss_kib(Mode::Node)? as f64)];
    for &per_node in &cfg.scale_steps {
        for (mode, mode_pods) in &mut pods {
            let m = mode.key();
            // Every pod but the last is added in bulk; the last one's start
            // is timed up to the first request it serves.
            while mode_pods.len() + 1 < per_node * 2 {
                let node = mode_pods.len() % 2;
                let name = format!("s{m}-{}", mode_pods.len());
                mode_pods.push(b.add_server_pod(*mode, node, &name)?);
            }
            b.sync_sidecars(None)?;
            let started = unix_micros();
            let name = format!("s{m}-{}", mode_pods.len());
            let pod = b.add_server_pod(*mode, 1, &name)?;
            // The client's sidecar learns of the new pod as the node agents
            // do: from its workloads file.
            b.sync_sidecars(Some(&b.lane(*mode).client))?;
            let served_at_us = first_served(b, *mode, &pod)?;
            let first_served_ms = served_at_us.saturating_sub(started) as f64 / 1000.0;
            mode_pods.push(pod);
            let key = format!("scale.{per_node}.{m}");
            rec.record(format!("{key}.first_served_ms"), "ms", first_served_ms);
            let targets: Vec<String> = mode_pods
                .iter()
                .map(|p| SocketAddr::new(p.ipv4.into(), HTTP_PORT).to_string())
                .collect();
            let spread = |requests: u64| -> Result<Counts> {
                b.run_in(
                    &b.lane(*mode).client,
                    &["spread", &targets.join(","), &requests.to_string()],
                    Duration::from_secs(600),
                )
            };
            // In node mode a new pod answers in plaintext until both agents
            // have read the workloads file, and a connection the client's
            // agent still passes through is refused once the server's agent
            // has taken the pod in. An inbound allow decision for a pod in
            // its node's agent (a connection through the tunnel, so the
            // client's agent has it too) says both have, and its SVID is
            // there.
            let in_mesh = || {
                if *mode != Mode::Node {
                    return true;
                }
                let served: Vec<Vec<serde_json::Value>> = b
                    .agents
                    .iter()
                    .map(|a| a.audit_decisions("inbound"))
                    .collect();
                mode_pods.iter().all(|p| {
                    let ip = p.ipv4.to_string();
                    served[p.node].iter().any(|r| allowed_inbound_to(r, &ip))
                })
            };
            // Every pod answers once before the measurement: the pods added
            // in bulk are enrolled and their tunnels are up.
            wait_until(Duration::from_secs(120), || {
                Ok(spread(targets.len() as u64)?.errors == 0 && in_mesh())
            })
            .context("the scaled pods never all answered through the mesh")?;
            let cpu = b.data_plane_cpu(*mode)?;
            let counts = spread(cfg.scale_requests)?;
            let cpu = b.data_plane_cpu(*mode)? - cpu;
            rec.record(
                format!("{key}.cpu_s_per_1k"),
                "CPU s",
                cpu * 1000.0 / counts.requests.max(1) as f64,
            );
            rec.record_counts(&key, "requests", counts);
            let rss = b.data_plane_rss_kib(*mode)?;
            rec.record(format!("{key}.memory_mib"), "MiB", rss as f64 / 1024.0);
            rec.record(
                format!("{key}.processes"),
                "processes",
                b.data_plane(*mode).len() as f64,
            );
            if *mode == Mode::Node {
                node_points.push(((per_node * 2) as f64, rss as f64));
            }
            println!(
                "  scale {per_node}/node {m}: {:.1} MiB, {:.3} CPU s per 1k requests, first served after {first_served_ms:.0} ms",
                rss as f64 / 1024.0,
                cpu * 1000.0 / counts.requests.max(1) as f64,
            );
        }
    }
    let (slope, _) = linear_fit(&node_points);
    rec.record("scale.node.slope_kib_per_pod", "KiB/pod", slope);
    Ok(())
}

/// When `pod` first served a request through the data plane of `mode`, µs
/// since the epoch. In node mode a new pod answers in plaintext until the
/// agents take it in, so an answer alone does not say the mesh carried it:
/// the client dials until the pod's node agent has an inbound allow
/// decision for it, and the time is that decision's (the first one).
fn first_served(b: &Bench, mode: Mode, pod: &Pod) -> Result<u64> {
    let addr = SocketAddr::new(pod.ipv4.into(), HTTP_PORT).to_string();
    let answered = || -> Result<FirstServed> {
        b.run_in(
            &b.lane(mode).client,
            &["first-served", &addr],
            Duration::from_secs(90),
        )
    };
    if mode != Mode::Node {
        return Ok(answered()?.at_unix_us);
    }
    let ip = pod.ipv4.to_string();
    let mut meshed_at = None;
    wait_until(Duration::from_secs(90), || {
        answered()?;
        meshed_at = b.agents[pod.node]
            .audit_decisions("inbound")
            .iter()
            .find(|r| allowed_inbound_to(r, &ip))
            .map(|r| audit_time_unix_us(&r["time"]))
            .transpose()?;
        Ok(meshed_at.is_some())
    })
    .with_context(|| format!("{addr} was never served through the node agents"))?;
    Ok(meshed_at.unwrap_or_default())
}

/// Whether an audit record is an inbound connection to `ip` the agent
/// allowed (one that came through the tunnel).
fn allowed_inbound_to(record: &serde_json::Value, ip: &str) -> bool {
    record["decision"] == "allow" && record["destination"]["address"] == ip
}

/// An audit record's RFC 3339 `time` as µs since the epoch.
fn audit_time_unix_us(time: &serde_json::Value) -> Result<u64> {
    let text = time.as_str().context("audit record without a time")?;
    let at = OffsetDateTime::parse(text, &Rfc3339)
        .with_context(|| format!("audit record time {text:?} is not RFC 3339"))?;
    u64::try_from(at.unix_timestamp_nanos() / 1000)
        .with_context(|| format!("audit record time {text:?} is before the epoch"))
}
