//! The CONNECT target: `:authority = IP:port`, both ways.
//!
//! HBONE names the destination by address only. A hostname would make the
//! inbound side resolve names on a peer's behalf, so it is refused.

use std::net::SocketAddr;

use http::{Method, StatusCode, Uri};

use super::TunnelError;

/// The `:authority` a client sends for `target`: `1.2.3.4:80` or
/// `[fd00::1]:80`.
pub(crate) fn to_uri(target: SocketAddr) -> Result<Uri, TunnelError> {
    let bad = || TunnelError::BadAuthority(target.to_string());
    if target.port() == 0 {
        return Err(bad());
    }
    // A scope id names an interface of this host; it means nothing to the
    // peer, and `SocketAddr`'s `%scope` form is not a valid authority.
    if let SocketAddr::V6(v6) = target
        && v6.scope_id() != 0
    {
        return Err(bad());
    }
    // `SocketAddr` displays IPv6 in brackets, as an authority needs.
    Uri::try_from(target.to_string()).map_err(|_| bad())
}

/// Why a received request is not a tunnel request, and the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// The target of a received request, or why it is not a valid HBONE CONNECT.
///
/// h2 already resets a plain CONNECT that carries `:scheme` or `:path`; the
/// checks for them here only matter should extended CONNECT ever be enabled.
pub(crate) fn parse_target(method: &Method, uri: &Uri) -> Result<SocketAddr, Invalid> {
    let invalid = |status, reason| Err(Invalid { status, reason });
    if method != Method::CONNECT {
        return invalid(StatusCode::METHOD_NOT_ALLOWED, "not a CONNECT request");
    }
    let Some(authority) = uri.authority() else {
        return invalid(StatusCode::BAD_REQUEST, "CONNECT without :authority");
    };
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return invalid(StatusCode::BAD_REQUEST, "CONNECT with :scheme or :path");
    }
    // Accepts exactly `IPv4:port` and `[IPv6]:port`: no hostname, no
    // userinfo, no missing port, no IPv6 scope.
    let Ok(target) = authority.as_str().parse::<SocketAddr>() else {
        return invalid(StatusCode::BAD_REQUEST, ":authority is not IP:port");
    };
    if target.port() == 0 {
        return invalid(StatusCode::BAD_REQUEST, ":authority has port 0");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: Method, uri: &str) -> Result<SocketAddr, StatusCode> {
        let uri: Uri = uri.parse().expect("test URI parses");
        parse_target(&method, &uri).map_err(|e| e.status)
    }

    #[test]
    fn accepts_ip_and_port() {
        assert_eq!(
            parse(Method::CONNECT, "10.1.2.3:8080"),
            Ok("10.1.2.3:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse(Method::CONNECT, "[fd00:a5b1::7]:443"),
            Ok("[fd00:a5b1::7]:443".parse().expect("addr"))
        );
    }

    #[test]
    fn rejects_non_connect_with_405() {
        assert_eq!(
            parse(Method::GET, "http://10.1.2.3:80/"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            parse(Method::POST, "10.1.2.3:80"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn rejects_bad_authorities_with_400() {
        for uri in [
            "example.com:80",
            "localhost:80",
            "10.1.2.3",
            "10.1.2.3:0",
            "user@10.1.2.3:80",
            "[fd00::7]",
            "/",
            "http://10.1.2.3:80/x",
        ] {
            assert_eq!(
                parse(Method::CONNECT, uri),
                Err(StatusCode::BAD_REQUEST),
                "{uri}"
            );
        }
    }

    #[test]
    fn formats_targets_as_authorities() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        let v6: SocketAddr = "[fd00::7]:80".parse().expect("addr");
        for target in [v4, v6] {
            let uri = to_uri(target).expect("valid target");
            assert_eq!(parse_target(&Method::CONNECT, &uri), Ok(target));
        }
        assert_eq!(
            to_uri(v6).expect("valid").authority().map(|a| a.as_str()),
            Some("[fd00::7]:80")
        );
    }

    #[test]
    fn refuses_unusable_targets() {
        let scoped: SocketAddr = "[fe80::1%2]:80".parse().expect("addr");
        let port0: SocketAddr = "10.1.2.3:0".parse().expect("addr");
        assert!(matches!(to_uri(scoped), Err(TunnelError::BadAuthority(_))));
        assert!(matches!(to_uri(port0), Err(TunnelError::BadAuthority(_))));
    }
}
