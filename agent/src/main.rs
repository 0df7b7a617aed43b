//! `ambit`: the node agent's command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ambit::{
    config::{CaptureConfig, IdentityConfig, PolicyConfig, RunConfig, WorkloadSource},
    telemetry::{self, LogFormat},
    workloads::kubernetes::KubernetesConfig,
};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit",
    version,
    about = "Sidecar-less transparent mTLS node agent"
)]
struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "AMBIT_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: capture enrolled pods and proxy their traffic.
    Run(Box<RunArgs>),
    /// Run the proxy for one pod, inside its network namespace (sidecar
    /// mode; traffic reaches it through `ambit sidecar-init`'s rules).
    Sidecar(Box<SidecarArgs>),
    /// Install the nftables rules redirecting a pod's TCP to its sidecar
    /// (run as root in the pod's network namespace before the app starts).
    SidecarInit(SidecarInitArgs),
    /// Run the cluster CA: issue SVIDs to node agents over mTLS, each only
    /// for the workloads its directory places on the requesting node.
    Ca(CaArgs),
    /// Inspect audit logs.
    Audit(AuditArgs),
    /// Validate authorization policies and explain decisions.
    Policy(PolicyArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("workload_source").required(true).args(["workloads", "kubernetes"])))]
struct RunArgs {
    /// YAML file listing this node's workloads (re-read when it changes).
    #[arg(long)]
    workloads: Option<PathBuf>,
    /// Learn workloads from the Kubernetes API (in-cluster configuration
    /// unless --kubeconfig is given).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (the pods' spec.nodeName), for --kubernetes.
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    node_name: Option<String>,
    #[command(flatten)]
    cni: CniArgs,
    /// cgroup v2 directory to attach the capture programs to
    /// [default: the cgroup v2 root from /proc/self/mountinfo].
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpf_pin_dir: PathBuf,
    /// Relay inbound mesh connections to the application from the client's
    /// own address (IP_TRANSPARENT and policy routing in each pod's netns),
    /// so it sees who connected; `false`: from the pod's own address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    transparent_source: bool,
    /// On SIGTERM/SIGINT, detach the programs and remove the pins. Without
    /// it, enrolled pods fail closed until the next agent starts.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// With --kubernetes: projected service-account token of this agent's
    /// pod (audience ambit-ca), re-read at each attestation to `ambit ca
    /// --kubernetes`; the trust bundle then comes from the ConfigMap
    /// --ca-bundle-configmap in --namespace, followed as it changes.
    #[arg(long, requires_all = ["ca_addr", "kubernetes"], conflicts_with = "ca_bootstrap_dir")]
    ca_token_file: Option<PathBuf>,
    /// ConfigMap (key bundle.pem) holding the trust bundle, for
    /// --ca-token-file.
    #[arg(long, default_value = "ambit-trust-bundle")]
    ca_bundle_configmap: String,
    /// This agent's namespace (the release namespace), for --ca-token-file.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

/// The proxy's settings, the same for `ambit run` and `ambit sidecar`.
#[derive(Args)]
struct ProxyArgs {
    /// SO_MARK carried by the agent's own sockets (never captured).
    #[arg(long, default_value = "0x0a3b", value_parser = parse_u32)]
    socket_mark: u32,
    /// Port of the outbound listener inside each enrolled pod.
    #[arg(long, default_value_t = ambit_common::OUTBOUND_PORT)]
    outbound_port: u16,
    /// How often to re-read the workloads file, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Address of `ambit ca`, HOST:PORT (a host name is resolved at each
    /// connection). Without it the agent runs its own CA (local mode, one
    /// node).
    #[arg(long)]
    ca_addr: Option<String>,
    /// Directory `ambit ca` wrote bundle.pem and nodes/NODE/ into.
    #[arg(long, requires = "ca_addr")]
    ca_bootstrap_dir: Option<PathBuf>,
    /// SVID lifetime of the embedded CA, in seconds (60 to 86400).
    #[arg(long, value_parser = clap::value_parser!(u64).range(60..=86400))]
    svid_ttl_secs: Option<u64>,
    /// Directory of AuthorizationPolicy files, re-read when it changes.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Decision for workloads no policy decides (the shipped default is deny).
    #[arg(long, default_value = "deny")]
    default_policy: ambit::policy::DefaultAction,
    /// Namespace whose policies apply to every workload.
    #[arg(long, default_value = ambit::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Keep running connections that a policy change no longer allows
    /// (by default they are closed).
    #[arg(long)]
    keep_connections_on_policy_change: bool,
    /// Audit log file (`-` for standard output).
    #[arg(long, default_value = "-")]
    audit_log: PathBuf,
    /// Size at which the audit log file is rotated, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    audit_max_bytes: u64,
    /// Audit records without a verified identity (failed TLS handshakes,
    /// refused plaintext) one source address may produce at once; the rest
    /// are counted into summaries.
    #[arg(long, default_value_t = 20)]
    audit_unauthenticated_burst: u32,
    /// ... and per second after that burst, per source address.
    #[arg(long, default_value = "1", value_parser = parse_rate)]
    audit_unauthenticated_per_sec: f64,
    /// ... and per second from all source addresses together.
    #[arg(long, default_value = "100", value_parser = parse_rate)]
    audit_unauthenticated_total_per_sec: f64,
    /// Source addresses the audit rate limit tracks at once (the least
    /// recently seen is forgotten first).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    audit_tracked_sources: u32,
    /// Window over which one source's suppressed records are summarised in
    /// one audit record, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    audit_summary_interval_secs: u64,
    /// Address of the admin server (/metrics, /healthz, /readyz, /config_dump, /certs).
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin_addr: std::net::SocketAddr,
    /// Bound on each tunnel handshake step (TLS, then HTTP/2 preface and
    /// SETTINGS), in milliseconds, both ends. Short, since a pending
    /// handshake holds one of the capped handshake slots.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    tunnel_handshake_timeout_ms: u64,
    /// Bound on opening one tunnel stream (slot, then the peer's answer),
    /// in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    tunnel_stream_open_timeout_ms: u64,
    /// Interval of HTTP/2 PINGs on tunnel connections, in milliseconds.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    tunnel_ping_interval_ms: u64,
    /// A tunnel whose peer leaves a PING unanswered this long is closed as
    /// dead, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    tunnel_ping_timeout_ms: u64,
    /// A pooled tunnel connection without streams this long is closed, in
    /// milliseconds.
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    tunnel_idle_timeout_ms: u64,
    /// Tunnel connections per source identity and peer; past it, new
    /// connections wait for a free stream.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    tunnel_max_connections_per_peer: u64,
    /// Tunnel connections per source identity and peer opened as soon as
    /// every one carries a stream, so concurrent streams use separate cores
    /// [default: --worker-threads].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    tunnel_parallel_connections: Option<u64>,
    /// Threads of the proxy's async runtime [default: the CPUs this process
    /// may run on].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    worker_threads: Option<u64>,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct SidecarArgs {
    /// YAML file listing the mesh's workloads (re-read when it changes);
    /// the served one must have `sidecar: true`.
    #[arg(long)]
    workloads: PathBuf,
    /// The one workload served, NAMESPACE/NAME.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    workload: String,
    /// The pod's node, whose bootstrap credential (nodes/NODE/ in
    /// --ca-bootstrap-dir) requests the SVID [default: the file's `node`].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

#[derive(Args)]
struct SidecarInitArgs {
    /// SO_MARK of the sidecar's own sockets, which are not redirected.
    #[arg(long, default_value = "0x0a3b", value_parser = parse_u32)]
    proxy_mark: u32,
    /// Exempt the sidecar by the uid it runs as instead of by mark.
    #[arg(long, value_name = "UID")]
    proxy_uid: Option<u32>,
    /// The sidecar's outbound listener port.
    #[arg(long, default_value_t = ambit_common::OUTBOUND_PORT)]
    outbound_port: u16,
    /// Inbound ports not redirected (comma-separated); 15008 never is.
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    exclude_inbound_ports: Vec<u16>,
    /// Delete the rules instead (the pod's traffic then flows in clear).
    #[arg(long)]
    remove: bool,
}

/// The agent's end of `ambit-cni` (--kubernetes only).
#[derive(Args)]
struct CniArgs {
    /// Unix socket the CNI plugin calls on ADD/DEL/CHECK (root only).
    #[arg(long, default_value = ambit::cni::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    /// Directory of the agent's node state; the CNI records are kept in
    /// its `pods/` (a tmpfs such as /var/run: they describe this boot's pods).
    #[arg(long, default_value = ambit::cni::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Admission limits against floods; over a limit a connection is reset at
/// accept and counted in `ambit_connections_rejected_total{reason}`.
#[derive(Args)]
struct LimitArgs {
    /// TLS handshakes in progress on the node's tunnel listeners.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_pending_handshakes: u32,
    /// TLS handshakes in progress from one source address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_pending_handshakes_per_source: u32,
    /// Concurrent connections of one pod, inbound and outbound each.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_pod: u32,
    /// Concurrent connections of the whole node [default: what fits in
    /// RLIMIT_NOFILE, two descriptors each, 1024 kept for the agent].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
}

impl LimitArgs {
    /// The settings, with the node-wide cap derived from `nofile` unless given.
    fn settings(&self, nofile: Option<u64>) -> ambit::proxy::limits::LimitSettings {
        let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        let derived = nofile.map_or(
            ambit::proxy::limits::LimitSettings::default().max_connections,
            ambit::fd_limit::connections_within,
        );
        ambit::proxy::limits::LimitSettings {
            max_pending_handshakes: count(self.max_pending_handshakes),
            max_pending_handshakes_per_source: count(self.max_pending_handshakes_per_source),
            max_connections_per_pod: count(self.max_connections_per_pod),
            max_connections: self.max_connections.map_or(derived, count),
        }
    }
}

/// Raises RLIMIT_NOFILE as far as allowed and says so; `None` if it could
/// not even be read.
fn raise_nofile() -> Option<u64> {
    use ambit::fd_limit::{RECOMMENDED_NOFILE, raise_nofile};
    match raise_nofile() {
        Ok(nofile) if nofile < RECOMMENDED_NOFILE => {
            tracing::warn!(
                nofile,
                recommended = RECOMMENDED_NOFILE,
                "RLIMIT_NOFILE is low for a node agent: raise the hard limit \
                 (LimitNOFILE= in the systemd unit, `ulimit -Hn`, or the container runtime's \
                 default ulimits)"
            );
            Some(nofile)
        }
        Ok(nofile) => {
            tracing::info!(nofile, "RLIMIT_NOFILE raised to the hard limit");
            Some(nofile)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE; connection cap not derived from it");
            None
        }
    }
}

#[derive(Args)]
struct CaArgs {
    /// Trust domain of the SPIFFE IDs this CA issues.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: ambit::identity::TrustDomain,
    /// Address to accept node agents on.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// Workloads file (the `run --workloads` format) listing every workload
    /// of the cluster with its `node`; re-read when it changes.
    #[arg(long, required_unless_present = "kubernetes")]
    directory: Option<PathBuf>,
    /// Directory to write bundle.pem and nodes/<NODE>/node{,-key}.pem to.
    #[arg(long, required_unless_present = "kubernetes")]
    bootstrap_dir: Option<PathBuf>,
    /// Default and maximum TTL of issued SVIDs, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=86400))]
    svid_ttl_secs: u64,
    /// How often to re-read the directory file, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Directory keeping the CA's root (root.pem, root-key.pem; in
    /// Kubernetes a Secret), made there on first start. Restarts then keep
    /// the trust bundle agents hold. Without it each start makes a new root.
    #[arg(long, conflicts_with = "kubernetes")]
    root_dir: Option<PathBuf>,
    /// Run in the cluster: root in --root-secret, trust bundle published to
    /// --bundle-configmap, workloads from the API, nodes attested with
    /// their agent pods' service-account tokens (in-cluster configuration
    /// unless --kubeconfig).
    #[arg(long, conflicts_with_all = ["directory", "bootstrap_dir"])]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The release namespace (the Secret, the ConfigMap and the agents'
    /// pods), for --kubernetes.
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("kubernetes", "true"))]
    namespace: Option<String>,
    /// Secret keeping the root (root.pem, root-key.pem), made on first start.
    #[arg(long, default_value = "ambit-ca-root")]
    root_secret: String,
    /// ConfigMap the trust bundle is published to (key bundle.pem).
    #[arg(long, default_value = "ambit-trust-bundle")]
    bundle_configmap: String,
    /// Audience an agent's token must be issued for.
    #[arg(long, default_value = "ambit-ca")]
    token_audience: String,
    /// ServiceAccount (in --namespace) the agents' pods run as; tokens of
    /// any other are refused.
    #[arg(long, default_value = "ambit-agent")]
    agent_service_account: String,
    /// TTL of a node credential obtained by attestation, in seconds; agents
    /// attest again (re-reading their token) at half of it.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(60..=86400))]
    attested_node_ttl_secs: u64,
}

#[derive(Args)]
struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit log files; exits non-zero at the first
    /// edited, removed, reordered or truncated record.
    Verify(AuditVerifyArgs),
}

