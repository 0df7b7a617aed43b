//! End-to-end on two simulated nodes joined by a veth link, each with its
//! own agent, and `ambit ca` issuing every SVID: the mTLS tunnel between
//! nodes, identities from certificates, and strict inbound capture.

use std::time::Duration;

use ambit_testbed::{Host, Pod, Testbed, WorkloadEntry, agent::Agent, stderr, wait_until};
use anyhow::{Context, Result, ensure};

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "served-on-node-1-4e1d\n";
const TD: &str = "spiffe://cluster.local";

/// Node 0: client pods `a` (service account `frontend`) and `a2`
/// (`batch`), and `c`, which is not in the mesh. Node 1: server pod `b`.
struct Mesh2 {
    tb: Testbed,
    a: Pod,
    a2: Pod,
    b: Pod,
    c: Pod,
    ca: Agent,
    agent0: Agent,
    agent1: Agent,
}

/// The workloads of [`mesh2`], with `a2` under service account `a2_sa`.
fn entries(m: (&Pod, &Pod, &Pod, &Pod), a2_sa: &str) -> Vec<WorkloadEntry> {
    let (a, a2, c, b) = m;
    vec![
        WorkloadEntry::enrolled(a).with_service_account("frontend"),
        WorkloadEntry::enrolled(a2).with_service_account(a2_sa),
        WorkloadEntry::opted_out(c),
        WorkloadEntry::enrolled(b),
    ]
}

fn mesh2(svid_ttl_secs: u64) -> Result<Mesh2> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let a2 = tb.add_pod(0, "a2")?;
    let c = tb.add_pod(0, "c")?;
    let b = tb.add_pod(1, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    let entries = entries((&a, &a2, &c, &b), "batch");
    let (ca, agent0, agent1) = tb.start_mesh(&entries, svid_ttl_secs, [&[], &[]])?;
    // Every agent knows every workload (to find tunnel peers) and captures
    // those of its own node.
    Ok(Mesh2 {
        tb,
        a,
        a2,
        b,
        c,
        ca,
        agent0,
        agent1,
    })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ca_file(m: &Mesh2, relative: &str) -> String {
    m.tb.dir
        .path()
        .join("ca-bootstrap")
        .join(relative)
        .display()
        .to_string()
}

#[test]
fn traffic_between_nodes_is_tls_only_and_the_server_sees_the_client_identity() -> Result<()> {
    let m = mesh2(3600)?;
    let capture = m.tb.capture_link("link")?;
    let marker = "plaintext-marker-6b0f2c";
    let out = m.tb.sh(
        &m.a,
        &format!("echo {marker} | socat -t 5 - TCP:{}:{ECHO}", m.b.ipv4),
    )?;
    ensure!(out.status.success(), "socat: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker);
    let url = format!("http://[{}]:{HTTP}/index.txt", m.b.ipv6);
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));

    let inbound = m
        .agent1
        .wait_for_records("inbound connection accepted", 2, secs(10))?;
    for record in &inbound {
        assert_eq!(
            record["peer_spiffe_id"],
            format!("{TD}/ns/default/sa/frontend")
        );
        assert_eq!(record["workload"], "default/b");
    }
    let pcap = capture.stop(&m.tb)?;
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the link in clear"
    );
    assert!(capture.count("tls.handshake.type == 1 && tcp.dstport == 15008")? >= 1);
    assert_eq!(
        capture.count(&format!("tcp.port == {ECHO} || tcp.port == {HTTP}"))?,
        0
    );
    assert!(
        capture.count("tls.app_data")? > 0,
        "no TLS application data seen"
    );
    Ok(())
}

#[test]
fn the_source_identity_is_the_pods_own_whatever_the_client_presents() -> Result<()> {
    let m = mesh2(3600)?;
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    assert_eq!(m.tb.curl(&m.a2, &url)?, (0, BODY.to_string()));
    let inbound = m
        .agent1
        .wait_for_records("inbound connection accepted", 2, secs(10))?;
    let ids: Vec<&str> = inbound
        .iter()
        .map(|r| r["peer_spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            format!("{TD}/ns/default/sa/frontend"),
            format!("{TD}/ns/default/sa/batch")
        ]
    );
    Ok(())
}

