//! What runs on this node: the workload model, the enrollment rule, and the
//! sources that report workloads (a local file, or Kubernetes).

pub mod directory;
pub mod file;
pub mod kubernetes;
pub mod probes;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf, sync::Arc};

use serde::Deserialize;
use tokio::sync::watch;

use crate::services::ServiceTable;

/// The label that enrolls a namespace or pod (`enabled`) or opts a pod out
/// (`disabled`).
pub const MESH_LABEL: &str = "ambit.dev/mesh";

/// A pod label that relaxes inbound capture for that pod: `permissive`
/// lets plaintext from outside the mesh through (logged); anything else, or
/// no label, is strict: plaintext is refused.
pub const MTLS_MODE_LABEL: &str = "ambit.dev/mtls-mode";

pub type Labels = BTreeMap<String, String>;

/// A pod as the agent needs to know it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: Labels,
    /// The pod's network namespace, e.g. /var/run/netns/NAME.
    pub netns: PathBuf,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The node the pod runs on; absent means this agent's node.
    #[serde(default)]
    pub node: Option<String>,
    /// The kubelet's probes of the pod (this node's pods only).
    #[serde(default)]
    pub probes: probes::Probes,
    /// Served by its own `ambit sidecar` instead of the node agent: still a
    /// mesh destination (its identity is expected at 15008), never captured
    /// by the node agent.
    #[serde(default)]
    pub sidecar: bool,
}

/// A Kubernetes namespace's labels (only those matter for enrollment).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl fmt::Display for WorkloadKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    pub fn key(&self) -> WorkloadKey<'_> {
        WorkloadKey {
            namespace: &self.namespace,
            name: &self.name,
        }
    }

    /// `namespace/name`, for logs and map keys.
    pub fn id(&self) -> String {
        self.key().to_string()
    }

    /// Whether plaintext from outside the mesh may reach this pod.
    pub fn permissive(&self) -> bool {
        self.labels.get(MTLS_MODE_LABEL).map(String::as_str) == Some("permissive")
    }
}

/// What a workload source hands the control loop: the workloads, and
/// whether they are complete yet (a source that must first list them from
/// elsewhere starts with `false`).
pub struct WorkloadFeed {
    pub workloads: watch::Receiver<NodeWorkloads>,
    pub synced: watch::Receiver<bool>,
    /// ClusterIPs and their ready endpoints (empty for the file source).
    pub services: watch::Receiver<Arc<ServiceTable>>,
}

/// Everything a workload source reports about this node at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeWorkloads {
    pub node: String,
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
}

impl NodeWorkloads {
    /// The workloads this agent must capture: on this node, enrolled by
    /// label (a pod's own label wins over its namespace's), and not served
    /// by a sidecar of their own.
    pub fn enrolled(&self) -> impl Iterator<Item = &Workload> {
        self.in_mesh()
            .filter(|w| !w.sidecar && w.node.as_deref().is_none_or(|n| n == self.node))
    }

    /// Every enrolled workload, on any node: the possible tunnel peers.
    pub fn in_mesh(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter().filter(|w| {
            let namespace_labels = self
                .namespaces
                .iter()
                .find(|ns| ns.name == w.namespace)
                .map(|ns| &ns.labels);
            is_enrolled(&w.labels, namespace_labels)
        })
    }
}

/// The enrollment rule: a pod label `ambit.dev/mesh` wins; without one, the
/// namespace's label decides.
pub fn is_enrolled(pod_labels: &Labels, namespace_labels: Option<&Labels>) -> bool {
    match pod_labels.get(MESH_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => namespace_labels
            .and_then(|l| l.get(MESH_LABEL))
            .is_some_and(|v| v == "enabled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn enrollment_follows_pod_then_namespace_labels() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let off = labels(&[(MESH_LABEL, "disabled")]);
        let none = labels(&[("app", "x")]);
        let cases = [
            (&none, None, false),
            (&none, Some(&none), false),
            (&none, Some(&on), true),
            (&on, None, true),
            (&on, Some(&off), true),
            (&off, Some(&on), false),
            (&labels(&[(MESH_LABEL, "bogus")]), Some(&on), true),
            (&none, Some(&off), false),
        ];
        for (pod, ns, want) in cases {
            assert_eq!(is_enrolled(pod, ns), want, "pod {pod:?} ns {ns:?}");
        }
    }
}
