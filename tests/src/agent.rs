//! Running the real `ambit` agent on a simulated node.

use std::{
    path::{Path, PathBuf},
    process::Child,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Pod, Testbed, exec, wait_until};

/// A pod as listed in the agent's workloads file.
#[derive(Clone, Debug)]
pub struct WorkloadEntry {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    pub enrolled: bool,
    /// Labelled `ambit.dev/mtls-mode: permissive` (plaintext allowed in).
    pub permissive: bool,
    /// Labels besides `app`, `ambit.dev/mesh` and the mTLS mode; an `app`
    /// here replaces the default (the pod's name).
    pub labels: Vec<(String, String)>,
    /// The network namespace to list instead of the pod's own (to show how
    /// the agent handles one it cannot open).
    pub netns_override: Option<PathBuf>,
    /// Served by its own `ambit sidecar` (`sidecar: true`), not the node agent.
    pub sidecar: bool,
}

impl WorkloadEntry {
    /// A pod labelled `ambit.dev/mesh: enabled`, service account = pod name.
    pub fn enrolled(pod: &Pod) -> Self {
        Self {
            pod: pod.clone(),
            namespace: "default".into(),
            service_account: pod.name.clone(),
            enrolled: true,
            permissive: false,
            labels: Vec::new(),
            netns_override: None,
            sidecar: false,
        }
    }

    /// The same pod in Kubernetes namespace `namespace`.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The same pod under service account `name`.
    pub fn with_service_account(mut self, name: &str) -> Self {
        self.service_account = name.into();
        self
    }

    /// The same pod with one more label (or `app` replaced).
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// A pod labelled `ambit.dev/mesh: disabled`.
    pub fn opted_out(pod: &Pod) -> Self {
        Self {
            enrolled: false,
            ..Self::enrolled(pod)
        }
    }
}

