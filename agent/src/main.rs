//! `ambit`: the node agent's command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ambit::{
    config::{CaptureConfig, IdentityConfig, RunConfig},
    telemetry::{self, LogFormat},
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
    Run(RunArgs),
    /// Run the cluster CA: issue SVIDs to node agents over mTLS, each only
    /// for the workloads its directory places on the requesting node.
    Ca(CaArgs),
}

#[derive(Args)]
struct RunArgs {
    /// YAML file listing this node's workloads (re-read when it changes).
    #[arg(long)]
    workloads: PathBuf,
    /// cgroup v2 directory to attach the capture programs to
    /// [default: the cgroup v2 root from /proc/self/mountinfo].
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpf_pin_dir: PathBuf,
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
    /// On SIGTERM/SIGINT, detach the programs and remove the pins. Without
    /// it, enrolled pods fail closed until the next agent starts.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Address of `ambit ca`. Without it the agent runs its own CA (local
    /// mode, one node).
    #[arg(long, requires = "ca_bootstrap_dir")]
    ca_addr: Option<std::net::SocketAddr>,
    /// Directory `ambit ca` wrote bundle.pem and nodes/NODE/ into.
    #[arg(long)]
    ca_bootstrap_dir: Option<PathBuf>,
    /// SVID lifetime of the embedded CA, in seconds (60 to 86400).
    #[arg(long, value_parser = clap::value_parser!(u64).range(60..=86400))]
    svid_ttl_secs: Option<u64>,
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
    #[arg(long)]
    directory: PathBuf,
    /// Directory to write bundle.pem and nodes/<NODE>/node{,-key}.pem to.
    #[arg(long)]
    bootstrap_dir: PathBuf,
    /// Default and maximum TTL of issued SVIDs, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=86400))]
    svid_ttl_secs: u64,
    /// How often to re-read the directory file, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
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
    telemetry::init(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Ca(args) => ca(args),
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
    let config = RunConfig {
        capture: CaptureConfig {
            cgroup_path: args.cgroup_path,
            bpf_pin_dir: args.bpf_pin_dir,
            socket_mark: args.socket_mark,
            outbound_port: args.outbound_port,
        },
        trust_domain: args.trust_domain,
        identity: match (args.ca_addr, args.ca_bootstrap_dir) {
            (Some(addr), Some(bootstrap_dir)) => IdentityConfig::Remote {
                addr,
                bootstrap_dir,
            },
            _ => IdentityConfig::Embedded {
                svid_ttl: args.svid_ttl_secs.map(Duration::from_secs),
            },
        },
        workloads_file: args.workloads,
        reload_interval: Duration::from_millis(args.reload_interval_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        cleanup_on_exit: args.cleanup_on_exit,
    };
    tokio::runtime::Runtime::new()?.block_on(ambit::agent::run(config))
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let config = ambit::ca_service::CaServerConfig {
        trust_domain: args.trust_domain,
        listen: args.listen,
        svid_ttl: Duration::from_secs(args.svid_ttl_secs),
        reload_interval: Duration::from_millis(args.reload_interval_ms),
        ..ambit::ca_service::CaServerConfig::new(args.directory, args.bootstrap_dir)
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
