//! Client, server and stream together over in-memory pipes.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    sync::mpsc,
};

use super::{
    HboneClient, HboneStream, InboundRequest, TunnelConfig, TunnelError, TunnelPool, settings,
    test_support::{connected, echo, pattern, spawn_server, within},
};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Writes `data`, half-closes, and returns everything read back.
async fn send_and_collect(stream: HboneStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("read");
    writer.await.expect("writer task");
    got
}

#[tokio::test]
async fn bytes_round_trip_both_ways() {
    within(async {
        let (targets_tx, mut targets) = mpsc::unbounded_channel();
        let (client, _server) = connected(move |request: InboundRequest| {
            let _ = targets_tx.send(request.target);
            echo(request)
        })
        .await;

        let mut stream = client
            .connect(addr("10.1.2.3:8080"))
            .await
            .expect("connect");
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        stream.write_all(b"second message").await.expect("write");
        let mut buf = [0u8; 14];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"second message");
        assert_eq!(targets.recv().await, Some(addr("10.1.2.3:8080")));

        // IPv6 targets arrive intact, brackets and all.
        let v6 = client
            .connect(addr("[fd00:a5b1::9]:443"))
            .await
            .expect("v6");
        assert_eq!(send_and_collect(v6, b"six".to_vec()).await, b"six");
        assert_eq!(targets.recv().await, Some(addr("[fd00:a5b1::9]:443")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_streams_on_one_connection() {
    within(async {
        let (client, _server) = connected(echo).await;
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let data = pattern(i, 20_000 + i as usize * 97);
                    let stream = client
                        .connect(addr(&format!("10.0.0.{}:80", i + 1)))
                        .await
                        .expect("connect");
                    assert_eq!(
                        send_and_collect(stream, data.clone()).await,
                        data,
                        "stream {i}"
                    );
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("stream task");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_each_way_keeps_integrity() {
    within(async {
        let (client, _server) = connected(echo).await;
        let data = pattern(8, 8 * 1024 * 1024);
        let stream = client
            .connect(addr("10.0.0.1:5201"))
            .await
            .expect("connect");
        let got = send_and_collect(stream, data.clone()).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "echoed data differs");
    })
    .await;
}

#[tokio::test]
async fn slow_reader_holds_back_the_writer() {
    within(async {
        let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
        let release = std::sync::Mutex::new(Some(release));
        let (client, _server) = connected(move |request: InboundRequest| {
            let release = release.lock().expect("lock").take();
            async move {
                let mut tunnel = request.accept().expect("accept");
                // Read nothing until told to: the window must fill up.
                if let Some(release) = release {
                    let _ = release.await;
                }
                let mut got = Vec::new();
                tunnel.read_to_end(&mut got).await.expect("read");
                tunnel
                    .write_all(&(got.len() as u64).to_be_bytes())
                    .await
                    .expect("reply");
                tunnel.shutdown().await.expect("shutdown");
            }
        })
        .await;

        let mut stream = client.connect(addr("10.0.0.1:80")).await.expect("connect");
        let chunk = vec![7u8; 64 * 1024];
        let mut accepted = 0usize;
        while let Ok(result) =
            tokio::time::timeout(Duration::from_millis(200), stream.write(&chunk)).await
        {
            accepted += result.expect("write");
            assert!(accepted <= 64 * 1024 * 1024, "writes never blocked");
        }
        // Nothing beyond the peer's stream window was taken from the writer.
        assert!(accepted > 0);
        assert!(accepted <= settings::STREAM_WINDOW as usize, "{accepted}");

        // Once the reader reads, window comes back and everything flows.
        release_tx.send(()).expect("release");
        let total = accepted + 8 * 1024 * 1024;
        let mut remaining = total - accepted;
        while remaining > 0 {
            let n = stream
                .write(&chunk[..remaining.min(chunk.len())])
                .await
                .expect("write");
            remaining -= n;
        }
        stream.shutdown().await.expect("shutdown");
        let mut reply = [0u8; 8];
        stream.read_exact(&mut reply).await.expect("reply");
        assert_eq!(u64::from_be_bytes(reply), total as u64);
    })
    .await;
}

#[tokio::test]
async fn half_close_lets_the_server_still_reply() {
    within(async {
        let (client, _server) = connected(|request: InboundRequest| async move {
            let mut tunnel = request.accept().expect("accept");
            let mut received = Vec::new();
            // Ends only because the client's shutdown arrives as EOF.
            tunnel
                .read_to_end(&mut received)
                .await
                .expect("read to EOF");
            let reply = format!("got {} bytes", received.len());
            tunnel.write_all(reply.as_bytes()).await.expect("reply");
            tunnel.shutdown().await.expect("shutdown");
        })
        .await;

        let mut stream = client.connect(addr("10.0.0.1:80")).await.expect("connect");
        stream.write_all(b"hello").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        // Shutdown is idempotent; writing afterwards is an error, not a hang.
        stream.shutdown().await.expect("second shutdown");
        let err = stream
            .write_all(b"late")
            .await
            .expect_err("write after shutdown");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("read reply");
        assert_eq!(reply, "got 5 bytes");
    })
    .await;
}

#[tokio::test]
async fn rejection_surfaces_as_rejected_status() {
    within(async {
        let (client, _server) = connected(|request: InboundRequest| async move {
            if request.target.port() == 80 {
                echo(request).await;
            } else {
                request.reject(StatusCode::FORBIDDEN);
            }
        })
        .await;

        let err = client
            .connect(addr("10.0.0.1:22"))
            .await
            .expect_err("denied");
        assert!(
            matches!(err, TunnelError::Rejected(StatusCode::FORBIDDEN)),
            "{err:?}"
        );
        // A rejection ends one stream, not the connection.
        let stream = client.connect(addr("10.0.0.1:80")).await.expect("allowed");
        assert_eq!(send_and_collect(stream, b"ok".to_vec()).await, b"ok");
    })
    .await;
}

#[tokio::test]
async fn reject_never_sends_a_success_status() {
    within(async {
        let (client, _server) =
            connected(|request: InboundRequest| async move { request.reject(StatusCode::OK) })
                .await;
        let err = client
            .connect(addr("10.0.0.1:80"))
            .await
            .expect_err("denied");
        assert!(
            matches!(err, TunnelError::Rejected(StatusCode::FORBIDDEN)),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn peer_reset_is_an_io_error() {
    within(async {
        let (client, _server) = connected(|request: InboundRequest| async move {
            let mut tunnel = request.accept().expect("accept");
            let mut buf = [0u8; 5];
            tunnel.read_exact(&mut buf).await.expect("read");
            // Dropped mid-stream without shutdown: h2 resets the stream.
            drop(tunnel);
        })
        .await;

        let mut stream = client.connect(addr("10.0.0.1:80")).await.expect("connect");
        stream.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 16];
        let err = stream.read(&mut buf).await.expect_err("read after reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let err = stream
            .write_all(b"more")
            .await
            .expect_err("write after reset");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    })
    .await;
}

#[tokio::test]
async fn lost_connection_is_an_io_error_not_eof() {
    within(async {
        let (client, server) = connected(|request: InboundRequest| async move {
            let tunnel = request.accept().expect("accept");
            // Hold the stream open until the connection dies.
            std::future::pending::<()>().await;
            drop(tunnel);
        })
        .await;

        let mut stream = client.connect(addr("10.0.0.1:80")).await.expect("connect");
        server.abort();
        let mut buf = [0u8; 16];
        assert!(stream.read(&mut buf).await.is_err());
        client.closed().await;
        assert!(client.is_closed());
        assert!(matches!(
            client.connect(addr("10.0.0.1:80")).await,
            Err(TunnelError::Stream(_))
        ));
    })
    .await;
}

/// Sends a raw request with the plain h2 client and returns the status.
async fn raw_status(client_io: DuplexStream, request: Request<()>) -> StatusCode {
    let (mut send, connection) = h2::client::handshake(client_io)
        .await
        .expect("raw handshake");
    tokio::spawn(connection);
    let (response, _body) = send.send_request(request, true).expect("send request");
    response.await.expect("response").status()
}

/// A server whose handler only counts calls: it must not see bad requests.
fn counting_server() -> (DuplexStream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let (client_io, _server) = spawn_server(move |_request: InboundRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {}
    });
    (client_io, calls)
}

#[tokio::test]
async fn non_connect_gets_405() {
    within(async {
        let (client_io, calls) = counting_server();
        let request = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.0.1:80/")
            .body(())
            .expect("request");
        assert_eq!(
            raw_status(client_io, request).await,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn hostname_or_portless_authority_gets_400() {
    within(async {
        for authority in ["example.com:443", "10.0.0.1", "10.0.0.1:0"] {
            let (client_io, calls) = counting_server();
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .body(())
                .expect("request");
            assert_eq!(
                raw_status(client_io, request).await,
                StatusCode::BAD_REQUEST,
                "{authority}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 0);
        }
    })
    .await;
}

/// The h2 client cannot send a CONNECT without `:authority`, so this one is
/// written as raw frames.
#[tokio::test]
async fn missing_authority_gets_400() {
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }

    within(async {
        let (mut io, calls) = counting_server();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        // HPACK literal without indexing, name index 2 (`:method`): CONNECT.
        let mut block = vec![0x02, 7];
        block.extend_from_slice(b"CONNECT");
        frame(&mut out, HEADERS, END_STREAM_AND_HEADERS, 1, &block);
        io.write_all(&out).await.expect("write frames");

        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.expect("server frame");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.expect("frame payload");
            match head[3] {
                HEADERS if stream == 1 => {
                    // h2 encodes `:status: 400` as HPACK static entry 12.
                    assert_eq!(payload.first(), Some(&(0x80 | 12)), "not a 400");
                    break;
                }
                RST_STREAM | GOAWAY => panic!("request refused at the HTTP/2 layer"),
                _ => {}
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
/// Headers reach the handler (for logging). That the source identity never
/// comes from them is shown end to end (`two_nodes::the_source_identity_is_the_pods_own_whatever_the_client_presents`):
/// the handler has no header-derived identity to use.
async fn request_headers_reach_the_handler() {
    within(async {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (client_io, _server) = spawn_server(move |request: InboundRequest| {
            let _ = seen_tx.send(request.headers().get("x-note").cloned());
            async move { request.reject(StatusCode::FORBIDDEN) }
        });
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .header("x-note", "hello")
            .body(())
            .expect("request");
        assert_eq!(raw_status(client_io, request).await, StatusCode::FORBIDDEN);
        assert_eq!(
            seen.recv().await.flatten().as_ref().map(|v| v.as_bytes()),
            Some(&b"hello"[..])
        );
    })
    .await;
}

/// What the agent relies on: streams move into tasks and into
/// `copy_bidirectional`; clients, pools and errors are shared across tasks.
#[test]
fn types_fit_the_proxy() {
    fn stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>() {}
    fn shared<T: Clone + Send + Sync + 'static>() {}
    stream::<HboneStream>();
    shared::<HboneClient>();
    shared::<TunnelPool<(String, SocketAddr)>>();
    shared::<TunnelConfig>();
    shared::<TunnelError>();

    // The futures callers spawn are `Send`.
    fn spawnable<T: Send>(_: &T) {}
    let config = TunnelConfig::default();
    spawnable(&super::serve(tokio::io::duplex(1).0, &config, |_| {}));
    let pool = TunnelPool::<&str>::new(config);
    spawnable(&pool.get_or_connect("k", || async {
        HboneClient::handshake(tokio::io::duplex(1).0, "peer", &TunnelConfig::default()).await
    }));
    let (client_io, _server_io) = tokio::io::duplex(1);
    spawnable(&HboneClient::handshake(client_io, "peer", &config));
}
