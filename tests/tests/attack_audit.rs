//! Attacks on the audit trail, end to end on two nodes with `ambit ca`:
//! an unauthenticated source flooding a strict pod must not flood the log
//! (its refusals are rate-limited and summarised, authenticated decisions
//! still recorded one by one), and a log set whose oldest records were
//! removed must fail `ambit audit verify` unless given the saved anchor.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent, agent::agent_binary, stderr};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const TUNNEL: u16 = 15008;
const BODY: &str = "audit-flood-target-7c21\n";
const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";

/// Node 0: client pod `a` (service account `frontend`, enrolled) and `c`
/// (not in the mesh). Node 1: server pod `b` (strict), whose agent runs
/// with `agent1_args`.
struct Scene {
    tb: Testbed,
    a: Pod,
    b: Pod,
    c: Pod,
    _ca: Agent,
    _agent0: Agent,
    agent1: Agent,
}

fn scene(agent1_args: &[&str]) -> Result<Scene> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let c = tb.add_pod(0, "c")?;
    let b = tb.add_pod(1, "b")?;
    tb.http_server(&b, "http-b", HTTP, BODY)?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    let entries = [
        WorkloadEntry::enrolled(&a).with_service_account("frontend"),
        WorkloadEntry::opted_out(&c),
        WorkloadEntry::enrolled(&b),
    ];
    let (ca, agent0, agent1) = tb.start_mesh(&entries, 3600, [&[], agent1_args])?;
    Ok(Scene {
        tb,
        a,
        b,
        c,
        _ca: ca,
        _agent0: agent0,
        agent1,
    })
}

/// A bounded flood from the pod it runs in: `count` connections to `host`,
/// alternately plaintext to `plain_port` and garbage instead of a TLS
/// ClientHello to `tls_port` (or plaintext only when `tls_port` is 0). Each
/// connection waits for the agent's reset or close, so every attempt was
/// seen by the agent. Halfway it prints `half` and waits (at most 60 s) for
/// the file `resume` to exist, if one is named; at the end it prints the
/// number of attempts made.
const FLOOD: &str = r#"
import os, socket, sys, time
host, plain, tls, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resume = sys.argv[5] if len(sys.argv) > 5 else None
made = 0
for i in range(count):
    if resume and i == count // 2:
        print("half", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(resume) and time.monotonic() < deadline:
            time.sleep(0.05)
    port = tls if tls and i % 2 else plain
    try:
        s = socket.create_connection((host, port), timeout=10)
    except ConnectionResetError:
        # The agent accepted and reset it before connect() returned.
        made += 1
        continue
    try:
        if port == tls:
            s.sendall(b"GET / HTTP/1.0\r\n\r\nnot a TLS ClientHello\r\n")
        while s.recv(4096):
            pass
    except OSError:
        pass
    finally:
        s.close()
    made += 1
print(made, flush=True)
"#;

fn flood_args(s: &Scene, tls_port: u16, count: usize, resume: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "python3".into(),
        "-c".into(),
        FLOOD.into(),
        s.b.ipv4.to_string(),
        ECHO.to_string(),
        tls_port.to_string(),
        count.to_string(),
    ];
    args.extend(resume.map(|p| p.display().to_string()));
    args
}

/// Waits for a spawned flood to print its attempt count.
fn wait_flood(s: &Scene, name: &str, count: usize) -> Result<()> {
    ambit_testbed::wait_until(Duration::from_secs(180), || {
        ensure!(
            !s.tb.stderr_of(name).contains("Traceback"),
            "the flood failed"
        );
        Ok(s.tb.stdout_of(name).lines().last() == Some(&count.to_string()))
    })
    .with_context(|| format!("flood {name}: {}", s.tb.stderr_of(name)))
}

fn source_ip(record: &Value) -> Option<IpAddr> {
    let address: std::net::SocketAddr = record["source"]["address"].as_str()?.parse().ok()?;
    Some(address.ip())
}

