//! Floods against the agent's resource caps, on two simulated nodes with
//! `ambit ca`: thousands of TCP connections to a pod's tunnel port that
//! never send a ClientHello, and a noisy pod opening connections without
//! end. Other pods' traffic must keep working, the agent's descriptors must
//! stay bounded and come back afterwards, and the rejections are counted.

use std::time::{Duration, Instant};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent, procfs::Usage, wait_until};
use anyhow::{Context, Result, ensure};

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "flood-survivor-5c2e\n";

/// Opens `count` TCP connections to HOST:PORT that never send a byte,
/// keeps that many open for `seconds` (re-opening those the server drops,
/// once a second), then closes them all. Prints `flooding N` once the
/// first `count` are under way and `done OPENED DROPPED` at the end.
const FLOOD: &str = r#"
import resource, selectors, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if hard < count + 64:
    sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below {count} connections")
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sel = selectors.DefaultSelector()
opened = dropped = 0
def top_up():
    global opened
    while len(sel.get_map()) < count:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_READ)
        opened += 1
top_up()
print("flooding", opened, flush=True)
end = time.monotonic() + seconds
next_top_up = time.monotonic() + 1
while time.monotonic() < end:
    # Readable = reset, closed or failed: the server dropped it.
    for key, _ in sel.select(timeout=0.2):
        sel.unregister(key.fileobj)
        key.fileobj.close()
        dropped += 1
    if time.monotonic() >= next_top_up:
        top_up()
        next_top_up += 1
for key in list(sel.get_map().values()):
    key.fileobj.close()
print("done", opened, dropped, flush=True)
"#;

/// One connection through an echo server for `seconds`: a line every
/// 200 ms, each checked when it comes back; prints `echoed I` per line and
/// `broken` (exit 1) if the connection fails.
const ECHO_CLIENT: &str = r#"
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
end, i = time.monotonic() + seconds, 0
try:
    while time.monotonic() < end:
        line = f"tick {i}\n".encode()
        s.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise ConnectionError("closed by the peer")
            got += chunk
        if got != line:
            raise ValueError(f"sent {line!r}, got {got!r}")
        print("echoed", i, flush=True)
        i += 1
        time.sleep(0.2)
except Exception as e:
    print("broken", e, flush=True)
    sys.exit(1)
"#;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Node 0: `a` (service account `frontend`), `a2` (`batch`), and `c`,
/// not in the mesh. Node 1: server pod `b` with an HTTP and an echo server.
/// `agent_args` are extra `ambit run` arguments for (node 0, node 1).
struct Flood {
    tb: Testbed,
    a: Pod,
    a2: Pod,
    b: Pod,
    c: Pod,
    _ca: Agent,
    agent0: Agent,
    agent1: Agent,
}

fn mesh(agent_args: [&[&str]; 2]) -> Result<Flood> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let a2 = tb.add_pod(0, "a2")?;
    let c = tb.add_pod(0, "c")?;
    let b = tb.add_pod(1, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    let entries = [
        WorkloadEntry::enrolled(&a).with_service_account("frontend"),
        WorkloadEntry::enrolled(&a2).with_service_account("batch"),
        WorkloadEntry::opted_out(&c),
        WorkloadEntry::enrolled(&b),
    ];
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, agent_args)?;
    Ok(Flood {
        tb,
        a,
        a2,
        b,
        c,
        _ca: ca,
        agent0,
        agent1,
    })
}

impl Flood {
    fn script(&self, name: &str, text: &str) -> Result<String> {
        let path = self.tb.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    }

    /// Starts the flood script in `from` against `target`; returns once its
    /// first connections are under way.
    fn flood(
        &self,
        from: &Pod,
        name: &str,
        target: &str,
        count: usize,
        seconds: u64,
    ) -> Result<()> {
        let script = self.script("flood.py", FLOOD)?;
        let (host, port) = target.rsplit_once(':').context("HOST:PORT")?;
        let (count, seconds) = (count.to_string(), seconds.to_string());
        self.tb.spawn(
            from,
            name,
            &["python3", "-u", &script, host, port, &count, &seconds],
        )?;
        wait_until(secs(30), || {
            ensure!(
                self.tb.stderr_of(name).is_empty(),
                "{name}: {}",
                self.tb.stderr_of(name)
            );
            Ok(self.tb.stdout_of(name).starts_with("flooding"))
        })
        .with_context(|| format!("{name} never started"))
    }

