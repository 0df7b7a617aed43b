//! `ambit ca`: the CA service.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use rustls::ServerConfig;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;

use super::{
    ALPN, DEFAULT_PORT, MAX_LINE_BYTES, bootstrap, ca_spiffe_id,
    kubernetes::{self as cluster, KubernetesCaConfig, attest::Attestor},
    node_name, node_spiffe_id,
    protocol::{self, AttestRequest, Line, Request, Response},
};
use crate::{
    audit::format_rfc3339,
    identity::{
        AcceptedClients, CaError, CertificateAuthority, DEFAULT_SVID_TTL, MAX_SVID_TTL,
        MIN_SVID_TTL, SpiffeId, SpiffeIdError, SvidCertificate, TrustBundles, TrustDomain,
        peer_spiffe_id, server_config,
    },
    workloads::{NodeWorkloads, file},
};

/// How `ambit ca` runs.
#[derive(Clone, Debug)]
pub struct CaServerConfig {
    pub trust_domain: TrustDomain,
    pub listen: SocketAddr,
    /// Workloads file (the `workloads::file` format) listing every workload
    /// of the cluster with its `node`; the top-level `node` is ignored.
    pub directory: PathBuf,
    /// Where the bundle and the node credentials are written.
    pub bootstrap_dir: PathBuf,
    /// Where the root is kept across restarts (made there on first start);
    /// `None`: a fresh root in memory each start.
    pub root_dir: Option<PathBuf>,
    /// Default and maximum TTL of a workload SVID.
    pub svid_ttl: Duration,
    /// TTL of the node credentials and of the CA's own serving SVID; both
    /// are re-issued at half life.
    pub bootstrap_ttl: Duration,
    /// How often the directory file is checked for changes.
    pub reload_interval: Duration,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// `Some`: run in the cluster (root in a Secret, bundle in a ConfigMap,
    /// directory from the API, node attestation by token); `directory`,
    /// `bootstrap_dir` and `root_dir` are then unused.
    pub kubernetes: Option<KubernetesCaConfig>,
    /// TTL of a node credential obtained by attestation; the agent attests
    /// again at half life, so a node whose agent pod is gone loses access
    /// within it.
    pub attested_node_ttl: Duration,
}

impl CaServerConfig {
    /// The defaults of `ambit ca` for everything but the two paths.
    pub fn new(directory: impl Into<PathBuf>, bootstrap_dir: impl Into<PathBuf>) -> Self {
        Self {
            trust_domain: TrustDomain::new("cluster.local").expect("valid trust domain"),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            directory: directory.into(),
            bootstrap_dir: bootstrap_dir.into(),
            root_dir: None,
            svid_ttl: DEFAULT_SVID_TTL,
            bootstrap_ttl: MAX_SVID_TTL,
            reload_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            kubernetes: None,
            attested_node_ttl: DEFAULT_ATTESTED_NODE_TTL,
        }
    }

    /// The defaults of `ambit ca --kubernetes`.
    pub fn in_cluster(kubernetes: KubernetesCaConfig) -> Self {
        Self {
            kubernetes: Some(kubernetes),
            ..Self::new(PathBuf::new(), PathBuf::new())
        }
    }
}

/// Default TTL of an attested node credential.
pub const DEFAULT_ATTESTED_NODE_TTL: Duration = Duration::from_secs(600);

