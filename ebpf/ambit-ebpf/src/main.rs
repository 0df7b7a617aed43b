//! Ambit's eBPF programs.
//!
//! * `connect4`/`connect6` (cgroup_sock_addr) rewrite the destination of TCP
//!   connects made inside an enrolled network namespace to the agent's
//!   outbound listener in that namespace, remembering the original
//!   destination under the socket's cookie. The agent's own connects are
//!   recognised by its cgroup, which a pod cannot join or forge (a socket
//!   mark can be set by any process with CAP_NET_RAW).
//! * `sockops` publishes that destination under the client's (netns, address,
//!   port) once the connection is established, which is what the agent sees
//!   after accept(), and deletes every trace of the connection when it closes.
//! * `ambit_inbound` (sk_lookup, attached to each enrolled pod's netns only)
//!   hands every TCP connection from outside the pod, to any local address
//!   but loopback and any port but the tunnel's, to the agent's plaintext
//!   capture listener, so nothing reaches the application without the agent
//!   deciding (strict mTLS). An address the agent has not placed is refused,
//!   never passed. The agent's own relays to the application pass: from one
//!   of the pod's addresses, or (transparent) the exact 4-tuple the agent
//!   registered in `AMBIT_RELAYS`. Unsolicited UDP from outside a strict pod is dropped.
//! * Kubelet probes: `sockops` records each TCP connect made in the node's
//!   own network namespace to a probe port of an enrolled pod (the agent
//!   declares the ports per pod); `ambit_inbound` lets those of tcpSocket
//!   and gRPC probes reach the application's own listener, and the agent
//!   reads httpGet ones. A pod cannot create such a record, whatever source
//!   address it forges.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use ambit_common::{
    AF_INET, AF_INET6, CONNECTION_MAP_CAPACITY, ClientKey, ENROLLED_MAP_CAPACITY,
    INBOUND_CAPTURE_PORT, INBOUND_MAP_CAPACITY, IpWords, NODE_CONNECTION_MAP_CAPACITY,
    NodeConnection, OUTBOUND_PORT, OriginalDst, POD_ADDRESS_PERMISSIVE, PROBE_CONNECT,
    PROBE_PORT_MAP_CAPACITY, PendingConnection, PodAddress, ProbePort, RELAY_MAP_CAPACITY,
    RelayConnection, TUNNEL_PORT,
};
use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use core::ptr::read_volatile;

/// Allow the connect to proceed (with whatever address we left in the context).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM.
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const TCP_CLOSE: u32 = 7;

/// The cgroup v2 id of the agent: connects made from it are never captured.
/// 0 (unset) matches no task, so an agent that failed to set it captures its
/// own connects and fails closed rather than open.
#[unsafe(no_mangle)]
static AMBIT_AGENT_CGROUP: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static AMBIT_OUTBOUND_PORT: Global<u16> = Global::new(OUTBOUND_PORT);
#[unsafe(no_mangle)]
static AMBIT_INBOUND_CAPTURE_PORT: Global<u16> = Global::new(INBOUND_CAPTURE_PORT);
#[unsafe(no_mangle)]
static AMBIT_TUNNEL_PORT: Global<u16> = Global::new(TUNNEL_PORT);
/// The netns cookie of the node's own (host) network namespace, where the
/// kubelet runs. 0 (unset) matches nothing: no probe is let through.
#[unsafe(no_mangle)]
static AMBIT_NODE_NETNS: Global<u64> = Global::new(0);

/// Enrolled network namespaces, by netns cookie. Written only by the agent.
#[map(name = "AMBIT_ENROLLED")]
static ENROLLED: HashMap<u64, u32> = HashMap::pinned(ENROLLED_MAP_CAPACITY, 0);

/// Captured sockets between connect and close, by socket cookie.
#[map(name = "AMBIT_PENDING")]
static PENDING: LruHashMap<u64, PendingConnection> = LruHashMap::pinned(CONNECTION_MAP_CAPACITY, 0);

/// Original destinations of established captured connections, by client end.
/// The agent deletes an entry when it accepts the connection.
#[map(name = "AMBIT_ORIG_DST")]
static ORIG_DST: LruHashMap<ClientKey, OriginalDst> =
    LruHashMap::pinned(CONNECTION_MAP_CAPACITY, 0);

/// Every local address of every enrolled pod (IPv4 as mapped), with the pod
/// it belongs to. An address two pods claim is left out (fail closed).
#[map(name = "AMBIT_POD_ADDRS")]
static POD_ADDRS: HashMap<IpWords, PodAddress> = HashMap::pinned(INBOUND_MAP_CAPACITY, 0);

