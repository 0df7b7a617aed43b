//! The three deployment shapes measured side by side on one two-node
//! testbed, and the pods each one owns. One CA and one node agent per node
//! serve the whole run: plaintext pods are opted out, node-mode pods are
//! enrolled (captured by the node agents), sidecar-mode pods are listed with
//! `sidecar: true` (the node agents leave them to their own sidecar).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, Pod, Testbed, WorkloadEntry, procfs};
use anyhow::{Context, Result};

use crate::profile::Profile;

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;

/// What a data plane spent on one load ([`Bench::spent`]).
pub struct Spent {
    pub cpu_s: f64,
    pub switches: u64,
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plaintext,
    Node,
    Sidecar,
}

/// The modes measured, in the order of the first round.
pub const MODES: [Mode; 3] = [Mode::Plaintext, Mode::Node, Mode::Sidecar];

impl Mode {
    /// The key used in results.json.
    pub fn key(self) -> &'static str {
        match self {
            Mode::Plaintext => "plaintext",
            Mode::Node => "node",
            Mode::Sidecar => "sidecar",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::Plaintext => "plaintext (not enrolled)",
            Mode::Node => "node mode (node agents)",
            Mode::Sidecar => "sidecar mode (one proxy per pod)",
        }
    }

    /// The workloads-file entry of a pod in this mode.
    fn entry(self, pod: &Pod) -> WorkloadEntry {
        match self {
            Mode::Plaintext => WorkloadEntry::opted_out(pod),
            Mode::Node => WorkloadEntry::enrolled(pod),
            Mode::Sidecar => WorkloadEntry::with_sidecar(pod),
        }
    }
}

/// One mode's client pod (node 0) and server pod (node 1).
pub struct Lane {
    pub mode: Mode,
    pub client: Pod,
    pub server: Pod,
}

impl Lane {
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.ipv4.into(), HTTP_PORT)
    }
}

/// The testbed, its daemons and the pods of every mode.
pub struct Bench {
    pub tb: Testbed,
    /// This executable, re-run inside pods.
    pub me: String,
    pub lanes: Vec<Lane>,
    pub agents: [Agent; 2],
    /// Every sidecar started, with the pod it serves.
    sidecars: Vec<(Pod, Agent)>,
    entries: Vec<WorkloadEntry>,
    _ca: Agent,
}

impl Bench {
    /// Two nodes, a client and a server pod per mode (each server running
    /// the HTTP server and iperf3), the CA, both node agents, and a sidecar
    /// in each sidecar-mode pod.
    pub fn start(modes: &[Mode], extra_agent_args: &[String]) -> Result<Self> {
        let me = std::env::current_exe()?
            .to_str()
            .context("executable path is not UTF-8")?
            .to_owned();
        let mut tb = Testbed::new(2)?;
        // The data plane logs as deployed, not as the tests read it.
        tb.set_log_filter("info");
        let mut lanes = Vec::new();
        for &mode in modes {
            let client = tb.add_pod(0, &format!("client-{}", mode.key()))?;
            // Connection-rate rounds open tens of thousands of connections
            // to one address and port; without reuse of TIME_WAIT ports the
            // client's ephemeral ports run out and connect() itself slows,
            // which would measure the port search rather than the data path.
            tb.sysctl(&client, "net.ipv4.tcp_tw_reuse", "1")?;
            let server = tb.add_pod(1, &format!("server-{}", mode.key()))?;
            lanes.push(Lane {
                mode,
                client,
                server,
            });
        }
        let entries: Vec<WorkloadEntry> = lanes
            .iter()
            .flat_map(|l| [l.mode.entry(&l.client), l.mode.entry(&l.server)])
            .collect();
        for lane in &lanes {
            start_http_server(&tb, &me, &lane.server)?;
            let name = format!("iperf3-{}", lane.server.name);
            tb.spawn(
                &lane.server,
                &name,
                &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
            )?;
            tb.wait_for_listener(&lane.server, IPERF_PORT)?;
        }
        let ca = tb.start_ca(&entries, 3600)?;
        // The default connection cap, (RLIMIT_NOFILE - 1,024) / 2, assumes
        // two descriptors per connection (a passthrough); a tunnelled one
        // holds one per agent, so the idle-connection phase can hold 10,000
        // under this machine's hard limit of 20,000.
        let mut agent_args = vec!["--max-connections", "16000"];
        agent_args.extend(extra_agent_args.iter().map(String::as_str));
        tb.write_workloads(0, &entries)?;
        tb.write_workloads(1, &entries)?;
        let agents = [
            tb.start_agent_with(0, &agent_args)?,
            tb.start_agent_with(1, &agent_args)?,
        ];
        let mut bench = Self {
            tb,
            me,
            lanes: Vec::new(),
            agents,
            sidecars: Vec::new(),
            entries,
            _ca: ca,
        };
        for lane in &lanes {
            if lane.mode == Mode::Sidecar {
                bench.start_sidecar(&lane.client)?;
                bench.start_sidecar(&lane.server)?;
            }
        }
        bench.lanes = lanes;
        Ok(bench)
    }

    pub fn lane(&self, mode: Mode) -> &Lane {
        self.lanes
            .iter()
            .find(|l| l.mode == mode)
            .expect("every measured mode has a lane")
    }

    fn start_sidecar(&mut self, pod: &Pod) -> Result<()> {
        let sidecar = self.tb.start_sidecar(pod, &self.entries, &[])?;
        self.sidecars.push((pod.clone(), sidecar));
        Ok(())
    }

