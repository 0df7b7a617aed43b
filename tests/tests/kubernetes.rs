//! The agent's Kubernetes workload source end to end: a real API server
//! (tests/src/control_plane.rs), two simulated nodes whose pods the testbed
//! runs as kubelet would (tests/src/kube_pods.rs), agents started with a
//! least-privilege service-account token (the Helm chart's RBAC), and
//! `ambit ca` issuing SVIDs from its directory file. Enrollment follows
//! labels set with kubectl, verified on the wire between the nodes.

use std::time::Duration;

use ambit_testbed::{
    ControlPlane, Pod, Testbed, WorkloadEntry,
    agent::Agent,
    kube_pods::{agent_kubeconfig, kube_pod},
    wait_until,
};
use anyhow::{Context, Result, ensure};

const ECHO: u16 = 9000;
const MESH: &str = "ambit.dev/mesh";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Sends `marker` from `from` to the echo server on `to`; true when it
/// came back.
fn echo(tb: &Testbed, from: &Pod, to: &Pod, marker: &str) -> Result<bool> {
    let out = tb.sh(
        from,
        &format!(
            "echo {marker} | socat -t 5 - TCP:{}:{ECHO},connect-timeout=5",
            to.ipv4
        ),
    )?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == marker)
}

/// Sends a fresh marker from `from` to `to` (retrying while capture and
/// SVIDs settle) with the link captured; returns whether it crossed in
/// clear.
fn crosses_in_clear(tb: &Testbed, from: &Pod, to: &Pod, step: &str) -> Result<bool> {
    let capture = tb.capture_link(&format!("link-{step}"))?;
    let marker = format!("marker-{step}-5c1e");
    wait_until(secs(30), || echo(tb, from, to, &marker))
        .with_context(|| format!("{step}: {} never reached {}", from.name, to.name))?;
    capture.saw_in_clear(tb, &marker)
}

/// Waits until `agent` logged `msg` for workload `id` (at least `count`
/// times in all).
fn wait_for_workload(
    agent: &Agent,
    msg: &str,
    id: &str,
    count: usize,
    timeout: Duration,
) -> Result<()> {
    wait_until(timeout, || {
        Ok(agent
            .records(msg)
            .iter()
            .filter(|r| r["workload"] == id)
            .count()
            >= count)
    })
    .with_context(|| {
        format!(
            "{} never logged {msg:?} for {id}:\n{}",
            agent.name,
            agent.raw_log()
        )
    })
}

fn label(cp: &ControlPlane, args: &[&str]) -> Result<()> {
    let mut all = vec!["label", "--overwrite"];
    all.extend_from_slice(args);
    cp.kubectl.run(&all)?;
    Ok(())
}