/// The agent's plaintext-capture listener of each pod, by pod address. The
/// kernel drops an entry when its socket closes (the agent died).
#[map(name = "AMBIT_INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<IpWords> = SockHash::pinned(INBOUND_MAP_CAPACITY, 0);

/// The kubelet probe ports of each enrolled pod, with their kind
/// (`PROBE_CONNECT` or `PROBE_HTTP`). Written only by the agent.
#[map(name = "AMBIT_PROBE_PORTS")]
static PROBE_PORTS: HashMap<ProbePort, u32> = HashMap::pinned(PROBE_PORT_MAP_CAPACITY, 0);

/// Open connections from the node's own network namespace to probe ports,
/// with the probe kind; removed when the connecting socket closes.
#[map(name = "AMBIT_NODE_CONNECTIONS")]
static NODE_CONNECTIONS: LruHashMap<NodeConnection, u32> =
    LruHashMap::pinned(NODE_CONNECTION_MAP_CAPACITY, 0);

/// The agent's transparent relays while they connect (see
/// [`RelayConnection`]). Written only by the agent.
#[map(name = "AMBIT_RELAYS")]
static RELAYS: LruHashMap<RelayConnection, u32> = LruHashMap::pinned(RELAY_MAP_CAPACITY, 0);

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(netns_cookie) = captured_netns(&ctx, sa) else {
        return ALLOW;
    };
    let ip4 = sa.user_ip4;
    // Loopback stays inside the pod: nothing to secure, and it is how the
    // application reaches its own sidecar-free listeners.
    if is_ipv4_loopback(ip4) || ip4 == 0 {
        return ALLOW;
    }
    let dst = OriginalDst {
        addr: IpWords::from_ipv4_word(ip4),
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
    };
    if !remember(&ctx, netns_cookie, dst) {
        return DENY;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(AMBIT_OUTBOUND_PORT.load().to_be());
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(netns_cookie) = captured_netns(&ctx, sa) else {
        return ALLOW;
    };
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let addr = IpWords(words);
    let v4_mapped = words[0] == 0 && words[1] == 0 && words[2] == IpWords::from_ipv4_word(0).0[2];
    let loopback6 = words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == 1u32.to_be();
    let unspecified = words[0] | words[1] | words[2] | words[3] == 0;
    if loopback6 || unspecified || (v4_mapped && is_ipv4_loopback(words[3])) {
        return ALLOW;
    }
    let dst = OriginalDst {
        addr,
        port: u16::from_be(sa.user_port as u16),
        family: if v4_mapped { AF_INET } else { AF_INET6 },
    };
    if !remember(&ctx, netns_cookie, dst) {
        return DENY;
    }
    // A dual-stack socket dialling an IPv4 peer reaches the IPv4 listener.
    let target = if v4_mapped {
        IpWords::from_ipv4_word(u32::from_ne_bytes([127, 0, 0, 1]))
    } else {
        IpWords::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    };
    sa.user_ip6[0] = target.0[0];
    sa.user_ip6[1] = target.0[1];
    sa.user_ip6[2] = target.0[2];
    sa.user_ip6[3] = target.0[3];
    sa.user_port = u32::from(AMBIT_OUTBOUND_PORT.load().to_be());
    ALLOW
}

/// The netns cookie if this connect is one we capture: a TCP socket not opened
/// by the agent, inside an enrolled network namespace.
#[inline(always)]
fn captured_netns(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<u64> {
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    // connect() runs in the calling task, so this is the caller's cgroup.
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    if unsafe { bpf_get_current_cgroup_id() } == AMBIT_AGENT_CGROUP.load() {
        return None;
    }
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    ENROLLED.get_ptr(netns_cookie)?;
    Some(netns_cookie)
}

#[inline(always)]
fn is_ipv4_loopback(word: u32) -> bool {
    word.to_ne_bytes()[0] == 127
}

/// Records the original destination. If the map rejects the entry the
/// connect is refused (EPERM): a captured pod never bypasses the agent.
#[inline(always)]
fn remember(ctx: &SockAddrContext, netns_cookie: u64, dst: OriginalDst) -> bool {
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let pending = PendingConnection {
        dst,
        client: ClientKey {
            netns_cookie,
            ..ClientKey::default()
        },
        ..PendingConnection::default()
    };
    match PENDING.insert(cookie, pending, 0) {
        Ok(()) => {
            debug!(
                ctx,
                "captured connect: netns {} port {}", netns_cookie, dst.port
            );
            true
        }
        Err(err) => {
            warn!(ctx, "ambit: cannot record original destination: {}", err);
            false
        }
    }
}

#[sock_ops]
pub fn ambit_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}

