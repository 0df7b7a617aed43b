//! The C2SP x509-limbo vectors (shared/testdata/x509-limbo.json) run
//! through the same webpki path building the SPIFFE verifier uses, so the
//! X.509 layer under our SPIFFE checks is tested against cases nobody here
//! wrote. Cases that need something webpki does not implement are skipped
//! and counted by reason; disagreements webpki is known to have on purpose
//! are listed in `ALLOWED_MISMATCHES` with the reason for each.

use std::{collections::BTreeMap, path::PathBuf};

use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, ServerName, UnixTime, pem::PemObject,
};
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Limbo feature tags webpki does not implement. Limbo asks consumers to
/// skip cases tagged with features they do not support.
const SKIPPED_FEATURES: &[(&str, &str)] = &[
    (
        "max-chain-depth",
        "max-chain-depth: webpki has no configurable depth limit",
    ),
    (
        "has-policy-constraints",
        "certificate policies: webpki does no policy processing",
    ),
    (
        "name-constraint-dn",
        "directoryName constraints: webpki rejects them all (fails closed)",
    ),
    (
        "rfc5280-incompatible-with-webpki",
        "tagged by limbo as incompatible with webpki",
    ),
    (
        "pedantic-webpki-eku",
        "pedantic CABF EKU profile: webpki is not a certificate linter",
    ),
    (
        "pedantic-webpki-subscriber-key",
        "pedantic CABF key profile: webpki is not a certificate linter",
    ),
    (
        "pedantic-public-suffix-wildcard",
        "public-suffix wildcards: webpki has no public suffix list",
    ),
    (
        "pedantic-serial-number",
        "pedantic serial-number profile: webpki is not a certificate linter",
    ),
    (
        "pedantic-rfc5280",
        "pedantic RFC 5280 profile: webpki is not a certificate linter",
    ),
];

/// Cases webpki runs but answers differently from limbo, by design, grouped
/// by the reason. An id that starts agreeing fails the test, so this list
/// can only shrink when webpki changes.
const ALLOWED_MISMATCHES: &[(&str, &[&str])] = &[
    (
        "a trust anchor is only subject, key and name constraints (RFC 5280 6.1.1): \
         webpki does not check a root's validity period, basicConstraints, AKI/SKI, \
         critical extensions, subject or key size",
        &[
            "rfc5280::validity::expired-root",
            "rfc5280::root-missing-basic-constraints",
            "rfc5280::root-non-critical-basic-constraints",
            "rfc5280::root-inconsistent-ca-extensions",
            "rfc5280::unknown-critical-extension-root",
            "rfc5280::aki::critical-aki",
            "rfc5280::ski::critical-ski",
            "rfc5280::ski::root-missing-ski",
            "rfc5280::ca-empty-subject",
            "webpki::aki::root-with-aki-missing-keyidentifier",
            "webpki::aki::root-with-aki-authoritycertissuer",
            "webpki::aki::root-with-aki-authoritycertserialnumber",
            "webpki::aki::root-with-aki-all-fields",
            "webpki::aki::root-with-aki-ski-mismatch",
            "webpki::forbidden-rsa-not-divisible-by-8-in-root",
        ],
    ),
    (
        "AKI/SKI presence is a rule for issuers; webpki builds paths by name and signature",
        &[
            "rfc5280::aki::leaf-missing-aki",
            "rfc5280::aki::intermediate-missing-aki",
            "rfc5280::ski::intermediate-missing-ski",
        ],
    ),
    (
        "the subject CN is ignored, names come only from SANs (CABF CN/SAN consistency \
         is a rule for issuers)",
        &[
            "webpki::cn::ipv4-hex-mismatch",
            "webpki::cn::ipv4-leading-zeros-mismatch",
            "webpki::cn::ipv6-uppercase-mismatch",
            "webpki::cn::ipv6-uncompressed-mismatch",
            "webpki::cn::ipv6-non-rfc5952-mismatch",
            "webpki::cn::punycode-not-in-san",
            "webpki::cn::utf8-vs-punycode-mismatch",
            "webpki::cn::not-in-san",
            "webpki::cn::case-mismatch",
        ],
    ),
    (
        "SAN criticality and DNS label syntax (underscores) are issuance rules webpki \
         does not lint",
        &[
            "rfc5280::san::noncritical-with-empty-subject",
            "rfc5280::san::underscore-dns",
            "webpki::san::san-critical-with-nonempty-subject",
        ],
    ),
    (
        "lenient extension handling: non-critical AIA is not parsed; NameConstraints on \
         an end entity is ignored; a leading-period dNSName constraint and empty \
         subtrees are accepted",
        &[
            "webpki::malformed-aia",
            "rfc5280::nc::not-allowed-in-ee-noncritical",
            "rfc5280::nc::not-allowed-in-ee-critical",
            "rfc5280::nc::invalid-dnsname-leading-period",
            "webpki::nc::intermediate-permitted-excluded-subtrees-both-null",
            "webpki::nc::intermediate-permitted-excluded-subtrees-both-empty-sequences",
        ],
    ),
    (
        "self-issued intermediates get no RFC 5280 exemption from pathLen or name constraints",
        &[
            "pathlen::self-issued-certs-pathlen",
            "rfc5280::nc::permitted-self-issued",
        ],
    ),
    (
        "a CA certificate is never accepted as the end entity (CaUsedAsEndEntity); \
         X.509-SVID 5.2 requires exactly this of Ambit",
        &[
            "pathlen::validation-ignores-pathlen-in-leaf",
            "rfc5280::ca-as-leaf",
        ],
    ),
    (
        "keyUsage is not checked by webpki (Ambit's SPIFFE leaf check rejects keyCertSign)",
        &["rfc5280::leaf-ku-keycertsign"],
    ),
    (
        "CRL profile: no CRLNumber requirement or criticality check, and no cRLSign check \
         when the CRL issuer is the trust anchor (Ambit uses no CRLs)",
        &[
            "crl::crlnumber-missing",
            "crl::crlnumber-critical",
            "crl::issuer-missing-crlsign",
        ],
    ),
];