    fn flood_done(&self, name: &str) -> bool {
        self.tb.stdout_of(name).contains("done")
    }

    /// The flood's closing line: `done OPENED DROPPED`.
    fn flood_summary(&self, name: &str) -> String {
        let out = self.tb.stdout_of(name);
        out.lines().last().unwrap_or_default().to_owned()
    }

    /// Starts the echo client in pod a; returns once its connection works.
    fn echo_client(&self, name: &str, seconds: u64) -> Result<()> {
        let script = self.script("echo_client.py", ECHO_CLIENT)?;
        let (host, seconds) = (self.b.ipv4.to_string(), seconds.to_string());
        let port = ECHO.to_string();
        self.tb.spawn(
            &self.a,
            name,
            &["python3", "-u", &script, &host, &port, &seconds],
        )?;
        wait_until(secs(20), || Ok(self.echoed(name) >= 3))
            .with_context(|| format!("echo client: {}", self.tb.stdout_of(name)))
    }

    /// Lines the echo client got back so far; fails if its connection broke.
    fn echoed(&self, name: &str) -> usize {
        let out = self.tb.stdout_of(name);
        assert!(
            !out.contains("broken"),
            "the established connection broke:\n{out}"
        );
        out.lines().filter(|l| l.starts_with("echoed")).count()
    }

    fn curl_b(&self, from: &Pod) -> Result<()> {
        let url = format!("http://{}:{HTTP}/index.txt", self.b.ipv4);
        let (code, body) = self.tb.curl(from, &url)?;
        ensure!(
            (code, body.as_str()) == (0, BODY),
            "curl from {} to b during the flood: exit {code}, body {body:?}",
            from.name
        );
        Ok(())
    }
}