/// Why the CA could not start or stopped.
#[derive(Debug, Error)]
pub enum CaServerError {
    #[error(
        "--svid-ttl-secs {} is outside the allowed range {}..={}",
        .0.as_secs(), MIN_SVID_TTL.as_secs(), MAX_SVID_TTL.as_secs()
    )]
    SvidTtl(Duration),
    #[error("cannot use the workload directory: {0}")]
    Directory(String),
    #[error("cannot start in the cluster: {0}")]
    Kubernetes(String),
    #[error("cannot create the certificate authority: {0}")]
    Ca(#[source] CaError),
    #[error(transparent)]
    Root(#[from] super::root_store::RootStoreError),
    #[error("cannot issue the bootstrap SVID for {id}: {source}")]
    Bootstrap {
        id: SpiffeId,
        #[source]
        source: CaError,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the TLS configuration was rejected: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The CA service, bound and with its bootstrap files written; [`run`]
/// serves it.
///
/// [`run`]: CaServer::run
pub struct CaServer {
    listener: TcpListener,
    state: Arc<State>,
    directory: watch::Receiver<NodeWorkloads>,
    /// Node → when its credential is due for renewal.
    nodes: BTreeMap<String, SystemTime>,
    serving_renew_at: SystemTime,
    bootstrap_dir: PathBuf,
    bootstrap_ttl: Duration,
    /// Kubernetes mode: no bootstrap files, nodes attest with tokens.
    in_cluster: bool,
}

struct State {
    ca: CertificateAuthority,
    ca_id: SpiffeId,
    bundles: Arc<TrustBundles>,
    tls: RwLock<Arc<ServerConfig>>,
    directory: watch::Receiver<NodeWorkloads>,
    svid_ttl: Duration,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    connections: Arc<Semaphore>,
    /// Kubernetes mode: verifies the tokens of anonymous clients.
    attestor: Option<Attestor>,
    attested_node_ttl: Duration,
    accepted: AcceptedClients,
}

impl CaServer {
    /// Creates the CA, loads the directory, writes the bundle and the node
    /// credentials, and binds the listener.
    pub async fn bind(config: CaServerConfig) -> Result<Self, CaServerError> {
        if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&config.svid_ttl) {
            return Err(CaServerError::SvidTtl(config.svid_ttl));
        }
        let (ca, roots, directory, attestor) = match &config.kubernetes {
            Some(kubernetes) => {
                let started = cluster::start(kubernetes, &config.trust_domain)
                    .await
                    .map_err(|e| CaServerError::Kubernetes(format!("{e:#}")))?;
                (
                    started.ca,
                    started.roots,
                    started.directory,
                    Some(started.attestor),
                )
            }
            None => {
                let directory = file::watch(&config.directory, config.reload_interval)
                    .map_err(|e| CaServerError::Directory(format!("{e:#}")))?;
                let ca = match &config.root_dir {
                    Some(dir) => {
                        let (ca, created) =
                            super::root_store::load_or_create(dir, &config.trust_domain)?;
                        tracing::info!(root_dir = %dir.display(), created, "CA root kept on disk");
                        ca
                    }
                    None => CertificateAuthority::new(config.trust_domain.clone())
                        .map_err(CaServerError::Ca)?,
                };
                let roots = vec![ca.root_certificate().clone()];
                (ca, roots, directory, None)
            }
        };
        let mut bundles = TrustBundles::new();
        for root in &roots {
            bundles
                .add_root(config.trust_domain.clone(), root)
                .map_err(|e| CaServerError::Tls(e.into()))?;
        }
        let bundles = Arc::new(bundles);
        let ca_id = ca_spiffe_id(&config.trust_domain);
        let accepted = if attestor.is_some() {
            AcceptedClients::AnyOrAnonymous
        } else {
            AcceptedClients::Any
        };
        let (tls, serving_renew_at) =
            serving_config(&ca, &ca_id, &bundles, config.bootstrap_ttl, accepted)?;

        let in_cluster = config.kubernetes.is_some();
        if !in_cluster {
            bootstrap::write_bundle(&config.bootstrap_dir, ca.root_certificate()).map_err(
                |source| CaServerError::Write {
                    path: bootstrap::bundle_path(&config.bootstrap_dir),
                    source,
                },
            )?;
        }

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| CaServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| CaServerError::Bind {
                addr: config.listen,
                source,
            })?;

        let state = Arc::new(State {
            ca,
            ca_id,
            bundles,
            tls: RwLock::new(Arc::new(tls)),
            directory: directory.clone(),
            svid_ttl: config.svid_ttl,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            attestor,
            attested_node_ttl: config.attested_node_ttl,
            accepted,
        });
        let mut server = Self {
            listener,
            state,
            directory,
            nodes: BTreeMap::new(),
            serving_renew_at,
            bootstrap_dir: config.bootstrap_dir,
            bootstrap_ttl: config.bootstrap_ttl,
            in_cluster,
        };
        // At start a node credential that cannot be written is fatal; later
        // (new nodes, renewals) it is logged and retried.
        let current = server.directory.borrow_and_update().clone();
        if !in_cluster {
            for node in nodes_of(server.state.ca.trust_domain(), &current) {
                server.write_node(&node)?;
            }
        }
        tracing::info!(
            listen = %local_addr,
            trust_domain = %config.trust_domain,
            in_cluster,
            bundle = %if in_cluster { "ConfigMap".to_owned() } else { server.bundle_path().display().to_string() },
            nodes = ?server.nodes.keys().collect::<Vec<_>>(),
            workloads = current.workloads.len(),
            "CA ready"
        );
        Ok(server)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The trust bundle this CA's SVIDs verify against.
    pub fn bundles(&self) -> Arc<TrustBundles> {
        self.state.bundles.clone()
    }

    /// `DIR/bundle.pem`.
    pub fn bundle_path(&self) -> PathBuf {
        bootstrap::bundle_path(&self.bootstrap_dir)
    }

    /// `DIR/nodes/<NODE>/node.pem` and `DIR/nodes/<NODE>/node-key.pem`.
    pub fn node_credential_paths(&self, node: &str) -> (PathBuf, PathBuf) {
        let dir = bootstrap::node_dir(&self.bootstrap_dir, node);
        (
            dir.join(bootstrap::NODE_CHAIN_FILE),
            dir.join(bootstrap::NODE_KEY_FILE),
        )
    }

    /// Serves until the future is dropped: accepts connections, follows the
    /// directory file, and renews the node credentials and its own SVID.
    pub async fn run(mut self) -> Result<(), CaServerError> {
        let mut watching = true;
        loop {
            let next = self
                .nodes
                .values()
                .copied()
                .chain([self.serving_renew_at])
                .min()
                .unwrap_or(self.serving_renew_at);
            // Wake at least every minute, so a clock step cannot postpone a
            // renewal by much.
            let sleep = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(Duration::from_secs(60));
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn_connection(stream, peer),
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                changed = self.directory.changed(), if watching => {
                    if changed.is_err() {
                        tracing::error!("the directory watcher stopped; serving the last directory");
                        watching = false;
                        continue;
                    }
                    let current = self.directory.borrow_and_update().clone();
                    self.on_directory_change(&current);
                }
                () = tokio::time::sleep(sleep) => self.renew_due(),
            }
        }
    }

    fn spawn_connection(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(permit) = self.state.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; closing this one");
            return;
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            serve_connection(&state, stream, peer).await;
            drop(permit);
        });
    }

    fn on_directory_change(&mut self, current: &NodeWorkloads) {
        if self.in_cluster {
            // Nodes attest; there are no credentials to write.
            return;
        }
        let nodes = nodes_of(self.state.ca.trust_domain(), current);
        for node in &nodes {
            if !self.nodes.contains_key(node)
                && let Err(e) = self.write_node(node)
            {
                tracing::error!(node, error = %e, "cannot write the node credential; retrying in a minute");
                self.nodes.insert(node.clone(), retry_at());
            }
        }
        // A node that left the directory keeps its files until they expire
        // but is no longer renewed; it could not obtain anything anyway.
        self.nodes.retain(|node, _| nodes.contains(node));
    }

    fn renew_due(&mut self) {
        let now = SystemTime::now();
        if self.serving_renew_at <= now {
            match serving_config(
                &self.state.ca,
                &self.state.ca_id,
                &self.state.bundles,
                self.bootstrap_ttl,
                self.state.accepted,
            ) {
                Ok((tls, renew_at)) => {
                    *self.state.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tls);
                    self.serving_renew_at = renew_at;
                    tracing::info!(id = %self.state.ca_id, "renewed the CA's serving SVID");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the CA's serving SVID; retrying in a minute");
                    self.serving_renew_at = retry_at();
                }
            }
        }
        let due: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(node, _)| node.clone())
            .collect();
        for node in due {
            if let Err(e) = self.write_node(&node) {
                tracing::error!(node, error = %e, "cannot renew the node credential; retrying in a minute");
                self.nodes.insert(node, retry_at());
            }
        }
    }

    /// Issues and writes `node`'s credential and schedules its renewal.
    fn write_node(&mut self, node: &str) -> Result<(), CaServerError> {
        let id = node_spiffe_id(self.state.ca.trust_domain(), node)
            .expect("nodes_of only returns valid node names");
        let svid = self
            .state
            .ca
            .issue_svid(&id, Some(self.bootstrap_ttl))
            .map_err(|source| CaServerError::Bootstrap {
                id: id.clone(),
                source,
            })?;
        bootstrap::write_node_credential(&self.bootstrap_dir, node, &svid).map_err(|source| {
            CaServerError::Write {
                path: bootstrap::node_dir(&self.bootstrap_dir, node),
                source,
            }
        })?;
        tracing::info!(
            node,
            id = %id,
            serial = %hex::encode(svid.serial()),
            dir = %bootstrap::node_dir(&self.bootstrap_dir, node).display(),
            "wrote the node bootstrap credential"
        );
        self.nodes.insert(node.to_owned(), svid.renew_at());
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn ca(&self) -> &CertificateAuthority {
        &self.state.ca
    }
}

