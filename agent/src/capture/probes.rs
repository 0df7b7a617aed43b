//! Kubelet probes through inbound capture: the probe ports of each pod,
//! which the sock_ops program checks when a socket in the node's own
//! network namespace connects to a pod, and the record it leaves of each
//! such connection, which sk_lookup (tcpSocket and gRPC ports: pass to the
//! application) and the agent (httpGet ports: read the request) consult.
//!
//! The record says the kernel saw the connect start in the node's network
//! namespace: a pod forging a node address as its source has none.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use ambit_common::{NodeConnection, ProbePort};
use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};

use super::inbound::ip_words;
use crate::workloads::probes::ProbeKind;

pub struct ProbeCapture {
    ports: BpfHashMap<MapData, ProbePort, u32>,
    connections: BpfHashMap<MapData, NodeConnection, u32>,
    /// What each pod (by netns cookie) registered.
    pods: HashMap<u64, BTreeMap<u16, ProbeKind>>,
}

fn key(netns_cookie: u64, port: u16) -> ProbePort {
    ProbePort {
        netns_cookie,
        port,
        _pad: [0; 6],
    }
}

impl ProbeCapture {
    pub(super) fn new(
        ports: BpfHashMap<MapData, ProbePort, u32>,
        connections: BpfHashMap<MapData, NodeConnection, u32>,
    ) -> Self {
        Self {
            ports,
            connections,
            pods: HashMap::new(),
        }
    }

    /// Makes the pod's probe ports `wanted`: new and changed ports first,
    /// then the ones gone.
    pub fn set(&mut self, netns_cookie: u64, wanted: BTreeMap<u16, ProbeKind>) -> Result<()> {
        let current = match self.pods.remove(&netns_cookie) {
            Some(current) => current,
            // New to this agent: a previous one may have left ports.
            None => self.pinned(netns_cookie),
        };
        for (port, kind) in &wanted {
            if current.get(port) != Some(kind) {
                self.ports
                    .insert(key(netns_cookie, *port), kind.to_kernel(), 0)
                    .with_context(|| format!("registering probe port {port}"))?;
            }
        }
        for port in current.keys().filter(|p| !wanted.contains_key(p)) {
            let _ = self.ports.remove(&key(netns_cookie, *port));
        }
        if !wanted.is_empty() {
            self.pods.insert(netns_cookie, wanted);
        }
        Ok(())
    }

    /// What the kernel map holds for the pod.
    fn pinned(&self, netns_cookie: u64) -> BTreeMap<u16, ProbeKind> {
        self.ports
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.netns_cookie == netns_cookie)
            .filter_map(|(k, v)| Some((k.port, ProbeKind::from_kernel(v)?)))
            .collect()
    }

    pub fn remove(&mut self, netns_cookie: u64) {
        if let Err(e) = self.set(netns_cookie, BTreeMap::new()) {
            tracing::error!(netns_cookie, error = %format!("{e:#}"), "cannot remove probe ports");
        }
    }

    /// Removes probe ports a previous agent left for pods that are gone.
    pub fn forget_stale(&mut self, live_cookies: &HashSet<u64>) {
        let stale: Vec<ProbePort> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live_cookies.contains(&k.netns_cookie))
            .collect();
        for k in stale {
            let _ = self.ports.remove(&k);
        }
    }

    /// The probe kind if the connection from `peer` to `local` was opened
    /// in the node's own network namespace to a probe port.
    pub fn opened_by_node(&self, peer: SocketAddr, local: SocketAddr) -> Option<ProbeKind> {
        let conn = NodeConnection {
            node_addr: ip_words(peer.ip()),
            pod_addr: ip_words(local.ip()),
            node_port: peer.port(),
            pod_port: local.port(),
        };
        ProbeKind::from_kernel(self.connections.get(&conn, 0).ok()?)
    }
}
