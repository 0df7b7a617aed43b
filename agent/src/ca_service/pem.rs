//! PEM encoding (RFC 7468). Decoding uses rustls-pki-types' `PemObject`.

use base64::{Engine, engine::general_purpose::STANDARD};
use zeroize::Zeroizing;

pub(super) const CERTIFICATE: &str = "CERTIFICATE";
pub(super) const PRIVATE_KEY: &str = "PRIVATE KEY";

/// One PEM block. The result is zeroized on drop because it may hold a
/// private key; every intermediate buffer is too.
pub(super) fn encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let lines = b64.len().div_ceil(64);
    // Exact capacity, so pushing never reallocates and leaves a copy behind.
    // "-----BEGIN " label "-----\n" ... "-----END " label "-----\n"
    let armour = 2 * label.len() + 11 + 6 + 9 + 6;
    let mut out = Zeroizing::new(String::with_capacity(b64.len() + lines + armour));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    use super::*;

    #[test]
    fn round_trips_through_the_pki_types_decoder() {
        for len in [0, 1, 47, 48, 49, 300, 1000] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let pem = encode(CERTIFICATE, &der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{}", pem.as_str());
            assert_eq!(pem.capacity(), pem.len(), "capacity was not exact");
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                assert_eq!(back.as_ref(), der.as_slice());
            }
        }
    }
}