#[inline(always)]
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper allowed for sock_ops programs.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// Ask for state callbacks on captured sockets and on the node's probe
/// connections only, so that we see their close.
fn on_connect(ctx: &SockOpsContext) {
    let watch_close = if PENDING.get_ptr(socket_cookie(ctx)).is_some() {
        true
    } else {
        record_node_connection(ctx)
    };
    if watch_close {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
}

/// Whether the socket lives in the node's own network namespace.
#[inline(always)]
fn in_node_netns(ctx: &SockOpsContext) -> bool {
    let node = AMBIT_NODE_NETNS.load();
    // SAFETY: helper allowed for sock_ops programs (Linux 5.15 or newer).
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } == node
}

/// The connection as both ends see it: local end the node, remote the pod.
#[inline(always)]
fn node_connection(ctx: &SockOpsContext) -> NodeConnection {
    let ops = ctx.ops;
    // SAFETY: plain loads from the live sock_ops context, each on its own
    // (see on_established).
    let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
        )
    };
    // An IPv6 socket dialling IPv4: its IPv4 fields hold the addresses on
    // every kernel (the mapped IPv6 ones may be set only after connect).
    let v6 = family == u32::from(AF_INET6) && !is_v4_mapped(&IpWords(remote6));
    let (node_addr, pod_addr) = if v6 {
        (IpWords(local6), IpWords(remote6))
    } else {
        (
            IpWords::from_ipv4_word(local4),
            IpWords::from_ipv4_word(remote4),
        )
    };
    NodeConnection {
        node_addr,
        pod_addr,
        node_port: local_port as u16,
        // The kernel hands the network-order port in the upper half.
        pod_port: u32::from_be(remote_port) as u16,
    }
}

/// Records a connect from the node's network namespace to a probe port of
/// an enrolled pod (the kernel has chosen the source port by now); returns
/// whether it did.
fn record_node_connection(ctx: &SockOpsContext) -> bool {
    if !in_node_netns(ctx) {
        return false;
    }
    let conn = node_connection(ctx);
    let Some(owner) = POD_ADDRS.get_ptr(conn.pod_addr) else {
        return false;
    };
    let port = ProbePort {
        // SAFETY: pointer returned by a successful lookup of this map.
        netns_cookie: unsafe { (*owner).netns_cookie },
        port: conn.pod_port,
        _pad: [0; 6],
    };
    let Some(kind) = PROBE_PORTS.get_ptr(port) else {
        return false;
    };
    // SAFETY: as above.
    let kind = unsafe { *kind };
    if NODE_CONNECTIONS.insert(conn, kind, 0).is_err() {
        // No record: the connection is steered to the agent, which refuses
        // it (fail closed).
        warn!(ctx, "ambit: cannot record a probe connection from the node");
        return false;
    }
    true
}

fn on_established(ctx: &SockOpsContext) {
    let Some(pending) = PENDING.get_ptr_mut(socket_cookie(ctx)) else {
        return;
    };
    // SAFETY: pointer returned by a successful lookup of this map.
    let pending = unsafe { &mut *pending };
    // Read every context field unconditionally with its own load: the
    // verifier rejects the computed context offsets the compiler would
    // otherwise produce for a branch between the v4 and v6 fields.
    let ops = ctx.ops;
    // SAFETY: plain loads from the live sock_ops context.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    let addr = if family == u32::from(AF_INET6) {
        IpWords(ip6)
    } else {
        IpWords::from_ipv4_word(ip4)
    };
    pending.client.addr = addr;
    pending.client.port = ctx.local_port() as u16;
    pending.established = 1;
    if ORIG_DST.insert(pending.client, pending.dst, 0).is_err() {
        warn!(ctx, "ambit: cannot publish original destination");
    }
}

fn on_close(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    if let Some(pending) = PENDING.get_ptr(cookie) {
        // SAFETY: pointer returned by a successful lookup of this map.
        let pending = unsafe { &*pending };
        if pending.established == 1 {
            let _ = ORIG_DST.remove(pending.client);
        }
        let _ = PENDING.remove(cookie);
    } else if in_node_netns(ctx) {
        // Addresses and ports are still set when the state becomes CLOSE.
        let _ = NODE_CONNECTIONS.remove(node_connection(ctx));
    }
}

