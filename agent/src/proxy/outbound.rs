//! The outbound side: connections an enrolled pod's application opened,
//! redirected by connect4/6 to the agent's listener inside the pod.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::relay::relay;
use crate::{capture::Capture, netns::Netns};

/// What an outbound listener needs to serve one pod.
pub struct OutboundContext {
    pub workload: String,
    pub netns: Arc<Netns>,
    pub capture: Arc<Capture>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
}

/// Accepts until the task is aborted (the pod is unenrolled or the agent
/// stops). Connections already accepted keep running on their own tasks.
pub async fn serve(listener: TcpListener, ctx: Arc<OutboundContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                tokio::spawn(handle(stream, client, Arc::clone(&ctx)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(workload = %ctx.workload, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut downstream: TcpStream, client: SocketAddr, ctx: Arc<OutboundContext>) {
    let Some(orig_dst) = ctx.capture.take_original_dst(ctx.netns.cookie(), client) else {
        // Someone dialled the listener directly, or the entry was evicted:
        // without a destination there is nothing safe to do but close.
        tracing::warn!(workload = %ctx.workload, %client,
            "denied: connection on the outbound listener has no original destination");
        return;
    };
    tracing::info!(workload = %ctx.workload, %client, %orig_dst, "outbound connection captured");
    let _ = downstream.set_nodelay(true);
    let connect = ctx.netns.connect(orig_dst, ctx.socket_mark);
    let mut upstream = match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::info!(workload = %ctx.workload, %orig_dst, error = %format!("{e:#}"),
                "outbound connection failed: upstream unreachable");
            return;
        }
        Err(_) => {
            tracing::info!(workload = %ctx.workload, %orig_dst,
                "outbound connection failed: upstream connect timed out");
            return;
        }
    };
    let (stats, result) = relay(&mut downstream, &mut upstream).await;
    tracing::info!(
        workload = %ctx.workload,
        %client,
        %orig_dst,
        bytes_sent = stats.sent,
        bytes_received = stats.received,
        duration_ms = stats.duration.as_millis() as u64,
        error = result.err().map(|e| e.to_string()),
        "outbound connection closed"
    );
}
