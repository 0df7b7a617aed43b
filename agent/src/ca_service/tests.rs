//! The CA service and its client, in process on loopback.

use std::{
    fs,
    io::ErrorKind,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{ClientConfig, version::TLS13};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use super::{
    client::load_credential,
    protocol::{self, Line, Response},
    *,
};
use crate::identity::{
    AcceptedClients, CertificateAuthority, PeerRole, SpiffeServerVerifier, Svid, TrustBundles,
    client_config, crypto_provider, server_config, verify_svid,
};

const DIRECTORY: &str = "\
node: ignored-by-the-ca
workloads:
  - {name: a, namespace: default, serviceAccount: sa-a, netns: /x, node: node1}
  - {name: b, namespace: default, serviceAccount: sa-b, netns: /x, node: node2}
  - {name: c, namespace: other, serviceAccount: sa-c, netns: /x}
";

const SVID_TTL: Duration = Duration::from_secs(1800);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn workload(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::kubernetes(&td(), ns, sa).unwrap()
}

struct Fixture {
    tmp: TempDir,
    addr: SocketAddr,
    task: JoinHandle<Result<(), CaServerError>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fixture {
    fn directory(&self) -> PathBuf {
        self.tmp.path().join("directory.yaml")
    }
    fn boot(&self) -> PathBuf {
        self.tmp.path().join("boot")
    }
    fn node_files(&self, node: &str) -> (PathBuf, PathBuf) {
        let dir = self.boot().join(NODES_DIR).join(node);
        (dir.join(NODE_CHAIN_FILE), dir.join(NODE_KEY_FILE))
    }
    fn client(&self, node: &str) -> CaClient {
        let (chain, key) = self.node_files(node);
        CaClient::new(self.addr, chain, key, self.boot().join(BUNDLE_FILE)).unwrap()
    }
    fn bundles(&self) -> Arc<TrustBundles> {
        self.client("node1").bundles()
    }
    /// A client configuration presenting `node`'s bootstrap credential.
    fn node_config(&self, node: &str) -> ClientConfig {
        let (chain, key) = self.node_files(node);
        load_credential(&chain, &key, &self.bundles(), &ca_spiffe_id(&td()))
            .unwrap()
            .0
    }
    fn write_directory(&self, text: &str) {
        fs::write(self.directory(), text).unwrap();
    }
}

fn config(tmp: &Path) -> CaServerConfig {
    CaServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: SVID_TTL,
        reload_interval: Duration::from_millis(50),
        handshake_timeout: Duration::from_secs(5),
        ..CaServerConfig::new(tmp.join("directory.yaml"), tmp.join("boot"))
    }
}

async fn bind(directory: &str) -> (TempDir, CaServer) {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("directory.yaml"), directory).unwrap();
    let server = CaServer::bind(config(tmp.path())).await.unwrap();
    (tmp, server)
}

fn serve(tmp: TempDir, server: CaServer) -> Fixture {
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run());
    Fixture { tmp, addr, task }
}

async fn start() -> Fixture {
    let (tmp, server) = bind(DIRECTORY).await;
    serve(tmp, server)
}

type Conn = BufReader<TlsStream<TcpStream>>;

async fn connect(addr: SocketAddr, config: ClientConfig) -> std::io::Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    Ok(BufReader::new(tls))
}

/// The next response line, `Ok(None)` at EOF, `Err` for a TLS/IO error.
async fn recv(conn: &mut Conn) -> std::io::Result<Option<Response>> {
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        protocol::read_line(conn, &mut line, MAX_LINE_BYTES),
    )
    .await
    .expect("the CA answers or closes within 10 s")?;
    Ok(match read {
        Line::Complete => Some(serde_json::from_slice(&line).unwrap()),
        Line::Eof => None,
        Line::TooLong => panic!("oversized response"),
    })
}

async fn send(conn: &mut Conn, bytes: &[u8]) {
    conn.write_all(bytes).await.unwrap();
    conn.flush().await.unwrap();
}

