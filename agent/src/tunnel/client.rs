//! The sending side: CONNECT streams over one HTTP/2 connection.

use std::{
    fmt,
    future::{Future, poll_fn},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use h2::{Ping, client::SendRequest};
use http::{Method, Request, Version};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    HboneStream, TunnelConfig, TunnelError, authority,
    early::{Early, EarlySource, NoEarly},
    liveness, settings,
    usage::{StreamCounter, StreamPermit},
};

/// Why a client connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed it, it failed, or it was no longer used.
    Closed,
    /// The peer stopped answering PINGs.
    Dead,
    /// No stream for the idle timeout.
    Idle,
}

/// One HBONE connection, opening a CONNECT stream per tunnelled
/// connection. Cloning is cheap; clones share the connection.
///
/// A background task drives the connection. It ends when the connection
/// fails or the peer closes it, when the peer stops answering PINGs, when
/// no stream has been open for the idle timeout, or once every clone is
/// dropped and no stream is open; dropping the client therefore never cuts
/// live streams.
#[derive(Clone)]
pub struct HboneClient {
    send: SendRequest<Bytes>,
    /// Becomes `Some` when the driver task ends.
    closed: watch::Receiver<Option<CloseReason>>,
    streams: StreamCounter,
    /// Who is at the other end, for logs and errors.
    peer: Arc<str>,
    stream_open_timeout: Duration,
}

impl HboneClient {
    /// Runs the HTTP/2 client handshake over `io` (an established mTLS
    /// stream to `peer`'s port 15008) and spawns the connection driver on
    /// the current tokio runtime.
    ///
    /// Returns only once the peer answered a PING: then it speaks HTTP/2
    /// and its SETTINGS (its stream limit above all) are in effect. The
    /// whole exchange is bounded by `config.handshake_timeout`.
    pub async fn handshake<IO>(
        io: IO,
        peer: impl Into<Arc<str>>,
        config: &TunnelConfig,
    ) -> Result<Self, TunnelError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = peer.into();
        let timed_out =
            || TunnelError::timed_out("the HTTP/2 handshake", &peer, config.handshake_timeout);
        let deadline = tokio::time::Instant::now() + config.handshake_timeout;
        let (send, connection) = tokio::time::timeout_at(
            deadline,
            settings::client_builder().handshake::<IO, Bytes>(io),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| TunnelError::Handshake(Arc::new(e)))?;
        let mut connection = Box::pin(connection);
        let mut pings = connection
            .ping_pong()
            // Taken once per connection, right here: never `None`.
            .ok_or_else(|| TunnelError::Handshake(Arc::new(h2::Reason::INTERNAL_ERROR.into())))?;
        let first_pong = async {
            tokio::select! {
                pong = pings.ping(Ping::opaque()) => pong.map(drop),
                ended = connection.as_mut() => ended.and(Err(h2::Error::from(h2::Reason::CONNECT_ERROR))),
            }
        };
        tokio::time::timeout_at(deadline, first_pong)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| TunnelError::Handshake(Arc::new(e)))?;

        let (closed_tx, closed) = watch::channel(None);
        let streams = StreamCounter::default();
        let driver = Driver {
            peer: Arc::clone(&peer),
            streams: streams.clone(),
            config: *config,
        };
        tokio::spawn(async move {
            let reason = driver.run(connection, pings).await;
            closed_tx.send_replace(Some(reason));
        });
        Ok(Self {
            send,
            closed,
            streams,
            peer,
            stream_open_timeout: config.stream_open_timeout,
        })
    }

    /// Opens a tunnel to `target` (the destination workload's `IP:port`,
    /// sent as `:authority`) and waits for the peer's answer, so a denied
    /// connection fails here before any application byte is sent.
    ///
    /// Any 2xx answer opens the tunnel (RFC 9110 §9.3.6); anything else is
    /// [`TunnelError::Rejected`]. Waiting for a stream slot and for the
    /// answer together take at most the stream-open timeout.
    pub async fn connect(&self, target: SocketAddr) -> Result<HboneStream, TunnelError> {
        self.connect_with_early(target, &mut NoEarly, &mut Early::default())
            .await
    }

    /// [`connect`](Self::connect), sending what `source` writes meanwhile
    /// behind the request; see [`open`](Self::open).
    pub async fn connect_with_early(
        &self,
        target: SocketAddr,
        source: &mut impl EarlySource,
        early: &mut Early,
    ) -> Result<HboneStream, TunnelError> {
        self.open(self.streams.acquire(), target, source, early)
            .await
    }

    /// [`connect`](Self::connect) on a stream slot reserved beforehand,
    /// sending what `source` writes meanwhile behind the request, without
    /// waiting for the answer ([`super::early`]); `early` tells what became
    /// of those bytes, also when the stream is refused.
    pub(crate) async fn open(
        &self,
        permit: StreamPermit,
        target: SocketAddr,
        source: &mut impl EarlySource,
        early: &mut Early,
    ) -> Result<HboneStream, TunnelError> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(authority::to_uri(target)?)
            .body(())
            .map_err(|_| TunnelError::BadAuthority(target.to_string()))?;
        let opening = async {
            // Fails fast once the connection is gone. Past the peer's stream
            // limit, h2 queues the stream and the response waits for a slot.
            let mut sender = self.send.clone().ready().await?;
            let (response, mut send) = sender.send_request(request, false)?;
            let mut response = std::pin::pin!(response);
            let response = poll_fn(|cx| {
                if let Poll::Ready(answer) = response.as_mut().poll(cx) {
                    return Poll::Ready(answer);
                }
                match early.pump(cx, source, &mut send) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            })
            .await?;
            Ok::<_, h2::Error>((response, send))
        };
        // On timeout the dropped request resets the stream.
        let (response, send) = tokio::time::timeout(self.stream_open_timeout, opening)
            .await
            .map_err(|_| {
                TunnelError::timed_out("opening a stream", &self.peer, self.stream_open_timeout)
            })?
            .map_err(|e| TunnelError::Stream(Arc::new(e)))?;
        let status = response.status();
        if !status.is_success() {
            // Dropping `send` and the response body ends the stream.
            return Err(TunnelError::Rejected(status));
        }
        Ok(HboneStream::new(send, response.into_body()).holding(permit))
    }

    /// Reserves a stream slot if the connection is open and below the
    /// peer's concurrent stream limit (and ours, in case the peer sets
    /// none).
    pub(crate) fn try_reserve(&self) -> Option<StreamPermit> {
        if self.is_closed() {
            return None;
        }
        let limit = self
            .send
            .current_max_send_streams()
            .min(usize::try_from(settings::MAX_CONCURRENT_STREAMS).unwrap_or(usize::MAX));
        self.streams.try_acquire(limit)
    }

    /// Streams open or being opened on this connection.
    pub(crate) fn open_streams(&self) -> usize {
        self.streams.open()
    }

    /// The peer, as named at the handshake.
    pub fn peer(&self) -> &Arc<str> {
        &self.peer
    }

    /// Whether this connection can no longer open streams: the driver
    /// ended, or the peer sent GOAWAY (its existing streams may still run).
    pub fn is_closed(&self) -> bool {
        if self.closed.borrow().is_some() || self.closed.has_changed().is_err() {
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

    /// Resolves, with the reason, when the connection driver has ended.
    pub async fn closed(&self) -> CloseReason {
        self.close_watch().await
    }

    /// Like [`closed`](Self::closed), without keeping the connection
    /// alive while waiting (it holds no clone of the client).
    pub(crate) fn close_watch(&self) -> impl Future<Output = CloseReason> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            // An error means the driver task was dropped (runtime
            // shutdown), which also ends the connection.
            match closed.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(CloseReason::Closed),
                Err(_) => CloseReason::Closed,
            }
        }
    }
}

