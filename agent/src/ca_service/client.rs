//! The node agent's side of the CA service: request SVIDs for the workloads
//! on this node, with keys generated and kept in memory.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use thiserror::Error;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use zeroize::{Zeroize, Zeroizing};

use super::{
    ALPN, MAX_LINE_BYTES, ca_spiffe_id, node_name, node_spiffe_id,
    protocol::{self, AttestRequest, Line, Request, Response},
};
use crate::identity::{
    CaError, PeerRole, SpiffeId, SpiffeIdError, Svid, SvidCertificate, SvidError, SvidKey,
    TrustBundles, TrustDomain, anonymous_client_config, client_config, verify_svid,
};

const CHAIN_HINT: &str = "the CA (`ambit ca --bootstrap-dir DIR`) writes it to \
    DIR/nodes/<NODE>/node.pem once a workload in its directory names this node";
const KEY_HINT: &str = "the CA (`ambit ca --bootstrap-dir DIR`) writes it to \
    DIR/nodes/<NODE>/node-key.pem next to node.pem";
const BUNDLE_HINT: &str =
    "the CA (`ambit ca --bootstrap-dir DIR`) writes it to DIR/bundle.pem when it starts";
const TOKEN_HINT: &str = "mount a projected service-account token of the agent's pod with \
    audience ambit-ca there (the kubelet keeps it fresh)";
const STALE_HINT: &str = "the files are from different CA runs or the credential expired: \
    use the bundle.pem and node files the running CA wrote (a CA restarted without \
    --root-dir has a new root, so the agent must be restarted to load the new bundle)";