fn retry_at() -> SystemTime {
    SystemTime::now() + Duration::from_secs(60)
}

/// The CA's TLS configuration with a fresh serving SVID, and when to renew it.
fn serving_config(
    ca: &CertificateAuthority,
    ca_id: &SpiffeId,
    bundles: &Arc<TrustBundles>,
    ttl: Duration,
    accepted: AcceptedClients,
) -> Result<(ServerConfig, SystemTime), CaServerError> {
    let svid = ca
        .issue_svid(ca_id, Some(ttl))
        .map_err(|source| CaServerError::Bootstrap {
            id: ca_id.clone(),
            source,
        })?;
    // TLS 1.3 only, ring provider, SPIFFE client verifier, no resumption.
    let mut tls = server_config(&svid, bundles.clone(), accepted).map_err(CaServerError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok((tls, svid.renew_at()))
}

/// The valid node names the directory mentions. Invalid names and
/// workloads without a node are logged: nobody can obtain their SVIDs.
fn nodes_of(td: &TrustDomain, directory: &NodeWorkloads) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for w in &directory.workloads {
        match &w.node {
            None => tracing::warn!(
                workload = %w.id(),
                "workload has no node in the CA directory; no node can obtain its SVID"
            ),
            Some(node) => match node_spiffe_id(td, node) {
                Ok(_) => {
                    nodes.insert(node.clone());
                }
                Err(e) => tracing::error!(
                    workload = %w.id(), node, error = %e,
                    "invalid node name (it must be one SPIFFE path segment); skipping it"
                ),
            },
        }
    }
    nodes
}

