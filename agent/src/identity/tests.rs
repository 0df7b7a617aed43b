//! Tests of the CA and the verifier together: every rejection case builds
//! its own bad certificate with rcgen, signed by a real CA intermediate, so
//! only the property under test is wrong.

use std::{
    io,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SanType,
};
use rustls::{ClientConfig, ServerConfig, pki_types::ServerName, version::TLS12};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

use super::*;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn web_id() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
}

struct Domain {
    ca: CertificateAuthority,
    bundles: TrustBundles,
}

fn domain(name: &str) -> Domain {
    let ca = CertificateAuthority::new(td(name)).unwrap();
    let mut bundles = TrustBundles::new();
    bundles
        .add_root(ca.trust_domain().clone(), ca.root_certificate())
        .unwrap();
    Domain { ca, bundles }
}

fn now() -> UnixTime {
    UnixTime::now()
}

/// Parameters of a correct SVID for `uri`; each rejection test breaks one.
fn good_params(uri: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let t = OffsetDateTime::now_utc();
    p.not_before = t - Duration::from_secs(60);
    p.not_after = t + Duration::from_secs(3600);
    p
}

fn sign(ca: &CertificateAuthority, params: &CertificateParams) -> Vec<CertificateDer<'static>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    ca.sign_for_test(params, &key)
}

fn verify(d: &Domain, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, SvidError> {
    verify_svid(chain, &d.bundles, now(), PeerRole::Client)
}

// ---- CA ----

#[test]
fn issued_svid_follows_the_x509_svid_profile() {
    let d = domain("cluster.local");
    let before = SystemTime::now();
    let svid = d.ca.issue_svid(&web_id(), None).unwrap();
    assert_eq!(svid.spiffe_id(), &web_id());
    assert_eq!(svid.chain().len(), 2, "leaf + intermediate");

    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain()[0]).unwrap();
    let uris: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [web_id().as_str()]);
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical, "keyUsage must be critical");
    assert_eq!(
        ku.value.flags, 1,
        "digitalSignature only (bit 0 in x509-parser's flags)"
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any && eku.other.is_empty());

    // Random positive serial, read back as issued.
    assert_eq!(leaf.raw_serial(), svid.serial());
    assert!(svid.serial()[0] & 0x80 == 0);
    assert!(svid.serial().len() >= 8);
    let other = d.ca.issue_svid(&web_id(), None).unwrap();
    assert_ne!(svid.serial(), other.serial());

    // Backdated for skew, notAfter = now + 1h, renewal at half life.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let issued = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (issued - 62..=issued - 58).contains(&nb),
        "{nb} vs {issued}"
    );
    assert!((issued + 3598..=issued + 3602).contains(&na));
    assert_eq!(
        svid.renew_at(),
        svid.certificate().not_before()
            + (svid
                .not_after()
                .duration_since(svid.certificate().not_before())
                .unwrap()
                / 2)
    );
    let to_renew = svid.renew_at().duration_since(before).unwrap();
    assert!(to_renew > Duration::from_secs(1700) && to_renew < Duration::from_secs(1800));

    // The intermediate is a CA limited to issuing leaves.
    let (_, int) = x509_parser::parse_x509_certificate(&svid.chain()[1]).unwrap();
    let bc = int.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = int.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    // Root: self-signed CA with the trust domain ID and no path.
    let (_, root) = x509_parser::parse_x509_certificate(d.ca.root_certificate()).unwrap();
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(root.subject(), root.issuer());
    let root_san = &root
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(root_san, &[GeneralName::URI("spiffe://cluster.local")]);

    assert_eq!(verify(&d, svid.chain()).unwrap(), web_id());
}

#[test]
fn ttl_must_be_between_one_minute_and_a_day() {
    let d = domain("cluster.local");
    for (secs, ok) in [
        (59, false),
        (60, true),
        (86_400, true),
        (86_401, false),
        (0, false),
    ] {
        let got = d.ca.issue_svid(&web_id(), Some(Duration::from_secs(secs)));
        match (ok, got) {
            (true, Ok(svid)) => {
                let life = svid
                    .not_after()
                    .duration_since(svid.certificate().not_before());
                assert_eq!(life.unwrap().as_secs(), secs + 60);
            }
            (false, Err(CaError::TtlOutOfRange { ttl })) => assert_eq!(ttl.as_secs(), secs),
            (_, got) => panic!("ttl {secs}s: {got:?}"),
        }
    }
}

