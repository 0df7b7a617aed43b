//! The built-in CA: one per trust domain, held only in memory.
//!
//! A self-signed root (the trust bundle) signs one intermediate, and the
//! intermediate signs X.509-SVIDs exactly as the SPIFFE X.509-SVID spec
//! requires (§2-§4): one URI SAN, `cA=false`, critical keyUsage
//! digitalSignature only, EKU serverAuth+clientAuth.
//!
//! The intermediate carries no URI name constraint although SPIFFE §4.2
//! allows one: rcgen cannot encode URI subtrees and webpki (ours, and
//! ztunnel's) rejects every certificate below a URI constraint. Our verifier
//! enforces the same property itself: a leaf is only checked against the
//! bundle of the trust domain its own ID names.

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
    SubjectPublicKeyInfo,
};
use rustls::crypto::SecureRandom;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, pem::PemObject,
};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use zeroize::{Zeroize, Zeroizing};

use super::spiffe_id::{SpiffeId, TrustDomain};

/// TTL of an SVID when the caller has no opinion.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Shortest TTL: below this, renewal at half life would churn.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(60);
/// Longest TTL: short-lived identities are the point of an in-memory CA.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// notBefore is set this far in the past so peers with a slightly slow clock
/// accept a fresh SVID.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// Lifetime of the root and intermediate. Keys live only in this process, so
/// a restart makes a new CA anyway; this bounds a process that never restarts.
const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Validity of a root made by [`CertificateAuthority::generate_root`]: it
/// outlives the CA process (kept in a Secret), and is rotated by hand
/// (docs/operations.md).
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A root CA kept outside the process (in Kubernetes, a Secret mounted as
/// files), so that the trust bundle agents hold survives CA restarts.
pub struct RootPem {
    pub cert: String,
    pub key: Zeroizing<String>,
}

/// Why the CA refused or failed to issue.
#[derive(Debug, Error)]
pub enum CaError {
    #[error("SVID TTL {ttl:?} is outside the allowed range {MIN_SVID_TTL:?} to {MAX_SVID_TTL:?}")]
    TtlOutOfRange { ttl: Duration },
    #[error("{id} is in trust domain {}, but this CA issues only for {ca}", .id.trust_domain())]
    ForeignTrustDomain { id: SpiffeId, ca: TrustDomain },
    #[error("{0} has no path; an X.509-SVID leaf must name a workload, not the trust domain")]
    IdWithoutPath(SpiffeId),
    #[error("an SVID valid for {ttl:?} would outlive the CA's intermediate certificate")]
    OutlivesCa { ttl: Duration },
    #[error("the CSR is malformed or its signature does not verify: {0}")]
    BadCsr(#[source] rcgen::Error),
    #[error("the public key is not a DER SubjectPublicKeyInfo: {0}")]
    BadPublicKey(String),
    #[error("the public key is not ECDSA P-256, the only key type Ambit issues for")]
    UnsupportedKeyAlgorithm,
    #[error("the system random number generator failed")]
    Rng,
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("the certificate just issued cannot be read back: {0}")]
    Inspect(String),
    #[error("the root CA is not usable: {0}")]
    BadRoot(String),
}

/// An ECDSA P-256 private key in PKCS#8 DER, zeroized on drop and never
/// printed.
pub struct SvidKey {
    pkcs8: Zeroizing<Vec<u8>>,
}

impl SvidKey {
    /// Takes a PKCS#8 DER private key the caller generated (for example to
    /// send a CSR to a remote CA). The caller is responsible for it being
    /// the key of the certificate it is later paired with.
    pub fn from_pkcs8_der(pkcs8: Zeroizing<Vec<u8>>) -> Self {
        Self { pkcs8 }
    }

    /// Borrowed DER, for handing to rustls (whose ring key loader zeroizes its
    /// own copy).
    pub fn private_key_der(&self) -> PrivateKeyDer<'_> {
        PrivateKeyDer::Pkcs8(self.pkcs8.as_slice().into())
    }
}

impl fmt::Debug for SvidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidKey(ECDSA P-256, redacted)")
    }
}

