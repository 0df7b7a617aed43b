//! The run's raw results (results.json): the machine, the configuration,
//! every figure by name, and the samples behind the time-series plots.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stats::median;

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub config: Config,
    /// The modes measured, by key (plaintext, node, sidecar).
    pub modes: Vec<String>,
    /// Every figure, by dotted name (e.g. `latency.1000rps.node.p99`).
    pub figures: BTreeMap<String, Figure>,
    /// The capturing agent under churn, sampled over time.
    pub churn_samples: Vec<Sample>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    pub value: f64,
    pub unit: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss_kib: u64,
    pub fds: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub git_commit: String,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, m)| m.trim().to_owned());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let output = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map_or("unknown".into(), |o| {
                    String::from_utf8_lossy(&o.stdout).trim().to_owned()
                })
        };
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = repo.to_str().unwrap_or(".");
        Self {
            cpu_model,
            cores,
            kernel: output("uname", &["-r"]),
            date: output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            git_commit: output("git", &["-C", repo, "rev-parse", "--short=12", "HEAD"]),
        }
    }
}

/// What a run measures and for how long.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub quick: bool,
    pub rounds: usize,
    /// Seconds of each open-loop latency run.
    pub latency_seconds: f64,
    pub iperf_seconds: u32,
    pub conn_rate_seconds: f64,
    pub conn_rate_clients: usize,
    pub conn_cost_count: usize,
    /// Pods per node at each scale step.
    pub scale_steps: Vec<usize>,
    /// Requests spread over the pods at each scale step.
    pub scale_requests: u64,
    pub churn_cycles: usize,
    pub idle_connections: usize,
    /// Extra arguments the node agents ran with (`--agent-arg`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
}

impl Config {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                latency_seconds: 1.0,
                iperf_seconds: 1,
                conn_rate_seconds: 1.0,
                conn_rate_clients: 8,
                conn_cost_count: 100,
                scale_steps: vec![2, 4],
                scale_requests: 200,
                churn_cycles: 20,
                idle_connections: 500,
                agent_args: Vec::new(),
            }
        } else {
            Self {
                quick,
                rounds: 3,
                latency_seconds: 5.0,
                iperf_seconds: 3,
                conn_rate_seconds: 3.0,
                conn_rate_clients: 8,
                conn_cost_count: 1000,
                scale_steps: vec![10, 50, 100],
                scale_requests: 4000,
                churn_cycles: 1000,
                idle_connections: 10_000,
                agent_args: Vec::new(),
            }
        }
    }
}

/// Collects figures over rounds; each becomes the median of its rounds,
/// except counts (`.requests`, `.errors`), which add up.
#[derive(Default)]
pub struct Recorder {
    values: BTreeMap<String, (String, Vec<f64>)>,
}

impl Recorder {
    pub fn record(&mut self, key: impl Into<String>, unit: &str, value: f64) {
        self.values
            .entry(key.into())
            .or_insert_with(|| (unit.to_owned(), Vec::new()))
            .1
            .push(value);
    }

    /// A load's `.requests` and `.errors` under `key`.
    pub fn record_counts(&mut self, key: &str, unit: &str, counts: crate::load::Counts) {
        self.record(format!("{key}.requests"), unit, counts.requests as f64);
        self.record(format!("{key}.errors"), unit, counts.errors as f64);
    }

    pub fn into_figures(self) -> BTreeMap<String, Figure> {
        self.values
            .into_iter()
            .map(|(key, (unit, values))| {
                let value = if key.ends_with(".requests") || key.ends_with(".errors") {
                    values.iter().sum()
                } else {
                    median(&values)
                };
                (key, Figure { value, unit })
            })
            .collect()
    }
}

impl Results {
    pub fn value(&self, key: &str) -> Option<f64> {
        self.figures.get(key).map(|f| f.value)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}
