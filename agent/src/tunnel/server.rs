//! The receiving side: CONNECT requests on one HTTP/2 connection.

use std::{fmt, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{HboneStream, TunnelConfig, TunnelError, authority, liveness, settings};

/// Serves one HBONE connection: runs the HTTP/2 server handshake over `io`
/// (an mTLS stream whose client certificate has been verified) and passes
/// every valid CONNECT request to `on_request`.
///
/// Requests that are not tunnels are answered here and never reach
/// `on_request`: another method gets 405, a CONNECT whose `:authority` is
/// missing or not `IP:port` gets 400.
///
/// `on_request` must not block: it should decide at once or move the
/// request to a task. This future drives the connection, so it must keep
/// running while any of its streams is in use. It returns when the peer
/// closes the connection and every stream has ended, with
/// [`TunnelError::Connection`] if the connection fails, or with
/// [`TunnelError::NoPingAnswer`] once the peer stops answering PINGs (so
/// a client that vanished does not keep its streams and their upstream
/// connections forever). The HTTP/2 handshake must finish within
/// `config.handshake_timeout`. Dropping the future closes the connection
/// and breaks its streams.
pub async fn serve<IO>(
    io: IO,
    config: &TunnelConfig,
    mut on_request: impl FnMut(InboundRequest) + Send,
) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = tokio::time::timeout(
        config.handshake_timeout,
        settings::server_builder().handshake::<IO, Bytes>(io),
    )
    .await
    .map_err(|_| {
        TunnelError::timed_out(
            "the HTTP/2 handshake",
            &"the tunnel client".into(),
            config.handshake_timeout,
        )
    })?
    .map_err(|e| TunnelError::Handshake(Arc::new(e)))?;
    let pings = connection
        .ping_pong()
        // Taken once per connection, right here: never `None`.
        .ok_or_else(|| TunnelError::Handshake(Arc::new(h2::Reason::INTERNAL_ERROR.into())))?;
    let dead = liveness::unanswered_ping(pings, config.ping_interval, config.ping_timeout);
    tokio::pin!(dead);
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut dead => return Err(TunnelError::NoPingAnswer(config.ping_timeout)),
        };
        let Some(next) = next else { break };
        let (request, mut respond) = next.map_err(|e| TunnelError::Connection(Arc::new(e)))?;
        let (parts, recv) = request.into_parts();
        match authority::parse_target(&parts.method, &parts.uri) {
            Ok(target) => on_request(InboundRequest {
                target,
                headers: parts.headers,
                recv,
                respond,
            }),
            Err(invalid) => {
                debug!(
                    method = %parts.method,
                    uri = %parts.uri,
                    status = invalid.status.as_u16(),
                    reason = invalid.reason,
                    "refusing non-HBONE request"
                );
                send_final(&mut respond, invalid.status);
            }
        }
    }
    Ok(())
}

/// A valid CONNECT request waiting for a decision. No data flows until
/// [`accept`](Self::accept); dropping it resets the stream.
pub struct InboundRequest {
    /// The destination the peer asks for, from `:authority`.
    pub target: SocketAddr,
    headers: HeaderMap,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

impl InboundRequest {
    /// The request's headers, for logging only.
    ///
    /// Never derive the peer's identity (or anything policy depends on)
    /// from them: any peer can send any header. The source identity is the
    /// SPIFFE ID in the verified TLS client certificate.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The next DATA the peer sent, before any answer (tests of early data).
    #[cfg(test)]
    pub(crate) async fn next_data(&mut self) -> Option<Bytes> {
        let data = self.recv.data().await?.ok()?;
        let _ = self.recv.flow_control().release_capacity(data.len());
        Some(data)
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<HboneStream, TunnelError> {
        let send = self
            .respond
            .send_response(response(StatusCode::OK), false)
            .map_err(|e| TunnelError::Stream(Arc::new(e)))?;
        Ok(HboneStream::new(send, self.recv))
    }

    /// Answers `status` and ends the stream.
    ///
    /// A status below 400 would not tell the peer it was refused (a 2xx
    /// would even open the tunnel on its side), so it is replaced by 403.
    pub fn reject(mut self, status: StatusCode) {
        let status = if status.as_u16() < 400 {
            StatusCode::FORBIDDEN
        } else {
            status
        };
        send_final(&mut self.respond, status);
    }
}

impl fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundRequest")
            .field("target", &self.target)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// Sends a bodiless final answer. Failure means the peer is already gone,
/// which leaves nothing to answer.
fn send_final(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Err(e) = respond.send_response(response(status), true) {
        debug!(error = %e, status = status.as_u16(), "could not answer HBONE request");
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}
