//! The sending side: CONNECT streams over one HTTP/2 connection.

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, Version};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::debug;

use super::{HboneStream, TunnelError, authority, settings};

/// One HBONE connection, opening a CONNECT stream per tunnelled
/// connection. Cloning is cheap; clones share the connection.
///
/// A background task drives the connection. It ends when the connection
/// fails or the peer closes it, or once every clone is dropped and no
/// stream is open; dropping the client therefore never cuts live streams.
#[derive(Clone)]
pub struct HboneClient {
    send: SendRequest<Bytes>,
    /// Becomes `true` when the driver task ends.
    closed: watch::Receiver<bool>,
}

impl HboneClient {
    /// Runs the HTTP/2 client handshake over `io` (an established mTLS
    /// stream to the peer's port 15008) and spawns the connection driver
    /// on the current tokio runtime.
    pub async fn handshake<IO>(io: IO) -> Result<Self, TunnelError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = settings::client_builder()
            .handshake::<IO, Bytes>(io)
            .await
            .map_err(|e| TunnelError::Handshake(Arc::new(e)))?;
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!("HBONE client connection closed"),
                Err(e) => debug!(error = %e, "HBONE client connection failed"),
            }
            closed_tx.send_replace(true);
        });
        Ok(Self { send, closed })
    }

    /// Opens a tunnel to `target` (the destination workload's `IP:port`,
    /// sent as `:authority`) and waits for the peer's answer, so a denied
    /// connection fails here before any application byte is sent.
    ///
    /// Any 2xx answer opens the tunnel (RFC 9110 §9.3.6); anything else is
    /// [`TunnelError::Rejected`].
    pub async fn connect(&self, target: SocketAddr) -> Result<HboneStream, TunnelError> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(authority::to_uri(target)?)
            .body(())
            .map_err(|_| TunnelError::BadAuthority(target.to_string()))?;
        // Fails fast once the connection is gone. Past the peer's stream
        // limit, h2 queues the stream and the response waits for a slot.
        let mut sender = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| TunnelError::Stream(Arc::new(e)))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|e| TunnelError::Stream(Arc::new(e)))?;
        let response = response
            .await
            .map_err(|e| TunnelError::Stream(Arc::new(e)))?;
        let status = response.status();
        if !status.is_success() {
            // Dropping `send` and the response body ends the stream.
            return Err(TunnelError::Rejected(status));
        }
        Ok(HboneStream::new(send, response.into_body()))
    }

    /// Whether this connection can no longer open streams: the driver
    /// ended, or the peer sent GOAWAY (its existing streams may still run).
    pub fn is_closed(&self) -> bool {
        if *self.closed.borrow() || self.closed.has_changed().is_err() {
            return true;
        }
        // `poll_ready` reports a received GOAWAY or connection error at
        // once. A fresh clone has no pending stream, so this never waits
        // and the no-op waker is never needed.
        let mut send = self.send.clone();
        matches!(
            send.poll_ready(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(Err(_))
        )
    }

    /// Resolves when the connection driver has ended.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the driver task was dropped (runtime shutdown),
        // which also ends the connection.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

impl fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneClient")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}