#[test]
fn ca_refuses_foreign_and_pathless_ids() {
    let d = domain("cluster.local");
    let foreign = SpiffeId::parse("spiffe://other.org/ns/a/sa/b").unwrap();
    assert!(matches!(
        d.ca.issue_svid(&foreign, None),
        Err(CaError::ForeignTrustDomain { .. })
    ));
    assert!(matches!(
        d.ca.issue_svid(&td("cluster.local").id(), None),
        Err(CaError::IdWithoutPath(_))
    ));
}

#[test]
fn key_material_is_never_printed() {
    let d = domain("cluster.local");
    let svid = d.ca.issue_svid(&web_id(), None).unwrap();
    let pkcs8 = svid.key().private_key_der().secret_der().to_vec();
    let printed = format!("{svid:?} {:?} {:?}", svid.key(), d.ca);
    assert!(printed.contains("redacted"), "{printed}");
    // The private scalar sits near the end of the PKCS#8 document; no run of
    // it may show up, in hex or as a Debug byte list.
    let tail = &pkcs8[pkcs8.len() - 8..];
    let hex: String = tail.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!printed.contains(&hex), "{printed}");
    assert!(!printed.contains(&format!("{tail:?}")[1..20]), "{printed}");
}

#[test]
fn csr_issuance_ignores_requested_names() {
    let d = domain("cluster.local");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    // The CSR asks for a different identity, a DNS name and CA powers.
    let mut req = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    req.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = req.serialize_request(&key).unwrap();

    let cert = d.ca.issue_for_csr(&web_id(), None, csr.der()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain()[0]).unwrap();
    let names = &leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names, &[GeneralName::URI(web_id().as_str())]);
    assert!(!leaf.is_ca());
    // Bound to the CSR's key.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(verify(&d, cert.chain()).unwrap(), web_id());

    // A CSR whose signature does not verify is refused.
    let mut bad = csr.der().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        d.ca.issue_for_csr(&web_id(), None, &bad),
        Err(CaError::BadCsr(_))
    ));
}

#[test]
fn public_key_issuance_accepts_only_p256() {
    let d = domain("cluster.local");
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert =
        d.ca.issue_for_public_key(&web_id(), None, &p256.subject_public_key_info())
            .unwrap();
    assert_eq!(verify(&d, cert.chain()).unwrap(), web_id());

    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(matches!(
        d.ca.issue_for_public_key(&web_id(), None, &p384.subject_public_key_info()),
        Err(CaError::UnsupportedKeyAlgorithm)
    ));
    assert!(matches!(
        d.ca.issue_for_public_key(&web_id(), None, b"not der"),
        Err(CaError::BadPublicKey(_))
    ));
}

// ---- verifier ----

#[test]
fn valid_svid_verifies_for_both_roles() {
    let d = domain("cluster.local");
    let svid = d.ca.issue_svid(&web_id(), None).unwrap();
    for role in [PeerRole::Client, PeerRole::Server] {
        assert_eq!(
            verify_svid(svid.chain(), &d.bundles, now(), role).unwrap(),
            web_id()
        );
    }
    // Hand-built parameters are also a good SVID: the rejection tests below
    // start from these.
    let chain = sign(&d.ca, &good_params(web_id().as_str()));
    assert_eq!(verify(&d, &chain).unwrap(), web_id());
}

#[test]
fn rejects_two_uri_sans() {
    let d = domain("cluster.local");
    let mut p = good_params(web_id().as_str());
    p.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/default/sa/db"
            .try_into()
            .unwrap(),
    ));
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(
        matches!(err, SvidError::MultipleUriSans { count: 2 }),
        "{err}"
    );
}

