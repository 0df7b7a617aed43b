//! The agent's end of `ambit-cni` end to end: a real API server, real
//! agents on two simulated nodes (`ambit ca` issuing SVIDs), and the plugin
//! chained after Debian's bridge + host-local, exec'd as a runtime does for
//! pods whose Pod object is Pending without addresses, as the kubelet has
//! it at ADD time. Node 1 runs the echo server every pod talks to; what
//! crosses the link between the nodes is captured.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use ambit_testbed::{
    ControlPlane, KubePod, Pod, Testbed, WorkloadEntry,
    agent::Agent,
    cni_chain::{CniChain, PluginRun, SUBNET, SandboxNetns, k8s_args},
    exec::host_cmd,
    kube_pods::{Sandbox, agent_kubeconfig, kube_pod},
    wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const ECHO: u16 = 9000;
const MESH: &str = "ambit.dev/mesh";
/// The service account of every pod started through CNI.
const CNI_SA: &str = "app";
/// ambit-cni's error code for an enrolled pod while the agent is down.
const ENROLLED_AGENT_DOWN: u64 = 102;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Two nodes, the mesh enabled in `ns`, the echo server `server` on node 1
/// (a Kubernetes pod found through /proc), agents on both nodes, and
/// ambit-cni chained into node 0's bridge + host-local config.
struct CniMesh {
    cp: &'static ControlPlane,
    ns: String,
    server: Pod,
    agent0: Agent,
    /// The agents' credentials: the chart's ServiceAccount.
    agent_kubeconfig: PathBuf,
    _agent1: Agent,
    _ca: Agent,
    chain: CniChain,
    tb: Testbed,
}

/// A pod started through the CNI chain on node 0.
struct CniPod {
    name: String,
    namespace: String,
    uid: String,
    /// Its processes' place: its netns, kubelet's cgroup for it.
    place: Sandbox,
    netns: SandboxNetns,
}

impl CniPod {
    fn args(&self) -> String {
        k8s_args(&self.namespace, &self.name, &self.uid)
    }

    fn container_id(&self) -> String {
        format!("{}-sandbox", self.name)
    }
}

fn entry(pod: &Pod, ns: &str, service_account: &str) -> WorkloadEntry {
    WorkloadEntry::enrolled(pod)
        .with_service_account(service_account)
        .in_namespace(ns)
}

/// `predating`: pods of node 0 that run (sandbox process in their cgroup,
/// Running in the API) before the agent and the plugin are installed.
fn cni_mesh(prefix: &str, predating: &[&str]) -> Result<(CniMesh, Vec<Pod>)> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace(prefix)?;
    cp.kubectl
        .run(&["label", "namespace", &ns, &format!("{MESH}=enabled")])?;
    let mut tb = Testbed::new(2)?;
    let server = tb.add_pod(1, "b")?;
    let old = predating
        .iter()
        .map(|name| tb.add_pod(0, name))
        .collect::<Result<Vec<_>>>()?;
    tb.echo_server(&server, "echo-b", ECHO)?;
    // Node 1 routes the chain's pod subnet to node 0, as a pod network does.
    let node0 = tb.node(0).link_ipv4.to_string();
    host_cmd(
        "ip",
        &[
            "-n",
            &tb.node(1).netns,
            "route",
            "add",
            SUBNET,
            "via",
            &node0,
        ],
    )?;
    // The CA's directory authorises the CNI pods' service account on node 0.
    let cni_pods = Pod {
        name: "cni-pods".into(),
        node: 0,
        netns: String::new(),
        cgroup: PathBuf::new(),
        ipv4: Ipv4Addr::new(198, 18, 240, 254),
        ipv6: Ipv6Addr::LOCALHOST,
    };
    let mut entries = vec![entry(&server, &ns, "b"), entry(&cni_pods, &ns, CNI_SA)];
    entries.extend(old.iter().map(|pod| entry(pod, &ns, &pod.name)));
    let ca = tb.start_ca(&entries, 3600)?;
    tb.run_kube_pod(cp, &ns, &server, &kube_pod(&server, &tb, "b"))?;
    for pod in &old {
        tb.run_kube_pod(cp, &ns, pod, &kube_pod(pod, &tb, &pod.name))?;
    }
    // The agents run as the chart's ServiceAccount (RBAC and CRD installed).
    let agent_kubeconfig = agent_kubeconfig(cp)?;
    let agent1 = tb.start_kubernetes_agent(1, cp, &agent_kubeconfig)?;
    let agent0 = tb.start_kubernetes_agent(0, cp, &agent_kubeconfig)?;
    let chain = CniChain::new(&tb)?;
    let socket = tb.cni_socket(0).display().to_string();
    let kubeconfig = cp.kubeconfig.display().to_string();
    let install = chain.install(&[
        "--agent-socket",
        &socket,
        "--kubeconfig",
        &kubeconfig,
        "--timeout-ms",
        "20000",
    ])?;
    ensure!(install.status.success(), "install: {}", install.stderr);
    let mesh = CniMesh {
        cp,
        ns,
        server,
        agent0,
        agent_kubeconfig,
        _agent1: agent1,
        _ca: ca,
        chain,
        tb,
    };
    Ok((mesh, old))
}

