//! In-memory tunnel endpoints for the tunnel tests: no TLS, no sockets.

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncWriteExt, DuplexStream},
    task::JoinHandle,
};

use super::{HboneClient, InboundRequest, TunnelError, serve};

/// Pipe buffer between client and server; small enough that large
/// transfers depend on backpressure working.
const PIPE_BUFFER: usize = 64 * 1024;

/// Fails the test instead of hanging it.
pub(super) async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test timed out")
}

/// Serves one tunnel connection over a new pipe, running `handler` in its
/// own task per valid request. Returns the client end of the pipe and the
/// server task (abort it to drop the connection).
pub(super) fn spawn_server<H, Fut>(
    handler: H,
) -> (DuplexStream, JoinHandle<Result<(), TunnelError>>)
where
    H: Fn(InboundRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (client_io, server_io) = tokio::io::duplex(PIPE_BUFFER);
    let server = tokio::spawn(serve(server_io, move |request| {
        tokio::spawn(handler(request));
    }));
    (client_io, server)
}

/// A client connected to a server running `handler`.
pub(super) async fn connected<H, Fut>(
    handler: H,
) -> (HboneClient, JoinHandle<Result<(), TunnelError>>)
where
    H: Fn(InboundRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (client_io, server) = spawn_server(handler);
    let client = HboneClient::handshake(client_io)
        .await
        .expect("client handshake");
    (client, server)
}

/// Accepts the tunnel and relays it, as the agent does, with
/// `copy_bidirectional` to an in-memory "application" that echoes
/// everything and closes its side after reading EOF.
pub(super) async fn echo(request: InboundRequest) {
    let Ok(mut tunnel) = request.accept() else {
        return;
    };
    let (mut app_side, app) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(app);
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    });
    let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut app_side).await;
}

/// Deterministic bytes that differ per `seed`, so swapped or shifted data
/// is caught.
pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
