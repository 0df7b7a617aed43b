//! SPIFFE IDs and trust domain names, parsed exactly as the SPIFFE ID spec
//! says and only in canonical form.
//!
//! Canonical matters because IDs are compared as strings by policy and audit:
//! if `spiffe://Cluster.Local/ns/a/sa/b` or `/ns/%61/sa/b` were accepted, two
//! spellings would name one workload and a policy written against one would
//! miss the other. So anything that is not already canonical is rejected, not
//! normalised.

use std::{borrow::Borrow, fmt, str::FromStr};

use thiserror::Error;

const SCHEME_PREFIX: &str = "spiffe://";

/// Longest SPIFFE ID implementations must accept (SPIFFE ID spec §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name: the URI host limit (SPIFFE ID spec §2.3).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a canonical SPIFFE ID or trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {len} bytes long; the maximum is {MAX_SPIFFE_ID_LEN}")]
    TooLong { len: usize },
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes long; the maximum is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain must not carry a port or userinfo (found {ch:?})")]
    PortOrUserinfo { ch: char },
    #[error("SPIFFE ID must not have a query or fragment (found {ch:?})")]
    QueryOrFragment { ch: char },
    #[error(
        "trust domain contains {ch:?}; only lowercase letters, digits, '.', '-' and '_' \
         are allowed (uppercase and percent-encoding are not canonical)"
    )]
    BadTrustDomainChar { ch: char },
    #[error(
        "path contains {ch:?}; segments may only use letters, digits, '.', '-' and '_' \
         (percent-encoding is not canonical)"
    )]
    BadPathChar { ch: char },
    #[error("path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path ends with '/'")]
    TrailingSlash,
}

/// A validated trust domain name, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID of the trust domain itself, `spiffe://<td>` (used by signing
    /// certificates, which must not carry a path).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}", self.0),
            path_start: SCHEME_PREFIX.len() + self.0.len(),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

// Lets maps keyed by TrustDomain be queried with the &str from a SpiffeId.
impl Borrow<str> for TrustDomain {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A canonical SPIFFE ID, `spiffe://<trust-domain>[/<segment>...]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset of the path (== uri.len() when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID; non-canonical spellings are errors.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        // Case-sensitive on purpose: "SPIFFE://" is not canonical.
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            uri: s.to_owned(),
            path_start: SCHEME_PREFIX.len() + td_len,
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`, the Kubernetes
    /// workload form. Each name must be exactly one path segment: a '/' in
    /// a name would forge extra segments that `ns/<prefix>/*` policies match.
    pub fn kubernetes(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Self::parse(&format!(
            "{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain name, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The path including its leading '/', or "" for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The namespace, when the ID has exactly the Kubernetes form.
    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(ns, _)| ns)
    }

    /// The service account, when the ID has exactly the Kubernetes form.
    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(_, sa)| sa)
    }

    fn kubernetes_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    for ch in td.chars() {
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' | '@' => return Err(SpiffeIdError::PortOrUserinfo { ch }),
            '?' | '#' => return Err(SpiffeIdError::QueryOrFragment { ch }),
            _ => return Err(SpiffeIdError::BadTrustDomainChar { ch }),
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so a non-empty path starts with it.
    let body = &path[1..];
    if body.is_empty() || body.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    body.split('/').try_for_each(validate_segment)
}

