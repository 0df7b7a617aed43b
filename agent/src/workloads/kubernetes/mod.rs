//! The Kubernetes workload source (`ambit run --kubernetes`): watches of
//! this node's pods (to capture), every pod of the cluster (reduced to
//! address, service account and enrollment label: the identity expected at
//! a destination) and namespaces (their enrollment label), published in the
//! same shape as the file source, so the control loop does not care where
//! workloads come from.
//!
//! Services and their Endpoints are watched by [`services`] for ClusterIP
//! resolution.
//!
//! Watches resume from their last resourceVersion, re-list on 410 Gone and
//! back off on errors (kube-runtime's defaults). While the API server is
//! unreachable nothing is published, so the last known state keeps serving.

pub mod cluster_directory;
pub mod local_pods;
pub mod netns_locator;
pub mod probes;
pub mod services;
pub mod store;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures_util::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        utils::ResetTimerBackoff,
        watcher::{self, Event, ExponentialBackoff, watcher},
    },
};
use tokio::sync::watch;

use self::{
    netns_locator::NetnsLocator,
    store::{KeepLabels, PodRecord, Reduced, reduce_namespace, reduce_node_pod, reduce_pod},
};
use super::{Labels, Namespace, NodeWorkloads, Workload, WorkloadFeed, is_enrolled};
use crate::{
    cni::{CniConfig, records::CniPods},
    metrics::{KubernetesMetrics, WatchMetrics},
};

/// How often this node's enrolled pods whose network namespace was not
/// found yet are looked for again (and found ones checked still there).
const NETNS_RETRY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// `None`: the in-cluster configuration (service account token).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node_name: String,
    /// The CNI plugin's socket and the records of its ADDs (`None`: pods
    /// are found through /proc only, once the API reports them Running).
    pub cni: Option<CniConfig>,
}

async fn client(config: &KubernetesConfig) -> Result<Client> {
    client_for(config.kubeconfig.as_deref()).await
}

/// A client from `kubeconfig`, or the in-cluster configuration if `None`.
pub async fn client_for(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let client_config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no --kubeconfig given and no in-cluster configuration found")?,
    };
    Client::try_from(client_config).context("building the Kubernetes client")
}

/// Starts the watches and returns at once; the feed's `synced` turns true
/// when every watch delivered its first full list, and only from then on
/// are workloads published. `cni`: the pods the CNI plugin announced, merged
/// into this node's pods (local_pods.rs).
pub async fn watch(
    config: &KubernetesConfig,
    metrics: &KubernetesMetrics,
    locator: Arc<dyn NetnsLocator>,
    cni: Option<watch::Receiver<Arc<CniPods>>>,
) -> Result<WorkloadFeed> {
    let client = client(config).await?;
    let node = config.node_name.clone();
    let (tx, workloads) = watch::channel(NodeWorkloads {
        node: node.clone(),
        ..Default::default()
    });
    let (synced_tx, synced) = watch::channel(false);
    let services = services::watch(&client, metrics);
    let streams = Streams {
        local: watched(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        ),
        cluster: watched(Api::all(client.clone()), watcher::Config::default()),
        namespaces: watched(Api::all(client), watcher::Config::default()),
    };
    let health = [
        Health::new("pods_on_node", metrics.watch("pods_on_node")),
        Health::new("pods", metrics.watch("pods")),
        Health::new("namespaces", metrics.watch("namespaces")),
    ];
    let state = SourceState {
        node,
        namespaces: Reduced::default(),
        local: Reduced::default(),
        cluster: Reduced::default(),
        netns: BTreeMap::new(),
        locator,
        cni: cni
            .as_ref()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default(),
    };
    // Without CNI a closed channel: its branch is disabled at once.
    let cni = cni.unwrap_or_else(|| watch::channel(Arc::default()).1);
    tokio::spawn(run(streams, health, state, cni, tx, synced_tx));
    Ok(WorkloadFeed {
        workloads,
        synced: services::all_synced(vec![synced, services.synced]),
        services: services.table,
    })
}

pub(crate) type Watched<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// A watch of `api` with the agent's retry policy ([`watch_backoff`]).
pub(crate) fn watched<K>(api: Api<K>, config: watcher::Config) -> Watched<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config).backoff(watch_backoff()).boxed()
}

/// Retry delays of a failed watch: 0.5 s doubling to 10 s, jittered (up to
/// twice that), reset after two quiet minutes. Shorter than kube-runtime's
/// default (30 s cap) so that a node agent notices a returning API server
/// within seconds, not a minute; the jitter still spreads a cluster's
/// agents apart.
pub(crate) fn watch_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(builder.into(), Duration::from_secs(120))
}

