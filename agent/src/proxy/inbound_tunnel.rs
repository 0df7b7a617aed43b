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
    relay::relay,
};
use crate::{
    identity::{SpiffeId, TrustBundles, handshake_failure_reason, peer_spiffe_id, server_config},
    netns::Netns,
    svids::{SvidWatch, hex},
    tunnel::{self, InboundRequest},
};

/// A peer must finish the TLS handshake within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TunnelContext {
    pub workload: String,
    pub ips: Vec<IpAddr>,
    pub svid: SvidWatch,
    pub bundles: Arc<TrustBundles>,
    pub netns: Arc<Netns>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
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
    let accept = TlsAcceptor::from(Arc::new(config)).accept(tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(workload = %ctx.workload, src = %addr,
                reason = %handshake_failure_reason(&e), "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(workload = %ctx.workload, src = %addr, reason = "timed out", "tls handshake failed");
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
        },
        Err(e) => {
            tracing::info!(workload = %ctx.workload, src = %addr, reason = %e, "tls handshake failed");
            return;
        }
    };
    let tls_version = session
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    tracing::info!(workload = %ctx.workload, src = %addr, peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial, tls_version, "tunnel accepted");
    let peer = Arc::new(peer);
    let served = tunnel::serve(tls, |request| {
        tokio::spawn(handle_stream(request, Arc::clone(&peer), Arc::clone(&ctx)));
    })
    .await;
    if let Err(e) = served {
        tracing::debug!(workload = %ctx.workload, src = %addr, error = %e, "tunnel ended");
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
        peer_cert_serial = %peer.serial, %dst, "inbound connection accepted");
    let (stats, result) = relay(&mut stream, &mut upstream).await;
    tracing::info!(
        workload = %ctx.workload,
        peer_spiffe_id = %peer.spiffe_id,
        %dst,
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = stats.duration.as_millis() as u64,
        error = result.err().map(|e| e.to_string()),
        "inbound connection closed"
    );
}

fn leaf_serial(leaf: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| hex(cert.raw_serial()))
        .unwrap_or_default()
}
