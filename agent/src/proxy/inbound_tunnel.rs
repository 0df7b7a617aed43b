//! The inbound tunnel: mTLS HBONE on port 15008 of an enrolled pod. The
//! peer's identity is the SPIFFE ID in its verified client certificate,
//! never anything it says; each CONNECT stream is relayed to the pod's own
//! address from inside its netns.

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    dial::unmapped,
    interception::Interception,
    limits::{ConnectionPermit, HandshakePermit},
    loop_guard,
    tunnel_relay::{Initiator, relay_tunnel},
    tunnel_socket::set_liveness_options,
};
use crate::{
    audit,
    gate::{Connection, Gate},
    identity::{
        SpiffeId, TrustBundles, TunnelServerConfig, handshake_failure_reason, peer_spiffe_id,
    },
    metrics::HandshakeFailure,
    pod::PodContext,
    tunnel::{self, Early, InboundRequest, ReadAhead, TunnelConfig, TunnelError},
};

pub struct TunnelContext {
    pub pod: Arc<PodContext>,
    pub gate: Arc<Gate>,
    pub bundles: Arc<TrustBundles>,
    /// How connections reach the pod; with eBPF capture, relays can come
    /// from the client's own address (transparent).
    pub interception: Interception,
    /// Handshake timeout and PING liveness of tunnel connections.
    pub tunnel: TunnelConfig,
    /// Built once per SVID generation, not per accepted connection.
    pub server_config: TunnelServerConfig,
}

pub async fn serve(listener: TcpListener, ctx: Arc<TunnelContext>) {
    super::accept_loop(
        listener,
        &ctx.pod.id,
        |peer| ctx.pod.limits.admit_tunnel(peer.ip()),
        |stream, peer, (permit, handshake)| {
            handle_connection(stream, unmapped(peer), permit, handshake, Arc::clone(&ctx))
        },
    )
    .await;
}

/// The verified peer of one tunnel connection.
struct Peer {
    addr: SocketAddr,
    spiffe_id: SpiffeId,
    serial: String,
    tls_version: String,
}

/// `_permit` holds the connection's place in the node's and the pod's
/// budgets for as long as the tunnel lives; `handshake` its pending
/// handshake slot, given back as soon as the handshake is over.
async fn handle_connection(
    tcp: TcpStream,
    addr: SocketAddr,
    _permit: ConnectionPermit,
    handshake: HandshakePermit,
    ctx: Arc<TunnelContext>,
) {
    let state = ctx.pod.state();
    let Some(svid) = state.svid.borrow().clone() else {
        tracing::info!(workload = %ctx.pod.id, src = %addr,
            reason = "this workload's SVID is not available yet", "tunnel refused");
        return;
    };
    let config = match ctx.server_config.for_svid(&svid, &ctx.bundles) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(workload = %ctx.pod.id, error = %e, "cannot build the TLS server configuration");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = set_liveness_options(&tcp, &ctx.tunnel) {
        tracing::debug!(workload = %ctx.pod.id, src = %addr, error = %e, "tunnel socket options not set");
    }
    let local = tcp.local_addr().map(unmapped).unwrap_or(addr);
    let accept = TlsAcceptor::from(config).accept(ReadAhead::new(tcp));
    let handshaken = tokio::time::timeout(ctx.tunnel.handshake_timeout, accept).await;
    drop(handshake);
    let tls = match handshaken {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            tracing::info!(workload = %ctx.pod.id, src = %addr, reason = %reason, "tls handshake failed");
            ctx.gate.handshake_failed(
                addr,
                &state.spec,
                local,
                HandshakeFailure::from_io(&e),
                &reason,
            );
            return;
        }
        Err(_) => {
            tracing::info!(workload = %ctx.pod.id, src = %addr, reason = "timed out", "tls handshake failed");
            ctx.gate.handshake_failed(
                addr,
                &state.spec,
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
            tracing::info!(workload = %ctx.pod.id, src = %addr, reason = %e, "tls handshake failed");
            return;
        }
    };
    let tls_version = session
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_owned();
    tracing::info!(workload = %ctx.pod.id, src = %addr, peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial, tls_version, "tunnel accepted");
    let peer = Peer {
        tls_version,
        ..peer
    };
    let peer = Arc::new(peer);
    let served = tunnel::serve(tls, &ctx.tunnel, |request| {
        tokio::spawn(handle_stream(request, Arc::clone(&peer), Arc::clone(&ctx)));
    });
    // A released pod's tunnels end with it (dropping the connection resets
    // its streams, which ends their relays and upstream connections), so
    // nothing keeps serving a pod that is gone.
    tokio::select! {
        served = served => match served {
            Err(TunnelError::NoPingAnswer(after)) => {
                tracing::warn!(workload = %ctx.pod.id, src = %addr, peer_spiffe_id = %peer.spiffe_id,
                    "tunnel from {} is dead: no PING answer in {after:?}", peer.spiffe_id)
            }
            Err(e) => {
                tracing::debug!(workload = %ctx.pod.id, src = %addr, error = %e, "tunnel ended")
            }
            Ok(()) => {}
        },
        () = ctx.pod.released() => {
            tracing::info!(workload = %ctx.pod.id, src = %addr, "tunnel closed: the workload was released");
        }
    }
}

