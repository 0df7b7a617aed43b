//! The outbound side: connections an enrolled pod's application opened,
//! redirected by connect4/6 to the agent's listener inside the pod.
//!
//! A destination that is a mesh workload is reached through an mTLS HBONE
//! tunnel to its 15008 port, presenting the source pod's SVID and accepting
//! only the SPIFFE ID expected there. Anything else is passed through.

use std::{net::SocketAddr, sync::Arc};

use ambit_common::TUNNEL_PORT;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::{
    limits::ConnectionPermit,
    relay::{RelayStats, relay},
    tunnel_socket::set_liveness_options,
};
use crate::{
    audit,
    capture::Capture,
    identity::{SpiffeId, client_config, handshake_failure_reason},
    mesh::{Mesh, TunnelKey},
    pod::{PodContext, PodState},
    tunnel::{HboneClient, TunnelError, TunnelLease},
    workloads::directory::Destination,
};

/// What an outbound listener needs to serve one pod.
pub struct OutboundContext {
    pub pod: Arc<PodContext>,
    pub capture: Arc<Capture>,
    pub mesh: Arc<Mesh>,
}

pub async fn serve(listener: TcpListener, ctx: Arc<OutboundContext>) {
    super::accept_loop(
        listener,
        &ctx.pod.id,
        |_| ctx.pod.limits.admit_outbound(),
        |stream, client, permit| handle(stream, client, permit, Arc::clone(&ctx)),
    )
    .await;
}

/// `_permit` holds the connection's place in the node's and the pod's
/// budgets until it ends.
async fn handle(
    downstream: TcpStream,
    client: SocketAddr,
    _permit: ConnectionPermit,
    ctx: Arc<OutboundContext>,
) {
    // A connection is served to its end or until its pod is released,
    // whichever comes first.
    let released = ctx.pod.released();
    tokio::select! {
        () = serve_connection(downstream, client, &ctx) => {}
        () = released => tracing::info!(workload = %ctx.pod.id, %client,
            "outbound connection closed: the workload was released"),
    }
}

async fn serve_connection(downstream: TcpStream, client: SocketAddr, ctx: &OutboundContext) {
    let Some(orig_dst) = ctx
        .capture
        .take_original_dst(ctx.pod.netns.cookie(), client)
    else {
        // Someone dialled the listener directly, or the entry was evicted:
        // without a destination there is nothing safe to do but close.
        tracing::warn!(workload = %ctx.pod.id, %client,
            "denied: connection on the outbound listener has no original destination");
        return;
    };
    tracing::info!(workload = %ctx.pod.id, %client, %orig_dst, "outbound connection captured");
    // Policy is decided (and audited) on the destination's node; here the
    // connection is only counted.
    let metrics = &ctx.mesh.metrics;
    metrics.connection_opened(audit::Direction::Outbound, audit::Decision::Allow);
    let _active = metrics.connection_active(audit::Direction::Outbound);
    let _ = downstream.set_nodelay(true);
    let destination = ctx.mesh.directory.borrow().lookup(orig_dst.ip());
    match destination {
        Some(destination) => via_tunnel(downstream, orig_dst, destination, ctx).await,
        None => passthrough(downstream, orig_dst, ctx).await,
    }
}

/// A destination outside the mesh: plain TCP from the pod's netns.
async fn passthrough(mut downstream: TcpStream, orig_dst: SocketAddr, ctx: &OutboundContext) {
    let mut upstream = match ctx.pod.connect(orig_dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %ctx.pod.id, %orig_dst, error = %e,
                "outbound connection failed: upstream unreachable");
            return;
        }
    };
    let (stats, result) = relay(&mut downstream, &mut upstream).await;
    log_closed(ctx, orig_dst, "passthrough", None, stats, result);
}

async fn via_tunnel(
    mut downstream: TcpStream,
    orig_dst: SocketAddr,
    destination: Arc<Destination>,
    ctx: &OutboundContext,
) {
    let state = ctx.pod.state();
    let lease = match tunnel_to(orig_dst, &destination, &state, ctx).await {
        Ok(lease) => lease,
        Err(reason) => {
            tracing::info!(workload = %ctx.pod.id, %orig_dst,
                peer_spiffe_id = %destination.spiffe_id, reason = %reason,
                "outbound connection failed: no tunnel");
            return;
        }
    };
    let mut stream = match lease.connect(orig_dst).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(workload = %ctx.pod.id, %orig_dst,
                peer_spiffe_id = %destination.spiffe_id, error = %e,
                "outbound connection failed: refused by the peer");
            return;
        }
    };
    let (stats, result) = relay(&mut downstream, &mut stream).await;
    log_closed(
        ctx,
        orig_dst,
        "hbone",
        Some(&destination.spiffe_id),
        stats,
        result,
    );
}

fn log_closed(
    ctx: &OutboundContext,
    orig_dst: SocketAddr,
    mode: &str,
    peer: Option<&SpiffeId>,
    stats: RelayStats,
    result: std::io::Result<()>,
) {
    ctx.mesh.metrics.add_bytes(stats.sent, stats.received);
    tracing::info!(
        workload = %ctx.pod.id,
        %orig_dst,
        mode,
        peer_spiffe_id = peer.map(|p| p.as_str()),
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX),
        error = result.err().map(|e| e.to_string()),
        "outbound connection closed"
    );
}

/// A stream slot on a pooled tunnel from this pod's identity to the
/// destination's agent, opened (from the pod's netns) if every pooled one
/// is full.
async fn tunnel_to(
    orig_dst: SocketAddr,
    destination: &Destination,
    state: &PodState,
    ctx: &OutboundContext,
) -> Result<TunnelLease, String> {
    // Fail closed: no identity yet, no tunnel, and never plaintext instead.
    let svid = state
        .svid
        .borrow()
        .clone()
        .ok_or("this workload's SVID is not available yet")?;
    let peer_addr = SocketAddr::new(orig_dst.ip(), TUNNEL_PORT);
    let key = TunnelKey {
        source: state.identity.clone(),
        peer_addr,
        peer: destination.spiffe_id.clone(),
    };
    let config = client_config(
        &svid,
        Arc::clone(&ctx.mesh.bundles),
        vec![destination.spiffe_id.clone()],
    )
    .map_err(|e| format!("building the TLS client configuration: {e}"))?;
    let pod = Arc::clone(&ctx.pod);
    let peer = destination.spiffe_id.clone();
    let tunnel = *ctx.mesh.pool.config();
    let connect = move || async move {
        let peer_name: Arc<str> = format!("{peer} at {peer_addr}").into();
        let tcp = pod.connect(peer_addr).await?;
        let _ = tcp.set_nodelay(true);
        set_liveness_options(&tcp, &tunnel)?;
        let tls = tokio::time::timeout(
            tunnel.handshake_timeout,
            TlsConnector::from(Arc::new(config)).connect(ServerName::from(peer_addr.ip()), tcp),
        )
        .await
        .map_err(|_| {
            TunnelError::timed_out("the TLS handshake", &peer_name, tunnel.handshake_timeout)
        })?
        .map_err(|e| std::io::Error::new(e.kind(), handshake_failure_reason(&e)))?;
        let client = HboneClient::handshake(tls, Arc::clone(&peer_name), &tunnel).await?;
        tracing::info!(workload = %pod.id, %peer_addr, peer_spiffe_id = %peer,
            local_serial = %hex::encode(svid.serial()), "tunnel established");
        Ok(client)
    };
    ctx.mesh
        .pool
        .get_or_connect(key, connect)
        .await
        .map_err(|e: TunnelError| e.to_string())
}
