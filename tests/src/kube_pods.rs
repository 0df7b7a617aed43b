//! The testbed as kubelet and container runtime for the agent's Kubernetes
//! workload source: a netns pod gets a Pod object, then a cgroup named the
//! way kubelet names pod cgroups (`<node>/kubepods/pod<uid>`) holding a
//! long-running process inside the pod's network namespace (as a pod
//! sandbox would), and only then the Running status with its addresses.
//! The agent finds the pod's network namespace through that process.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{ControlPlane, KubePod, Pod, Testbed, control_plane::Kubectl, exec::Host};

/// Where a pod's processes run: the pod's netns, kubelet's cgroup.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub netns: String,
    pub cgroup: PathBuf,
    pub label: String,
}

impl Sandbox {
    /// The place of pod `uid` on `node`: netns `netns`, cgroup
    /// `<node>/kubepods/pod<uid>` (made here), as kubelet names it.
    pub fn kubelet(tb: &Testbed, node: usize, uid: &str, netns: &str, label: &str) -> Result<Self> {
        let cgroup = tb
            .node(node)
            .cgroup
            .join("kubepods")
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Self {
            netns: netns.into(),
            cgroup,
            label: label.into(),
        })
    }
}

impl Host for Sandbox {
    fn netns(&self) -> &str {
        &self.netns
    }
    fn cgroup(&self) -> &Path {
        &self.cgroup
    }
    fn label(&self) -> &str {
        &self.label
    }
}

/// A pod the testbed runs "in Kubernetes".
#[derive(Clone, Debug)]
pub struct RunningKubePod {
    pub uid: String,
    /// The sandbox process (`sleep infinity`), killed when the testbed drops.
    pub sandbox_pid: u32,
    pub cgroup: PathBuf,
}

/// The Pod object of `pod` on the node the agents call `node{N}` (the
/// name the CA's directory gives that node).
pub fn kube_pod(pod: &Pod, tb: &Testbed, service_account: &str) -> KubePod {
    let mut kube = KubePod::for_pod(pod, tb.node(pod.node), service_account);
    kube.node_name = format!("node{}", pod.node);
    kube
}

/// The agent's credentials: the Helm chart's `ambit-agent` ServiceAccount
/// and RBAC (tests/src/chart.rs) and a token for it, not an admin's. Checks
/// the least privilege: it reads pods, never secrets.
pub fn agent_kubeconfig(cp: &ControlPlane) -> Result<PathBuf> {
    let kubeconfig = cp.chart_kubeconfig(crate::chart::AGENT_SERVICE_ACCOUNT)?;
    let as_agent = Kubectl::new(&kubeconfig);
    as_agent.run(&["get", "pods", "--all-namespaces"])?;
    ensure!(
        as_agent
            .run(&["get", "secrets", "--all-namespaces"])
            .is_err(),
        "the agent's token can read secrets"
    );
    Ok(kubeconfig)
}

impl Testbed {
    /// Creates the Pod object, starts its sandbox in a kubelet-named cgroup
    /// and reports it Running, as kubelet and the runtime would.
    pub fn run_kube_pod(
        &self,
        cp: &ControlPlane,
        namespace: &str,
        pod: &Pod,
        kube: &KubePod,
    ) -> Result<RunningKubePod> {
        let uid = cp.create_pod(namespace, kube)?;
        let sandbox = Sandbox::kubelet(
            self,
            pod.node,
            &uid,
            &pod.netns,
            &format!("sandbox-{}", pod.name),
        )?;
        let cgroup = sandbox.cgroup.clone();
        let sandbox_pid = self.spawn(
            &sandbox,
            &format!("sandbox-{}-{uid}", pod.name),
            &["sleep", "infinity"],
        )?;
        cp.report_running(namespace, kube)?;
        Ok(RunningKubePod {
            uid,
            sandbox_pid,
            cgroup,
        })
    }