/// Why one request was refused. The message is what the client receives.
#[derive(Debug, Error)]
enum Refusal {
    #[error("spiffe_id {id:?} is not a canonical SPIFFE ID: {source}")]
    BadId {
        id: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("node {node} may not obtain {id}: this CA issues only for trust domain {td}")]
    ForeignTrustDomain {
        node: String,
        id: SpiffeId,
        td: TrustDomain,
    },
    #[error(
        "node {node} may not obtain {id}: only workload IDs of the form \
         spiffe://{td}/ns/<namespace>/sa/<service-account> are issued"
    )]
    NotAWorkloadId {
        node: String,
        id: SpiffeId,
        td: TrustDomain,
    },
    #[error(
        "node {node} may not obtain {id}: no workload with that service account runs on node {node}"
    )]
    NotOnNode { node: String, id: SpiffeId },
    #[error("csr is not valid base64: {0}")]
    CsrEncoding(#[source] base64::DecodeError),
    #[error("{0}")]
    Ca(#[source] CaError),
}

/// Why a connection is closed (after telling the client, when it can be
/// told).
#[derive(Debug, Error)]
enum Fatal {
    #[error("the request line is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error(
        "the request is not valid JSON of the form {{\"spiffe_id\": ..., \"csr\": ..., \"ttl_secs\": ...}}: {0}"
    )]
    BadJson(#[source] serde_json::Error),
    #[error(
        "the client certificate names {0}, which is not a node identity \
         (spiffe://<trust-domain>/ambit/node/<NODE>); only node agents may request SVIDs"
    )]
    NotANode(SpiffeId),
}

