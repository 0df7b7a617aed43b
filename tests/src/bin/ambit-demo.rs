//! `cargo xtask demo`: two simulated nodes, `ambit ca`, an agent per node,
//! a client pod on node 0, a server pod on node 1 and an attacker pod that
//! is not in the mesh; real unmodified clients, and each agent's own record
//! of what it decided.

use std::time::Duration;

use ambit_testbed::{Pod, Testbed, WorkloadEntry, agent::Agent};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const PORT: u16 = 8080;
const ECHO: u16 = 9000;

const POLICY: &str = "apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-client, namespace: default }
spec:
  selector: { matchLabels: { app: server } }
  action: ALLOW
  rules:
    - from: [ { principals: [\"spiffe://cluster.local/ns/default/sa/client\"] } ]
      to: [ { ports: [8080] } ]
";

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   | {l}\n")).collect()
}

/// The second identity and the second port are denied; the audit log and
/// the metrics say so.
fn policy_demo(
    tb: &Testbed,
    agent1: &Agent,
    client: &Pod,
    batch: &Pod,
    server: &Pod,
    url: &str,
) -> Result<()> {
    let (code, _) = tb.curl(batch, url)?;
    println!("\n$ curl {url}   # in pod batch (enrolled, but not allowed): exit {code}");
    ensure!(code != 0, "batch got through");
    let script = format!("echo hi | socat -t 3 - TCP:{}:{ECHO}", server.ipv4);
    let out = tb.sh(client, &script)?;
    println!(
        "$ {script}   # in pod client, port 9000 (not allowed): {:?}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    agent1.wait_for_records("inbound connection denied", 2, Duration::from_secs(10))?;
    println!("\n== node 1 audit log (hash-chained; `ambit audit verify` checks it):");
    for record in agent1
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "decision")
    {
        println!(
            "   {} {:<5} from {} to {}:{} policy={} reason={:?}",
            record["time"].as_str().unwrap_or_default(),
            record["decision"].as_str().unwrap_or_default(),
            record["source"]["spiffe_id"].as_str().unwrap_or("-"),
            record["destination"]["workload"]
                .as_str()
                .unwrap_or_default(),
            record["destination"]["port"],
            record["policy"].as_str().unwrap_or("-"),
            record["reason"].as_str().unwrap_or_default(),
        );
    }
    println!("\n== node 1 metrics (curl 127.0.0.1:15020/metrics):");
    for series in [
        r#"ambit_connections_opened_total{direction="inbound",decision="allow"}"#,
        r#"ambit_connections_opened_total{direction="inbound",decision="deny"}"#,
        "ambit_policy_denials_total",
    ] {
        println!("   {series} {}", agent1.metric(tb, series)?);
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut tb = Testbed::new(2)?;
    // The agents log as deployed.
    tb.set_log_filter("info");
    let client = tb.add_pod(0, "client")?;
    let batch = tb.add_pod(0, "batch")?;
    let attacker = tb.add_pod(0, "attacker")?;
    let server = tb.add_pod(1, "server")?;
    println!("== Ambit demo: two nodes joined by a veth link, pods in network namespaces");
    for pod in tb.pods() {
        println!(
            "   node{} pod {:<9} {} / {}",
            pod.node, pod.name, pod.ipv4, pod.ipv6
        );
    }
    tb.http_server(
        &server,
        "server-http",
        PORT,
        "hello from the server pod on node 1\n",
    )?;
    tb.echo_server(&server, "server-echo", ECHO)?;
    let entries = [
        WorkloadEntry::enrolled(&client),
        WorkloadEntry::enrolled(&batch),
        WorkloadEntry::opted_out(&attacker),
        WorkloadEntry::enrolled(&server),
    ];
    let policies = tb.dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("allow-client.yaml"), POLICY)?;
    let _ca = tb.start_ca(&entries, 3600)?;
    tb.write_workloads(0, &entries)?;
    tb.write_workloads(1, &entries)?;
    let policy_args = [
        "--default-policy",
        "deny",
        "--policies",
        policies.to_str().unwrap(),
    ];
    let agent0 = tb.start_agent_with(0, &policy_args)?;
    let agent1 = tb.start_agent_with(1, &policy_args)?;
    println!("== ambit ca and one agent per node running; client, batch and server enrolled");
    println!("== policy (mesh default: deny):\n{}", indent(POLICY));

    let url = format!("http://{}:{PORT}/index.txt", server.ipv4);
    let (code, body) = tb.curl(&client, &url)?;
    ensure!(
        code == 0,
        "curl from the client failed with exit code {code}"
    );
    println!(
        "\n$ curl {url}   # in pod client (node 0)\n{}",
        body.trim_end()
    );
    let tunnel = wait(&agent0, "tunnel established")?;
    let inbound = wait(&agent1, "inbound connection closed")?;
    println!(
        "   node 0 agent: tunnel to {} verified as {}",
        tunnel["peer_addr"].as_str().unwrap_or_default(),
        tunnel["peer_spiffe_id"].as_str().unwrap_or_default()
    );
    println!(
        "   node 1 agent: accepted {} from {} (certificate serial {})",
        inbound["dst"].as_str().unwrap_or_default(),
        inbound["peer_spiffe_id"].as_str().unwrap_or_default(),
        inbound["peer_cert_serial"].as_str().unwrap_or_default()
    );

    policy_demo(&tb, &agent1, &client, &batch, &server, &url)?;

    let (code, _) = tb.curl(&attacker, &url)?;
    println!("\n$ curl {url}   # in pod attacker (not in the mesh): exit {code}");
    ensure!(code != 0, "the attacker's plaintext reached the server");
    let denied = wait(&agent1, "inbound plaintext denied")?;
    println!(
        "   REFUSED by the node 1 agent: {}",
        denied["reason"].as_str().unwrap_or_default()
    );

    s_client_demo(
        &tb,
        &attacker,
        &server,
        &agent1,
        "",
        "without a client certificate",
        1,
    )?;
    let (cert, key) =
        tb.foreign_certificate("foreign", "spiffe://evil.local/ns/default/sa/client")?;
    let foreign = format!("-cert {} -key {}", cert.display(), key.display());
    s_client_demo(
        &tb,
        &attacker,
        &server,
        &agent1,
        &foreign,
        "with a certificate of trust domain evil.local",
        2,
    )?;

    fail_closed(&tb, &agent0, &client, &url)?;
    println!("\n== demo done; tearing down namespaces, cgroups and pins");
    Ok(())
}

fn wait(agent: &Agent, message: &str) -> Result<Value> {
    agent
        .wait_for_records(message, 1, Duration::from_secs(10))?
        .pop()
        .context("no record")
}

fn s_client_demo(
    tb: &Testbed,
    from: &Pod,
    server: &Pod,
    agent: &Agent,
    args: &str,
    what: &str,
    nth: usize,
) -> Result<()> {
    let script = format!(
        "openssl s_client -connect {}:15008 -tls1_3 {args} </dev/null >/dev/null 2>&1",
        server.ipv4
    );
    tb.run_within(from, &["sh", "-c", &script], Duration::from_secs(20))?;
    let failed = agent.wait_for_records("tls handshake failed", nth, Duration::from_secs(10))?;
    println!(
        "\n$ openssl s_client -connect {}:15008 {what}   # in pod attacker\n   REJECTED by the node 1 agent: {}",
        server.ipv4,
        failed[nth - 1]["reason"].as_str().unwrap_or_default()
    );
    Ok(())
}

fn fail_closed(tb: &Testbed, agent: &Agent, client: &Pod, url: &str) -> Result<()> {
    agent.stop_with(libc::SIGKILL)?;
    let (code, _) = tb.curl(client, url)?;
    println!(
        "\n== node 0 agent killed with SIGKILL; curl from the client now exits {code} (fails closed)"
    );
    ensure!(code != 0, "traffic bypassed the dead agent");
    let restarted = tb
        .start_agent_with(0, &[])
        .context("restarting the agent")?;
    let (code, body) = tb.curl(client, url)?;
    ensure!(code == 0, "curl after restart failed with {code}");
    println!(
        "== agent restarted (pid {}); curl works again: {}",
        restarted.pid,
        body.trim_end()
    );
    restarted.stop_with(libc::SIGTERM)?;
    Ok(())
}