#[derive(Args)]
struct AuditVerifyArgs {
    /// Files in chain order, oldest first, e.g. `audit.log.2 audit.log.1
    /// audit.log`.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The first record must carry this prev_hash: the "last record hash"
    /// an earlier verify printed for files since archived and removed.
    /// Without it (or --from-seq) the set must start at the chain's first
    /// record or where a rotation note in the set says it does.
    #[arg(long, value_name = "HASH", conflicts_with = "from_seq")]
    anchor: Option<String>,
    /// The first record must have this seq.
    #[arg(long, value_name = "N")]
    from_seq: Option<u64>,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a 32-bit number (decimal or 0x-hex): {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_writer = match telemetry::init(cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Sidecar(args) => sidecar(*args),
        Command::SidecarInit(args) => sidecar_init(args),
        Command::Ca(args) => ca(args),
        Command::Audit(args) => audit(args),
        // Prints its own findings and chooses its exit code.
        Command::Policy(args) => return policy(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "ambit failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let attested = match (&args.proxy.ca_addr, args.ca_token_file) {
        (Some(addr), Some(token_file)) => Some(IdentityConfig::Attested(
            ambit::ca_service::kubernetes::AgentCaConfig {
                addr: addr.clone(),
                token_file,
                namespace: anyhow::Context::context(
                    args.namespace,
                    "--ca-token-file needs --namespace (or POD_NAMESPACE): the namespace \
                     of the trust bundle ConfigMap",
                )?,
                bundle_configmap: args.ca_bundle_configmap,
            },
        )),
        _ => None,
    };
    let workloads = match (args.workloads, args.node_name) {
        (Some(path), _) => WorkloadSource::File(path),
        (None, node_name) => WorkloadSource::Kubernetes(KubernetesConfig {
            kubeconfig: args.kubeconfig,
            node_name: anyhow::Context::context(
                node_name,
                "--node-name (or NODE_NAME) is required",
            )?,
            cni: Some(ambit::cni::CniConfig {
                socket: args.cni.cni_socket,
                state_dir: args.cni.state_dir,
            }),
        }),
    };
    let mut config = args.proxy.into_config(workloads, attested, nofile)?;
    config.capture.cgroup_path = args.cgroup_path;
    config.capture.bpf_pin_dir = args.bpf_pin_dir;
    config.capture.transparent_source = args.transparent_source;
    config.cleanup_on_exit = args.cleanup_on_exit;
    proxy_runtime(&config)?.block_on(ambit::agent::run(config))
}

/// The async runtime of `ambit run` and `ambit sidecar`.
fn proxy_runtime(config: &RunConfig) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
}

impl ProxyArgs {
    /// The settings for a proxy reading `workloads`; `attested`: the
    /// node-attestation identity, which only `ambit run` offers.
    fn into_config(
        self,
        workloads: WorkloadSource,
        attested: Option<IdentityConfig>,
        nofile: Option<u64>,
    ) -> anyhow::Result<RunConfig> {
        let args = self;
        let workers = match args.worker_threads {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        Ok(RunConfig {
            worker_threads: workers,
            capture: CaptureConfig {
                socket_mark: args.socket_mark,
                outbound_port: args.outbound_port,
                ..CaptureConfig::default()
            },
            trust_domain: args.trust_domain,
            identity: match (args.ca_addr, args.ca_bootstrap_dir, attested) {
                (Some(addr), Some(bootstrap_dir), _) => IdentityConfig::Remote {
                    addr,
                    bootstrap_dir,
                },
                (Some(_), None, Some(attested)) => attested,
                (Some(_), None, None) => anyhow::bail!(
                    "--ca-addr needs --ca-bootstrap-dir (files written by `ambit ca`) or, with \
                     --kubernetes, --ca-token-file (node attestation)"
                ),
                (None, ..) => IdentityConfig::Embedded {
                    svid_ttl: args.svid_ttl_secs.map(Duration::from_secs),
                },
            },
            workloads,
            reload_interval: Duration::from_millis(args.reload_interval_ms),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            cleanup_on_exit: false,
            policy: PolicyConfig {
                dir: args.policies,
                settings: ambit::policy::Settings {
                    default_action: args.default_policy,
                    root_namespace: args.root_namespace,
                },
                close_on_change: !args.keep_connections_on_policy_change,
            },
            audit_log: (args.audit_log.as_os_str() != "-").then_some(args.audit_log),
            audit_max_bytes: args.audit_max_bytes,
            audit_limits: ambit::audit::LimiterConfig {
                burst: args.audit_unauthenticated_burst,
                per_sec: args.audit_unauthenticated_per_sec,
                total_per_sec: args.audit_unauthenticated_total_per_sec,
                max_sources: usize::try_from(args.audit_tracked_sources).unwrap_or(usize::MAX),
                summary_interval: Duration::from_secs(args.audit_summary_interval_secs),
            },
            admin_addr: args.admin_addr,
            limits: args.limits.settings(nofile),
            tunnel: ambit::tunnel::TunnelConfig {
                handshake_timeout: Duration::from_millis(args.tunnel_handshake_timeout_ms),
                stream_open_timeout: Duration::from_millis(args.tunnel_stream_open_timeout_ms),
                ping_interval: Duration::from_millis(args.tunnel_ping_interval_ms),
                ping_timeout: Duration::from_millis(args.tunnel_ping_timeout_ms),
                idle_timeout: Duration::from_millis(args.tunnel_idle_timeout_ms),
                max_connections_per_peer: usize::try_from(args.tunnel_max_connections_per_peer)
                    .unwrap_or(usize::MAX),
                parallel_connections_per_peer: args
                    .tunnel_parallel_connections
                    .map_or(workers, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            },
        })
    }
}

fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let run = args
        .proxy
        .into_config(WorkloadSource::File(args.workloads), None, nofile)?;
    anyhow::ensure!(
        matches!(run.identity, IdentityConfig::Remote { .. }),
        "a sidecar gets its pod's SVID from `ambit ca`, like the node agents: pass --ca-addr \
         and --ca-bootstrap-dir (an embedded CA would be trusted by nobody else)"
    );
    let config = ambit::sidecar::SidecarConfig {
        run,
        workload: args.workload,
        node_name: args.node_name,
    };
    proxy_runtime(&config.run)?.block_on(ambit::sidecar::run(config))
}

fn sidecar_init(args: SidecarInitArgs) -> anyhow::Result<()> {
    use ambit::sidecar::{
        init,
        rules::{ProxyExemption, RedirectRules},
    };
    if args.remove {
        return init::remove();
    }
    init::install(&RedirectRules {
        exemption: match args.proxy_uid {
            Some(uid) => ProxyExemption::Uid(uid),
            None => ProxyExemption::Mark(args.proxy_mark),
        },
        outbound_port: args.outbound_port,
        exclude_inbound_ports: args.exclude_inbound_ports,
    })
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    use ambit::ca_service::{CaServerConfig, kubernetes::KubernetesCaConfig};

    let base = match (args.directory, args.bootstrap_dir, args.namespace) {
        (Some(directory), Some(bootstrap_dir), _) => CaServerConfig::new(directory, bootstrap_dir),
        (_, _, Some(namespace)) if args.kubernetes => {
            CaServerConfig::in_cluster(KubernetesCaConfig {
                kubeconfig: args.kubeconfig,
                namespace,
                root_secret: args.root_secret,
                bundle_configmap: args.bundle_configmap,
                token_audience: args.token_audience,
                agent_service_account: args.agent_service_account,
            })
        }
        _ => anyhow::bail!("give --directory and --bootstrap-dir, or --kubernetes and --namespace"),
    };
    let config = CaServerConfig {
        trust_domain: args.trust_domain,
        listen: args.listen,
        svid_ttl: Duration::from_secs(args.svid_ttl_secs),
        reload_interval: Duration::from_millis(args.reload_interval_ms),
        root_dir: args.root_dir,
        attested_node_ttl: Duration::from_secs(args.attested_node_ttl_secs),
        ..base
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let server = ambit::ca_service::CaServer::bind(config).await?;
        tokio::select! {
            result = server.run() => result?,
            _ = terminate.recv() => tracing::info!("SIGTERM: CA stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: CA stopping"),
        }
        Ok(())
    })
}

fn audit(args: AuditArgs) -> anyhow::Result<()> {
    use ambit::audit::{ExpectedStart, Start};

    match args.command {
        AuditCommand::Verify(args) => {
            let expected = match (args.anchor, args.from_seq) {
                (Some(anchor), _) => ExpectedStart::Anchor(anchor),
                (None, Some(seq)) => ExpectedStart::Seq(seq),
                (None, None) => ExpectedStart::Beginning,
            };
            // A broken chain, or a start with records missing before it,
            // comes back as an error naming FILE:LINE and the problem, which
            // `main` prints and turns into exit 1.
            let summary = ambit::audit::verify_files(&args.files, &expected)?;
            println!("OK: {} records, chain intact", summary.records);
            if let Some(first) = &summary.first {
                let why = match first.start {
                    Start::Genesis => "the beginning of the chain".to_owned(),
                    Start::AfterRotation { noted_at } => format!(
                        "older files were deleted by rotation, as the record at seq {noted_at} notes"
                    ),
                    Start::AsExpected => "as expected".to_owned(),
                };
                println!(
                    "chain starts at seq {} (hash {}, prev_hash {}): {why}",
                    first.seq, first.hash, first.prev_hash
                );
            }
            for file in &summary.files {
                if let (Some((first, last)), Some(hash)) = (file.seqs, &file.last_line_hash) {
                    println!(
                        "{}: {} records, seq {first} to {last}, last record hash {hash}",
                        file.path.display(),
                        file.records
                    );
                }
            }
            if summary.dropped > 0 {
                println!(
                    "dropped records: {} (the writer fell behind or failed), in {} gaps:",
                    summary.dropped,
                    summary.gaps.len()
                );
                for gap in summary.gaps.iter().take(10) {
                    println!(
                        "  {}:{}: {} records lost before seq {}",
                        gap.path.display(),
                        gap.line,
                        gap.dropped,
                        gap.seq
                    );
                }
            }
            if summary.summaries > 0 {
                println!(
                    "suppressed records: {} unauthenticated refusals in {} summaries",
                    summary.suppressed, summary.summaries
                );
            }
            if let Some(hash) = summary.last_line_hash {
                // Kept elsewhere, this shows later whether records were cut
                // off the end, which the chain alone cannot; it is also the
                // --anchor of the files that follow once these are archived.
                println!("last record hash: {hash}");
            }
            Ok(())
        }
    }
}

#[derive(Args)]
struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files (a directory means its *.yaml and *.yml
    /// files). Prints `OK: N policies in M files`, or each error as
    /// FILE:LINE:COLUMN: REASON and exits 1.
    Check(PolicyCheckArgs),
    /// Print the decision for one connection (ALLOW or DENY) and the policy
    /// and rule that made it, or the default that did.
    Explain(PolicyExplainArgs),
}

#[derive(Args)]
struct PolicyCheckArgs {
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct PolicyExplainArgs {
    /// The peer: a SPIFFE ID, or `plaintext` for a connection from outside
    /// the mesh.
    #[arg(long, value_name = "SPIFFE_ID|plaintext")]
    from: ambit::policy::Peer,
    /// The destination workload and port.
    #[arg(long, value_name = "NAMESPACE/WORKLOAD:PORT")]
    to: ambit::policy::ConnectionTarget,
    /// Policy file or directory (repeatable); with --kubeconfig, served
    /// next to the cluster's AuthorizationPolicies.
    #[arg(
        long,
        required_unless_present = "kubeconfig",
        value_name = "DIR_OR_FILE"
    )]
    policies: Vec<PathBuf>,
    /// Workloads file (the `run --workloads` format) with the destination's
    /// labels.
    #[arg(
        long,
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    workloads: Option<PathBuf>,
    /// Ask the cluster instead: its AuthorizationPolicies, and the labels of
    /// the destination Pod (WORKLOAD is the pod's name).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Decision when no policy decides.
    #[arg(long, value_name = "deny|allow", default_value = "deny")]
    default: ambit::policy::DefaultAction,
    /// Namespace whose policies apply to every workload.
    #[arg(long, default_value = ambit::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
}