#[test]
fn plaintext_from_outside_the_mesh_is_refused_across_nodes() -> Result<()> {
    let m = mesh2(3600)?;
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    let served = || m.tb.stderr_of("http-b").matches("GET /index.txt").count();
    let node0 = m.tb.node(0).clone();
    for (who, host) in [("pod c", &m.c as &dyn Host), ("node 0", &node0)] {
        let (code, _) = m.tb.curl(host, &url)?;
        assert!(
            code == 7 || code == 56,
            "plaintext from {who}: curl exited {code}"
        );
    }
    assert_eq!(served(), 0, "plaintext reached the application");
    assert_eq!(
        m.agent1
            .wait_for_records("inbound plaintext denied", 2, secs(10))?
            .len(),
        2
    );
    // The same request from an enrolled pod goes through the mesh.
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    assert_eq!(served(), 1);
    Ok(())
}

/// Runs `openssl s_client` from pod c against b's tunnel port; returns its
/// combined output.
fn s_client(m: &Mesh2, extra: &str) -> Result<String> {
    let script = format!(
        "openssl s_client -connect {}:15008 {extra} </dev/null 2>&1",
        m.b.ipv4
    );
    let out = m.tb.run_within(&m.c, &["sh", "-c", &script], secs(20))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_tunnel_port_wants_tls13_a_client_certificate_of_the_trust_domain_and_no_resumption()
-> Result<()> {
    let m = mesh2(3600)?;
    let failures = |n| {
        m.agent1
            .wait_for_records("tls handshake failed", n, secs(10))
    };

    // No client certificate.
    s_client(&m, "-tls1_3")?;
    let failed = failures(1)?;
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{failed:?}"
    );

    // A certificate of another trust domain (self-signed, valid SPIFFE form).
    let dir = m.tb.dir.path();
    let (cert, key) =
        m.tb.foreign_certificate("evil", "spiffe://evil.local/ns/default/sa/frontend")?;
    s_client(
        &m,
        &format!("-tls1_3 -cert {} -key {}", cert.display(), key.display()),
    )?;
    let failed = failures(2)?;
    assert!(
        failed[1]["reason"].as_str().unwrap().contains("evil.local"),
        "{failed:?}"
    );

    // TLS 1.2 is not offered at all, even with a valid certificate.
    let valid = format!(
        "-cert {c} -cert_chain {c} -key {k}",
        c = ca_file(&m, "nodes/node0/node.pem"),
        k = ca_file(&m, "nodes/node0/node-key.pem")
    );
    let tls12 = s_client(&m, &format!("-tls1_2 {valid}"))?;
    assert!(tls12.contains("alert protocol version"), "{tls12}");

    // TLS 1.3 with a valid certificate works, and the server hands out no
    // session ticket, so there is nothing a client could resume (openssl
    // only writes a TLS 1.3 session once a ticket arrived).
    let session = dir.join("session.pem");
    let first = s_client(
        &m,
        &format!("-tls1_3 {valid} -sess_out {}", session.display()),
    )?;
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(!first.contains("Session Ticket arrived"), "{first}");
    assert!(!session.exists(), "a resumable session was saved");
    let again = s_client(&m, &format!("-tls1_3 {valid} -reconnect"))?;
    assert!(!again.contains("Reused, TLSv1.3"), "{again}");

    // sslscan agrees: TLS 1.3 only.
    let node0 = m.tb.node(0).clone();
    let scan = m.tb.run_within(
        &node0,
        &[
            "sslscan",
            "--no-colour",
            &format!("--certs={}", ca_file(&m, "nodes/node0/node.pem")),
            &format!("--pk={}", ca_file(&m, "nodes/node0/node-key.pem")),
            &format!("{}:15008", m.b.ipv4),
        ],
        secs(60),
    )?;
    let scan = String::from_utf8_lossy(&scan.stdout);
    for old in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        let line = scan
            .lines()
            .find(|l| l.starts_with(old))
            .unwrap_or_default();
        assert!(line.contains("disabled"), "{old} not disabled:\n{scan}");
    }
    let line13 = scan
        .lines()
        .find(|l| l.starts_with("TLSv1.3"))
        .unwrap_or_default();
    assert!(line13.contains("enabled"), "TLS 1.3 not enabled:\n{scan}");
    Ok(())
}

/// Streams for `seconds` at a steady pace through an echo server and checks
/// that every byte came back in order; prints `sent received ok`.
const STREAM_CHECK: &str = r#"
import hashlib, socket, sys, threading, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
sent, received = hashlib.sha256(), hashlib.sha256()
counts = {"sent": 0, "received": 0}
def reader():
    while True:
        data = s.recv(65536)
        if not data:
            return
        received.update(data)
        counts["received"] += len(data)