#[test]
fn namespace_and_pod_labels_enroll_pods_on_both_nodes_and_survive_an_api_outage() -> Result<()> {
    let cp = ControlPlane::start()?;
    let kubeconfig = agent_kubeconfig(&cp)?;
    let ns = cp.namespace("k8s-source")?;

    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let late = tb.add_pod(0, "late")?;
    let b = tb.add_pod(1, "b")?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    // The CA still reads its directory file: every pod that will run.
    let entries: Vec<WorkloadEntry> = [&a, &late, &b]
        .into_iter()
        .map(|pod| {
            let mut entry = WorkloadEntry::enrolled(pod);
            entry.namespace = ns.clone();
            entry
        })
        .collect();
    let _ca = tb.start_ca(&entries, 3600)?;
    tb.run_kube_pod(&cp, &ns, &a, &kube_pod(&a, &tb, "a"))?;
    tb.run_kube_pod(&cp, &ns, &b, &kube_pod(&b, &tb, "b"))?;
    let agent0 = tb.start_kubernetes_agent(0, &cp, &kubeconfig)?;
    let agent1 = tb.start_kubernetes_agent(1, &cp, &kubeconfig)?;
    for agent in [&agent0, &agent1] {
        // "agent ready" is logged after the initial sync.
        assert_eq!(agent.admin_get(&tb, "/readyz")?.0, "200");
    }
    let (id_a, id_b, id_late) = (format!("{ns}/a"), format!("{ns}/b"), format!("{ns}/late"));

    // Not labelled: not captured, plaintext between the nodes.
    assert!(crosses_in_clear(&tb, &a, &b, "unlabelled")?);

    // Labelling the namespace enrolls both pods, each on its own node.
    let labelled = std::time::Instant::now();
    label(&cp, &["namespace", &ns, &format!("{MESH}=enabled")])?;
    wait_for_workload(&agent0, "workload enrolled", &id_a, 1, secs(20))?;
    wait_for_workload(&agent1, "workload enrolled", &id_b, 1, secs(20))?;
    eprintln!(
        "namespace label to both pods enrolled: {:?}",
        labelled.elapsed()
    );
    assert!(!crosses_in_clear(&tb, &a, &b, "enrolled")?);

    // The server opts out: node 0 learns it from the cluster-wide view and
    // sends plaintext again.
    label(&cp, &["pod", "b", "-n", &ns, &format!("{MESH}=disabled")])?;
    wait_for_workload(&agent1, "workload unenrolled", &id_b, 1, secs(20))?;
    assert!(crosses_in_clear(&tb, &a, &b, "opted-out")?);
    cp.kubectl
        .run(&["label", "pod", "b", "-n", &ns, &format!("{MESH}-")])?;
    wait_for_workload(&agent1, "workload enrolled", &id_b, 2, secs(20))?;

    // A pod created later in the labelled namespace is enrolled.
    tb.run_kube_pod(&cp, &ns, &late, &kube_pod(&late, &tb, "late"))?;
    wait_for_workload(&agent0, "workload enrolled", &id_late, 1, secs(20))?;
    assert!(!crosses_in_clear(&tb, &late, &b, "late")?);

    // The API server stops for 30 s: the last known state keeps serving.
    cp.stop_api_server()?;
    let outage = std::time::Instant::now();
    let mut rounds = 0;
    while outage.elapsed() < secs(30) {
        let marker = format!("outage-{rounds}");
        ensure!(
            echo(&tb, &a, &b, &marker)?,
            "traffic stopped during the outage"
        );
        rounds += 1;
        std::thread::sleep(secs(3));
    }
    ensure!(
        !agent0.has_exited() && !agent1.has_exited(),
        "an agent exited"
    );
    assert!(!crosses_in_clear(&tb, &a, &b, "outage")?);
    cp.start_api_server()?;
    let restarted = std::time::Instant::now();

    // Restarted: the same agents resync; a change made now applies on both
    // nodes (node 0 sees it through its cluster-wide pod watch).
    label(&cp, &["pod", "b", "-n", &ns, &format!("{MESH}=disabled")])?;
    wait_for_workload(&agent1, "workload unenrolled", &id_b, 2, secs(90))?;
    assert!(crosses_in_clear(&tb, &a, &b, "after-restart")?);
    eprintln!(
        "API server ready to a label change applied on both nodes: {:?}",
        restarted.elapsed()
    );
    let metric = |agent: &Agent, name: &str, resource: &str| {
        agent.metric(&tb, &format!(r#"{name}{{resource="{resource}"}}"#))
    };
    let restarts = metric(&agent0, "ambit_kubernetes_watch_restarts_total", "pods")?;
    let errors = metric(
        &agent0,
        "ambit_kubernetes_watch_errors_total",
        "pods_on_node",
    )?;
    assert!(restarts >= 1.0, "restarts {restarts}");
    assert!(errors >= 1.0, "errors {errors}");
    for agent in [&agent0, &agent1] {
        ensure!(
            agent.records("agent ready").len() == 1 && !agent.has_exited(),
            "{} restarted",
            agent.name
        );
    }

    // A deleted pod leaves.
    cp.delete_pod(&ns, "late")?;
    wait_for_workload(&agent0, "workload unenrolled", &id_late, 1, secs(20))?;

    // Removing the namespace label returns every pod to plaintext.
    cp.kubectl
        .run(&["label", "pod", "b", "-n", &ns, &format!("{MESH}-")])?;
    wait_for_workload(&agent1, "workload enrolled", &id_b, 3, secs(20))?;
    label(&cp, &["namespace", &ns, &format!("{MESH}-")])?;
    wait_for_workload(&agent0, "workload unenrolled", &id_a, 1, secs(20))?;
    wait_for_workload(&agent1, "workload unenrolled", &id_b, 3, secs(20))?;
    assert!(crosses_in_clear(&tb, &a, &b, "unlabelled-again")?);

    for agent in [&agent0, &agent1] {
        eprintln!(
            "{}: VmRSS {} KiB after the test",
            agent.name,
            ambit_testbed::procfs::rss_kib(agent.pid)?
        );
    }
    Ok(())
}

/// `(body, status code)` of the agent's /readyz on `node` ("000": no answer).
fn readyz(tb: &Testbed, node: usize) -> Result<(String, String)> {
    let (code, body) = ambit_testbed::agent::admin_get(tb, tb.node(node), "/readyz")?;
    Ok((body, code))
}

#[test]
fn an_agent_started_while_the_api_server_is_down_is_not_ready_until_the_initial_sync() -> Result<()>
{
    let cp = ControlPlane::start()?;
    let kubeconfig = agent_kubeconfig(&cp)?;
    let tb = Testbed::new(1)?;
    tb.bridge_api_server(0, &cp)?;
    cp.stop_api_server()?;
    let agent = tb.spawn_kubernetes_agent(0, &kubeconfig)?;
    wait_until(secs(30), || {
        let (body, code) = readyz(&tb, 0)?;
        Ok(code == "503" && body.contains("waiting for the initial Kubernetes sync"))
    })
    .with_context(|| format!("/readyz never said it waits:\n{}", tb.stderr_of(&agent)))?;
    ensure!(
        !tb.stderr_of(&agent).contains("\"agent ready\""),
        "ready without the API server"
    );

    cp.start_api_server()?;
    // The watches retry at most about 20 s apart (10 s cap, jittered).
    wait_until(secs(90), || Ok(readyz(&tb, 0)?.1 == "200"))
        .with_context(|| format!("never ready:\n{}", tb.stderr_of(&agent)))?;
    let log = tb.stderr_of(&agent);
    ensure!(log.contains("\"initial Kubernetes sync done\""), "{log}");
    ensure!(log.contains("\"agent ready\""), "{log}");
    Ok(())
}
