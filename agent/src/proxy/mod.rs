//! The shared proxy: what happens to a connection once the kernel handed it
//! to one of the agent's listeners.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

pub mod dial;
pub mod inbound_plain;
pub mod inbound_tunnel;
pub mod outbound;
pub mod relay;
pub mod tunnel_socket;

/// Accepts on `listener` until the task is aborted (the pod is unenrolled
/// or the agent stops), running `handle` for each connection on its own
/// task, so connections already accepted outlive the listener.
pub async fn accept_loop<F, Fut>(listener: TcpListener, workload: &str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(workload, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
