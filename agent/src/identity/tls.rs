//! rustls configurations for the tunnel: TLS 1.3 only, the ring provider
//! passed explicitly, SPIFFE verifiers on both sides, and no resumption.
//!
//! Resumption is off on both ends. A resumed server session skips client
//! certificate verification, and a client cache keyed by server name (an IP
//! for tunnels) could resume with a different pod that reused the address.

use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use rustls::{
    ClientConfig, ServerConfig, client::Resumption, crypto::CryptoProvider,
    server::NoServerSessionStorage, sign::SingleCertAndKey, version::TLS13,
};

use super::{
    ca::Svid,
    spiffe_id::SpiffeId,
    verifier::{AcceptedClients, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundles},
};

/// The one crypto provider Ambit uses, always passed explicitly so nothing
/// depends on which provider a dependency installed as process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    Arc::clone(&PROVIDER)
}

/// Server side of a tunnel (the inbound 15008 listener) or of the CA
/// service: presents `svid` and requires a client SVID that verifies
/// against `bundles` and names an identity `accepted` allows. ALPN is h2
/// (HBONE).
pub fn server_config(
    svid: &Svid,
    bundles: Arc<TrustBundles>,
    accepted: AcceptedClients,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles, accepted)))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(svid.certified_key()?)));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![crate::tunnel::ALPN.to_vec()];
    Ok(config)
}

/// Client side of a tunnel: presents `svid` and accepts the server only if
/// its SVID verifies and names one of `expected`.
pub fn client_config(
    svid: &Svid,
    bundles: Arc<TrustBundles>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = verifying_client(bundles, expected)?
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(svid.certified_key()?)));
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![crate::tunnel::ALPN.to_vec()];
    Ok(config)
}

/// Client side without a certificate of its own (an agent attesting to the
/// CA with a token): the server must still present an SVID naming one of
/// `expected`.
pub fn anonymous_client_config(
    bundles: Arc<TrustBundles>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = verifying_client(bundles, expected)?.with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// TLS 1.3 only, and the server accepted only if its SVID verifies and
/// names one of `expected`; the client certificate is the caller's choice.
fn verifying_client(
    bundles: Arc<TrustBundles>,
    expected: Vec<SpiffeId>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, expected))))
}

/// The tunnel listener's server configuration for the SVID it last served
/// with, rebuilt only when the SVID is renewed (a new `Arc<Svid>`), not for
/// every accepted connection.
#[derive(Default)]
pub struct TunnelServerConfig {
    current: Mutex<Option<(Arc<Svid>, Arc<ServerConfig>)>>,
}

impl TunnelServerConfig {
    /// The configuration presenting `svid` and accepting workloads.
    pub fn for_svid(
        &self,
        svid: &Arc<Svid>,
        bundles: &Arc<TrustBundles>,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        // Replaced whole under the lock: consistent after a panic.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached_for, config)) = current.as_ref()
            && Arc::ptr_eq(cached_for, svid)
        {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(server_config(
            svid,
            Arc::clone(bundles),
            AcceptedClients::Workloads,
        )?);
        *current = Some((Arc::clone(svid), Arc::clone(&config)));
        Ok(config)
    }
}
