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
    svids::{SvidStore, hex},
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
    pub node: String,
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
            node,
            rejections_seen: AtomicU64::new(0),
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    format_rfc3339(time::OffsetDateTime::from(at))
}

impl AdminState for AgentState {
    fn metrics(&self) -> String {
        // Gauges and counters owned elsewhere are brought up to date on scrape.
        let enrolled = self.enrolled.lock().expect("enrolled lock").len();
        self.metrics.set_enrolled_workloads(enrolled);
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
        if !self.policies.borrow().is_loaded() {
            return Err("no valid policy set loaded yet".into());
        }
        let enrolled = self.enrolled.lock().expect("enrolled lock");
        match enrolled.values().find(|(_, id)| !self.svids.has(id)) {
            Some((w, id)) => Err(format!("workload {} has no SVID yet ({id})", w.id())),
            None => Ok(()),
        }
    }

    fn config_dump(&self) -> Value {
        let enrolled = self.enrolled.lock().expect("enrolled lock");
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
                serial: hex(s.serial()),
                not_before: rfc3339(s.certificate().not_before()),
                not_after: rfc3339(s.not_after()),
            })
            .collect()
    }
}