#[test]
fn rejects_no_uri_san() {
    let d = domain("cluster.local");
    let mut p = good_params(web_id().as_str());
    p.subject_alt_names = vec![SanType::DnsName("web.default.svc".try_into().unwrap())];
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(matches!(err, SvidError::NoUriSan), "{err}");

    p.subject_alt_names.clear();
    p.distinguished_name.push(rcgen::DnType::CommonName, "web");
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(matches!(err, SvidError::NoUriSan), "{err}");
}

#[test]
fn rejects_ca_leaf() {
    let d = domain("cluster.local");
    let mut p = good_params(web_id().as_str());
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(matches!(err, SvidError::LeafIsCa), "{err}");
}

#[test]
fn rejects_a_domain_b_svid_against_a_bundle() {
    let a = domain("a.example");
    let b = domain("b.example");
    let id_b = SpiffeId::parse("spiffe://b.example/ns/x/sa/y").unwrap();
    let svid_b = b.ca.issue_svid(&id_b, None).unwrap();
    // Only A's bundle is known: B is an unknown trust domain.
    let err = verify(&a, svid_b.chain()).unwrap_err();
    assert!(
        matches!(&err, SvidError::UnknownTrustDomain(t) if t == "b.example"),
        "{err}"
    );
}

#[test]
fn rejects_a_claim_of_domain_b_signed_by_domain_a() {
    let a = domain("a.example");
    let b = domain("b.example");
    let mut both = a.bundles.clone();
    both.add_root(td("b.example"), b.ca.root_certificate())
        .unwrap();
    // A's CA signs a leaf claiming to be in B. Both roots are trusted, but
    // the chain may only end in B's bundle, which did not sign it.
    let chain = sign(&a.ca, &good_params("spiffe://b.example/ns/x/sa/y"));
    let err = verify_svid(&chain, &both, now(), PeerRole::Client).unwrap_err();
    assert!(
        matches!(
            &err,
            SvidError::BadChain { trust_domain, source: webpki::Error::UnknownIssuer }
                if trust_domain == "b.example"
        ),
        "{err}"
    );
    // The same leaf is fine for a plain X.509 check against A: only the
    // SPIFFE trust-domain binding rejects it.
    let a_only = {
        let mut t = TrustBundles::new();
        t.add_root(td("b.example"), a.ca.root_certificate())
            .unwrap();
        t
    };
    assert!(verify_svid(&chain, &a_only, now(), PeerRole::Client).is_ok());
}

#[test]
fn rejects_expired_and_not_yet_valid() {
    let d = domain("cluster.local");
    let svid =
        d.ca.issue_svid(&web_id(), Some(Duration::from_secs(60)))
            .unwrap();
    let later = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            + Duration::from_secs(3600),
    );
    let err = verify_svid(svid.chain(), &d.bundles, later, PeerRole::Client).unwrap_err();
    assert!(matches!(err, SvidError::Expired { .. }), "{err}");

    let mut p = good_params(web_id().as_str());
    let t = OffsetDateTime::now_utc();
    p.not_before = t - Duration::from_secs(7200);
    p.not_after = t - Duration::from_secs(3600);
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(matches!(err, SvidError::Expired { .. }), "{err}");

    p.not_before = t + Duration::from_secs(3600);
    p.not_after = t + Duration::from_secs(7200);
    let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
    assert!(matches!(err, SvidError::NotYetValid { .. }), "{err}");
}

#[test]
fn rejects_wrong_key_usage() {
    let d = domain("cluster.local");
    let cases = [
        (
            vec![KeyUsagePurpose::KeyEncipherment],
            "missing digitalSignature",
        ),
        (
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ],
            "keyCertSign",
        ),
        (
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
            "cRLSign",
        ),
        (vec![], "no keyUsage"),
    ];
    for (usages, what) in cases {
        let mut p = good_params(web_id().as_str());
        p.key_usages = usages;
        let err = verify(&d, &sign(&d.ca, &p)).unwrap_err();
        let ok = match what {
            "missing digitalSignature" => matches!(err, SvidError::MissingDigitalSignature),
            "no keyUsage" => matches!(err, SvidError::MissingKeyUsage),
            forbidden => matches!(err, SvidError::ForbiddenKeyUsage(f) if f == forbidden),
        };
        assert!(ok, "{what}: {err}");
    }
    // keyAgreement next to digitalSignature is allowed (X.509-SVID §4.3).
    let mut p = good_params(web_id().as_str());
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    assert!(verify(&d, &sign(&d.ca, &p)).is_ok());
}

