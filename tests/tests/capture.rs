//! End-to-end on one simulated node, with the real agent, real eBPF
//! programs and unmodified clients: outbound capture, the tunnel between
//! two pods of the node, and strict inbound capture.

use std::time::Duration;

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent};
use anyhow::Result;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "served-by-pod-b-7f3a\n";
const OUTSIDE_BODY: &str = "served-outside-the-mesh-21c9\n";

/// Pod a (enrolled client), pod b (enrolled server, strict), pod c (opted
/// out client), pod s (opted out server, outside the mesh).
struct Scene {
    tb: Testbed,
    a: Pod,
    b: Pod,
    c: Pod,
    s: Pod,
    agent: Agent,
}

fn entries(a: &Pod, b: &Pod, c: &Pod, s: &Pod) -> Vec<WorkloadEntry> {
    vec![
        WorkloadEntry::enrolled(a),
        WorkloadEntry::enrolled(b),
        WorkloadEntry::opted_out(c),
        WorkloadEntry::opted_out(s),
    ]
}

fn scene() -> Result<Scene> {
    let mut tb = Testbed::new(1)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(0, "b")?;
    let c = tb.add_pod(0, "c")?;
    let s = tb.add_pod(0, "s")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    tb.http_server(&s, "http-s", HTTP, OUTSIDE_BODY)?;
    let agent = tb.start_agent(0, &entries(&a, &b, &c, &s))?;
    Ok(Scene {
        tb,
        a,
        b,
        c,
        s,
        agent,
    })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn curl_and_socat_reach_the_server_through_the_agent_on_ipv4_and_ipv6() -> Result<()> {
    let s = scene()?;
    let urls = [
        (
            format!("http://{}:{HTTP}/index.txt", s.b.ipv4),
            format!("{}:{HTTP}", s.b.ipv4),
        ),
        (
            format!("http://[{}]:{HTTP}/index.txt", s.b.ipv6),
            format!("[{}]:{HTTP}", s.b.ipv6),
        ),
    ];
    for (url, _) in &urls {
        let (code, body) = s.tb.curl(&s.a, url)?;
        assert_eq!((code, body.as_str()), (0, BODY), "curl {url}");
    }
    for (target, marker) in [
        (format!("TCP4:{}:{ECHO}", s.b.ipv4), "socat-v4-91c2"),
        (format!("TCP6:[{}]:{ECHO}", s.b.ipv6), "socat-v6-5be0"),
        // An IPv6 socket dialling an IPv4-mapped address goes through connect6.
        (
            format!("TCP6:[::ffff:{}]:{ECHO}", s.b.ipv4),
            "socat-mapped-0d41",
        ),
    ] {
        let out =
            s.tb.sh(&s.a, &format!("echo {marker} | socat -t 5 - {target}"))?;
        assert!(
            out.status.success(),
            "socat {target}: {}",
            ambit_testbed::stderr(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker);
    }

    let captured = s
        .agent
        .wait_for_records("outbound connection captured", 5, secs(10))?;
    let dsts: Vec<&str> = captured
        .iter()
        .map(|r| r["orig_dst"].as_str().unwrap())
        .collect();
    let expected = [
        urls[0].1.clone(),
        urls[1].1.clone(),
        format!("{}:{ECHO}", s.b.ipv4),
        format!("[{}]:{ECHO}", s.b.ipv6),
        format!("{}:{ECHO}", s.b.ipv4),
    ];
    assert_eq!(
        dsts, expected,
        "original destinations recorded by the agent"
    );
    assert!(captured.iter().all(|r| r["workload"] == "default/a"));
    // Every connection crossed the tunnel, and b's side learnt a's identity
    // from its certificate.
    let closed = s
        .agent
        .wait_for_records("outbound connection closed", 5, secs(10))?;
    assert!(closed.iter().all(|r| r["mode"] == "hbone"), "{closed:?}");
    let inbound = s
        .agent
        .wait_for_records("inbound connection accepted", 5, secs(10))?;
    assert!(
        inbound.iter().all(
            |r| r["peer_spiffe_id"] == "spiffe://cluster.local/ns/default/sa/a"
                && r["workload"] == "default/b"
        ),
        "{inbound:?}"
    );
    Ok(())
}

#[test]
fn pods_that_are_not_enrolled_and_the_node_itself_are_not_captured() -> Result<()> {
    let s = scene()?;
    let url = format!("http://{}:{HTTP}/index.txt", s.s.ipv4);
    let node = s.tb.node(0).clone();
    for (who, host) in [("pod c", &s.c as &dyn ambit_testbed::Host), ("node", &node)] {
        let (code, body) = s.tb.curl(host, &url)?;
        assert_eq!((code, body.as_str()), (0, OUTSIDE_BODY), "curl from {who}");
    }
    // A captured connection afterwards: once its record is there, any record
    // for the two connections above would be too. Its destination is outside
    // the mesh, so it is passed through in plain TCP.
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, OUTSIDE_BODY.to_string()));
    let closed = s
        .agent
        .wait_for_records("outbound connection closed", 1, secs(10))?;
    assert_eq!(closed[0]["mode"], "passthrough");
    let captured = s
        .agent
        .wait_for_records("outbound connection captured", 1, secs(10))?;
    let captured_now = s.agent.records("outbound connection captured");
    assert_eq!(captured_now.len(), 1, "{captured_now:?}");
    assert_eq!(captured[0]["workload"], "default/a");
    Ok(())
}

