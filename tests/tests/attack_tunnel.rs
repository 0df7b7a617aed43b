//! The tunnel pool under attack from its own traffic and from the network
//! (hardening findings 7 and 8), on two nodes with `ambit ca`:
//! - one pod holding more idle connections than a tunnel connection has
//!   streams does not starve its next connection: the agent opens another
//!   tunnel connection beside the full one;
//! - a peer node that vanishes without a RST is noticed by PING on both
//!   ends, new connections fail fast instead of hanging, the server agent
//!   frees that tunnel's streams and upstream connections, and traffic
//!   flows again once the network is back.

use std::{path::PathBuf, time::Duration};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent, stderr, wait_until};
use anyhow::{Context, Result, ensure};

const HTTP: u16 = 8080;
/// The holding server's port (many idle connections, one process).
const HOLD: u16 = 9100;
const BODY: &str = "served-on-node-1-7c2e\n";

/// More idle connections than one tunnel connection takes streams (the
/// server advertises 1000 concurrent streams).
const IDLE_CONNECTIONS: usize = 1100;

/// Serves many connections from one process (`serve PORT`), or opens N
/// connections to HOST:PORT, proves each carries a byte both ways, reports
/// and holds them (`hold HOST PORT N`).
const HOLDER: &str = r#"
import resource, selectors, socket, sys, time

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()

if sys.argv[1] == "serve":
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", int(sys.argv[2])))
    ls.listen(4096)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ls:
                try:
                    conn, _ = ls.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if data:
                key.fileobj.send(data)
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
else:
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    held = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"x")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        held.append(s)
    echoed = 0
    deadline = time.monotonic() + 30
    while echoed < n and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            if key.fileobj.recv(1):
                echoed += 1
            sel.unregister(key.fileobj)
    print(f"held {n} echoed {echoed}", flush=True)
    time.sleep(3600)
"#;

/// Node 0: client pod `a`. Node 1: server pod `b` with an HTTP server and
/// the holding server.
struct Mesh {
    tb: Testbed,
    a: Pod,
    b: Pod,
    holder: PathBuf,
    _ca: Agent,
    agent0: Agent,
    agent1: Agent,
}

/// Lets the agents started from here (they inherit the limit) hold one
/// socket per relayed connection for well over a thousand connections.
fn raise_fd_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit"
        );
        limit.rlim_cur = limit.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
            "setrlimit"
        );
    }
    Ok(())
}

