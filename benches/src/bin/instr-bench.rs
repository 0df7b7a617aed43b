//! User-space instructions the two node agents execute per new connection
//! and per kept-alive request, counted by valgrind's callgrind: the one
//! figure of the data path's cost that does not move with how busy the host
//! is (this machine's timings do, with 3-30% steal), so an A/B of two agent
//! builds needs one run each, not interleaved medians. The kernel's share
//! (two thirds of the agents' CPU in `perf record`) is not counted.
//!
//! Two nodes, a client pod on node 0 and an echo server pod on node 1, one
//! agent per node started under `valgrind --tool=callgrind` with
//! instrumentation off. Once a request has crossed the tunnel and a warm-up
//! has filled the pools, instrumentation goes on for three windows, each
//! dumped separately: idle (the agents' own timers, subtracted from the
//! other two by duration), `--connections` new connections carrying one
//! 64-byte echo each, and `--requests` 1 KiB round trips on one kept-alive
//! connection. Prints one JSON object (also written to `--out`): per agent
//! and in total, instructions per connection and per request, and each
//! window's functions by self cost (`callgrind_annotate`).
//!
//! `cargo run --release -p ambit-benches --bin instr-bench` as root, after
//! `cargo build --release -p ambit-agent` (AMBIT_BIN names another build)
//! and `cargo xtask setup` (valgrind).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent};
use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};

const ECHO_PORT: u16 = 9000;
/// Functions listed per window and agent.
const TOP_FUNCTIONS: usize = 12;

#[derive(Parser)]
#[command(about = "User-space instructions of both node agents per connection and per request")]
struct Cli {
    /// New connections in the measured window.
    #[arg(long, default_value_t = 300)]
    connections: u32,
    /// Round trips of 1 KiB on one connection in the measured window.
    #[arg(long, default_value_t = 1000)]
    requests: u32,
    /// Where the callgrind files and instructions.json go (default: a new
    /// temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match cli.out {
        Some(out) => out,
        None => tempfile::Builder::new()
            .prefix("instr-bench-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let agent = ambit_testbed::agent::agent_binary()?.canonicalize()?;
    let wrapper = write_wrapper(&out, &agent)?;
    // SAFETY: no other thread exists yet; the testbed reads AMBIT_BIN when
    // it starts the CA and the agents below.
    unsafe { std::env::set_var("AMBIT_BIN", &wrapper) };

    let mut tb = Testbed::new(2)?;
    // As deployed: the tests' filter adds debug lines per connection.
    tb.set_log_filter("info");
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(1, "server")?;
    tb.echo_server(&server, "echo", ECHO_PORT)?;
    let entries = [
        WorkloadEntry::enrolled(&client),
        WorkloadEntry::enrolled(&server),
    ];
    let (_ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [&[], &[]])?;
    let agents = [("client_agent", &agent0), ("server_agent", &agent1)];

    warm_up(&tb, &client, &server)?;
    for (_, agent) in &agents {
        callgrind_control(agent, &["--instr=on"])?;
    }
    let idle = Window::measure(&agents, "idle", &out, || {
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    })?;
    let conns = Window::measure(&agents, "connections", &out, || {
        run_client(&tb, &client, &connections_script(&server, cli.connections))
    })?;
    let reqs = Window::measure(&agents, "requests", &out, || {
        run_client(&tb, &client, &requests_script(&server, cli.requests))
    })?;

    let result = json!({
        "agent": agent.display().to_string(),
        "connections": cli.connections,
        "requests": cli.requests,
        "idle_instructions_per_s": idle.per_second(),
        "per_connection": conns.per_unit(&idle, cli.connections),
        "per_request": reqs.per_unit(&idle, cli.requests),
        "top_functions": {
            "connections": conns.top,
            "requests": reqs.top,
        },
        "callgrind_files": out.display().to_string(),
    });
    let text = serde_json::to_string_pretty(&result)?;
    std::fs::write(out.join("instructions.json"), &text)?;
    println!("{text}");
    Ok(())
}

/// A shell script that runs the agent under callgrind for `ambit run` and
/// plainly for anything else (the CA).
fn write_wrapper(out: &Path, agent: &Path) -> Result<PathBuf> {
    let which = Command::new("valgrind").arg("--version").output();
    if !which.is_ok_and(|o| o.status.success()) {
        bail!("valgrind is not installed: run `cargo xtask setup` (or apt-get install valgrind)");
    }
    let path = out.join("ambit-under-callgrind.sh");
    let script = format!(
        "#!/bin/sh\n\
         case \" $* \" in\n\
         *\" run \"*) exec valgrind --tool=callgrind --instr-atstart=no \
         --callgrind-out-file={out}/callgrind.%p {agent} \"$@\" ;;\n\
         esac\n\
         exec {agent} \"$@\"\n",
        out = out.display(),
        agent = agent.display(),
    );
    std::fs::write(&path, script)?;
    let mut perms = std::fs::metadata(&path)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms)?;
    Ok(path)
}

