//! Settings of a running agent, from the command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ambit_common::{DEFAULT_SOCKET_MARK, OUTBOUND_PORT};

/// Where to find the kernel objects the agent works with, and how it marks
/// and names its own sockets.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// cgroup v2 directory the programs attach to; `None` = the cgroup v2 root
    /// found in /proc/self/mountinfo.
    pub cgroup_path: Option<PathBuf>,
    /// Directory on a bpffs where maps and links are pinned, so the programs
    /// keep failing closed while the agent restarts.
    pub bpf_pin_dir: PathBuf,
    pub socket_mark: u32,
    pub outbound_port: u16,
    /// Relay inbound connections from the client's own address (see
    /// [`crate::transparent`]).
    pub transparent_source: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            cgroup_path: None,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/ambit"),
            socket_mark: DEFAULT_SOCKET_MARK,
            outbound_port: OUTBOUND_PORT,
            transparent_source: true,
        }
    }
}

/// Where the agent's workload SVIDs come from.
#[derive(Clone, Debug)]
pub enum IdentityConfig {
    /// A CA inside the agent (one-node local mode).
    Embedded { svid_ttl: Option<Duration> },
    /// `ambit ca` at `addr`; the node credential and the bundle are read
    /// from `bootstrap_dir` (as `ambit ca --bootstrap-dir` writes them).
    Remote {
        /// `HOST:PORT`, resolved at each connection.
        addr: String,
        bootstrap_dir: PathBuf,
    },
    /// `ambit ca --kubernetes`: the bundle from its ConfigMap, the node
    /// credential by attestation with the pod's service-account token.
    Attested(crate::ca_service::kubernetes::AgentCaConfig),
}

/// Where the agent learns which workloads run where.
#[derive(Clone, Debug)]
pub enum WorkloadSource {
    /// A local YAML file (the demo and the tests).
    File(PathBuf),
    Kubernetes(crate::workloads::kubernetes::KubernetesConfig),
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Threads of the async runtime that serves connections.
    pub worker_threads: usize,
    pub capture: CaptureConfig,
    pub trust_domain: String,
    pub identity: IdentityConfig,
    pub workloads: WorkloadSource,
    /// How often the workloads file is re-read.
    pub reload_interval: Duration,
    pub connect_timeout: Duration,
    /// On SIGTERM/SIGINT, detach the programs and remove the pins instead of
    /// leaving enrolled pods failing closed until the next agent starts.
    pub cleanup_on_exit: bool,
    pub policy: PolicyConfig,
    /// `None`: standard output.
    pub audit_log: Option<PathBuf>,
    pub audit_max_bytes: u64,
    /// Rate limit of audit records without a verified source identity.
    pub audit_limits: crate::audit::LimiterConfig,
    pub admin_addr: SocketAddr,
    /// Admission limits against floods (connections, pending handshakes).
    pub limits: crate::proxy::limits::LimitSettings,
    /// Timeouts, liveness and pool limits of tunnel connections.
    pub tunnel: crate::tunnel::TunnelConfig,
}

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// `None`: no policy files; every decision is the mesh default.
    pub dir: Option<PathBuf>,
    pub settings: crate::policy::Settings,
    pub close_on_change: bool,
}
