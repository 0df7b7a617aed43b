//! The outbound side: connections an enrolled pod's application opened,
//! redirected (by connect4/6, or a sidecar's nftables rules) to the
//! agent's listener inside the pod.
//!
//! A destination that is a mesh workload is reached through an mTLS HBONE
//! tunnel to its 15008 port, presenting the source pod's SVID and accepting
//! only the SPIFFE ID expected there. Anything else is passed through. A
//! ClusterIP is first resolved to one of its service's ready endpoints
//! ([`super::service_route`]), which is then reached the same way.

use std::{net::SocketAddr, sync::Arc};

use ambit_common::TUNNEL_PORT;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::{
    interception::Interception,
    limits::ConnectionPermit,
    relay::{RelayStats, relay},
    service_route::{ServiceAudit, route},
    tunnel_relay::{AppSocket, Initiator, relay_tunnel},
    tunnel_socket::set_liveness_options,
};
use crate::{
    audit::{self, AuditLog},
    identity::{client_config, handshake_failure_reason},
    mesh::{Mesh, TunnelKey},
    pod::{PodContext, PodState},
    tunnel::{Early, HboneClient, ReadAhead, TunnelError, TunnelLease},
    workloads::directory::Destination,
};

/// What an outbound listener needs to serve one pod.
pub struct OutboundContext {
    pub pod: Arc<PodContext>,
    /// Knows where each accepted connection was going.
    pub interception: Interception,
    pub mesh: Arc<Mesh>,
    /// For connections to a Service, which this side of the node audits.
    pub audit: Arc<AuditLog>,
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
        .interception
        .outbound_dst(&downstream, ctx.pod.netns.cookie(), client)
    else {
        // Someone dialled the listener directly, or the entry was evicted:
        // without a destination there is nothing safe to do but close.
        tracing::warn!(workload = %ctx.pod.id, %client,
            "denied: connection on the outbound listener has no original destination");
        return;
    };
    // One info line per connection, at its end (below): formatting log
    // lines was a sixth of the agents' CPU under connection churn.
    tracing::debug!(workload = %ctx.pod.id, %client, %orig_dst, "outbound connection captured");
    let metrics = &ctx.mesh.metrics;
    let state = ctx.pod.state();
    let routed = route(
        orig_dst,
        &ctx.mesh.services.borrow(),
        ctx.pod.dial.agent_ports,
    );
    let route = match routed {
        Ok(route) => route,
        Err(refused) => {
            tracing::info!(workload = %ctx.pod.id, %orig_dst, service = %refused.hop.name,
                reason = %refused.reason, "denied: outbound connection to a service");
            ServiceAudit::new(Arc::clone(&ctx.audit), &state, client, &refused.hop)
                .refused(&refused, metrics);
            return;
        }
    };
    // Policy is decided (and audited) on the destination's node; here the
    // connection is only counted, and a service's endpoint choice audited.
    metrics.connection_opened(audit::Direction::Outbound, audit::Decision::Allow);
    let _active = metrics.connection_active(audit::Direction::Outbound);
    let _ = downstream.set_nodelay(true);
    let target = route.target;
    let destination = ctx.mesh.directory.borrow().lookup(target.ip());
    let service_audit = route.service.as_ref().map(|hop| {
        tracing::info!(workload = %ctx.pod.id, service = %hop.name, %orig_dst, endpoint = %target,
            "outbound connection to a service sent to an endpoint");
        let audit = ServiceAudit::new(Arc::clone(&ctx.audit), &state, client, hop);
        audit.sent(target, destination.as_deref(), metrics);
        audit
    });
    let ended = match &destination {
        Some(destination) => via_tunnel(downstream, target, destination, &state, ctx).await,
        None => passthrough(downstream, target, ctx).await,
    };
    let peer = destination.as_deref();
    if let Ended::Relayed { stats, result } = &ended {
        log_closed(ctx, client, orig_dst, target, peer, stats, result);
    }
    if let Some(audit) = service_audit {
        match &ended {
            Ended::Relayed { stats, result } => {
                let reason = match result {
                    Ok(()) => "closed".to_owned(),
                    Err(e) => format!("closed: {e}"),
                };
                audit.closed(target, peer, stats, &reason);
            }
            Ended::Failed(why) => {
                audit.closed(
                    target,
                    peer,
                    &RelayStats::default(),
                    &format!("failed: {why}"),
                );
            }
        }
    }
}

