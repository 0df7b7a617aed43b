//! Transparent inbound relays, on two simulated nodes with real agents and
//! `ambit ca`: the application in the destination pod sees the client
//! pod's own address as the source of a mesh connection, over IPv4 and
//! IPv6, while the identity the policy decides on and the audit records
//! is still the one in the client's certificate.
//!
//! Node 0: `a` (service account `frontend`) and `s` (`spoofer`), both
//! enrolled. Node 1: `b` (enrolled, strict), whose application answers each
//! connection with the peer address it sees. Node 1's agent allows only
//! `frontend` to reach `b`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent, stderr, wait_until};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const PEER_PORT: u16 = 8080;
const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const SPOOFER: &str = "spiffe://cluster.local/ns/default/sa/spoofer";

const ALLOW_FRONTEND: &str = r#"
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-frontend, namespace: default }
spec:
  selector: { matchLabels: { app: b } }
  action: ALLOW
  rules:
    - from: [ { principals: ["spiffe://cluster.local/ns/default/sa/frontend"] } ]
"#;

/// Answers each connection (IPv4 and IPv6) with `peer <address>` and logs
/// the same line.
const PEER_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(64)
while True:
    c, peer = s.accept()
    line = "peer " + peer[0] + "\n"
    print(line, end="", flush=True)
    c.sendall(line.encode())
    c.close()
"#;

struct Scene {
    tb: Testbed,
    a: Pod,
    s: Pod,
    b: Pod,
    _ca: Agent,
    _agent0: Agent,
    agent1: Agent,
}

fn scene(agent1_args: &[&str]) -> Result<Scene> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let s = tb.add_pod(0, "s")?;
    let b = tb.add_pod(1, "b")?;
    let port = PEER_PORT.to_string();
    tb.spawn(&b, "peer-b", &["python3", "-c", PEER_SERVER, &port])?;
    tb.wait_for_listener(&b, PEER_PORT)?;
    let entries = [
        WorkloadEntry::enrolled(&a).with_service_account("frontend"),
        WorkloadEntry::enrolled(&s).with_service_account("spoofer"),
        WorkloadEntry::enrolled(&b),
    ];
    let policies = tb.dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("policy.yaml"), ALLOW_FRONTEND)?;
    let dir = policies.display().to_string();
    let mut args = vec!["--default-policy", "deny", "--policies", &dir];
    args.extend_from_slice(agent1_args);
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [&[], &args])?;
    Ok(Scene {
        tb,
        a,
        s,
        b,
        _ca: ca,
        _agent0: agent0,
        agent1,
    })
}

/// Connects from `client` to `b` at `ip` (with socat `options`, e.g. a
/// bind) and returns the peer address `b`'s application reported, if it
/// answered.
fn peer_seen_by_b(s: &Scene, client: &Pod, ip: IpAddr, options: &str) -> Result<Option<IpAddr>> {
    let target = SocketAddr::new(ip, PEER_PORT);
    let out = s.tb.sh(
        client,
        &format!("socat -t 5 -T 10 - TCP:{target}{options} </dev/null"),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(seen) = text.trim().strip_prefix("peer ") else {
        return Ok(None);
    };
    let seen: IpAddr = seen
        .parse()
        .with_context(|| format!("b reported {seen:?} ({})", stderr(&out)))?;
    Ok(Some(seen.to_canonical()))
}

fn source_ip(record: &Value) -> Option<IpAddr> {
    let address: SocketAddr = record["source"]["address"].as_str()?.parse().ok()?;
    Some(address.ip().to_canonical())
}

/// Waits for node 1's audit record of a decision on a connection from `ip`.
fn audited_from(s: &Scene, ip: IpAddr, decision: &str) -> Result<Value> {
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        found = s.agent1.audit_records().into_iter().find(|r| {
            r["decision"] == decision
                && r["destination"]["port"] == PEER_PORT
                && source_ip(r) == Some(ip)
        });
        Ok(found.is_some())
    })
    .with_context(|| format!("no {decision} record for a connection from {ip}"))?;
    found.context("no record")
}

#[test]
fn the_destination_app_sees_the_client_pods_address_over_ipv4_and_ipv6() -> Result<()> {
    let s = scene(&[])?;
    for (client_ip, server_ip) in [
        (IpAddr::from(s.a.ipv4), IpAddr::from(s.b.ipv4)),
        (IpAddr::from(s.a.ipv6), IpAddr::from(s.b.ipv6)),
    ] {
        let seen = peer_seen_by_b(&s, &s.a, server_ip, "")?;
        ensure!(
            seen == Some(client_ip),
            "b's application saw {seen:?} for a connection from {client_ip}"
        );
        // The identity is still the certificate's.
        let record = audited_from(&s, client_ip, "allow")?;
        assert_eq!(record["source"]["spiffe_id"], FRONTEND);
    }
    // A plain request and its answer both went through the relay: the
    // application's replies to an address its pod does not have came back.
    let lines = s.tb.stdout_of("peer-b");
    assert_eq!(lines.lines().count(), 2, "b's log: {lines}");
    Ok(())
}

#[test]
fn with_transparency_off_the_app_sees_its_own_address() -> Result<()> {
    let s = scene(&["--transparent-source=false"])?;
    let seen = peer_seen_by_b(&s, &s.a, s.b.ipv4.into(), "")?;
    ensure!(
        seen == Some(s.b.ipv4.into()),
        "b's application saw {seen:?}, not its own address"
    );
    let record = audited_from(&s, s.a.ipv4.into(), "allow")?;
    assert_eq!(record["source"]["spiffe_id"], FRONTEND);
    Ok(())
}

#[test]
fn a_pod_claiming_another_pods_address_keeps_its_own_identity() -> Result<()> {
    let s = scene(&[])?;
    // `s` takes `a`'s address too and its application dials from it.
    let claimed = format!("{}/32", s.a.ipv4);
    let add =
        s.tb.run(&s.s, &["ip", "addr", "add", &claimed, "dev", "eth0"])?;
    ensure!(add.status.success(), "ip addr add: {}", stderr(&add));
    let seen = peer_seen_by_b(&s, &s.s, s.b.ipv4.into(), &format!(",bind={}", s.a.ipv4))?;
    ensure!(
        seen.is_none(),
        "the spoofer reached b's application (which saw {seen:?})"
    );
    // Node 1 decided on the spoofer's certificate, and denied it.
    wait_until(Duration::from_secs(10), || {
        Ok(s.agent1.audit_records().iter().any(|r| {
            r["decision"] == "deny"
                && r["destination"]["port"] == PEER_PORT
                && r["source"]["spiffe_id"] == SPOOFER
        }))
    })
    .context("no deny record with the spoofer's identity")?;
    ensure!(
        !s.agent1
            .audit_records()
            .iter()
            .any(|r| r["source"]["spiffe_id"] == FRONTEND),
        "a connection was attributed to frontend"
    );
    ensure!(
        s.tb.stdout_of("peer-b").is_empty(),
        "b's application saw a connection"
    );
    Ok(())
}