/// Why loading the bootstrap files or obtaining an SVID failed.
#[derive(Debug, Error)]
pub enum CaClientError {
    #[error("cannot read the {what} {}: {source}; {hint}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("the {what} {} is invalid: {reason}; {hint}", .path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
        hint: &'static str,
    },
    #[error("--node-name {0:?} is not a valid node name: {1}")]
    NodeName(String, #[source] SpiffeIdError),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot generate the key or the CSR: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("cannot connect to the CA at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the TLS handshake with the CA at {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the CA at {addr} failed: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("the CA at {addr} closed the connection without answering")]
    Closed { addr: String },
    #[error("the CA's answer is malformed: {0}")]
    BadResponse(String),
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the SVID the CA returned does not verify against the bundle: {0}")]
    BadSvid(#[source] SvidError),
    #[error("the CA returned an SVID for {got}, not for the requested {want}")]
    WrongId { got: SpiffeId, want: SpiffeId },
    #[error("the CA returned a certificate for a different public key than the CSR's")]
    WrongKey,
    #[error("cannot read the SVID the CA returned: {0}")]
    Inspect(#[source] CaError),
}

/// A node agent's connection details for the CA. Each [`request_svid`]
/// opens one mTLS connection (to `addr`, a host name resolved then),
/// authenticated with the node credential.
///
/// [`request_svid`]: CaClient::request_svid
pub struct CaClient {
    addr: String,
    credential: NodeCredential,
    bundles: Arc<TrustBundles>,
    trust_domain: TrustDomain,
    node_id: SpiffeId,
    ca_id: SpiffeId,
    timeout: Duration,
    /// SO_MARK of the connections to the CA (a sidecar's own traffic must
    /// carry it to pass its nftables rules unredirected).
    socket_mark: Option<u32>,
}

/// Where the node credential comes from.
enum NodeCredential {
    /// Files the CA wrote (`--ca-bootstrap-dir`), read again every time,
    /// since the CA renews them at half life.
    Files {
        chain_path: PathBuf,
        key_path: PathBuf,
        /// The configuration built from the last good files, used if
        /// re-reading them fails.
        last_good: Mutex<Arc<ClientConfig>>,
    },
    /// Obtained by node attestation with the pod's service-account token
    /// (Kubernetes), held in memory and attested again at half life.
    Attested {
        token_file: PathBuf,
        current: tokio::sync::Mutex<Option<AttestedCredential>>,
    },
}

struct AttestedCredential {
    config: Arc<ClientConfig>,
    renew_at: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.addr)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// Loads the bundle and the node credential (the chain must verify
    /// against the bundle, name a node, and match the key).
    pub fn new(
        addr: impl ToString,
        node_chain_pem_path: impl Into<PathBuf>,
        node_key_pem_path: impl Into<PathBuf>,
        bundle_pem_path: impl AsRef<Path>,
    ) -> Result<Self, CaClientError> {
        let chain_path = node_chain_pem_path.into();
        let key_path = node_key_pem_path.into();
        let roots = read_bundle(bundle_pem_path.as_ref())?;

        // The trust domain is the node credential's: read its ID first, then
        // verify it properly below against that domain's bundle.
        let chain_text = read_file(&chain_path, "node credential chain", CHAIN_HINT)?;
        let chain = parse_chain(&chain_text, &chain_path)?;
        let trust_domain = leaf_trust_domain(&chain, &chain_path)?;
        let mut bundles = TrustBundles::new();
        for root in &roots {
            bundles
                .add_root(trust_domain.clone(), root)
                .map_err(|e| CaClientError::Invalid {
                    what: "trust bundle",
                    path: bundle_pem_path.as_ref().to_owned(),
                    reason: e.to_string(),
                    hint: BUNDLE_HINT,
                })?;
        }
        let bundles = Arc::new(bundles);
        let ca_id = ca_spiffe_id(&trust_domain);
        let (config, node_id) = load_credential(&chain_path, &key_path, &bundles, &ca_id)?;
        Ok(Self {
            addr: addr.to_string(),
            credential: NodeCredential::Files {
                chain_path,
                key_path,
                last_good: Mutex::new(Arc::new(config)),
            },
            bundles,
            trust_domain,
            node_id,
            ca_id,
            timeout: Duration::from_secs(10),
            socket_mark: None,
        })
    }

    /// A client that obtains its node credential by attestation: it sends
    /// the token in `token_file` (read again at each attestation, since the
    /// kubelet rotates it) and gets a short-lived credential for the node
    /// the CA finds the token's pod on. `bundles` is the live trust bundle
    /// (the CA's serving SVID is verified against it).
    pub fn attested(
        addr: impl ToString,
        token_file: impl Into<PathBuf>,
        node: &str,
        trust_domain: TrustDomain,
        bundles: Arc<TrustBundles>,
    ) -> Result<Self, CaClientError> {
        let node_id = node_spiffe_id(&trust_domain, node)
            .map_err(|e| CaClientError::NodeName(node.to_owned(), e))?;
        Ok(Self {
            addr: addr.to_string(),
            credential: NodeCredential::Attested {
                token_file: token_file.into(),
                current: tokio::sync::Mutex::new(None),
            },
            bundles,
            ca_id: ca_spiffe_id(&trust_domain),
            trust_domain,
            node_id,
            timeout: Duration::from_secs(10),
            socket_mark: None,
        })
    }

    /// Time allowed for one whole request (connect, handshake, answer);
    /// 10 s by default.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Marks the connections to the CA with `mark` (SO_MARK), if given.
    pub fn with_socket_mark(mut self, mark: Option<u32>) -> Self {
        self.socket_mark = mark;
        self
    }

    /// The trust bundle (from `bundle.pem`, or the live one given to
    /// [`attested`](Self::attested)), to verify peers with.
    pub fn bundles(&self) -> Arc<TrustBundles> {
        self.bundles.clone()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This node's identity, `spiffe://TD/ambit/node/<NODE>` (as expected;
    /// in attested mode the CA decides).
    pub fn node_id(&self) -> &SpiffeId {
        &self.node_id
    }

    /// The node name from the credential (or the one configured).
    pub fn node_name(&self) -> &str {
        node_name(&self.node_id).expect("checked when loaded")
    }

    /// Obtains an SVID for `id` (`ttl` defaults to the CA's). The private
    /// key is generated here and never leaves this process; the returned
    /// SVID has been verified against the bundle, names `id` and carries
    /// the generated key.
    pub async fn request_svid(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Svid, CaClientError> {
        let key = NewKey::generate()?;
        let request = Request {
            spiffe_id: id.to_string(),
            csr: key.csr.clone(),
            ttl_secs: ttl.map(|t| t.as_secs()),
        };
        let config = self.current_config().await?;
        let chain = self.exchange_within(config, &request).await?;
        // The SVID is used both to dial and to accept.
        let now = UnixTime::now();
        let got = verify_svid(&chain, &self.bundles, now, PeerRole::Client)
            .and_then(|_| verify_svid(&chain, &self.bundles, now, PeerRole::Server))
            .map_err(CaClientError::BadSvid)?;
        if &got != id {
            return Err(CaClientError::WrongId {
                got,
                want: id.clone(),
            });
        }
        key.into_svid(got, chain)
    }

    /// Attests this node with the token now in the token file; returns
    /// the client configuration presenting the new node credential.
    async fn attest(&self, token_file: &Path) -> Result<AttestedCredential, CaClientError> {
        let token = read_file(token_file, "service-account token", TOKEN_HINT)?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let key = NewKey::generate()?;
        let request = AttestRequest {
            token,
            csr: key.csr.clone(),
        };
        let mut anonymous = anonymous_client_config(self.bundles.clone(), vec![self.ca_id.clone()])
            .map_err(CaClientError::Tls)?;
        anonymous.alpn_protocols = vec![ALPN.to_vec()];
        let chain = self.exchange_within(Arc::new(anonymous), &request).await?;
        let got = verify_svid(&chain, &self.bundles, UnixTime::now(), PeerRole::Client)
            .map_err(CaClientError::BadSvid)?;
        let Some(node) = node_name(&got) else {
            return Err(CaClientError::BadResponse(format!(
                "the attestation returned {got}, which is not a node identity"
            )));
        };
        if got != self.node_id {
            // The CA decides where this pod runs; SVIDs for the pods of the
            // configured node will be refused.
            tracing::warn!(
                attested = node,
                configured = self.node_name(),
                "the CA attested this agent's pod on another node than --node-name"
            );
        }
        let svid = key.into_svid(got.clone(), chain)?;
        let (renew_at, not_after) = (svid.renew_at(), svid.not_after());
        let mut config = client_config(&svid, self.bundles.clone(), vec![self.ca_id.clone()])
            .map_err(CaClientError::Tls)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        tracing::info!(node, serial = %hex::encode(svid.serial()), "node attested to the CA");
        Ok(AttestedCredential {
            config: Arc::new(config),
            renew_at,
            not_after,
        })
    }

    /// One request and its chain, within the client's timeout.
    async fn exchange_within<T: serde::Serialize>(
        &self,
        config: Arc<ClientConfig>,
        request: &T,
    ) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
        let chain = tokio::time::timeout(self.timeout, self.exchange(config, request))
            .await
            .map_err(|_| CaClientError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            })??;
        chain
            .iter()
            .map(|c| STANDARD.decode(c).map(CertificateDer::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaClientError::BadResponse(format!("a certificate is not base64: {e}")))
    }

    async fn exchange<T: serde::Serialize>(
        &self,
        config: Arc<ClientConfig>,
        request: &T,
    ) -> Result<Vec<String>, CaClientError> {
        let addr = || self.addr.clone();
        // A host name is resolved now (every address is tried in turn), so
        // a Service whose address changes is followed.
        let tcp = connect(self.addr.as_str(), self.socket_mark)
            .await
            .map_err(|source| CaClientError::Connect {
                addr: addr(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().map_err(|source| CaClientError::Connect {
            addr: addr(),
            source,
        })?;
        // The verifier checks the SPIFFE ID, not this name.
        let name = ServerName::IpAddress(peer.ip().into());
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| CaClientError::Handshake {
                addr: addr(),
                source,
            })?;
        let mut conn = BufReader::new(tls);
        let io_err = |source| CaClientError::Io {
            addr: addr(),
            source,
        };
        protocol::write_line(&mut conn, request)
            .await
            .map_err(io_err)?;
        let mut line = Vec::new();
        // In TLS 1.3 the server checks the client certificate after the
        // client's handshake finished, so a refusal shows up here.
        let read = protocol::read_line(&mut conn, &mut line, MAX_LINE_BYTES)
            .await
            .map_err(io_err)?;
        let _ = conn.shutdown().await;
        match read {
            Line::Complete => {}
            Line::Eof => return Err(CaClientError::Closed { addr: addr() }),
            Line::TooLong => {
                return Err(CaClientError::BadResponse(format!(
                    "the answer is longer than {MAX_LINE_BYTES} bytes"
                )));
            }
        }
        let response: Response =
            serde_json::from_slice(&line).map_err(|e| CaClientError::BadResponse(e.to_string()))?;
        match response {
            Response {
                error: Some(error), ..
            } => Err(CaClientError::Refused(error)),
            Response {
                chain: Some(chain), ..
            } if !chain.is_empty() => Ok(chain),
            _ => Err(CaClientError::BadResponse(
                "neither a chain nor an error".into(),
            )),
        }
    }

    /// A configuration presenting the current node credential.
    async fn current_config(&self) -> Result<Arc<ClientConfig>, CaClientError> {
        match &self.credential {
            NodeCredential::Files {
                chain_path,
                key_path,
                last_good,
            } => Ok(self
                .config_from_files(chain_path, key_path, last_good)
                .await),
            NodeCredential::Attested {
                token_file,
                current,
            } => {
                let mut current = current.lock().await;
                let now = SystemTime::now();
                if let Some(held) = current.as_ref().filter(|held| now < held.renew_at) {
                    return Ok(held.config.clone());
                }
                match self.attest(token_file).await {
                    Ok(fresh) => {
                        let config = fresh.config.clone();
                        *current = Some(fresh);
                        Ok(config)
                    }
                    // Past half life but still valid: keep using it.
                    Err(e) => match current.as_ref().filter(|held| now < held.not_after) {
                        Some(held) => {
                            tracing::warn!(error = %e,
                                "cannot renew the node credential; using the current one until it expires");
                            Ok(held.config.clone())
                        }
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// A configuration from the node credential as it is on disk now, or
    /// the last good one if the files cannot be used.
    async fn config_from_files(
        &self,
        chain_path: &Path,
        key_path: &Path,
        last_good: &Mutex<Arc<ClientConfig>>,
    ) -> Arc<ClientConfig> {
        // The CA replaces the key and then the chain; a reader that catches
        // the gap sees a mismatch, so retry briefly.
        let mut attempt = 0;
        loop {
            match load_credential(chain_path, key_path, &self.bundles, &self.ca_id) {
                Ok((config, node_id)) if node_id == self.node_id => {
                    let config = Arc::new(config);
                    *last_good.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
                    return config;
                }
                Ok((_, node_id)) => {
                    tracing::warn!(
                        file = %chain_path.display(), now = %node_id, was = %self.node_id,
                        "the node credential now names another node; keeping the old one"
                    );
                }
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "node credential not usable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the node credential; using the last good one");
                }
            }
            return last_good.lock().unwrap_or_else(|e| e.into_inner()).clone();
        }
    }
}

/// A key generated for one request and the CSR sent for it; the key
/// never leaves this process.
struct NewKey {
    spki: Vec<u8>,
    pkcs8: Zeroizing<Vec<u8>>,
    /// Base64 DER PKCS#10.
    csr: String,
}

impl NewKey {
    fn generate() -> Result<Self, CaClientError> {
        let mut key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaClientError::Generate)?;
        let spki = key.subject_public_key_info();
        let pkcs8 = Zeroizing::new(key.serialize_der());
        let mut params = CertificateParams::default();
        // The CA ignores everything but the key; send nothing else.
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key);
        key.zeroize();
        let csr = csr.map_err(CaClientError::Generate)?;
        Ok(Self {
            spki,
            pkcs8,
            csr: STANDARD.encode(csr.der().as_ref()),
        })
    }

    /// The SVID of the verified `chain` (ID `id`) with this key, once the
    /// chain is checked to certify this key.
    fn into_svid(
        self,
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Svid, CaClientError> {
        if chain.first().and_then(leaf_spki).as_deref() != Some(self.spki.as_slice()) {
            return Err(CaClientError::WrongKey);
        }
        let cert = SvidCertificate::from_chain(id, chain).map_err(CaClientError::Inspect)?;
        Ok(Svid::from_parts(cert, SvidKey::from_pkcs8_der(self.pkcs8)))
    }
}

/// Reads a file, zeroizing the buffer on drop (the key file holds a key).
fn read_file(
    path: &Path,
    what: &'static str,
    hint: &'static str,
) -> Result<Zeroizing<Vec<u8>>, CaClientError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| CaClientError::Read {
            what,
            path: path.to_owned(),
            source,
            hint,
        })
}

fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
    let text = read_file(path, "trust bundle", BUNDLE_HINT)?;
    let invalid = |reason: String| CaClientError::Invalid {
        what: "trust bundle",
        path: path.to_owned(),
        reason,
        hint: BUNDLE_HINT,
    };
    let roots = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if roots.is_empty() {
        return Err(invalid("it holds no CERTIFICATE block".into()));
    }
    Ok(roots)
}

fn parse_chain(text: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
    let invalid = |reason: String| CaClientError::Invalid {
        what: "node credential chain",
        path: path.to_owned(),
        reason,
        hint: CHAIN_HINT,
    };
    let chain = CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("it holds no CERTIFICATE block".into()));
    }
    Ok(chain)
}

/// The trust domain named by the leaf's SPIFFE ID (not yet verified).
fn leaf_trust_domain(
    chain: &[CertificateDer<'_>],
    path: &Path,
) -> Result<TrustDomain, CaClientError> {
    let invalid = |reason: String| CaClientError::Invalid {
        what: "node credential chain",
        path: path.to_owned(),
        reason,
        hint: CHAIN_HINT,
    };
    // An empty bundle set makes verify_svid stop right after reading the ID.
    match verify_svid(
        chain,
        &TrustBundles::new(),
        UnixTime::now(),
        PeerRole::Client,
    ) {
        Err(SvidError::UnknownTrustDomain(td)) => {
            TrustDomain::new(&td).map_err(|e| invalid(e.to_string()))
        }
        Err(e) => Err(invalid(e.to_string())),
        Ok(id) => Err(invalid(format!("unexpectedly verified {id}"))),
    }
}

/// Loads and checks the node credential, and builds the client
/// configuration that presents it and accepts only `ca_id` as the server.
pub(super) fn load_credential(
    chain_path: &Path,
    key_path: &Path,
    bundles: &Arc<TrustBundles>,
    ca_id: &SpiffeId,
) -> Result<(ClientConfig, SpiffeId), CaClientError> {
    let chain_text = read_file(chain_path, "node credential chain", CHAIN_HINT)?;
    let chain = parse_chain(&chain_text, chain_path)?;
    let invalid_chain = |reason: String, hint| CaClientError::Invalid {
        what: "node credential chain",
        path: chain_path.to_owned(),
        reason,
        hint,
    };
    let node_id = verify_svid(&chain, bundles, UnixTime::now(), PeerRole::Client)
        .map_err(|e| invalid_chain(e.to_string(), STALE_HINT))?;
    if node_name(&node_id).is_none() {
        return Err(invalid_chain(
            format!("{node_id} is not a node identity (spiffe://<trust-domain>/ambit/node/<NODE>)"),
            CHAIN_HINT,
        ));
    }

    let key_text = read_file(key_path, "node credential key", KEY_HINT)?;
    let invalid_key = |reason: String, hint| CaClientError::Invalid {
        what: "node credential key",
        path: key_path.to_owned(),
        reason,
        hint,
    };
    let pkcs8 = match PrivateKeyDer::from_pem_slice(&key_text) {
        Ok(PrivateKeyDer::Pkcs8(key)) => Zeroizing::new(key.secret_pkcs8_der().to_vec()),
        Ok(_) => {
            return Err(invalid_key(
                "the key is not PKCS#8 (\"BEGIN PRIVATE KEY\")".into(),
                KEY_HINT,
            ));
        }
        Err(e) => {
            return Err(invalid_key(
                format!("no usable PEM private key: {e}"),
                KEY_HINT,
            ));
        }
    };
    let mut key_pair = KeyPair::try_from(pkcs8.as_slice())
        .map_err(|e| invalid_key(format!("not a usable private key: {e}"), KEY_HINT))?;
    let spki = key_pair.subject_public_key_info();
    key_pair.zeroize();
    if leaf_spki(&chain[0]).as_deref() != Some(spki.as_slice()) {
        return Err(invalid_key(
            format!(
                "it is not the key of the certificate in {}",
                chain_path.display()
            ),
            STALE_HINT,
        ));
    }

    let cert =
        SvidCertificate::from_chain(node_id.clone(), chain).map_err(CaClientError::Inspect)?;
    let svid = Svid::from_parts(cert, SvidKey::from_pkcs8_der(pkcs8));
    // TLS 1.3 only, ring provider, SPIFFE server verifier expecting exactly
    // the CA's ID, no resumption.
    let mut config =
        client_config(&svid, bundles.clone(), vec![ca_id.clone()]).map_err(CaClientError::Tls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok((config, node_id))
}

/// The leaf's DER SubjectPublicKeyInfo.
fn leaf_spki(leaf: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Connects to `addr` (each resolved address in turn, as
/// `TcpStream::connect` does), marked with `mark` if given.
async fn connect(addr: &str, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket2::SockRef::from(&socket).set_mark(mark)?;
        match socket.connect(resolved).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}