impl CniMesh {
    /// The Pod object (Pending, no addresses) and a sandbox netns, as the
    /// kubelet has them when it calls the runtime's CNI ADD.
    fn new_pod(&self, namespace: &str, name: &str) -> Result<CniPod> {
        let kube = KubePod::new(name, "node0", CNI_SA, IpAddr::V4(self.tb.node(0).link_ipv4));
        let uid = self.cp.create_pod(namespace, &kube)?;
        let netns = self.chain.sandbox()?;
        let place = Sandbox::kubelet(&self.tb, 0, &uid, &netns.name, name)?;
        Ok(CniPod {
            name: name.into(),
            namespace: namespace.into(),
            uid,
            place,
            netns,
        })
    }

    fn add(&self, pod: &CniPod) -> Result<Vec<PluginRun>> {
        self.chain
            .add_in(&pod.netns.name, &pod.container_id(), &pod.args())
    }

    fn del(&self, pod: &CniPod) -> Result<()> {
        let runs = self
            .chain
            .del_in(&pod.netns.name, &pod.container_id(), &pod.args())?;
        ensure!(
            runs.iter().all(|r| r.status.success()),
            "DEL failed: {runs:#?}"
        );
        Ok(())
    }

    /// One connection from `from` to the echo server on node 1, no retry:
    /// whether `marker` came back.
    fn echo_once(&self, from: &dyn ambit_testbed::Host, marker: &str) -> Result<bool> {
        let out = self.tb.sh(
            from,
            &format!(
                "echo {marker} | socat -t 5 - TCP:{}:{ECHO},connect-timeout=5",
                self.server.ipv4
            ),
        )?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == marker)
    }

    fn record_file(&self, pod: &CniPod) -> PathBuf {
        self.tb
            .state_dir(0)
            .join("pods")
            .join(format!("{}.json", pod.uid))
    }
}

/// Bridge then ambit-cni both succeeded; returns the bridge's result.
fn added(runs: &[PluginRun]) -> Result<Value> {
    ensure!(
        runs.len() == 2 && runs.iter().all(|r| r.status.success()),
        "ADD through bridge + ambit-cni failed: {runs:#?}"
    );
    let bridge = runs[0].json()?;
    ensure!(runs[1].json()? == bridge, "ambit-cni changed the result");
    Ok(bridge)
}

fn first_ip(bridge: &Value) -> String {
    let cidr = bridge["ips"][0]["address"].as_str().unwrap_or_default();
    cidr.split('/').next().unwrap_or_default().to_string()
}