/// An issued X.509-SVID certificate without its private key (the result of
/// issuing for a CSR or a public key whose private half the caller holds).
#[derive(Clone)]
pub struct SvidCertificate {
    spiffe_id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl SvidCertificate {
    /// Wraps a chain (leaf first) obtained elsewhere, e.g. from a remote CA,
    /// reading serial and validity from the leaf. This does not verify
    /// anything: check the chain with `verify_svid` first and pass the ID it
    /// returned.
    pub fn from_chain(
        spiffe_id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CaError> {
        let leaf = chain
            .first()
            .ok_or_else(|| CaError::Inspect("the certificate chain is empty".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CaError::Inspect(e.to_string()))?;
        let validity = cert.validity();
        let serial = cert.raw_serial().to_vec();
        let not_before = unix_to_system(validity.not_before.timestamp())?;
        let not_after = unix_to_system(validity.not_after.timestamp())?;
        Ok(Self {
            spiffe_id,
            chain,
            serial,
            not_before,
            not_after,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// Leaf first, then the intermediate: what a TLS peer must be sent.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf's serial number, big-endian, as encoded in the certificate.
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Half-way through the certificate's validity: time to get a new one.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

impl fmt::Debug for SvidCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidCertificate")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &hex::encode(&self.serial))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An X.509-SVID with its private key.
#[derive(Debug)]
pub struct Svid {
    cert: SvidCertificate,
    key: SvidKey,
    /// The key loaded for signing handshakes, once: loading parses the
    /// PKCS#8 document and checks it against the leaf (a P-256 scalar
    /// multiply), too slow to repeat for every tunnel.
    signing: OnceLock<Arc<rustls::sign::CertifiedKey>>,
}

impl Svid {
    /// Pairs a certificate with its private key (e.g. an SVID a remote CA
    /// issued for a CSR). The caller checks that the key matches the leaf.
    pub fn from_parts(cert: SvidCertificate, key: SvidKey) -> Self {
        Self {
            cert,
            key,
            signing: OnceLock::new(),
        }
    }

    /// The chain and the loaded signing key, as rustls presents them; built
    /// on first use and shared by every TLS configuration of this SVID.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, rustls::Error> {
        if let Some(loaded) = self.signing.get() {
            return Ok(Arc::clone(loaded));
        }
        let loaded = Arc::new(rustls::sign::CertifiedKey::from_der(
            self.chain().to_vec(),
            self.key.private_key_der().clone_key(),
            &super::tls::crypto_provider(),
        )?);
        // A concurrent first use may have won: either copy is the same key.
        Ok(Arc::clone(self.signing.get_or_init(|| loaded)))
    }

    pub fn certificate(&self) -> &SvidCertificate {
        &self.cert
    }
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.cert.spiffe_id
    }
    /// Leaf first, then the intermediate.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.cert.chain
    }
    pub fn key(&self) -> &SvidKey {
        &self.key
    }
    pub fn serial(&self) -> &[u8] {
        &self.cert.serial
    }
    pub fn not_after(&self) -> SystemTime {
        self.cert.not_after
    }
    /// Half-way through the validity period.
    pub fn renew_at(&self) -> SystemTime {
        self.cert.renew_at()
    }
}

/// A CA signing key; rcgen's KeyPair does not zeroize itself on drop.
struct CaKey(KeyPair);

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The built-in CA of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    intermediate_not_after: OffsetDateTime,
    issuer: Issuer<'static, CaKey>,
    rng: &'static dyn SecureRandom,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a fresh root and intermediate for `trust_domain`. The root
    /// key is dropped (zeroized) once the intermediate is signed: nothing
    /// else needs it while the CA lives only in memory.
    pub fn new(trust_domain: TrustDomain) -> Result<Self, CaError> {
        let rng = super::tls::crypto_provider().secure_random;
        let (root, root_issuer, not_after) = new_root(&trust_domain, rng, CA_VALIDITY)?;
        Self::under_root(trust_domain, root.into(), root_issuer, not_after, rng)
    }

    /// A new root for `trust_domain`, as PEM, for the operator to keep (a
    /// Secret) and hand to [`from_root`](Self::from_root).
    pub fn generate_root(trust_domain: &TrustDomain) -> Result<RootPem, CaError> {
        let rng = super::tls::crypto_provider().secure_random;
        let (root, issuer, _) = new_root(trust_domain, rng, ROOT_VALIDITY)?;
        Ok(RootPem {
            cert: root.pem(),
            key: Zeroizing::new(issuer.key().0.serialize_pem()),
        })
    }

    /// A CA under an existing root: a fresh intermediate is signed by it,
    /// so restarts keep the bundle (and every SVID issued before stays
    /// valid). The root must be a CA certificate of `trust_domain` (its URI
    /// SAN is the trust domain's ID), valid now, matching `key`.
    pub fn from_root(trust_domain: TrustDomain, root: &RootPem) -> Result<Self, CaError> {
        let rng = super::tls::crypto_provider().secure_random;
        let bad = |why: String| CaError::BadRoot(why);
        let der = CertificateDer::from_pem_slice(root.cert.as_bytes())
            .map_err(|e| bad(format!("the certificate is not PEM: {e}")))?;
        let key = KeyPair::from_pem(&root.key)
            .map_err(|e| bad(format!("the key is not a PEM private key: {e}")))?;
        let not_after = check_root(&trust_domain, &der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&der, CaKey(key))
            .map_err(|e| bad(format!("cannot sign with it: {e}")))?;
        Self::under_root(trust_domain, der.into_owned(), issuer, not_after, rng)
    }

    /// Signs a new intermediate under `root_issuer`, valid for
    /// [`CA_VALIDITY`] or until the root expires, whichever is first.
    fn under_root(
        trust_domain: TrustDomain,
        root: CertificateDer<'static>,
        root_issuer: Issuer<'static, CaKey>,
        root_not_after: OffsetDateTime,
        rng: &'static dyn SecureRandom,
    ) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let not_after = (now + CA_VALIDITY).min(root_not_after);
        let int_key =
            CaKey(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?);
        let int_params = ca_params(
            &trust_domain,
            "Intermediate CA",
            BasicConstraints::Constrained(0),
            random_serial(rng)?,
            now - CLOCK_SKEW_ALLOWANCE,
            not_after,
        )?;
        let intermediate = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(CaError::Generate)?;
        drop(root_issuer);
        Ok(Self {
            trust_domain,
            root,
            intermediate: intermediate.into(),
            intermediate_not_after: not_after,
            issuer: Issuer::new(int_params, int_key),
            rng,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The self-signed root: this trust domain's X.509 bundle.
    pub fn root_certificate(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Issues an SVID for `id` with a new in-memory ECDSA P-256 key.
    /// `ttl` defaults to [`DEFAULT_SVID_TTL`]. The caller decides whether the
    /// requester may have `id` (node scoping lives in the identity source).
    pub fn issue_svid(&self, id: &SpiffeId, ttl: Option<Duration>) -> Result<Svid, CaError> {
        let mut key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let pkcs8 = Zeroizing::new(key.serialize_der());
        let issued = self.issue_for_key(id, ttl, &key);
        key.zeroize();
        Ok(Svid::from_parts(issued?, SvidKey { pkcs8 }))
    }

    /// Issues an SVID for `id` to the holder of a PKCS#10 CSR. The CSR's
    /// signature must verify (proof of possession); everything else it asks
    /// for (subject, SANs, usages) is ignored, so a requester cannot smuggle
    /// in a second identity.
    pub fn issue_for_csr(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        csr_der: &[u8],
    ) -> Result<SvidCertificate, CaError> {
        // rcgen parses the CSR and checks its self-signature.
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(CaError::BadCsr)?;
        // rcgen infers the key type from the signature algorithm, which does
        // not pin the curve; take the SubjectPublicKeyInfo verbatim instead.
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
                .map_err(|e| CaError::BadPublicKey(e.to_string()))?;
        self.issue_for_public_key(id, ttl, csr.certification_request_info.subject_pki.raw)
    }

    /// Issues an SVID for `id` bound to a DER SubjectPublicKeyInfo whose
    /// private key the caller holds.
    pub fn issue_for_public_key(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        spki_der: &[u8],
    ) -> Result<SvidCertificate, CaError> {
        let key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::BadPublicKey(e.to_string()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::UnsupportedKeyAlgorithm);
        }
        self.issue_for_key(id, ttl, &key)
    }

    fn issue_for_key(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        key: &impl PublicKeyData,
    ) -> Result<SvidCertificate, CaError> {
        let ttl = ttl.unwrap_or(DEFAULT_SVID_TTL);
        if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&ttl) {
            return Err(CaError::TtlOutOfRange { ttl });
        }
        if id.trust_domain() != self.trust_domain.as_str() {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                ca: self.trust_domain.clone(),
            });
        }
        if id.path().is_empty() {
            return Err(CaError::IdWithoutPath(id.clone()));
        }
        let now = OffsetDateTime::now_utc();
        let not_after = now + ttl;
        if not_after > self.intermediate_not_after {
            return Err(CaError::OutlivesCa { ttl });
        }

        let mut params = CertificateParams::default();
        // No subject: the SPIFFE ID is the identity, and rcgen marks the SAN
        // extension critical when the subject is empty (RFC 5280 §4.1.2.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(id)?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial(self.rng)?);
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let leaf = self.sign(&params, key)?;
        svid_certificate(id.clone(), leaf, self.intermediate.clone())
    }

    fn sign(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, CaError> {
        params
            .signed_by(key, &self.issuer)
            .map(Into::into)
            .map_err(CaError::Generate)
    }

    /// Test hook: sign arbitrary (possibly non-SVID) parameters with the
    /// intermediate, to build the bad certificates the verifier must reject.
    #[cfg(test)]
    pub(super) fn sign_for_test(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
    ) -> Vec<CertificateDer<'static>> {
        vec![self.sign(params, key).unwrap(), self.intermediate.clone()]
    }
}

/// A self-signed root for `td`, valid for `validity` from now.
fn new_root(
    td: &TrustDomain,
    rng: &'static dyn SecureRandom,
    validity: Duration,
) -> Result<(rcgen::Certificate, Issuer<'static, CaKey>, OffsetDateTime), CaError> {
    let now = OffsetDateTime::now_utc();
    let not_after = now + validity;
    let key = CaKey(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?);
    let params = ca_params(
        td,
        "Root CA",
        BasicConstraints::Constrained(1),
        random_serial(rng)?,
        now - CLOCK_SKEW_ALLOWANCE,
        not_after,
    )?;
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    Ok((cert, Issuer::new(params, key), not_after))
}

/// Checks that `der` is a CA certificate of `td`, valid now, whose public
/// key is `key`'s; returns its notAfter.
fn check_root(td: &TrustDomain, der: &[u8], key: &KeyPair) -> Result<OffsetDateTime, CaError> {
    let bad = |why: String| CaError::BadRoot(why);
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("the certificate is not valid X.509: {e}")))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad(
            "the certificate is not a CA (basicConstraints cA)".into()
        ));
    }
    let td_id = td.id();
    let names_td = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(
                |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == td_id.as_str()),
            )
        });
    if !names_td {
        return Err(bad(format!(
            "the certificate is not a root of trust domain {td} (no URI SAN {td_id})"
        )));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("the key does not belong to the certificate".into()));
    }
    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(bad(format!(
            "the certificate is not valid now (notBefore {}, notAfter {})",
            validity.not_before, validity.not_after
        )));
    }
    Ok(validity.not_after.to_datetime())
}