async fn serve_connection(state: &State, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let config = state.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
    let acceptor = TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(state.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "TLS handshake with a CA client failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "TLS handshake with a CA client timed out");
            return;
        }
    };
    if tls
        .get_ref()
        .1
        .peer_certificates()
        .is_none_or(<[_]>::is_empty)
    {
        // Only possible in Kubernetes mode (client certificates are
        // optional there): the one request allowed is an attestation.
        serve_attestation(state, BufReader::new(tls), peer).await;
        return;
    }
    let client_id = match peer_spiffe_id(tls.get_ref().1) {
        Ok(id) => id,
        Err(e) => {
            // The verifier already accepted the chain, so this cannot happen.
            tracing::warn!(%peer, error = %e, "cannot read the client's SPIFFE ID");
            return;
        }
    };
    let mut conn = BufReader::new(tls);
    let Some(node) = node_name(&client_id).map(str::to_owned) else {
        let refusal = Fatal::NotANode(client_id.clone());
        tracing::warn!(%peer, client = %client_id, reason = %refusal, "refused CA client");
        close_after_error(conn, &refusal.to_string(), state.idle_timeout).await;
        return;
    };

    let mut line = Vec::new();
    loop {
        let read = tokio::time::timeout(
            state.idle_timeout,
            protocol::read_line(&mut conn, &mut line, MAX_LINE_BYTES),
        )
        .await;
        let fatal = match read {
            Err(_) => {
                tracing::debug!(%peer, node, "idle CA connection closed");
                break;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // Closed without close_notify: harmless between requests.
                tracing::debug!(%peer, node, error = %e, "CA client went away");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, node, error = %e, "reading from a CA client failed");
                return;
            }
            Ok(Ok(Line::Eof)) => break,
            Ok(Ok(Line::TooLong)) => Fatal::LineTooLong,
            Ok(Ok(Line::Complete)) => match serde_json::from_slice::<Request>(&line) {
                Err(e) => Fatal::BadJson(e),
                Ok(request) => {
                    let response = state.handle(&node, request);
                    if let Err(e) = send(&mut conn, &response, state.idle_timeout).await {
                        tracing::warn!(%peer, node, error = %e, "writing to a CA client failed");
                        return;
                    }
                    continue;
                }
            },
        };
        tracing::warn!(%peer, node, reason = %fatal, "closing a CA connection after a bad request");
        close_after_error(conn, &fatal.to_string(), state.idle_timeout).await;
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIME, conn.shutdown()).await;
}

/// One attestation on an unauthenticated connection, then close.
async fn serve_attestation<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    mut conn: BufReader<S>,
    peer: SocketAddr,
) {
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        state.idle_timeout,
        protocol::read_line(&mut conn, &mut line, MAX_LINE_BYTES),
    )
    .await;
    let fatal = match read {
        Err(_) | Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
        Ok(Ok(Line::TooLong)) => Fatal::LineTooLong.to_string(),
        Ok(Ok(Line::Complete)) => match serde_json::from_slice::<AttestRequest>(&line) {
            Err(e) => format!(
                "a client without a certificate may only attest with \
                 {{\"token\": ..., \"csr\": ...}}: {e}"
            ),
            Ok(request) => {
                let response = state.attest(peer, request).await;
                if send(&mut conn, &response, state.idle_timeout).await.is_ok() {
                    let _ = tokio::time::timeout(CLOSE_TIME, conn.shutdown()).await;
                }
                return;
            }
        },
    };
    tracing::warn!(%peer, reason = %fatal, "closing an unauthenticated CA connection after a bad request");
    close_after_error(conn, &fatal, state.idle_timeout).await;
}

/// The answer carrying `cert`'s chain, base64 DER, leaf first.
fn chain_response(cert: &SvidCertificate) -> Response {
    Response::chain(
        cert.chain()
            .iter()
            .map(|c| STANDARD.encode(c.as_ref()))
            .collect(),
    )
}

/// How long closing a connection may take (sending close_notify, draining).
const CLOSE_TIME: Duration = Duration::from_secs(1);

/// Writes one response; a client that does not take it within `timeout`
/// is given up on.
async fn send<W: AsyncWrite + Unpin>(
    conn: &mut W,
    response: &Response,
    timeout: Duration,
) -> io::Result<()> {
    tokio::time::timeout(timeout, protocol::write_line(conn, response))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the answer in time",
            ))
        })
}

/// Closes after an error answer without losing it: closing a socket with
/// unread input sends a TCP reset, which can discard the answer before the
/// client reads it. So shut down the sending side, then read and discard
/// what the client still sends, for a bounded time and amount.
async fn close_after_error<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    message: &str,
    timeout: Duration,
) {
    const DRAIN_LIMIT: u64 = 1024 * 1024;
    if send(&mut conn, &Response::error(message), timeout)
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIME, async {
        let _ = conn.shutdown().await;
        let mut limited = (&mut conn).take(DRAIN_LIMIT);
        let _ = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await;
    })
    .await;
}