#[test]
fn a_pod_added_through_cni_is_tunnelled_from_its_first_connection_and_older_pods_at_start()
-> Result<()> {
    let (mesh, old) = cni_mesh("cni-agent", &["old"])?;
    let tb = &mesh.tb;

    // A pod that predates the plugin (a process in its cgroup, no CNI
    // record) is captured by the agent at start, found through /proc.
    let capture = tb.capture_link("predating")?;
    wait_until(secs(30), || mesh.echo_once(&old[0], "predating-7d1e")).with_context(|| {
        format!(
            "the predating pod never reached the server:\n{}",
            mesh.agent0.raw_log()
        )
    })?;
    ensure!(
        !capture.saw_in_clear(tb, "predating-7d1e")?,
        "the predating pod's traffic crossed in clear:\n{}",
        mesh.agent0.raw_log()
    );

    // ADD returns only once the pod is captured: its app's very first
    // connection is tunnelled.
    let capture = tb.capture_link("first")?;
    let web = mesh.new_pod(&mesh.ns, "web")?;
    let runs = mesh.add(&web)?;
    let bridge = added(&runs)?;
    ensure!(
        mesh.echo_once(&web.place, "first-conn-4b2a")?,
        "the first connection after ADD failed: {runs:#?}\n{}",
        mesh.agent0.raw_log()
    );
    ensure!(
        !capture.saw_in_clear(tb, "first-conn-4b2a")?,
        "the first connection crossed in clear"
    );
    eprintln!("ambit-cni ADD took {:?}", runs[1].elapsed);

    // The agent recorded the ADD on the node.
    let record: Value = serde_json::from_slice(&std::fs::read(mesh.record_file(&web))?)?;
    ensure!(
        record["netns"] == web.netns.path().as_str()
            && record["ips"][0] == first_ip(&bridge).as_str()
            && record["namespace"] == mesh.ns.as_str(),
        "record {record}"
    );

    // CHECK passes while the pod is captured.
    let checks = mesh
        .chain
        .check_in(&web.netns.name, &web.container_id(), &web.args(), &bridge)?;
    ensure!(
        checks.len() == 2 && checks.iter().all(|r| r.status.success()),
        "CHECK of a captured pod failed: {checks:#?}"
    );
    let id = format!("{}/web", mesh.ns);
    ensure!(
        mesh.agent0
            .records("CNI request done")
            .iter()
            .any(|r| r["pod"] == id.as_str() && r["command"] == "Check" && r["status"] == "Ok"),
        "the agent did not answer the CHECK"
    );

    // DEL releases the pod and its record, twice as well as once.
    mesh.del(&web)?;
    wait_until(secs(20), || {
        Ok(mesh
            .agent0
            .records("workload unenrolled")
            .iter()
            .any(|r| r["workload"] == id.as_str()))
    })
    .context("DEL did not release the pod")?;
    ensure!(!mesh.record_file(&web).exists(), "the record outlived DEL");
    mesh.del(&web)?;
    Ok(())
}

/// Each pod's app: one connection a second, forever, each with its own
/// marker (prefix `rsmk-`), logging `ok N` or `fail N`.
fn client_loop(name: &str, server: &Pod) -> String {
    format!(
        "i=0; while :; do i=$((i+1)); m=rsmk-{name}-$i; \
         r=$(echo $m | socat -t 3 - TCP:{}:{ECHO},connect-timeout=3 2>/dev/null); \
         if [ \"$r\" = \"$m\" ]; then echo ok $i; else echo fail $i; fi; sleep 1; done",
        server.ipv4
    )
}

fn client_lines(tb: &Testbed, pod: &CniPod) -> Vec<String> {
    tb.stdout_of(&format!("client-{}", pod.name))
        .lines()
        .map(String::from)
        .collect()
}

/// Whether every pod's app logged `ok` after its first `from[i]` lines.
fn all_served_after(tb: &Testbed, pods: &[CniPod], from: &[usize]) -> bool {
    pods.iter().zip(from).all(|(pod, &n)| {
        client_lines(tb, pod)
            .iter()
            .skip(n)
            .any(|l| l.starts_with("ok"))
    })
}