/// What the connection's background task needs besides the connection.
struct Driver {
    peer: Arc<str>,
    streams: StreamCounter,
    config: TunnelConfig,
}

impl Driver {
    /// Drives the connection until it ends, its peer stops answering
    /// PINGs, or it has been idle too long; the last two drop it, which
    /// closes the socket.
    async fn run<F>(self, connection: Pin<Box<F>>, pings: h2::PingPong) -> CloseReason
    where
        F: Future<Output = Result<(), h2::Error>>,
    {
        let Self {
            peer,
            streams,
            config,
        } = self;
        let reason = tokio::select! {
            ended = connection => {
                match ended {
                    Ok(()) => debug!(%peer, "HBONE client connection closed"),
                    Err(e) => debug!(%peer, error = %e, "HBONE client connection failed"),
                }
                CloseReason::Closed
            }
            () = liveness::unanswered_ping(pings, config.ping_interval, config.ping_timeout) => {
                warn!(%peer, ping_timeout = ?config.ping_timeout, open_streams = streams.open(),
                    "tunnel to {peer} is dead: no PING answer in {:?}", config.ping_timeout);
                CloseReason::Dead
            }
            () = expire_when_idle(&streams, config.idle_timeout) => {
                info!(%peer, idle_timeout = ?config.idle_timeout, "tunnel connection idle: closed");
                CloseReason::Idle
            }
        };
        streams.retire();
        reason
    }
}

/// Resolves once no stream has been open for `idle_timeout`, after which
/// the connection takes no new stream.
async fn expire_when_idle(streams: &StreamCounter, idle_timeout: Duration) {
    loop {
        streams.idle().await;
        if tokio::time::timeout(idle_timeout, streams.busy())
            .await
            .is_err()
            && streams.retire_if_idle()
        {
            return;
        }
    }
}

impl fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneClient")
            .field("peer", &self.peer)
            .field("open_streams", &self.streams.open())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}
