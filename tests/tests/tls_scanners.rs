//! Public TLS scanners (sslscan, testssl.sh, nmap's ssl-enum-ciphers,
//! sslyze) against a pod's tunnel port, from its node: only TLS 1.3 is
//! offered, no session can be resumed, and a client without a certificate
//! is refused. `cargo xtask setup` installs every scanner; a missing one
//! fails the test rather than skipping it.

use std::{path::Path, time::Duration};

use ambit_testbed::{Node, Testbed, WorkloadEntry, agent::Agent, stderr, wait_until};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const OLD_PROTOCOLS: [&str; 5] = ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"];

/// A two-node mesh with `ambit ca`: pod `a` on node 0, pod `b` on node 1.
/// Scanners run on node 0 (not in the mesh) against b's tunnel port; the
/// client certificate, where one is given, is node 0's credential, which
/// b's agent accepts as a peer of the trust domain.
struct Scan {
    tb: Testbed,
    node: Node,
    target: String,
    cert: String,
    key: String,
    _ca: Agent,
    _agent0: Agent,
    server_agent: Agent,
}

fn setup() -> Result<Scan> {
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let b = tb.add_pod(1, "b")?;
    let entries = [WorkloadEntry::enrolled(&a), WorkloadEntry::enrolled(&b)];
    let ca = tb.start_ca(&entries, 3600)?;
    let agent0 = tb.start_agent(0, &entries)?;
    let agent1 = tb.start_agent(1, &entries)?;
    let credential = tb.dir.path().join("ca-bootstrap/nodes/node0");
    Ok(Scan {
        node: tb.node(0).clone(),
        target: format!("{}:15008", b.ipv4),
        cert: path(&credential.join("node.pem")),
        key: path(&credential.join("node-key.pem")),
        tb,
        _ca: ca,
        _agent0: agent0,
        server_agent: agent1,
    })
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Fails with the fix if `program` is not installed.
fn require(program: &str) -> Result<()> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ensure!(
        found,
        "{program} is not installed: run `cargo xtask setup`, which installs every scanner \
         this test runs"
    );
    Ok(())
}

