//! `cargo xtask setup | test | demo | bench | render-manifests`: everything a fresh machine
//! needs, in one place.

mod deploy;
mod helm;
mod kube;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Ambit project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian machine lacks (idempotent) and mount bpffs.
    Setup,
    /// Lint and run the whole test suite, end-to-end tests included.
    Test {
        /// Extra arguments for cargo nextest (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the demo: a simulated node with pods, an agent, and real clients.
    Demo,
    /// Run the benchmarks with release builds: the mesh benchmark
    /// (plaintext vs node mode vs sidecar mode; results.json, plots and the
    /// report in docs/), the agents' instructions per connection and per
    /// request (instr-bench), CNI ADD latency over 100 pods (cni-bench), and
    /// the agent's footprint against cluster size (kube-scale).
    Bench {
        /// A short smoke run of the mesh benchmark only, written to --out
        /// (a temp dir by default), never to docs/.
        #[arg(long)]
        quick: bool,
        /// Where the mesh benchmark writes results.json and the plots.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Print the ratios new/old of every figure against an earlier
        /// results.json.
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
    },
    /// Render deploy/manifests/ambit.yaml from the Helm chart in deploy/chart.
    RenderManifests,
    /// Lint and validate the Helm chart offline (part of `test`).
    CheckDeploy,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Demo => run_with_release_agent("ambit-testbed", "ambit-demo"),
        Task::Bench {
            quick,
            out,
            compare,
        } => bench(quick, out, compare),
        Task::RenderManifests => deploy::render_manifests(),
        Task::CheckDeploy => deploy::check(),
    }
}

/// Runs a command, echoing it, and fails on a non-zero exit.
pub fn exec(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    deploy::check()?;
    exec(cargo().args(["build", "--workspace", "--bins"]))?;
    exec(
        cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(extra),
    )
}

/// The benchmark binaries, each against release builds of the agent and
/// the CNI plugin; a quick run is the mesh benchmark's smoke run only.
fn bench(
    quick: bool,
    out: Option<std::path::PathBuf>,
    compare: Option<std::path::PathBuf>,
) -> Result<()> {
    setup::run()?;
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "ambit-agent",
        "--package",
        "ambit-cni",
    ]))?;
    let run = |bin: &str, args: &[std::ffi::OsString]| {
        exec(
            cargo()
                .args([
                    "run",
                    "--release",
                    "--package",
                    "ambit-benches",
                    "--bin",
                    bin,
                    "--",
                ])
                .args(args)
                .env("AMBIT_BIN", "target/release/ambit")
                .env("AMBIT_CNI_BIN", "target/release/ambit-cni"),
        )
    };
    let mut args = Vec::new();
    if quick {
        args.push("--quick".into());
    }
    if let Some(out) = out {
        args.extend(["--out".into(), out.into_os_string()]);
    }
    if let Some(old) = compare {
        // Relative to where xtask was started, not to mesh-bench's cwd.
        let old = std::path::absolute(&old).unwrap_or(old);
        args.extend(["--compare".into(), old.into_os_string()]);
    }
    run("mesh-bench", &args)?;
    if !quick {
        for bin in ["instr-bench", "cni-bench", "kube-scale"] {
            run(bin, &[])?;
        }
    }
    Ok(())
}

/// Builds the agent in release mode and runs a testbed binary against it.
fn run_with_release_agent(package: &str, bin: &str) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["build", "--release", "--package", "ambit-agent"]))?;
    exec(
        cargo()
            .args(["run", "--release", "--package", package, "--bin", bin])
            .env("AMBIT_BIN", "target/release/ambit"),
    )
}
