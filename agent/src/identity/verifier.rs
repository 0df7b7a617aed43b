//! The SPIFFE peer verifier: webpki builds and checks the X.509 path, and
//! this module adds what webpki does not know about (X.509-SVID §5): exactly
//! one URI SAN holding a canonical SPIFFE ID with a path, a leaf that is not
//! a CA and whose keyUsage fits, and a path that ends in the bundle of the
//! trust domain that ID names, never any other.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, LazyLock, PoisonError, RwLock},
};

use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use thiserror::Error;
use x509_parser::{certificate::X509Certificate, error::X509Error, extensions::GeneralName};

use super::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Signature algorithms for chains and handshakes, taken from the ring
/// provider explicitly (not from a process-wide default provider).
static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
    LazyLock::new(|| rustls::crypto::ring::default_provider().signature_verification_algorithms);

/// Why a presented certificate chain is not an acceptable X.509-SVID.
#[derive(Debug, Error)]
pub enum SvidError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the leaf certificate is not valid DER X.509: {0}")]
    BadEncoding(#[source] X509Error),
    #[error("the leaf certificate has a malformed subjectAltName entry")]
    MalformedSan,
    #[error("the leaf certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("the leaf certificate has {count} URI SANs; an X.509-SVID must have exactly one")]
    MultipleUriSans { count: usize },
    #[error("the URI SAN {uri:?} is not a canonical SPIFFE ID: {source}")]
    InvalidSpiffeId {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("{0} has no path; a leaf SVID must name a workload, not a trust domain")]
    LeafIdWithoutPath(SpiffeId),
    #[error("no trust bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    #[error("the leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf certificate has no keyUsage extension")]
    MissingKeyUsage,
    #[error("the leaf certificate's keyUsage lacks digitalSignature")]
    MissingDigitalSignature,
    #[error("the leaf certificate's keyUsage includes {0}, which a leaf SVID must not have")]
    ForbiddenKeyUsage(&'static str),
    #[error(
        "the certificate chain expired (notAfter {} s after the epoch, now {} s)",
        .not_after.as_secs(), .now.as_secs()
    )]
    Expired { not_after: UnixTime, now: UnixTime },
    #[error(
        "the certificate chain is not valid yet (notBefore {} s after the epoch, now {} s)",
        .not_before.as_secs(), .now.as_secs()
    )]
    NotYetValid { not_before: UnixTime, now: UnixTime },
    #[error("the certificate chain does not verify against the {trust_domain} bundle: {source}")]
    BadChain {
        trust_domain: String,
        #[source]
        source: webpki::Error,
    },
    #[error("the peer is {got}, but only {expected} may serve this destination")]
    UnexpectedPeer { got: SpiffeId, expected: String },
    #[error(
        "{0} is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>); \
         only workloads may use the tunnel"
    )]
    NotAWorkload(SpiffeId),
    #[error("the {trust_domain} bundle root is not a usable trust anchor: {source}")]
    BadTrustAnchor {
        trust_domain: TrustDomain,
        #[source]
        source: webpki::Error,
    },
}

impl From<SvidError> for rustls::Error {
    fn from(e: SvidError) -> Self {
        // Standard variants where one fits, so the peer gets the right alert.
        let cert_error = match e {
            SvidError::Expired { .. } => CertificateError::Expired,
            SvidError::NotYetValid { .. } => CertificateError::NotValidYet,
            SvidError::BadChain {
                source: webpki::Error::UnknownIssuer,
                ..
            } => CertificateError::UnknownIssuer,
            SvidError::BadChain {
                source: webpki::Error::InvalidSignatureForPublicKey,
                ..
            } => CertificateError::BadSignature,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_error)
    }
}

/// The TLS role of the peer being verified, which decides the extended key
/// usage its leaf must allow (when it has an EKU extension at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Client,
    Server,
}