/// Until one echo crosses the tunnel (SVIDs issued, tunnel up), then 20
/// more connections so pools, caches and the allocator are warm.
fn warm_up(tb: &Testbed, client: &Pod, server: &Pod) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while run_client(tb, client, &connections_script(server, 1)).is_err() {
        if Instant::now() > deadline {
            bail!("no echo through the mesh within 120 s of the agents' start");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    run_client(tb, client, &connections_script(server, 20))
}

fn connections_script(server: &Pod, n: u32) -> String {
    format!(
        "import socket\n\
         for _ in range({n}):\n\
         \x20   s = socket.create_connection(('{addr}', {ECHO_PORT}), timeout=60)\n\
         \x20   s.sendall(b'x' * 64)\n\
         \x20   got = b''\n\
         \x20   while len(got) < 64:\n\
         \x20       chunk = s.recv(64)\n\
         \x20       assert chunk, 'connection closed early'\n\
         \x20       got += chunk\n\
         \x20   s.close()\n",
        addr = server.ipv4
    )
}

fn requests_script(server: &Pod, n: u32) -> String {
    format!(
        "import socket\n\
         s = socket.create_connection(('{addr}', {ECHO_PORT}), timeout=60)\n\
         for _ in range({n}):\n\
         \x20   s.sendall(b'r' * 1024)\n\
         \x20   got = 0\n\
         \x20   while got < 1024:\n\
         \x20       chunk = s.recv(1024 - got)\n\
         \x20       assert chunk, 'connection closed early'\n\
         \x20       got += len(chunk)\n\
         s.close()\n",
        addr = server.ipv4
    )
}

fn run_client(tb: &Testbed, client: &Pod, script: &str) -> Result<()> {
    let out = tb.run_within(client, &["python3", "-c", script], Duration::from_secs(900))?;
    ensure!(
        out.status.success(),
        "client in pod {}: {}",
        client.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn callgrind_control(agent: &Agent, args: &[&str]) -> Result<()> {
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(agent.pid.to_string())
        .output()
        .context("running callgrind_control")?;
    ensure!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Error"),
        "callgrind_control {args:?} {}: {}{}",
        agent.pid,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One measured window: each agent's instructions and its top functions.
struct Window {
    seconds: f64,
    /// (agent's role, instructions) in the order of `agents`.
    instructions: Vec<(&'static str, u64)>,
    top: Value,
}

impl Window {
    /// Zeroes nothing: each dump resets the counters, so a window is what
    /// ran between the previous dump (or `--instr=on`) and its own.
    fn measure(
        agents: &[(&'static str, &Agent)],
        name: &str,
        out: &Path,
        load: impl FnOnce() -> Result<()>,
    ) -> Result<Self> {
        let before: Vec<usize> = agents.iter().map(|(_, a)| dumps(out, a)).collect();
        let start = Instant::now();
        load()?;
        // Close records and access-log lines are written a moment after the
        // client's last close (the writers batch for 5 ms).
        std::thread::sleep(Duration::from_millis(500));
        let seconds = start.elapsed().as_secs_f64();
        // Both dumps asked for before either is waited on, so each agent's
        // window ends at the same moment and lasts `seconds`.
        for (_, agent) in agents {
            callgrind_control(agent, &[&format!("--dump={name}")])?;
        }
        let (mut instructions, mut top) = (Vec::new(), serde_json::Map::new());
        for ((role, agent), before) in agents.iter().zip(before) {
            let file = wait_for_dump(out, agent, before + 1)?;
            instructions.push((*role, totals(&file)?));
            top.insert(role.to_string(), json!(top_functions(&file)?));
        }
        Ok(Self {
            seconds,
            instructions,
            top: Value::Object(top),
        })
    }

    fn per_second(&self) -> Value {
        let per_s = |n: u64| (n as f64 / self.seconds).round();
        let mut map: serde_json::Map<String, Value> = self
            .instructions
            .iter()
            .map(|(role, n)| (role.to_string(), json!(per_s(*n))))
            .collect();
        map.insert("total".into(), json!(per_s(self.total())));
        Value::Object(map)
    }

    /// Instructions per unit of load, the idle rate over this window's
    /// duration taken off first.
    fn per_unit(&self, idle: &Window, units: u32) -> Value {
        let net = |n: u64, idle_n: u64| {
            let background = idle_n as f64 / idle.seconds * self.seconds;
            ((n as f64 - background).max(0.0) / f64::from(units)).round()
        };
        let mut map = serde_json::Map::new();
        for ((role, n), (_, idle_n)) in self.instructions.iter().zip(&idle.instructions) {
            map.insert(role.to_string(), json!(net(*n, *idle_n)));
        }
        map.insert("total".into(), json!(net(self.total(), idle.total())));
        Value::Object(map)
    }

    fn total(&self) -> u64 {
        self.instructions.iter().map(|(_, n)| n).sum()
    }
}

/// How many dumps `agent`'s callgrind has written so far.
fn dumps(out: &Path, agent: &Agent) -> usize {
    (1..)
        .take_while(|n| dump_file(out, agent, *n).exists())
        .count()
}

fn dump_file(out: &Path, agent: &Agent, n: usize) -> PathBuf {
    out.join(format!("callgrind.{}.{n}", agent.pid))
}

/// Waits for dump number `n` to be written completely (callgrind writes
/// the totals line last).
fn wait_for_dump(out: &Path, agent: &Agent, n: usize) -> Result<PathBuf> {
    let file = dump_file(out, agent, n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while totals(&file).is_err() {
        if Instant::now() > deadline {
            bail!("callgrind did not write {} within 60 s", file.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(file)
}

/// The `totals:` line of a callgrind dump (instructions, the only event).
fn totals(file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(file)?;
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("totals:"))
        .with_context(|| format!("{} has no totals line yet", file.display()))?;
    Ok(line.trim().parse()?)
}

/// The dump's functions by self cost: "instructions function" lines, with
/// the source paths left out.
fn top_functions(file: &Path) -> Result<Vec<String>> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=no", "--threshold=100"])
        .arg(file)
        .output()
        .context("running callgrind_annotate")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(function_line)
        .take(TOP_FUNCTIONS)
        .collect())
}

/// "1,234 (5.6%)  path/file.rs:crate::function [binary]" as
/// "1234 crate::function"; None for any other line.
fn function_line(line: &str) -> Option<String> {
    let (count, rest) = line.trim_start().split_once(' ')?;
    let count: u64 = count.replace(',', "").parse().ok()?;
    let (_, name) = rest.split_once(":")?;
    let name = name.split(" [").next()?.trim();
    (!name.is_empty() && !rest.contains("PROGRAM TOTALS")).then(|| format!("{count} {name}"))
}
