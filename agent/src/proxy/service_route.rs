//! Outbound connections to a Service ClusterIP: the ready endpoint they go
//! to instead ([`crate::services`]), and their audit records, which show
//! the service the application dialled next to the endpoint chosen. The
//! destination's agent audits its policy decision as for any connection;
//! only this agent knows the ClusterIP.

use std::{net::SocketAddr, sync::Arc};

use super::{loop_guard, relay::RelayStats};
use crate::{
    audit::{self, AuditLog, AuditRecord, Event},
    metrics::{Metrics, ServiceOutcome},
    pod::PodState,
    proxy::loop_guard::AgentPorts,
    services::{ServiceName, ServiceTable},
    workloads::directory::Destination,
};

/// Where the agent sends a captured connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The original destination, or the endpoint chosen for a service.
    pub target: SocketAddr,
    pub service: Option<ServiceHop>,
}

/// The service a connection was made to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHop {
    pub name: ServiceName,
    /// The ClusterIP and port the application dialled.
    pub dialled: SocketAddr,
}

/// A connection to a service that cannot be sent anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub hop: ServiceHop,
    pub outcome: ServiceOutcome,
    pub reason: String,
}

/// The route for a connection to `orig_dst`: itself, unless it is a
/// ClusterIP, then the next ready endpoint of that service port.
pub fn route(
    orig_dst: SocketAddr,
    table: &ServiceTable,
    ports: AgentPorts,
) -> Result<Route, Refused> {
    let Some(resolved) = table.resolve(orig_dst) else {
        return Ok(Route {
            target: orig_dst,
            service: None,
        });
    };
    let hop = ServiceHop {
        name: resolved.service,
        dialled: resolved.cluster_addr,
    };
    let endpoint = match resolved.endpoint {
        Ok(endpoint) => endpoint,
        Err(why) => {
            return Err(Refused {
                reason: format!("service {} at {}: {why}", hop.name, hop.dialled),
                outcome: why.into(),
                hop,
            });
        }
    };
    // Endpoints are written by users too: never let one make the agent
    // dial loopback or its own listeners from inside the pod.
    if let Some(why) = loop_guard::refusal(endpoint, ports) {
        return Err(Refused {
            reason: format!(
                "service {} at {}: endpoint {endpoint} refused: {why}",
                hop.name, hop.dialled
            ),
            outcome: ServiceOutcome::Loop,
            hop,
        });
    }
    Ok(Route {
        target: endpoint,
        service: Some(hop),
    })
}

/// Writes the audit records of one connection to a service.
pub struct ServiceAudit {
    log: Arc<AuditLog>,
    source: audit::Source,
    service: audit::Service,
}

impl ServiceAudit {
    /// `client` is the application's socket as the outbound listener saw
    /// it (on loopback, where capture sent it): the record names the pod
    /// by its SPIFFE ID and its own address, with the application's port.
    pub fn new(log: Arc<AuditLog>, pod: &PodState, client: SocketAddr, hop: &ServiceHop) -> Self {
        let ips = &pod.spec.ips;
        let pod_ip = ips
            .iter()
            .find(|ip| ip.is_ipv4() == hop.dialled.is_ipv4())
            .or(ips.first())
            .copied()
            .unwrap_or(client.ip());
        ServiceAudit {
            log,
            source: audit::Source {
                spiffe_id: Some(pod.identity.as_str().to_owned()),
                address: SocketAddr::new(pod_ip, client.port()),
            },
            service: audit::Service {
                name: hop.name.to_string(),
                address: hop.dialled.ip(),
                port: hop.dialled.port(),
            },
        }
    }

    fn record(
        &self,
        event: Event,
        decision: audit::Decision,
        target: SocketAddr,
        peer: Option<&Destination>,
        reason: &str,
    ) -> AuditRecord {
        let destination = audit::Destination {
            workload: peer.map(|p| p.workload.clone()),
            spiffe_id: peer.map(|p| p.spiffe_id.as_str().to_owned()),
            address: target.ip(),
            port: target.port(),
        };
        let mut record = AuditRecord::new(
            event,
            audit::Direction::Outbound,
            self.source.clone(),
            destination,
            decision,
            reason,
        );
        record.service = Some(self.service.clone());
        record
    }