/// The largest usage of `pid` seen while `running` stays true, sampled
/// every 100 ms, for at most `limit`.
fn peak_while(pid: u32, limit: Duration, mut running: impl FnMut() -> bool) -> Result<Usage> {
    let deadline = Instant::now() + limit;
    let mut peak = Usage::of(pid)?;
    while running() && Instant::now() < deadline {
        peak = peak.max(Usage::of(pid)?);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(peak)
}

/// Waits until `pid` holds at most `fds` descriptors again; returns its usage.
fn settled(pid: u32, fds: usize, limit: Duration) -> Result<Usage> {
    wait_until(limit, || Ok(Usage::of(pid)?.fds <= fds)).with_context(|| {
        format!(
            "the agent still holds {:?} descriptors, idle was about {fds}",
            Usage::of(pid).map(|u| u.fds)
        )
    })?;
    // Let the allocator hand back what the flood's connections used.
    std::thread::sleep(secs(2));
    Usage::of(pid)
}

const PER_SOURCE: usize = 32;
const FLOOD_CONNECTIONS: usize = 5000;

#[test]
fn a_handshake_flood_from_one_source_leaves_the_tunnel_port_to_everyone_else() -> Result<()> {
    let per_source = PER_SOURCE.to_string();
    let m = mesh([
        &[],
        &[
            "--max-pending-handshakes",
            "256",
            "--max-pending-handshakes-per-source",
            &per_source,
            "--tunnel-handshake-timeout-ms",
            "3000",
        ],
    ])?;
    let pid = m.agent1.pid;
    // An established tunnel connection (a, identity frontend) that must
    // keep working through the flood.
    m.echo_client("echo-a", 90)?;
    let idle = Usage::of(pid)?;

    let target = format!("{}:15008", m.b.ipv4);
    m.flood(&m.c, "flood", &target, FLOOD_CONNECTIONS, 15)?;
    let rejected = r#"ambit_connections_rejected_total{reason="pending_handshakes_per_source"}"#;
    let floor = f64::from(u32::try_from(FLOOD_CONNECTIONS - PER_SOURCE)?);
    wait_until(secs(30), || Ok(m.agent1.metric(&m.tb, rejected)? >= floor))
        .context("the first wave of the flood was not rejected")?;

    // During the flood: a new identity (batch, never seen by b's agent)
    // needs a fresh TLS handshake with b's tunnel port, and gets one.
    let echoed_before = m.echoed("echo-a");
    m.curl_b(&m.a2)?;
    ensure!(
        m.agent1
            .records("tunnel accepted")
            .iter()
            .any(|r| r["peer_spiffe_id"] == "spiffe://cluster.local/ns/default/sa/batch"),
        "b's agent logged no handshake with the new identity"
    );
    let during = peak_while(pid, secs(40), || !m.flood_done("flood"))?;
    ensure!(m.flood_done("flood"), "the flood did not end");
    ensure!(
        m.echoed("echo-a") > echoed_before,
        "the established connection made no progress during the flood"
    );
    let after = settled(pid, idle.fds + 8, secs(20))?;
    let total_rejected = m.agent1.metric(&m.tb, rejected)?;
    eprintln!(
        "handshake flood ({FLOOD_CONNECTIONS} held, {}) against b's agent: idle {idle}; \
         peak during {during}; after {after}; rejected {total_rejected}",
        m.flood_summary("flood")
    );
    // The agent held at most the source's pending handshakes on top of its
    // idle descriptors (plus the legitimate connections of this test).
    ensure!(
        during.fds <= idle.fds + PER_SOURCE + 16,
        "descriptors during the flood: {} (idle {})",
        during.fds,
        idle.fds
    );
    ensure!(
        after.rss_kib <= idle.rss_kib + 16 * 1024,
        "RSS did not come back: idle {idle}, after {after}"
    );
    // The connections it did hold timed out instead of waiting for ever.
    let timeouts = m.agent1.metric(
        &m.tb,
        r#"ambit_tls_handshake_failures_total{reason="timeout"}"#,
    )?;
    ensure!(timeouts >= 1.0, "no handshake timed out");
    // And the established connection still works afterwards.
    let echoed_after_flood = m.echoed("echo-a");
    wait_until(secs(5), || Ok(m.echoed("echo-a") > echoed_after_flood))?;
    Ok(())
}

#[test]
fn a_noisy_pod_cannot_take_the_nodes_connections() -> Result<()> {
    const PER_POD: usize = 64;
    let per_pod = PER_POD.to_string();
    let m = mesh([&["--max-connections-per-pod", &per_pod], &[]])?;
    let pid = m.agent0.pid;
    m.echo_client("echo-a", 90)?;
    let idle = Usage::of(pid)?;

    // Pod a2's application opens connection after connection to b and
    // holds them; its agent admits its budget and resets the rest.
    let target = format!("{}:{ECHO}", m.b.ipv4);
    m.flood(&m.a2, "noisy", &target, 1000, 10)?;
    let rejected = r#"ambit_connections_rejected_total{reason="pod_connections"}"#;
    let floor = f64::from(u32::try_from(1000 - PER_POD)?);
    wait_until(secs(30), || Ok(m.agent0.metric(&m.tb, rejected)? >= floor))
        .context("the noisy pod's connections over its budget were not rejected")?;

    // Pod a, on the same node, opens new connections meanwhile.
    let echoed_before = m.echoed("echo-a");
    m.curl_b(&m.a)?;
    let during = peak_while(pid, secs(40), || !m.flood_done("noisy"))?;
    ensure!(m.flood_done("noisy"), "the noisy pod did not stop");
    ensure!(
        m.echoed("echo-a") > echoed_before,
        "pod a's established connection made no progress"
    );
    let after = settled(pid, idle.fds + 8, secs(20))?;
    eprintln!(
        "noisy pod (1000 held, {}) on node 0's agent: idle {idle}; peak during {during}; \
         after {after}; rejected {}",
        m.flood_summary("noisy"),
        m.agent0.metric(&m.tb, rejected)?
    );
    // Each admitted connection holds one descriptor here (its stream shares
    // the pooled tunnel), so the pod's budget bounds what the agent holds.
    ensure!(
        during.fds <= idle.fds + PER_POD + 16,
        "descriptors during the flood: {} (idle {})",
        during.fds,
        idle.fds
    );
    Ok(())
}
