//! What the agent keeps of watched objects: each object reduced at once to
//! the few fields it needs (never whole Pod objects: the cluster-wide pod
//! set grows with the cluster), and a re-list applied as one swap, so a
//! watch that restarts neither loses nor replays state.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodStatus};
use kube::{ResourceExt, runtime::watcher::Event};

use super::probes::reduce_probes;
use crate::workloads::{Labels, MESH_LABEL, probes::Probes};

/// `(namespace, name)`; namespaces themselves have an empty namespace.
pub type ObjectKey = (String, String);

fn key_of<K: ResourceExt>(object: &K) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// A running pod, as much of it as the agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Kubelet probes (this node's pods only).
    pub probes: Probes,
}

/// Which labels of a pod to keep: all of them for this node's pods
/// (policies select on them), only the enrollment label for the others.
/// Probes are kept with all labels: only this node's kubelet probes.
#[derive(Clone, Copy, Debug)]
pub enum KeepLabels {
    All,
    EnrollmentOnly,
}

/// `None` for pods the agent does not capture or dial: host-network pods
/// (never enrolled), pods not running or without addresses yet, and
/// terminated ones.
pub fn reduce_pod(pod: &Pod, keep: KeepLabels) -> Option<PodRecord> {
    let running = pod.status.as_ref()?.phase.as_deref() == Some("Running");
    reduce_started(pod, keep).filter(|record| running && !record.ips.is_empty())
}

/// A pod of this node, also while it starts: Pending and without addresses
/// at CNI ADD time (the kubelet reports them after the CNI chain ran), when
/// the CNI record supplies its netns and addresses. `None` for host-network
/// and terminated pods.
pub fn reduce_node_pod(pod: &Pod) -> Option<PodRecord> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, None | Some("Pending" | "Running")) {
        return None;
    }
    reduce_started(pod, KeepLabels::All)
}

fn reduce_started(pod: &Pod, keep: KeepLabels) -> Option<PodRecord> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let empty = PodStatus::default();
    let status = pod.status.as_ref().unwrap_or(&empty);
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    let labels = pod
        .labels()
        .iter()
        .filter(|(key, _)| matches!(keep, KeepLabels::All) || key.as_str() == MESH_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(PodRecord {
        uid: pod.metadata.uid.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name.clone()?,
        ips,
        labels,
        probes: match keep {
            KeepLabels::All => reduce_probes(spec),
            KeepLabels::EnrollmentOnly => Probes::default(),
        },
    })
}

/// A namespace's labels (few namespaces, so all of them are kept).
pub fn reduce_namespace(namespace: &Namespace) -> Option<Labels> {
    Some(namespace.labels().clone())
}

/// The reduced objects of one watch.
#[derive(Debug)]
pub struct Reduced<T> {
    live: BTreeMap<ObjectKey, T>,
    /// Filled during a (re-)list; replaces `live` when the list completes.
    relist: Option<BTreeMap<ObjectKey, T>>,
    synced: bool,
}

