//! What the proxy's handlers share about the mesh: who is where, the
//! identities of this node's workloads, the trust bundle, the Services of
//! the cluster, and the pool of tunnels to other workloads.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

use crate::{
    identity::{SpiffeId, TrustBundles, TrustDomain},
    metrics::Metrics,
    services::ServiceTable,
    svids::SvidStore,
    tunnel::TunnelPool,
    workloads::directory::Directory,
};

/// One pooled tunnel: from a local identity to a peer address, and only
/// ever to the identity expected there (an address reused by another
/// workload gets a new, separately verified tunnel).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub source: SpiffeId,
    /// The source pod (its netns cookie): a tunnel carries one pod's
    /// connections, so its source address, which the destination shows the
    /// application (transparent relays), is that pod's own.
    pub source_pod: u64,
    pub peer_addr: SocketAddr,
    pub peer: SpiffeId,
}

pub struct Mesh {
    pub trust_domain: TrustDomain,
    pub directory: watch::Receiver<Arc<Directory>>,
    /// ClusterIPs and their ready endpoints.
    pub services: watch::Receiver<Arc<ServiceTable>>,
    pub svids: Arc<SvidStore>,
    pub bundles: Arc<TrustBundles>,
    pub pool: TunnelPool<TunnelKey>,
    pub metrics: Arc<Metrics>,
}
