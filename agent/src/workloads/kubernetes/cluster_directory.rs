//! The CA's directory from the API (`ambit ca --kubernetes`): every
//! enrolled pod of the cluster with its node and service account, from the
//! same watches and reduction the agent uses for its cluster-wide view. The
//! CA issues a node only the identities of enrolled pods scheduled there.

use std::path::PathBuf;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::watch;

use super::{
    Health, Watched,
    store::{KeepLabels, PodRecord, Reduced, reduce_namespace, reduce_pod},
    watched, workload,
};
use crate::{
    metrics::KubernetesMetrics,
    workloads::{Labels, NodeWorkloads, is_enrolled},
};

/// The enrolled pods of the cluster, and whether the first lists are in.
pub struct ClusterDirectory {
    pub workloads: watch::Receiver<NodeWorkloads>,
    pub synced: watch::Receiver<bool>,
}

/// Starts the watches; `synced` turns true after both first lists, and
/// only then is a directory published.
pub fn watch(client: Client, metrics: &KubernetesMetrics) -> ClusterDirectory {
    let (tx, workloads) = watch::channel(NodeWorkloads::default());
    let (synced_tx, synced) = watch::channel(false);
    let pods = watched(Api::all(client.clone()), watcher::Config::default());
    let namespaces = watched(Api::all(client), watcher::Config::default());
    let health = [
        Health::new("pods", metrics.watch("pods")),
        Health::new("namespaces", metrics.watch("namespaces")),
    ];
    tokio::spawn(run(pods, namespaces, health, tx, synced_tx));
    ClusterDirectory { workloads, synced }
}

async fn run(
    mut pods: Watched<Pod>,
    mut namespaces: Watched<K8sNamespace>,
    mut health: [Health; 2],
    tx: watch::Sender<NodeWorkloads>,
    synced_tx: watch::Sender<bool>,
) {
    let [pod_health, namespace_health] = &mut health;
    let mut pod_records: Reduced<PodRecord> = Reduced::default();
    let mut namespace_labels: Reduced<Labels> = Reduced::default();
    loop {
        let changed = tokio::select! {
            Some(item) = pods.next() => pod_health.observe(item).is_some_and(|event| {
                pod_records.apply(event, |pod| reduce_pod(pod, KeepLabels::EnrollmentOnly))
            }),
            Some(item) = namespaces.next() => namespace_health
                .observe(item)
                .is_some_and(|event| namespace_labels.apply(event, reduce_namespace)),
            else => break,
        };
        if !(changed && pod_records.synced() && namespace_labels.synced()) {
            continue;
        }
        let next = enrolled(&pod_records, &namespace_labels);
        tx.send_if_modified(|current| {
            let modified = *current != next;
            *current = next;
            modified
        });
        if !*synced_tx.borrow() {
            tracing::info!(pods = pod_records.len(), "initial Kubernetes sync done");
            synced_tx.send_replace(true);
        }
        if tx.is_closed() {
            break;
        }
    }
}

/// The enrolled pods, each with its node.
fn enrolled(pods: &Reduced<PodRecord>, namespaces: &Reduced<Labels>) -> NodeWorkloads {
    let workloads = pods
        .iter()
        .filter(|((namespace, _), pod)| {
            let namespace_labels = namespaces.get(&(String::new(), namespace.clone()));
            is_enrolled(&pod.labels, namespace_labels)
        })
        .map(|(key, pod)| workload(key, pod, PathBuf::new()))
        .collect();
    NodeWorkloads {
        workloads,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::MESH_LABEL;

    #[test]
    fn only_enrolled_pods_are_listed_with_their_node() {
        let record = |node: &str, label: Option<&str>| PodRecord {
            uid: format!("uid-{node}"),
            service_account: "sa".into(),
            node: node.into(),
            ips: vec!["198.18.0.10".parse().unwrap()],
            labels: label
                .map(|v| [(MESH_LABEL.to_string(), v.to_string())].into())
                .unwrap_or_default(),
            probes: Default::default(),
        };
        let mut pods = Reduced::default();
        let mut namespaces = Reduced::default();
        namespaces.insert_for_test(
            (String::new(), "meshed".into()),
            [(MESH_LABEL.to_string(), "enabled".to_string())].into(),
        );
        namespaces.insert_for_test((String::new(), "plain".into()), Labels::new());
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        pods.insert_for_test(key("meshed", "a"), record("n0", None));
        pods.insert_for_test(key("meshed", "out"), record("n0", Some("disabled")));
        pods.insert_for_test(key("plain", "b"), record("n1", Some("enabled")));
        pods.insert_for_test(key("plain", "c"), record("n1", None));
        let listed: Vec<(String, Option<String>)> = enrolled(&pods, &namespaces)
            .workloads
            .into_iter()
            .map(|w| (w.name, w.node))
            .collect();
        assert_eq!(
            listed,
            [
                ("a".to_string(), Some("n0".to_string())),
                ("b".to_string(), Some("n1".to_string()))
            ]
        );
    }
}
