//! Sidecar mode end to end: `ambit sidecar-init` rules and an `ambit
//! sidecar` in pod `s` on node 0, node-mode agents on both nodes, one
//! `ambit ca` for all. Pod `b` on node 1 is node mode; `c` on node 1 is
//! outside the mesh.

use std::time::Duration;

use ambit_testbed::{
    Pod, Testbed, WorkloadEntry, agent::Agent, link_capture::LinkCapture, stderr, wait_until,
};
use anyhow::{Result, ensure};
use serde_json::Value;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY_B: &str = "served-by-node-mode-b-71c3\n";
const BODY_S: &str = "served-by-sidecar-s-2a9e\n";
const TD: &str = "spiffe://cluster.local";

struct Scene {
    tb: Testbed,
    /// Sidecar mode, node 0 (service account `side`).
    s: Pod,
    /// Node mode, node 1.
    b: Pod,
    /// Outside the mesh, node 1.
    c: Pod,
    entries: Vec<WorkloadEntry>,
    sidecar: Agent,
    agent0: Agent,
    agent1: Agent,
    _ca: Agent,
}

/// `sidecar_args` and `agent_args` go to the sidecar and to both agents.
fn scene(sidecar_args: &[&str], agent_args: &[&str]) -> Result<Scene> {
    let mut tb = Testbed::new(2)?;
    let s = tb.add_pod(0, "s")?;
    let b = tb.add_pod(1, "b")?;
    let c = tb.add_pod(1, "c")?;
    for (pod, body) in [(&s, BODY_S), (&b, BODY_B)] {
        tb.http_server(pod, &format!("http-{}", pod.name), HTTP, body)?;
        tb.echo_server(pod, &format!("echo-{}", pod.name), ECHO)?;
    }
    tb.http_server(&c, "http-c", HTTP, "outside-the-mesh\n")?;
    let entries = vec![
        WorkloadEntry::with_sidecar(&s).with_service_account("side"),
        WorkloadEntry::enrolled(&b),
        WorkloadEntry::opted_out(&c),
    ];
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [agent_args, agent_args])?;
    let sidecar = tb.start_sidecar(&s, &entries, sidecar_args)?;
    Ok(Scene {
        tb,
        s,
        b,
        c,
        entries,
        sidecar,
        agent0,
        agent1,
        _ca: ca,
    })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn url(pod: &Pod) -> String {
    format!("http://{}:{HTTP}/index.txt", pod.ipv4)
}

/// Requests the access log of `server` shows.
fn served(tb: &Testbed, server: &str) -> usize {
    tb.stderr_of(server).matches("GET /index.txt").count()
}

