//! The inbound tunnel: mTLS HBONE on port 15008 of an enrolled pod. The
//! peer's identity is the SPIFFE ID in its verified client certificate,
//! never anything it says; each CONNECT stream is relayed to the pod's own
//! address from inside its netns.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::StatusCode;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    dial::{dial, unmapped},
    tunnel_socket::set_liveness_options,
};
use crate::{
    audit,
    gate::{Connection, Gate},
    identity::{SpiffeId, TrustBundles, handshake_failure_reason, peer_spiffe_id, server_config},
    metrics::HandshakeFailure,
    netns::Netns,
    svids::{SvidWatch, hex},
    tunnel::{self, InboundRequest, TunnelConfig, TunnelError},
    workloads::Workload,
};

pub struct TunnelContext {
    pub workload: String,
    pub spec: Arc<Workload>,
    pub identity: SpiffeId,
    pub gate: Arc<Gate>,
    pub ips: Vec<IpAddr>,
    pub svid: SvidWatch,
    pub bundles: Arc<TrustBundles>,
    pub netns: Arc<Netns>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    /// Handshake timeout and PING liveness of tunnel connections.
    pub tunnel: TunnelConfig,
}

pub async fn serve(listener: TcpListener, ctx: Arc<TunnelContext>) {
    super::accept_loop(listener, &ctx.workload, |stream, peer| {
        handle_connection(stream, unmapped(peer), Arc::clone(&ctx))
    })
    .await;
}

/// The verified peer of one tunnel connection.
struct Peer {
    addr: SocketAddr,
    spiffe_id: SpiffeId,
    serial: String,
    tls_version: String,
}

async fn handle_connection(tcp: TcpStream, addr: SocketAddr, ctx: Arc<TunnelContext>) {
    let Some(svid) = ctx.svid.borrow().clone() else {
        tracing::info!(workload = %ctx.workload, src = %addr,
            reason = "this workload's SVID is not available yet", "tunnel refused");
        return;
    };
    let config = match server_config(&svid, Arc::clone(&ctx.bundles)) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(workload = %ctx.workload, error = %e, "cannot build the TLS server configuration");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = set_liveness_options(&tcp, &ctx.tunnel) {
        tracing::debug!(workload = %ctx.workload, src = %addr, error = %e, "tunnel socket options not set");
    }
    let local = tcp.local_addr().map(unmapped).unwrap_or(addr);
    let accept = TlsAcceptor::from(Arc::new(config)).accept(tcp);
    let tls = match tokio::time::timeout(ctx.tunnel.handshake_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            tracing::info!(workload = %ctx.workload, src = %addr, reason = %reason, "tls handshake failed");
            ctx.gate.handshake_failed(
                addr,
                &ctx.spec,
                local,
                HandshakeFailure::from_io(&e),
                &reason,
            );
            return;
        }
        Err(_) => {
            tracing::info!(workload = %ctx.workload, src = %addr, reason = "timed out", "tls handshake failed");
            ctx.gate.handshake_failed(
                addr,
                &ctx.spec,
                local,
                HandshakeFailure::Timeout,
                "timed out",
            );
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let peer = match peer_spiffe_id(session) {
        Ok(spiffe_id) => Peer {
            addr,
            spiffe_id,
            serial: session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(leaf_serial)
                .unwrap_or_default(),
            tls_version: String::new(),
        },
        Err(e) => {
            tracing::info!(workload = %ctx.workload, src = %addr, reason = %e, "tls handshake failed");
            return;
        }
    };
    let tls_version = session
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_owned();
    tracing::info!(workload = %ctx.workload, src = %addr, peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial, tls_version, "tunnel accepted");
    let peer = Peer {
        tls_version,
        ..peer
    };
    let peer = Arc::new(peer);
    let served = tunnel::serve(tls, &ctx.tunnel, |request| {
        tokio::spawn(handle_stream(request, Arc::clone(&peer), Arc::clone(&ctx)));
    })
    .await;
    match served {
        // Dropping the connection reset its streams, which ends their
        // relays and upstream connections.
        Err(TunnelError::NoPingAnswer(after)) => {
            tracing::warn!(workload = %ctx.workload, src = %addr, peer_spiffe_id = %peer.spiffe_id,
                "tunnel from {} is dead: no PING answer in {after:?}", peer.spiffe_id)
        }
        Err(e) => {
            tracing::debug!(workload = %ctx.workload, src = %addr, error = %e, "tunnel ended")
        }
        Ok(()) => {}
    }
}

async fn handle_stream(request: InboundRequest, peer: Arc<Peer>, ctx: Arc<TunnelContext>) {
    let dst = unmapped(request.target);
    // A tunnel to this pod reaches this pod only: never an open relay.
    if !ctx.ips.contains(&dst.ip()) {
        tracing::info!(workload = %ctx.workload, peer_spiffe_id = %peer.spiffe_id, %dst,
            reason = "target is not an address of this workload", "inbound connection denied");
        request.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let conn = Connection {
        direction: audit::Direction::Inbound,
        source: Some(peer.spiffe_id.clone()),
        source_addr: peer.addr,
        workload: Arc::clone(&ctx.spec),
        workload_id: Some(ctx.identity.clone()),
        dst,
        tls_version: Some(peer.tls_version.clone()),
        peer_cert_serial: Some(peer.serial.clone()),
    };
    // Policy first: a denied peer never causes a connection to the app.
    let decision = ctx.gate.decide(&conn);
    if !decision.allowed {
        tracing::info!(workload = %ctx.workload, peer_spiffe_id = %peer.spiffe_id, %dst,
            policy = decision.policy.as_deref(), reason = %decision.reason, "inbound connection denied");
        request.reject(StatusCode::FORBIDDEN);
        return;
    }
    let mut upstream = match dial(&ctx.netns, dst, ctx.socket_mark, ctx.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %ctx.workload, %dst, error = %e,
                "inbound connection failed: application unreachable");
            request.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let mut stream = match request.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(workload = %ctx.workload, %dst, error = %e, "inbound connection failed");
            return;
        }
    };
    tracing::info!(workload = %ctx.workload, src = %peer.addr, peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial, %dst, policy = decision.policy.as_deref(),
        "inbound connection accepted");
    let (stats, result, reason) = ctx.gate.relay(&conn, &mut stream, &mut upstream).await;
    tracing::info!(
        workload = %ctx.workload,
        peer_spiffe_id = %peer.spiffe_id,
        %dst,
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = stats.duration.as_millis() as u64,
        error = result.err().map(|e| e.to_string()),
        reason,
        "inbound connection closed"
    );
}

fn leaf_serial(leaf: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| hex(cert.raw_serial()))
        .unwrap_or_default()
}
