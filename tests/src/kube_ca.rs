//! `ambit ca --kubernetes` in the testbed: the release namespace
//! `ambit-system` with the chart's ServiceAccounts and RBAC
//! (tests/src/chart.rs), the CA on node 0 with its ServiceAccount's token,
//! and agents that attest with a projected token bound to their own
//! "DaemonSet pod" (a Pod object on their node, which the testbed creates
//! as a DaemonSet controller and scheduler would).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use crate::chart::{AGENT_SERVICE_ACCOUNT, CA_SERVICE_ACCOUNT, RELEASE_NAMESPACE};
use crate::{Agent, ControlPlane, Host, KubePod, Pod, Testbed, agent::CA_PORT, wait_until};

/// The audience of agent tokens the CA accepts.
pub const CA_AUDIENCE: &str = "ambit-ca";
pub const ROOT_SECRET: &str = "ambit-ca-root";
pub const BUNDLE_CONFIGMAP: &str = "ambit-trust-bundle";

/// The API credentials of the shipped ServiceAccounts.
pub struct ReleaseCredentials {
    pub agent_kubeconfig: PathBuf,
    pub ca_kubeconfig: PathBuf,
}

/// Installs the chart's ServiceAccounts and RBAC in the release namespace
/// and returns kubeconfigs with tokens of the agent's and the CA's.
pub fn install_release(cp: &ControlPlane) -> Result<ReleaseCredentials> {
    Ok(ReleaseCredentials {
        agent_kubeconfig: cp.chart_kubeconfig(AGENT_SERVICE_ACCOUNT)?,
        ca_kubeconfig: cp.chart_kubeconfig(CA_SERVICE_ACCOUNT)?,
    })
}

/// A data key of the root Secret, decoded.
pub fn secret_value(cp: &ControlPlane, key: &str) -> Result<Option<String>> {
    let secret = cp.kubectl.json(&[
        "get",
        "secret",
        ROOT_SECRET,
        "--namespace",
        RELEASE_NAMESPACE,
    ])?;
    let Some(encoded) = secret["data"][key].as_str() else {
        return Ok(None);
    };
    // The key is not printed: it goes through a file, not an argument.
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), encoded)?;
    let decoded = crate::exec::host_cmd("base64", &["-d", &file.path().display().to_string()])?;
    Ok(Some(decoded))
}

/// `bundle.pem` of the trust bundle ConfigMap.
pub fn published_bundle(cp: &ControlPlane) -> Result<String> {
    let config_map = cp.kubectl.json(&[
        "get",
        "configmap",
        BUNDLE_CONFIGMAP,
        "--namespace",
        RELEASE_NAMESPACE,
    ])?;
    config_map["data"]["bundle.pem"]
        .as_str()
        .map(String::from)
        .context("the trust bundle ConfigMap has no bundle.pem")
}

/// An agent "DaemonSet pod" scheduled on `node{N}`.
pub struct AgentPod {
    pub name: String,
    pub uid: String,
    pub node_name: String,
}

impl Testbed {
    /// Starts `ambit ca --kubernetes` in node 0 (all addresses, port
    /// [`CA_PORT`]) with the CA's credentials, the API server bridged into
    /// the node; waits until it serves.
    pub fn start_kubernetes_ca(&self, cp: &ControlPlane, kubeconfig: &Path) -> Result<Agent> {
        self.start_kubernetes_ca_with(cp, kubeconfig, &[])
    }

    /// [`Self::start_kubernetes_ca`] with extra `ambit ca` arguments.
    pub fn start_kubernetes_ca_with(
        &self,
        cp: &ControlPlane,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let daemon = self.spawn_kubernetes_ca(0, cp, kubeconfig, extra)?;
        daemon.wait_for("CA ready")?;
        self.wait_for_listener(self.node(0), CA_PORT)?;
        Ok(daemon)
    }

