//! HBONE: the tunnel between agents.
//!
//! HBONE ("HTTP-Based Overlay Network Environment", the protocol of Istio's
//! ztunnel) carries each application TCP connection as one HTTP/2 `CONNECT`
//! stream (plain RFC 9113 §8.5 CONNECT: `:method` and `:authority` only, no
//! `:scheme` or `:path`), with `:authority = DST_IP:PORT`. Many streams share
//! one mTLS connection to the destination's inbound listener on port
//! port 15008 (`ambit_common::TUNNEL_PORT`, as in Istio), so a new application connection costs one HEADERS
//! round trip instead of a TCP and TLS handshake.
//!
//! This module only speaks HTTP/2 over an already established byte stream
//! (a TLS stream in production, an in-memory pipe in tests):
//! - [`HboneClient`] opens CONNECT streams over one connection,
//! - [`serve`] accepts them and hands each valid one to the caller as an
//!   [`InboundRequest`] to accept or reject,
//! - [`HboneStream`] is one tunnelled connection as `AsyncRead + AsyncWrite`,
//! - [`TunnelPool`] keeps multiplexed clients per key, opening another
//!   when those it has are at the peer's stream limit.
//!
//! Every wait on the peer is bounded ([`TunnelConfig`]), and both ends PING
//! each other, so a peer that vanished without a word is noticed in
//! seconds rather than when TCP gives up.
//!
//! The source workload's identity is the TLS client certificate, verified by
//! the TLS layer. Nothing here reads identity from HTTP headers.

mod authority;
mod client;
mod config;
mod early;
mod liveness;
mod pool;
mod read_ahead;
mod server;
mod settings;
mod stream;
mod usage;

#[cfg(test)]
mod liveness_tests;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

use std::{io, sync::Arc, time::Duration};

use http::StatusCode;

pub use client::{CloseReason, HboneClient};
pub use config::TunnelConfig;
pub use early::{EARLY_MAX, Early, EarlySource};
pub use pool::{PoolObserver, TunnelLease, TunnelPool};
pub use read_ahead::ReadAhead;
pub use server::{InboundRequest, serve};
pub use stream::HboneStream;

/// The ALPN protocol to set on both tunnel TLS configurations: HBONE is
/// HTTP/2 only, with no HTTP/1.1 fallback.
pub const ALPN: &[u8] = b"h2";

/// Why a tunnel operation failed.
///
/// The sources are behind `Arc` so the error is `Clone`: a [`TunnelPool`]
/// hands the outcome of one shared handshake to every caller that waited on
/// it, and neither `h2::Error` nor `io::Error` can be cloned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    /// The HTTP/2 preface or SETTINGS exchange failed.
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] Arc<h2::Error>),
    /// The established HTTP/2 connection failed (I/O error, GOAWAY with an
    /// error, protocol violation by the peer).
    #[error("HTTP/2 connection failed: {0}")]
    Connection(#[source] Arc<h2::Error>),
    /// Opening or answering one CONNECT stream failed, typically because
    /// the connection was closed or the stream was reset.
    #[error("HBONE stream failed: {0}")]
    Stream(#[source] Arc<h2::Error>),
    /// The peer answered the CONNECT with a non-2xx status (policy denial,
    /// unreachable destination, ...).
    #[error("the peer rejected the CONNECT request with status {0}")]
    Rejected(StatusCode),
    /// A CONNECT target that is not an `IP:port` a peer can use.
    #[error("invalid CONNECT authority {0:?}: expected IP:port")]
    BadAuthority(String),
    /// Establishing the underlying transport (TCP, TLS) failed.
    #[error("tunnel I/O failed: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The peer did not complete a step (`what`) in time.
    #[error("{what} to {peer} timed out after {after:?}")]
    TimedOut {
        what: &'static str,
        peer: Arc<str>,
        after: Duration,
    },
    /// Every connection the pool may open to the peer was at its stream
    /// limit for as long as a caller may wait.
    #[error(
        "all {connections} tunnel connections to {peer} are at their stream limit \
         (waited {waited:?} for a free stream)"
    )]
    Saturated {
        peer: Arc<str>,
        connections: usize,
        waited: Duration,
    },
    /// The peer stopped answering PINGs; the connection was dropped.
    #[error("the peer did not answer a PING within {0:?}")]
    NoPingAnswer(Duration),
}

impl TunnelError {
    pub(crate) fn timed_out(what: &'static str, peer: &Arc<str>, after: Duration) -> Self {
        TunnelError::TimedOut {
            what,
            peer: Arc::clone(peer),
            after,
        }
    }
}

impl From<io::Error> for TunnelError {
    fn from(e: io::Error) -> Self {
        TunnelError::Io(Arc::new(e))
    }
}