fn ambit_audit_verify(args: &[String]) -> Result<(bool, String)> {
    let out = std::process::Command::new(agent_binary()?)
        .args(["audit", "verify"])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    Ok((out.status.success(), text))
}

fn paths(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| f.display().to_string()).collect()
}

#[test]
fn an_unauthenticated_flood_is_summarised_and_authenticated_decisions_still_recorded() -> Result<()>
{
    const ATTEMPTS: usize = 2000;
    let s = scene(&[
        "--audit-unauthenticated-burst",
        "10",
        "--audit-unauthenticated-per-sec",
        "1",
        "--audit-summary-interval-secs",
        "1",
    ])?;
    let resume = s.tb.dir.path().join("flood-resume");
    let args = flood_args(&s, TUNNEL, ATTEMPTS, Some(&resume));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.tb.spawn(&s.c, "flood", &args)?;
    // Halfway through the flood, with the source well over its limit, an
    // enrolled client's request goes through and gets a decision record of
    // its own.
    ambit_testbed::wait_until(Duration::from_secs(120), || {
        Ok(s.tb.stdout_of("flood").starts_with("half"))
    })
    .with_context(|| format!("flood: {}", s.tb.stderr_of("flood")))?;
    let url = format!("http://{}:{HTTP}/index.txt", s.b.ipv4);
    let served = s.tb.curl(&s.a, &url);
    std::fs::write(&resume, b"")?;
    assert_eq!(served?, (0, BODY.to_string()));
    wait_flood(&s, "flood", ATTEMPTS)?;

    let c_ip = IpAddr::V4(s.c.ipv4);
    // Records one by one and summarised counts, once every summary is out.
    let tally = || {
        let records = s.agent1.audit_records();
        let one_by_one = records
            .iter()
            .filter(|r| r["event"] == "decision" && source_ip(r) == Some(c_ip))
            .count();
        let suppressed: u64 = records
            .iter()
            .filter(|r| r["event"] == "suppressed" && source_ip(r) == Some(c_ip))
            .map(|r| r["suppressed"].as_u64().unwrap_or(0))
            .sum();
        (records, one_by_one, suppressed)
    };
    ambit_testbed::wait_until(Duration::from_secs(20), || {
        let (_, one_by_one, suppressed) = tally();
        Ok(one_by_one + usize::try_from(suppressed)? >= ATTEMPTS)
    })
    .with_context(|| {
        let (_, one_by_one, suppressed) = tally();
        format!("from c: {one_by_one} records, {suppressed} suppressed, of {ATTEMPTS}")
    })?;
    let (records, one_by_one, suppressed) = tally();
    eprintln!(
        "{ATTEMPTS} attempts: {one_by_one} records one by one, {suppressed} suppressed, {} lines in the log",
        records.len()
    );
    assert_eq!(one_by_one + usize::try_from(suppressed)?, ATTEMPTS);
    assert!(
        one_by_one * 10 <= ATTEMPTS,
        "{one_by_one} records for {ATTEMPTS} attempts is not far fewer"
    );
    // Both kinds of refusal were counted, not just one.
    let reasons: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "decision" && source_ip(r) == Some(c_ip))
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("TLS handshake failed"))
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("plaintext from outside"))
    );
    let summary = records
        .iter()
        .find(|r| r["event"] == "suppressed")
        .context("no suppression summary")?;
    for member in ["first_time", "last_time", "reason"] {
        assert!(summary[member].is_string(), "{member} missing: {summary}");
    }
    assert_eq!(summary["decision"], "deny");

    // The authenticated request has its own allow decision.
    assert!(
        records.iter().any(|r| r["event"] == "decision"
            && r["decision"] == "allow"
            && r["source"]["spiffe_id"] == FRONTEND),
        "no decision record for the authenticated request"
    );
    assert_eq!(
        s.agent1
            .metric(&s.tb, "ambit_audit_records_suppressed_total")?,
        suppressed as f64
    );
    let (ok, text) = ambit_audit_verify(&paths(std::slice::from_ref(&s.agent1.audit_log)))?;
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("suppressed records: {suppressed} ")),
        "{text}"
    );
    Ok(())
}