fn mesh(agent_flags: &[&str]) -> Result<Mesh> {
    raise_fd_limit()?;
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(1, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    let holder = tb.dir.path().join("holder.py");
    std::fs::write(&holder, HOLDER)?;
    tb.spawn(
        &b,
        "hold-server",
        &[
            "python3",
            "-u",
            holder.to_str().unwrap(),
            "serve",
            &HOLD.to_string(),
        ],
    )?;
    tb.wait_for_listener(&b, HOLD)?;
    let entries = [WorkloadEntry::enrolled(&a), WorkloadEntry::enrolled(&b)];
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [agent_flags, agent_flags])?;
    Ok(Mesh {
        tb,
        a,
        b,
        holder,
        _ca: ca,
        agent0,
        agent1,
    })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Mesh {
    fn url(&self) -> String {
        format!("http://{}:{HTTP}/index.txt", self.b.ipv4)
    }

    /// Starts `n` held connections from `a` to b's holding server and
    /// waits for the holder's report: how many carried a byte both ways.
    fn hold_connections(&self, name: &str, n: usize) -> Result<usize> {
        let (ip, port, count) = (self.b.ipv4.to_string(), HOLD.to_string(), n.to_string());
        self.tb.spawn(
            &self.a,
            name,
            &[
                "python3",
                "-u",
                self.holder.to_str().unwrap(),
                "hold",
                &ip,
                &port,
                &count,
            ],
        )?;
        wait_until(secs(120), || {
            Ok(self.tb.stdout_of(name).contains("held") || !self.tb.stderr_of(name).is_empty())
        })
        .with_context(|| format!("{name} never reported"))?;
        let report = self.tb.stdout_of(name);
        let echoed = report
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{name}: {report:?} {}", self.tb.stderr_of(name)))?;
        Ok(echoed)
    }

    /// Established TCP connections in pod b matching an `ss` filter.
    fn established_in_b(&self, filter: &str) -> Result<usize> {
        let out = self
            .tb
            .run(&self.b, &["ss", "-Htn", "state", "established", filter])?;
        ensure!(out.status.success(), "ss: {}", stderr(&out));
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    /// Drops (or restores) IPv4 traffic between the two pod ranges on both
    /// nodes: a blackhole route discards silently, with no ICMP and no RST,
    /// as when the other host vanished.
    fn blackhole(&self, on: bool) -> Result<()> {
        for (node, other) in [(0usize, 1usize), (1, 0)] {
            let range = format!("198.18.{other}.0/24");
            let via = self.tb.node(other).link_ipv4.to_string();
            let mut args = vec!["ip", "route", "replace"];
            if on {
                args.extend(["blackhole", &range]);
            } else {
                args.extend([range.as_str(), "via", &via]);
            }
            let out = self.tb.run(self.tb.node(node), &args)?;
            ensure!(out.status.success(), "ip route: {}", stderr(&out));
        }
        Ok(())
    }
}

fn dead_tunnel_records(agent: &Agent, prefix: &str) -> usize {
    agent
        .logs()
        .iter()
        .filter(|l| {
            let msg = ambit_testbed::agent::message(l);
            msg.starts_with(prefix) && msg.contains("is dead: no PING answer in")
        })
        .count()
}

#[test]
fn a_pod_holding_more_idle_connections_than_a_tunnel_has_streams_is_not_starved() -> Result<()> {
    let m = mesh(&[])?;
    // Every held connection is relayed end to end: those past the first
    // tunnel connection's 1000 streams went through a second one.
    let echoed = m.hold_connections("hold-many", IDLE_CONNECTIONS)?;
    assert_eq!(
        echoed, IDLE_CONNECTIONS,
        "connections past the first tunnel's stream limit were starved"
    );

    // A new connection from the same pod gets through promptly.
    assert_eq!(m.tb.curl(&m.a, &m.url())?, (0, BODY.to_string()));

    // A second tunnel connection was needed beside the full one.
    m.agent1
        .wait_for_records("tunnel accepted", 2, secs(10))
        .context("the server agent accepted only one tunnel connection")?;
    let pooled = m.agent0.metric(&m.tb, "ambit_tunnel_connections")?;
    assert!(
        pooled >= 2.0,
        "client agent pools {pooled} tunnel connection(s)"
    );
    Ok(())
}

#[test]
fn a_vanished_peer_is_noticed_fails_fast_and_is_forgotten_on_both_ends() -> Result<()> {
    let m = mesh(&[
        "--tunnel-ping-interval-ms",
        "1000",
        "--tunnel-ping-timeout-ms",
        "1000",
        "--connect-timeout-ms",
        "2000",
    ])?;
    assert_eq!(m.tb.curl(&m.a, &m.url())?, (0, BODY.to_string()));
    // A long-lived connection rides the pooled tunnel.
    assert_eq!(m.hold_connections("hold-one", 1)?, 1);
    assert_eq!(m.established_in_b("( sport = :15008 )")?, 1);
    assert_eq!(m.established_in_b(&format!("( dport = :{HOLD} )"))?, 1);

    m.blackhole(true)?;
    // Both agents notice within a few PING intervals (TCP alone would take
    // about 15 minutes, and never while the tunnel is idle).
    wait_until(secs(20), || {
        Ok(dead_tunnel_records(&m.agent0, "tunnel to ") >= 1)
    })
    .context("the client agent never declared the tunnel dead")?;
    wait_until(secs(20), || {
        Ok(dead_tunnel_records(&m.agent1, "tunnel from ") >= 1)
    })
    .context("the server agent never declared the tunnel dead")?;
    assert!(
        m.agent0.metric(
            &m.tb,
            "ambit_tunnel_connections_closed_total{reason=\"dead\"}"
        )? >= 1.0
    );
    assert_eq!(m.agent0.metric(&m.tb, "ambit_tunnel_connections")?, 0.0);
    // The server agent dropped the tunnel, its stream and the relay's
    // upstream connection to the application.
    wait_until(secs(10), || {
        Ok(m.established_in_b("( sport = :15008 )")? == 0
            && m.established_in_b(&format!("( dport = :{HOLD} )"))? == 0)
    })
    .context("the server agent kept the dead tunnel's connections")?;

    // A new connection is closed by the agent (no tunnel within the
    // connect timeout), not left hanging until curl gives up (exit 28).
    let (code, body) = m.tb.curl(&m.a, &m.url())?;
    assert!(
        code != 0 && code != 28,
        "curl exit {code} during the outage: {body:?}"
    );

    m.blackhole(false)?;
    wait_until(secs(20), || {
        Ok(m.tb.curl(&m.a, &m.url())? == (0, BODY.to_string()))
    })
    .context("no traffic after the network came back")?;
    Ok(())
}