#[test]
fn the_agents_own_upstream_connections_are_not_captured_again() -> Result<()> {
    const CONNECTIONS: usize = 200;
    let s = scene()?;
    let out_dir = s.tb.dir.path().join("socat-out");
    std::fs::create_dir_all(&out_dir)?;
    let script = format!(
        "for i in $(seq 1 {CONNECTIONS}); do \
           (echo marker-$i | socat -t 20 - TCP:{}:{ECHO} > {dir}/$i 2>&1) & \
         done; wait",
        s.b.ipv4,
        dir = out_dir.display()
    );
    let out = s.tb.run_within(&s.a, &["sh", "-c", &script], secs(120))?;
    assert!(out.status.success(), "{}", ambit_testbed::stderr(&out));
    for i in 1..=CONNECTIONS {
        let echoed = std::fs::read_to_string(out_dir.join(i.to_string()))?;
        assert_eq!(echoed.trim(), format!("marker-{i}"), "connection {i}");
    }
    // Exactly one capture per client connection: a re-captured upstream
    // connection would add a record (or loop until connections ran out).
    s.agent
        .wait_for_records("outbound connection closed", CONNECTIONS, secs(30))?;
    // A re-captured upstream connection is logged before the client's
    // connection it serves can close, so every such record is in by now.
    assert_eq!(
        s.agent.records("outbound connection captured").len(),
        CONNECTIONS
    );
    let denied = s
        .agent
        .logs()
        .into_iter()
        .filter(|r| {
            r["level"] == "WARN"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("denied"))
        })
        .count();
    assert_eq!(
        denied,
        0,
        "warnings in the agent log:\n{}",
        s.agent.raw_log()
    );
    Ok(())
}

#[test]
fn ten_thousand_short_connections_leave_no_original_destination_entries() -> Result<()> {
    const CONNECTIONS: usize = 10_000;
    let s = scene()?;
    // curl's URL globbing: one process, sequential connections, each closed
    // by the HTTP/1.0 server.
    let url = format!("http://{}:{HTTP}/index.txt?[1-{CONNECTIONS}]", s.b.ipv4);
    let out = s.tb.run_within(
        &s.a,
        &[
            "curl",
            "-sS",
            "--http1.0",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            &url,
        ],
        secs(600),
    )?;
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(codes.lines().filter(|c| *c == "200").count(), CONNECTIONS);
    s.agent
        .wait_for_records("outbound connection closed", CONNECTIONS, secs(60))?;
    assert_eq!(
        s.agent.records("outbound connection captured").len(),
        CONNECTIONS
    );
    ambit_testbed::wait_until(secs(10), || {
        Ok(s.agent.map_entries("AMBIT_ORIG_DST")? == 0
            && s.agent.map_entries("AMBIT_PENDING")? == 0)
    })
    .map_err(|e| {
        e.context(format!(
            "stale entries: orig_dst={:?} pending={:?}",
            s.agent.map_entries("AMBIT_ORIG_DST").ok(),
            s.agent.map_entries("AMBIT_PENDING").ok()
        ))
    })?;
    Ok(())
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_one_takes_over() -> Result<()> {
    let s = scene()?;
    let url = format!("http://{}:{HTTP}/index.txt", s.b.ipv4);
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, BODY.to_string()));
    let served = || s.tb.stderr_of("http-b").matches("GET /index.txt").count();
    assert_eq!(served(), 1);

    s.agent.stop_with(libc::SIGKILL)?;
    let (code, _) = s.tb.curl(&s.a, &url)?;
    assert_eq!(
        code, 7,
        "curl must fail to connect (exit 7), not bypass the mesh"
    );
    assert_eq!(
        served(),
        1,
        "a request reached the server while the agent was dead"
    );
    // Plaintext into the strict pod stays refused while the agent is down.
    assert_ne!(s.tb.curl(&s.c, &url)?.0, 0);
    assert_eq!(
        served(),
        1,
        "plaintext reached the server while the agent was dead"
    );
    // Pods that were never enrolled are unaffected.
    let outside = format!("http://{}:{HTTP}/index.txt", s.s.ipv4);
    assert_eq!(s.tb.curl(&s.c, &outside)?, (0, OUTSIDE_BODY.to_string()));

    // The new agent takes over the pinned links: three cgroup programs and
    // one inbound program per enrolled pod.
    let restarted = s.tb.start_agent_with(0, &[])?;
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, BODY.to_string()));
    assert_eq!(
        restarted
            .records("replaced the link of a previous agent")
            .len(),
        5
    );
    let captured = restarted.wait_for_records("outbound connection captured", 1, secs(10))?;
    assert_eq!(captured.len(), 1, "{captured:?}");
    Ok(())
}