impl State {
    /// Node attestation: verifies the token, then issues the node credential
    /// of the node the token's pod is scheduled on, for the CSR's key.
    async fn attest(&self, peer: SocketAddr, request: AttestRequest) -> Response {
        let Some(attestor) = &self.attestor else {
            return Response::error("this CA does not accept node attestation");
        };
        let pod = match attestor.attest(&request.token).await {
            Ok(pod) => pod,
            Err(e) => {
                tracing::warn!(%peer, reason = %e, "refused node attestation");
                return Response::error(format!("node attestation refused: {e}"));
            }
        };
        let issued = node_spiffe_id(self.ca.trust_domain(), &pod.node)
            .map_err(|e| {
                format!(
                    "node name {:?} is not one SPIFFE path segment: {e}",
                    pod.node
                )
            })
            .and_then(|id| {
                let csr = STANDARD
                    .decode(request.csr.as_bytes())
                    .map_err(|e| format!("csr is not valid base64: {e}"))?;
                self.ca
                    .issue_for_csr(&id, Some(self.attested_node_ttl), &csr)
                    .map_err(|e| e.to_string())
            });
        match issued {
            Ok(cert) => {
                tracing::info!(
                    %peer,
                    node = pod.node,
                    pod = %format!("{}/{}", pod.namespace, pod.name),
                    serial = %hex::encode(cert.serial()),
                    not_after = %format_rfc3339(time::OffsetDateTime::from(cert.not_after())),
                    "node attested"
                );
                chain_response(&cert)
            }
            Err(reason) => {
                tracing::warn!(%peer, node = pod.node, %reason, "refused node attestation");
                Response::error(format!("node attestation refused: {reason}"))
            }
        }
    }

    /// Answers one request, logging the issuance or the refusal.
    fn handle(&self, node: &str, request: Request) -> Response {
        match self.issue(node, &request) {
            Ok(cert) => {
                tracing::info!(
                    node,
                    spiffe_id = %cert.spiffe_id(),
                    serial = %hex::encode(cert.serial()),
                    not_after = %format_rfc3339(time::OffsetDateTime::from(cert.not_after())),
                    "issued SVID"
                );
                chain_response(&cert)
            }
            Err(refusal) => {
                tracing::warn!(
                    node,
                    spiffe_id = %request.spiffe_id,
                    reason = %refusal,
                    "refused SVID request"
                );
                Response::error(refusal.to_string())
            }
        }
    }

    fn issue(&self, node: &str, request: &Request) -> Result<SvidCertificate, Refusal> {
        let id = SpiffeId::parse(&request.spiffe_id).map_err(|source| Refusal::BadId {
            id: request.spiffe_id.clone(),
            source,
        })?;
        self.authorize(node, &id)?;
        let csr = STANDARD
            .decode(request.csr.as_bytes())
            .map_err(Refusal::CsrEncoding)?;
        let ttl = match request.ttl_secs {
            None => self.svid_ttl,
            // The configured TTL is the maximum; shorter is the requester's
            // choice (the CA still enforces the minimum).
            Some(secs) => Duration::from_secs(secs).min(self.svid_ttl),
        };
        self.ca
            .issue_for_csr(&id, Some(ttl), &csr)
            .map_err(Refusal::Ca)
    }

    /// Node scoping: `id` must be the Kubernetes ID of a workload that the
    /// current directory places on `node`.
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), Refusal> {
        let td = self.ca.trust_domain();
        if id.trust_domain() != td.as_str() {
            return Err(Refusal::ForeignTrustDomain {
                node: node.to_owned(),
                id: id.clone(),
                td: td.clone(),
            });
        }
        if id.namespace().is_none() {
            return Err(Refusal::NotAWorkloadId {
                node: node.to_owned(),
                id: id.clone(),
                td: td.clone(),
            });
        }
        let directory = self.directory.borrow();
        let allowed = directory.workloads.iter().any(|w| {
            w.node.as_deref() == Some(node)
                && SpiffeId::kubernetes(td, &w.namespace, &w.service_account).as_ref() == Ok(id)
        });
        if allowed {
            Ok(())
        } else {
            Err(Refusal::NotOnNode {
                node: node.to_owned(),
                id: id.clone(),
            })
        }
    }
}