fn request_line(id: &SpiffeId, ttl_secs: Option<u64>) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let mut line = serde_json::to_vec(&protocol::Request {
        spiffe_id: id.to_string(),
        csr: STANDARD.encode(csr.der().as_ref()),
        ttl_secs,
    })
    .unwrap();
    line.push(b'\n');
    line
}

fn error_of(response: Option<Response>) -> String {
    match response {
        Some(Response {
            error: Some(e),
            chain: None,
        }) => e,
        other => panic!("expected an error response, got {other:?}"),
    }
}

/// Asserts the CA gives this connection nothing but a TLS error or EOF.
async fn assert_refused_at_tls(conn: std::io::Result<Conn>) -> String {
    let mut conn = match conn {
        Err(e) => return e.to_string(),
        Ok(conn) => conn,
    };
    // TLS 1.3: the client finishes first; the server's verdict on the
    // client certificate arrives as an alert on the first read.
    let _ = conn
        .write_all(&request_line(&workload("default", "sa-a"), None))
        .await;
    let _ = conn.flush().await;
    match recv(&mut conn).await {
        Err(e) => e.to_string(),
        Ok(None) => "closed".into(),
        Ok(Some(r)) => panic!("the CA answered an unauthenticated client: {r:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn not_after_from_now(svid: &Svid) -> Duration {
    svid.not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

async fn eventually<F, Fut, T, E>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[test]
fn node_ids() {
    let id = node_spiffe_id(&td(), "node-1.a_b").unwrap();
    assert_eq!(id.as_str(), "spiffe://cluster.local/ambit/node/node-1.a_b");
    assert_eq!(node_name(&id), Some("node-1.a_b"));
    for bad in ["", ".", "..", "a/b", "a b", "n%41"] {
        assert!(node_spiffe_id(&td(), bad).is_err(), "{bad:?}");
    }
    for not_node in [
        "spiffe://cluster.local/ambit/node",
        "spiffe://cluster.local/ambit/node/a/b",
        "spiffe://cluster.local/ambit/ca",
        "spiffe://cluster.local/ns/ambit/sa/node",
    ] {
        assert_eq!(node_name(&SpiffeId::parse(not_node).unwrap()), None);
    }
    assert_eq!(
        ca_spiffe_id(&td()).as_str(),
        "spiffe://cluster.local/ambit/ca"
    );
}

#[tokio::test]
async fn bootstrap_files_are_written_with_the_right_modes() {
    let (tmp, server) = bind(DIRECTORY).await;
    let boot = tmp.path().join("boot");

    let bundle = boot.join(BUNDLE_FILE);
    assert_eq!(mode(&bundle), 0o644);
    assert_eq!(
        CertificateDer::from_pem_file(&bundle).unwrap(),
        *server.ca().root_certificate()
    );
    assert_eq!(bundle, server.bundle_path());

    // Nodes named by a workload get a credential; "c" has no node.
    let mut nodes: Vec<_> = fs::read_dir(boot.join(NODES_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node1", "node2"]);

    for node in ["node1", "node2"] {
        let (chain, key) = server.node_credential_paths(node);
        assert_eq!(mode(&chain), 0o644, "{}", chain.display());
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o077,
            0,
            "the key must never be group/other-readable"
        );
        // Only the two files: no temporary file is left behind.
        let mut names: Vec<_> = fs::read_dir(chain.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [NODE_KEY_FILE, NODE_CHAIN_FILE]);
        assert!(
            fs::read_to_string(&key)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );

        let (_, id) =
            load_credential(&chain, &key, &server.bundles(), &ca_spiffe_id(&td())).unwrap();
        assert_eq!(id, node_spiffe_id(&td(), node).unwrap());
    }
}

#[tokio::test]
async fn node_obtains_an_svid_for_its_workload() {
    let ca = start().await;
    let client = ca.client("node1");
    assert_eq!(client.node_name(), "node1");
    let id = workload("default", "sa-a");

    // Default TTL: the CA's --svid-ttl-secs.
    let svid = client.request_svid(&id, None).await.unwrap();
    assert_eq!(svid.spiffe_id(), &id);
    for role in [PeerRole::Client, PeerRole::Server] {
        assert_eq!(
            verify_svid(svid.chain(), &client.bundles(), UnixTime::now(), role).unwrap(),
            id
        );
    }
    let ttl = not_after_from_now(&svid);
    assert!(
        ttl > SVID_TTL - Duration::from_secs(10) && ttl <= SVID_TTL,
        "{ttl:?}"
    );
    assert!(svid.renew_at() < svid.not_after());

    // A shorter TTL is honoured; a longer one is cut to the CA's maximum.
    let short = client
        .request_svid(&id, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    let ttl = not_after_from_now(&short);
    assert!(ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600));
    let long = client
        .request_svid(&id, Some(Duration::from_secs(7200)))
        .await
        .unwrap();
    assert!(not_after_from_now(&long) <= SVID_TTL);
    let err = client
        .request_svid(&id, Some(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the allowed range"),
        "{err}"
    );

    // The SVID works with the tunnel's TLS configurations: an mTLS
    // handshake between node1's and node2's workloads.
    let peer_id = workload("default", "sa-b");
    let peer = ca
        .client("node2")
        .request_svid(&peer_id, None)
        .await
        .unwrap();
    let server_cfg = server_config(&peer, client.bundles(), AcceptedClients::Workloads).unwrap();
    let client_cfg = client_config(&svid, client.bundles(), vec![peer_id.clone()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(Arc::new(server_cfg))
            .accept(tcp)
            .await
            .unwrap();
        let peer = crate::identity::peer_spiffe_id(tls.get_ref().1).unwrap();
        tls.write_all(b"ok").await.unwrap();
        tls.shutdown().await.unwrap();
        peer
    });
    let mut conn = connect(addr, client_cfg).await.unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ok");
    assert_eq!(accept.await.unwrap(), id);
}

#[tokio::test]
async fn node_is_refused_another_nodes_workload() {
    let ca = start().await;
    let client = ca.client("node1");
    for id in [
        workload("default", "sa-b"),  // on node2
        workload("other", "sa-c"),    // on no node
        workload("default", "sa-zz"), // nowhere
    ] {
        let err = client.request_svid(&id, None).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CaClientError::Refused(_)),
            "{err:?} should be a refusal"
        );
        assert!(
            msg.contains(&format!(
                "node node1 may not obtain {id}: no workload with that service account runs on node node1"
            )),
            "{msg}"
        );
    }
    // Not a workload ID, or another trust domain.
    let err = client
        .request_svid(&node_spiffe_id(&td(), "node2").unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only workload IDs of the form spiffe://cluster.local/ns/"),
        "{err}"
    );
    let foreign = SpiffeId::parse("spiffe://example.org/ns/default/sa/sa-a").unwrap();
    let err = client.request_svid(&foreign, None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("this CA issues only for trust domain cluster.local"),
        "{err}"
    );

    // A refusal keeps the connection: several requests on one connection.
    let mut conn = connect(ca.addr, ca.node_config("node1")).await.unwrap();
    send(&mut conn, &request_line(&workload("default", "sa-b"), None)).await;
    let err = error_of(recv(&mut conn).await.unwrap());
    assert!(err.contains("node node1 may not obtain"), "{err}");
    send(
        &mut conn,
        &request_line(&workload("default", "sa-a"), Some(120)),
    )
    .await;
    let chain = recv(&mut conn).await.unwrap().unwrap().chain.unwrap();
    assert_eq!(chain.len(), 2);
    // A CSR that is not base64 is a refusal too.
    send(
        &mut conn,
        br#"{"spiffe_id": "spiffe://cluster.local/ns/default/sa/sa-a", "csr": "!!"}
"#,
    )
    .await;
    let err = error_of(recv(&mut conn).await.unwrap());
    assert!(err.contains("csr is not valid base64"), "{err}");
    send(
        &mut conn,
        br#"{"spiffe_id": "spiffe://cluster.local/ns/default/sa/sa-a", "csr": "AAAA"}
"#,
    )
    .await;
    let err = error_of(recv(&mut conn).await.unwrap());
    assert!(err.contains("CSR is malformed"), "{err}");
    send(
        &mut conn,
        br#"{"spiffe_id": "spiffe://Cluster.local/ns/a/sa/b", "csr": ""}
"#,
    )
    .await;
    let err = error_of(recv(&mut conn).await.unwrap());
    assert!(err.contains("is not a canonical SPIFFE ID"), "{err}");
}

#[tokio::test]
async fn credential_from_another_ca_is_refused_at_the_tls_layer() {
    let ca = start().await;
    let other = CertificateAuthority::new(td()).unwrap();
    let forged = other
        .issue_svid(&node_spiffe_id(&td(), "node1").unwrap(), None)
        .unwrap();
    let mut config = client_config(&forged, ca.bundles(), vec![ca_spiffe_id(&td())]).unwrap();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let err = assert_refused_at_tls(connect(ca.addr, config).await).await;
    assert!(err.contains("fatal alert"), "unexpected failure: {err}");

    // And a client holding that other CA's files (its own bundle) does not
    // accept the real CA.
    let other_dir = ca.tmp.path().join("other");
    let other_server_dir = other_dir.join("boot");
    fs::create_dir_all(&other_server_dir).unwrap();
    bootstrap::write_bundle(&other_server_dir, other.root_certificate()).unwrap();
    bootstrap::write_node_credential(&other_server_dir, "node1", &forged).unwrap();
    let node_dir = other_server_dir.join(NODES_DIR).join("node1");
    let client = CaClient::new(
        ca.addr,
        node_dir.join(NODE_CHAIN_FILE),
        node_dir.join(NODE_KEY_FILE),
        other_server_dir.join(BUNDLE_FILE),
    )
    .unwrap();
    let err = client
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CaClientError::Handshake { .. }), "{err:?}");

    // The CA is unaffected.
    ca.client("node1")
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = start().await;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            ca.bundles(),
            vec![ca_spiffe_id(&td())],
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let err = assert_refused_at_tls(connect(ca.addr, config).await).await;
    assert!(err.contains("fatal alert"), "unexpected failure: {err}");
}

#[tokio::test]
async fn client_that_is_not_a_node_is_refused() {
    let (tmp, server) = bind(DIRECTORY).await;
    let id = workload("default", "sa-a");
    let workload_svid = server.ca().issue_svid(&id, None).unwrap();
    let ca = serve(tmp, server);
    let mut config =
        client_config(&workload_svid, ca.bundles(), vec![ca_spiffe_id(&td())]).unwrap();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let mut conn = connect(ca.addr, config).await.unwrap();
    send(&mut conn, &request_line(&id, None)).await;
    let err = error_of(recv(&mut conn).await.unwrap());
    assert!(
        err.contains(&format!("names {id}, which is not a node identity")),
        "{err}"
    );
    assert!(recv(&mut conn).await.unwrap().is_none(), "must be closed");
}

#[tokio::test]
async fn client_accepts_only_the_ca_identity() {
    // A server with a valid SVID of the same trust domain that is not
    // spiffe://TD/ambit/ca (here: node2's credential) is not the CA.
    let (tmp, server) = bind(DIRECTORY).await;
    let impostor = server
        .ca()
        .issue_svid(&workload("default", "sa-b"), None)
        .unwrap();
    let ca = serve(tmp, server);
    let mut tls = server_config(&impostor, ca.bundles(), AcceptedClients::Any).unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = TlsAcceptor::from(Arc::new(tls)).accept(tcp).await;
    });
    let (chain, key) = ca.node_files("node1");
    let client = CaClient::new(addr, chain, key, ca.boot().join(BUNDLE_FILE)).unwrap();
    let err = client
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CaClientError::Handshake { .. }), "{err:?}");
    assert!(
        msg.contains("spiffe://cluster.local/ns/default/sa/sa-b")
            && msg.contains("spiffe://cluster.local/ambit/ca"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_clients_do_not_affect_good_ones() {
    let ca = start().await;
    let addr = ca.addr;

    // Holds a TCP connection open without ever starting TLS.
    let _stalled = TcpStream::connect(addr).await.unwrap();

    let garbage_handshake = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: ca\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
            .await
            .expect("the CA closes a garbage handshake");
        // Closed, perhaps after a TLS alert record (content type 21).
        match read {
            Ok(_) => assert!(rest.is_empty() || rest[0] == 21, "{rest:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    };
    let oversized = async {
        let mut conn = connect(addr, ca.node_config("node1")).await.unwrap();
        let big = vec![b'x'; MAX_LINE_BYTES + 4096];
        send(&mut conn, &big).await;
        let err = error_of(recv(&mut conn).await.unwrap());
        assert!(err.contains("longer than 65536 bytes"), "{err}");
        assert!(recv(&mut conn).await.unwrap().is_none());
    };
    let bad_json = async {
        for line in [
            &b"{not json\n"[..],
            b"\xff\xfe\n",
            b"{\"spiffe_id\": 1}\n",
            b"\n",
        ] {
            let mut conn = connect(addr, ca.node_config("node1")).await.unwrap();
            send(&mut conn, line).await;
            let err = error_of(recv(&mut conn).await.unwrap());
            assert!(err.contains("is not valid JSON"), "{err}");
            assert!(recv(&mut conn).await.unwrap().is_none());
        }
    };
    let good = async {
        let client = ca.client("node1");
        for _ in 0..5 {
            client
                .request_svid(&workload("default", "sa-a"), None)
                .await
                .unwrap();
        }
    };
    tokio::join!(garbage_handshake, oversized, bad_json, good);

    ca.client("node2")
        .request_svid(&workload("default", "sa-b"), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn directory_changes_apply_without_restart() {
    let ca = start().await;
    let new_id = workload("new", "sa-d");
    let client = ca.client("node1");
    let err = client.request_svid(&new_id, None).await.unwrap_err();
    assert!(matches!(err, CaClientError::Refused(_)), "{err:?}");

    ca.write_directory(&format!(
        "{DIRECTORY}  - {{name: d, namespace: new, serviceAccount: sa-d, netns: /x, node: node1}}\n  \
         - {{name: e, namespace: new, serviceAccount: sa-e, netns: /x, node: node3}}\n"
    ));
    eventually("new workload issuable", || {
        client.request_svid(&new_id, None)
    })
    .await;

    // A node that appeared gets its credential and can use it.
    let (chain, key) = ca.node_files("node3");
    let node3 = eventually("node3 credential written", || async {
        CaClient::new(ca.addr, &chain, &key, ca.boot().join(BUNDLE_FILE))
    })
    .await;
    assert_eq!(mode(&key), 0o600);
    node3
        .request_svid(&workload("new", "sa-e"), None)
        .await
        .unwrap();

    // Removing a workload revokes the right to new SVIDs for it.
    ca.write_directory(DIRECTORY);
    eventually("removed workload refused", || async {
        match client.request_svid(&new_id, None).await {
            Err(CaClientError::Refused(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn bad_directory_edit_keeps_the_last_good_one() {
    let ca = start().await;
    let client = ca.client("node1");
    ca.write_directory("workloads: [this is: not, valid\n");
    // Several reload intervals.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap();
    let err = client
        .request_svid(&workload("default", "sa-b"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CaClientError::Refused(_)), "{err:?}");

    // A deleted file too; then a good edit applies again.
    fs::remove_file(ca.directory()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap();
    ca.write_directory(&DIRECTORY.replace("node: node2}", "node: node1}"));
    let moved = workload("default", "sa-b");
    eventually("edit after a bad one applies", || {
        client.request_svid(&moved, None)
    })
    .await;
}

#[tokio::test]
async fn client_errors_name_the_file_and_the_fix() {
    let ca = start().await;
    let (chain, key) = ca.node_files("node1");
    let bundle = ca.boot().join(BUNDLE_FILE);
    let missing = ca.tmp.path().join("missing.pem");

    let err = CaClient::new(ca.addr, &chain, &key, &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("DIR/bundle.pem"),
        "{err}"
    );
    let err = CaClient::new(ca.addr, &missing, &key, &bundle)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("DIR/nodes/<NODE>/node.pem"),
        "{err}"
    );
    let err = CaClient::new(ca.addr, &chain, &missing, &bundle)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&missing.display().to_string())
            && err.contains("DIR/nodes/<NODE>/node-key.pem"),
        "{err}"
    );

    let garbage = ca.tmp.path().join("garbage.pem");
    fs::write(&garbage, "not pem").unwrap();
    let err = CaClient::new(ca.addr, &chain, &key, &garbage)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no CERTIFICATE block"), "{err}");

    // node2's key with node1's chain.
    let (_, key2) = ca.node_files("node2");
    let err = CaClient::new(ca.addr, &chain, &key2, &bundle)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&key2.display().to_string()) && err.contains("is not the key of"),
        "{err}"
    );

    // A chain from another CA run than the bundle.
    let other = CertificateAuthority::new(td()).unwrap();
    let other_bundle = ca.tmp.path().join("other-bundle.pem");
    fs::write(
        &other_bundle,
        pem::encode(pem::CERTIFICATE, other.root_certificate()).as_str(),
    )
    .unwrap();
    let err = CaClient::new(ca.addr, &chain, &key, &other_bundle)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different CA runs"), "{err}");

    // A CA that is not there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = CaClient::new(closed, &chain, &key, &bundle)
        .unwrap()
        .request_svid(&workload("default", "sa-a"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CaClientError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn client_rereads_the_credential_and_keeps_the_last_good_one() {
    let (tmp, server) = bind(DIRECTORY).await;
    let renewed = server
        .ca()
        .issue_svid(&node_spiffe_id(&td(), "node1").unwrap(), None)
        .unwrap();
    let ca = serve(tmp, server);
    let client = ca.client("node1");
    let (chain, key) = ca.node_files("node1");
    let (chain2, key2) = ca.node_files("node2");
    let id = workload("default", "sa-a");

    // Stuck half-way through a rotation (new key, old chain), beyond the
    // retries: the last good credential still works.
    fs::copy(&key2, &key).unwrap();
    client.request_svid(&id, None).await.unwrap();

    // Files that now name another node are not used either.
    fs::copy(&chain2, &chain).unwrap();
    client.request_svid(&id, None).await.unwrap();

    // Missing files: still the last good one.
    fs::remove_file(&chain).unwrap();
    client.request_svid(&id, None).await.unwrap();

    // A renewed credential, written the way the CA writes it, is used.
    bootstrap::write_node_credential(&ca.boot(), "node1", &renewed).unwrap();
    assert_eq!(mode(&key), 0o600);
    client.request_svid(&id, None).await.unwrap();
}

#[tokio::test]
async fn bind_reports_unusable_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let err = CaServer::bind(config(tmp.path())).await.err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, CaServerError::Directory(_)) && msg.contains("directory.yaml"),
        "{msg}"
    );

    fs::write(tmp.path().join("directory.yaml"), DIRECTORY).unwrap();
    let err = CaServer::bind(CaServerConfig {
        svid_ttl: Duration::from_secs(59),
        ..config(tmp.path())
    })
    .await
    .err()
    .unwrap();
    assert!(matches!(err, CaServerError::SvidTtl(_)), "{err}");

    let bad_node = DIRECTORY.replace("node: node2}", "node: \"../x\"}");
    fs::write(tmp.path().join("directory.yaml"), bad_node).unwrap();
    let server = CaServer::bind(config(tmp.path())).await.unwrap();
    assert!(server.node_credential_paths("node1").1.exists());
    assert!(!tmp.path().join("boot/x").exists());
}