struct Streams {
    local: Watched<Pod>,
    cluster: Watched<Pod>,
    namespaces: Watched<K8sNamespace>,
}

async fn run(
    mut streams: Streams,
    mut health: [Health; 3],
    mut state: SourceState,
    mut cni: watch::Receiver<Arc<CniPods>>,
    tx: watch::Sender<NodeWorkloads>,
    synced_tx: watch::Sender<bool>,
) {
    let [local_health, cluster_health, namespace_health] = &mut health;
    let mut retry = tokio::time::interval(NETNS_RETRY);
    let mut cni_open = true;
    loop {
        // Whether this node's pods or their namespaces may have changed
        // (then their network namespaces are looked for).
        let (changed, local_changed) = tokio::select! {
            Some(item) = streams.local.next() => {
                let changed = local_health.observe(item).is_some_and(|event| {
                    state.local.apply(event, reduce_node_pod)
                });
                (changed, changed)
            }
            Some(item) = streams.cluster.next() => {
                let changed = cluster_health.observe(item).is_some_and(|event| {
                    state.cluster.apply(event, |pod| reduce_pod(pod, KeepLabels::EnrollmentOnly))
                });
                (changed, false)
            }
            Some(item) = streams.namespaces.next() => {
                let changed = namespace_health
                    .observe(item)
                    .is_some_and(|event| state.namespaces.apply(event, reduce_namespace));
                (changed, changed)
            }
            changed = cni.changed(), if cni_open => {
                cni_open = changed.is_ok();
                state.cni = cni.borrow_and_update().clone();
                (cni_open, cni_open)
            }
            _ = retry.tick() => (false, true),
            else => break,
        };
        if !state.synced() {
            continue;
        }
        // Also at the first sync, whichever watch completed it: pods a
        // previous agent left pinned must not lose their capture to a first
        // view that lacks their netns.
        let first_sync = !*synced_tx.borrow();
        let netns_changed = (local_changed || first_sync) && state.refresh_netns();
        if changed || netns_changed || !*synced_tx.borrow() {
            let next = state.snapshot();
            tx.send_if_modified(|current| {
                let modified = *current != next;
                *current = next;
                modified
            });
        }
        if !*synced_tx.borrow() {
            tracing::info!(
                pods_on_node = state.local.len(),
                pods = state.cluster.len(),
                namespaces = state.namespaces.len(),
                "initial Kubernetes sync done"
            );
            synced_tx.send_replace(true);
        }
        if tx.is_closed() {
            break;
        }
    }
}

/// One watch's failures and restarts, logged once per outage and counted.
pub(crate) struct Health {
    resource: &'static str,
    metrics: WatchMetrics,
    failing: bool,
    lists: u64,
}

impl Health {
    pub(crate) fn new(resource: &'static str, metrics: WatchMetrics) -> Self {
        Self {
            resource,
            metrics,
            failing: false,
            lists: 0,
        }
    }

    pub(crate) fn observe<K>(
        &mut self,
        item: Result<Event<K>, watcher::Error>,
    ) -> Option<Event<K>> {
        match item {
            Err(e) => {
                self.metrics.errors.inc();
                if !self.failing {
                    tracing::warn!(resource = self.resource, error = %e,
                        "Kubernetes watch failed; retrying with backoff, the last known state serves");
                }
                self.failing = true;
                None
            }
            Ok(event) => {
                let relist = matches!(event, Event::Init);
                if self.failing || (relist && self.lists > 0) {
                    self.metrics.restarts.inc();
                    tracing::info!(
                        resource = self.resource,
                        relist,
                        "Kubernetes watch restarted"
                    );
                }
                if relist {
                    self.lists += 1;
                }
                self.failing = false;
                Some(event)
            }
        }
    }
}

struct SourceState {
    node: String,
    namespaces: Reduced<Labels>,
    local: Reduced<PodRecord>,
    cluster: Reduced<PodRecord>,
    /// Network namespaces found for this node's enrolled pods, by pod uid.
    netns: BTreeMap<String, PathBuf>,
    locator: Arc<dyn NetnsLocator>,
    /// The CNI plugin's records of this node's pods.
    cni: Arc<CniPods>,
}

impl SourceState {
    fn synced(&self) -> bool {
        self.local.synced() && self.cluster.synced() && self.namespaces.synced()
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces
            .iter()
            .find(|((_, name), _)| name == namespace)
            .map(|(_, labels)| labels)
    }