    /// Makes the API server (on the host's loopback) reachable on the same
    /// address from `node`'s network namespace, as a node reaches its
    /// control plane: a socat in the node forwards over a unix socket to a
    /// socat on the host. Both are killed when the testbed drops. Bridging
    /// a node again does nothing.
    pub fn bridge_api_server(&self, node: usize, cp: &ControlPlane) -> Result<()> {
        let port: u16 = cp
            .server
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .with_context(|| format!("no port in {}", cp.server))?;
        let socket = self.dir.path().join(format!("api-n{node}.sock"));
        if socket.exists() {
            // Bridged already (the CA and an agent share node 0).
            return Ok(());
        }
        let socket = socket.display();
        let mut host_side = Command::new("socat");
        host_side.args([
            format!("UNIX-LISTEN:{socket},fork"),
            format!("TCP:127.0.0.1:{port}"),
        ]);
        self.spawn_command(host_side, &format!("api-bridge-host-n{node}"))?;
        let node_host = self.node(node).clone();
        self.spawn(
            &node_host,
            &format!("api-bridge-n{node}"),
            &[
                "socat",
                &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
                &format!("UNIX-CONNECT:{socket}"),
            ],
        )?;
        self.wait_for_listener(&node_host, port)
    }

    /// Starts an agent on `node` with the Kubernetes workload source,
    /// `kubeconfig` as its credentials and `node{N}` as its node name, the
    /// API server bridged into the node.
    pub fn start_kubernetes_agent(
        &self,
        node: usize,
        cp: &ControlPlane,
        kubeconfig: &Path,
    ) -> Result<crate::Agent> {
        self.start_kubernetes_agent_with(node, cp, kubeconfig, &[])
    }

    /// [`Testbed::start_kubernetes_agent`] with more `ambit run` arguments.
    pub fn start_kubernetes_agent_with(
        &self,
        node: usize,
        cp: &ControlPlane,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<crate::Agent> {
        self.bridge_api_server(node, cp)?;
        let mut args = self.kubernetes_agent_args(node, kubeconfig);
        args.extend(extra.iter().map(ToString::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent_with(node, &args)
    }

    /// Starts the Kubernetes agent of `node` again (the API server is
    /// already bridged), with the same CNI socket and state dir.
    pub fn restart_kubernetes_agent(&self, node: usize, kubeconfig: &Path) -> Result<crate::Agent> {
        let args = self.kubernetes_agent_args(node, kubeconfig);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent_with(node, &args)
    }

    /// The `ambit run` arguments of a Kubernetes agent on `node`: its node
    /// name, and a CNI socket and state dir of its own (never the host's).
    fn kubernetes_agent_args(&self, node: usize, kubeconfig: &Path) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            format!("node{node}"),
            "--cni-socket".into(),
            self.cni_socket(node).display().to_string(),
            "--state-dir".into(),
            self.state_dir(node).display().to_string(),
        ]
    }

    /// The CNI socket of the agent on `node` (the plugin's `agentSocket`).
    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("run-n{node}/cni.sock"))
    }

    /// The `--state-dir` of the agent on `node` (CNI records in `pods/`).
    pub fn state_dir(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("run-n{node}"))
    }

    /// Spawns a Kubernetes agent on `node` (embedded CA, log
    /// `<dir>/<returned name>.err`) without waiting for it to be ready, as
    /// when the API server is not there yet. Killed when the testbed drops.
    pub fn spawn_kubernetes_agent(&self, node: usize, kubeconfig: &Path) -> Result<String> {
        let node_host = self.node(node).clone();
        let place = Sandbox {
            netns: node_host.netns.clone(),
            cgroup: node_host.cgroup.join("agent-k8s"),
            label: format!("agent-k8s-n{node}"),
        };
        std::fs::create_dir_all(&place.cgroup)?;
        let binary = crate::agent::agent_binary()?;
        let binary = binary.display().to_string();
        let cgroup = node_host.cgroup.display().to_string();
        let pins = node_host.bpf_pin_dir.display().to_string();
        let audit = self.dir.path().join(format!("audit-k8s-n{node}.log"));
        let audit = audit.display().to_string();
        let mut args = vec![
            "--log-format",
            "json",
            "run",
            "--cgroup-path",
            &cgroup,
            "--bpf-pin-dir",
            &pins,
            "--audit-log",
            &audit,
        ];
        let kubernetes = self.kubernetes_agent_args(node, kubeconfig);
        args.extend(kubernetes.iter().map(String::as_str));
        let mut cmd = crate::exec::command(&place, &binary, &args);
        cmd.env("AMBIT_LOG", &self.log_filter);
        let name = place.label.clone();
        self.spawn_command(cmd, &name)?;
        Ok(name)
    }
}
