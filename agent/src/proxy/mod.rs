//! The shared proxy: what happens to a connection once the kernel handed it
//! to one of the agent's listeners.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Rejection;

pub mod dial;
pub mod inbound_plain;
pub mod inbound_tunnel;
pub mod interception;
pub mod limits;
pub mod listeners;
pub mod loop_guard;
pub mod outbound;
pub mod probe;
pub mod relay;
pub mod service_route;
pub mod tunnel_relay;
pub mod tunnel_socket;

/// Accepts on `listener` until the task is aborted (the pod is unenrolled
/// or the agent stops). Each connection must first pass `admit` (given the
/// peer's address); a refused one is reset at once, before any task or
/// buffer exists for it. An admitted one runs `handle` on its own task with
/// its permit, so connections already accepted outlive the listener.
pub async fn accept_loop<A, P, F, Fut>(listener: TcpListener, workload: &str, admit: A, handle: F)
where
    A: Fn(SocketAddr) -> Result<P, Rejection>,
    F: Fn(TcpStream, SocketAddr, P) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match admit(dial::unmapped(peer)) {
                Ok(permit) => {
                    tokio::spawn(handle(stream, peer, permit));
                }
                Err(reason) => {
                    // Debug only: a flood would otherwise flood the log too;
                    // the rejection metric counts every one.
                    tracing::debug!(workload, src = %peer, %reason, "connection rejected at accept");
                    // A reset, so the peer learns at once and the socket
                    // leaves no TIME_WAIT behind.
                    let _ = stream.set_zero_linger();
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(workload, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