    /// Keeps the found network namespaces that still exist and looks for
    /// the missing ones of enrolled pods; returns whether any changed.
    fn refresh_netns(&mut self) -> bool {
        let wanted: Vec<String> = self
            .local
            .iter()
            .filter(|((namespace, _), pod)| {
                is_enrolled(&pod.labels, self.namespace_labels(namespace))
            })
            .map(|(_, pod)| pod.uid.clone())
            .collect();
        let mut next = BTreeMap::new();
        for uid in wanted {
            let known = self.netns.get(&uid).filter(|path| path.exists()).cloned();
            if let Some(path) = known.or_else(|| self.locator.locate(&uid)) {
                next.insert(uid, path);
            }
        }
        let changed = next != self.netns;
        self.netns = next;
        changed
    }

    fn snapshot(&self) -> NodeWorkloads {
        let namespaces = self
            .namespaces
            .iter()
            .map(|((_, name), labels)| Namespace {
                name: name.clone(),
                labels: labels.clone(),
            })
            .collect();
        let local = self.local.iter().filter_map(|(key, pod)| {
            local_pods::merge(&self.cni, pod, self.netns.get(&pod.uid)).map(|(netns, ips)| {
                Workload {
                    ips,
                    ..workload(key, pod, netns)
                }
            })
        });
        let remote = self
            .cluster
            .iter()
            .filter(|(_, pod)| pod.node != self.node)
            .map(|(key, pod)| workload(key, pod, PathBuf::new()));
        NodeWorkloads {
            node: self.node.clone(),
            namespaces,
            workloads: local.chain(remote).collect(),
        }
    }
}

fn workload((namespace, name): &(String, String), pod: &PodRecord, netns: PathBuf) -> Workload {
    Workload {
        name: name.clone(),
        namespace: namespace.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.clone(),
        netns,
        ips: pod.ips.clone(),
        node: Some(pod.node.clone()),
        probes: pod.probes.clone(),
        // Pods from the API are always served by the node agent.
        sidecar: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(init: bool) -> Result<Event<Pod>, watcher::Error> {
        Ok(if init { Event::Init } else { Event::InitDone })
    }

    #[test]
    fn a_restart_is_counted_once_per_outage_and_per_relist() {
        let metrics = KubernetesMetrics::register(&prometheus::Registry::new()).unwrap();
        let counters = metrics.watch("pods");
        let mut health = Health::new("pods", counters.clone());
        // The first list is no restart.
        assert!(health.observe(event(true)).is_some());
        health.observe(event(false));
        assert_eq!(counters.restarts.get(), 0);
        // An outage: each failed attempt is an error, the resumption one
        // restart, even when it resumes with a re-list.
        for _ in 0..3 {
            assert!(
                health
                    .observe::<Pod>(Err(watcher::Error::NoResourceVersion))
                    .is_none()
            );
        }
        health.observe(event(true));
        health.observe(event(false));
        assert_eq!((counters.errors.get(), counters.restarts.get()), (3, 1));
        // A re-list without an error (410 Gone) is a restart too.
        health.observe(event(true));
        assert_eq!(counters.restarts.get(), 2);
    }

    struct NoNetns;

    impl NetnsLocator for NoNetns {
        fn locate(&self, _: &str) -> Option<PathBuf> {
            None
        }
    }

    #[test]
    fn snapshots_keep_only_remote_pods_of_other_nodes_and_mark_unlocated_netns() {
        let record = |node: &str, uid: &str| PodRecord {
            uid: uid.into(),
            service_account: "sa".into(),
            node: node.into(),
            ips: vec!["198.18.0.10".parse().unwrap()],
            labels: Labels::new(),
            probes: Default::default(),
        };
        let mut state = SourceState {
            node: "n0".into(),
            namespaces: Reduced::default(),
            local: Reduced::default(),
            cluster: Reduced::default(),
            netns: BTreeMap::new(),
            locator: Arc::new(NoNetns),
            cni: Arc::default(),
        };
        let key = |name: &str| ("ns".to_string(), name.to_string());
        state.local.insert_for_test(key("a"), record("n0", "u-a"));
        state.cluster.insert_for_test(key("a"), record("n0", "u-a"));
        state.cluster.insert_for_test(key("b"), record("n1", "u-b"));
        state
            .netns
            .insert("u-a".into(), PathBuf::from("/proc/1/ns/net"));
        let snapshot = state.snapshot();
        let names: Vec<(&str, Option<&str>)> = snapshot
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.node.as_deref()))
            .collect();
        assert_eq!(names, [("a", Some("n0")), ("b", Some("n1"))]);
        assert_eq!(snapshot.workloads[0].netns, PathBuf::from("/proc/1/ns/net"));
        assert_eq!(snapshot.workloads[1].netns, PathBuf::new());
    }
}