    /// The processes that carry `mode`'s traffic: none for plaintext, the
    /// two node agents, or every sidecar started so far.
    pub fn data_plane(&self, mode: Mode) -> Vec<u32> {
        match mode {
            Mode::Plaintext => Vec::new(),
            Mode::Node => self.agents.iter().map(|a| a.pid).collect(),
            Mode::Sidecar => self.sidecars.iter().map(|(_, s)| s.pid).collect(),
        }
    }

    /// CPU seconds used so far by `mode`'s data plane.
    pub fn data_plane_cpu(&self, mode: Mode) -> Result<f64> {
        self.data_plane(mode)
            .into_iter()
            .map(procfs::cpu_seconds)
            .sum()
    }

    /// Context switches of `mode`'s data plane so far (every thread): with
    /// its CPU, the figure that says how much of a request's cost is wakeups.
    pub fn data_plane_switches(&self, mode: Mode) -> Result<u64> {
        self.data_plane(mode)
            .into_iter()
            .map(procfs::context_switches)
            .sum()
    }

    /// Runs `load` and returns what `mode`'s data plane spent on it: CPU
    /// seconds, context switches and the wall time, with a profile of
    /// `phase` if one was asked for ([`Profile`]).
    pub fn spent<T>(
        &self,
        mode: Mode,
        phase: &str,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Spent)> {
        let profile = Profile::start(self, mode, phase)?;
        let (cpu, switches) = (self.data_plane_cpu(mode)?, self.data_plane_switches(mode)?);
        let started = Instant::now();
        let out = load()?;
        let elapsed = started.elapsed();
        drop(profile);
        let spent = Spent {
            cpu_s: self.data_plane_cpu(mode)? - cpu,
            switches: self.data_plane_switches(mode)? - switches,
            elapsed,
        };
        Ok((out, spent))
    }

    /// Total RSS of `mode`'s data plane, KiB.
    pub fn data_plane_rss_kib(&self, mode: Mode) -> Result<u64> {
        self.data_plane(mode).into_iter().map(procfs::rss_kib).sum()
    }

    /// Adds a pod running the HTTP server to `node` and brings it into
    /// `mode` as its deployment would: listed for the node agents and the
    /// CA, and for sidecar mode its sidecar started (which waits until the
    /// sidecar serves).
    pub fn add_server_pod(&mut self, mode: Mode, node: usize, name: &str) -> Result<Pod> {
        let pod = self.tb.add_pod(node, name)?;
        start_http_server(&self.tb, &self.me, &pod)?;
        self.entries.push(mode.entry(&pod));
        self.publish()?;
        if mode == Mode::Sidecar {
            self.start_sidecar(&pod)?;
        }
        Ok(pod)
    }

    /// Enrolls (or removes) node-mode pods by rewriting the agents' files.
    pub fn set_enrolled(&mut self, pods: &[Pod]) -> Result<()> {
        self.entries
            .retain(|e| !e.pod.name.starts_with(crate::churn::POD_PREFIX));
        self.entries
            .extend(pods.iter().map(WorkloadEntry::enrolled));
        self.tb.write_workloads(0, &self.entries)?;
        self.tb.write_workloads(1, &self.entries)?;
        Ok(())
    }

    /// Rewrites the workloads file of every sidecar (or only `pod`'s) with
    /// every entry, so they know the pods added since they started.
    pub fn sync_sidecars(&self, only: Option<&Pod>) -> Result<()> {
        for (pod, sidecar) in &self.sidecars {
            if only.is_none_or(|p| p.name == pod.name) {
                sidecar.rewrite_sidecar_workloads(&self.entries)?;
            }
        }
        Ok(())
    }

    /// Writes every entry to the CA's directory and both agents' files.
    pub fn publish(&self) -> Result<()> {
        self.tb.write_ca_directory(&self.entries)?;
        self.tb.write_workloads(0, &self.entries)?;
        self.tb.write_workloads(1, &self.entries)?;
        Ok(())
    }

    /// Lists `pods` for the CA (so their SVIDs can be issued) without
    /// enrolling them anywhere.
    pub fn register_with_ca(&self, pods: &[Pod]) -> Result<()> {
        let mut all = self.entries.clone();
        all.extend(pods.iter().map(WorkloadEntry::enrolled));
        self.tb.write_ca_directory(&all)?;
        Ok(())
    }

    /// Runs `mesh-bench ARGS` in `pod` and parses the JSON it prints.
    pub fn run_in<T: serde::de::DeserializeOwned>(
        &self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> Result<T> {
        let mut argv = vec![self.me.as_str()];
        argv.extend_from_slice(args);
        let out = self.tb.run_within(pod, &argv, timeout)?;
        anyhow::ensure!(
            out.status.success(),
            "mesh-bench {} in {}: {}",
            args.join(" "),
            pod.name,
            ambit_testbed::stderr(&out)
        );
        let notes = ambit_testbed::stderr(&out);
        if !notes.is_empty() {
            eprintln!("  [{} in {}] {notes}", args[0], pod.name);
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("output of mesh-bench {}", args.join(" ")))
    }
}

fn start_http_server(tb: &Testbed, me: &str, pod: &Pod) -> Result<()> {
    let name = format!("http-{}", pod.name);
    tb.spawn(pod, &name, &[me, "http-server", &HTTP_PORT.to_string()])?;
    tb.wait_for_listener(pod, HTTP_PORT)
}