#[test]
fn rejects_wrong_extended_key_usage_for_the_role() {
    let d = domain("cluster.local");
    let mut p = good_params(web_id().as_str());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let chain = sign(&d.ca, &p);
    assert!(verify_svid(&chain, &d.bundles, now(), PeerRole::Server).is_ok());
    let err = verify_svid(&chain, &d.bundles, now(), PeerRole::Client).unwrap_err();
    assert!(matches!(err, SvidError::BadChain { .. }), "{err}");
}

#[test]
fn rejects_non_canonical_and_non_spiffe_ids() {
    let d = domain("cluster.local");
    for (uri, want) in [
        (
            "spiffe://Cluster.local/ns/default/sa/web",
            SpiffeIdError::BadTrustDomainChar { ch: 'C' },
        ),
        (
            "SPIFFE://cluster.local/ns/default/sa/web",
            SpiffeIdError::WrongScheme,
        ),
        (
            "spiffe://cluster.local/ns/default/sa/w%65b",
            SpiffeIdError::BadPathChar { ch: '%' },
        ),
        (
            "https://cluster.local/ns/default/sa/web",
            SpiffeIdError::WrongScheme,
        ),
        (
            "spiffe://cluster.local/ns/default/sa/web/",
            SpiffeIdError::TrailingSlash,
        ),
    ] {
        let err = verify(&d, &sign(&d.ca, &good_params(uri))).unwrap_err();
        assert!(
            matches!(&err, SvidError::InvalidSpiffeId { uri: u, source } if u == uri && *source == want),
            "{uri}: {err}"
        );
    }
    let err = verify(&d, &sign(&d.ca, &good_params("spiffe://cluster.local"))).unwrap_err();
    assert!(matches!(err, SvidError::LeafIdWithoutPath(_)), "{err}");
}

#[test]
fn rejects_svid_of_an_unknown_ca_in_a_known_domain() {
    let d = domain("cluster.local");
    let impostor = domain("cluster.local");
    let svid = impostor.ca.issue_svid(&web_id(), None).unwrap();
    // Same trust domain name, same issuer DN, different keys: webpki finds
    // the name match and rejects the signature.
    let err = verify(&d, svid.chain()).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::BadChain {
                source: webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey,
                ..
            }
        ),
        "{err}"
    );
    // The leaf alone (no intermediate) does not chain either.
    let own = d.ca.issue_svid(&web_id(), None).unwrap();
    let err = verify(&d, &own.chain()[..1]).unwrap_err();
    assert!(matches!(err, SvidError::BadChain { .. }), "{err}");
}

#[test]
fn rejects_empty_chain_and_garbage() {
    let d = domain("cluster.local");
    assert!(matches!(verify(&d, &[]), Err(SvidError::NoCertificate)));
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    assert!(matches!(
        verify(&d, &[garbage]),
        Err(SvidError::BadEncoding(_))
    ));
}

#[test]
fn errors_map_to_rustls_errors_that_keep_the_reason() {
    use rustls::{CertificateError, Error};
    let e: Error = SvidError::MultipleUriSans { count: 2 }.into();
    match e {
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            let inner = other.0.downcast_ref::<SvidError>().unwrap();
            assert!(matches!(inner, SvidError::MultipleUriSans { count: 2 }));
        }
        other => panic!("{other:?}"),
    }
    let e: Error = SvidError::Expired {
        not_after: now(),
        now: now(),
    }
    .into();
    assert_eq!(e, Error::InvalidCertificate(CertificateError::Expired));
}

// ---- TLS handshakes over an in-memory duplex ----

struct Outcome {
    client: io::Result<()>,
    server: io::Result<SpiffeId>,
}

