//! The bounded reason label of `ambit_tls_handshake_failures_total`.

use std::io;

use rustls::{AlertDescription, CertificateError};

/// Why a TLS handshake failed, reduced to a fixed set so the metric has a
/// fixed number of series whatever peers send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer presented no certificate (or we were asked for one).
    NoCertificate,
    /// The chain does not lead to a trust anchor: unknown issuer, bad
    /// signature, revoked.
    Untrusted,
    /// Signed by a trusted CA but not a usable SVID now: expired, not yet
    /// valid, missing or malformed SPIFFE ID, wrong key usage, bad encoding.
    BadSvid,
    /// The TLS exchange itself went wrong: unexpected or corrupt messages,
    /// no common version or cipher suite, fatal alerts not about
    /// certificates.
    Protocol,
    Timeout,
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::NoCertificate,
        HandshakeFailure::Untrusted,
        HandshakeFailure::BadSvid,
        HandshakeFailure::Protocol,
        HandshakeFailure::Timeout,
        HandshakeFailure::Other,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::Untrusted => "untrusted",
            HandshakeFailure::BadSvid => "bad_svid",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// Classifies a rustls error. Certificate errors raised by our SPIFFE
    /// verifier through `CertificateError::Other` count as `bad_svid`.
    pub fn from_rustls(err: &rustls::Error) -> Self {
        use rustls::Error as E;
        match err {
            E::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            E::InvalidCertificate(cert) => Self::from_certificate_error(cert),
            E::AlertReceived(alert) => Self::from_alert(*alert),
            E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::InvalidMessage(_)
            | E::PeerIncompatible(_)
            | E::PeerMisbehaved(_)
            | E::DecryptError
            | E::PeerSentOversizedRecord
            | E::NoApplicationProtocol
            | E::HandshakeNotComplete
            | E::General(_) => HandshakeFailure::Protocol,
            _ => HandshakeFailure::Other,
        }
    }

    /// Classifies an I/O error from a TLS stream: tokio-rustls wraps rustls
    /// errors in `io::Error`, and timeouts arrive as `TimedOut`.
    pub fn from_io(err: &io::Error) -> Self {
        if err.kind() == io::ErrorKind::TimedOut {
            return HandshakeFailure::Timeout;
        }
        match err.get_ref().and_then(|inner| inner.downcast_ref()) {
            Some(tls) => Self::from_rustls(tls),
            None if err.kind() == io::ErrorKind::UnexpectedEof => HandshakeFailure::Protocol,
            None => HandshakeFailure::Other,
        }
    }

    /// Classifies free text (a log line, an error from another layer) by
    /// the phrases rustls and the verifier use. Prefer the typed functions.
    pub fn from_text(text: &str) -> Self {
        let text = text.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        if has(&["timed out", "timeout", "deadline"]) {
            HandshakeFailure::Timeout
        } else if has(&[
            "no certificate",
            "nocertificate",
            "certificaterequired",
            "certificate required",
        ]) {
            HandshakeFailure::NoCertificate
        } else if has(&[
            "unknownissuer",
            "unknown issuer",
            "unknownca",
            "unknown ca",
            "badsignature",
            "bad signature",
            "revoked",
            "untrusted",
        ]) {
            HandshakeFailure::Untrusted
        } else if has(&["svid", "spiffe", "expired", "notvalidyet", "certificate"]) {
            HandshakeFailure::BadSvid
        } else if has(&[
            "alert",
            "protocol",
            "handshake",
            "message",
            "incompatible",
            "misbehaved",
            "tls",
        ]) {
            HandshakeFailure::Protocol
        } else {
            HandshakeFailure::Other
        }
    }

    fn from_certificate_error(err: &CertificateError) -> Self {
        use CertificateError as C;
        match err {
            C::UnknownIssuer
            | C::BadSignature
            | C::Revoked
            | C::UnknownRevocationStatus
            | C::ExpiredRevocationList
            | C::ExpiredRevocationListContext { .. } => HandshakeFailure::Untrusted,
            _ => HandshakeFailure::BadSvid,
        }
    }

    /// A fatal alert from the peer: it rejected our certificate or the
    /// exchange.
    fn from_alert(alert: AlertDescription) -> Self {
        use AlertDescription as A;
        match alert {
            A::CertificateRequired | A::NoCertificate => HandshakeFailure::NoCertificate,
            A::UnknownCA | A::CertificateRevoked => HandshakeFailure::Untrusted,
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateUnknown => HandshakeFailure::BadSvid,
            _ => HandshakeFailure::Protocol,
        }
    }
}

impl From<&rustls::Error> for HandshakeFailure {
    fn from(err: &rustls::Error) -> Self {
        Self::from_rustls(err)
    }
}

impl From<&io::Error> for HandshakeFailure {
    fn from(err: &io::Error) -> Self {
        Self::from_io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_map_to_the_bounded_set() {
        use HandshakeFailure as H;
        let cases = [
            (rustls::Error::NoCertificatesPresented, H::NoCertificate),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                H::Untrusted,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                H::BadSvid,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                H::NoCertificate,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                H::Untrusted,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::ProtocolVersion),
                H::Protocol,
            ),
            (rustls::Error::DecryptError, H::Protocol),
            (rustls::Error::FailedToGetRandomBytes, H::Other),
        ];
        for (err, want) in cases {
            assert_eq!(HandshakeFailure::from_rustls(&err), want, "{err}");
            // The Display text classifies the same way.
            assert_eq!(HandshakeFailure::from_text(&err.to_string()), want, "{err}");
        }
    }

    #[test]
    fn io_errors_unwrap_rustls_and_timeouts() {
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(
            HandshakeFailure::from_io(&wrapped),
            HandshakeFailure::NoCertificate
        );
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            HandshakeFailure::from_io(&timeout),
            HandshakeFailure::Timeout
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(HandshakeFailure::from_io(&reset), HandshakeFailure::Other);
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> =
            HandshakeFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), HandshakeFailure::ALL.len());
    }
}
