//! Run by the container runtime as a CNI plugin (CNI_COMMAND set), or by
//! the DaemonSet as `ambit-cni install` / `ambit-cni uninstall`.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use ambit_cni::{
    install::{self, Entry},
    plugin::{self, Env, Outcome},
    spec,
};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit-cni",
    about = "Ambit's chained CNI plugin and its installer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy this binary into the CNI bin dir and chain it into the active network config.
    Install {
        #[command(flatten)]
        dirs: Dirs,
        /// The agent's CNI socket (as seen from the host).
        #[arg(long, default_value = spec::DEFAULT_AGENT_SOCKET)]
        agent_socket: String,
        /// A kubeconfig the plugin reads pods and namespaces with when the agent
        /// is unreachable (without one, every Kubernetes pod fails while the agent is down).
        #[arg(long)]
        kubeconfig: Option<String>,
        /// How long ADD waits for the agent to capture a pod.
        #[arg(long, default_value_t = spec::DEFAULT_TIMEOUT_MS)]
        timeout_ms: u64,
    },
    /// Take the plugin out of the network config again and remove the binary.
    Uninstall {
        #[command(flatten)]
        dirs: Dirs,
    },
}

#[derive(Args)]
struct Dirs {
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The config file to chain into (default: the lexically first, as the runtime picks).
    #[arg(long)]
    conflist: Option<String>,
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return run_plugin();
    }
    match manage(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// stdout carries only the CNI result; diagnostics go to stderr.
fn run_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Outcome::Failure(spec::CniError::new(
            "1.0.0",
            spec::code::INVALID_ENV,
            format!("ambit-cni: reading stdin: {e}"),
        )),
        Ok(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(plugin::run(&Env::from_process(), &stdin)),
            Err(e) => Outcome::Failure(spec::CniError::new(
                "1.0.0",
                spec::code::INVALID_ENV,
                format!("ambit-cni: starting the runtime: {e}"),
            )),
        },
    };
    let (json, code) = match &outcome {
        Outcome::Success(None) => (None, ExitCode::SUCCESS),
        Outcome::Success(Some(result)) => (serde_json::to_vec(result).ok(), ExitCode::SUCCESS),
        Outcome::Failure(error) => {
            eprintln!("ambit-cni: {}", error.msg);
            (serde_json::to_vec(error).ok(), ExitCode::FAILURE)
        }
    };
    if let Some(json) = json {
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(&json)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
    code
}

fn manage(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Install {
            dirs,
            agent_socket,
            kubeconfig,
            timeout_ms,
        } => {
            let me = std::env::current_exe().context("finding this binary")?;
            let entry = Entry {
                agent_socket,
                kubeconfig,
                timeout_ms,
            };
            let done = install::install(
                &dirs.cni_conf_dir,
                &dirs.cni_bin_dir,
                dirs.conflist.as_deref(),
                &entry,
                &me,
            )?;
            eprintln!("ambit-cni install: {done:?}");
        }
        Cmd::Uninstall { dirs } => {
            let done = install::uninstall(
                &dirs.cni_conf_dir,
                &dirs.cni_bin_dir,
                dirs.conflist.as_deref(),
            )?;
            eprintln!("ambit-cni uninstall: {done:?}");
        }
    }
    Ok(())
}