/// The rustls error inside a tokio-rustls I/O error.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

fn svid_error(e: &io::Error) -> Option<&SvidError> {
    super::svid_error_of(e)
}

/// Runs one handshake plus a byte each way; the server reports the client's
/// SPIFFE ID as the application would read it.
async fn handshake(client: ClientConfig, server: ServerConfig) -> Outcome {
    let (c_io, s_io) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(Arc::new(client));
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let name = ServerName::try_from("10.0.0.1").unwrap();
    let client = async move {
        let mut tls = connector.connect(name, c_io).await?;
        tls.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok(())
    };
    let server = async move {
        let mut tls = acceptor.accept(s_io).await?;
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let id = peer_spiffe_id(conn).map_err(io::Error::other)?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        tls.write_all(b"y").await?;
        tls.flush().await?;
        Ok(id)
    };
    let (client, server) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(client, server)
    })
    .await
    .expect("handshake hung");
    Outcome { client, server }
}

fn db_id() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/default/sa/db").unwrap()
}

struct Mesh {
    d: Domain,
    web: Svid,
    db: Svid,
}

fn mesh() -> Mesh {
    let d = domain("cluster.local");
    let web = d.ca.issue_svid(&web_id(), None).unwrap();
    let db = d.ca.issue_svid(&db_id(), None).unwrap();
    Mesh { d, web, db }
}

impl Mesh {
    fn bundles(&self) -> Arc<TrustBundles> {
        Arc::new(self.d.bundles.clone())
    }
    fn server(&self) -> ServerConfig {
        server_config(&self.db, self.bundles(), AcceptedClients::Workloads).unwrap()
    }
    fn client(&self, expected: Vec<SpiffeId>) -> ClientConfig {
        client_config(&self.web, self.bundles(), expected).unwrap()
    }
}

#[tokio::test]
async fn mtls_succeeds_and_server_learns_client_id() {
    let m = mesh();
    let out = handshake(m.client(vec![db_id()]), m.server()).await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), web_id());
}

#[tokio::test]
async fn mtls_accepts_any_of_several_expected_ids() {
    let m = mesh();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/x/sa/y").unwrap();
    let out = handshake(m.client(vec![other, db_id()]), m.server()).await;
    assert_eq!(out.server.unwrap(), web_id());
}

#[tokio::test]
async fn mtls_fails_without_client_certificate() {
    let m = mesh();
    let client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            m.bundles(),
            vec![db_id()],
        )))
        .with_no_client_auth();
    let out = handshake(client, m.server()).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn mtls_fails_with_client_of_another_trust_domain() {
    let m = mesh();
    let other = domain("other.example");
    let intruder = other
        .ca
        .issue_svid(
            &SpiffeId::parse("spiffe://other.example/ns/default/sa/web").unwrap(),
            None,
        )
        .unwrap();
    // The intruder trusts our server, but our server does not know its domain.
    let client = client_config(&intruder, m.bundles(), vec![db_id()]).unwrap();
    let out = handshake(client, m.server()).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(svid_error(&err), Some(SvidError::UnknownTrustDomain(t)) if t == "other.example"),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn mtls_fails_when_server_is_not_the_expected_id() {
    let m = mesh();
    let out = handshake(m.client(vec![web_id()]), m.server()).await;
    let err = out.client.unwrap_err();
    let reason = svid_error(&err).unwrap();
    assert!(
        matches!(reason, SvidError::UnexpectedPeer { got, .. } if *got == db_id()),
        "{err}"
    );
    assert_eq!(
        reason.to_string(),
        "the peer is spiffe://cluster.local/ns/default/sa/db, but only \
         spiffe://cluster.local/ns/default/sa/web may serve this destination"
    );
    assert!(out.server.is_err());

    // An empty expectation accepts nobody.
    let out = handshake(m.client(vec![]), m.server()).await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(svid_error(&err), Some(SvidError::UnexpectedPeer { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn mtls_refuses_tls12() {
    let m = mesh();
    // A TLS 1.2-only client (rustls is built with TLS 1.2 for tests only).
    let client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            m.bundles(),
            vec![db_id()],
        )))
        .with_client_auth_cert(
            m.web.chain().to_vec(),
            m.web.key().private_key_der().clone_key(),
        )
        .unwrap();
    let out = handshake(client, m.server()).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
            ))
        ),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn tunnel_configs_disable_resumption() {
    let m = mesh();
    let server = m.server();
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    // Two handshakes with one client config: both are full handshakes.
    let client = Arc::new(m.client(vec![db_id()]));
    let server = Arc::new(server);
    for _ in 0..2 {
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(client.clone());
        let acceptor = TlsAcceptor::from(server.clone());
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let (c, s) = tokio::join!(connector.connect(name, c_io), acceptor.accept(s_io));
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        assert_eq!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
}

#[tokio::test]
async fn tunnel_servers_refuse_a_node_credential_that_the_ca_service_accepts() {
    let m = mesh();
    let node_id = SpiffeId::parse("spiffe://cluster.local/ambit/node/node0").unwrap();
    let node = m.d.ca.issue_svid(&node_id, None).unwrap();
    let client = || client_config(&node, m.bundles(), vec![db_id()]).unwrap();

    let out = handshake(client(), m.server()).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(svid_error(&err), Some(SvidError::NotAWorkload(id)) if *id == node_id),
        "{err}"
    );
    assert!(out.client.is_err());

    let any = server_config(&m.db, m.bundles(), AcceptedClients::Any).unwrap();
    let out = handshake(client(), any).await;
    assert_eq!(out.server.unwrap(), node_id);
}