impl PeerRole {
    fn key_usage(self) -> webpki::KeyUsage {
        match self {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

type Anchors = HashMap<TrustDomain, Vec<TrustAnchor<'static>>>;

/// X.509 roots per trust domain. A peer is only ever checked against the
/// roots of the trust domain in its own SPIFFE ID.
///
/// Shared as `Arc<TrustBundles>` by every verifier of a process, and
/// replaceable in place ([`replace`](Self::replace)): a bundle the CA
/// publishes later (a root rotation) applies to the next handshake of every
/// tunnel and CA connection, without rebuilding their configurations.
#[derive(Default)]
pub struct TrustBundles {
    current: RwLock<Arc<Anchors>>,
}

impl Clone for TrustBundles {
    /// A copy of the current roots, replaced independently of `self`.
    fn clone(&self) -> Self {
        Self {
            current: RwLock::new(self.snapshot()),
        }
    }
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a root certificate to `trust_domain`'s bundle.
    pub fn add_root(
        &mut self,
        trust_domain: TrustDomain,
        root: &CertificateDer<'_>,
    ) -> Result<(), SvidError> {
        let anchor = webpki::anchor_from_trusted_cert(root)
            .map_err(|source| SvidError::BadTrustAnchor {
                trust_domain: trust_domain.clone(),
                source,
            })?
            .to_owned();
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::make_mut(current)
            .entry(trust_domain)
            .or_default()
            .push(anchor);
        Ok(())
    }

    /// Makes `next`'s roots the ones every holder of `self` verifies with
    /// from now on (handshakes in progress finish with the old ones).
    pub fn replace(&self, next: TrustBundles) {
        let next = next.snapshot();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
    }

    /// How many roots the bundle of `trust_domain` holds.
    pub fn root_count(&self, trust_domain: &str) -> usize {
        self.snapshot().get(trust_domain).map_or(0, Vec::len)
    }

    fn snapshot(&self) -> Arc<Anchors> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.snapshot();
        f.debug_map()
            .entries(current.iter().map(|(td, roots)| (td.as_str(), roots.len())))
            .finish()
    }
}

/// Verifies `chain` (leaf first, then intermediates) as an X.509-SVID of a
/// peer in `role` at time `now`, and returns its SPIFFE ID.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    verify_parts(leaf, intermediates, bundles, now, role)
}

/// The SPIFFE ID of the peer of a completed handshake. Only meaningful when
/// the connection was configured with [`SpiffeClientVerifier`] or
/// [`SpiffeServerVerifier`], which already verified the chain.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, SvidError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(SvidError::NoCertificate)?;
    let cert = parse_leaf(leaf)?;
    spiffe_id_of(&cert)
}

fn verify_parts(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    // The ID comes first: it picks the one bundle the chain may end in.
    let cert = parse_leaf(leaf)?;
    let id = spiffe_id_of(&cert)?;
    let trust_domain = id.trust_domain();
    let snapshot = bundles.snapshot();
    let anchors = snapshot
        .get(trust_domain)
        .map(Vec::as_slice)
        .ok_or_else(|| SvidError::UnknownTrustDomain(trust_domain.to_owned()))?;
    check_leaf_constraints(&cert)?;

    let bad_chain = |source| SvidError::BadChain {
        trust_domain: trust_domain.to_owned(),
        source,
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(bad_chain)?;
    end_entity
        .verify_for_usage(
            ALGORITHMS.all,
            anchors,
            intermediates,
            now,
            role.key_usage(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { not_after, .. } => SvidError::Expired { not_after, now },
            webpki::Error::CertNotValidYet { not_before, .. } => {
                SvidError::NotYetValid { not_before, now }
            }
            other => bad_chain(other),
        })?;
    Ok(id)
}

fn parse_leaf<'a>(leaf: &'a [u8]) -> Result<X509Certificate<'a>, SvidError> {
    match x509_parser::parse_x509_certificate(leaf) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::BadEncoding(X509Error::InvalidCertificate)),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => {
            Err(SvidError::BadEncoding(e))
        }
        Err(x509_parser::nom::Err::Incomplete(_)) => {
            Err(SvidError::BadEncoding(X509Error::InvalidCertificate))
        }
    }
}