fn allowed_reason(id: &str) -> Option<&'static str> {
    ALLOWED_MISMATCHES
        .iter()
        .find(|(_, ids)| ids.contains(&id))
        .map(|(reason, _)| *reason)
}

#[derive(Deserialize)]
struct Limbo {
    version: u32,
    testcases: Vec<Testcase>,
}

#[derive(Deserialize)]
struct Testcase {
    id: String,
    #[serde(default)]
    features: Vec<String>,
    validation_kind: String,
    trusted_certs: Vec<String>,
    untrusted_intermediates: Vec<String>,
    peer_certificate: String,
    validation_time: Option<String>,
    signature_algorithms: Vec<String>,
    key_usage: Vec<String>,
    extended_key_usage: Vec<String>,
    expected_result: String,
    expected_peer_name: Option<PeerName>,
    expected_peer_names: Vec<PeerName>,
    max_chain_depth: Option<u32>,
    #[serde(default)]
    crls: Vec<String>,
}

#[derive(Deserialize)]
struct PeerName {
    kind: String,
    value: String,
}

enum Outcome {
    Success,
    Failure(String),
    Skip(&'static str),
}

fn limbo_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/x509-limbo.json")
}

/// Why a case cannot be run against webpki, if it cannot.
fn skip_reason(tc: &Testcase) -> Option<&'static str> {
    if tc.validation_kind != "SERVER" && tc.validation_kind != "CLIENT" {
        return Some("validation kind other than SERVER/CLIENT");
    }
    for (feature, reason) in SKIPPED_FEATURES {
        if tc.features.iter().any(|f| f == feature) {
            return Some(reason);
        }
    }
    if tc.max_chain_depth.is_some() {
        return Some("max-chain-depth: webpki has no configurable depth limit");
    }
    if !tc.signature_algorithms.is_empty() {
        return Some("signature_algorithms constraint: not expressible per call");
    }
    if !tc.key_usage.is_empty() {
        return Some("key_usage constraint: webpki does not check keyUsage");
    }
    if tc.expected_peer_names.iter().any(|n| n.kind == "RFC822")
        || tc
            .expected_peer_name
            .as_ref()
            .is_some_and(|n| n.kind == "RFC822")
    {
        return Some(
            "RFC822 names (e-mail SANs and rfc822Name constraints): not supported by webpki",
        );
    }
    if !tc.expected_peer_names.is_empty() {
        return Some("CLIENT-side expected peer names: webpki matches one name per call");
    }
    let eku_ok = match tc.extended_key_usage.as_slice() {
        [] => true,
        [one] => one == "serverAuth" || one == "clientAuth",
        _ => false,
    };
    if !eku_ok {
        return Some("extended_key_usage other than one of serverAuth/clientAuth");
    }
    None
}

