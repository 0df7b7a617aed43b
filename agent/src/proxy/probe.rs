//! Kubelet httpGet probes into captured pods.
//!
//! The kernel still steers a probe connection to the agent's plaintext
//! listener (only tcpSocket and gRPC probe ports pass straight to the
//! application); there, a connection the kernel saw opened in the node's
//! own network namespace to an httpGet probe port may carry one request:
//! a GET for exactly one of the pod's probe paths on that port, without a
//! body. That request goes to the application, and only its response
//! comes back; anything else is plaintext like any other.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{pod::PodContext, workloads::probes::Probes};

/// The audit reason of an allowed probe.
pub const PROBE_REASON: &str = "kubelet_probe";
/// The kubelet's request heads are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;
/// How long the request head may take to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe may take end to end (the kubelet's own timeout,
/// `timeoutSeconds`, is normally far shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a connection from the node to an httpGet probe port sent.
pub enum Request {
    /// A probe: its head, to forward as it came.
    Probe(Vec<u8>),
    /// Anything else: what was read (to replay, if the pod accepts
    /// plaintext anyway) and why it is no probe.
    Other { read: Vec<u8>, why: String },
}

/// Reads the request head (bounded in size and time) and decides whether
/// it is one of `probes`' httpGet probes on `port`.
pub async fn read_request(stream: &mut TcpStream, probes: &Probes, port: u16) -> Request {
    let mut read = Vec::with_capacity(1024);
    let outcome = tokio::time::timeout(HEAD_TIMEOUT, read_head(stream, &mut read)).await;
    let why = match outcome {
        Err(_) => format!("no complete request head within {HEAD_TIMEOUT:?}"),
        Ok(Err(why)) => why,
        Ok(Ok(())) => match check(&read, probes, port) {
            Ok(()) => return Request::Probe(read),
            Err(why) => why,
        },
    };
    Request::Other { read, why }
}

/// Reads until `buf` holds a complete head and nothing more.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 1024];
    loop {
        let room = (MAX_HEAD_BYTES - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the connection closed before a complete request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(buf) {
            Ok(httparse::Status::Complete(len)) if len == buf.len() => return Ok(()),
            Ok(httparse::Status::Complete(_)) => {
                return Err("bytes after the request head (a body or a second request)".into());
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(format!("request head larger than {MAX_HEAD_BYTES} bytes"));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(format!("not an HTTP/1 request ({e})")),
        }
    }
}

/// Whether a complete head is a probe: GET, a declared path, no body.
fn check(head: &[u8], probes: &Probes, port: u16) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    request
        .parse(head)
        .map_err(|e| format!("not an HTTP/1 request ({e})"))?;
    let (method, target) = (
        request.method.unwrap_or_default(),
        request.path.unwrap_or_default(),
    );
    if method != "GET" || !probes.is_http_probe(port, target) {
        return Err(format!(
            "{method} {target} is not a probe path of port {port}"
        ));
    }
    let announces_body = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    if announces_body {
        return Err("a probe request has no body".into());
    }
    Ok(())
}

/// Forwards the probe's `head` to the application on `dst` inside the pod
/// and relays its response, until the application or the kubelet closes
/// (nothing else the kubelet sends is forwarded). An unreachable
/// application resets the kubelet's connection: the probe fails.
pub async fn forward(
    pod: &PodContext,
    downstream: &mut TcpStream,
    dst: std::net::SocketAddr,
    head: &[u8],
) -> std::io::Result<u64> {
    let exchange = async {
        let mut upstream = match pod.connect(dst).await {
            Ok(upstream) => upstream,
            Err(e) => {
                let _ = downstream.set_zero_linger();
                return Err(e);
            }
        };
        upstream.write_all(head).await?;
        let (mut app, _) = upstream.split();
        let (mut kubelet_in, mut kubelet_out) = downstream.split();
        let mut more = [0u8; 1];
        let relayed = tokio::select! {
            copied = tokio::io::copy(&mut app, &mut kubelet_out) => copied?,
            // The kubelet closed, or sent more than its one request.
            _ = kubelet_in.read(&mut more) => 0,
        };
        let _ = kubelet_out.shutdown().await;
        Ok(relayed)
    };
    tokio::select! {
        biased;
        () = pod.released() => Ok(0),
        outcome = tokio::time::timeout(PROBE_TIMEOUT, exchange) => outcome
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::probes::HttpGetProbe;

    fn probes() -> Probes {
        Probes {
            http_get: vec![HttpGetProbe {
                port: 8080,
                path: "/ready".into(),
            }],
            ..Probes::default()
        }
    }

    const KUBELET: &str = "GET /ready HTTP/1.1\r\nHost: 198.18.0.10:8080\r\n\
                           User-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n";

    #[test]
    fn the_kubelets_request_is_a_probe_and_near_misses_are_not() {
        assert_eq!(check(KUBELET.as_bytes(), &probes(), 8080), Ok(()));
        let refused = [
            (KUBELET.replace("GET", "POST"), "POST /ready"),
            (KUBELET.replace("/ready", "/admin"), "GET /admin"),
            (
                KUBELET.replace("/ready", "/ready/../admin"),
                "not a probe path",
            ),
            (
                KUBELET.replace("Accept", "Content-Length: 5\r\nAccept"),
                "no body",
            ),
            (
                KUBELET.replace("Accept", "Transfer-Encoding: chunked\r\nAccept"),
                "no body",
            ),
        ];
        for (request, why) in refused {
            let err = check(request.as_bytes(), &probes(), 8080).unwrap_err();
            assert!(err.contains(why), "{request:?}: {err}");
        }
        // The right path on another port is no probe either.
        assert!(check(KUBELET.as_bytes(), &probes(), 8081).is_err());
    }

    async fn served(request: impl Into<Vec<u8>>) -> Request {
        let request = request.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(&request).await.unwrap();
            // Hold the connection open until the agent side is done.
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let outcome = read_request(&mut stream, &probes(), 8080).await;
        drop(stream);
        client.await.unwrap();
        outcome
    }

    #[tokio::test]
    async fn heads_are_read_whole_and_nothing_after_them_is_accepted() {
        assert!(
            matches!(served(KUBELET.as_bytes()).await, Request::Probe(h) if h == KUBELET.as_bytes())
        );
        let pipelined: &[u8] = b"GET /ready HTTP/1.1\r\n\r\nGET /admin HTTP/1.1\r\n\r\n";
        match served(pipelined).await {
            Request::Other { read, why } => {
                assert_eq!(read, pipelined);
                assert!(why.contains("second request"), "{why}");
            }
            Request::Probe(_) => panic!("a pipelined request passed"),
        }
        let garbage: &[u8] = b"\x16\x03\x01\x00\x05hello";
        assert!(
            matches!(served(garbage).await, Request::Other { why, .. } if why.contains("not an HTTP/1 request"))
        );
    }

    #[tokio::test]
    async fn a_head_that_never_completes_times_out() {
        assert!(
            matches!(served(b"GET /ready HTTP/1.1\r\n").await, Request::Other { why, .. } if why.contains("within"))
        );
    }

    #[tokio::test]
    async fn a_head_past_the_size_limit_is_refused() {
        let huge = format!(
            "GET /ready HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(
            matches!(served(huge).await, Request::Other { why, .. } if why.contains("larger than"))
        );
    }
}
