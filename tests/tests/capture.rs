//! End-to-end: transparent outbound capture on one simulated node, with the
//! real agent, real eBPF programs and unmodified clients.

use std::time::Duration;

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent};
use anyhow::Result;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "served-by-pod-b-7f3a\n";

/// Pod a (enrolled client), pod b (enrolled server), pod c (opted out).
struct Scene {
    tb: Testbed,
    a: Pod,
    b: Pod,
    c: Pod,
    agent: Agent,
}

fn scene() -> Result<Scene> {
    let mut tb = Testbed::new(1)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(0, "b")?;
    let c = tb.add_pod(0, "c")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    let agent = tb.start_agent(
        0,
        &[
            WorkloadEntry::enrolled(&a),
            WorkloadEntry::enrolled(&b),
            WorkloadEntry::opted_out(&c),
        ],
    )?;
    Ok(Scene { tb, a, b, c, agent })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn curl_and_socat_reach_the_server_through_the_agent_on_ipv4_and_ipv6() -> Result<()> {
    let s = scene()?;
    let urls = [
        (format!("http://{}:{HTTP}/index.txt", s.b.ipv4), format!("{}:{HTTP}", s.b.ipv4)),
        (format!("http://[{}]:{HTTP}/index.txt", s.b.ipv6), format!("[{}]:{HTTP}", s.b.ipv6)),
    ];
    for (url, _) in &urls {
        let (code, body) = s.tb.curl(&s.a, url)?;
        assert_eq!((code, body.as_str()), (0, BODY), "curl {url}");
    }
    for (target, marker) in [
        (format!("TCP4:{}:{ECHO}", s.b.ipv4), "socat-v4-91c2"),
        (format!("TCP6:[{}]:{ECHO}", s.b.ipv6), "socat-v6-5be0"),
    ] {
        let out = s.tb.sh(&s.a, &format!("echo {marker} | socat -t 5 - {target}"))?;
        assert!(out.status.success(), "socat {target}: {}", ambit_testbed::stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker);
    }

    let captured = s.agent.wait_for_records("outbound connection captured", 4, secs(10))?;
    let dsts: Vec<&str> = captured.iter().map(|r| r["orig_dst"].as_str().unwrap()).collect();
    let expected = [
        urls[0].1.clone(),
        urls[1].1.clone(),
        format!("{}:{ECHO}", s.b.ipv4),
        format!("[{}]:{ECHO}", s.b.ipv6),
    ];
    assert_eq!(dsts, expected, "original destinations recorded by the agent");
    assert!(captured.iter().all(|r| r["workload"] == "default/a"));
    // The server saw pod a's own address: the agent dialled from a's netns.
    let access_log = s.tb.stderr_of("http-b");
    assert!(access_log.contains(&s.a.ipv4.to_string()), "{access_log}");
    assert!(access_log.contains(&s.a.ipv6.to_string()), "{access_log}");
    Ok(())
}
