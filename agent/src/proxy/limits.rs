//! Admission limits at the proxy's accept boundary, so one noisy pod or one
//! flooding peer cannot take the node's file descriptors, memory or TLS
//! handshake capacity from everybody else.
//!
//! Every accepted connection first takes a permit from the node-wide
//! connection budget and from its pod's budget for that direction; a tunnel
//! connection also takes a pending-handshake permit, node-wide and for its
//! source address, which it gives back once the handshake ends. All are
//! taken without waiting: over any limit the connection is reset at once,
//! before a task, a buffer or TLS state exists for it, and the refusal is
//! counted in `ambit_connections_rejected_total{reason}`.
//!
//! Permits are owned by the connection's task, so every way a connection
//! ends (close, error, timeout, the task aborted) gives them back.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Metrics, Rejection};

/// The configured limits (`ambit run --max-*`). The handshake deadline
/// that frees a pending handshake's slot is the tunnel's
/// (`--tunnel-handshake-timeout-ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// TLS handshakes in progress on the node's tunnel listeners.
    pub max_pending_handshakes: usize,
    /// TLS handshakes in progress from one source address, so one peer
    /// cannot take the whole node-wide budget.
    pub max_pending_handshakes_per_source: usize,
    /// Concurrent connections of one pod, inbound and outbound each.
    pub max_connections_per_pod: usize,
    /// Concurrent connections of the whole node. Kept below RLIMIT_NOFILE
    /// (see [`crate::fd_limit`]) so the agent always has descriptors left
    /// for its own work: the admin server, CA renewals, the audit log.
    pub max_connections: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_source: 64,
            max_connections_per_pod: 16384,
            max_connections: 32768,
        }
    }
}

/// The node's budgets, shared by every pod's listeners.
pub struct Limits {
    settings: LimitSettings,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// Pending handshakes per source address. An entry exists only while
    /// its count is above zero, and each holds a node-wide handshake
    /// permit, so the map never has more than `max_pending_handshakes`
    /// entries.
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    metrics: Arc<Metrics>,
}

impl Limits {
    pub fn new(settings: LimitSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            handshakes: Arc::new(Semaphore::new(settings.max_pending_handshakes)),
            sources: Arc::default(),
            settings,
            metrics,
        })
    }

    /// A fresh budget for one pod, drawing on this node's.
    pub fn for_pod(self: &Arc<Self>) -> PodLimits {
        let per_pod = self.settings.max_connections_per_pod;
        PodLimits {
            node: Arc::clone(self),
            inbound: Arc::new(Semaphore::new(per_pod)),
            outbound: Arc::new(Semaphore::new(per_pod)),
        }
    }

    fn handshake(&self, source: IpAddr) -> Result<HandshakePermit, Rejection> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = sources.get(&source).copied().unwrap_or(0);
        if pending >= self.settings.max_pending_handshakes_per_source {
            return Err(Rejection::PendingHandshakesPerSource);
        }
        let node = Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .map_err(|_| Rejection::PendingHandshakes)?;
        sources.insert(source, pending + 1);
        Ok(HandshakePermit {
            _node: node,
            source,
            sources: Arc::clone(&self.sources),
        })
    }
}

/// One pod's connection budgets, one per direction, so a flood into a pod
/// does not stop the pod's own outbound connections and the reverse.
pub struct PodLimits {
    node: Arc<Limits>,
    inbound: Arc<Semaphore>,
    outbound: Arc<Semaphore>,
}

impl PodLimits {
    /// Admits a connection to the pod's plaintext capture listener.
    pub fn admit_inbound(&self) -> Result<ConnectionPermit, Rejection> {
        self.counted(self.connection(&self.inbound))
    }

    /// Admits a connection the pod's application opened.
    pub fn admit_outbound(&self) -> Result<ConnectionPermit, Rejection> {
        self.counted(self.connection(&self.outbound))
    }

    /// Admits a connection to the pod's tunnel port from `source`: a
    /// connection permit for its lifetime and a handshake permit to drop
    /// once the handshake is over.
    pub fn admit_tunnel(
        &self,
        source: IpAddr,
    ) -> Result<(ConnectionPermit, HandshakePermit), Rejection> {
        self.counted(
            self.connection(&self.inbound)
                .and_then(|conn| Ok((conn, self.node.handshake(source)?))),
        )
    }

    fn connection(&self, pod: &Arc<Semaphore>) -> Result<ConnectionPermit, Rejection> {
        let node = Arc::clone(&self.node.connections)
            .try_acquire_owned()
            .map_err(|_| Rejection::NodeConnections)?;
        let pod = Arc::clone(pod)
            .try_acquire_owned()
            .map_err(|_| Rejection::PodConnections)?;
        Ok(ConnectionPermit {
            _node: node,
            _pod: pod,
        })
    }

    fn counted<T>(&self, admitted: Result<T, Rejection>) -> Result<T, Rejection> {
        if let Err(reason) = &admitted {
            self.node.metrics.connection_rejected(*reason);
        }
        admitted
    }
}

