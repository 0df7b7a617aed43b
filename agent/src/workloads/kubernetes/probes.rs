//! A Pod spec's kubelet probes reduced to what inbound capture needs
//! ([`Probes`]): the port and path of each plain-HTTP httpGet probe, the
//! ports of tcpSocket, gRPC and HTTPS httpGet probes.

use k8s_openapi::{
    api::core::v1::{Container, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::workloads::probes::{HttpGetProbe, Probes};

/// The liveness, readiness and startup probes of every container (and of
/// sidecar init containers, the only init containers that run probes).
/// Probes whose port does not resolve are left out: the kubelet cannot
/// run them either.
pub fn reduce_probes(spec: &PodSpec) -> Probes {
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut probes = Probes::default();
    for container in spec.containers.iter().chain(sidecars) {
        for probe in [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ]
        .into_iter()
        .flatten()
        {
            add_probe(&mut probes, container, probe);
        }
    }
    probes.http_get.sort();
    probes.http_get.dedup();
    for ports in [&mut probes.tcp_socket, &mut probes.grpc] {
        ports.sort_unstable();
        ports.dedup();
    }
    probes
}

fn add_probe(probes: &mut Probes, container: &Container, probe: &Probe) {
    if let Some(http) = &probe.http_get
        && let Some(port) = resolve_port(container, &http.port)
    {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            // TLS to the application: the path cannot be read.
            probes.tcp_socket.push(port);
        } else {
            probes.http_get.push(HttpGetProbe {
                port,
                path: http.path.clone().unwrap_or_default(),
            });
        }
    }
    if let Some(tcp) = &probe.tcp_socket
        && let Some(port) = resolve_port(container, &tcp.port)
    {
        probes.tcp_socket.push(port);
    }
    if let Some(grpc) = &probe.grpc
        && let Ok(port) = u16::try_from(grpc.port)
    {
        probes.grpc.push(port);
    }
}

/// A probe's port as the kubelet resolves it: a number, or the name of one
/// of the container's ports, or (its last resort) a number in a string.
fn resolve_port(container: &Container, port: &IntOrString) -> Option<u16> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .or_else(|| name.parse().ok())?,
    };
    u16::try_from(number).ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn every_probe_of_every_container_is_kept_with_named_ports_resolved() {
        let spec = spec(serde_json::json!({
            "containers": [
                {
                    "name": "app",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                    "livenessProbe": {"tcpSocket": {"port": 9000}},
                    "startupProbe": {"httpGet": {"port": 8080}},
                },
                {
                    "name": "other",
                    "ports": [{"name": "http", "containerPort": 7070}],
                    "livenessProbe": {"grpc": {"port": 9090}},
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/ready",
                                                    "scheme": "HTTPS"}},
                    "startupProbe": {"exec": {"command": ["true"]}},
                },
                {
                    "name": "broken",
                    "livenessProbe": {"tcpSocket": {"port": "nosuchport"}},
                    "readinessProbe": {"httpGet": {"port": "8443", "path": "/x"}},
                },
            ],
            "initContainers": [
                {"name": "sidecar", "restartPolicy": "Always",
                 "readinessProbe": {"tcpSocket": {"port": 6000}}},
                {"name": "setup", "readinessProbe": {"tcpSocket": {"port": 6001}}},
            ],
        }));
        let probes = reduce_probes(&spec);
        let http: Vec<(u16, &str)> = probes
            .http_get
            .iter()
            .map(|p| (p.port, p.path.as_str()))
            .collect();
        // The named port resolves per container; "8443" is a number.
        assert_eq!(http, [(8080, ""), (8080, "/ready"), (8443, "/x")]);
        assert_eq!(probes.tcp_socket, [6000, 7070, 9000]);
        assert_eq!(probes.grpc, [9090]);
    }

    #[test]
    fn a_pod_without_probes_has_none() {
        let spec = spec(serde_json::json!({"containers": [{"name": "app"}]}));
        assert!(reduce_probes(&spec).is_empty());
    }
}
