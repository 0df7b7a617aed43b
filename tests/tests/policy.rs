//! End-to-end: identity-based L4 policy decided before any byte reaches the
//! application, the hash-chained audit log, and the metrics and admin
//! endpoints, with the real agent and real clients.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent, agent::agent_binary, stderr};
use anyhow::{Result, ensure};
use serde_json::Value;

const HTTP: u16 = 8080;
const ECHO: u16 = 9000;
const BODY: &str = "policy-protected-body-5a1e\n";
const TD: &str = "spiffe://cluster.local";

const ALLOW_FRONTEND_8080: &str = r#"
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-frontend, namespace: default }
spec:
  selector: { matchLabels: { app: server } }
  action: ALLOW
  rules:
    - from: [ { principals: ["spiffe://cluster.local/ns/default/sa/frontend"] } ]
      to: [ { ports: [8080] } ]
"#;

const DENY_FRONTEND: &str = r#"
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-frontend, namespace: default }
spec:
  selector: { matchLabels: { app: server } }
  action: DENY
  rules:
    - from: [ { principals: ["spiffe://cluster.local/ns/default/sa/frontend"] } ]
"#;

/// One node: `frontend` and `batch` clients, `server` (labels app=server)
/// with HTTP on 8080 and an echo server on 9000; mesh default deny.
struct Scene {
    tb: Testbed,
    frontend: Pod,
    batch: Pod,
    server: Pod,
    policies: PathBuf,
    agent: Agent,
}

fn scene(policy: &str) -> Result<Scene> {
    let mut tb = Testbed::new(1)?;
    let frontend = tb.add_pod(0, "frontend")?;
    let batch = tb.add_pod(0, "batch")?;
    let server = tb.add_pod(0, "server")?;
    tb.http_server(&server, "http", HTTP, BODY)?;
    tb.echo_server(&server, "echo", ECHO)?;
    let policies = tb.dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("policy.yaml"), policy)?;
    tb.write_workloads(
        0,
        &[
            WorkloadEntry::enrolled(&frontend),
            WorkloadEntry::enrolled(&batch),
            WorkloadEntry::enrolled(&server),
        ],
    )?;
    let agent = tb.start_agent_with(
        0,
        &[
            "--default-policy",
            "deny",
            "--policies",
            policies.to_str().unwrap(),
        ],
    )?;
    Ok(Scene {
        tb,
        frontend,
        batch,
        server,
        policies,
        agent,
    })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Scene {
    fn url(&self) -> String {
        format!("http://{}:{HTTP}/index.txt", self.server.ipv4)
    }

    fn served(&self) -> usize {
        self.tb.stderr_of("http").matches("GET /index.txt").count()
    }

    fn inbound_decisions(&self) -> Vec<Value> {
        self.agent.audit_decisions("inbound")
    }

    fn wait_decisions(&self, n: usize) -> Result<Vec<Value>> {
        ambit_testbed::wait_until(secs(10), || Ok(self.inbound_decisions().len() >= n))?;
        Ok(self.inbound_decisions())
    }

    fn metric(&self, series: &str) -> Result<f64> {
        self.agent.metric(&self.tb, series)
    }
}

fn ambit_audit_verify(files: &[&Path]) -> Result<(bool, String)> {
    let out = std::process::Command::new(agent_binary()?)
        .args(["audit", "verify"])
        .args(files)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    Ok((out.status.success(), text))
}

