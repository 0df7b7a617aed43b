//! The data path tried as an attacker would, on two simulated nodes with
//! real agents and `ambit ca`: every way into an enrolled pod goes through
//! the agent's gate, and a pod cannot opt out of capture. Each test here
//! failed against the agent before the hardening that it covers.
//!
//! Node 0: `a` (enrolled, service account `frontend`) and `c` (not in the
//! mesh: the attacker). Node 1: `b` (enrolled, strict, HTTP on 8080, echo on
//! 9000) and `p` (enrolled, permissive, HTTP on 8080).

use std::{path::PathBuf, time::Duration};

use ambit_testbed::{Host, Pod, Testbed, WorkloadEntry, agent::Agent, stderr, wait_until};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "attack-target-body-91c4\n";
const TD: &str = "spiffe://cluster.local";

/// Lets `frontend` reach workloads labelled `app: server` on any port.
const ALLOW_FRONTEND_TO_SERVER: &str = r#"
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-frontend, namespace: default }
spec:
  selector: { matchLabels: { app: server } }
  action: ALLOW
  rules:
    - from: [ { principals: ["spiffe://cluster.local/ns/default/sa/frontend"] } ]
"#;

struct Mesh {
    tb: Testbed,
    a: Pod,
    c: Pod,
    b: Pod,
    p: Pod,
    _ca: Agent,
    agent0: Agent,
    agent1: Agent,
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The workloads of the mesh, with `b` labelled `app: <b_app>`.
fn entries(m: (&Pod, &Pod, &Pod, &Pod), b_app: &str) -> Vec<WorkloadEntry> {
    let (a, c, b, p) = m;
    let mut p = WorkloadEntry::enrolled(p);
    p.permissive = true;
    vec![
        WorkloadEntry::enrolled(a).with_service_account("frontend"),
        WorkloadEntry::opted_out(c),
        WorkloadEntry::enrolled(b).with_label("app", b_app),
        p,
    ]
}

/// The mesh; with `policy`, node 1's agent denies by default and serves
/// that policy, else every decision is allow.
fn mesh(policy: Option<&str>) -> Result<Mesh> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let c = tb.add_pod(0, "c")?;
    let b = tb.add_pod(1, "b")?;
    let p = tb.add_pod(1, "p")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    tb.http_server(&p, "http-p", HTTP, BODY)?;
    let all = entries((&a, &c, &b, &p), "server");
    let policies = tb.dir.path().join("policies");
    let dir = policies.to_str().unwrap_or_default().to_owned();
    let agent1_args: &[&str] = match policy {
        Some(policy) => {
            std::fs::create_dir_all(&policies)?;
            std::fs::write(policies.join("policy.yaml"), policy)?;
            &["--default-policy", "deny", "--policies", &dir]
        }
        None => &[],
    };
    let (ca, agent0, agent1) = tb.start_mesh(&all, 3600, [&[], agent1_args])?;
    Ok(Mesh {
        tb,
        a,
        c,
        b,
        p,
        _ca: ca,
        agent0,
        agent1,
    })
}

impl Mesh {
    fn served(&self, server: &str) -> usize {
        self.tb.stderr_of(server).matches("GET /").count()
    }

    /// Rewrites both nodes' workloads files with `b` labelled `app: b_app`
    /// and waits until node 1's agent serves it with those labels.
    fn relabel_b(&self, b_app: &str) -> Result<()> {
        let all = entries((&self.a, &self.c, &self.b, &self.p), b_app);
        self.tb.write_workloads(0, &all)?;
        self.tb.write_workloads(1, &all)?;
        self.wait_b_labelled(b_app)
    }