impl<T> Default for Reduced<T> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Reduced<T> {
    /// Applies one watch event; returns whether the live set changed (the
    /// first completed list always counts as a change).
    pub fn apply<K: ResourceExt>(
        &mut self,
        event: Event<K>,
        reduce: impl Fn(&K) -> Option<T>,
    ) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                if let (Some(buffer), Some(value)) = (self.relist.as_mut(), reduce(&object)) {
                    buffer.insert(key_of(&object), value);
                }
                false
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let first = !self.synced;
                self.synced = true;
                let changed = listed != self.live;
                self.live = listed;
                changed || first
            }
            Event::Apply(object) => match reduce(&object) {
                Some(value) => {
                    let key = key_of(&object);
                    if self.live.get(&key) == Some(&value) {
                        return false;
                    }
                    self.live.insert(key, value);
                    true
                }
                None => self.live.remove(&key_of(&object)).is_some(),
            },
            Event::Delete(object) => self.live.remove(&key_of(&object)).is_some(),
        }
    }

    /// Whether a full list has completed at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&T> {
        self.live.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &T)> {
        self.live.iter()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, key: ObjectKey, value: T) {
        self.live.insert(key, value);
        self.synced = true;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, phase: &str, ips: &[&str], host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(
                    [
                        (MESH_LABEL.to_string(), "enabled".to_string()),
                        ("app".into(), name.into()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                service_account_name: Some("sa".into()),
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).into() }).collect()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_running_pod_network_pods_with_addresses_are_kept() {
        let running = reduce_pod(
            &pod("a", "Running", &["fd00:a5b1::a", "198.18.0.10"], false),
            KeepLabels::EnrollmentOnly,
        )
        .unwrap();
        assert_eq!(running.uid, "uid-a");
        assert_eq!(running.service_account, "sa");
        assert_eq!(running.node, "node-a");
        assert_eq!(running.ips.len(), 2);
        assert_eq!(running.labels.keys().collect::<Vec<_>>(), [MESH_LABEL]);
        let all = reduce_pod(
            &pod("a", "Running", &["198.18.0.10"], false),
            KeepLabels::All,
        );
        assert_eq!(all.unwrap().labels.len(), 2);
        for skipped in [
            pod("b", "Running", &["198.18.0.11"], true),
            pod("c", "Pending", &["198.18.0.12"], false),
            pod("d", "Succeeded", &["198.18.0.13"], false),
            pod("e", "Running", &[], false),
        ] {
            assert_eq!(reduce_pod(&skipped, KeepLabels::All), None, "{skipped:?}");
        }
    }

    #[test]
    fn probes_are_kept_for_this_nodes_pods_only() {
        let mut probed = pod("a", "Running", &["198.18.0.10"], false);
        probed.spec.as_mut().unwrap().containers = vec![
            serde_json::from_value(serde_json::json!({
                "name": "app",
                "livenessProbe": {"tcpSocket": {"port": 9000}},
            }))
            .unwrap(),
        ];
        let local = reduce_pod(&probed, KeepLabels::All).unwrap();
        assert_eq!(local.probes.tcp_socket, [9000]);
        let remote = reduce_pod(&probed, KeepLabels::EnrollmentOnly).unwrap();
        assert!(remote.probes.is_empty());
    }

    #[test]
    fn this_nodes_pods_are_kept_from_pending_on() {
        let pending = reduce_node_pod(&pod("a", "Pending", &[], false)).unwrap();
        assert!(pending.ips.is_empty());
        assert_eq!(pending.labels.len(), 2);
        assert!(reduce_node_pod(&pod("b", "Running", &["198.18.0.11"], false)).is_some());
        for skipped in [
            pod("c", "Pending", &[], true),
            pod("d", "Succeeded", &["198.18.0.13"], false),
            pod("e", "Failed", &[], false),
        ] {
            assert_eq!(reduce_node_pod(&skipped), None, "{skipped:?}");
        }
    }

    fn reduce(p: &Pod) -> Option<PodRecord> {
        reduce_pod(p, KeepLabels::All)
    }

    #[test]
    fn a_relist_swaps_in_whole_and_reports_only_real_changes() {
        let mut store = Reduced::default();
        assert!(!store.apply(Event::Init, reduce));
        assert!(!store.apply(
            Event::InitApply(pod("a", "Running", &["198.18.0.10"], false)),
            reduce
        ));
        assert!(!store.synced());
        assert!(
            store.apply(Event::<Pod>::InitDone, reduce),
            "first sync publishes"
        );
        assert!(store.synced());
        assert_eq!(store.len(), 1);

        // The same list again (a watch restart): nothing changes, nothing
        // is lost in between.
        assert!(!store.apply(Event::<Pod>::Init, reduce));
        assert_eq!(store.len(), 1, "the old state serves during a re-list");
        store.apply(
            Event::InitApply(pod("a", "Running", &["198.18.0.10"], false)),
            reduce,
        );
        assert!(!store.apply(Event::<Pod>::InitDone, reduce));

        // A re-list missing a pod deletes it.
        store.apply(Event::<Pod>::Init, reduce);
        assert!(store.apply(Event::<Pod>::InitDone, reduce));
        assert!(store.is_empty());

        // Apply of a pod that stopped running removes it; Delete too.
        assert!(store.apply(
            Event::Apply(pod("b", "Running", &["198.18.0.11"], false)),
            reduce
        ));
        assert!(!store.apply(
            Event::Apply(pod("b", "Running", &["198.18.0.11"], false)),
            reduce
        ));
        assert!(store.apply(
            Event::Apply(pod("b", "Failed", &["198.18.0.11"], false)),
            reduce
        ));
        assert!(store.is_empty());
        store.apply(
            Event::Apply(pod("c", "Running", &["198.18.0.12"], false)),
            reduce,
        );
        assert!(store.apply(
            Event::Delete(pod("c", "Running", &["198.18.0.12"], false)),
            reduce
        ));
        assert!(store.is_empty());
    }
}