#[test]
fn unenrolling_a_workload_removes_its_listeners_and_map_entry() -> Result<()> {
    let s = scene()?;
    let url = format!("http://{}:{HTTP}/index.txt", s.s.ipv4);
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, OUTSIDE_BODY.to_string()));
    assert_eq!(s.agent.map_entries("AMBIT_ENROLLED")?, 2);

    let mut without_a = entries(&s.a, &s.b, &s.c, &s.s);
    without_a[0].enrolled = false;
    s.tb.write_workloads(0, &without_a)?;
    let unenrolled = s
        .agent
        .wait_for_records("workload unenrolled", 1, secs(10))?;
    assert_eq!(unenrolled[0]["workload"], "default/a");
    assert_eq!(s.agent.map_entries("AMBIT_ENROLLED")?, 1);
    ambit_testbed::wait_until(secs(10), || {
        let out = s.tb.run(&s.a, &["ss", "-Hltn", "sport = :15001"])?;
        Ok(out.stdout.is_empty())
    })?;
    // a now talks to s directly, outside the mesh.
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, OUTSIDE_BODY.to_string()));
    // b is still enrolled: once its connection's record is in, a record for
    // a's would be too.
    assert_eq!(s.tb.curl(&s.b, &url)?, (0, OUTSIDE_BODY.to_string()));
    let captured = s
        .agent
        .wait_for_records("outbound connection captured", 2, secs(10))?;
    let of_a = captured
        .iter()
        .filter(|r| r["workload"] == "default/a")
        .count();
    assert_eq!(of_a, 1, "{captured:?}");

    // Enrolling it again brings capture back.
    s.tb.write_workloads(0, &entries(&s.a, &s.b, &s.c, &s.s))?;
    s.agent.wait_for_records("workload enrolled", 3, secs(10))?;
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, OUTSIDE_BODY.to_string()));
    s.agent
        .wait_for_records("outbound connection captured", 3, secs(10))?;
    Ok(())
}

#[test]
fn kernel_side_records_reach_the_agent_log_when_asked_for() -> Result<()> {
    let mut tb = Testbed::new(1)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(0, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.write_workloads(
        0,
        &[WorkloadEntry::enrolled(&a), WorkloadEntry::enrolled(&b)],
    )?;
    let agent = tb.start_agent_logging(0, "info,ambit_capture=debug")?;
    let url = format!("http://{}:{HTTP}/index.txt", b.ipv4);
    assert_eq!(tb.curl(&a, &url)?, (0, BODY.to_string()));
    let kernel = ambit_testbed::wait_until(secs(10), || {
        Ok(agent.logs().iter().any(|r| {
            r["target"] == "ambit_capture"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("captured connect"))
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("port {HTTP}")))
        }))
    });
    assert!(kernel.is_ok(), "no kernel record in:\n{}", agent.raw_log());
    Ok(())
}

#[test]
fn plaintext_into_a_strict_pod_is_refused_and_a_permissive_pod_lets_it_in() -> Result<()> {
    let s = scene()?;
    let url = format!("http://{}:{HTTP}/index.txt", s.b.ipv4);
    let url6 = format!("http://[{}]:{HTTP}/index.txt", s.b.ipv6);
    let served = || s.tb.stderr_of("http-b").matches("GET /index.txt").count();
    let node = s.tb.node(0).clone();
    for (who, host, url) in [
        ("pod c", &s.c as &dyn ambit_testbed::Host, &url),
        ("pod c over IPv6", &s.c, &url6),
        ("the node", &node, &url),
    ] {
        let (code, _) = s.tb.curl(host, url)?;
        // The agent accepts and resets: curl sees the reset during connect
        // (7) or on its first read (56), whichever comes first.
        assert!(
            code == 7 || code == 56,
            "plaintext from {who} must be reset, curl exited {code}"
        );
    }
    assert_eq!(served(), 0, "plaintext reached the application");
    let denied = s
        .agent
        .wait_for_records("inbound plaintext denied", 3, secs(10))?;
    assert_eq!(denied[0]["workload"], "default/b");
    let src = denied[0]["src"].as_str().unwrap_or_default();
    assert!(src.starts_with(&format!("{}:", s.c.ipv4)), "{src}");
    assert_eq!(denied[0]["dst"], format!("{}:{HTTP}", s.b.ipv4));
    // The same request through the mesh works.
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, BODY.to_string()));
    assert_eq!(served(), 1);

    // Permissive mode lets the plaintext in, and says so.
    let mut permissive = entries(&s.a, &s.b, &s.c, &s.s);
    permissive[1].permissive = true;
    s.tb.write_workloads(0, &permissive)?;
    s.agent
        .wait_for_records("workload updated in place", 1, secs(10))?;
    assert_eq!(s.tb.curl(&s.c, &url)?, (0, BODY.to_string()));
    let allowed =
        s.agent
            .wait_for_records("inbound plaintext allowed (permissive)", 1, secs(10))?;
    assert_eq!(allowed[0]["dst"], format!("{}:{HTTP}", s.b.ipv4));
    Ok(())
}
