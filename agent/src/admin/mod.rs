//! The admin HTTP server (docs/operations.md), default `127.0.0.1:15020`:
//!
//! | path           | answer                                                       |
//! |----------------|--------------------------------------------------------------|
//! | `/metrics`     | Prometheus text (`text/plain; version=0.0.4`)                |
//! | `/healthz`     | 200 `ok` while the process runs                              |
//! | `/readyz`      | 200 once identities and policy are loaded, else 503 + reason |
//! | `/config_dump` | JSON: workloads, policies, certificates (no keys)            |
//! | `/certs`       | JSON list of `{spiffe_id, serial, not_before, not_after}`    |
//!
//! GET only (405 otherwise), 404 for any other path. What is shown comes
//! from an [`AdminState`], which the agent implements.

mod routes;
mod server;
mod state;
#[cfg(test)]
mod tests;

use std::{io, net::SocketAddr};

pub use server::{AdminServer, DEFAULT_ADMIN_ADDR};
pub use state::{AdminState, CertInfo, StaticState};

/// Why the admin server could not start.
///
/// The I/O error is in the message rather than a `#[source]`, so a `{:#}`
/// chain (as `main` prints) does not show it twice.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr}: address in use; pass --admin-addr to choose another")]
    AddrInUse { addr: SocketAddr, error: io::Error },
    #[error("cannot listen on {addr}: {error}; pass --admin-addr to choose another")]
    Bind { addr: SocketAddr, error: io::Error },
}
