//! What the agent's Kubernetes view costs as the cluster grows: one
//! simulated node whose agent watches a real API server, measured idle, with
//! `REMOTE` enrolled pods on other nodes (Pod objects only: the agent keeps
//! each one's addresses and service account, the identity expected there),
//! and then with `LOCAL` enrolled pods on its own node as well (real
//! network-namespace pods, captured).
//!
//! `kube-scale [LOCAL] [REMOTE]` (defaults 100 and 1000) prints one JSON
//! object: RSS and thread count of the agent at each stage.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use ambit_testbed::{
    ControlPlane, Testbed, agent::Agent, chart, control_plane::KubePod, kube_pods::kube_pod,
    procfs, wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

const MESH_LABEL: &str = "ambit.dev/mesh=enabled";
/// Namespaces the remote pods are spread over.
const REMOTE_NAMESPACES: usize = 10;
/// Nodes the remote pods are "scheduled" on (none of them simulated).
const REMOTE_NODES: usize = 20;
/// Parallel kubectl calls while writing pod statuses.
const WRITERS: usize = 8;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let local: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let remote: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let cp = ControlPlane::start()?;
    let mut tb = Testbed::new(1)?;
    // The agent reads the cluster as the chart's ServiceAccount, as deployed.
    let kubeconfig = cp.chart_kubeconfig(chart::AGENT_SERVICE_ACCOUNT)?;
    let agent = tb.start_kubernetes_agent(0, &cp, &kubeconfig)?;
    settle();
    let idle = usage(&agent)?;

    let started = Instant::now();
    create_remote_pods(&cp, remote)?;
    let expected = remote * 2;
    wait_until(Duration::from_secs(300), || {
        Ok(agent.metric(&tb, "ambit_mesh_destinations")? as usize >= expected)
    })
    .context("the agent never learnt every remote pod")?;
    eprintln!(
        "{remote} remote pods created and known in {:?}",
        started.elapsed()
    );
    settle();
    let with_remote = usage(&agent)?;

    let ns = cp.namespace("scale-local")?;
    cp.kubectl.run(&["label", "namespace", &ns, MESH_LABEL])?;
    let started = Instant::now();
    for i in 0..local {
        let name = format!("local-{i}");
        let pod = tb.add_pod(0, &name)?;
        tb.run_kube_pod(&cp, &ns, &pod, &kube_pod(&pod, &tb, "default"))?;
    }
    wait_until(Duration::from_secs(300), || {
        Ok(agent.metric(&tb, "ambit_enrolled_workloads")? as usize == local)
    })
    .context("the agent never enrolled every local pod")?;
    eprintln!(
        "{local} local pods run and enrolled in {:?}",
        started.elapsed()
    );
    settle();
    let with_local = usage(&agent)?;
    ensure!(!agent.has_exited(), "the agent exited");

    let report = json!({
        "local_pods": local,
        "remote_pods": remote,
        "idle": idle,
        "with_remote_pods": with_remote,
        "with_local_pods_too": with_local,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Lets allocations from the last burst of events settle before reading.
fn settle() {
    std::thread::sleep(Duration::from_secs(5));
}

fn usage(agent: &Agent) -> Result<Value> {
    Ok(json!({
        "rss_kib": procfs::rss_kib(agent.pid)?,
        "threads": procfs::threads(agent.pid)?,
        "fds": procfs::fd_count(agent.pid)?,
    }))
}

/// Creates `count` Running, enrolled Pod objects on nodes nobody simulates,
/// with addresses from 198.18.192.0/18 and fd00:a5b1:ff00::/64 that no
/// traffic is ever sent to.
fn create_remote_pods(cp: &ControlPlane, count: usize) -> Result<()> {
    let namespaces: Vec<String> = (0..REMOTE_NAMESPACES)
        .map(|i| {
            let ns = cp.namespace(&format!("scale-remote-{i}"))?;
            cp.kubectl.run(&["label", "namespace", &ns, MESH_LABEL])?;
            Ok(ns)
        })
        .collect::<Result<_>>()?;
    let pods: Vec<(String, KubePod)> = (0..count)
        .map(|i| {
            let n = u16::try_from(i).expect("fewer than 65536 remote pods");
            let v4 = Ipv4Addr::new(198, 18, 192 + (n >> 8) as u8, (n & 0xff) as u8);
            let v6 = Ipv6Addr::new(0xfd00, 0xa5b1, 0xff00, 0, 0, 0, 0, n + 1);
            let pod = KubePod {
                labels: vec![("app".into(), format!("app-{}", i % 50))],
                ips: vec![v4.into(), v6.into()],
                ..KubePod::new(
                    &format!("remote-{i}"),
                    &format!("remote-node-{}", i % REMOTE_NODES),
                    &format!("sa-{}", i % 25),
                    IpAddr::V4(Ipv4Addr::new(198, 18, 250, (i % REMOTE_NODES) as u8)),
                )
            };
            (namespaces[i % REMOTE_NAMESPACES].clone(), pod)
        })
        .collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WRITERS)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while let Some((ns, pod)) = pods.get(next.fetch_add(1, Ordering::Relaxed)) {
                        cp.run_pod(ns, pod)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a pod writer panicked"))
    })
}
