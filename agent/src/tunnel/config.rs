//! Timeouts and limits of tunnel connections, set by `ambit run` flags.

use std::time::Duration;

/// How long a tunnel may wait for its peer, how liveness is checked and how
/// many connections one pool key may hold. Every wait on the peer is bounded
/// by one of these, so a silent or overloaded peer ends in an error instead
/// of a hang.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Bound on each handshake step with the peer: TLS, then the HTTP/2
    /// preface and SETTINGS exchange.
    pub handshake_timeout: Duration,
    /// Bound on opening one CONNECT stream: waiting for a stream slot, then
    /// for the peer's answer. Also bounds a caller waiting for a full pool
    /// to free a slot.
    pub stream_open_timeout: Duration,
    /// An HTTP/2 PING is sent this often on every tunnel connection.
    pub ping_interval: Duration,
    /// A PING unanswered for this long declares the connection dead.
    pub ping_timeout: Duration,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Connections the pool opens per key (source identity, peer) before
    /// callers wait for a stream slot instead.
    pub max_connections_per_peer: usize,
    /// Connections the pool opens per key as soon as every pooled one
    /// carries a stream, so concurrent streams run on separate connection
    /// tasks (and cores) instead of one. 1 multiplexes everything on one
    /// connection until its stream limit.
    pub parallel_connections_per_peer: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            stream_open_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections_per_peer: 16,
            parallel_connections_per_peer: 1,
        }
    }
}

impl TunnelConfig {
    /// TCP_USER_TIMEOUT for tunnel sockets: data unacknowledged for this long
    /// closes the socket even when no PING is due (a write to a vanished
    /// peer), and keepalive probes stop at the same bound.
    pub fn tcp_user_timeout(&self) -> Duration {
        self.ping_interval.saturating_add(self.ping_timeout)
    }
}