/// The `ambit` binary under test: $AMBIT_BIN, else the workspace's debug build.
pub fn agent_binary() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = match std::env::var_os("AMBIT_BIN") {
        Some(bin) => workspace.join(bin),
        None => workspace.join("target/debug/ambit"),
    };
    if !path.exists() {
        bail!(
            "agent binary {} not found: build it with `cargo build -p ambit-agent` \
             (or set AMBIT_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// Where the agent runs: its node's network namespace, in a cgroup below
/// the node's (so its own sockets meet the capture programs, as on a node).
/// A sidecar runs in its pod's namespace instead.
pub(crate) struct AgentPlace {
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
}

impl exec::Host for AgentPlace {
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> &Path {
        &self.cgroup
    }
    fn label(&self) -> &str {
        "agent"
    }
}

/// A running agent. Its JSON log is `<testbed dir>/<name>.err`.
pub struct Agent {
    pub name: String,
    pub pid: u32,
    pub log_path: PathBuf,
    pub workloads_file: PathBuf,
    pub bpf_pin_dir: PathBuf,
    /// The agent's hash-chained audit log.
    pub audit_log: PathBuf,
    /// The node it runs on (its admin server listens on 127.0.0.1 there).
    pub node: crate::Node,
    /// For a sidecar: the pod it serves, where it runs (and its admin
    /// server listens on 127.0.0.1).
    pub pod: Option<Pod>,
    pub(crate) children: Arc<Mutex<Vec<Child>>>,
}

impl Testbed {
    /// Writes `<dir>/workloads-n<node>.yaml` for the agent of `node`.
    pub fn write_workloads(&self, node: usize, entries: &[WorkloadEntry]) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("workloads-n{node}.yaml"));
        write_atomically(&path, &workloads_doc(&format!("node{node}"), entries))?;
        Ok(path)
    }

    /// Starts an agent on `node` for `entries` and waits until it is ready.
    pub fn start_agent(&self, node: usize, entries: &[WorkloadEntry]) -> Result<Agent> {
        self.write_workloads(node, entries)?;
        self.start_agent_with(node, &[])
    }

    /// Starts an agent on `node` with the node's current workloads file and
    /// extra `ambit run` arguments, and waits until it is ready.
    pub fn start_agent_with(&self, node: usize, extra: &[&str]) -> Result<Agent> {
        self.launch_agent(node, extra, None)
    }

    /// Like `start_agent_with`, with the agent's log filter (`AMBIT_LOG`).
    pub fn start_agent_logging(&self, node: usize, filter: &str) -> Result<Agent> {
        self.launch_agent(node, &[], Some(filter))
    }

    fn launch_agent(&self, node: usize, extra: &[&str], filter: Option<&str>) -> Result<Agent> {
        let node = self.node(node).clone();
        let workloads_file = self
            .dir
            .path()
            .join(format!("workloads-n{}.yaml", node.index));
        let mut args: Vec<String> = ["--log-format", "json", "run"].map(String::from).to_vec();
        // A Kubernetes agent's CNI socket and records default to the host's
        // /var/run/ambit: a test agent must never touch them.
        if extra.contains(&"--kubernetes") && !extra.contains(&"--cni-socket") {
            anyhow::bail!(
                "a Kubernetes test agent needs its own --cni-socket and --state-dir \
                 (Testbed::start_kubernetes_agent_with gives them)"
            );
        }
        // The workloads file and --kubernetes are exclusive.
        if !extra.contains(&"--kubernetes") {
            args.extend(["--workloads".into(), workloads_file.display().to_string()]);
        }
        args.extend(["--cgroup-path".into(), node.cgroup.display().to_string()]);
        args.extend([
            "--bpf-pin-dir".into(),
            node.bpf_pin_dir.display().to_string(),
        ]);
        args.extend(["--reload-interval-ms".into(), "100".into()]);
        let audit_log = self.dir.path().join(format!("audit-n{}.log", node.index));
        if !extra.contains(&"--audit-log") {
            args.extend(["--audit-log".into(), audit_log.display().to_string()]);
        }
        // Tests that are not about policy run with the mesh default open;
        // policy tests pass their own --default-policy.
        if !extra.contains(&"--default-policy") {
            args.extend(["--default-policy".into(), "allow".into()]);
        }
        if let Some(ca) = self.ca.get() {
            args.extend(["--ca-addr".into(), ca.addr.clone()]);
            args.extend([
                "--ca-bootstrap-dir".into(),
                ca.bootstrap_dir.display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let daemon = self.launch_daemon(&node, "agent", &args, filter)?;
        daemon.wait_for("agent ready")?;
        Ok(Agent {
            workloads_file,
            bpf_pin_dir: node.bpf_pin_dir.clone(),
            audit_log,
            ..daemon
        })
    }

    /// A two-node mesh: `ambit ca` for `entries` (SVIDs of `svid_ttl_secs`),
    /// then an agent on each node with its own extra `ambit run` arguments.
    /// Every agent knows every workload (to find tunnel peers) and captures
    /// those of its own node. Returns (ca, agent 0, agent 1).
    pub fn start_mesh(
        &self,
        entries: &[WorkloadEntry],
        svid_ttl_secs: u64,
        agent_args: [&[&str]; 2],
    ) -> Result<(Agent, Agent, Agent)> {
        let ca = self.start_ca(entries, svid_ttl_secs)?;
        self.write_workloads(0, entries)?;
        self.write_workloads(1, entries)?;
        let agent0 = self.start_agent_with(0, agent_args[0])?;
        let agent1 = self.start_agent_with(1, agent_args[1])?;
        Ok((ca, agent0, agent1))
    }

    /// Starts `ambit ca` on node 0 (listening on its inter-node link address)
    /// for the workloads in `entries`; agents started afterwards get their
    /// SVIDs from it.
    pub fn start_ca(&self, entries: &[WorkloadEntry], svid_ttl_secs: u64) -> Result<Agent> {
        let node = self.node(0).clone();
        let directory = self.write_ca_directory(entries)?;
        let bootstrap_dir = self.dir.path().join("ca-bootstrap");
        let addr = format!("{}:{CA_PORT}", node.link_ipv4);
        let args: Vec<String> = vec![
            "--log-format".into(),
            "json".into(),
            "ca".into(),
            "--trust-domain".into(),
            "cluster.local".into(),
            "--listen".into(),
            addr.clone(),
            "--directory".into(),
            directory.display().to_string(),
            "--bootstrap-dir".into(),
            bootstrap_dir.display().to_string(),
            "--svid-ttl-secs".into(),
            svid_ttl_secs.to_string(),
            // Kept across restarts of the CA, as a Secret would be.
            "--root-dir".into(),
            self.dir.path().join("ca-root").display().to_string(),
            // Re-read the directory as often as the agents re-read their
            // workloads, or a pod's first SVID request races the CA's view.
            "--reload-interval-ms".into(),
            "100".into(),
        ];
        let daemon = self.launch_daemon(&node, "ca", &args, None)?;
        wait_until(Duration::from_secs(30), || {
            if daemon.has_exited() {
                bail!("ambit ca exited during start-up:\n{}", daemon.raw_log());
            }
            Ok(bootstrap_dir.join("bundle.pem").exists())
        })?;
        self.wait_for_listener(&node, CA_PORT)?;
        // A restarted CA has the same address and files.
        let _ = self.ca.set(CaInfo {
            addr,
            bootstrap_dir,
        });
        Ok(daemon)
    }

    /// Rewrites the CA's workload directory (which workloads run on which
    /// node); the CA re-reads it.
    pub fn write_ca_directory(&self, entries: &[WorkloadEntry]) -> Result<PathBuf> {
        let directory = self.dir.path().join("ca-directory.yaml");
        write_atomically(&directory, &workloads_doc("ca", entries))?;
        Ok(directory)
    }

    /// Spawns `ambit ARGS` in `node`'s netns, in the cgroup `<node>/<role>`.
    pub(crate) fn launch_daemon(
        &self,
        node: &crate::Node,
        role: &str,
        args: &[String],
        filter: Option<&str>,
    ) -> Result<Agent> {
        let place = AgentPlace {
            netns: node.netns.clone(),
            cgroup: node.cgroup.join(role),
        };
        self.launch_in(
            &place,
            node,
            &format!("{role}-n{}-", node.index),
            args,
            filter,
        )
    }

    /// Spawns `ambit ARGS` at `place` on `node`, logging to
    /// `<prefix><generation>.err`.
    pub(crate) fn launch_in(
        &self,
        place: &AgentPlace,
        node: &crate::Node,
        prefix: &str,
        args: &[String],
        filter: Option<&str>,
    ) -> Result<Agent> {
        std::fs::create_dir_all(&place.cgroup)?;
        let generation = std::fs::read_dir(self.dir.path())?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count()
            / 2;
        let name = format!("{prefix}{generation}");
        let binary = agent_binary()?;
        let mut cmd = exec::command(place, binary.to_str().unwrap(), &[]);
        cmd.args(args);
        match (filter, std::env::var_os("AMBIT_LOG")) {
            (Some(filter), _) => cmd.env("AMBIT_LOG", filter),
            (None, None) => cmd.env("AMBIT_LOG", &self.log_filter),
            (None, Some(_)) => &mut cmd,
        };
        let pid = self.spawn_command(cmd, &name)?;
        Ok(Agent {
            log_path: self.dir.path().join(format!("{name}.err")),
            name,
            pid,
            workloads_file: PathBuf::new(),
            bpf_pin_dir: PathBuf::new(),
            audit_log: PathBuf::new(),
            node: node.clone(),
            pod: None,
            children: Arc::clone(&self.children),
        })
    }
}

/// Port of `ambit ca` in the testbed.
pub const CA_PORT: u16 = 15012;

/// Where the testbed's CA listens and wrote its bootstrap files.
#[derive(Debug)]
pub struct CaInfo {
    pub addr: String,
    pub bootstrap_dir: PathBuf,
}

/// Replaces `path` with `doc` in one rename, so a reader never sees half.
pub(crate) fn write_atomically(path: &Path, doc: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(doc)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A workloads file (JSON, which is YAML) for `node` listing `entries`.
pub(crate) fn workloads_doc(node: &str, entries: &[WorkloadEntry]) -> Value {
    let workloads: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut labels = json!({
                "app": e.pod.name,
                "ambit.dev/mesh": if e.enrolled { "enabled" } else { "disabled" },
            });
            if e.permissive {
                labels["ambit.dev/mtls-mode"] = json!("permissive");
            }
            for (key, value) in &e.labels {
                labels[key] = json!(value);
            }
            let netns = e
                .netns_override
                .clone()
                .unwrap_or_else(|| e.pod.netns_path());
            json!({
                "name": e.pod.name,
                "namespace": e.namespace,
                "serviceAccount": e.service_account,
                "labels": labels,
                "netns": netns,
                "ips": [e.pod.ipv4.to_string(), e.pod.ipv6.to_string()],
                "node": format!("node{}", e.pod.node),
                "sidecar": e.sidecar,
            })
        })
        .collect();
    json!({ "node": node, "workloads": workloads })
}

impl Agent {
    /// Waits for a record with message `msg`, failing early if the process exits.
    pub fn wait_for(&self, msg: &str) -> Result<()> {
        wait_until(Duration::from_secs(30), || {
            if self.has_exited() {
                bail!("{} exited during start-up:\n{}", self.name, self.raw_log());
            }
            Ok(self.logs().iter().any(|l| message(l) == msg))
        })
        .with_context(|| format!("{} never logged {msg:?}:\n{}", self.name, self.raw_log()))
    }

    /// GETs `path` from the agent's admin server (from inside its node, or
    /// a sidecar's pod).
    pub fn admin_get(&self, tb: &Testbed, path: &str) -> Result<(String, String)> {
        match &self.pod {
            Some(pod) => admin_get(tb, pod, path),
            None => admin_get(tb, &self.node, path),
        }
    }

    /// The value of one series in the agent's /metrics, e.g.
    /// `ambit_connections_opened_total{direction="inbound",decision="deny"}`
    /// (labels in any order; 0 when absent).
    pub fn metric(&self, tb: &Testbed, series: &str) -> Result<f64> {
        let (code, body) = self.admin_get(tb, "/metrics")?;
        anyhow::ensure!(code == "200", "/metrics answered {code}");
        let wanted = series_key(series);
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (series_key(name) == wanted).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0))
    }

    /// Every record of the audit log written so far.
    pub fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The audit log's decision records for connections in `direction`
    /// ("inbound" or "outbound"), allowed or denied.
    pub fn audit_decisions(&self, direction: &str) -> Vec<Value> {
        self.audit_records()
            .into_iter()
            .filter(|r| r["event"] == "decision" && r["direction"] == direction)
            .collect()
    }

    /// How many connections in `direction` the audit log records as allowed.
    pub fn allowed_decisions(&self, direction: &str) -> usize {
        self.audit_decisions(direction)
            .iter()
            .filter(|r| r["decision"] == "allow")
            .count()
    }

    /// Entries in one of the agent's pinned maps, read with bpftool (as an
    /// operator would).
    pub fn map_entries(&self, map: &str) -> Result<usize> {
        let path = self.bpf_pin_dir.join(map);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bpftool map dump {}: {}",
            path.display(),
            crate::stderr(&out)
        );
        let entries: Value = serde_json::from_slice(&out.stdout)?;
        Ok(entries.as_array().map_or(0, Vec::len))
    }

    pub fn raw_log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Every JSON record the agent logged so far.
    pub fn logs(&self) -> Vec<Value> {
        self.raw_log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Records whose message is `msg`.
    pub fn records(&self, msg: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| message(l) == msg)
            .collect()
    }

    /// Waits for `count` records with message `msg`, and returns them all.
    pub fn wait_for_records(
        &self,
        msg: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        wait_until(timeout, || Ok(self.records(msg).len() >= count)).with_context(|| {
            format!(
                "expected {count} {msg:?} records, found {}",
                self.records(msg).len()
            )
        })?;
        Ok(self.records(msg))
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(self.pid as libc::pid_t, signal) };
    }

    pub fn has_exited(&self) -> bool {
        let mut children = self.children.lock().unwrap();
        children
            .iter_mut()
            .find(|c| c.id() == self.pid)
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&self, signal: libc::c_int) -> Result<()> {
        self.signal(signal);
        wait_until(Duration::from_secs(20), || Ok(self.has_exited()))
            .with_context(|| format!("agent {} did not exit", self.name))
    }
}

/// GETs `path` from the admin server of the agent on `node` (on
/// 127.0.0.1:15020 there); returns (status code, body).
pub fn admin_get(tb: &Testbed, node: &dyn exec::Host, path: &str) -> Result<(String, String)> {
    let url = format!("http://127.0.0.1:15020{path}");
    let out = tb.run(
        node,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.to_owned(), body.to_owned()))
}

pub fn message(record: &Value) -> &str {
    record["message"].as_str().unwrap_or_default()
}

/// A series name with its labels sorted, so label order does not matter.
fn series_key(series: &str) -> (String, Vec<String>) {
    match series.split_once('{') {
        Some((name, labels)) => {
            let mut labels: Vec<String> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            labels.sort();
            (name.to_owned(), labels)
        }
        None => (series.to_owned(), Vec::new()),
    }
}
