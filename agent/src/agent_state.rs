//! The agent's answers to the admin server: live metrics, readiness,
//! configuration and certificates (never keys).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    admin::{AdminState, CertInfo},
    audit::{AuditLog, format_rfc3339},
    gate::unix_seconds,
    identity::SpiffeId,
    metrics::Metrics,
    policy::{Engine, PolicySet, Rejections},
    svids::SvidStore,
    workloads::Workload,
};

pub struct AgentState {
    pub metrics: Arc<Metrics>,
    pub svids: Arc<SvidStore>,
    pub policies: watch::Receiver<Arc<PolicySet>>,
    pub engine: Arc<Engine>,
    pub rejections: Rejections,
    pub audit: Arc<AuditLog>,
    /// Enrolled workloads and their identities, kept by the control loop.
    pub enrolled: Mutex<BTreeMap<String, (Workload, SpiffeId)>>,
    /// Workloads that should be captured but are not, with the last error.
    pub not_captured: Mutex<BTreeMap<String, String>>,
    pub node: String,
    /// False until the workload source has its first complete view.
    pub workloads_synced: watch::Receiver<bool>,
    rejections_seen: AtomicU64,
}

impl AgentState {
    pub fn new(
        metrics: Arc<Metrics>,
        svids: Arc<SvidStore>,
        policies: watch::Receiver<Arc<PolicySet>>,
        engine: Arc<Engine>,
        rejections: Rejections,
        audit: Arc<AuditLog>,
        node: String,
    ) -> Self {
        Self {
            metrics,
            svids,
            policies,
            engine,
            rejections,
            audit,
            enrolled: Mutex::new(BTreeMap::new()),
            not_captured: Mutex::new(BTreeMap::new()),
            node,
            // A source that starts incomplete replaces this.
            workloads_synced: watch::channel(true).1,
            rejections_seen: AtomicU64::new(0),
        }
    }
}

/// The maps here are replaced entry by entry, so they stay consistent even
/// if a holder panicked.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn rfc3339(at: SystemTime) -> String {
    format_rfc3339(time::OffsetDateTime::from(at))
}

impl AdminState for AgentState {
    fn metrics(&self) -> String {
        // Gauges and counters owned elsewhere are brought up to date on scrape.
        let enrolled = lock(&self.enrolled).len();
        self.metrics.set_enrolled_workloads(enrolled);
        self.metrics
            .set_workloads_not_captured(lock(&self.not_captured).len());
        let svids = self.svids.current();
        self.metrics.set_svid_expiries(
            svids
                .iter()
                .map(|s| (s.spiffe_id().as_str(), unix_seconds(s.not_after()))),
        );
        self.metrics.sync_audit_dropped(self.audit.dropped());
        self.metrics.sync_audit_suppressed(self.audit.suppressed());
        let cache = self.engine.cache_stats();
        self.metrics.sync_decision_cache(cache.hits, cache.misses);
        let total = self.rejections.count();
        let seen = self.rejections_seen.swap(total, Ordering::Relaxed);
        for _ in seen..total {
            self.metrics.policy_reload_rejected();
        }
        self.metrics.encode()
    }

    fn ready(&self) -> Result<(), String> {
        if !*self.workloads_synced.borrow() {
            return Err("waiting for the initial Kubernetes sync".into());
        }
        if !self.policies.borrow().is_loaded() {
            return Err("no valid policy set loaded yet".into());
        }
        if let Some((id, error)) = lock(&self.not_captured).iter().next() {
            return Err(format!(
                "workload {id} should be captured but is not: {error}"
            ));
        }
        let enrolled = lock(&self.enrolled);
        match enrolled.values().find(|(_, id)| !self.svids.has(id)) {
            Some((w, id)) => Err(format!("workload {} has no SVID yet ({id})", w.id())),
            None => Ok(()),
        }
    }

    fn config_dump(&self) -> Value {
        let enrolled = lock(&self.enrolled);
        let policies = self.policies.borrow();
        json!({
            "node": self.node,
            "workloads": enrolled.values().map(|(w, id)| json!({
                "workload": w.id(),
                "spiffe_id": id.as_str(),
                "service_account": w.service_account,
                "labels": w.labels,
                "ips": w.ips,
                "permissive": w.permissive(),
            })).collect::<Vec<_>>(),
            "not_captured": lock(&self.not_captured).iter().map(|(w, error)| json!({
                "workload": w,
                "error": error,
            })).collect::<Vec<_>>(),
            "policies": {
                "default": policies.settings().default_action.to_string(),
                "root_namespace": policies.settings().root_namespace,
                "loaded": policies.is_loaded(),
                "files": policies.files(),
                "names": policies.policies().iter().map(|p| p.id()).collect::<Vec<_>>(),
            },
            "certificates": self.certs(),
        })
    }

    fn certs(&self) -> Vec<CertInfo> {
        self.svids
            .current()
            .iter()
            .map(|s| CertInfo {
                spiffe_id: s.spiffe_id().as_str().to_owned(),
                serial: hex::encode(s.serial()),
                not_before: rfc3339(s.certificate().not_before()),
                not_after: rfc3339(s.not_after()),
            })
            .collect()
    }
}
