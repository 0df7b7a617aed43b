//! The admin HTTP/1.1 listener.

use std::{
    convert::Infallible,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hyper::{Request, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};

use super::{AdminError, AdminState, routes};

/// The admin port (docs/operations.md), on loopback: the endpoints describe the
/// node's workloads and certificates and are not meant for the network.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// A client that does not finish its request headers in this time is cut
/// off, so idle connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics`, `/healthz`, `/readyz`, `/config_dump` and `/certs`.
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<dyn AdminState>,
}

impl AdminServer {
    /// Binds and serves until the returned future is dropped.
    pub async fn serve(addr: SocketAddr, state: Arc<dyn AdminState>) -> Result<(), AdminError> {
        Self::bind(addr, state).await?.run().await;
        Ok(())
    }

    /// Binds `addr` (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn bind(addr: SocketAddr, state: Arc<dyn AdminState>) -> Result<Self, AdminError> {
        let bind_err = |error: io::Error| match error.kind() {
            io::ErrorKind::AddrInUse => AdminError::AddrInUse { addr, error },
            _ => AdminError::Bind { addr, error },
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        Ok(AdminServer {
            listener,
            local_addr,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until dropped; dropping it also closes the
    /// connections it is serving.
    pub async fn run(self) {
        tracing::info!(addr = %self.local_addr, "admin server listening");
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        connections.spawn(serve_connection(stream, self.state.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: transient, and
                        // accept would fail again at once, so pause.
                        tracing::warn!(error = %e, "admin server cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<dyn AdminState>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = routes::respond(request.method(), request.uri().path(), &*state);
        async move { Ok::<_, Infallible>(response) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}
