//! The agent's Kubernetes workload source end to end: a real API server
//! (tests/src/control_plane.rs), two simulated nodes whose pods the testbed
//! runs as kubelet would (tests/src/kube_pods.rs), agents started with a
//! least-privilege service-account token (the Helm chart's RBAC), and
//! `ambit ca` issuing SVIDs from its directory file. Enrollment follows
//! labels set with kubectl, verified on the wire between the nodes.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ambit_testbed::{
    ControlPlane, Host, Pod, Testbed, WorkloadEntry,
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
fn echo(tb: &Testbed, from: &dyn Host, to: &Pod, marker: &str) -> Result<bool> {
    ambit_testbed::kube_ca::echo(tb, from, to, ECHO, marker)
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
        .map(|pod| WorkloadEntry::enrolled(pod).in_namespace(&ns))
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

/// The kubelet's tcpSocket probe: true when a TCP connect from `from` to
/// `to`:`port` succeeds (then it closes, sending nothing).
fn tcp_probe(tb: &Testbed, from: &dyn Host, to: &Pod, port: u16) -> Result<bool> {
    let connect = format!("exec 3<>/dev/tcp/{}/{port}", to.ipv4);
    Ok(tb
        .run_within(from, &["bash", "-c", &connect], secs(10))?
        .status
        .success())
}

/// `curl` of `path` on `to`:`port` from `from`, with extra curl `args`;
/// `Some(body)` when a response came, `None` when the connection failed.
fn http_get(
    tb: &Testbed,
    from: &dyn Host,
    to: IpAddr,
    port: u16,
    path: &str,
    args: &[&str],
) -> Result<Option<String>> {
    let url = format!("http://{}{path}", SocketAddr::new(to, port));
    let mut all = vec!["curl", "-sS", "--fail", "--max-time", "10"];
    all.extend_from_slice(args);
    all.push(&url);
    let out = tb.run(from, &all)?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[test]
fn kubelet_probes_reach_a_strict_pod_from_its_node_and_nothing_else_does() -> Result<()> {
    const HTTP: u16 = 8080;
    const UNPROBED: u16 = 9001;
    let cp = ControlPlane::start()?;
    let kubeconfig = agent_kubeconfig(&cp)?;
    let ns = cp.namespace("probes")?;
    label(&cp, &["namespace", &ns, &format!("{MESH}=enabled")])?;

    let mut tb = Testbed::new(2)?;
    let web = tb.add_pod(0, "web")?;
    let outsider = tb.add_pod(0, "outsider")?;
    let http_pid = tb.http_server(&web, "web-http", HTTP, "ready")?;
    std::fs::write(tb.dir.path().join("web-http-www/private.txt"), "private")?;
    let echo_pid = tb.echo_server(&web, "web-echo", ECHO)?;
    tb.echo_server(&web, "web-unprobed", UNPROBED)?;
    // A strict pod (the default) with an httpGet readiness probe on a named
    // port and a tcpSocket liveness probe, as a Deployment would declare.
    let probed = kube_pod(&web, &tb, "web").container(serde_json::json!({
        "ports": [{"name": "http", "containerPort": HTTP}],
        "readinessProbe": {"httpGet": {"port": "http", "path": "/index.txt"}},
        "livenessProbe": {"tcpSocket": {"port": ECHO}},
    }));
    tb.run_kube_pod(&cp, &ns, &web, &probed)?;
    let outside = kube_pod(&outsider, &tb, "outsider").label(MESH, "disabled");
    tb.run_kube_pod(&cp, &ns, &outsider, &outside)?;
    let agent = tb.start_kubernetes_agent(0, &cp, &kubeconfig)?;
    wait_for_workload(
        &agent,
        "workload enrolled",
        &format!("{ns}/web"),
        1,
        secs(20),
    )?;
    let (node, other_node) = (tb.node(0).clone(), tb.node(1).clone());

    // The kubelet's probes, from the node's network namespace: the httpGet
    // path answers over both families, the tcpSocket connect reaches the
    // application itself (it echoes).
    for ip in [IpAddr::from(web.ipv4), IpAddr::from(web.ipv6)] {
        let body = http_get(&tb, &node, ip, HTTP, "/index.txt", &[])?;
        ensure!(body.as_deref() == Some("ready"), "probe via {ip}: {body:?}");
    }
    ensure!(tcp_probe(&tb, &node, &web, ECHO)?, "tcpSocket probe failed");
    // A dual-stack socket dialling the IPv4 address (as Java clients do).
    let mapped = format!(
        "import socket; s = socket.socket(socket.AF_INET6); s.settimeout(5); \
         s.connect(('::ffff:{}', {ECHO})); s.sendall(b'mapped'); print(s.recv(6).decode())",
        web.ipv4
    );
    let out = tb.run(&node, &["python3", "-c", &mapped])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "mapped",
        "a dual-stack socket's tcpSocket probe: {}",
        ambit_testbed::stderr(&out)
    );
    // The two probe ports, with their kinds, as the kernel holds them (gRPC
    // probes are not in the test API server's 1.20 API: unit tests only).
    ensure!(agent.map_entries("AMBIT_PROBE_PORTS")? == 2);
    ensure!(
        echo(&tb, &node, &web, "node-probe-port")?,
        "the application did not answer the node on the tcpSocket port"
    );

    // Anything else from the node is plaintext to a strict pod: refused.
    let web4 = IpAddr::from(web.ipv4);
    for (path, args) in [
        ("/private.txt", &[][..]),
        ("/index.txt", &["-X", "POST"][..]),
        ("/index.txt", &["--data", "x"][..]),
    ] {
        let body = http_get(&tb, &node, web4, HTTP, path, args)?;
        ensure!(body.is_none(), "the node got {path} {args:?}: {body:?}");
    }
    ensure!(
        !ambit_testbed::kube_ca::echo(&tb, &node, &web, UNPROBED, "node-unprobed")?,
        "the node reached a port no probe declares"
    );

    // The probe ports from anywhere but the node: refused.
    for (source, what) in [
        (&outsider as &dyn Host, "another pod"),
        (&other_node, "another node"),
    ] {
        let body = http_get(&tb, source, web4, HTTP, "/index.txt", &[])?;
        ensure!(body.is_none(), "{what} read the probe path: {body:?}");
        ensure!(
            !echo(&tb, source, &web, "elsewhere")?,
            "{what} reached the tcpSocket probe port"
        );
    }

    // A pod forging the node's address, its answers routed back to it (the
    // ARP poisoning CAP_NET_RAW allows, set here as a static neighbour):
    // the handshake completes, but no connect on the node was recorded, so
    // the agent takes the connection and refuses it.
    let [a, b, c, _] = web.ipv4.octets();
    let node_ip = std::net::Ipv4Addr::new(a, b, c, 1); // the pods' gateway
    let link = tb.run(&outsider, &["ip", "-br", "link", "show", "eth0"])?;
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    let mac = link.split_whitespace().nth(2).context("no MAC")?.to_owned();
    let spoof = format!("{node_ip}/32");
    let run_ok = |host: &dyn Host, args: &[&str]| -> Result<()> {
        let out = tb.run(host, args)?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            ambit_testbed::stderr(&out)
        );
        Ok(())
    };
    run_ok(&outsider, &["ip", "addr", "add", &spoof, "dev", "eth0"])?;
    let node_text = node_ip.to_string();
    run_ok(
        &web,
        &[
            "ip",
            "neigh",
            "replace",
            &node_text,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    let forged = tb.sh(
        &outsider,
        &format!(
            "echo forged | socat -t 3 - TCP:{}:{ECHO},bind={node_ip},connect-timeout=5",
            web.ipv4
        ),
    )?;
    run_ok(&outsider, &["ip", "addr", "del", &spoof, "dev", "eth0"])?;
    run_ok(&web, &["ip", "neigh", "del", &node_text, "dev", "eth0"])?;
    ensure!(
        !String::from_utf8_lossy(&forged.stdout).contains("forged"),
        "a pod forging the node's address reached the tcpSocket probe port"
    );
    let from_forger = format!("{node_ip}:");
    wait_until(secs(10), || {
        Ok(agent.audit_records().iter().any(|r| {
            r["decision"] == "deny"
                && r["destination"]["port"] == ECHO
                && r["source"]["address"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&from_forger))
        }))
    })
    .with_context(|| {
        format!(
            "no refusal of the forged connection: {:#?}",
            agent.audit_records()
        )
    })?;

    // Audited: the probes allowed with their reason, the other path denied.
    let workload = format!("{ns}/web");
    wait_until(secs(10), || {
        let records = agent.audit_records();
        let probe = records.iter().any(|r| {
            r["reason"] == "kubelet_probe"
                && r["decision"] == "allow"
                && r["destination"]["workload"] == workload.as_str()
                && r["destination"]["port"] == HTTP
        });
        let refused = records.iter().any(|r| {
            r["decision"] == "deny"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("not a kubelet probe: GET /private.txt"))
        });
        Ok(probe && refused)
    })
    .with_context(|| format!("audit: {:#?}", agent.audit_records()))?;

    // The probes reflect the application's health: with no listener, the
    // tcpSocket connect fails and the httpGet probe gets no answer.
    for pid in [echo_pid, http_pid] {
        // SAFETY: kill(2) of a server this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for port in [ECHO, HTTP] {
        let filter = format!("sport = :{port}");
        wait_until(secs(10), || {
            Ok(tb.run(&web, &["ss", "-Hltn", &filter])?.stdout.is_empty())
        })?;
    }
    ensure!(
        !tcp_probe(&tb, &node, &web, ECHO)?,
        "the tcpSocket probe succeeded with the application down"
    );
    let body = http_get(&tb, &node, web4, HTTP, "/index.txt", &[])?;
    ensure!(
        body.is_none(),
        "the httpGet probe succeeded with the application down: {body:?}"
    );
    Ok(())
}
