//! A pod's kubelet probes, as inbound capture needs them: which ports the
//! kubelet probes and how (liveness, readiness and startup together; the
//! kind of probe does not matter, only what it sends).
//!
//! In the workloads file (the Kubernetes source reduces the Pod spec to
//! the same shape):
//!
//! ```yaml
//! probes:
//!   httpGet: [{port: 8080, path: /ready}]
//!   tcpSocket: [9000]
//!   grpc: [9090]
//! ```

use std::collections::BTreeMap;

use ambit_common::{PROBE_CONNECT, PROBE_HTTP};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    /// Plain-HTTP httpGet probes: the agent lets a GET for exactly one of
    /// these paths through from the node.
    #[serde(default)]
    pub http_get: Vec<HttpGetProbe>,
    /// tcpSocket probe ports, and httpGet probes with `scheme: HTTPS` (the
    /// agent cannot read their path): connections from the node pass.
    #[serde(default)]
    pub tcp_socket: Vec<u16>,
    /// gRPC probe ports: connections from the node pass, like tcpSocket.
    #[serde(default)]
    pub grpc: Vec<u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct HttpGetProbe {
    pub port: u16,
    /// As in the Pod spec; empty means `/`.
    #[serde(default)]
    pub path: String,
}

/// How a probe port is let through from the node (the kernel's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// The kernel passes the connection to the application's listener.
    Connect,
    /// The agent reads the request and lets a probe path through.
    Http,
}

impl ProbeKind {
    pub fn to_kernel(self) -> u32 {
        match self {
            ProbeKind::Connect => PROBE_CONNECT,
            ProbeKind::Http => PROBE_HTTP,
        }
    }

    pub fn from_kernel(value: u32) -> Option<Self> {
        match value {
            PROBE_CONNECT => Some(ProbeKind::Connect),
            PROBE_HTTP => Some(ProbeKind::Http),
            _ => None,
        }
    }
}

impl Probes {
    pub fn is_empty(&self) -> bool {
        self.http_get.is_empty() && self.tcp_socket.is_empty() && self.grpc.is_empty()
    }

    /// Every probe port and how it is let through. A port probed both ways
    /// passes at connect (the kubelet's connect-only probe must succeed, so
    /// the agent cannot stand in front of it).
    pub fn ports(&self) -> BTreeMap<u16, ProbeKind> {
        let mut ports: BTreeMap<u16, ProbeKind> = self
            .http_get
            .iter()
            .map(|probe| (probe.port, ProbeKind::Http))
            .collect();
        for port in self.tcp_socket.iter().chain(&self.grpc) {
            ports.insert(*port, ProbeKind::Connect);
        }
        ports
    }

    /// Whether `target` (an HTTP request target, as sent) is exactly the
    /// path of an httpGet probe on `port`.
    pub fn is_http_probe(&self, port: u16, target: &str) -> bool {
        self.http_get
            .iter()
            .any(|probe| probe.port == port && request_target(&probe.path) == target)
    }
}

/// The request target the kubelet sends for a probe `path`: it builds a URL
/// from the path, so an empty one becomes `/` and a relative one gets its
/// leading `/`.
fn request_target(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with('/') {
        path.into()
    } else {
        format!("/{path}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes() -> Probes {
        serde_yaml::from_str(
            "httpGet: [{port: 8080, path: /ready}, {port: 8081}, {port: 9000, path: x?y=1}]\n\
             tcpSocket: [9000]\ngrpc: [9090]\n",
        )
        .unwrap()
    }

    #[test]
    fn connect_probes_win_over_http_on_a_shared_port() {
        let ports: Vec<(u16, ProbeKind)> = probes().ports().into_iter().collect();
        assert_eq!(
            ports,
            [
                (8080, ProbeKind::Http),
                (8081, ProbeKind::Http),
                (9000, ProbeKind::Connect),
                (9090, ProbeKind::Connect),
            ]
        );
        for kind in [ProbeKind::Connect, ProbeKind::Http] {
            assert_eq!(ProbeKind::from_kernel(kind.to_kernel()), Some(kind));
        }
        assert_eq!(ProbeKind::from_kernel(0), None);
    }

    #[test]
    fn only_the_exact_target_the_kubelet_sends_is_a_probe() {
        let probes = probes();
        assert!(probes.is_http_probe(8080, "/ready"));
        assert!(probes.is_http_probe(8081, "/"));
        assert!(probes.is_http_probe(9000, "/x?y=1"));
        for (port, target) in [
            (8080, "/ready/"),
            (8080, "/ready?x"),
            (8080, "/READY"),
            (8080, "/readyz"),
            (8080, "//ready"),
            (8081, "/ready"),
            (9090, "/ready"),
            (8080, "http://198.18.0.10:8080/ready"),
            (8080, "*"),
        ] {
            assert!(!probes.is_http_probe(port, target), "{port} {target}");
        }
    }
}