    fn wait_b_labelled(&self, b_app: &str) -> Result<()> {
        wait_until(secs(10), || {
            let (_, dump) = self.agent1.admin_get(&self.tb, "/config_dump")?;
            let dump: Value = serde_json::from_str(&dump).unwrap_or_default();
            Ok(dump["workloads"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w["workload"] == "default/b" && w["labels"]["app"] == b_app)
            }))
        })
        .with_context(|| format!("node 1's agent never labelled b app={b_app}"))
    }

    /// Opens a connection from a to b's echo port that stays open for a
    /// minute unless the agents end it, and returns once node 1's agent
    /// has accepted it through the tunnel. A first dial can fail while the
    /// agents are still settling (socat then exits at once), so it is made
    /// again, up to four times.
    fn hold_connection_from_a(&self) -> Result<()> {
        const ACCEPTED: &str = "inbound connection accepted";
        let target = format!("TCP:{}:{ECHO}", self.b.ipv4);
        let before = self.agent1.records(ACCEPTED).len();
        let mut failures = Vec::new();
        for attempt in 1..=4 {
            let name = format!("long-echo-{attempt}");
            self.tb.spawn(
                &self.a,
                &name,
                &["socat", "-T", "60", "EXEC:sleep 60", &target],
            )?;
            let accepted = self.agent1.wait_for_records(ACCEPTED, before + 1, secs(5));
            if accepted.is_ok() {
                return Ok(());
            }
            failures.push(format!("{name}: {}", self.tb.stderr_of(&name).trim()));
        }
        bail!("node 1's agent never accepted a held connection from a: {failures:?}")
    }

    fn audit1(&self) -> Vec<Value> {
        self.agent1.audit_records()
    }
}

/// What a plaintext TCP client got: the server's bytes, or how it failed.
#[derive(Debug, PartialEq)]
enum Outcome {
    Served(String),
    Refused(String),
}

/// Connects from `host` to `addr` (an IPv6 address may carry a `%zone`),
/// sends an HTTP GET, and reports what came back, with python so that a
/// link-local zone needs no URL escaping.
fn plaintext_get(tb: &Testbed, host: &dyn Host, addr: &str, port: u16) -> Result<Outcome> {
    let script = format!(
        r#"
import socket, sys
try:
    s = socket.create_connection(("{addr}", {port}), timeout=5)
    s.sendall(b"GET /index.txt HTTP/1.0\r\n\r\n")
    data = s.recv(65536)
    print("served" if data else "refused: empty", data.decode(errors="replace"))
except OSError as e:
    print("refused:", e)
"#
    );
    let out = tb.run_within(host, &["python3", "-c", &script], secs(20))?;
    ensure!(out.status.success(), "python: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(match text.strip_prefix("served") {
        Some(body) => Outcome::Served(body.to_owned()),
        None => Outcome::Refused(text),
    })
}