/// X.509-SVID §2 and §5.2: exactly one URI SAN, a canonical SPIFFE ID with a
/// path.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(SvidError::BadEncoding)?
        .ok_or(SvidError::NoUriSan)?;
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push(*uri),
            GeneralName::Invalid(..) => return Err(SvidError::MalformedSan),
            _ => {}
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [uri] => *uri,
        _ => return Err(SvidError::MultipleUriSans { count: uris.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|source| SvidError::InvalidSpiffeId {
        uri: uri.to_owned(),
        source,
    })?;
    if id.path().is_empty() {
        return Err(SvidError::LeafIdWithoutPath(id));
    }
    Ok(id)
}

/// X.509-SVID §4.1, §4.3, §5.2: a leaf is not a CA, signs (digitalSignature)
/// and cannot sign certificates or CRLs.
fn check_leaf_constraints(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    if let Some(bc) = cert.basic_constraints().map_err(SvidError::BadEncoding)?
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(SvidError::BadEncoding)?
        .ok_or(SvidError::MissingKeyUsage)?
        .value;
    if ku.key_cert_sign() {
        return Err(SvidError::ForbiddenKeyUsage("keyCertSign"));
    }
    if ku.crl_sign() {
        return Err(SvidError::ForbiddenKeyUsage("cRLSign"));
    }
    if !ku.digital_signature() {
        return Err(SvidError::MissingDigitalSignature);
    }
    Ok(())
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is refused: Ambit tunnels are TLS 1.3 only".into())
}

/// Which client identities a server accepts, beyond a chain that verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedClients {
    /// Workload SVIDs only (`/ns/NS/sa/SA`): the tunnel. A node's bootstrap
    /// credential is issued by the same CA, so the chain alone cannot tell
    /// it apart; without this a node credential would reach applications.
    Workloads,
    /// Any SVID of a trusted domain (the CA service, which authorizes by
    /// node identity itself).
    Any,
    /// Any SVID, or no certificate at all: the CA service in Kubernetes,
    /// where an agent without a node credential yet attests with its
    /// service-account token over a server-authenticated connection.
    AnyOrAnonymous,
}

/// Server side: requires a client SVID from any trust domain in the bundles,
/// naming an identity `accepted` allows. Read the verified ID after the
/// handshake with [`peer_spiffe_id`].
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<TrustBundles>,
    accepted: AcceptedClients,
}

impl SpiffeClientVerifier {
    pub fn new(bundles: Arc<TrustBundles>, accepted: AcceptedClients) -> Self {
        Self { bundles, accepted }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.accepted != AcceptedClients::AnyOrAnonymous
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: each workload has exactly one SVID to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = verify_parts(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            PeerRole::Client,
        )?;
        if self.accepted == AcceptedClients::Workloads && id.service_account().is_none() {
            return Err(SvidError::NotAWorkload(id).into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ALGORITHMS)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ALGORITHMS.supported_schemes()
    }
}

/// Client side: accepts the server only if its SVID verifies and its ID is
/// one of `expected` (an empty list accepts nobody). The TLS server name is
/// ignored: the SPIFFE ID is the server's identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Arc<TrustBundles>,
    expected: Vec<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub fn new(bundles: Arc<TrustBundles>, expected: Vec<SpiffeId>) -> Self {
        Self { bundles, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_parts(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            PeerRole::Server,
        )?;
        if !self.expected.contains(&id) {
            let expected = if self.expected.is_empty() {
                "(no identity configured)".to_owned()
            } else {
                self.expected
                    .iter()
                    .map(SpiffeId::as_str)
                    .collect::<Vec<_>>()
                    .join(" or ")
            };
            return Err(SvidError::UnexpectedPeer { got: id, expected }.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ALGORITHMS)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ALGORITHMS.supported_schemes()
    }
}

/// The verifier's typed reason inside a failed TLS handshake's I/O error
/// (tokio-rustls wraps the rustls error, which wraps ours).
pub fn svid_error_of(e: &std::io::Error) -> Option<&SvidError> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// Why a TLS handshake failed, in words: the SPIFFE verifier's reason when
/// it rejected the peer, otherwise the I/O error.
pub fn handshake_failure_reason(e: &std::io::Error) -> String {
    match svid_error_of(e) {
        Some(svid) => svid.to_string(),
        None => e.to_string(),
    }
}