fn policy(args: PolicyArgs) -> ExitCode {
    match args.command {
        PolicyCommand::Check(args) => policy_check(args),
        PolicyCommand::Explain(args) => match policy_explain(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn policy_check(args: PolicyCheckArgs) -> ExitCode {
    match ambit::policy::load_paths(&args.files, ambit::policy::Settings::default()) {
        Ok(set) => {
            println!("OK: {} policies in {} files", set.len(), set.files().len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            // Findings go to stdout, one per line, like a linter's.
            for error in &errors.0 {
                println!("{error}");
            }
            ExitCode::FAILURE
        }
    }
}

fn policy_explain(args: PolicyExplainArgs) -> anyhow::Result<String> {
    use ambit::policy::{Destination, Request, Settings};

    let settings = Settings {
        default_action: args.default,
        root_namespace: args.root_namespace,
    };
    let set = ambit::policy::load_paths(&args.policies, settings)
        .map_err(|errors| anyhow::anyhow!("invalid policies:\n{errors}"))?;
    let Some(workloads_file) = args.workloads else {
        let kubeconfig = args.kubeconfig.as_deref();
        return tokio::runtime::Runtime::new()?.block_on(async {
            let client = ambit::workloads::kubernetes::client_for(kubeconfig).await?;
            ambit::policy::kubernetes::explain_in_cluster(client, &set, &args.from, &args.to).await
        });
    };
    let workloads = ambit::workloads::file::load(&workloads_file)?;
    let target = &args.to;
    let workload = workloads
        .workloads
        .iter()
        .find(|w| w.namespace == target.namespace && w.name == target.name)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no workload {}/{} in {}",
                target.namespace,
                target.name,
                workloads_file.display()
            )
        })?;
    let request = Request {
        source: args.from.id(),
        destination: Destination::from(workload),
        port: target.port,
    };
    Ok(ambit::policy::explain(&set, &request).to_string())
}
