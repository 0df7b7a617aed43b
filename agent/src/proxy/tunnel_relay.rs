//! Byte relay between a TCP connection and an HBONE stream, with no copy
//! in user space on either way.
//!
//! [`super::relay`] moves bytes through a buffer, which suits any pair of
//! streams. Between a socket and h2 that buffer is a copy too many each
//! way: h2 sends owned `Bytes`, and hands received data out as `Bytes`.
//! Here, bytes read from the socket go into a buffer that becomes the DATA
//! frame's payload as it is, and received payloads are written to the
//! socket straight from h2's buffers.
//!
//! Memory follows the traffic as in [`super::relay`]: a direction waits for
//! its socket to be readable before it allocates anything, so an idle
//! connection holds no relay buffer.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use socket2::SockRef;
use tokio::{
    io::{AsyncBufRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::io::poll_read_buf;

use super::relay::RelayStats;
use crate::tunnel::{Early, EarlySource, HboneStream};

/// Largest socket read, and so the largest DATA payload one read makes.
const CHUNK: usize = 64 * 1024;

/// Which end opened the connection (whose bytes count as "sent").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiator {
    /// An application's outbound connection, tunnelled to its peer.
    Socket,
    /// A peer's stream, relayed to the local application.
    Tunnel,
}

/// Copies both ways until both directions are closed, propagating
/// half-closes, counting `early`'s bytes as sent (its error is the
/// caller's to handle). On an error the bytes already relayed are still
/// counted.
pub async fn relay_tunnel(
    socket: &mut TcpStream,
    tunnel: &mut HboneStream,
    initiator: Initiator,
    early: Early,
) -> (RelayStats, io::Result<()>) {
    let started = Instant::now();
    let mut to_tunnel = ToTunnel {
        bytes: early.sent,
        ..ToTunnel::default()
    };
    let mut from_tunnel = FromTunnel::default();
    let result = poll_fn(|cx| {
        let up = to_tunnel.poll(cx, socket, tunnel)?;
        let down = from_tunnel.poll(cx, tunnel, socket)?;
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let (sent, received) = match initiator {
        Initiator::Socket => (to_tunnel.bytes, from_tunnel.bytes),
        Initiator::Tunnel => (from_tunnel.bytes, to_tunnel.bytes),
    };
    let stats = RelayStats {
        sent,
        received,
        duration: started.elapsed(),
    };
    (stats, result)
}

/// The application's socket as the source of a connection's early bytes
/// (sent behind the CONNECT: see [`crate::tunnel::Early`]).
pub struct AppSocket<'a> {
    socket: &'a mut TcpStream,
    /// Whether the first read, a raw one, was made.
    tried: bool,
}

impl<'a> AppSocket<'a> {
    pub fn new(socket: &'a mut TcpStream) -> Self {
        Self {
            socket,
            tried: false,
        }
    }
}

impl EarlySource for AppSocket<'_> {
    fn poll_early(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>> {
        if !self.tried {
            // A socket accepted a moment ago has no readiness recorded yet,
            // so tokio would not even try: a raw `recv` finds what the
            // application already wrote, to leave with the request headers.
            self.tried = true;
            // Uninitialised: zeroing 16 KiB per connection showed in
            // callgrind as a tenth of the client agent's instructions.
            let mut buf = BytesMut::with_capacity(max);
            match SockRef::from(&*self.socket).recv(&mut buf.spare_capacity_mut()[..max]) {
                Ok(n) => {
                    // SAFETY: recv initialised the first n bytes.
                    unsafe { buf.set_len(n) };
                    return Poll::Ready(Ok(buf.freeze()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        ready!(self.socket.poll_read_ready(cx))?;
        let mut buf = BytesMut::with_capacity(max);
        // Pending on a stale readiness, which `poll_read` clears.
        ready!(poll_read_buf(Pin::new(&mut *self.socket), cx, &mut buf))?;
        Poll::Ready(Ok(buf.freeze()))
    }
}

/// Socket to tunnel.
#[derive(Default)]
struct ToTunnel {
    /// Read from the socket, not yet taken by h2 (waiting for window).
    pending: Bytes,
    read_eof: bool,
    done: bool,
    bytes: u64,
}

impl ToTunnel {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        socket: &TcpStream,
        tunnel: &mut HboneStream,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            while !self.pending.is_empty() {
                let n = ready!(tunnel.poll_send(cx, &mut self.pending))?;
                self.bytes += n as u64;
            }
            if self.read_eof {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))?;
                self.done = true;
                break;
            }
            // Readable first, so an idle direction allocates nothing.
            ready!(socket.poll_read_ready(cx))?;
            let mut buf = BytesMut::with_capacity(CHUNK);
            // `try_read_buf` keeps the readiness after a short read, so the
            // next pass reads again: one EAGAIN `recv` per request on a
            // kept-alive connection, but no trip through epoll per read for
            // a bulk stream whose bytes keep coming. (`poll_read`, which
            // clears the readiness on a short read, saved that `recv` and
            // left the CPU per request unchanged in an A/B of ten pairs,
            // while four-stream iperf3 was lower in eight of them.)
            match socket.try_read_buf(&mut buf) {
                Ok(0) => self.read_eof = true,
                Ok(_) => self.pending = buf.freeze(),
                // A stale readiness, now cleared: wait for the next one.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Tunnel to socket.
#[derive(Default)]
struct FromTunnel {
    done: bool,
    bytes: u64,
}

impl FromTunnel {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        socket: &mut TcpStream,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            let data = ready!(Pin::new(&mut *tunnel).poll_fill_buf(cx))?;
            if data.is_empty() {
                // The peer's END_STREAM: half-close the socket.
                ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                self.done = true;
                break;
            }
            let n = ready!(Pin::new(&mut *socket).poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Pin::new(&mut *tunnel).consume(n);
            self.bytes += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::tunnel::{
        EARLY_MAX, InboundRequest, TunnelError,
        test_support::{connected, pattern, within},
    };

    /// A connected pair of loopback sockets: (the app's end, the agent's).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (agent, _) = listener.accept().await.unwrap();
        (app, agent)
    }

    #[tokio::test]
    async fn relays_megabytes_both_ways_in_order_and_propagates_half_close() {
        const UP: usize = 3_000_000;
        const DOWN: usize = 2_000_000;
        // The peer reads the whole request first, then answers: the
        // application's half-close must reach it as END_STREAM.
        let (client, _server) = connected(|request| async move {
            let mut stream = request.accept().unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            assert!(got == pattern(1, UP), "the peer got other bytes");
            stream.write_all(&pattern(2, DOWN)).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut tunnel = client.connect(target).await.unwrap();
        let (mut app, mut agent) = socket_pair().await;
        let relay = tokio::spawn(async move {
            relay_tunnel(&mut agent, &mut tunnel, Initiator::Socket, Early::default()).await
        });
        within(async {
            let (mut read, mut write) = app.split();
            let send = async {
                write.write_all(&pattern(1, UP)).await.unwrap();
                write.shutdown().await.unwrap();
            };
            let mut answer = Vec::new();
            let receive = read.read_to_end(&mut answer);
            let ((), received) = tokio::join!(send, receive);
            received.unwrap();
            assert!(answer == pattern(2, DOWN), "the app got other bytes");
        })
        .await;
        let (stats, result) = within(relay).await.unwrap();
        result.unwrap();
        assert_eq!((stats.sent, stats.received), (UP as u64, DOWN as u64));
    }

    /// A peer that answers only once the request's first bytes arrived
    /// (without early data, never), then echoes them and everything after.
    async fn answer_after_first_bytes(mut request: InboundRequest) {
        let first = request.next_data().await.expect("early bytes");
        let mut stream = request.accept().unwrap();
        stream.write_all(&first).await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        stream.write_all(&rest).await.unwrap();
        stream.shutdown().await.unwrap();
    }

    /// Opens a stream to a peer running `answer_after_first_bytes`, with
    /// `agent` as the early source, while `app` (which holds the other end)
    /// writes; then relays, half-closes the app and reads the echo. Returns
    /// the bytes sent early and the echo.
    async fn open_early_and_echo(
        agent: TcpStream,
        app: impl Future<Output = TcpStream>,
    ) -> (u64, Vec<u8>) {
        let (client, _server) = connected(answer_after_first_bytes).await;
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut agent = agent;
        let mut early = Early::default();
        let mut source = AppSocket::new(&mut agent);
        let opening = client.connect_with_early(target, &mut source, &mut early);
        let (mut app, opened) = within(async { tokio::join!(app, opening) }).await;
        let mut tunnel = opened.expect("the peer answers once it has the early bytes");
        let sent = early.sent;
        tokio::spawn(async move {
            relay_tunnel(&mut agent, &mut tunnel, Initiator::Socket, early).await
        });
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        within(app.read_to_end(&mut answer)).await.unwrap();
        (sent, answer)
    }

    #[tokio::test]
    async fn what_the_app_wrote_before_the_stream_opened_goes_before_the_answer() {
        let (mut app, agent) = socket_pair().await;
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (sent, answer) = open_early_and_echo(agent, async { app }).await;
        assert_eq!(sent, 18);
        assert_eq!(answer, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn what_the_app_writes_while_the_peer_decides_goes_before_the_answer() {
        let (mut app, agent) = socket_pair().await;
        let write_later = async move {
            // After the first poll of the opening stream, which found
            // nothing to read.
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            app.write_all(b"later").await.unwrap();
            app
        };
        let (sent, answer) = open_early_and_echo(agent, write_later).await;
        assert_eq!(sent, 5);
        assert_eq!(answer, b"later");
    }

    #[tokio::test]
    async fn a_long_first_flight_sends_its_first_part_early_and_the_rest_in_order() {
        const LEN: usize = 40 * 1024;
        let (mut app, agent) = socket_pair().await;
        app.write_all(&pattern(5, LEN)).await.unwrap();
        let (sent, answer) = open_early_and_echo(agent, async { app }).await;
        assert_eq!(sent, EARLY_MAX as u64, "sent before the answer");
        assert!(
            answer == pattern(5, LEN),
            "the bytes came back out of order or short"
        );
    }

    #[tokio::test]
    async fn a_refused_stream_still_reports_the_early_bytes_it_took() {
        let (client, _server) = connected(|mut request: InboundRequest| async move {
            request.next_data().await.expect("early bytes");
            request.reject(http::StatusCode::FORBIDDEN);
        })
        .await;
        let (mut app, mut agent) = socket_pair().await;
        app.write_all(b"secret").await.unwrap();
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut early = Early::default();
        let opened =
            within(client.connect_with_early(target, &mut AppSocket::new(&mut agent), &mut early))
                .await;
        assert!(
            matches!(&opened, Err(TunnelError::Rejected(s)) if *s == 403),
            "{opened:?}"
        );
        assert_eq!(early.sent, 6);
    }

    #[tokio::test]
    async fn a_peers_stream_counts_what_the_peer_sent_as_sent() {
        const UP: usize = 100_000;
        const DOWN: usize = 700_000;
        // The local application: reads the request to its end, answers.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = app.accept().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            assert!(got == pattern(3, UP), "the app got other bytes");
            conn.write_all(&pattern(4, DOWN)).await.unwrap();
        });
        let (stats_tx, stats_rx) = tokio::sync::oneshot::channel();
        let stats_tx = std::sync::Mutex::new(Some(stats_tx));
        let (client, _server) = connected(move |request| {
            let stats_tx = stats_tx.lock().unwrap().take();
            async move {
                let mut stream = request.accept().unwrap();
                let mut socket = TcpStream::connect(app_addr).await.unwrap();
                let relayed = relay_tunnel(
                    &mut socket,
                    &mut stream,
                    Initiator::Tunnel,
                    Early::default(),
                )
                .await;
                let _ = stats_tx.unwrap().send(relayed);
            }
        })
        .await;
        let mut tunnel = client.connect(app_addr).await.unwrap();
        within(async {
            tunnel.write_all(&pattern(3, UP)).await.unwrap();
            tunnel.shutdown().await.unwrap();
            let mut answer = Vec::new();
            tunnel.read_to_end(&mut answer).await.unwrap();
            assert!(answer == pattern(4, DOWN), "the peer got other bytes");
        })
        .await;
        let (stats, result) = within(stats_rx).await.unwrap();
        result.unwrap();
        assert_eq!((stats.sent, stats.received), (UP as u64, DOWN as u64));
    }
}