async fn handle_stream(request: InboundRequest, peer: Arc<Peer>, ctx: Arc<TunnelContext>) {
    let dst = unmapped(request.target);
    let pod = &ctx.pod;
    // The pod as it is now, not as it was when the tunnel opened: a label
    // change applies to the very next stream.
    let state = pod.state();
    // A tunnel to this pod reaches this pod's application only: never an
    // open relay, never the agent itself.
    let refusal = if !state.spec.ips.contains(&dst.ip()) {
        Some("target is not an address of this workload")
    } else {
        loop_guard::refusal(dst, pod.dial.agent_ports)
    };
    let conn = Connection {
        direction: audit::Direction::Inbound,
        source: Some(peer.spiffe_id.clone()),
        source_addr: peer.addr,
        workload: Arc::clone(&state.spec),
        workload_id: Some(state.identity.clone()),
        dst,
        tls_version: Some(peer.tls_version.clone()),
        peer_cert_serial: Some(peer.serial.clone()),
    };
    if let Some(reason) = refusal {
        tracing::info!(workload = %pod.id, peer_spiffe_id = %peer.spiffe_id, %dst, reason,
            "inbound connection denied");
        ctx.gate.deny(&conn, reason);
        request.reject(StatusCode::BAD_REQUEST);
        return;
    }
    // Each stream costs a connection to the app, so it takes a place in the
    // pod's budget like any other connection: a tunnel's stream limit alone
    // would let one peer hold a thousand of the node's descriptors.
    let _permit = match pod.limits.admit_inbound() {
        Ok(permit) => permit,
        Err(rejection) => {
            tracing::debug!(workload = %pod.id, peer_spiffe_id = %peer.spiffe_id, %dst,
                reason = %rejection, "inbound stream rejected");
            request.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    // Policy first: a denied peer never causes a connection to the app.
    let decision = ctx.gate.decide(&conn);
    if !decision.allowed {
        tracing::info!(workload = %pod.id, peer_spiffe_id = %peer.spiffe_id, %dst,
            policy = decision.policy.as_deref(), reason = %decision.reason, "inbound connection denied");
        request.reject(StatusCode::FORBIDDEN);
        return;
    }
    // From the tunnel's peer address: the client pod's own (its agent dials
    // from inside it), never an address the peer claims.
    let mut upstream = match pod
        .connect_from(peer.addr.ip(), dst, ctx.interception.capture())
        .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %pod.id, %dst, error = %e,
                "inbound connection failed: application unreachable");
            request.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let mut stream = match request.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(workload = %pod.id, %dst, error = %e, "inbound connection failed");
            return;
        }
    };
    // The info line comes at the end, with everything this one says: one
    // formatted line per connection, not two.
    tracing::debug!(workload = %pod.id, src = %peer.addr, peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial, %dst, policy = decision.policy.as_deref(),
        "inbound connection accepted");
    let relaying = relay_tunnel(
        &mut upstream,
        &mut stream,
        Initiator::Tunnel,
        Early::default(),
    );
    let (stats, result, reason) = ctx.gate.relay(&conn, pod, relaying).await;
    tracing::info!(
        workload = %pod.id,
        src = %peer.addr,
        peer_spiffe_id = %peer.spiffe_id,
        peer_cert_serial = %peer.serial,
        %dst,
        policy = decision.policy.as_deref(),
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX),
        error = result.err().map(|e| e.to_string()),
        reason,
        "inbound connection closed"
    );
}

fn leaf_serial(leaf: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| hex::encode(cert.raw_serial()))
        .unwrap_or_default()
}
