//! The gate every inbound connection passes before a byte reaches the
//! application: the policy decision, its audit record and its metrics, in
//! one place so no handler can decide without recording.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use crate::{
    audit::{self, AuditLog, AuditRecord, Event},
    identity::SpiffeId,
    metrics::{ActiveConnection, HandshakeFailure, Metrics},
    pod::PodContext,
    policy::{Decision, Engine, PolicySet, Request},
    proxy::relay::RelayStats,
    workloads::Workload,
};

pub struct Gate {
    pub engine: Arc<Engine>,
    /// Every valid policy set as it is published, to re-check running
    /// connections when the policy changes.
    pub sets: watch::Receiver<Arc<PolicySet>>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// Close running connections a new policy no longer allows.
    pub close_on_policy_change: bool,
}

/// The facts of one connection, for its audit records.
#[derive(Clone, Debug)]
pub struct Connection {
    pub direction: audit::Direction,
    pub source: Option<SpiffeId>,
    pub source_addr: SocketAddr,
    pub workload: Arc<Workload>,
    pub workload_id: Option<SpiffeId>,
    pub dst: SocketAddr,
    pub tls_version: Option<String>,
    pub peer_cert_serial: Option<String>,
}

impl Connection {
    fn request(&self) -> Request<'_> {
        self.request_to(&self.workload)
    }

    /// The same connection, as if it were for `workload` (the destination
    /// pod's current spec, after a label change).
    fn request_to<'a>(&'a self, workload: &'a Workload) -> Request<'a> {
        Request {
            source: self.source.as_ref(),
            destination: workload.into(),
            port: self.dst.port(),
        }
    }

    fn record(&self, event: Event, decision: audit::Decision, reason: &str) -> AuditRecord {
        let mut record = AuditRecord::new(
            event,
            self.direction,
            audit::Source {
                spiffe_id: self.source.as_ref().map(|s| s.as_str().to_owned()),
                address: self.source_addr,
            },
            audit::Destination {
                workload: Some(self.workload.id()),
                spiffe_id: self.workload_id.as_ref().map(|s| s.as_str().to_owned()),
                address: self.dst.ip(),
                port: self.dst.port(),
            },
            decision,
            reason,
        );
        record.tls_version = self.tls_version.clone();
        record.peer_cert_serial = self.peer_cert_serial.clone();
        record
    }
}

fn verdict(allowed: bool) -> audit::Decision {
    if allowed {
        audit::Decision::Allow
    } else {
        audit::Decision::Deny
    }
}

impl Gate {
    /// Decides on `conn` by policy, and records the decision.
    pub fn decide(&self, conn: &Connection) -> Arc<Decision> {
        let decision = self.engine.decide(&conn.request());
        self.record_decision(conn, &decision);
        decision
    }

    /// Denies `conn` for a reason that is not a policy's (e.g. plaintext to
    /// a strict workload), and records it.
    pub fn deny(&self, conn: &Connection, reason: &str) {
        let decision = Decision {
            allowed: false,
            policy: None,
            rule: None,
            reason: reason.to_owned(),
        };
        self.record_decision(conn, &decision);
    }

    /// Lets a kubelet probe through without a policy decision: it carries
    /// no identity, and the kernel saw it opened on the node. Counted, and
    /// audited through the per-source limiter like refusals without an
    /// identity, so the kubelet's steady probes cost a burst of records and
    /// then one summary per window, not a record each.
    pub fn allow_probe(&self, conn: &Connection, reason: &str) {
        self.metrics
            .connection_opened(conn.direction, audit::Decision::Allow);
        let record = conn.record(Event::Decision, audit::Decision::Allow, reason);
        self.audit.record_unauthenticated(record);
    }

    fn record_decision(&self, conn: &Connection, decision: &Decision) {
        let outcome = verdict(decision.allowed);
        self.metrics.connection_opened(conn.direction, outcome);
        if !decision.allowed {
            self.metrics.policy_denied();
        }
        let mut record = conn.record(Event::Decision, outcome, &decision.reason);
        record.policy = decision.policy.clone();
        record.rule = decision.rule.map(|r| u32::try_from(r).unwrap_or(u32::MAX));
        if conn.source.is_none() && !decision.allowed {
            // Costs the client one TCP connection: rate-limited per source
            // so a flood cannot fill the log (the rest are summarised).
            self.audit.record_unauthenticated(record);
        } else {
            self.audit.record(record);
        }
    }

    /// A TLS handshake on the tunnel port failed: nothing was decided by
    /// policy, but the refusal is audited and counted.
    pub fn handshake_failed(
        &self,
        source_addr: SocketAddr,
        workload: &Arc<Workload>,
        dst: SocketAddr,
        failure: HandshakeFailure,
        reason: &str,
    ) {
        self.metrics.tls_handshake_failed(failure);
        let conn = Connection {
            direction: audit::Direction::Inbound,
            source: None,
            source_addr,
            workload: Arc::clone(workload),
            workload_id: None,
            dst,
            tls_version: None,
            peer_cert_serial: None,
        };
        let record = conn.record(
            Event::Decision,
            audit::Decision::Deny,
            &format!("TLS handshake failed: {reason}"),
        );
        self.audit.record_unauthenticated(record);
    }

