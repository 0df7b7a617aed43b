//! HBONE request validation: any method and `:authority` sent to the
//! public tunnel server (`ambit::tunnel::serve`) over an in-memory HTTP/2
//! connection. The server must never panic, and must answer exactly as
//! the HBONE rules say: 405 for a method other than CONNECT, 400 for an
//! authority that is not `IP:port` with a non-zero port, and otherwise
//! hand the request (with that address) to the caller, which here refuses
//! it with 403.
//!
//! Input: `METHOD\nAUTHORITY`, or just `AUTHORITY` (method CONNECT).
//!
//! The validation itself (`tunnel::authority::parse_target`) is
//! crate-private, so it is reached through `serve`; made public, it could
//! be fuzzed directly, far faster.
#![no_main]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use http::{Method, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// The input as a request the h2 client can send, if it is one.
fn request(data: &[u8]) -> Option<(Method, Uri)> {
    let (method, authority) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Method::from_bytes(&data[..at]).ok()?, &data[at + 1..]),
        None => (Method::CONNECT, data),
    };
    Some((method, Uri::try_from(authority).ok()?))
}

/// What the HBONE rules say the server must do with `authority`.
fn expected_target(uri: &Uri) -> Option<SocketAddr> {
    let target: SocketAddr = uri.authority()?.as_str().parse().ok()?;
    (target.port() != 0).then_some(target)
}

fuzz_target!(|data: &[u8]| {
    let Some((method, uri)) = request(data) else {
        return;
    };
    runtime().block_on(async move {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let server_seen = Arc::clone(&seen);
        let config = ambit::tunnel::TunnelConfig::default();
        let server = ambit::tunnel::serve(server_io, &config, move |request| {
            if let Ok(mut seen) = server_seen.lock() {
                seen.push(request.target);
            }
            request.reject(StatusCode::FORBIDDEN);
        });
        let client = async {
            let (send, connection) = h2::client::handshake(client_io).await.ok()?;
            let exchange = async {
                let mut send = send.ready().await.ok()?;
                let request = Request::builder()
                    .method(method.clone())
                    .uri(uri.clone())
                    .body(())
                    .ok()?;
                // The client refuses some requests itself (e.g. without an
                // authority); those never reach the server.
                let (response, _) = send.send_request(request, true).ok()?;
                // A reset stream (malformed request, per h2) is no answer.
                Some(response.await.ok()?.status())
            };
            tokio::select! {
                status = exchange => status,
                _ = connection => None,
            }
        };
        // Both ends run inside this future, not as spawned tasks: whatever
        // they hold is dropped before the next input (spawned tasks on the
        // shared runtime would outlive it and read as leaks).
        let both = async {
            tokio::select! {
                status = client => status,
                _ = server => None,
            }
        };
        let status = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the tunnel server answered within 10 s");
        let Some(status) = status else {
            return;
        };
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let is_connect = method == Method::CONNECT;
        match status {
            StatusCode::METHOD_NOT_ALLOWED => assert!(!is_connect, "405 for CONNECT {uri}"),
            StatusCode::BAD_REQUEST => {
                assert!(is_connect, "400 for {method}");
                assert_eq!(expected_target(&uri), None, "400 for a valid target {uri}");
            }
            StatusCode::FORBIDDEN => {
                assert!(is_connect, "{method} reached the caller");
                let target = expected_target(&uri).expect("only valid targets reach the caller");
                assert_eq!(seen, [target], "the caller got the wrong target for {uri}");
            }
            other => panic!("unexpected status {other} for {method} {uri}"),
        }
    });
});