/// The pod's IPv6 link-local address on eth0.
fn link_local(tb: &Testbed, pod: &Pod) -> Result<String> {
    let mut found = None;
    wait_until(secs(10), || {
        let out = tb.run(
            pod,
            &[
                "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "2: eth0    inet6 fe80::.../64 scope link \n" once DAD is done.
        found = text
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .filter(|_| !text.contains("tentative"))
            .and_then(|cidr| cidr.split('/').next())
            .map(str::to_owned);
        Ok(found.is_some())
    })
    .context("pod has no usable link-local address")?;
    Ok(found.unwrap_or_default())
}

fn plaintext_denials(m: &Mesh, dst_ip: &str) -> Vec<Value> {
    m.audit1()
        .into_iter()
        .filter(|r| {
            r["event"] == "decision"
                && r["decision"] == "deny"
                && r["destination"]["address"] == dst_ip
                && r["source"]["spiffe_id"].is_null()
        })
        .collect()
}

#[test]
fn plaintext_to_link_local_and_secondary_addresses_is_refused_even_with_the_agent_down()
-> Result<()> {
    let m = mesh(None)?;
    let node1 = m.tb.node(1).clone();

    // The pod's link-local address, from its neighbour on the link (the node).
    let fe80 = link_local(&m.tb, &m.b)?;
    let outcome = plaintext_get(&m.tb, &node1, &format!("{fe80}%br0"), HTTP)?;
    assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    wait_until(secs(10), || Ok(!plaintext_denials(&m, &fe80).is_empty()))
        .context("no audit record for the link-local attempt")?;

    // A secondary address added while the agent runs: refused at once (not
    // yet placed, so the kernel refuses it), and audited once the agent
    // placed it at its next sync.
    let secondary = "198.18.1.200";
    let added = m.tb.run(
        &m.b,
        &[
            "ip",
            "addr",
            "add",
            &format!("{secondary}/32"),
            "dev",
            "eth0",
        ],
    )?;
    ensure!(added.status.success(), "ip addr add: {}", stderr(&added));
    let outcome = plaintext_get(&m.tb, &m.c, secondary, HTTP)?;
    assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    m.agent1
        .wait_for_records("workload addresses updated", 1, secs(15))?;
    let outcome = plaintext_get(&m.tb, &m.c, secondary, HTTP)?;
    assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    wait_until(
        secs(10),
        || Ok(!plaintext_denials(&m, secondary).is_empty()),
    )
    .context("no audit record for the secondary address")?;
    assert_eq!(m.served("http-b"), 0, "plaintext reached the application");

    // With the agent gone, nothing gets in either (fail closed).
    m.agent1.stop_with(libc::SIGKILL)?;
    for (host, addr) in [
        (&node1 as &dyn Host, format!("{fe80}%br0")),
        (&m.c, secondary.to_owned()),
        (&m.c, m.b.ipv4.to_string()),
    ] {
        let outcome = plaintext_get(&m.tb, host, &addr, HTTP)?;
        assert!(
            matches!(outcome, Outcome::Refused(_)),
            "{addr}: {outcome:?}"
        );
    }
    assert_eq!(m.served("http-b"), 0, "plaintext reached the application");
    Ok(())
}

#[test]
fn unsolicited_udp_reaches_only_permissive_pods_and_replies_to_a_pods_own_flows_arrive()
-> Result<()> {
    let m = mesh(None)?;
    let udp_bound = |pod: &Pod, port: u16| {
        let filter = format!("sport = :{port}");
        wait_until(secs(10), || {
            Ok(!m.tb.run(pod, &["ss", "-Hlun", &filter])?.stdout.is_empty())
        })
    };
    let received = |pod: &Pod, name: &str| -> Result<PathBuf> {
        let file = m.tb.dir.path().join(format!("{name}.udp"));
        m.tb.spawn(
            pod,
            name,
            &[
                "socat",
                "-u",
                "UDP6-RECV:7000,ipv6only=0",
                &format!("CREATE:{}", file.display()),
            ],
        )?;
        udp_bound(pod, 7000)?;
        Ok(file)
    };
    let strict = received(&m.b, "udp-b")?;
    let permissive = received(&m.p, "udp-p")?;
    // An echo server outside the mesh, for the strict pod's own flow.
    m.tb.spawn(
        &m.c,
        "udp-echo-c",
        &["socat", "UDP6-LISTEN:7001,ipv6only=0,fork", "PIPE"],
    )?;
    udp_bound(&m.c, 7001)?;
    for (pod, name) in [(&m.b, "b"), (&m.p, "p")] {
        let send = format!(
            "echo datagram-for-{name} | socat -u - UDP:{}:7000",
            pod.ipv4
        );
        let out = m.tb.sh(&m.c, &send)?;
        ensure!(out.status.success(), "socat: {}", stderr(&out));
    }
    // The strict pod's own (connected) flow gets its reply.
    let echo = m.tb.sh(
        &m.b,
        &format!("echo ping-7f | socat -t 2 - UDP:{}:7001", m.c.ipv4),
    )?;
    assert_eq!(String::from_utf8_lossy(&echo.stdout).trim(), "ping-7f");
    wait_until(secs(10), || {
        Ok(std::fs::read_to_string(&permissive)
            .unwrap_or_default()
            .contains("datagram-for-p"))
    })
    .context("the permissive pod never got its datagram")?;
    // The permissive pod's datagram arrived after the strict one was sent.
    assert_eq!(
        std::fs::read_to_string(&strict).unwrap_or_default(),
        "",
        "unsolicited UDP reached a strict pod"
    );
    Ok(())
}

#[test]
fn a_relabelled_destination_is_decided_on_its_current_labels_on_a_pooled_tunnel() -> Result<()> {
    let m = mesh(Some(ALLOW_FRONTEND_TO_SERVER))?;
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    // A long-lived connection that the relabel must end.
    m.hold_connection_from_a()?;
    wait_until(secs(10), || Ok(m.agent1.allowed_decisions("inbound") >= 2))?;

    m.relabel_b("other")?;
    let (code, _) = m.tb.curl(&m.a, &url)?;
    assert_ne!(code, 0, "a stream on the pooled tunnel used the old labels");
    assert_eq!(m.served("http-b"), 1);
    wait_until(secs(10), || {
        Ok(m.audit1().iter().any(|r| {
            r["event"] == "close"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("policy no longer allows"))
        }))
    })
    .context("the running connection was not closed after the relabel")?;

    // Labelled back: the next stream is allowed again, on the same node
    // agents and without a restart.
    m.relabel_b("server")?;
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    assert_eq!(m.served("http-b"), 2);
    // Neither change released the pod.
    assert!(m.agent1.records("workload unenrolled").is_empty());
    assert_eq!(
        m.agent1.records("workload enrolled").len(),
        2,
        "b and p, once each"
    );
    Ok(())
}

#[test]
fn relabelling_never_leaves_a_pod_uncaptured_and_a_failed_capture_shows_in_readyz() -> Result<()> {
    let m = mesh(None)?;
    for round in 0..10 {
        let app = if round % 2 == 0 { "x" } else { "server" };
        let all = entries((&m.a, &m.c, &m.b, &m.p), app);
        m.tb.write_workloads(1, &all)?;
        // Plaintext from the attacker, while the agent applies the change.
        for _ in 0..3 {
            let outcome = plaintext_get(&m.tb, &m.c, &m.b.ipv4.to_string(), HTTP)?;
            assert!(
                matches!(outcome, Outcome::Refused(_)),
                "round {round}: {outcome:?}"
            );
        }
        m.wait_b_labelled(app)?;
    }
    assert_eq!(m.served("http-b"), 0, "plaintext reached the application");
    assert!(m.agent1.records("workload unenrolled").is_empty());

    // A workload whose namespace cannot be opened: not captured, and said so.
    let mut all = entries((&m.a, &m.c, &m.b, &m.p), "server");
    let mut ghost = WorkloadEntry::enrolled(&m.p);
    ghost.pod.name = "ghost".into();
    ghost.netns_override = Some(m.tb.dir.path().join("no-such-netns"));
    all.push(ghost);
    m.tb.write_workloads(1, &all)?;
    wait_until(secs(15), || {
        Ok(m.agent1.metric(&m.tb, "ambit_workloads_not_captured")? == 1.0)
    })?;
    let (code, body) = m.agent1.admin_get(&m.tb, "/readyz")?;
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains("default/ghost should be captured but is not"),
        "{body}"
    );
    // The other pods keep being served.
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    // Gone from the file: ready again.
    m.tb.write_workloads(1, &entries((&m.a, &m.c, &m.b, &m.p), "server"))?;
    wait_until(secs(15), || {
        Ok(m.agent1.admin_get(&m.tb, "/readyz")?.0 == "200")
    })?;
    assert_eq!(m.agent1.metric(&m.tb, "ambit_workloads_not_captured")?, 0.0);
    Ok(())
}

