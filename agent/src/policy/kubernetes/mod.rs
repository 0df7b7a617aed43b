//! Policies from the Kubernetes API (`ambit run --kubernetes`): a watch of
//! every `AuthorizationPolicy` object of the cluster (CRD
//! `deploy/chart/crds/authorizationpolicies.ambit.dev.yaml`), each object's
//! spec checked by the same parser as policy files, published with the
//! policy files' set (if any) as one [`PolicySet`] into the same engine.
//!
//! An invalid object does not replace its last valid version, nor touch the
//! rest of the set; every object gets an `Accepted` condition in its status
//! ([`status`]). Until the first complete list the set fails closed (and
//! /readyz says no policy set is loaded). While the API server is
//! unreachable the last published set keeps serving.

mod crd;
mod explain;
mod objects;
mod status;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher,
};
use tokio::sync::watch;

pub use self::explain::explain_in_cluster;
use self::{
    objects::{Objects, combine, same_policies},
    status::StatusWriter,
};
use super::{PolicySet, Rejections, Settings};
use crate::workloads::kubernetes::{Health, watched};

pub const GROUP: &str = "ambit.dev";
pub const VERSION: &str = "v1alpha1";
pub const PLURAL: &str = "authorizationpolicies";

/// How often conditions that could not be written are tried again (they
/// are also retried on every change).
const STATUS_RETRY: Duration = Duration::from_secs(10);

/// The AuthorizationPolicy resource, for dynamic API calls.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, super::KIND), PLURAL)
}

/// Starts the watch and returns the receiver of combined sets: fail-closed
/// until the first list, then the files' policies (`files`, if any) and
/// the cluster's. Counts each newly invalid object in `rejections`. Must
/// be called within a Tokio runtime.
pub(crate) fn watch(
    client: Client,
    files: Option<watch::Receiver<Arc<PolicySet>>>,
    settings: Settings,
    health: Health,
    rejections: Rejections,
) -> watch::Receiver<Arc<PolicySet>> {
    let (tx, rx) = watch::channel(Arc::new(PolicySet::fail_closed(settings.clone())));
    let files = files.unwrap_or_else(|| {
        let empty = PolicySet::new(Vec::new(), settings.clone()).expect("no policy, no duplicate");
        // No file ever changes: the sender is dropped, so `changed` never
        // fires (and is not polled again).
        watch::channel(Arc::new(empty)).1
    });
    let stream = watched(
        Api::<DynamicObject>::all_with(client.clone(), &resource()),
        watcher::Config::default(),
    );
    let source = Source {
        files,
        settings,
        objects: Objects::default(),
        status: StatusWriter::new(client),
        rejections,
        tx,
    };
    tokio::spawn(source.run(stream, health));
    rx
}

struct Source {
    files: watch::Receiver<Arc<PolicySet>>,
    settings: Settings,
    objects: Objects,
    status: StatusWriter,
    rejections: Rejections,
    tx: watch::Sender<Arc<PolicySet>>,
}

impl Source {
    async fn run(
        mut self,
        mut stream: crate::workloads::kubernetes::Watched<DynamicObject>,
        mut health: Health,
    ) {
        let mut retry = tokio::time::interval(STATUS_RETRY);
        loop {
            tokio::select! {
                Some(item) = stream.next() => {
                    if let Some(event) = health.observe(item) {
                        let reported = self.objects.problems_reported();
                        self.objects.apply(event);
                        for _ in reported..self.objects.problems_reported() {
                            self.rejections.add_one();
                        }
                    }
                }
                Ok(()) = self.files.changed() => {}
                _ = retry.tick() => {}
                else => break,
            }
            if !self.objects.synced() {
                continue;
            }
            let files = Arc::clone(&self.files.borrow_and_update());
            let (set, conditions) = combine(&files, &self.objects, &self.settings);
            let first = !self.tx.borrow().is_loaded() && set.is_loaded();
            let published = self.tx.send_if_modified(|current| {
                if same_policies(current, &set) {
                    return false;
                }
                *current = Arc::new(set);
                true
            });
            if published {
                let current = self.tx.borrow();
                tracing::info!(
                    policies = current.len(),
                    from_files = files.len(),
                    first,
                    "policy set from the cluster in force"
                );
            }
            self.status.review(&self.objects, conditions);
            if self.tx.is_closed() {
                break;
            }
        }
    }
}
