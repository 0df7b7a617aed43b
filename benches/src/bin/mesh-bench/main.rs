//! The mesh benchmark: plaintext, node mode (the node agents) and sidecar
//! mode (one `ambit sidecar` per pod) measured side by side in one run on
//! the two-node testbed, interleaved round by round: latency under
//! constant-rate load, throughput, connection rate and cost, memory and CPU
//! as pods per node grow, agent memory under churn and with idle
//! connections. Writes results.json, SVG plots and the Markdown section of
//! docs/benchmarks.md (docs/benchmarks.md describes the method).
//!
//! `cargo xtask bench` runs it against release builds; `--quick` is the
//! CI-sized run (tests/quick.rs), written under `--out` (a temp dir by
//! default) so it never touches docs/.
//!
//! mesh-bench re-executes itself inside pods (`mesh-bench open-loop ...`,
//! load.rs), because capture applies to processes in a pod's netns and
//! cgroup, not to a thread of this one.

mod churn;
mod compare;
mod host;
mod http;
mod idle;
mod load;
mod modes;
mod plots;
mod profile;
mod report;
mod results;
mod rounds;
mod scale;
mod stats;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    modes::{Bench, MODES},
    results::{Config, Machine, Recorder, Results},
};

#[derive(Parser)]
#[command(about = "Plaintext vs node mode vs sidecar mode on the two-node testbed")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// One short round, 2 and 4 pods per node, 20 churn cycles, 500 idle
    /// connections: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Where results.json and the plots go (default: docs/bench for a full
    /// run, which also updates docs/benchmarks.md; a temp dir for --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the ratios of this run's figures to those of an earlier run.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Only the interleaved rounds (latency, throughput, connections), no
    /// churn, scale or idle phase, and nothing published but results.json:
    /// for A/B runs of two agent builds (AMBIT_BIN), alternated.
    #[arg(long)]
    data_path_only: bool,
    /// Rounds to take medians over (default: 1 with --quick, else 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// An extra argument for both node agents' `ambit run` (repeat for
    /// more): for A/B runs of an agent setting, e.g.
    /// `--agent-arg=--worker-threads=1`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Ratios new/old of every figure in two results.json files.
    Compare { old: PathBuf, new: PathBuf },
    /// Redraws the plots and the report from docs/bench/results.json
    /// (after a change to the report's layout), without measuring.
    Render,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(program) = args.get(1)
        && load::run_in_pod(program, &args[2..])?
    {
        return Ok(());
    }
    let cli = Cli::parse();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    match cli.command {
        Some(Command::Compare { old, new }) => return compare::print(&old, &new),
        Some(Command::Render) => {
            let results = Results::read(&docs.join("bench/results.json"))?;
            return publish(&results, &docs.join("bench"), &docs);
        }
        None => {}
    }
    let out = match (&cli.out, cli.quick) {
        (Some(out), _) => out.clone(),
        (None, false) => docs.join("bench"),
        (None, true) => tempfile::Builder::new()
            .prefix("mesh-bench-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut cfg = Config::new(cli.quick);
    cfg.rounds = cli.rounds.unwrap_or(cfg.rounds);
    cfg.agent_args = cli.agent_args.clone();
    let results = run(cfg, cli.data_path_only)?;
    let json = out.join("results.json");
    results.write(&json)?;
    if !cli.data_path_only {
        publish(&results, &out, &docs)?;
    }
    println!("\nmesh-bench: results in {}", out.display());
    for (what, value) in report::headlines(&results) {
        println!("  {what}: {value}");
    }
    if let Some(old) = cli.compare {
        compare::print(&old, &json)?;
    }
    Ok(())
}

/// Draws the plots into `out` and writes the report: into docs/benchmarks.md
/// and the README when `out` is docs/bench, else beside the plots.
fn publish(results: &Results, out: &Path, docs: &Path) -> Result<()> {
    plots::write_all(results, out)?;
    let in_docs = out.canonicalize()? == docs.join("bench").canonicalize().unwrap_or_default();
    if in_docs {
        let section = report::section(results, "bench");
        report::splice(
            &docs.join("benchmarks.md"),
            report::BEGIN,
            report::END,
            &section,
        )?;
        let readme = report::readme_section(results);
        let readme_path = docs.join("../README.md");
        report::splice(
            &readme_path,
            report::README_BEGIN,
            report::README_END,
            &readme,
        )
    } else {
        std::fs::write(
            out.join("benchmarks-section.md"),
            report::section(results, "."),
        )?;
        Ok(())
    }
}

/// Steal above this share of CPU time during the rounds is reported as a
/// noisy host (a quiet run here shows well under 1%).
const HOST_STEAL_WARN_PCT: f64 = 2.0;

fn run(cfg: Config, data_path_only: bool) -> Result<Results> {
    let modes = MODES.to_vec();
    let machine = Machine::this();
    println!(
        "mesh-bench: {} on {} ({} cores, kernel {}), modes {:?}",
        if cfg.quick { "quick run" } else { "full run" },
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        modes.iter().map(|m| m.key()).collect::<Vec<_>>()
    );
    // Room for 10,000 idle connections through each agent (two descriptors
    // each), inherited by every process the testbed starts.
    load::raise_fd_limit_to(65_536)?;
    let mut bench = Bench::start(&modes, &cfg.agent_args)?;
    let mut rec = Recorder::default();
    let host_before = host::CpuTimes::read()?;
    let rates = rounds::rates(&bench, &modes, &cfg, &mut rec)?;
    for round in 0..cfg.rounds {
        // Rotate the order so no mode always runs first or last.
        for i in 0..modes.len() {
            let mode = modes[(i + round) % modes.len()];
            println!("round {}: {}", round + 1, mode.label());
            rounds::round(&bench, mode, &rates, &cfg, &mut rec)?;
        }
    }
    let (steal, iowait) = host::CpuTimes::read()?.busy_since(&host_before);
    rec.record("host.rounds.steal_pct", "%", steal);
    rec.record("host.rounds.iowait_pct", "%", iowait);
    println!(
        "host during the rounds: {steal:.1}% of CPU time stolen, {iowait:.1}% waiting for I/O"
    );
    if steal > HOST_STEAL_WARN_PCT {
        println!(
            "  warning: the host took {steal:.1}% of this VM's CPU: compare ratios within this \
             run only, and prefer a run on a quieter host for publishing"
        );
    }
    let mut churn_samples = Vec::new();
    if !data_path_only {
        println!("churn");
        churn_samples = churn::run(&mut bench, &cfg, &mut rec)?;
        println!("scale");
        scale::run(&mut bench, &modes, &cfg, &mut rec)?;
        // Last: the agents keep much of what thousands of connections made
        // resident, which would skew the churn baseline and the scale memory.
        println!("idle connections");
        idle::run(&bench, &cfg, &mut rec)?;
    }
    Ok(Results {
        machine,
        config: cfg,
        modes: modes.iter().map(|m| m.key().to_owned()).collect(),
        figures: rec.into_figures(),
        churn_samples,
    })
}