    /// Spawns `ambit ca --kubernetes ...EXTRA` in `node` without waiting
    /// for it.
    pub fn spawn_kubernetes_ca(
        &self,
        node: usize,
        cp: &ControlPlane,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        self.bridge_api_server(node, cp)?;
        let node = self.node(node).clone();
        let args: Vec<String> = [
            "--log-format",
            "json",
            "ca",
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--namespace",
            RELEASE_NAMESPACE,
            "--listen",
            &format!("0.0.0.0:{CA_PORT}"),
            "--root-secret",
            ROOT_SECRET,
            "--bundle-configmap",
            BUNDLE_CONFIGMAP,
            "--token-audience",
            CA_AUDIENCE,
            "--agent-service-account",
            AGENT_SERVICE_ACCOUNT,
        ]
        .map(String::from)
        .to_vec();
        let args: Vec<String> = args
            .into_iter()
            .chain(extra.iter().map(|a| a.to_string()))
            .collect();
        self.launch_daemon(&node, "ca", &args, None)
    }

    /// Creates the agent pod of `node` in the release namespace, running as
    /// `service_account` (the DaemonSet's is [`AGENT_SERVICE_ACCOUNT`]).
    pub fn create_agent_pod(
        &self,
        cp: &ControlPlane,
        node: usize,
        service_account: &str,
        suffix: &str,
    ) -> Result<AgentPod> {
        let node_name = format!("node{node}");
        let pod = KubePod {
            labels: vec![("app.kubernetes.io/name".into(), "ambit-agent".into())],
            ips: vec![self.node(node).link_ipv4.into()],
            ..KubePod::new(
                &format!("ambit-agent-{node_name}-{suffix}"),
                &node_name,
                service_account,
                self.node(node).link_ipv4.into(),
            )
        };
        let uid = cp.create_pod(RELEASE_NAMESPACE, &pod)?;
        Ok(AgentPod {
            name: pod.name,
            uid,
            node_name,
        })
    }

    /// Writes a token of `service_account` for `audience`, bound to `pod`
    /// (as the kubelet projects it), to a file; returns the file.
    pub fn write_pod_token(
        &self,
        cp: &ControlPlane,
        pod: &AgentPod,
        service_account: &str,
        audience: &str,
    ) -> Result<PathBuf> {
        let token = cp.request_token(
            RELEASE_NAMESPACE,
            service_account,
            audience,
            Some((&pod.name, &pod.uid)),
        )?;
        let path = self
            .dir
            .path()
            .join(format!("token-{}-{service_account}-{audience}", pod.name));
        std::fs::write(&path, token)?;
        Ok(path)
    }

    /// Starts an agent on `node` with the Kubernetes workload source that
    /// obtains SVIDs from the cluster CA at `ca_addr` by attesting with the
    /// token in `token_file`, and trusts the bundle ConfigMap.
    pub fn start_attesting_agent(
        &self,
        node: usize,
        cp: &ControlPlane,
        kubeconfig: &Path,
        ca_addr: &str,
        token_file: &Path,
    ) -> Result<Agent> {
        let token_file = token_file.display().to_string();
        self.start_kubernetes_agent_with(
            node,
            cp,
            kubeconfig,
            &[
                "--namespace",
                RELEASE_NAMESPACE,
                "--ca-addr",
                ca_addr,
                "--ca-token-file",
                &token_file,
            ],
        )
    }
}

/// Sends `marker` from `from` to the TCP echo server on `to:port`; true
/// when it came back.
pub fn echo(tb: &Testbed, from: &dyn Host, to: &Pod, port: u16, marker: &str) -> Result<bool> {
    let out = tb.sh(
        from,
        &format!(
            "echo {marker} | socat -t 5 - TCP:{}:{port},connect-timeout=5",
            to.ipv4
        ),
    )?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == marker)
}

/// Sends a fresh marker from `from` to the echo server on `to` (retrying
/// for up to `timeout` while capture and SVIDs settle) with the link
/// between the nodes captured; returns whether it crossed in clear.
pub fn echo_crosses_in_clear(
    tb: &Testbed,
    from: &Pod,
    to: &Pod,
    port: u16,
    step: &str,
    timeout: Duration,
) -> Result<bool> {
    let capture = tb.capture_link(&format!("link-{step}"))?;
    let marker = format!("marker-{step}-7d2a");
    if wait_until(timeout, || echo(tb, from, to, port, &marker)).is_err() {
        bail!("{step}: {} never reached {}", from.name, to.name);
    }
    capture.saw_in_clear(tb, &marker)
}
