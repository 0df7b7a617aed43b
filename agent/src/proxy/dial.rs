//! Opening the agent's own upstream connections: from inside a pod's
//! netns, marked so capture lets them through, within a deadline.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::netns::Netns;

pub async fn dial(
    netns: &Netns,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    within(timeout, dst, netns.connect(dst, mark)).await
}

/// `connect` (to `dst`), failed with a clear error after `timeout`.
pub async fn within(
    timeout: Duration,
    dst: SocketAddr,
    connect: impl Future<Output = anyhow::Result<TcpStream>>,
) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(std::io::Error::other(format!("{e:#}"))),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// An IPv4 address seen through a dual-stack socket shows as `::ffff:a.b.c.d`.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