    /// The connection was refused: nowhere to send it. The destination is
    /// the ClusterIP itself.
    pub fn refused(&self, refused: &Refused, metrics: &Metrics) {
        metrics.service_connection(refused.outcome);
        metrics.connection_opened(audit::Direction::Outbound, audit::Decision::Deny);
        let record = self.record(
            Event::Decision,
            audit::Decision::Deny,
            refused.hop.dialled,
            None,
            &refused.reason,
        );
        self.log.record(record);
    }

    /// The endpoint was chosen; `peer` is the mesh workload there (reached
    /// through the tunnel), `None` for a destination outside the mesh.
    pub fn sent(&self, target: SocketAddr, peer: Option<&Destination>, metrics: &Metrics) {
        metrics.service_connection(ServiceOutcome::Endpoint);
        let how = match peer {
            Some(p) => format!("through the tunnel to {}", p.spiffe_id),
            None => "in plaintext: the endpoint is outside the mesh".to_owned(),
        };
        let reason = format!("service endpoint chosen; sent {how}");
        let record = self.record(
            Event::Decision,
            audit::Decision::Allow,
            target,
            peer,
            &reason,
        );
        self.log.record(record);
    }

    /// The connection ended: relayed until `closed` (or an error), or
    /// `failed: ...` before it reached the endpoint.
    pub fn closed(
        &self,
        target: SocketAddr,
        peer: Option<&Destination>,
        stats: &RelayStats,
        reason: &str,
    ) {
        let mut record = self.record(Event::Close, audit::Decision::Allow, target, peer, reason);
        record.bytes_sent = Some(stats.sent);
        record.bytes_received = Some(stats.received);
        record.duration_ms = Some(u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX));
        self.log.record(record);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::services::{EndpointsRecord, ServicePort, ServiceRecord};

    const PORTS: AgentPorts = AgentPorts { outbound: 15001 };

    fn table(endpoints: &[&str]) -> ServiceTable {
        let key = ("shop".to_string(), "web".to_string());
        let services = BTreeMap::from([(
            key.clone(),
            ServiceRecord {
                cluster_ips: vec!["198.19.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                }],
            },
        )]);
        let ready = EndpointsRecord {
            ready: [(
                "http".to_string(),
                endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            )]
            .into(),
        };
        ServiceTable::build(
            &services,
            |k| (*k == key).then_some(&ready),
            &ServiceTable::default(),
        )
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_cluster_ip_goes_to_its_endpoint_and_anything_else_as_dialled() {
        let table = table(&["198.18.1.10:9000"]);
        let routed = route(addr("198.19.0.10:80"), &table, PORTS).unwrap();
        assert_eq!(routed.target, addr("198.18.1.10:9000"));
        let hop = routed.service.unwrap();
        assert_eq!(
            (&*hop.name, hop.dialled),
            ("shop/web", addr("198.19.0.10:80"))
        );
        let direct = route(addr("198.18.1.10:9000"), &table, PORTS).unwrap();
        assert_eq!(direct.target, addr("198.18.1.10:9000"));
        assert_eq!(direct.service, None);
    }

    #[test]
    fn no_ready_endpoint_is_refused_with_the_service_named() {
        let refused = route(addr("198.19.0.10:80"), &table(&[]), PORTS).unwrap_err();
        assert_eq!(refused.outcome, ServiceOutcome::NoReadyEndpoint);
        assert_eq!(
            refused.reason,
            "service shop/web at 198.19.0.10:80: the service port has no ready endpoint"
        );
    }

    #[test]
    fn an_endpoint_at_an_agent_port_or_loopback_is_refused() {
        for endpoint in ["198.18.1.10:15008", "127.0.0.1:9000"] {
            let refused = route(addr("198.19.0.10:80"), &table(&[endpoint]), PORTS).unwrap_err();
            assert_eq!(refused.outcome, ServiceOutcome::Loop, "{endpoint}");
        }
    }
}