/// How a connection the agent accepted ended.
enum Ended {
    /// Relayed until one side closed or failed.
    Relayed {
        stats: RelayStats,
        result: std::io::Result<()>,
    },
    /// Never reached the destination, for this reason (logged).
    Failed(String),
}

/// A destination outside the mesh: plain TCP from the pod's netns.
async fn passthrough(
    mut downstream: TcpStream,
    target: SocketAddr,
    ctx: &OutboundContext,
) -> Ended {
    let mut upstream = match ctx.pod.connect(target).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %ctx.pod.id, dst = %target, error = %e,
                "outbound connection failed: upstream unreachable");
            return Ended::Failed(format!("upstream unreachable: {e}"));
        }
    };
    let (stats, result) = relay(&mut downstream, &mut upstream).await;
    Ended::Relayed { stats, result }
}

async fn via_tunnel(
    mut downstream: TcpStream,
    target: SocketAddr,
    destination: &Destination,
    state: &PodState,
    ctx: &OutboundContext,
) -> Ended {
    let lease = match tunnel_to(target, destination, state, ctx).await {
        Ok(lease) => lease,
        Err(reason) => {
            tracing::info!(workload = %ctx.pod.id, dst = %target,
                peer_spiffe_id = %destination.spiffe_id, reason = %reason,
                "outbound connection failed: no tunnel");
            return Ended::Failed(format!("no tunnel: {reason}"));
        }
    };
    let mut early = Early::default();
    let opened = lease
        .connect_with_early(target, &mut AppSocket::new(&mut downstream), &mut early)
        .await;
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(workload = %ctx.pod.id, dst = %target,
                peer_spiffe_id = %destination.spiffe_id, error = %e,
                "outbound connection failed: refused by the peer");
            return Ended::Failed(format!("refused by the peer: {e}"));
        }
    };
    if let Some(e) = early.error.take() {
        tracing::info!(workload = %ctx.pod.id, dst = %target, error = %e,
            "outbound connection failed: reading from the application");
        return Ended::Failed(format!("reading from the application: {e}"));
    }
    let (stats, result) =
        relay_tunnel(&mut downstream, &mut stream, Initiator::Socket, early).await;
    Ended::Relayed { stats, result }
}

/// `target`: where the connection went (a service's endpoint, or
/// `orig_dst`); `peer`: the mesh workload reached through the tunnel.
fn log_closed(
    ctx: &OutboundContext,
    client: SocketAddr,
    orig_dst: SocketAddr,
    target: SocketAddr,
    peer: Option<&Destination>,
    stats: &RelayStats,
    result: &std::io::Result<()>,
) {
    ctx.mesh.metrics.add_bytes(stats.sent, stats.received);
    tracing::info!(
        workload = %ctx.pod.id,
        %client,
        %orig_dst,
        dst = %target,
        mode = if peer.is_some() { "hbone" } else { "passthrough" },
        peer_spiffe_id = peer.map(|p| p.spiffe_id.as_str()),
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX),
        error = result.as_ref().err().map(ToString::to_string),
        "outbound connection closed"
    );
}

/// A stream slot on a pooled tunnel from this pod's identity to the
/// destination's agent, opened (from the pod's netns) if every pooled one
/// is full.
async fn tunnel_to(
    target: SocketAddr,
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
    let peer_addr = SocketAddr::new(target.ip(), TUNNEL_PORT);
    let key = TunnelKey {
        source: state.identity.clone(),
        source_pod: ctx.pod.netns.cookie(),
        peer_addr,
        peer: destination.spiffe_id.clone(),
    };
    let pod = Arc::clone(&ctx.pod);
    let peer = destination.spiffe_id.clone();
    let tunnel = *ctx.mesh.pool.config();
    let bundles = Arc::clone(&ctx.mesh.bundles);
    // Only a new tunnel connection needs a client configuration; a pooled
    // one is found without building it.
    let connect = move || async move {
        let peer_name: Arc<str> = format!("{peer} at {peer_addr}").into();
        let config = client_config(&svid, bundles, vec![peer.clone()]).map_err(|e| {
            std::io::Error::other(format!("building the TLS client configuration: {e}"))
        })?;
        let tcp = pod.connect(peer_addr).await?;
        let _ = tcp.set_nodelay(true);
        set_liveness_options(&tcp, &tunnel)?;
        let tls = tokio::time::timeout(
            tunnel.handshake_timeout,
            TlsConnector::from(Arc::new(config))
                .connect(ServerName::from(peer_addr.ip()), ReadAhead::new(tcp)),
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
