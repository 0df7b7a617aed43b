//! In-memory tunnel endpoints for the tunnel tests: no TLS, no sockets.

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncWriteExt, DuplexStream},
    task::JoinHandle,
};

use super::{HboneClient, InboundRequest, TunnelConfig, TunnelError, serve};

/// Name of the peer in test clients' errors and logs.
pub(super) const PEER: &str = "test-peer";

/// Pipe buffer between client and server; small enough that large
/// transfers depend on backpressure working.
const PIPE_BUFFER: usize = 64 * 1024;

/// Fails the test instead of hanging it.
pub(crate) async fn within<T>(fut: impl Future<Output = T>) -> T {
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
    spawn_server_with(TunnelConfig::default(), handler)
}

/// [`spawn_server`] with the server's timeouts and liveness settings.
pub(super) fn spawn_server_with<H, Fut>(
    config: TunnelConfig,
    handler: H,
) -> (DuplexStream, JoinHandle<Result<(), TunnelError>>)
where
    H: Fn(InboundRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (client_io, server_io) = tokio::io::duplex(PIPE_BUFFER);
    let server = tokio::spawn(async move {
        serve(server_io, &config, move |request| {
            tokio::spawn(handler(request));
        })
        .await
    });
    (client_io, server)
}

/// A client connected to a server running `handler`.
pub(crate) async fn connected<H, Fut>(
    handler: H,
) -> (HboneClient, JoinHandle<Result<(), TunnelError>>)
where
    H: Fn(InboundRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (client_io, server) = spawn_server(handler);
    let client = HboneClient::handshake(client_io, PEER, &TunnelConfig::default())
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
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// A pipe end that can be frozen: once frozen, reads and writes never
/// complete, as with a peer whose host vanished (nothing arrives, nothing
/// is acknowledged, and no FIN or RST ever comes).
pub(super) struct Freezable {
    io: DuplexStream,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Freezable {
    /// Wraps `io`; the flag freezes it when set.
    pub(super) fn new(io: DuplexStream) -> (Self, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let frozen = std::sync::Arc::default();
        let wrapped = Self {
            io,
            frozen: std::sync::Arc::clone(&frozen),
        };
        (wrapped, frozen)
    }

    fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl tokio::io::AsyncRead for Freezable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.is_frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Freezable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.is_frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.is_frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.is_frozen() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A plain h2 server allowing `max_streams` concurrent streams, which
/// answers every request 200 and keeps its stream until the client ends
/// or resets it. Returns the client end of the pipe.
pub(super) fn spawn_limited_server(max_streams: u32) -> DuplexStream {
    let (client_io, server_io) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(async move {
        let mut connection = h2::server::Builder::new()
            .max_concurrent_streams(max_streams)
            .handshake::<_, bytes::Bytes>(server_io)
            .await?;
        while let Some(next) = connection.accept().await {
            let (request, mut respond) = next?;
            tokio::spawn(async move {
                let mut body = request.into_body();
                let Ok(_send) = respond.send_response(http::Response::new(()), false) else {
                    return;
                };
                while let Some(Ok(_)) = body.data().await {}
            });
        }
        Ok::<_, h2::Error>(())
    });
    client_io
}