#[test]
fn fifty_enrolled_pods_stay_captured_through_an_agent_sigkill_and_a_pod_added_meanwhile_waits_for_it()
-> Result<()> {
    let (mesh, _) = cni_mesh("cni-restart", &[])?;
    let tb = &mesh.tb;
    let plain_ns = mesh.cp.namespace("cni-restart-plain")?;
    let capture = tb.capture_link("restart")?;

    let mut pods = Vec::new();
    for i in 0..50 {
        let pod = mesh.new_pod(&mesh.ns, &format!("p{i}"))?;
        added(&mesh.add(&pod)?).with_context(|| format!("pod p{i}"))?;
        tb.spawn(
            &pod.place,
            &format!("client-{}", pod.name),
            &["sh", "-c", &client_loop(&pod.name, &mesh.server)],
        )?;
        pods.push(pod);
    }
    let none = vec![0; pods.len()];
    wait_until(secs(60), || Ok(all_served_after(tb, &pods, &none)))
        .context("not every pod was served before the restart")?;

    mesh.agent0.stop_with(libc::SIGKILL)?;
    let at_kill: Vec<usize> = pods.iter().map(|p| client_lines(tb, p).len()).collect();

    // The agent is down: ADD fails for an enrolled pod (the kubelet will
    // retry) and passes a pod outside the mesh.
    let late = mesh.new_pod(&mesh.ns, "late")?;
    let runs = mesh.add(&late)?;
    ensure!(
        runs.len() == 2 && runs[0].status.success() && !runs[1].status.success(),
        "ADD of an enrolled pod while the agent is down: {runs:#?}"
    );
    let code = runs[1].json()?["code"].as_u64();
    ensure!(code == Some(ENROLLED_AGENT_DOWN), "{runs:#?}");
    mesh.del(&late)?;
    let plain = mesh.new_pod(&plain_ns, "plain")?;
    added(&mesh.add(&plain)?).context("a pod outside the mesh while the agent is down")?;

    // Every app kept connecting while the agent was down (and none of it
    // went out in clear: checked on the capture below).
    wait_until(secs(30), || {
        Ok(pods
            .iter()
            .zip(&at_kill)
            .all(|(p, &n)| client_lines(tb, p).len() > n + 1))
    })
    .context("the apps stopped trying while the agent was down")?;

    let agent0 = tb.restart_kubernetes_agent(0, &mesh.agent_kubeconfig)?;
    let at_restart: Vec<usize> = pods.iter().map(|p| client_lines(tb, p).len()).collect();

    // The kubelet retries the failed sandbox (DEL, then ADD) until it
    // starts; the pod is then captured from its first connection.
    let mut attempts = 0;
    wait_until(secs(60), || {
        attempts += 1;
        let runs = mesh.add(&late)?;
        if runs.iter().all(|r| r.status.success()) {
            return Ok(true);
        }
        mesh.del(&late)?;
        Ok(false)
    })
    .with_context(|| format!("the late pod never started:\n{}", agent0.raw_log()))?;
    ensure!(
        mesh.echo_once(&late.place, "late-first-9c0d")?,
        "the late pod's first connection failed"
    );
    eprintln!("late pod started after {attempts} ADD attempts with the agent back");

    wait_until(secs(90), || Ok(all_served_after(tb, &pods, &at_restart)))
        .with_context(|| format!("not every pod is served again:\n{}", agent0.raw_log()))?;
    let failures: usize = pods
        .iter()
        .map(|p| {
            client_lines(tb, p)
                .iter()
                .filter(|l| l.starts_with("fail"))
                .count()
        })
        .sum();
    eprintln!("connections refused during the restart, all pods: {failures}");

    let pcap = capture.stop(tb)?;
    ensure!(
        !pcap.windows(5).any(|w| w == b"rsmk-") && !pcap.windows(9).any(|w| w == b"late-firs"),
        "a marker crossed the link in clear"
    );
    Ok(())
}
