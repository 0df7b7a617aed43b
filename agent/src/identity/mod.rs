//! Workload identity (docs/architecture.md, "Identity"): SPIFFE IDs, the built-in CA that issues
//! X.509-SVIDs, and the SPIFFE peer verifier the tunnel's rustls
//! configurations use.

mod ca;
mod spiffe_id;
mod tls;
mod verifier;

#[cfg(test)]
#[cfg(test)]
mod limbo;
#[cfg(test)]
mod tests;

pub use ca::{
    CLOCK_SKEW_ALLOWANCE, CaError, CertificateAuthority, DEFAULT_SVID_TTL, MAX_SVID_TTL,
    MIN_SVID_TTL, RootPem, Svid, SvidCertificate, SvidKey,
};
pub use spiffe_id::{
    MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, TrustDomain,
};
pub use tls::{
    TunnelServerConfig, anonymous_client_config, client_config, crypto_provider, server_config,
};
pub use verifier::{
    AcceptedClients, PeerRole, SpiffeClientVerifier, SpiffeServerVerifier, SvidError, TrustBundles,
    handshake_failure_reason, peer_spiffe_id, svid_error_of, verify_svid,
};