#[test]
fn a_ca_restarted_from_its_kept_root_keeps_the_bundle_and_old_svids_valid() {
    let td = td("cluster.local");
    let root = CertificateAuthority::generate_root(&td).unwrap();
    assert!(root.key.contains("PRIVATE KEY"));
    let first = CertificateAuthority::from_root(td.clone(), &root).unwrap();
    let before = first.issue_svid(&web_id(), None).unwrap();
    drop(first);
    let second = CertificateAuthority::from_root(td.clone(), &root).unwrap();
    let after = second.issue_svid(&web_id(), None).unwrap();

    let mut bundles = TrustBundles::new();
    bundles
        .add_root(td.clone(), second.root_certificate())
        .unwrap();
    for svid in [&before, &after] {
        let id = verify_svid(svid.chain(), &bundles, now(), PeerRole::Client).unwrap();
        assert_eq!(id, web_id());
    }
    // The intermediates differ (each start signs its own), the root is one.
    assert_ne!(before.chain()[1], after.chain()[1]);
}

#[test]
fn a_root_that_does_not_fit_is_refused_with_the_reason() {
    let td = td("cluster.local");
    let root = CertificateAuthority::generate_root(&td).unwrap();
    let other = CertificateAuthority::generate_root(&td).unwrap();
    let reason = |root: &RootPem, td: &TrustDomain| {
        CertificateAuthority::from_root(td.clone(), root)
            .unwrap_err()
            .to_string()
    };

    let mismatched = RootPem {
        cert: root.cert.clone(),
        key: other.key.clone(),
    };
    assert!(
        reason(&mismatched, &td).contains("the key does not belong to the certificate"),
        "{}",
        reason(&mismatched, &td)
    );
    let foreign = reason(&root, &self::td("other.example"));
    assert!(
        foreign.contains("not a root of trust domain other.example"),
        "{foreign}"
    );

    // A self-signed certificate of the trust domain that is not a CA.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI("spiffe://cluster.local".try_into().unwrap())];
    let not_ca = RootPem {
        cert: params.self_signed(&key).unwrap().pem(),
        key: zeroize::Zeroizing::new(key.serialize_pem()),
    };
    assert!(
        reason(&not_ca, &td).contains("not a CA"),
        "{}",
        reason(&not_ca, &td)
    );
    let garbage = RootPem {
        cert: "not a certificate".into(),
        key: root.key.clone(),
    };
    assert!(
        reason(&garbage, &td).contains("not PEM"),
        "{}",
        reason(&garbage, &td)
    );
}
