//! Every wait on a peer ends: handshake and stream-open timeouts with a
//! clear error, and a silent peer noticed by PING from either end.

use std::{sync::atomic::Ordering, time::Duration};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    CloseReason, HboneClient, InboundRequest, TunnelConfig, TunnelError, serve,
    test_support::{Freezable, PEER, echo, spawn_server, within},
};

fn quick_pings() -> TunnelConfig {
    TunnelConfig {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(200),
        ..TunnelConfig::default()
    }
}

#[tokio::test]
async fn handshake_with_a_mute_peer_times_out_with_a_clear_error() {
    within(async {
        // The peer accepted the connection but never speaks HTTP/2.
        let (client_io, _mute_peer) = tokio::io::duplex(64 * 1024);
        let config = TunnelConfig {
            handshake_timeout: Duration::from_millis(200),
            ..TunnelConfig::default()
        };
        let err = HboneClient::handshake(client_io, PEER, &config)
            .await
            .expect_err("no answer, no tunnel");
        assert!(matches!(err, TunnelError::TimedOut { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the HTTP/2 handshake to test-peer timed out after 200ms"
        );
    })
    .await;
}

#[tokio::test]
async fn stream_the_peer_never_answers_times_out_with_a_clear_error() {
    within(async {
        // Holds every request without answering it.
        let (client_io, _server) = spawn_server(|request: InboundRequest| async move {
            std::future::pending::<()>().await;
            drop(request);
        });
        let config = TunnelConfig {
            stream_open_timeout: Duration::from_millis(200),
            ..TunnelConfig::default()
        };
        let client = HboneClient::handshake(client_io, PEER, &config)
            .await
            .expect("handshake");
        let err = client
            .connect("10.0.0.1:80".parse().expect("addr"))
            .await
            .expect_err("unanswered CONNECT");
        assert_eq!(
            err.to_string(),
            "opening a stream to test-peer timed out after 200ms"
        );
        // The connection itself is fine: only that stream gave up.
        assert!(!client.is_closed());
    })
    .await;
}

#[tokio::test]
async fn client_notices_a_silent_peer_and_fails_its_streams() {
    within(async {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (server_io, frozen) = Freezable::new(server_io);
        tokio::spawn(async move {
            serve(server_io, &TunnelConfig::default(), |request| {
                tokio::spawn(echo(request));
            })
            .await
        });
        let client = HboneClient::handshake(client_io, PEER, &quick_pings())
            .await
            .expect("handshake");
        let mut stream = client
            .connect("10.0.0.1:80".parse().expect("addr"))
            .await
            .expect("connect");
        // Ten PING intervals on an answering peer: no verdict, data flows.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!client.is_closed(), "an answering peer was declared dead");
        stream.write_all(b"alive").await.expect("write");
        let mut echoed = [0u8; 5];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"alive");

        frozen.store(true, Ordering::SeqCst);
        let reason = tokio::time::timeout(Duration::from_secs(3), client.closed())
            .await
            .expect("silent peer not noticed");
        assert_eq!(reason, CloseReason::Dead);
        let mut buf = [0u8; 1];
        assert!(stream.read(&mut buf).await.is_err());
        // New streams fail at once instead of waiting on the dead peer.
        let err = tokio::time::timeout(
            Duration::from_secs(1),
            client.connect("10.0.0.1:80".parse().expect("addr")),
        )
        .await
        .expect("connect on a dead connection hung")
        .expect_err("dead connection");
        assert!(matches!(err, TunnelError::Stream(_)), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn server_notices_a_silent_client_and_frees_its_streams() {
    within(async {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (client_io, frozen) = Freezable::new(client_io);
        let (streams_tx, mut streams) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            serve(server_io, &quick_pings(), move |request| {
                let _ = streams_tx.send(request.accept());
            })
            .await
        });
        let client = HboneClient::handshake(client_io, PEER, &TunnelConfig::default())
            .await
            .expect("handshake");
        let _client_stream = client
            .connect("10.0.0.1:80".parse().expect("addr"))
            .await
            .expect("connect");
        let mut server_stream = streams.recv().await.expect("request").expect("accept");

        frozen.store(true, Ordering::SeqCst);
        let served = tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("silent client not noticed")
            .expect("server task");
        assert!(
            matches!(served, Err(TunnelError::NoPingAnswer(after)) if after == Duration::from_millis(200)),
            "{served:?}"
        );
        // The server's side of the stream is broken, so its relay ends.
        let mut buf = [0u8; 1];
        assert!(server_stream.read(&mut buf).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn server_handshake_with_a_mute_client_times_out() {
    within(async {
        let (_mute_client, server_io) = tokio::io::duplex(64 * 1024);
        let config = TunnelConfig {
            handshake_timeout: Duration::from_millis(200),
            ..TunnelConfig::default()
        };
        let served = serve(server_io, &config, |request| {
            request.reject(StatusCode::FORBIDDEN)
        })
        .await;
        assert!(
            matches!(served, Err(TunnelError::TimedOut { .. })),
            "{served:?}"
        );
    })
    .await;
}