fn evaluate(tc: &Testcase) -> Outcome {
    if let Some(reason) = skip_reason(tc) {
        return Outcome::Skip(reason);
    }
    let pem_cert = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes());
    let Ok(leaf_der) = pem_cert(&tc.peer_certificate) else {
        return Outcome::Failure("peer certificate: bad PEM".into());
    };
    let Ok(intermediates) = tc
        .untrusted_intermediates
        .iter()
        .map(|p| pem_cert(p))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Outcome::Failure("intermediate: bad PEM".into());
    };
    let anchor_ders: Vec<_> = tc
        .trusted_certs
        .iter()
        .filter_map(|p| pem_cert(p).ok())
        .collect();
    // Like the upstream webpki harness: a root webpki cannot use as an anchor
    // is left out, which typically makes the case fail.
    let anchors: Vec<_> = anchor_ders
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();

    let crls = match tc
        .crls
        .iter()
        .map(|p| {
            let der = CertificateRevocationListDer::from_pem_slice(p.as_bytes())
                .map_err(|e| format!("CRL PEM: {e:?}"))?;
            webpki::OwnedCertRevocationList::from_der(&der)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| format!("CRL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(crls) => crls,
        Err(e) => return Outcome::Failure(e),
    };
    let crl_refs: Vec<_> = crls.iter().collect();
    let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
        .ok()
        .map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                .build()
        });

    let now = match &tc.validation_time {
        Some(t) => {
            let t = OffsetDateTime::parse(t, &Rfc3339).expect("validation_time");
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(t.unix_timestamp()).expect("time before 1970"),
            ))
        }
        None => UnixTime::now(),
    };
    let usage = match (
        tc.extended_key_usage.first().map(String::as_str),
        tc.validation_kind.as_str(),
    ) {
        (Some("clientAuth"), _) | (None, "CLIENT") => webpki::KeyUsage::client_auth(),
        _ => webpki::KeyUsage::server_auth(),
    };

    let Ok(leaf) = webpki::EndEntityCert::try_from(&leaf_der) else {
        return Outcome::Failure("peer certificate: not parseable by webpki".into());
    };
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    if let Err(e) = leaf.verify_for_usage(
        algorithms.all,
        &anchors,
        &intermediates,
        now,
        usage,
        revocation,
        None,
    ) {
        return Outcome::Failure(format!("path: {e}"));
    }
    if let Some(name) = &tc.expected_peer_name {
        let Ok(server_name) = ServerName::try_from(name.value.as_str()) else {
            return Outcome::Failure(format!(
                "expected name {:?} is not a valid name",
                name.value
            ));
        };
        if let Err(e) = leaf.verify_is_valid_for_subject_name(&server_name) {
            return Outcome::Failure(format!("name {}: {e}", name.value));
        }
    }
    Outcome::Success
}

#[test]
fn x509_limbo() {
    let path = limbo_path();
    let Ok(json) = std::fs::read(&path) else {
        // CI always has shared/ next to the checkout; a bare clone may not.
        assert!(
            std::env::var_os("CI").is_none(),
            "x509-limbo vectors missing at {}",
            path.display()
        );
        eprintln!("x509-limbo: skipped, {} not found", path.display());
        return;
    };
    let limbo: Limbo = serde_json::from_slice(&json).expect("x509-limbo.json does not parse");
    assert_eq!(limbo.version, 1, "unknown limbo schema version");

    let mut passed = 0;
    let mut allowed = Vec::new();
    let mut unexpected = Vec::new();
    let mut stale = Vec::new();
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    for tc in &limbo.testcases {
        let (agrees, detail) = match evaluate(tc) {
            Outcome::Skip(reason) => {
                *skipped.entry(reason).or_default() += 1;
                if allowed_reason(&tc.id).is_some() {
                    stale.push(format!("{} is allow-listed but skipped", tc.id));
                }
                continue;
            }
            Outcome::Success => (tc.expected_result == "SUCCESS", "validated".to_owned()),
            Outcome::Failure(why) => (tc.expected_result == "FAILURE", why),
        };
        match (agrees, allowed_reason(&tc.id)) {
            (true, None) => passed += 1,
            (true, Some(_)) => {
                passed += 1;
                stale.push(format!(
                    "{} now agrees with limbo: remove it from the allow-list",
                    tc.id
                ));
            }
            (false, Some(reason)) => allowed.push(format!("{}: {reason}", tc.id)),
            (false, None) => unexpected.push(format!(
                "{} (expected {}, features {:?}): {detail}",
                tc.id, tc.expected_result, tc.features
            )),
        }
    }
    for (_, ids) in ALLOWED_MISMATCHES {
        for id in *ids {
            if !limbo.testcases.iter().any(|tc| tc.id == *id) {
                stale.push(format!("{id} is allow-listed but not in the vectors"));
            }
        }
    }

    let skipped_total: usize = skipped.values().sum();
    for (reason, n) in &skipped {
        println!("  skipped {n}: {reason}");
    }
    for line in &allowed {
        println!("  allowed mismatch {line}");
    }
    for line in &unexpected {
        println!("  MISMATCH {line}");
    }
    println!(
        "x509-limbo: {passed} passed, {} failed(mismatch), {skipped_total} skipped",
        allowed.len() + unexpected.len()
    );
    println!(
        "x509-limbo: {} mismatches are allow-listed webpki behaviour, {} are not",
        allowed.len(),
        unexpected.len()
    );
    assert!(
        unexpected.is_empty(),
        "{} x509-limbo cases disagree with webpki:\n{}",
        unexpected.len(),
        unexpected.join("\n")
    );
    assert!(stale.is_empty(), "stale allow-list:\n{}", stale.join("\n"));
}
