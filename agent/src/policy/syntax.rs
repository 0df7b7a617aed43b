//! The leaf values of a policy document: principals, ports and names.
//!
//! Each function returns the reason as text; the deserializer turns it into
//! an error at the value's line and column.

use super::model::{PortRange, PrincipalPattern};
use crate::identity::SpiffeId;

/// `*`, a canonical SPIFFE ID, or a SPIFFE ID prefix followed by `*`.
///
/// The prefix must contain the whole trust domain and the '/' after it
/// (`spiffe://cluster.local/*`, `spiffe://cluster.local/ns/ops/*`,
/// `spiffe://cluster.local/ns/ops/sa/web-*`): a wildcard inside the trust
/// domain (`spiffe://clus*`) would also match other trust domains.
/// Whatever precedes the `*` must itself be a valid ID once a trailing '/'
/// is dropped, so a typo such as `spiffe://td/ns//*` is caught here.
pub fn principal(text: &str) -> Result<PrincipalPattern, String> {
    if text == "*" {
        return Ok(PrincipalPattern::Any);
    }
    let Some(prefix) = text.strip_suffix('*') else {
        if text.contains('*') {
            return Err(format!(
                "principal {text:?}: '*' is only allowed at the end (prefix match) or alone"
            ));
        }
        return SpiffeId::parse(text)
            .map(PrincipalPattern::Exact)
            .map_err(|e| format!("principal {text:?} is not a canonical SPIFFE ID: {e}"));
    };
    if prefix.contains('*') {
        return Err(format!(
            "principal {text:?}: '*' is only allowed once, at the end"
        ));
    }
    let as_id = prefix.strip_suffix('/').unwrap_or(prefix);
    let id = SpiffeId::parse(as_id)
        .map_err(|e| format!("principal {text:?}: {as_id:?} before the '*' is not valid: {e}"))?;
    if id.path().is_empty() && !prefix.ends_with('/') {
        return Err(format!(
            "principal {text:?}: a wildcard must follow the whole trust domain and a '/' \
             (e.g. \"spiffe://{}/*\")",
            id.trust_domain()
        ));
    }
    Ok(PrincipalPattern::Prefix(prefix.to_owned()))
}

/// A port number (1-65535) or an inclusive range `"FIRST-LAST"`.
pub fn port_text(text: &str) -> Result<PortRange, String> {
    let bad = |why: &str| format!("port {text:?} {why}");
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (first, last),
        None => (text, text),
    };
    let number = |s: &str| {
        // `u16::from_str` accepts a leading '+'; a port list has no use for it.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("is not a port number or a range like \"9000-9100\""));
        }
        s.parse::<u16>()
            .map_err(|_| bad("is out of range (1-65535)"))
    };
    let (first, last) = (number(first)?, number(last)?);
    if first == 0 {
        return Err(bad("is out of range (1-65535)"));
    }
    PortRange::new(first, last).ok_or_else(|| bad("is an empty range (first > last)"))
}

pub fn port_number(n: u64) -> Result<PortRange, String> {
    u16::try_from(n)
        .ok()
        .and_then(PortRange::single)
        .ok_or_else(|| format!("port {n} is out of range (1-65535)"))
}

/// A Kubernetes namespace name (an RFC 1123 label): lowercase letters,
/// digits and '-', at most 63 characters, starting and ending with a letter
/// or digit. Checked so that `namespaces: [Default]` fails loudly instead
/// of silently matching nothing.
pub fn namespace(text: &str) -> Result<String, String> {
    if text.len() > 63 || !is_dns_label(text) {
        return Err(format!(
            "namespace {text:?} is not a valid Kubernetes namespace name \
             (lowercase letters, digits and '-', at most 63 characters)"
        ));
    }
    Ok(text.to_owned())
}

/// A Kubernetes object name (an RFC 1123 subdomain).
pub fn object_name(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 253 || !text.split('.').all(is_dns_label) {
        return Err(format!(
            "name {text:?} is not a valid Kubernetes object name \
             (lowercase letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    Ok(text.to_owned())
}

/// A selector label: Kubernetes allows no wildcard there, and Istio
/// refuses one, so `app: "*"` is an error rather than a literal match.
pub fn selector_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("selector label keys must not be empty".into());
    }
    if key.contains('*') || value.contains('*') {
        return Err(format!(
            "selector label {key}={value}: wildcards are not supported in selectors"
        ));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals() {
        let ok = [
            ("*", "*"),
            (
                "spiffe://cluster.local/ns/a/sa/b",
                "spiffe://cluster.local/ns/a/sa/b",
            ),
            ("spiffe://cluster.local/*", "spiffe://cluster.local/*"),
            (
                "spiffe://cluster.local/ns/ops/*",
                "spiffe://cluster.local/ns/ops/*",
            ),
            ("spiffe://td/ns/a/sa/web-*", "spiffe://td/ns/a/sa/web-*"),
        ];
        for (input, shown) in ok {
            let p = principal(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(p.to_string(), shown);
        }
        for bad in [
            "",
            "**",
            "*foo",
            "spiffe://td/*/sa/x",
            "spiffe://td/ns/*/*",
            "spiffe://clus*",
            "spiffe://*",
            "spiffe://td*",
            "spiffe://TD/ns/a/*",
            "spiffe://td/ns//*",
            "spiffe://td/ns/a/sa/b/",
            "cluster.local/ns/a/sa/b",
            "spiffe://td/ns/a b/*",
        ] {
            assert!(principal(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ports() {
        let range = |a, b| PortRange::new(a, b).expect("valid range");
        assert_eq!(port_text("8080"), Ok(range(8080, 8080)));
        assert_eq!(port_text("9000-9100"), Ok(range(9000, 9100)));
        assert_eq!(port_text("1-65535"), Ok(range(1, 65535)));
        assert_eq!(port_text("7-7"), Ok(range(7, 7)));
        for bad in [
            "", "0", "0-10", "65536", "10-5", "-1", "1-", "+80", "8 0", "a", "1-2-3", "99999-1",
        ] {
            assert!(port_text(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(port_number(443), Ok(range(443, 443)));
        assert!(port_number(0).is_err());
        assert!(port_number(65536).is_err());
    }

    #[test]
    fn names() {
        assert!(namespace("default").is_ok());
        assert!(namespace("ambit-system").is_ok());
        for bad in ["", "Default", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
        assert!(object_name("allow-frontend.v2").is_ok());
        for bad in ["", "A", "a..b", ".a", "a_b"] {
            assert!(object_name(bad).is_err(), "{bad:?}");
        }
        assert!(selector_label("app", "web").is_ok());
        assert!(selector_label("", "web").is_err());
        assert!(selector_label("app", "*").is_err());
    }
}