fn ca_params(
    td: &TrustDomain,
    role: &str,
    constraints: BasicConstraints,
    serial: SerialNumber,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ambit");
    dn.push(DnType::CommonName, format!("Ambit {role} {td}"));
    params.distinguished_name = dn;
    // SPIFFE §3.2: a signing certificate SHOULD be an SVID of its trust
    // domain, with no path.
    params.subject_alt_names = vec![uri_san(&td.id())?];
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(serial);
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    // A parsed SpiffeId is ASCII, so this cannot fail in practice.
    Ok(SanType::URI(
        id.as_str().try_into().map_err(CaError::Generate)?,
    ))
}

/// 128 random bits, positive (top bit clear) as RFC 5280 §4.1.2.2 requires.
fn random_serial(rng: &dyn SecureRandom) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes).map_err(|_| CaError::Rng)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Reads serial and validity back from the signed leaf, so the values we
/// report are exactly the ones peers see (DER times have 1 s resolution).
fn svid_certificate(
    spiffe_id: SpiffeId,
    leaf: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
) -> Result<SvidCertificate, CaError> {
    SvidCertificate::from_chain(spiffe_id, vec![leaf, intermediate])
}

fn unix_to_system(secs: i64) -> Result<SystemTime, CaError> {
    OffsetDateTime::from_unix_timestamp(secs)
        .map(SystemTime::from)
        .map_err(|e| CaError::Inspect(e.to_string()))
}
