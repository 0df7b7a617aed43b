//! Transparent inbound relays: the application in a destination pod sees
//! the client pod's address as the source of a mesh connection.
//!
//! The agent's relay socket in the destination pod's netns binds to the
//! client's address with IP_TRANSPARENT and carries [`TRANSPARENT_MARK`].
//! The application's answers go to that address, which the pod does not
//! have, so without more they would leave by the pod's default route. Three
//! settings in the pod's netns bring them back to the agent's socket, with
//! no conntrack and no packet filter:
//!
//! * `net.ipv4.tcp_fwmark_accept = 1` (IPv4 and IPv6): a socket accepted
//!   from a marked SYN carries the SYN's mark, and so does its SYN-ACK. Only
//!   sockets inside the pod can mark a packet: a packet that crosses into
//!   the pod's netns from its veth loses its mark.
//! * an `ip rule`, IPv4 and IPv6: `fwmark TRANSPARENT_MARK lookup
//!   TRANSPARENT_TABLE`,
//! * a route in that table: `local default dev lo`, so a marked packet is
//!   delivered in the pod itself, to the relay socket.
//!
//! The application's own sockets carry no mark, and the kubelet's probes
//! and everything else keep the pod's routes.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::IpAddr,
};

use anyhow::{Context, Result};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns::Netns;

/// SO_MARK of the agent's transparent relay sockets, and of the
/// application's replies to them. Distinct from the agent's socket mark,
/// so its other sockets in the pod keep the pod's routes.
pub const TRANSPARENT_MARK: u32 = 0x0a3c;
/// The routing table (in each pod's netns) that delivers marked replies locally.
pub const TRANSPARENT_TABLE: u32 = 0x0a3c;
/// The `ip rule` priority: after `local` (0), before `main` (32766).
pub const TRANSPARENT_RULE_PRIORITY: u32 = 0x0a3c;

/// Sets the pod's netns up for transparent relays (idempotent: an agent
/// restart finds the rules and routes in place). `ipv6`: the pod has IPv6
/// addresses, so IPv6 must be set up too.
pub fn prepare(netns: &Netns, ipv6: bool) -> Result<()> {
    netns.run_blocking(|| -> Result<()> {
        enable_fwmark_accept()?;
        let mut netlink = Netlink::open()?;
        let families = [(AddressFamily::Inet, "ip"), (AddressFamily::Inet6, "ip -6")];
        for (family, ip) in &families[..if ipv6 { 2 } else { 1 }] {
            netlink
                .add(RouteNetlinkMessage::NewRule(mark_rule(*family)))
                .with_context(|| {
                    format!(
                        "`{ip} rule add fwmark {TRANSPARENT_MARK:#x} lookup {TRANSPARENT_TABLE}`: \
                             the kernel needs policy routing (CONFIG_IP_MULTIPLE_TABLES, and \
                             CONFIG_IPV6_MULTIPLE_TABLES for IPv6)"
                    )
                })?;
            netlink
                .add(RouteNetlinkMessage::NewRoute(local_default_route(*family)))
                .with_context(|| {
                    format!("`{ip} route add local default dev lo table {TRANSPARENT_TABLE}`")
                })?;
        }
        Ok(())
    })?
}

/// `net.ipv4.tcp_fwmark_accept`, of the calling thread's netns.
fn enable_fwmark_accept() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
    OpenOptions::new()
        .write(true)
        .open(PATH)
        .and_then(|mut f| f.write_all(b"1"))
        .with_context(|| format!("writing 1 to {PATH} (Linux 3.15)"))
}

fn mark_rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::FwMark(TRANSPARENT_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(TRANSPARENT_TABLE),
        RuleAttribute::Priority(TRANSPARENT_RULE_PRIORITY),
    ];
    rule
}

fn local_default_route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(TRANSPARENT_TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    route
}

/// The loopback device is the first device of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// A NETLINK_ROUTE socket of the calling thread's netns.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        socket.bind_auto().context("binding a netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting a netlink socket")?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends a create request and waits for its answer; "exists" is success.
    fn add(&mut self, message: RouteNetlinkMessage) -> io::Result<()> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (answer, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < answer.len() {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[offset..])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                offset += reply.header.length as usize;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                if let NetlinkPayload::Error(error) = reply.payload {
                    return match error.code {
                        None => Ok(()),
                        Some(code) if -code.get() == libc::EEXIST => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                if reply.header.length == 0 {
                    break;
                }
            }
        }
    }
}

/// The source address for a transparent relay of a connection from `peer`
/// to `dst`: the peer's own, when the families match.
pub fn source_for(peer: IpAddr, dst: IpAddr) -> Option<IpAddr> {
    match (peer, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            (!peer.is_unspecified() && !peer.is_loopback()).then_some(peer)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::netns::test_support::new_namespace;

    fn ip_in(path: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .arg("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn prepare_sets_up_the_rules_routes_and_sysctl_once() {
        let (_keep, path) = new_namespace();
        // As in every pod (the CNI loopback plugin).
        ip_in(&path, &["link", "set", "lo", "up"]);
        let netns = Netns::open(&path).unwrap();
        prepare(&netns, true).unwrap();
        // An agent restart finds them in place and adds nothing.
        prepare(&netns, true).unwrap();
        let rule = format!(
            "{TRANSPARENT_RULE_PRIORITY}:\tfrom all fwmark {TRANSPARENT_MARK:#x} lookup {TRANSPARENT_TABLE}"
        );
        for family in ["-4", "-6"] {
            let rules = ip_in(&path, &[family, "rule", "show"]);
            assert_eq!(rules.matches(&rule).count(), 1, "{family} rules: {rules}");
            let table = TRANSPARENT_TABLE.to_string();
            let routes = ip_in(&path, &[family, "route", "show", "table", &table]);
            assert!(
                routes.contains("local default dev lo"),
                "{family} routes: {routes}"
            );
        }
        let fwmark_accept = netns
            .run_blocking(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept"))
            .unwrap()
            .unwrap();
        assert_eq!(fwmark_accept.trim(), "1");
    }

    #[test]
    fn the_source_is_the_peers_own_address_of_the_same_family() {
        let v4: IpAddr = "198.18.0.10".parse().unwrap();
        let v6: IpAddr = "fd00:a5b1::10".parse().unwrap();
        let dst4: IpAddr = "198.18.1.10".parse().unwrap();
        let dst6: IpAddr = "fd00:a5b1:0:1::10".parse().unwrap();
        assert_eq!(source_for(v4, dst4), Some(v4));
        assert_eq!(source_for(v6, dst6), Some(v6));
        assert_eq!(source_for(v4, dst6), None);
        assert_eq!(source_for("127.0.0.1".parse().unwrap(), dst4), None);
        assert_eq!(source_for("::".parse().unwrap(), dst6), None);
    }
}