#[test]
fn only_the_allowed_identity_and_port_get_through_and_everything_is_audited_and_counted()
-> Result<()> {
    let s = scene(ALLOW_FRONTEND_8080)?;
    assert_eq!(s.tb.curl(&s.frontend, &s.url())?, (0, BODY.to_string()));
    // Another identity: the tunnel stream is refused before the app is dialled.
    let (code, body) = s.tb.curl(&s.batch, &s.url())?;
    assert!(
        code != 0 && body.is_empty(),
        "batch got through: {code} {body:?}"
    );
    // The allowed identity on another port.
    let out = s.tb.sh(
        &s.frontend,
        &format!(
            "echo denied-port-marker | socat -t 3 - TCP:{}:{ECHO}",
            s.server.ipv4
        ),
    )?;
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert_eq!(s.served(), 1, "a denied request reached the application");

    let decisions = s.wait_decisions(3)?;
    let summary: Vec<(String, String, u64, String)> = decisions
        .iter()
        .map(|r| {
            (
                r["source"]["spiffe_id"].as_str().unwrap_or("").to_owned(),
                r["decision"].as_str().unwrap_or("").to_owned(),
                r["destination"]["port"].as_u64().unwrap_or(0),
                r["policy"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                format!("{TD}/ns/default/sa/frontend"),
                "allow".into(),
                8080,
                "default/allow-frontend".into()
            ),
            (
                format!("{TD}/ns/default/sa/batch"),
                "deny".into(),
                8080,
                String::new()
            ),
            (
                format!("{TD}/ns/default/sa/frontend"),
                "deny".into(),
                9000,
                String::new()
            ),
        ]
    );
    for record in &decisions {
        assert_eq!(record["destination"]["workload"], "default/server");
        assert_eq!(
            record["destination"]["spiffe_id"],
            format!("{TD}/ns/default/sa/server")
        );
        assert_eq!(record["tls_version"], "TLSv1_3");
        assert!(
            record["peer_cert_serial"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
        assert_eq!(record["node"], "node0");
    }
    ambit_testbed::wait_until(secs(10), || {
        Ok(s.agent
            .audit_records()
            .iter()
            .any(|r| r["event"] == "close"))
    })?;
    let close = s
        .agent
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "close")
        .unwrap();
    assert!(
        close["bytes_received"].as_u64().unwrap() > BODY.len() as u64,
        "{close}"
    );

    assert_eq!(
        s.metric(r#"ambit_connections_opened_total{direction="inbound",decision="allow"}"#)?,
        1.0
    );
    assert_eq!(
        s.metric(r#"ambit_connections_opened_total{direction="inbound",decision="deny"}"#)?,
        2.0
    );
    assert_eq!(s.metric("ambit_policy_denials_total")?, 2.0);
    assert_eq!(s.metric("ambit_enrolled_workloads")?, 3.0);

    let (ok, text) = ambit_audit_verify(&[&s.agent.audit_log])?;
    assert!(ok, "{text}");
    Ok(())
}

#[test]
fn a_policy_change_takes_effect_within_two_seconds_and_a_bad_file_keeps_the_last_good_set()
-> Result<()> {
    let s = scene(ALLOW_FRONTEND_8080)?;
    assert_eq!(s.tb.curl(&s.frontend, &s.url())?, (0, BODY.to_string()));

    // A long-lived allowed connection, to see it closed by the change.
    let watcher = s.tb.spawn(
        &s.frontend,
        "long-connection",
        &[
            "sh",
            "-c",
            &format!("sleep 30 | socat - TCP:{}:{HTTP}", s.server.ipv4),
        ],
    )?;
    ambit_testbed::wait_until(secs(10), || {
        Ok(s.agent.records("inbound connection accepted").len() >= 2)
    })?;

    std::fs::write(s.policies.join("deny.yaml"), DENY_FRONTEND)?;
    let changed = Instant::now();
    let denied_after = loop {
        let (code, _) = s.tb.curl(&s.frontend, &s.url())?;
        if code != 0 {
            break changed.elapsed();
        }
        ensure!(
            changed.elapsed() < secs(10),
            "the DENY policy never took effect"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(denied_after < secs(2), "took {denied_after:?}");
    // The running connection the new policy forbids was closed.
    let closed = s
        .agent
        .wait_for_records("inbound connection closed", 2, secs(5))?;
    assert!(
        closed.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("policy no longer allows"))),
        "{closed:?}"
    );
    let _ = watcher;

    // A malformed file is rejected with file:line:column; DENY stays in force.
    std::fs::write(
        s.policies.join("broken.yaml"),
        "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: x, namespace: default }\nspec:\n  acton: ALLOW\n",
    )?;
    ambit_testbed::wait_until(secs(5), || {
        Ok(s.metric("ambit_policy_reload_rejections_total")? >= 1.0)
    })?;
    let rejected = s.agent.logs().into_iter().find(|r| {
        r["level"] == "ERROR"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("broken.yaml:5:"))
    });
    assert!(
        rejected.is_some(),
        "no file:line:column error in:\n{}",
        s.agent.raw_log()
    );
    for _ in 0..5 {
        assert_ne!(
            s.tb.curl(&s.frontend, &s.url())?.0,
            0,
            "the last good (DENY) set stopped serving"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Removing both files restores the ALLOW policy.
    std::fs::remove_file(s.policies.join("broken.yaml"))?;
    std::fs::remove_file(s.policies.join("deny.yaml"))?;
    ambit_testbed::wait_until(secs(5), || Ok(s.tb.curl(&s.frontend, &s.url())?.0 == 0))?;
    Ok(())
}

#[test]
fn ambit_audit_verify_detects_an_edit_a_deleted_line_and_truncation() -> Result<()> {
    let s = scene(ALLOW_FRONTEND_8080)?;
    for _ in 0..3 {
        s.tb.curl(&s.frontend, &s.url())?;
        s.tb.curl(&s.batch, &s.url())?;
    }
    s.wait_decisions(6)?;
    let log = std::fs::read_to_string(&s.agent.audit_log)?;
    let dir = s.tb.dir.path();
    let (ok, text) = ambit_audit_verify(&[&s.agent.audit_log])?;
    assert!(ok && text.contains("chain intact"), "{text}");

    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 6);
    let edited = dir.join("edited.log");
    std::fs::write(
        &edited,
        log.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1),
    )?;
    let deleted = dir.join("deleted.log");
    let mut without = lines.clone();
    without.remove(2);
    std::fs::write(&deleted, without.join("\n") + "\n")?;
    let truncated = dir.join("truncated.log");
    std::fs::write(&truncated, &log[..log.len() - 20])?;
    for (file, kind) in [
        (&edited, "edited"),
        (&deleted, "removed or reordered"),
        (&truncated, "truncated"),
    ] {
        let (ok, text) = ambit_audit_verify(&[file])?;
        assert!(!ok && text.contains(kind), "{kind}: {text}");
    }
    Ok(())
}

#[test]
fn the_admin_server_reports_health_readiness_config_and_certificates_without_keys() -> Result<()> {
    let s = scene(ALLOW_FRONTEND_8080)?;
    assert_eq!(s.agent.admin_get(&s.tb, "/healthz")?.0, "200");
    ambit_testbed::wait_until(secs(10), || {
        Ok(s.agent.admin_get(&s.tb, "/readyz")?.0 == "200")
    })?;
    let (code, dump) = s.agent.admin_get(&s.tb, "/config_dump")?;
    assert_eq!(code, "200");
    let dump: Value = serde_json::from_str(&dump)?;
    assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(3));
    assert_eq!(dump["policies"]["names"][0], "default/allow-frontend");
    assert_eq!(dump["policies"]["default"], "deny");
    let (code, certs) = s.agent.admin_get(&s.tb, "/certs")?;
    assert_eq!(code, "200");
    let certs: Value = serde_json::from_str(&certs)?;
    assert_eq!(certs.as_array().map(Vec::len), Some(3));
    for body in [dump.to_string(), certs.to_string()] {
        assert!(
            !body.contains("PRIVATE KEY") && !body.to_lowercase().contains("\"key\""),
            "{body}"
        );
    }
    // The same request twice: one decision computed, one from the cache.
    for _ in 0..2 {
        assert_eq!(s.tb.curl(&s.frontend, &s.url())?, (0, BODY.to_string()));
    }
    assert_eq!(s.metric("ambit_policy_decision_cache_misses_total")?, 1.0);
    assert_eq!(s.metric("ambit_policy_decision_cache_hits_total")?, 1.0);
    let (_, metrics) = s.agent.admin_get(&s.tb, "/metrics")?;
    assert!(metrics.contains("ambit_svid_expiry_timestamp_seconds{spiffe_id=\"spiffe://cluster.local/ns/default/sa/server\"}"), "{metrics}");
    assert_eq!(s.agent.admin_get(&s.tb, "/nope")?.0, "404");
    Ok(())
}