impl Scan {
    /// Runs a scanner on node 0; returns its standard output.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.run_any_status(args)?;
        ensure!(
            out.status.success(),
            "{} failed ({}): {}\n{}",
            args[0],
            out.status,
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a scanner whose exit status is not its verdict (testssl.sh
    /// exits non-zero when any of its probes hit a problem, such as a slow
    /// answer on a loaded machine); the caller reads the findings it wrote.
    fn run_any_status(&self, args: &[&str]) -> Result<std::process::Output> {
        require(args[0])?;
        self.tb
            .run_within(&self.node, args, Duration::from_secs(300))
    }

    fn file(&self, name: &str) -> String {
        path(&self.tb.dir.path().join(name))
    }
}

/// sslscan's protocol lines: `TLSv1.2   disabled`, `TLSv1.3   enabled`.
fn sslscan_protocols(scan: &str) -> Result<Vec<String>> {
    let mut enabled = Vec::new();
    for protocol in OLD_PROTOCOLS.iter().chain(&["TLSv1.3"]) {
        let line = scan
            .lines()
            .find(|l| l.split_whitespace().next() == Some(protocol))
            .with_context(|| format!("sslscan reported nothing about {protocol}:\n{scan}"))?;
        match line.split_whitespace().nth(1) {
            Some("enabled") => enabled.push(protocol.to_string()),
            Some("disabled") => {}
            _ => bail!("unexpected sslscan line {line:?}"),
        }
    }
    Ok(enabled)
}

/// The protocol tables of nmap's ssl-enum-ciphers in its XML output
/// (`<table key="TLSv1.3">`).
fn nmap_protocols(xml: &str) -> Result<Vec<String>> {
    ensure!(
        xml.contains(r#"id="ssl-enum-ciphers""#),
        "nmap ran no ssl-enum-ciphers script:\n{xml}"
    );
    Ok(xml
        .split(r#"<table key=""#)
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|key| key.starts_with("TLSv") || key.starts_with("SSLv"))
        .map(String::from)
        .collect())
}

/// testssl.sh's JSON findings by id.
fn testssl_finding<'a>(findings: &'a [Value], id: &str) -> Result<&'a str> {
    findings
        .iter()
        .find(|f| f["id"] == id)
        .and_then(|f| f["finding"].as_str())
        .with_context(|| format!("testssl.sh reported no {id}"))
}

/// A testssl.sh finding that says the feature is absent.
fn says_no(finding: &str) -> bool {
    let finding = finding.to_ascii_lowercase();
    finding.starts_with("no") || finding.starts_with("not ")
}

#[test]
fn scanners_find_tls13_only_no_resumption_and_client_certificates_required() -> Result<()> {
    for scanner in ["sslscan", "testssl", "nmap", "sslyze"] {
        require(scanner)?;
    }
    let s = setup()?;

    // sslscan, with a client certificate so every handshake can complete.
    let scan = s.run(&[
        "sslscan",
        "--no-colour",
        &format!("--certs={}", s.cert),
        &format!("--pk={}", s.key),
        &s.target,
    ])?;
    assert_eq!(sslscan_protocols(&scan)?, ["TLSv1.3"], "sslscan:\n{scan}");

    // nmap ssl-enum-ciphers (no client certificate).
    let (ip, port) = s.target.rsplit_once(':').unwrap();
    let xml = s.run(&[
        "nmap",
        "-Pn",
        "-n",
        "-p",
        port,
        "--script",
        "ssl-enum-ciphers",
        "-oX",
        "-",
        ip,
    ])?;
    assert_eq!(nmap_protocols(&xml)?, ["TLSv1.3"], "nmap:\n{xml}");

    // testssl.sh: protocols and the server's session defaults.
    let json = s.file("testssl.json");
    s.run_any_status(&[
        "testssl",
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--protocols",
        "--server-defaults",
        "--jsonfile",
        &json,
        &s.target,
    ])?;
    let findings: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json)?)
        .context("parsing testssl.sh's JSON")?;
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"] {
        let finding = testssl_finding(&findings, id)?;
        assert!(
            finding.starts_with("not offered"),
            "testssl {id}: {finding}"
        );
    }
    let tls13 = testssl_finding(&findings, "TLS1_3")?;
    assert!(tls13.starts_with("offered"), "testssl TLS1_3: {tls13}");
    for id in [
        "TLS_session_ticket",
        "SSL_sessionID_support",
        "sessionresumption_ticket",
        "sessionresumption_ID",
    ] {
        let finding = testssl_finding(&findings, id)?;
        assert!(says_no(finding), "testssl {id}: {finding}");
    }

    // sslyze with a client certificate: cipher suites per protocol and
    // resumption. (Its SSLv2 probe cannot load an EC client key, so SSLv2
    // is left to the scans above.)
    let with_cert = s.file("sslyze-cert.json");
    s.run(&[
        "sslyze",
        "--cert",
        &s.cert,
        "--key",
        &s.key,
        "--sslv3",
        "--tlsv1",
        "--tlsv1_1",
        "--tlsv1_2",
        "--tlsv1_3",
        "--resum",
        "--mozilla_config",
        "disable",
        "--json_out",
        &with_cert,
        &s.target,
    ])?;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&with_cert)?)?;
    let server = &report["server_scan_results"][0];
    ensure!(
        server["scan_status"] == "COMPLETED",
        "sslyze did not complete: {server}"
    );
    let results = &server["scan_result"];
    for (command, accepted) in [
        ("ssl_3_0_cipher_suites", false),
        ("tls_1_0_cipher_suites", false),
        ("tls_1_1_cipher_suites", false),
        ("tls_1_2_cipher_suites", false),
        ("tls_1_3_cipher_suites", true),
    ] {
        let suites = results[command]["result"]["accepted_cipher_suites"]
            .as_array()
            .with_context(|| format!("sslyze {command}: {}", results[command]))?;
        assert_eq!(!suites.is_empty(), accepted, "sslyze {command}: {suites:?}");
    }
    let resumption = &results["session_resumption"]["result"];
    for (field, successes) in [
        (
            "session_id_resumption_result",
            "session_id_successful_resumptions_count",
        ),
        (
            "tls_ticket_resumption_result",
            "tls_ticket_successful_resumptions_count",
        ),
    ] {
        let verdict = resumption[field].as_str().unwrap_or_default();
        assert!(
            ["NOT_SUPPORTED", "SERVER_IS_TLS_1_3_ONLY"].contains(&verdict),
            "sslyze {field}: {resumption}"
        );
        assert_eq!(resumption[successes], 0, "sslyze {successes}: {resumption}");
    }

    // sslyze without a certificate learns that one is required...
    let without_cert = s.file("sslyze-nocert.json");
    s.run(&[
        "sslyze",
        "--tlsv1_3",
        "--mozilla_config",
        "disable",
        "--json_out",
        &without_cert,
        &s.target,
    ])?;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&without_cert)?)?;
    let connectivity = &report["server_scan_results"][0]["connectivity_result"];
    assert_eq!(
        connectivity["client_auth_requirement"], "REQUIRED",
        "sslyze: {connectivity}"
    );
    // ...and b's agent refused the certificate-less handshakes (nmap's,
    // testssl.sh's, sslyze's) as such.
    let no_certificate = r#"ambit_tls_handshake_failures_total{reason="no_certificate"}"#;
    wait_until(Duration::from_secs(10), || {
        Ok(s.server_agent.metric(&s.tb, no_certificate)? >= 1.0)
    })
    .context("b's agent counted no handshake without a client certificate")?;
    Ok(())
}
