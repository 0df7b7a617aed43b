//! Types shared by the eBPF programs (`ambit-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is used as a
//! BPF map key or value, so both sides must agree on its exact layout.
#![no_std]

/// Default SO_MARK carried by every socket the agent opens (for the sidecar
/// mode's netfilter rules). The eBPF programs do not trust it: any process
/// with CAP_NET_RAW can set a mark; they recognise the agent by its cgroup.
pub const DEFAULT_SOCKET_MARK: u32 = 0x0a3b;
/// Port of the outbound listener the agent opens inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's inbound plaintext-capture listener in each pod.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Port of the agent's inbound mTLS tunnel (HBONE) listener on each pod IP.
pub const TUNNEL_PORT: u16 = 15008;

/// Names of the maps, as pinned under the agent's bpffs directory.
pub const MAP_ENROLLED: &str = "AMBIT_ENROLLED";
pub const MAP_PENDING: &str = "AMBIT_PENDING";
pub const MAP_ORIG_DST: &str = "AMBIT_ORIG_DST";
pub const MAP_POD_ADDRS: &str = "AMBIT_POD_ADDRS";
pub const MAP_INBOUND_LISTENERS: &str = "AMBIT_INBOUND_LISTENERS";
pub const MAP_PROBE_PORTS: &str = "AMBIT_PROBE_PORTS";
pub const MAP_NODE_CONNECTIONS: &str = "AMBIT_NODE_CONNECTIONS";
pub const MAP_RELAYS: &str = "AMBIT_RELAYS";
/// Names of the globals the agent sets at load time.
pub const GLOBAL_AGENT_CGROUP: &str = "AMBIT_AGENT_CGROUP";
pub const GLOBAL_OUTBOUND_PORT: &str = "AMBIT_OUTBOUND_PORT";
pub const GLOBAL_INBOUND_CAPTURE_PORT: &str = "AMBIT_INBOUND_CAPTURE_PORT";
pub const GLOBAL_TUNNEL_PORT: &str = "AMBIT_TUNNEL_PORT";
pub const GLOBAL_NODE_NETNS: &str = "AMBIT_NODE_NETNS";

/// Capacity of the per-connection maps: a ceiling on concurrent captured
/// connections per node (entries live from connect to close). They are LRU
/// maps, so past it the oldest entries are evicted; a connection whose
/// entry was evicted finds no original destination and is closed, never
/// passed through.
pub const CONNECTION_MAP_CAPACITY: u32 = 65_536;
/// Capacity of the enrollment map (pods on one node).
pub const ENROLLED_MAP_CAPACITY: u32 = 4_096;
/// Capacity of the inbound maps (pod addresses on one node, two per pod).
pub const INBOUND_MAP_CAPACITY: u32 = 8_192;
/// Capacity of the probe port map (probe ports of the pods on one node).
pub const PROBE_PORT_MAP_CAPACITY: u32 = 16_384;
/// Capacity of the map of open connections from the node's own network
/// namespace to probe ports (LRU; an entry lives from connect to close).
pub const NODE_CONNECTION_MAP_CAPACITY: u32 = 16_384;
/// Capacity of the map of the agent's transparent relays being connected
/// (LRU; an entry lives from bind until the connect completes).
pub const RELAY_MAP_CAPACITY: u32 = 16_384;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An IP address in IPv6 form (IPv4 as `::ffff:a.b.c.d`), as four 32-bit words
/// holding the address bytes in network order, exactly as the kernel's
/// `user_ip6`/`local_ip6` context fields do.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpWords(pub [u32; 4]);

impl IpWords {
    /// The IPv4-mapped form of an IPv4 address given as a network-order word.
    #[inline(always)]
    pub const fn from_ipv4_word(word: u32) -> Self {
        IpWords([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word])
    }

    #[inline(always)]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        IpWords([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.0;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }
}

/// The destination an application asked for before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub addr: IpWords,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the application dialled.
    pub family: u16,
}

/// The application's end of a captured connection, as the agent sees it when
/// it accepts on the pod's outbound listener: the pod's network namespace
/// plus the client's loopback address and ephemeral port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub addr: IpWords,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// [`PodAddress::flags`]: unsolicited UDP from outside may reach the pod.
pub const POD_ADDRESS_PERMISSIVE: u32 = 1;

/// A local address of an enrolled pod: which pod (its netns cookie), and how
/// strictly its inbound traffic is captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddress {
    pub netns_cookie: u64,
    pub flags: u32,
    pub _pad: u32,
}

/// A probe port of an enrolled pod: [`PROBE_CONNECT`] or [`PROBE_HTTP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbePort {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A tcpSocket or gRPC probe port (or an HTTPS httpGet one, whose request
/// the agent cannot read): the kubelet's probe succeeds at connect, so
/// connections opened in the node's network namespace pass straight to the
/// application's own listener.
pub const PROBE_CONNECT: u32 = 1;
/// An httpGet probe port: connections opened in the node's network
/// namespace still go to the agent, which lets through a GET for exactly a
/// declared probe path.
pub const PROBE_HTTP: u32 = 2;

/// A TCP connection opened in the node's own network namespace (the
/// kubelet's, or any host-network process's) to a probe port of an enrolled
/// pod on this node, as both ends see it. Recorded by sock_ops when the
/// connect starts (value: the probe kind), read by sk_lookup and by the
/// agent: a pod cannot create an entry, whatever source address it forges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConnection {
    pub node_addr: IpWords,
    pub pod_addr: IpWords,
    /// Host byte order.
    pub node_port: u16,
    /// Host byte order.
    pub pod_port: u16,
}

/// A transparent relay the agent is connecting inside a pod: from the
/// client's address (which the pod does not have) to the pod's
/// application. Written by the agent between bind and the end of connect;
/// sk_lookup lets exactly these through to the application's listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RelayConnection {
    pub client_addr: IpWords,
    pub pod_addr: IpWords,
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub pod_port: u16,
}

/// Per-socket state between connect and close, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingConnection {
    pub dst: OriginalDst,
    pub _pad: u32,
    /// Valid once `established` is 1: the key under which `dst` was published.
    pub client: ClientKey,
    pub established: u32,
    pub _pad2: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) plain data with explicit padding fields.
    unsafe impl aya::Pod for super::IpWords {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::PendingConnection {}
    unsafe impl aya::Pod for super::PodAddress {}
    unsafe impl aya::Pod for super::ProbePort {}
    unsafe impl aya::Pod for super::NodeConnection {}
    unsafe impl aya::Pod for super::RelayConnection {}
}
