//! The bounded reason label of `ambit_connections_rejected_total`.

/// Which admission limit refused a connection at accept (see
/// [`crate::proxy::limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The node-wide connection cap (kept below RLIMIT_NOFILE).
    NodeConnections,
    /// The pod's own connection budget for that direction.
    PodConnections,
    /// The node-wide cap on TLS handshakes in progress.
    PendingHandshakes,
    /// The cap on TLS handshakes in progress from one source address.
    PendingHandshakesPerSource,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::NodeConnections,
        Rejection::PodConnections,
        Rejection::PendingHandshakes,
        Rejection::PendingHandshakesPerSource,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NodeConnections => "node_connections",
            Rejection::PodConnections => "pod_connections",
            Rejection::PendingHandshakes => "pending_handshakes",
            Rejection::PendingHandshakesPerSource => "pending_handshakes_per_source",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