#[test]
fn an_audit_set_missing_its_oldest_records_fails_verify_unless_given_the_saved_anchor() -> Result<()>
{
    const ATTEMPTS: usize = 150;
    // Small files so the set rotates through all its generations; no rate
    // limit, so every refusal is a record.
    let s = scene(&[
        "--audit-max-bytes",
        "4096",
        "--audit-unauthenticated-burst",
        "100000",
        "--audit-unauthenticated-total-per-sec",
        "100000",
    ])?;
    let args = flood_args(&s, 0, ATTEMPTS, None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.tb.spawn(&s.c, "records", &args)?;
    wait_flood(&s, "records", ATTEMPTS)?;
    // The writer keeps order: once this request's close record is in the
    // live file, every refusal before it is written.
    let url = format!("http://{}:{HTTP}/index.txt", s.b.ipv4);
    assert_eq!(s.tb.curl(&s.a, &url)?, (0, BODY.to_string()));
    ambit_testbed::wait_until(Duration::from_secs(10), || {
        Ok(s.agent1
            .audit_records()
            .iter()
            .any(|r| r["event"] == "close" && r["source"]["spiffe_id"] == FRONTEND))
    })?;

    let log = &s.agent1.audit_log;
    let generation = |n: u32| PathBuf::from(format!("{}.{n}", log.display()));
    let set: Vec<PathBuf> = (1..=5).rev().map(generation).chain([log.clone()]).collect();
    for file in &set {
        ensure!(
            file.exists(),
            "{} missing: no full rotation",
            file.display()
        );
    }
    // Rotation deleted older generations, and the chain says so.
    let (ok, text) = ambit_audit_verify(&paths(&set))?;
    eprintln!("ambit audit verify on the whole set:\n{text}");
    assert!(ok, "{text}");
    assert!(text.contains("deleted by rotation"), "{text}");
    // What an operator keeps before archiving and removing the oldest file.
    let oldest = set[0].display().to_string();
    let anchor = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{oldest}: "))?
                .split_once("last record hash ")
                .map(|(_, hash)| hash.trim().to_owned())
        })
        .with_context(|| format!("no line for {oldest} in:\n{text}"))?;

    std::fs::remove_file(&set[0])?;
    let rest = paths(&set[1..]);
    let (ok, text) = ambit_audit_verify(&rest)?;
    eprintln!("ambit audit verify without the oldest file:\n{text}");
    assert!(!ok, "a set missing its oldest file verified:\n{text}");
    assert!(text.contains("chain starts at seq"), "{text}");
    assert!(text.contains("not at the beginning"), "{text}");

    let with_anchor = |hash: &str| {
        let mut args = vec!["--anchor".to_owned(), hash.to_owned()];
        args.extend(rest.iter().cloned());
        ambit_audit_verify(&args)
    };
    let (ok, text) = with_anchor(&anchor)?;
    assert!(ok, "{text}");
    // Any other anchor fails, e.g. the hash the next file ends with.
    let first_line = std::fs::read_to_string(&set[1])?
        .lines()
        .next()
        .context("empty generation")?
        .to_owned();
    let record: Value = serde_json::from_str(&first_line)?;
    let wrong = record["hash"].as_str().context("no hash")?.to_owned();
    let (ok, text) = with_anchor(&wrong)?;
    assert!(!ok, "a wrong anchor verified:\n{text}");

    // Cutting the first records off the now-oldest file fails too, even
    // with the anchor that was right for it.
    let content = std::fs::read_to_string(&set[1])?;
    let cut: String = content.lines().skip(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&set[1], cut)?;
    let (ok, text) = ambit_audit_verify(&rest)?;
    assert!(!ok && text.contains("chain starts at seq"), "{text}");
    let (ok, text) = with_anchor(&anchor)?;
    assert!(!ok, "{text}");
    Ok(())
}
