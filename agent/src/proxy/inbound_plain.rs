//! Inbound plaintext: connections to an enrolled pod that did not come
//! through the tunnel, handed to the agent by the sk_lookup program.
//! Strict pods refuse them with a reset; permissive pods let them through.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::{
    dial::{dial, unmapped},
    limits::{ConnectionPermit, PodLimits},
};
use crate::{
    audit,
    gate::{Connection, Gate},
    identity::SpiffeId,
    netns::Netns,
    workloads::Workload,
};

/// Why strict workloads refuse plaintext.
const STRICT_REASON: &str = "plaintext from outside the mesh to a strict mTLS workload";

pub struct PlaintextContext {
    pub workload: String,
    pub spec: Arc<Workload>,
    pub identity: SpiffeId,
    pub gate: Arc<Gate>,
    pub netns: Arc<Netns>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub permissive: bool,
    pub limits: Arc<PodLimits>,
}

pub async fn serve(listener: TcpListener, ctx: Arc<PlaintextContext>) {
    super::accept_loop(
        listener,
        &ctx.workload,
        |_| ctx.limits.admit_inbound(),
        |stream, peer, permit| handle(stream, peer, permit, Arc::clone(&ctx)),
    )
    .await;
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    _permit: ConnectionPermit,
    ctx: Arc<PlaintextContext>,
) {
    let peer = unmapped(peer);
    // sk_lookup does not rewrite addresses: the local end is what the peer dialled.
    let Ok(dst) = stream.local_addr().map(unmapped) else {
        return;
    };
    let conn = Connection {
        direction: audit::Direction::Inbound,
        source: None,
        source_addr: peer,
        workload: Arc::clone(&ctx.spec),
        workload_id: Some(ctx.identity.clone()),
        dst,
        tls_version: None,
        peer_cert_serial: None,
    };
    let refusal = if ctx.permissive {
        // Permissive only lifts the mTLS requirement: policy still decides,
        // with no source identity.
        let decision = ctx.gate.decide(&conn);
        (!decision.allowed).then(|| decision.reason.clone())
    } else {
        ctx.gate.deny(&conn, STRICT_REASON);
        Some(STRICT_REASON.to_owned())
    };
    if let Some(reason) = refusal {
        tracing::info!(workload = %ctx.workload, src = %peer, dst = %dst, reason = %reason,
            "inbound plaintext denied");
        // A reset, not a clean close: the client must not mistake a refusal
        // for an empty response.
        let _ = stream.set_zero_linger();
        return;
    }
    tracing::info!(workload = %ctx.workload, src = %peer, dst = %dst,
        "inbound plaintext allowed (permissive)");
    let mut downstream = stream;
    let mut upstream = match dial(&ctx.netns, dst, ctx.socket_mark, ctx.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %ctx.workload, %dst, error = %e,
                "inbound plaintext failed: application unreachable");
            return;
        }
    };
    let (stats, result, reason) = ctx.gate.relay(&conn, &mut downstream, &mut upstream).await;
    tracing::info!(workload = %ctx.workload, src = %peer, %dst, reason,
        bytes_sent = stats.sent, bytes_received = stats.received,
        duration_ms = stats.duration.as_millis() as u64,
        error = result.err().map(|e| e.to_string()),
        "inbound plaintext closed");
}