    /// Relays an allowed connection to `pod` until both sides close, a
    /// newly published policy or a change of the pod's labels no longer
    /// allows it, or the pod is released; counts it as active meanwhile,
    /// and records its close. Returns the relay's outcome and the reason
    /// it ended.
    pub async fn relay(
        &self,
        conn: &Connection,
        pod: &PodContext,
        relaying: impl Future<Output = (RelayStats, std::io::Result<()>)>,
    ) -> (RelayStats, std::io::Result<()>, String) {
        let _active: ActiveConnection = self.metrics.connection_active(conn.direction);
        // Biased: when the pod is released, its tunnel connections are torn
        // down too, and the relay's resulting error must not hide why.
        let (stats, result, reason) = tokio::select! {
            biased;
            () = pod.released() => (
                RelayStats::default(),
                Ok(()),
                "closed: the workload was released".to_owned(),
            ),
            revoked = self.revoked(conn, pod) => (
                RelayStats::default(),
                Ok(()),
                format!("closed: the policy no longer allows it ({})", revoked.reason),
            ),
            (stats, result) = relaying => (stats, result, "closed".to_owned()),
        };
        self.closed(conn, &stats, &reason);
        (stats, result, reason)
    }

    /// Records the end of an allowed connection.
    fn closed(&self, conn: &Connection, stats: &RelayStats, reason: &str) {
        self.metrics.add_bytes(stats.sent, stats.received);
        let mut record = conn.record(Event::Close, audit::Decision::Allow, reason);
        record.bytes_sent = Some(stats.sent);
        record.bytes_received = Some(stats.received);
        record.duration_ms = Some(u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX));
        self.audit.record(record);
    }

    /// Resolves when a newly published policy set, or the destination
    /// pod's new labels, no longer allow `conn` (never, when closing on
    /// policy change is off).
    async fn revoked(&self, conn: &Connection, pod: &PodContext) -> Decision {
        if !self.close_on_policy_change {
            return std::future::pending().await;
        }
        let mut sets = self.sets.clone();
        sets.mark_unchanged();
        let mut states = pod.watch_state();
        states.mark_unchanged();
        loop {
            tokio::select! {
                changed = sets.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
                changed = states.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
            let spec = Arc::clone(&states.borrow_and_update().spec);
            let decision = if conn.source.is_none() && !spec.permissive() {
                Decision {
                    allowed: false,
                    policy: None,
                    rule: None,
                    reason: "plaintext to a workload that is now strict mTLS".to_owned(),
                }
            } else {
                sets.borrow_and_update().evaluate(&conn.request_to(&spec))
            };
            if !decision.allowed {
                let mut now = conn.clone();
                now.workload = spec;
                self.record_decision(&now, &decision);
                return decision;
            }
        }
    }
}

/// Seconds since the epoch, for the SVID expiry gauge.
pub fn unix_seconds(at: SystemTime) -> i64 {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        audit::LimiterConfig,
        policy::{PolicySet, Settings},
    };

    fn gate(log: &Path) -> Gate {
        // The mesh default (deny) decides everything: no policies.
        let set = Arc::new(PolicySet::new(Vec::new(), Settings::default()).unwrap());
        let (_tx, sets) = watch::channel(Arc::clone(&set));
        let limits = LimiterConfig {
            burst: 1,
            per_sec: 0.001,
            ..LimiterConfig::default()
        };
        Gate {
            engine: Arc::new(Engine::new(set)),
            sets,
            audit: Arc::new(AuditLog::open_file(log, u64::MAX, "node-a", limits).unwrap()),
            metrics: Arc::new(Metrics::new()),
            close_on_policy_change: true,
        }
    }

    fn connection(source: Option<&str>) -> Connection {
        Connection {
            direction: audit::Direction::Inbound,
            source: source.map(|s| SpiffeId::parse(s).unwrap()),
            source_addr: "198.18.0.12:40000".parse().unwrap(),
            workload: Arc::new(Workload {
                name: "server".into(),
                namespace: "default".into(),
                service_account: "server".into(),
                labels: Default::default(),
                netns: "/var/run/netns/server".into(),
                ips: vec!["198.18.1.10".parse().unwrap()],
                node: None,
                probes: Default::default(),
                sidecar: false,
            }),
            workload_id: None,
            dst: "198.18.1.10:8080".parse().unwrap(),
            tls_version: None,
            peer_cert_serial: None,
        }
    }

    #[test]
    fn only_refusals_without_a_verified_identity_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let gate = gate(&log);
        let plaintext = connection(None);
        let peer = connection(Some("spiffe://cluster.local/ns/default/sa/frontend"));
        for _ in 0..5 {
            gate.deny(&plaintext, "plaintext from outside the mesh");
            gate.handshake_failed(
                plaintext.source_addr,
                &plaintext.workload,
                plaintext.dst,
                HandshakeFailure::Timeout,
                "timed out",
            );
            // Same source address, denied too, but authenticated.
            assert!(!gate.decide(&peer).allowed);
        }
        assert_eq!(gate.audit.suppressed(), 9);
        drop(gate); // the last reference closes the log, writing summaries
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let authenticated = records
            .iter()
            .filter(|r| r["source"]["spiffe_id"].is_string())
            .count();
        assert_eq!(authenticated, 5);
        let sourceless: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["source"]["spiffe_id"].is_null())
            .collect();
        assert_eq!(sourceless.len(), 2, "{sourceless:?}");
        assert_eq!(sourceless[0]["event"], "decision");
        assert_eq!(sourceless[1]["event"], "suppressed");
        assert_eq!(sourceless[1]["suppressed"], 9);
    }
}