#[sk_lookup]
pub fn ambit_inbound(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: plain loads from the live sk_lookup context, each field read
    // on its own (see on_established).
    let (protocol, family, local_port, remote_port, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).family),
            read_volatile(&(*lookup).local_port),
            read_volatile(&(*lookup).remote_port),
            read_volatile(&(*lookup).local_ip4),
            read_volatile(&(*lookup).remote_ip4),
            [
                read_volatile(&(*lookup).local_ip6[0]),
                read_volatile(&(*lookup).local_ip6[1]),
                read_volatile(&(*lookup).local_ip6[2]),
                read_volatile(&(*lookup).local_ip6[3]),
            ],
            [
                read_volatile(&(*lookup).remote_ip6[0]),
                read_volatile(&(*lookup).remote_ip6[1]),
                read_volatile(&(*lookup).remote_ip6[2]),
                read_volatile(&(*lookup).remote_ip6[3]),
            ],
        )
    };
    let (local, remote) = if family == u32::from(AF_INET6) {
        (IpWords(local6), IpWords(remote6))
    } else {
        (
            IpWords::from_ipv4_word(local4),
            IpWords::from_ipv4_word(remote4),
        )
    };
    // Loopback never leaves the pod.
    if is_loopback(&local) || is_loopback(&remote) {
        return SK_PASS;
    }
    let owner = POD_ADDRS.get_ptr(local);
    // From inside the pod itself, between two of its own addresses: the
    // application talking to itself, or the agent delivering a connection
    // it accepted. A packet from outside cannot carry a source address of
    // the pod (the kernel drops such martians for IPv4; over IPv6 a spoofed
    // source can send but never receive, so no TCP handshake completes).
    if let (Some(owner), Some(source)) = (owner, POD_ADDRS.get_ptr(remote)) {
        // SAFETY: pointers returned by successful lookups of this map.
        if unsafe { (*owner).netns_cookie == (*source).netns_cookie } {
            return SK_PASS;
        }
    }
    // The agent's transparent relay, from the client's own address (which
    // the pod does not have): registered by the agent for exactly this
    // 4-tuple while it connects. A peer outside the pod using that address
    // has another 4-tuple and is steered below. (ingress_ifindex cannot
    // tell them apart: a connection to the pod's own address reports the
    // device that holds the address, not loopback.)
    let relay = RelayConnection {
        client_addr: remote,
        pod_addr: local,
        client_port: u16::from_be(remote_port),
        pod_port: local_port as u16,
    };
    if RELAYS.get_ptr(relay).is_some() {
        return SK_PASS;
    }
    let port = local_port as u16;
    if protocol == IPPROTO_UDP {
        // UDP is not carried by the mesh. Replies to the pod's connected
        // sockets never get here (the kernel matches them first); anything
        // else from outside reaches a permissive pod only.
        // SAFETY: as above.
        let permissive = owner.is_some_and(|o| unsafe { (*o).flags } & POD_ADDRESS_PERMISSIVE != 0);
        return if permissive { SK_PASS } else { SK_DROP };
    }
    if protocol != IPPROTO_TCP || port == AMBIT_TUNNEL_PORT.load() {
        return SK_PASS;
    }
    // A tcpSocket or gRPC probe: only a connect opened in the node's own
    // network namespace to a probe port has a record. The application's own
    // listener answers, so the probe reflects its health (no listener: the
    // kernel resets, the probe fails).
    let from_node = NodeConnection {
        node_addr: remote,
        pod_addr: local,
        node_port: u16::from_be(remote_port),
        pod_port: port,
    };
    // SAFETY: pointer returned by a successful lookup of this map.
    if NODE_CONNECTIONS
        .get_ptr(from_node)
        .is_some_and(|kind| unsafe { *kind } == PROBE_CONNECT)
    {
        return SK_PASS;
    }
    // Every other TCP port, the agent's own included: a direct dial of the
    // capture or outbound port is refused (and audited) by the agent.
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => SK_PASS,
        // No listener for this address: an address the agent has not
        // placed (added since the last sync, or claimed by two pods), or the
        // agent is down. Refuse rather than let plaintext reach the app.
        Err(err) => {
            debug!(
                &ctx,
                "inbound capture: no listener for port {} ({})", port, err
            );
            SK_DROP
        }
    }
}

/// 127.0.0.0/8 (also IPv4-mapped) or ::1.
#[inline(always)]
fn is_loopback(ip: &IpWords) -> bool {
    let [a, b, c, d] = ip.0;
    (is_v4_mapped(ip) && is_ipv4_loopback(d)) || (a == 0 && b == 0 && c == 0 && d == 1u32.to_be())
}

/// `::ffff:a.b.c.d`
#[inline(always)]
fn is_v4_mapped(ip: &IpWords) -> bool {
    let [a, b, c, _] = ip.0;
    a == 0 && b == 0 && c == IpWords::from_ipv4_word(0).0[2]
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host this crate only type-checks and lints.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
