use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

use super::*;
use crate::metrics::{Metrics, test_support};

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request over a raw socket; `Connection: close` lets the
/// body be read to EOF.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

struct Running {
    addr: SocketAddr,
    state: Arc<StaticState>,
    metrics: Arc<Metrics>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Running {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(StaticState::new(metrics.clone()));
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), state.clone())
        .await
        .unwrap();
    let addr = server.local_addr();
    let task = tokio::spawn(server.run());
    Running {
        addr,
        state,
        metrics,
        task,
    }
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = start().await;
    let reply = get(server.addr, "/healthz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ok\n");
}

#[tokio::test]
async fn metrics_serves_prometheus_text_with_live_values() {
    let server = start().await;
    for _ in 0..3 {
        server.metrics.policy_denied();
    }
    let reply = get(server.addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "text/plain; version=0.0.4");
    assert_eq!(
        test_support::value(&reply.body, "ambit_policy_denials_total", &[]),
        Some(3.0)
    );
    server.metrics.policy_denied();
    let reply = get(server.addr, "/metrics?debug=1").await;
    assert_eq!(
        test_support::value(&reply.body, "ambit_policy_denials_total", &[]),
        Some(4.0)
    );
}

#[tokio::test]
async fn readyz_flips_from_503_to_200() {
    let server = start().await;
    server.state.set_not_ready("policy not loaded");
    let reply = get(server.addr, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "not ready: policy not loaded\n");
    server.state.set_ready();
    let reply = get(server.addr, "/readyz").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn config_dump_is_the_state_as_json() {
    let server = start().await;
    let config = serde_json::json!({
        "workloads": [{"namespace": "shop", "name": "frontend"}],
        "policies": [],
    });
    server.state.set_config_dump(config.clone());
    let reply = get(server.addr, "/config_dump").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body, config);
}

#[tokio::test]
async fn certs_lists_the_certificates() {
    let server = start().await;
    let certs = vec![CertInfo {
        spiffe_id: "spiffe://cluster.local/ns/shop/sa/frontend".to_owned(),
        serial: "3a5f01".to_owned(),
        not_before: "2025-01-01T00:00:00Z".to_owned(),
        not_after: "2025-01-01T01:00:00Z".to_owned(),
    }];
    server.state.set_certs(certs.clone());
    let reply = get(server.addr, "/certs").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body: Vec<CertInfo> = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body, certs);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = start().await;
    assert_eq!(get(server.addr, "/admin").await.status, 404);
    assert_eq!(get(server.addr, "/metrics/").await.status, 404);
}

#[tokio::test]
async fn post_is_405() {
    let server = start().await;
    let reply = request(server.addr, "POST", "/readyz").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers["allow"], "GET");
    assert_eq!(request(server.addr, "DELETE", "/metrics").await.status, 405);
}

#[tokio::test]
async fn serves_several_requests_on_one_connection() {
    let server = start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
                   GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
}

#[tokio::test]
async fn address_in_use_names_the_address_and_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let state = Arc::new(StaticState::new(Arc::new(Metrics::new())));
    let Err(err) = AdminServer::bind(addr, state).await else {
        panic!("bound an address in use");
    };
    assert!(matches!(err, AdminError::AddrInUse { .. }));
    assert_eq!(
        err.to_string(),
        format!("cannot listen on {addr}: address in use; pass --admin-addr to choose another")
    );
}