#[test]
fn the_agent_never_dials_its_own_listeners_for_a_peer() -> Result<()> {
    let m = mesh(None)?;
    // Plaintext straight to a permissive pod's capture and outbound ports,
    // with a policy that allows everything: refused, once each.
    for port in [15006, 15001] {
        let outcome = plaintext_get(&m.tb, &m.c, &m.p.ipv4.to_string(), port)?;
        assert!(
            matches!(outcome, Outcome::Refused(_)),
            "port {port}: {outcome:?}"
        );
    }
    // Through the tunnel, a CONNECT to an agent port of the destination.
    for port in [15006, 15008, 15001] {
        let (code, _) = m.tb.curl(&m.a, &format!("http://{}:{port}/", m.b.ipv4))?;
        assert_ne!(code, 0, "CONNECT to agent port {port} went through");
    }
    let loops = |m: &Mesh| {
        m.audit1()
            .into_iter()
            .filter(|r| {
                r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("agent's own listeners"))
            })
            .count()
    };
    wait_until(secs(10), || Ok(loops(&m) >= 5))?;
    // A loop would have produced thousands of records by now.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(loops(&m), 5, "each attempt is refused exactly once");
    // The agent still serves.
    let url = format!("http://{}:{HTTP}/index.txt", m.p.ipv4);
    assert_eq!(
        m.tb.curl(&m.c, &url)?,
        (0, BODY.to_string()),
        "permissive plaintext"
    );
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()), "tunnel");
    Ok(())
}