/// One path segment: non-empty, not "." or "..", only [A-Za-z0-9._-].
fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    for ch in segment.chars() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '?' | '#' => return Err(SpiffeIdError::QueryOrFragment { ch }),
            _ => return Err(SpiffeIdError::BadPathChar { ch }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    #[test]
    fn parse_table() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 12));
        let too_long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 11));
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        // (input, Ok((trust domain, path)) or the error)
        type Case<'a> = (&'a str, Result<(&'a str, &'a str), SpiffeIdError>);
        let cases: &[Case] = &[
            // Valid.
            ("spiffe://cluster.local", Ok(("cluster.local", ""))),
            (
                "spiffe://cluster.local/ns/default/sa/web",
                Ok(("cluster.local", "/ns/default/sa/web")),
            ),
            ("spiffe://a-b_c.9/x", Ok(("a-b_c.9", "/x"))),
            (
                "spiffe://td/A.b-C_d/..x/x..",
                Ok(("td", "/A.b-C_d/..x/x..")),
            ),
            ("spiffe://td/.../", Err(E::TrailingSlash)),
            (&long_path, Ok(("td", &long_path[11..]))),
            // Scheme.
            ("", Err(E::Empty)),
            ("SPIFFE://td/x", Err(E::WrongScheme)),
            ("Spiffe://td/x", Err(E::WrongScheme)),
            ("spiffe:/td/x", Err(E::WrongScheme)),
            ("https://td/x", Err(E::WrongScheme)),
            ("td/x", Err(E::WrongScheme)),
            // Trust domain.
            ("spiffe://", Err(E::MissingTrustDomain)),
            ("spiffe:///x", Err(E::MissingTrustDomain)),
            (
                "spiffe://Cluster.local/x",
                Err(E::BadTrustDomainChar { ch: 'C' }),
            ),
            ("spiffe://td:8080/x", Err(E::PortOrUserinfo { ch: ':' })),
            ("spiffe://user@td/x", Err(E::PortOrUserinfo { ch: '@' })),
            ("spiffe://t%64/x", Err(E::BadTrustDomainChar { ch: '%' })),
            ("spiffe://td?q", Err(E::QueryOrFragment { ch: '?' })),
            ("spiffe://td#f", Err(E::QueryOrFragment { ch: '#' })),
            ("spiffe://tö/x", Err(E::BadTrustDomainChar { ch: 'ö' })),
            (&long_td, Err(E::TrustDomainTooLong { len: 256 })),
            // Path.
            ("spiffe://td/", Err(E::TrailingSlash)),
            ("spiffe://td/a/", Err(E::TrailingSlash)),
            ("spiffe://td/.../", Err(E::TrailingSlash)),
            ("spiffe://td//a", Err(E::EmptySegment)),
            ("spiffe://td/a//b", Err(E::EmptySegment)),
            ("spiffe://td/./a", Err(E::DotSegment)),
            ("spiffe://td/a/..", Err(E::DotSegment)),
            ("spiffe://td/a%2Fb", Err(E::BadPathChar { ch: '%' })),
            ("spiffe://td/a b", Err(E::BadPathChar { ch: ' ' })),
            ("spiffe://td/a:b", Err(E::BadPathChar { ch: ':' })),
            ("spiffe://td/a?x=1", Err(E::QueryOrFragment { ch: '?' })),
            ("spiffe://td/a#frag", Err(E::QueryOrFragment { ch: '#' })),
            ("spiffe://td/ä", Err(E::BadPathChar { ch: 'ä' })),
            (&too_long, Err(E::TooLong { len: 2049 })),
        ];
        for (input, want) in cases {
            let got = SpiffeId::parse(input);
            match (want, &got) {
                (Ok((td, path)), Ok(id)) => {
                    assert_eq!(id.as_str(), *input);
                    assert_eq!(id.trust_domain(), *td, "{input}");
                    assert_eq!(id.path(), *path, "{input}");
                    assert_eq!(id.to_string(), *input);
                }
                (Err(want), Err(got)) => assert_eq!(want, got, "{input}"),
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn kubernetes_form() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::kubernetes(&td, "default", "web").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("web"));
        assert_eq!(
            id,
            "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
        );

        assert_eq!(SpiffeId::kubernetes(&td, "", "web"), Err(E::EmptySegment));
        assert_eq!(SpiffeId::kubernetes(&td, "a", ".."), Err(E::DotSegment));
        // A '/' would forge segments; the constructor refuses it.
        assert_eq!(
            SpiffeId::kubernetes(&td, "a/sa/b", "c"),
            Err(E::BadPathChar { ch: '/' })
        );
        assert_eq!(
            SpiffeId::kubernetes(&td, "a", "b/c"),
            Err(E::BadPathChar { ch: '/' })
        );
        assert_eq!(
            SpiffeId::kubernetes(&td, "kube-system", "Default_SA.1"),
            Ok(SpiffeId::parse("spiffe://cluster.local/ns/kube-system/sa/Default_SA.1").unwrap())
        );

        for not_k8s in [
            "spiffe://td",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/ns/a/xx/b",
            "spiffe://td/xx/a/sa/b",
        ] {
            let id = SpiffeId::parse(not_k8s).unwrap();
            assert_eq!(id.namespace(), None, "{not_k8s}");
            assert_eq!(id.service_account(), None, "{not_k8s}");
        }
    }

    #[test]
    fn trust_domain() {
        let td: TrustDomain = "example.org".parse().unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(td.id().path(), "");
        assert_eq!(td.id().trust_domain(), "example.org");
        assert_eq!(TrustDomain::new(""), Err(E::MissingTrustDomain));
        assert_eq!(
            TrustDomain::new("spiffe://x"),
            Err(E::PortOrUserinfo { ch: ':' })
        );
        assert_eq!(
            TrustDomain::new("Example.org"),
            Err(E::BadTrustDomainChar { ch: 'E' })
        );
    }
}
