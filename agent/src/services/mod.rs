//! Kubernetes Services: which ready endpoint a connection to a ClusterIP
//! goes to.
//!
//! connect4/6 capture a pod's connection before kube-proxy would translate
//! a ClusterIP, so the agent resolves it itself: `ClusterIP:port` names a
//! service port, the service port's *name* finds the same-named port of the
//! service's Endpoints (the endpoints controller writes the resolved number
//! of a named `targetPort` there), and a ready address with that port is
//! picked. Headless services (no ClusterIP) need nothing here: their pod
//! addresses are dialled directly.
//!
//! Endpoints are spread round-robin per service port, starting at a random
//! position: even for every client of this node without any load signal,
//! one atomic add per connection, and agents of many nodes do not all start
//! at the same endpoint. (kube-proxy picks at random with iptables and
//! round-robin with IPVS; "power of two choices" needs a load signal, and
//! the agent only sees its own node's share of an endpoint's load.)
//!
//! Everything here is pure: the Kubernetes source reduces Service and
//! Endpoints objects to [`ServiceRecord`] and [`EndpointsRecord`] and
//! publishes a new [`ServiceTable`] when they change.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::proxy::dial::unmapped;

/// A Service as resolution needs it: its ClusterIPs (one per IP family)
/// and its TCP ports (the only protocol the agent captures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// One TCP port of a Service: `name` ("" for the single unnamed port a
/// service may have) pairs it with the Endpoints port of the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
}

/// A service's ready endpoints, by port name: the addresses listed as
/// ready, each with the port number of that name. Not-ready addresses are
/// never kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointsRecord {
    pub ready: BTreeMap<String, Arc<[SocketAddr]>>,
}

/// `namespace/name` of a Service.
pub type ServiceName = Arc<str>;

/// Why a connection to a service port has nowhere to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The address is a ClusterIP, but the service has no TCP port there.
    NoSuchPort,
    /// The service port has no ready endpoint.
    NoneReady,
}

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoEndpoint::NoSuchPort => "the service has no TCP port with this number",
            NoEndpoint::NoneReady => "the service port has no ready endpoint",
        })
    }
}

/// Where a connection to `ClusterIP:port` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub service: ServiceName,
    /// What the application dialled (IPv4-mapped addresses unmapped).
    pub cluster_addr: SocketAddr,
    pub endpoint: Result<SocketAddr, NoEndpoint>,
}

/// One service port at one ClusterIP.
#[derive(Debug)]
struct Entry {
    service: ServiceName,
    endpoints: Arc<[SocketAddr]>,
    /// Round-robin position; carried over when the table is rebuilt.
    next: Arc<AtomicUsize>,
}

/// Every ClusterIP of the cluster, resolved to ready endpoints.
#[derive(Debug, Default)]
pub struct ServiceTable {
    ports: HashMap<SocketAddr, Entry>,
    /// ClusterIPs, to refuse a port the service does not have instead of
    /// sending it in plaintext to an address nothing answers at.
    services: HashMap<IpAddr, ServiceName>,
}

impl ServiceTable {
    /// The table for `services` and their `endpoints` (both keyed by
    /// `(namespace, name)`). Round-robin positions of ports that were in
    /// `previous` continue, so a rebuild (any endpoint change in the
    /// cluster) does not send the next connections to the first endpoint.
    pub fn build<'a>(
        services: impl IntoIterator<Item = (&'a (String, String), &'a ServiceRecord)>,
        endpoints: impl Fn(&(String, String)) -> Option<&'a EndpointsRecord>,
        previous: &ServiceTable,
    ) -> Self {
        let mut table = ServiceTable::default();
        let none: Arc<[SocketAddr]> = Arc::from([]);
        for (key, service) in services {
            let name: ServiceName = format!("{}/{}", key.0, key.1).into();
            let ready = endpoints(key);
            for ip in &service.cluster_ips {
                table.services.insert(*ip, Arc::clone(&name));
                for port in &service.ports {
                    let addr = SocketAddr::new(*ip, port.port);
                    let endpoints = ready
                        .and_then(|e| e.ready.get(&port.name))
                        .map_or_else(|| Arc::clone(&none), Arc::clone);
                    let next = previous.ports.get(&addr).map_or_else(
                        || Arc::new(AtomicUsize::new(fastrand::usize(..))),
                        |old| Arc::clone(&old.next),
                    );
                    table.ports.insert(
                        addr,
                        Entry {
                            service: Arc::clone(&name),
                            endpoints,
                            next,
                        },
                    );
                }
            }
        }
        table
    }

    /// `None` when `dst` is not a ClusterIP; otherwise the service and the
    /// endpoint this connection goes to (the next in turn), or why there is
    /// none.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolution> {
        let dst = unmapped(dst);
        let Some(entry) = self.ports.get(&dst) else {
            return self.services.get(&dst.ip()).map(|service| Resolution {
                service: Arc::clone(service),
                cluster_addr: dst,
                endpoint: Err(NoEndpoint::NoSuchPort),
            });
        };
        let endpoint = match entry.endpoints.len() {
            0 => Err(NoEndpoint::NoneReady),
            n => Ok(entry.endpoints[entry.next.fetch_add(1, Ordering::Relaxed) % n]),
        };
        Some(Resolution {
            service: Arc::clone(&entry.service),
            cluster_addr: dst,
            endpoint,
        })
    }

    /// Service ports (per ClusterIP) in the table.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

#[cfg(test)]
mod tests;
