//! Prometheus metrics (listed in docs/operations.md), served by [`crate::admin`] on `/metrics`.
//!
//! Every label has a fixed, small value set (directions, decisions,
//! handshake failure reasons) except `spiffe_id` on the SVID expiry gauge,
//! which is bounded by this node's workload identities. Nothing is labelled
//! per connection, peer address or remote identity: such labels would grow
//! without bound with traffic.
//!
//! `ambit_bytes_total{direction}` is from the client's point of view:
//! `sent` is what the connection's initiator sent to the server, `received`
//! what it got back, whichever side of the node the client is on.

mod guard;
mod handshake;
mod kubernetes;
mod rejection;
mod service_outcome;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
mod tunnel;

use std::{collections::HashSet, sync::Mutex};

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

pub use guard::ActiveConnection;
pub use handshake::HandshakeFailure;
pub use kubernetes::{KubernetesMetrics, WatchMetrics};
pub use rejection::Rejection;
pub use service_outcome::ServiceOutcome;
pub use tunnel::TunnelMetrics;

use crate::audit::{Decision, Direction};

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const TEXT_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The agent's metrics, on a registry of their own (not the process-global
/// one) so tests and several agents in one process do not share counters.
///
/// Label children are resolved once here: the data path increments a plain
/// atomic instead of hashing label values on every connection.
pub struct Metrics {
    registry: Registry,
    /// `[direction][decision]`, in [`Direction::ALL`] × [`Decision::ALL`]
    /// order.
    opened: [[IntCounter; 2]; 2],
    active: [IntGauge; 2],
    /// `[sent, received]`.
    bytes: [IntCounter; 2],
    policy_denials: IntCounter,
    handshake_failures: [IntCounter; 6],
    /// In [`Rejection::ALL`] order.
    connections_rejected: [IntCounter; 4],
    /// In [`ServiceOutcome::ALL`] order.
    service_connections: [IntCounter; 4],
    svid_expiry: IntGaugeVec,
    /// SPIFFE IDs currently in `svid_expiry`, to remove the ones that leave.
    svid_ids: Mutex<HashSet<String>>,
    enrolled_workloads: IntGauge,
    mesh_destinations: IntGauge,
    workloads_not_captured: IntGauge,
    policy_reload_rejections: IntCounter,
    decision_cache_hits: IntCounter,
    decision_cache_misses: IntCounter,
    audit_records_dropped: IntCounter,
    audit_records_suppressed: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let opened = counter_vec(
            &registry,
            "ambit_connections_opened_total",
            "Connections accepted by the proxy, by direction and policy decision.",
            &["direction", "decision"],
        );
        let active = gauge_vec(
            &registry,
            "ambit_connections_active",
            "Connections currently open through the proxy.",
            &["direction"],
        );
        let bytes = counter_vec(
            &registry,
            "ambit_bytes_total",
            "Bytes relayed; sent = client to server, received = server to client.",
            &["direction"],
        );
        let handshakes = counter_vec(
            &registry,
            "ambit_tls_handshake_failures_total",
            "Failed TLS handshakes, by reason.",
            &["reason"],
        );
        let rejected = counter_vec(
            &registry,
            "ambit_connections_rejected_total",
            "Connections closed at accept because an admission limit was reached, by limit.",
            &["reason"],
        );
        let services = counter_vec(
            &registry,
            "ambit_service_connections_total",
            "Captured connections to a Service ClusterIP, by outcome (sent to an endpoint, or refused and why).",
            &["outcome"],
        );
        Metrics {
            service_connections: ServiceOutcome::ALL
                .map(|outcome| services.with_label_values(&[outcome.as_str()])),
            connections_rejected: Rejection::ALL
                .map(|reason| rejected.with_label_values(&[reason.as_str()])),
            opened: Direction::ALL.map(|dir| {
                Decision::ALL.map(|dec| opened.with_label_values(&[dir.as_str(), dec.as_str()]))
            }),
            active: Direction::ALL.map(|dir| active.with_label_values(&[dir.as_str()])),
            bytes: ["sent", "received"].map(|dir| bytes.with_label_values(&[dir])),
            policy_denials: counter(
                &registry,
                "ambit_policy_denials_total",
                "Connections or streams denied by policy.",
            ),
            handshake_failures: HandshakeFailure::ALL
                .map(|reason| handshakes.with_label_values(&[reason.as_str()])),
            svid_expiry: gauge_vec(
                &registry,
                "ambit_svid_expiry_timestamp_seconds",
                "Expiry (not_after, Unix seconds) of each workload SVID held by this node.",
                &["spiffe_id"],
            ),
            svid_ids: Mutex::default(),
            enrolled_workloads: gauge(
                &registry,
                "ambit_enrolled_workloads",
                "Workloads on this node currently enrolled in the mesh.",
            ),
            mesh_destinations: gauge(
                &registry,
                "ambit_mesh_destinations",
                "Addresses of mesh workloads on any node that this agent knows, each with the SPIFFE ID expected there.",
            ),
            workloads_not_captured: gauge(
                &registry,
                "ambit_workloads_not_captured",
                "Enrolled workloads on this node whose capture failed (retried; see /readyz).",
            ),
            policy_reload_rejections: counter(
                &registry,
                "ambit_policy_reload_rejections_total",
                "Policy reloads rejected as invalid (the last good policy kept serving).",
            ),
            decision_cache_hits: counter(
                &registry,
                "ambit_policy_decision_cache_hits_total",
                "Policy decisions answered from the decision cache.",
            ),
            decision_cache_misses: counter(
                &registry,
                "ambit_policy_decision_cache_misses_total",
                "Policy decisions that had to be evaluated.",
            ),
            audit_records_dropped: counter(
                &registry,
                "ambit_audit_records_dropped_total",
                "Audit records dropped because the audit writer fell behind or failed.",
            ),
            audit_records_suppressed: counter(
                &registry,
                "ambit_audit_records_suppressed_total",
                "Refusals without a verified identity counted into audit summaries instead of recorded one by one (rate limit).",
            ),
            registry,
        }
    }

    /// The registry, to register collectors owned by other modules.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a connection accepted with `decision`. Denials by policy are
    /// also counted by [`Self::policy_denied`], which covers denied tunnel
    /// streams too; callers count both.
    pub fn connection_opened(&self, direction: Direction, decision: Decision) {
        self.opened[direction as usize][decision as usize].inc();
    }

    /// Counts an open connection until the guard is dropped.
    pub fn connection_active(&self, direction: Direction) -> ActiveConnection {
        ActiveConnection::new(self.active[direction as usize].clone())
    }

    /// Adds relayed bytes, from the client's point of view.
    pub fn add_bytes(&self, sent: u64, received: u64) {
        self.bytes[0].inc_by(sent);
        self.bytes[1].inc_by(received);
    }

    pub fn policy_denied(&self) {
        self.policy_denials.inc();
    }

    pub fn tls_handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].inc();
    }

    pub fn connection_rejected(&self, reason: Rejection) {
        self.connections_rejected[reason as usize].inc();
    }

    pub fn service_connection(&self, outcome: ServiceOutcome) {
        self.service_connections[outcome as usize].inc();
    }

    /// Replaces the SVID expiry series with `svids` (SPIFFE ID, `not_after`
    /// in Unix seconds): identities no longer held disappear, so the label
    /// set follows the node's workloads instead of growing with history.
    pub fn set_svid_expiries<'a>(&self, svids: impl IntoIterator<Item = (&'a str, i64)>) {
        let mut ids = self.svid_ids.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = HashSet::new();
        for (id, not_after) in svids {
            self.svid_expiry.with_label_values(&[id]).set(not_after);
            current.insert(id.to_owned());
        }
        for gone in ids.difference(&current) {
            // Err only if absent, which is the state we want.
            let _ = self.svid_expiry.remove_label_values(&[gone.as_str()]);
        }
        *ids = current;
    }

    pub fn set_enrolled_workloads(&self, count: usize) {
        self.enrolled_workloads
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_mesh_destinations(&self, count: usize) {
        self.mesh_destinations
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_workloads_not_captured(&self, count: usize) {
        self.workloads_not_captured
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn policy_reload_rejected(&self) {
        self.policy_reload_rejections.inc();
    }

    pub fn decision_cache_hit(&self) {
        self.decision_cache_hits.inc();
    }

    pub fn decision_cache_miss(&self) {
        self.decision_cache_misses.inc();
    }

    /// Advances the decision-cache counters to the policy engine's running
    /// totals (`policy::Engine::cache_stats`). Never goes backwards.
    pub fn sync_decision_cache(&self, hits: u64, misses: u64) {
        for (counter, total) in [
            (&self.decision_cache_hits, hits),
            (&self.decision_cache_misses, misses),
        ] {
            let current = counter.get();
            if total > current {
                counter.inc_by(total - current);
            }
        }
    }

    /// Advances the dropped-audit-records counter to `total`, the running
    /// count from [`crate::audit::AuditLog::dropped`]. Keeps the audit module
    /// free of Prometheus; call it before encoding. Never goes backwards.
    pub fn sync_audit_dropped(&self, total: u64) {
        let current = self.audit_records_dropped.get();
        if total > current {
            self.audit_records_dropped.inc_by(total - current);
        }
    }

    /// Advances the suppressed-audit-records counter to `total`, the running
    /// count from [`crate::audit::AuditLog::suppressed`]. Never goes
    /// backwards.
    pub fn sync_audit_suppressed(&self, total: u64) {
        let current = self.audit_records_suppressed.get();
        if total > current {
            self.audit_records_suppressed.inc_by(total - current);
        }
    }

    /// All metrics in the Prometheus text format ([`TEXT_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Only a collector registered through `registry()` with an invalid
        // family can fail; the metrics encoded before it are still worth
        // serving.
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }
}

// Registration fails only for an invalid or duplicate name; the names are
// fixed above and covered by the tests, so a failure is a programming error.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric definitions are valid and unique");
    collector
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter vec"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge vec"),
    )
}