#[test]
fn a_non_root_process_with_cap_net_raw_cannot_opt_out_of_capture_with_the_agents_mark() -> Result<()>
{
    let m = mesh(None)?;
    let marker = "marked-but-captured-3d9a";
    let client = format!(
        r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x0a3b)  # the agent's mark
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x0a3b
s.settimeout(5)
s.connect(("{}", {ECHO}))
s.sendall(b"{marker}\n")
print(s.recv(100).decode().strip())
"#,
        m.b.ipv4
    );
    let out = m.tb.run_within(
        &m.a,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+net_raw",
            "--ambient-caps=+net_raw",
            // Debian's, which a non-root user can run (setup installs it).
            "/usr/bin/python3",
            "-c",
            &client,
        ],
        secs(20),
    )?;
    ensure!(out.status.success(), "client as nobody: {}", stderr(&out));
    // b is strict: only a tunnelled connection gets an answer.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker);
    let outbound = m
        .agent0
        .wait_for_records("outbound connection closed", 1, secs(10))?;
    assert_eq!(outbound[0]["orig_dst"], format!("{}:{ECHO}", m.b.ipv4));
    assert_eq!(outbound[0]["mode"], "hbone");
    let inbound = m
        .agent1
        .wait_for_records("inbound connection closed", 1, secs(10))?;
    assert_eq!(
        inbound[0]["peer_spiffe_id"],
        format!("{TD}/ns/default/sa/frontend")
    );
    Ok(())
}

#[test]
fn a_node_credential_is_not_a_workload_identity_on_the_tunnel() -> Result<()> {
    let m = mesh(None)?;
    let file = |f: &str| {
        m.tb.dir
            .path()
            .join("ca-bootstrap/nodes/node0")
            .join(f)
            .display()
            .to_string()
    };
    let script = format!(
        "printf 'GET /index.txt HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect {}:15008 \
         -tls1_3 -cert {c} -cert_chain {c} -key {k} -alpn h2 -quiet 2>&1",
        m.b.ipv4,
        c = file("node.pem"),
        k = file("node-key.pem"),
    );
    m.tb.run_within(&m.c, &["sh", "-c", &script], secs(20))?;
    let failed = m
        .agent1
        .wait_for_records("tls handshake failed", 1, secs(10))?;
    let reason = failed[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not a workload identity"), "{failed:?}");
    assert!(m.agent1.records("tunnel accepted").is_empty());
    assert_eq!(m.served("http-b"), 0);
    Ok(())
}

#[test]
fn releasing_a_pod_ends_its_connections_and_forgets_its_identity() -> Result<()> {
    let m = mesh(None)?;
    // A connection that would otherwise stay open for a minute.
    m.hold_connection_from_a()?;
    let b_id = format!("{TD}/ns/default/sa/b");
    let (_, certs) = m.agent1.admin_get(&m.tb, "/certs")?;
    assert!(certs.contains(&b_id), "{certs}");

    // b leaves the mesh.
    let mut all = entries((&m.a, &m.c, &m.b, &m.p), "server");
    all[2].enrolled = false;
    m.tb.write_workloads(0, &all)?;
    m.tb.write_workloads(1, &all)?;
    m.agent1
        .wait_for_records("workload unenrolled", 1, secs(10))?;
    wait_until(secs(10), || {
        Ok(m.audit1()
            .iter()
            .any(|r| r["event"] == "close" && r["reason"] == "closed: the workload was released"))
    })
    .context("the released pod's connection was not closed")?;
    wait_until(secs(10), || {
        Ok(!m.agent1.admin_get(&m.tb, "/certs")?.1.contains(&b_id))
    })
    .context("the released pod's SVID is still held")?;
    Ok(())
}
