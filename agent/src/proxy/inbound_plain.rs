//! Inbound plaintext: connections to an enrolled pod that did not come
//! through the tunnel, handed to the agent by the sk_lookup program (or a
//! sidecar's nftables REDIRECT).
//! Strict pods refuse them with a reset; permissive pods let them through
//! if policy allows (with no source identity). The kubelet's httpGet probes
//! from the node are let through to both ([`super::probe`]).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use super::{
    dial::unmapped,
    interception::Interception,
    limits::ConnectionPermit,
    loop_guard,
    probe::{self, PROBE_REASON},
    relay::relay,
};
use crate::{
    audit,
    gate::{Connection, Gate},
    pod::PodContext,
    workloads::probes::ProbeKind,
};

/// Why strict workloads refuse plaintext.
const STRICT_REASON: &str = "plaintext from outside the mesh to a strict mTLS workload";

pub struct PlaintextContext {
    pub pod: Arc<PodContext>,
    pub gate: Arc<Gate>,
    /// Knows where each connection was going, and tells connections
    /// opened on the node (kubelet probes) apart.
    pub interception: Interception,
}

pub async fn serve(listener: TcpListener, ctx: Arc<PlaintextContext>) {
    super::accept_loop(
        listener,
        &ctx.pod.id,
        |_| ctx.pod.limits.admit_inbound(),
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
    let pod = &ctx.pod;
    let peer = unmapped(peer);
    let Ok(dst) = ctx.interception.inbound_dst(&stream) else {
        // Nowhere known to send it: refuse (fail closed).
        let _ = stream.set_zero_linger();
        return;
    };
    let state = pod.state();
    let conn = Connection {
        direction: audit::Direction::Inbound,
        source: None,
        source_addr: peer,
        workload: Arc::clone(&state.spec),
        workload_id: Some(state.identity.clone()),
        dst,
        tls_version: None,
        peer_cert_serial: None,
    };
    let mut stream = stream;
    // Bytes already read from the client (a request from the node that is
    // no probe), replayed to the application if the pod accepts plaintext.
    let mut replay = Vec::new();
    let mut strict_reason = STRICT_REASON.to_owned();
    if ctx.interception.opened_by_node(peer, dst) == Some(ProbeKind::Http)
        // Never a probe of the agent's own ports.
        && loop_guard::refusal(dst, pod.dial.agent_ports).is_none()
    {
        match serve_probe(&ctx, &conn, &mut stream).await {
            Ok(()) => return,
            Err((read, why)) => {
                strict_reason =
                    format!("{STRICT_REASON} (from the node, not a kubelet probe: {why})");
                replay = read;
            }
        }
    }
    let refusal = if !state.spec.permissive() {
        ctx.gate.deny(&conn, &strict_reason);
        Some(strict_reason)
    } else if let Some(reason) = loop_guard::refusal(dst, pod.dial.agent_ports) {
        ctx.gate.deny(&conn, reason);
        Some(reason.to_owned())
    } else {
        // Permissive only lifts the mTLS requirement: policy still decides,
        // with no source identity.
        let decision = ctx.gate.decide(&conn);
        (!decision.allowed).then(|| decision.reason.clone())
    };
    if let Some(reason) = refusal {
        tracing::info!(workload = %pod.id, src = %peer, dst = %dst, reason = %reason,
            "inbound plaintext denied");
        // A reset, not a clean close: the client must not mistake a refusal
        // for an empty response.
        let _ = stream.set_zero_linger();
        return;
    }
    tracing::info!(workload = %pod.id, src = %peer, dst = %dst,
        "inbound plaintext allowed (permissive)");
    let mut downstream = stream;
    let mut upstream = match pod.connect(dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(workload = %pod.id, %dst, error = %e,
                    "inbound plaintext failed: application unreachable");
            return;
        }
    };
    if let Err(e) = upstream.write_all(&replay).await {
        tracing::info!(workload = %pod.id, %dst, error = %e,
                "inbound plaintext failed: application closed");
        return;
    }
    let (stats, result, reason) = ctx
        .gate
        .relay(&conn, pod, relay(&mut downstream, &mut upstream))
        .await;
    tracing::info!(workload = %pod.id, src = %peer, %dst, reason,
        bytes_sent = stats.sent, bytes_received = stats.received,
        duration_ms = u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX),
        error = result.err().map(|e| e.to_string()),
        "inbound plaintext closed");
}

/// Serves a connection the kernel saw opened on the node to an httpGet
/// probe port, if it carries a probe; otherwise returns what was read and
/// why it is no probe.
async fn serve_probe(
    ctx: &PlaintextContext,
    conn: &Connection,
    stream: &mut TcpStream,
) -> Result<(), (Vec<u8>, String)> {
    let pod = &ctx.pod;
    let dst = conn.dst;
    match probe::read_request(stream, &conn.workload.probes, dst.port()).await {
        probe::Request::Probe(head) => {
            ctx.gate.allow_probe(conn, PROBE_REASON);
            if let Err(e) = probe::forward(pod, stream, dst, &head).await {
                tracing::info!(workload = %pod.id, src = %conn.source_addr, %dst, error = %e,
                    "kubelet probe failed");
            }
            Ok(())
        }
        probe::Request::Other { read, why } => Err((read, why)),
    }
}
