//! Socket options of tunnel connections, both ends: the kernel notices a
//! vanished peer too, even when the HTTP/2 PING cannot be sent.

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::tunnel::TunnelConfig;

/// Keepalive probes for a connection that carries nothing (probing after a
/// PING interval of silence, every PING timeout, three times), and
/// TCP_USER_TIMEOUT so unacknowledged data (a write to a peer that is gone)
/// closes the socket within the same bound instead of ~15 minutes of
/// retransmissions.
pub fn set_liveness_options(tcp: &TcpStream, config: &TunnelConfig) -> std::io::Result<()> {
    let socket = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(config.ping_interval)
        .with_interval(config.ping_timeout)
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(config.tcp_user_timeout()))
}
