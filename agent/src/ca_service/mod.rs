//! The cluster CA service (`ambit ca`) and the node agent's client for it
//! (docs/operations.md, "`ambit ca`").
//!
//! The CA holds one [`CertificateAuthority`](crate::identity::CertificateAuthority)
//! in memory (its keys are never written) and issues X.509-SVIDs to node
//! agents, each only for the workloads its directory places on that agent's
//! node (node scoping).
//!
//! # Bootstrap files
//!
//! On start the CA writes, under `--bootstrap-dir DIR`:
//!
//! - `DIR/bundle.pem`: the root certificate (the trust bundle), mode 0644;
//! - `DIR/nodes/<NODE>/node.pem` and `DIR/nodes/<NODE>/node-key.pem`: the
//!   node bootstrap credential, an SVID for `spiffe://TD/ambit/node/<NODE>`
//!   (chain, and PKCS#8 key created with mode 0600), for every node a
//!   workload in the directory names, and again for nodes that appear later.
//!   Credentials are re-issued and atomically replaced at half life, so
//!   clients re-read them on every request.
//!
//! The node credential is the local-mode stand-in for a Kubernetes projected
//! service-account token: it is what proves to the CA which node an agent
//! runs on. Node IDs live under `/ambit/node/`, so they can never collide
//! with a workload ID (`/ns/<namespace>/sa/<service-account>`).
//!
//! # In the cluster (`--kubernetes`, [`kubernetes`])
//!
//! No files: the root is kept in a Secret, the bundle is published to a
//! ConfigMap the agents follow, the directory is every enrolled pod from
//! the API, and an agent obtains its node credential by **attestation**: on
//! a connection without a client certificate (allowed only in this mode)
//! it sends its pod's projected service-account token and a CSR for a key
//! it generated; the CA reviews the token (TokenReview, its audience), checks
//! it is the agents' ServiceAccount, looks up the pod the token is bound to
//! and issues `spiffe://TD/ambit/node/<spec.nodeName>` for
//! [`server::DEFAULT_ATTESTED_NODE_TTL`]. The agent then uses it exactly as
//! a bootstrap credential, and attests again at half life.
//!
//! Workload private keys are never written anywhere: the agent generates
//! each key in memory, sends only a CSR, and the key stays in its process
//! (zeroized on drop). Only the node bootstrap key is written to disk.
//!
//! # Protocol
//!
//! TLS 1.3-only mTLS (ring provider). The CA presents the SVID
//! `spiffe://TD/ambit/ca` and requires a client SVID that verifies against
//! the bundle and is a node identity. Then newline-delimited JSON, any
//! number of requests per connection, each line at most
//! [`MAX_LINE_BYTES`]:
//!
//! ```text
//! → {"spiffe_id": "spiffe://TD/ns/NS/sa/SA", "csr": "<base64 DER PKCS#10>", "ttl_secs": 3600}
//! ← {"chain": ["<base64 DER leaf>", "<base64 DER intermediate>"]}
//! ← {"error": "node node1 may not obtain spiffe://…: …"}
//! ```
//!
//! Attestation, the only line a client without a certificate may send (the
//! answer carries the node credential's chain; the connection then closes):
//!
//! ```text
//! → {"token": "<service-account JWT>", "csr": "<base64 DER PKCS#10>"}
//! ```
//!
//! `ttl_secs` is optional; the CA's `--svid-ttl-secs` is both the default
//! and the maximum (a longer request is shortened to it). A refused request
//! leaves the connection open; a malformed line, an oversized line or a
//! client that is not a node gets an error and the connection is closed.

mod bootstrap;
pub mod client;
pub mod kubernetes;
mod pem;
mod protocol;
mod root_store;
pub mod server;

#[cfg(test)]
mod tests;

use crate::identity::{SpiffeId, SpiffeIdError, TrustDomain};

pub use bootstrap::{BUNDLE_FILE, NODE_CHAIN_FILE, NODE_KEY_FILE, NODES_DIR};
pub use client::{CaClient, CaClientError};
pub use root_store::{ROOT_CERT_FILE, ROOT_KEY_FILE, RootStoreError};
pub use server::{CaServer, CaServerConfig, CaServerError};

/// Port `ambit ca` listens on by default.
pub const DEFAULT_PORT: u16 = 15012;
/// Longest request or response line, newline excluded. A CSR line is well
/// under 1 KiB; the cap stops a garbage client from exhausting memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// ALPN protocol of the CA service, so a tunnel client that reaches the CA
/// port by mistake fails the handshake instead of speaking HTTP/2 to it.
pub const ALPN: &[u8] = b"ambit-ca/1";

const NODE_PATH_PREFIX: &str = "/ambit/node/";

/// The identity the CA serves with: `spiffe://TD/ambit/ca`.
pub fn ca_spiffe_id(trust_domain: &TrustDomain) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{trust_domain}/ambit/ca"))
        .expect("a trust domain plus a constant path is a canonical SPIFFE ID")
}

/// The bootstrap identity of a node: `spiffe://TD/ambit/node/<NODE>`. The
/// node name must be a single canonical path segment (it is also a directory
/// name under the bootstrap directory).
pub fn node_spiffe_id(trust_domain: &TrustDomain, node: &str) -> Result<SpiffeId, SpiffeIdError> {
    if node.contains('/') {
        return Err(SpiffeIdError::BadPathChar { ch: '/' });
    }
    if node.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    SpiffeId::parse(&format!("spiffe://{trust_domain}{NODE_PATH_PREFIX}{node}"))
}

/// The node name of a node identity, or `None` if `id` is not one.
pub fn node_name(id: &SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix(NODE_PATH_PREFIX)
        .filter(|name| !name.is_empty() && !name.contains('/'))
}
