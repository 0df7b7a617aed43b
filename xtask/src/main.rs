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
    /// Run the benchmarks with release builds: the mesh benchmark (plain vs
    /// captured traffic), CNI ADD latency over 100 pods (cni-bench), and the
    /// agent's footprint against cluster size (kube-scale).
    Bench,
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
        Task::Bench => bench(),
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
/// the CNI plugin.
fn bench() -> Result<()> {
    setup::run()?;
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "ambit-agent",
        "--package",
        "ambit-cni",
    ]))?;
    for bin in ["mesh-bench", "cni-bench", "kube-scale"] {
        exec(
            cargo()
                .args([
                    "run",
                    "--release",
                    "--package",
                    "ambit-benches",
                    "--bin",
                    bin,
                ])
                .env("AMBIT_BIN", "target/release/ambit")
                .env("AMBIT_CNI_BIN", "target/release/ambit-cni"),
        )?;
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