t = threading.Thread(target=reader)
t.start()
block, i, end = 8192, 0, time.time() + seconds
while time.time() < end:
    chunk = hashlib.sha256(str(i).encode()).digest() * (block // 32)
    s.sendall(chunk)
    sent.update(chunk)
    counts["sent"] += len(chunk)
    i += 1
    time.sleep(0.02)
s.shutdown(socket.SHUT_WR)
t.join(60)
print(counts["sent"], counts["received"], sent.digest() == received.digest())
"#;

#[test]
fn svid_rotation_under_load_loses_no_connection_and_no_byte() -> Result<()> {
    const TTL: u64 = 60;
    const TRANSFER: u64 = 180;
    let m = mesh2(TTL)?;
    let script = m.tb.dir.path().join("stream_check.py");
    std::fs::write(&script, STREAM_CHECK)?;
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    let (transfer, curls) = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            m.tb.run_within(
                &m.a,
                &[
                    "python3",
                    script.to_str().unwrap(),
                    &m.b.ipv4.to_string(),
                    &ECHO.to_string(),
                    &TRANSFER.to_string(),
                ],
                secs(TRANSFER + 120),
            )
        });
        // New connections while the transfer runs, across several rotations.
        let mut curls = Vec::new();
        for _ in 0..(TRANSFER / 15) {
            std::thread::sleep(secs(15));
            curls.push(m.tb.curl(&m.a, &url));
        }
        (transfer.join(), curls)
    });
    let transfer = transfer.expect("transfer thread")?;
    let report = String::from_utf8_lossy(&transfer.stdout);
    let fields: Vec<&str> = report.split_whitespace().collect();
    ensure!(transfer.status.success(), "transfer: {}", stderr(&transfer));
    let (sent, received) = (fields[0].parse::<u64>()?, fields[1].parse::<u64>()?);
    assert!(sent > 10_000_000, "only {sent} bytes sent");
    assert_eq!((received, fields[2]), (sent, "True"), "echoed bytes differ");
    for curl in curls {
        assert_eq!(curl?, (0, BODY.to_string()));
    }

    // The client's SVID was renewed several times during the transfer ...
    let rotations = m
        .agent0
        .records("svid rotated")
        .into_iter()
        .filter(|r| r["spiffe_id"] == format!("{TD}/ns/default/sa/frontend"))
        .count();
    assert!(
        rotations >= 4,
        "{rotations} rotations in {TRANSFER}s with a {TTL}s TTL"
    );
    // ... and new connections presented the new certificates.
    let serials: std::collections::HashSet<String> = m
        .agent1
        .records("inbound connection accepted")
        .iter()
        .filter_map(|r| r["peer_cert_serial"].as_str().map(String::from))
        .collect();
    assert!(
        serials.len() >= 4,
        "new connections used {} certificates",
        serials.len()
    );
    // The long stream's record closes with every byte accounted for.
    let closed = m
        .agent1
        .wait_for_records("inbound connection closed", 1, secs(10))?;
    assert!(
        closed
            .iter()
            .any(|r| r["bytes_sent"] == sent && r["bytes_received"] == sent),
        "{closed:?}"
    );
    Ok(())
}

#[test]
fn a_restarted_ca_keeps_its_root_so_identities_it_issues_afterwards_are_trusted() -> Result<()> {
    let m = mesh2(3600)?;
    let url = format!("http://{}:{HTTP}/index.txt", m.b.ipv4);
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    let root = std::fs::read(m.tb.dir.path().join("ca-root/root.pem"))?;

    m.ca.stop_with(libc::SIGKILL)?;
    let all = entries((&m.a, &m.a2, &m.c, &m.b), "reports");
    let _restarted = m.tb.start_ca(&all, 3600)?;
    assert_eq!(
        std::fs::read(m.tb.dir.path().join("ca-root/root.pem"))?,
        root,
        "the root changed"
    );
    // a2 gets a new identity, so its SVID comes from the restarted CA; b's
    // agent still holds the bundle it loaded at start.
    m.tb.write_workloads(0, &all)?;
    m.tb.write_workloads(1, &all)?;
    m.agent0
        .wait_for_records("workload updated in place", 1, secs(10))?;
    wait_until(secs(20), || Ok(m.tb.curl(&m.a2, &url)?.0 == 0))?;
    let accepted = m
        .agent1
        .wait_for_records("inbound connection accepted", 2, secs(10))?;
    assert_eq!(
        accepted.last().context("no record")?["peer_spiffe_id"],
        format!("{TD}/ns/default/sa/reports")
    );
    // The tunnel pooled before the restart still serves a.
    assert_eq!(m.tb.curl(&m.a, &url)?, (0, BODY.to_string()));
    Ok(())
}
