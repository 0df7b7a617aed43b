//! How connections reached the proxy's listeners, and so where they were
//! going: the one thing node mode and sidecar mode do differently once a
//! connection is accepted.
//!
//! * Node mode (eBPF): connect4/6 rewrote the destination of an outbound
//!   connect and kept the original in a map keyed by the pod's netns cookie
//!   and the client's address; inbound, sk_lookup handed the connection to
//!   the listener without rewriting anything, so the local address is what
//!   the peer dialled.
//! * Sidecar mode (nftables REDIRECT in the pod's netns): conntrack
//!   rewrote the destination both ways and keeps the original, which
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` return on the accepted socket.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use super::dial::unmapped;
use crate::{capture::Capture, workloads::probes::ProbeKind};

#[derive(Clone)]
pub enum Interception {
    /// The node agent's eBPF capture.
    Ebpf(Arc<Capture>),
    /// A sidecar's nftables REDIRECT rules.
    Redirect,
}

impl Interception {
    /// Where an outbound connection accepted as `stream` from `client`, in
    /// the namespace with `netns_cookie`, was going; `None` if nobody knows
    /// (dialled directly, or the entry is gone).
    pub fn outbound_dst(
        &self,
        stream: &TcpStream,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        match self {
            Self::Ebpf(capture) => capture.take_original_dst(netns_cookie, client),
            Self::Redirect => original_dst(stream).ok(),
        }
    }

    /// Where an inbound plaintext connection was going.
    pub fn inbound_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        match self {
            Self::Ebpf(_) => stream.local_addr().map(unmapped),
            Self::Redirect => original_dst(stream),
        }
    }

    /// Whether the kernel saw this connection opened on the node to one of
    /// the pod's probe ports. A sidecar cannot see the node (kubelet probes
    /// must be rewritten to the sidecar, as sidecar meshes do), so it never
    /// exempts one: plaintext is refused as from anyone.
    pub fn opened_by_node(&self, peer: SocketAddr, dst: SocketAddr) -> Option<ProbeKind> {
        match self {
            Self::Ebpf(capture) => capture.opened_by_node(peer, dst),
            Self::Redirect => None,
        }
    }
}

/// The destination conntrack recorded before a REDIRECT rewrote it. An IPv4
/// connection on a dual-stack socket is asked at the IPv4 level.
fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = unmapped(stream.local_addr()?);
    let addr = if local.is_ipv4() {
        from_sockaddr_in(&getsockopt(stream, sockopt::OriginalDst)?)
    } else {
        from_sockaddr_in6(&getsockopt(stream, sockopt::Ip6tOriginalDst)?)
    };
    Ok(unmapped(addr))
}

/// The kernel's `sockaddr_in` (port and address in network byte order).
fn from_sockaddr_in(raw: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr))),
        u16::from_be(raw.sin_port),
    )
}

fn from_sockaddr_in6(raw: &libc::sockaddr_in6) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::from(raw.sin6_addr.s6_addr)),
        u16::from_be(raw.sin6_port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_kernels_ipv4_original_destination() {
        // SAFETY: sockaddr_in is plain old data; all zeroes is valid.
        let mut raw: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        raw.sin_family = libc::AF_INET as libc::sa_family_t;
        raw.sin_port = 8080u16.to_be();
        raw.sin_addr.s_addr = u32::from(Ipv4Addr::new(198, 18, 1, 10)).to_be();
        assert_eq!(
            from_sockaddr_in(&raw),
            "198.18.1.10:8080".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn converts_the_kernels_ipv6_original_destination() {
        // SAFETY: as above.
        let mut raw: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        raw.sin6_port = 443u16.to_be();
        raw.sin6_addr.s6_addr = "fd00:a5b1::1:a".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            from_sockaddr_in6(&raw),
            "[fd00:a5b1::1:a]:443".parse::<SocketAddr>().unwrap()
        );
    }

    /// A real REDIRECT needs a namespace (the e2e tests); without one,
    /// conntrack has no entry and the call says so instead of inventing
    /// an address.
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (accepted, _)) = (client.unwrap(), accepted.unwrap());
        match original_dst(&accepted) {
            // With conntrack loaded the tuple is found unchanged.
            Ok(dst) => assert_eq!(dst, addr),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
                "{e}"
            ),
        }
    }
}