/// Echoes `marker` from `from` through `to`'s echo server; what came back.
fn echo(tb: &Testbed, from: &Pod, to: &Pod, marker: &str) -> Result<String> {
    let out = tb.sh(
        from,
        &format!("echo {marker} | socat -t 5 - TCP:{}:{ECHO}", to.ipv4),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_decisions(agent: &Agent, direction: &str, n: usize) -> Result<Vec<Value>> {
    wait_until(secs(10), || Ok(agent.audit_decisions(direction).len() >= n))?;
    Ok(agent.audit_decisions(direction))
}

/// `count` outbound connections of `proxy` went through the tunnel to the
/// identity of service account `peer`.
fn assert_tunnelled(proxy: &Agent, count: usize, peer: &str) -> Result<()> {
    let closed = proxy.wait_for_records("outbound connection closed", count, secs(10))?;
    for record in &closed {
        assert_eq!(record["mode"], "hbone", "{record}");
        assert_eq!(
            record["peer_spiffe_id"],
            format!("{TD}/ns/default/sa/{peer}")
        );
    }
    Ok(())
}

/// Stops `capture`: `marker` never crossed the link in clear, and no
/// packet to or from the applications' ports did.
fn assert_only_the_tunnel_crossed(tb: &Testbed, capture: &LinkCapture, marker: &str) -> Result<()> {
    let pcap = capture.stop(tb)?;
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the link in clear"
    );
    assert_eq!(
        capture.count(&format!("tcp.port == {ECHO} || tcp.port == {HTTP}"))?,
        0
    );
    Ok(())
}

#[test]
fn an_apps_connection_from_a_sidecar_pod_is_captured_and_tunnelled_to_a_node_mode_pod() -> Result<()>
{
    let sc = scene(&[], &[])?;
    let capture = sc.tb.capture_link("link")?;
    let marker = "sidecar-marker-5c0d1e";
    assert_eq!(echo(&sc.tb, &sc.s, &sc.b, marker)?, marker);
    let over_v6 = format!("http://[{}]:{HTTP}/index.txt", sc.b.ipv6);
    assert_eq!(sc.tb.curl(&sc.s, &over_v6)?, (0, BODY_B.to_string()));

    // The sidecar captured both and sent them through the tunnel to b's
    // identity; b's agent saw the sidecar pod's identity.
    assert_tunnelled(&sc.sidecar, 2, "b")?;
    let closed = sc
        .agent1
        .wait_for_records("inbound connection closed", 2, secs(10))?;
    for record in &closed {
        assert_eq!(record["peer_spiffe_id"], format!("{TD}/ns/default/sa/side"));
        assert_eq!(record["workload"], "default/b");
    }
    let decisions = wait_decisions(&sc.agent1, "inbound", 2)?;
    for record in &decisions {
        assert_eq!(record["decision"], "allow");
        assert_eq!(
            record["source"]["spiffe_id"],
            format!("{TD}/ns/default/sa/side")
        );
    }

    // Only TLS to the tunnel port crossed the link.
    assert_only_the_tunnel_crossed(&sc.tb, &capture, marker)?;
    assert!(capture.count("tls.handshake.type == 1 && tcp.dstport == 15008")? >= 1);
    // The node agent of node 0 never captured the sidecar pod.
    assert!(sc.agent0.records("workload enrolled").is_empty());
    Ok(())
}

#[test]
fn a_node_mode_pod_reaches_a_sidecar_pod_through_the_tunnel_as_itself() -> Result<()> {
    let sc = scene(&[], &[])?;
    let capture = sc.tb.capture_link("link")?;
    let marker = "node-to-sidecar-marker-9e4b";
    assert_eq!(echo(&sc.tb, &sc.b, &sc.s, marker)?, marker);
    assert_eq!(sc.tb.curl(&sc.b, &url(&sc.s))?, (0, BODY_S.to_string()));
    assert_eq!(served(&sc.tb, "http-s"), 1);

    // b's agent tunnelled to the identity the directory gives the sidecar
    // pod; the sidecar verified b's and audited it like a node agent.
    assert_tunnelled(&sc.agent1, 2, "side")?;
    let decisions = wait_decisions(&sc.sidecar, "inbound", 2)?;
    for record in &decisions {
        assert_eq!(record["decision"], "allow");
        assert_eq!(
            record["source"]["spiffe_id"],
            format!("{TD}/ns/default/sa/b")
        );
        assert_eq!(record["destination"]["workload"], "default/s");
        assert_eq!(
            record["destination"]["spiffe_id"],
            format!("{TD}/ns/default/sa/side")
        );
        assert_eq!(record["tls_version"], "TLSv1_3");
        assert_eq!(record["node"], "node0");
    }
    assert_only_the_tunnel_crossed(&sc.tb, &capture, marker)?;
    Ok(())
}

#[test]
fn connections_to_outside_the_mesh_are_captured_and_passed_through() -> Result<()> {
    let sc = scene(&[], &[])?;
    assert_eq!(
        sc.tb.curl(&sc.s, &url(&sc.c))?,
        (0, "outside-the-mesh\n".to_string())
    );
    let closed = sc
        .sidecar
        .wait_for_records("outbound connection closed", 1, secs(10))?;
    assert_eq!(closed[0]["mode"], "passthrough", "{}", closed[0]);
    assert_eq!(closed[0]["dst"], format!("{}:{HTTP}", sc.c.ipv4));
    // The server saw the pod's own address: no NAT on the way out.
    assert!(
        sc.tb.stderr_of("http-c").contains(&sc.s.ipv4.to_string()),
        "{}",
        sc.tb.stderr_of("http-c")
    );
    Ok(())
}

#[test]
fn plaintext_to_a_sidecar_pod_from_outside_the_mesh_is_refused_and_audited() -> Result<()> {
    let sc = scene(&[], &[])?;
    let over_v6 = format!("http://[{}]:{HTTP}/index.txt", sc.s.ipv6);
    for target in [url(&sc.s), over_v6] {
        let (code, body) = sc.tb.curl(&sc.c, &target)?;
        assert!(
            (code == 7 || code == 56) && body.is_empty(),
            "plaintext to {target} got an answer: {code} {body:?}"
        );
    }
    assert_eq!(
        served(&sc.tb, "http-s"),
        0,
        "plaintext reached the application"
    );
    // The original destination, IPv4 and IPv6, is what the client dialled.
    let denied = sc
        .sidecar
        .wait_for_records("inbound plaintext denied", 2, secs(10))?;
    assert_eq!(denied[0]["dst"], format!("{}:{HTTP}", sc.s.ipv4));
    assert_eq!(denied[1]["dst"], format!("[{}]:{HTTP}", sc.s.ipv6));
    let decisions = wait_decisions(&sc.sidecar, "inbound", 2)?;
    for decision in &decisions {
        assert_eq!(decision["decision"], "deny");
        assert!(decision["source"]["spiffe_id"].is_null(), "{decision}");
        assert_eq!(decision["destination"]["port"], HTTP);
        assert!(
            decision["reason"]
                .as_str()
                .is_some_and(|r| r.contains("strict")),
            "{decision}"
        );
    }
    // Through the mesh the same request is served.
    assert_eq!(sc.tb.curl(&sc.b, &url(&sc.s))?, (0, BODY_S.to_string()));
    Ok(())
}

#[test]
fn default_deny_refuses_and_audits_in_both_modes_with_the_same_record_fields() -> Result<()> {
    let deny = ["--default-policy", "deny"];
    let sc = scene(&deny, &deny)?;
    // Into the sidecar pod (decided by the sidecar) and into the node-mode
    // pod (decided by node 1's agent).
    for (from, to, server) in [(&sc.b, &sc.s, "http-s"), (&sc.s, &sc.b, "http-b")] {
        let (code, body) = sc.tb.curl(from, &url(to))?;
        assert!(
            code != 0 && body.is_empty(),
            "{} got through: {code}",
            from.name
        );
        assert_eq!(served(&sc.tb, server), 0);
    }
    let by_sidecar = wait_decisions(&sc.sidecar, "inbound", 1)?;
    let by_agent = wait_decisions(&sc.agent1, "inbound", 1)?;
    let (sidecar, agent) = (&by_sidecar[0], &by_agent[0]);
    for (record, source, destination) in [(sidecar, "b", "s"), (agent, "side", "b")] {
        assert_eq!(record["decision"], "deny", "{record}");
        assert_eq!(
            record["source"]["spiffe_id"],
            format!("{TD}/ns/default/sa/{source}")
        );
        assert_eq!(
            record["destination"]["workload"],
            format!("default/{destination}")
        );
    }
    assert_eq!(sidecar["reason"], agent["reason"]);
    let fields = |r: &Value| -> Vec<String> {
        let mut keys: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(fields(sidecar), fields(agent));
    assert_eq!(
        fields(&sidecar["source"]),
        fields(&agent["source"]),
        "source fields differ"
    );
    assert_eq!(
        fields(&sidecar["destination"]),
        fields(&agent["destination"])
    );
    Ok(())
}

#[test]
fn with_the_sidecar_down_the_pod_fails_closed_both_ways_until_it_is_back() -> Result<()> {
    let sc = scene(&[], &[])?;
    assert_eq!(sc.tb.curl(&sc.s, &url(&sc.b))?, (0, BODY_B.to_string()));
    sc.sidecar.stop_with(libc::SIGKILL)?;

    let capture = sc.tb.capture_link("link")?;
    let marker = "fail-closed-marker-0d7a";
    let served_b = served(&sc.tb, "http-b");
    // Out of the pod: redirected to a closed port, refused at once.
    let (code, _) = sc.tb.curl(&sc.s, &url(&sc.b))?;
    assert_eq!(code, 7, "curl from the sidecar pod exited {code}");
    assert!(echo(&sc.tb, &sc.s, &sc.b, marker)?.is_empty());
    assert_eq!(served(&sc.tb, "http-b"), served_b);
    // Into the pod: no tunnel endpoint, and plaintext meets a closed port.
    for from in [&sc.b, &sc.c] {
        let (code, body) = sc.tb.curl(from, &url(&sc.s))?;
        assert!(code != 0 && body.is_empty(), "from {}: {code}", from.name);
    }
    assert!(echo(&sc.tb, &sc.c, &sc.s, marker)?.is_empty());
    assert_eq!(served(&sc.tb, "http-s"), 0);
    // The rules are still there, and nothing crossed the link in clear.
    let rules = sc
        .tb
        .run(&sc.s, &["nft", "list", "table", "inet", "ambit_sidecar"])?;
    ensure!(rules.status.success(), "rules gone: {}", stderr(&rules));
    assert!(
        !capture.saw_in_clear(&sc.tb, marker)?,
        "the marker crossed in clear"
    );

    // A new sidecar (its init replacing the same rules) serves both ways again.
    let _restarted = sc.tb.start_sidecar(&sc.s, &sc.entries, &[])?;
    assert_eq!(sc.tb.curl(&sc.s, &url(&sc.b))?, (0, BODY_B.to_string()));
    assert_eq!(sc.tb.curl(&sc.b, &url(&sc.s))?, (0, BODY_S.to_string()));
    Ok(())
}

#[test]
fn two_sidecar_pods_on_different_nodes_talk_through_the_tunnel() -> Result<()> {
    let mut tb = Testbed::new(2)?;
    let s = tb.add_pod(0, "s")?;
    let t = tb.add_pod(1, "t")?;
    tb.echo_server(&t, "echo-t", ECHO)?;
    let entries = [
        WorkloadEntry::with_sidecar(&s),
        WorkloadEntry::with_sidecar(&t),
    ];
    let _ca = tb.start_ca(&entries, 3600)?;
    let sidecar_s = tb.start_sidecar(&s, &entries, &[])?;
    let sidecar_t = tb.start_sidecar(&t, &entries, &[])?;
    let capture = tb.capture_link("link")?;
    let marker = "sidecar-to-sidecar-marker-3f81";
    assert_eq!(echo(&tb, &s, &t, marker)?, marker);
    let closed = sidecar_s.wait_for_records("outbound connection closed", 1, secs(10))?;
    assert_eq!(closed[0]["peer_spiffe_id"], format!("{TD}/ns/default/sa/t"));
    let decisions = wait_decisions(&sidecar_t, "inbound", 1)?;
    assert_eq!(
        decisions[0]["source"]["spiffe_id"],
        format!("{TD}/ns/default/sa/s")
    );
    assert!(
        !capture.saw_in_clear(&tb, marker)?,
        "the marker crossed in clear"
    );
    Ok(())
}

#[test]
fn a_sidecar_exempted_by_uid_marks_nothing_and_still_captures_the_app() -> Result<()> {
    let mut tb = Testbed::new(2)?;
    let s = tb.add_pod(0, "s")?;
    let b = tb.add_pod(1, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY_B)?;
    let entries = [WorkloadEntry::with_sidecar(&s), WorkloadEntry::enrolled(&b)];
    let (_ca, _agent0, agent1) = tb.start_mesh(&entries, 3600, [&[], &[]])?;
    // The sidecar runs as root (uid 0) and is exempt by that uid alone;
    // the application runs as nobody.
    let sidecar =
        tb.start_sidecar_with(&s, &entries, &["--proxy-uid", "0"], &["--socket-mark", "0"])?;
    let rules = tb.run(&s, &["nft", "list", "table", "inet", "ambit_sidecar"])?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("meta skuid 0 return") && !rules.contains("meta mark"),
        "{rules}"
    );
    let out = tb.run(
        &s,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url(&b),
        ],
    )?;
    ensure!(out.status.success(), "curl as nobody: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), BODY_B);
    assert_tunnelled(&sidecar, 1, "b")?;
    let decisions = wait_decisions(&agent1, "inbound", 1)?;
    assert_eq!(
        decisions[0]["source"]["spiffe_id"],
        format!("{TD}/ns/default/sa/s")
    );
    Ok(())
}