/// A connection's place in the node's and its pod's budgets, held by the
/// connection's task until it ends.
#[must_use = "the connection is admitted only while the permit is alive"]
#[derive(Debug)]
pub struct ConnectionPermit {
    _node: OwnedSemaphorePermit,
    _pod: OwnedSemaphorePermit,
}

/// A TLS handshake in progress, counted node-wide and for its source.
#[must_use = "the handshake is counted only while the permit is alive"]
#[derive(Debug)]
pub struct HandshakePermit {
    _node: OwnedSemaphorePermit,
    source: IpAddr,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        match sources.get_mut(&self.source) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                sources.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::metrics::test_support::value;

    fn settings() -> LimitSettings {
        LimitSettings {
            max_pending_handshakes: 4,
            max_pending_handshakes_per_source: 2,
            max_connections_per_pod: 3,
            max_connections: 5,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    fn rejected(metrics: &Metrics, reason: Rejection) -> f64 {
        value(
            &metrics.encode(),
            "ambit_connections_rejected_total",
            &[("reason", reason.as_str())],
        )
        .expect("series present")
    }

    #[test]
    fn one_source_cannot_take_the_whole_handshake_budget() {
        let metrics = Arc::new(Metrics::new());
        let pod = Limits::new(
            LimitSettings {
                max_connections_per_pod: 100,
                max_connections: 100,
                ..settings()
            },
            Arc::clone(&metrics),
        )
        .for_pod();
        let held: Vec<_> = (0..2).map(|_| pod.admit_tunnel(ip(1)).unwrap()).collect();
        assert_eq!(
            pod.admit_tunnel(ip(1)).unwrap_err(),
            Rejection::PendingHandshakesPerSource
        );
        // Another source still gets in, up to the node-wide budget.
        let others: Vec<_> = (0..2).map(|_| pod.admit_tunnel(ip(2)).unwrap()).collect();
        assert_eq!(
            pod.admit_tunnel(ip(3)).unwrap_err(),
            Rejection::PendingHandshakes
        );
        assert_eq!(
            rejected(&metrics, Rejection::PendingHandshakesPerSource),
            1.0
        );
        assert_eq!(rejected(&metrics, Rejection::PendingHandshakes), 1.0);
        drop(others);
        assert!(pod.admit_tunnel(ip(3)).is_ok());
        drop(held);
    }

    #[test]
    fn a_finished_handshake_frees_its_slot_but_keeps_the_connection_counted() {
        let pod = Limits::new(settings(), Arc::new(Metrics::new())).for_pod();
        let (conn, handshake) = pod.admit_tunnel(ip(1)).unwrap();
        let (conn2, handshake2) = pod.admit_tunnel(ip(1)).unwrap();
        drop((handshake, handshake2));
        // The source's handshake slots are back...
        let (conn3, _handshake3) = pod.admit_tunnel(ip(1)).unwrap();
        // ...but the three established connections fill the pod's budget.
        assert_eq!(
            pod.admit_tunnel(ip(1)).unwrap_err(),
            Rejection::PodConnections
        );
        drop((conn, conn2, conn3));
    }

    #[test]
    fn per_source_entries_are_removed_when_their_count_drops_to_zero() {
        let limits = Limits::new(settings(), Arc::new(Metrics::new()));
        let pod = limits.for_pod();
        let a = pod.admit_tunnel(ip(1)).unwrap();
        let b = pod.admit_tunnel(ip(1)).unwrap();
        let c = pod.admit_tunnel(ip(2)).unwrap();
        assert_eq!(limits.sources.lock().unwrap().len(), 2);
        drop(a);
        assert_eq!(limits.sources.lock().unwrap().get(&ip(1)), Some(&1));
        drop((b, c));
        assert!(limits.sources.lock().unwrap().is_empty());
    }

    #[test]
    fn each_pod_and_direction_has_its_own_budget() {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(
            LimitSettings {
                max_connections: 100,
                ..settings()
            },
            Arc::clone(&metrics),
        );
        let (noisy, quiet) = (limits.for_pod(), limits.for_pod());
        let held: Vec<_> = (0..3).map(|_| noisy.admit_outbound().unwrap()).collect();
        assert_eq!(
            noisy.admit_outbound().unwrap_err(),
            Rejection::PodConnections
        );
        assert!(noisy.admit_inbound().is_ok());
        assert!(quiet.admit_outbound().is_ok());
        assert_eq!(rejected(&metrics, Rejection::PodConnections), 1.0);
        drop(held);
        assert!(noisy.admit_outbound().is_ok());
    }

    #[test]
    fn the_node_cap_holds_across_pods() {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(settings(), Arc::clone(&metrics));
        let pods: Vec<_> = (0..3).map(|_| limits.for_pod()).collect();
        let admitted: Vec<_> = pods
            .iter()
            .flat_map(|pod| [pod.admit_outbound(), pod.admit_inbound()])
            .collect();
        // Six attempts, each within its pod's budget; the node has five slots.
        assert_eq!(admitted.iter().filter(|a| a.is_ok()).count(), 5);
        assert_eq!(
            admitted.last().unwrap().as_ref().unwrap_err(),
            &Rejection::NodeConnections
        );
        assert_eq!(rejected(&metrics, Rejection::NodeConnections), 1.0);
    }
}
