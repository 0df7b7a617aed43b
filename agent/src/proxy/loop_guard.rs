//! Loop prevention: the agent never dials its own listeners or loopback on
//! behalf of a peer. Without this, a plaintext connection to a permissive
//! pod's capture port made the agent dial that same port, recursively, until
//! the node ran out of file descriptors (as linkerd2-proxy's loop detection
//! guards against).

use std::net::SocketAddr;

use ambit_common::{INBOUND_CAPTURE_PORT, TUNNEL_PORT};

/// The ports the agent listens on inside every enrolled pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentPorts {
    pub outbound: u16,
}

impl AgentPorts {
    fn contains(self, port: u16) -> bool {
        port == self.outbound || port == INBOUND_CAPTURE_PORT || port == TUNNEL_PORT
    }
}

/// Why the agent must not relay a connection to `target` for a peer, or
/// `None` if it may.
pub fn refusal(target: SocketAddr, ports: AgentPorts) -> Option<&'static str> {
    let ip = target.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        Some(
            "the target is a loopback or unspecified address, which the agent never dials for a peer",
        )
    } else if ports.contains(target.port()) {
        Some("the target port is one of the agent's own listeners (a loop)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: AgentPorts = AgentPorts { outbound: 15001 };

    #[test]
    fn refuses_agent_ports_and_loopback_in_every_form() {
        for target in [
            "198.18.1.10:15001",
            "198.18.1.10:15006",
            "[fd00:a5b1::10]:15008",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "0.0.0.0:8080",
            "[::]:8080",
        ] {
            let target: SocketAddr = target.parse().unwrap();
            assert!(refusal(target, PORTS).is_some(), "{target} was allowed");
        }
    }

    #[test]
    fn allows_application_ports_on_pod_addresses() {
        for target in [
            "198.18.1.10:8080",
            "[fd00:a5b1::10]:9000",
            "198.18.1.10:15002",
        ] {
            let target: SocketAddr = target.parse().unwrap();
            assert_eq!(refusal(target, PORTS), None, "{target}");
        }
    }

    #[test]
    fn a_moved_outbound_port_is_still_refused() {
        let ports = AgentPorts { outbound: 16001 };
        let target: SocketAddr = "198.18.1.10:16001".parse().unwrap();
        assert!(refusal(target, ports).is_some());
    }
}
