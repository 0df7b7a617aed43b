//! The pod start latency ambit-cni adds, and the agent's footprint: one
//! node, a real API server, the agent in Kubernetes mode, and 100 pods of an
//! enrolled namespace added one after another through bridge + host-local +
//! ambit-cni exactly as a runtime calls the chain. Prints the ADD latencies
//! of ambit-cni alone (p50/p99/max; each one waits until the pod is captured
//! and its SVID ready) and of the whole chain, then the agent's RSS and
//! thread count with the 100 pods enrolled, as one JSON object.
//!
//! `cargo run -p ambit-benches --bin cni-bench` as root, after
//! `cargo build -p ambit-agent -p ambit-cni` (or AMBIT_BIN / AMBIT_CNI_BIN
//! naming release builds) and `cargo xtask setup` (the API server).

use std::{net::IpAddr, time::Duration};

use ambit_testbed::{ControlPlane, KubePod, Testbed, cni_chain::CniChain, cni_chain::k8s_args};
use anyhow::{Context, Result, ensure};
use serde_json::json;

const PODS: usize = 100;

fn main() -> Result<()> {
    let cp = ControlPlane::start()?;
    let ns = cp.namespace("cni-bench")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, "ambit.dev/mesh=enabled"])?;
    let tb = Testbed::new(1)?;
    // The agent runs as the chart's ServiceAccount (RBAC and CRD installed).
    let agent_kubeconfig = ambit_testbed::kube_pods::agent_kubeconfig(&cp)?;
    let agent = tb.start_kubernetes_agent(0, &cp, &agent_kubeconfig)?;
    let chain = CniChain::new(&tb)?;
    let socket = tb.cni_socket(0).display().to_string();
    let kubeconfig = cp.kubeconfig.display().to_string();
    let install = chain.install(&["--agent-socket", &socket, "--kubeconfig", &kubeconfig])?;
    ensure!(install.status.success(), "install: {}", install.stderr);
    let idle = footprint(agent.pid)?;

    let mut sandboxes = Vec::with_capacity(PODS);
    let (mut plugin, mut whole) = (Vec::new(), Vec::new());
    for i in 0..PODS {
        let name = format!("p{i}");
        let pod = KubePod::new(&name, "node0", "app", IpAddr::V4(tb.node(0).link_ipv4));
        let uid = cp.create_pod(&ns, &pod)?;
        let netns = chain.sandbox()?;
        let runs = chain.add_in(
            &netns.name,
            &format!("{name}-sandbox"),
            &k8s_args(&ns, &name, &uid),
        )?;
        ensure!(
            runs.len() == 2 && runs.iter().all(|r| r.status.success()),
            "ADD of {name} failed: {runs:#?}"
        );
        plugin.push(runs[1].elapsed);
        whole.push(runs.iter().map(|r| r.elapsed).sum::<Duration>());
        sandboxes.push(netns);
    }
    // Log lines reach the file a moment after the ADD they belong to.
    agent
        .wait_for_records("workload enrolled", PODS, Duration::from_secs(10))
        .context("not every pod was enrolled")?;
    let loaded = footprint(agent.pid)?;
    let summary = json!({
        "pods": PODS,
        "ambit_cni_add_ms": percentiles(&mut plugin),
        "chain_add_ms": percentiles(&mut whole),
        "agent_idle": idle,
        "agent_with_pods": loaded,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1000.0
    };
    json!({"p50": at(0.50), "p99": at(0.99), "max": at(1.0)})
}

/// VmRSS (KiB) and thread count of `pid`.
fn footprint(pid: u32) -> Result<serde_json::Value> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(json!({"rss_kib": field("VmRSS:")?, "threads": field("Threads:")?}))
}
