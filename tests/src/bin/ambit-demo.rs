//! `cargo xtask demo`: one simulated node, two enrolled pods and one that is
//! not, real unmodified clients, and the agent's own record of what it saw.

use ambit_testbed::{Testbed, WorkloadEntry, agent::Agent};
use anyhow::{Context, Result, ensure};

const PORT: u16 = 8080;

fn main() -> Result<()> {
    let mut tb = Testbed::new(1)?;
    let client = tb.add_pod(0, "client")?;
    let server = tb.add_pod(0, "server")?;
    let outsider = tb.add_pod(0, "outsider")?;
    println!("== Ambit demo: one node, pods in network namespaces");
    for pod in tb.pods() {
        println!("   pod {:<9} {} / {}", pod.name, pod.ipv4, pod.ipv6);
    }
    tb.http_server(&server, "server-http", PORT, "hello from the server pod\n")?;
    let agent = tb.start_agent(
        0,
        &[
            WorkloadEntry::enrolled(&client),
            WorkloadEntry::enrolled(&server),
            WorkloadEntry::opted_out(&outsider),
        ],
    )?;
    println!(
        "== agent running (pid {}), client and server enrolled, outsider opted out",
        agent.pid
    );

    for url in [
        format!("http://{}:{PORT}/index.txt", server.ipv4),
        format!("http://[{}]:{PORT}/index.txt", server.ipv6),
    ] {
        let (code, body) = tb.curl(&client, &url)?;
        ensure!(
            code == 0,
            "curl from the client failed with exit code {code}"
        );
        println!(
            "\n$ curl {url}   # in pod client (enrolled)\n{}",
            body.trim_end()
        );
    }
    let captured = agent.wait_for_records("outbound connection captured", 2, secs(10))?;
    println!("\n== the agent captured both connections (its log):");
    for record in &captured {
        print_record(record);
    }

    let url = format!("http://{}:{PORT}/index.txt", server.ipv4);
    let (code, body) = tb.curl(&outsider, &url)?;
    ensure!(
        code == 0,
        "curl from the outsider failed with exit code {code}"
    );
    println!(
        "\n$ curl {url}   # in pod outsider (not enrolled)\n{}",
        body.trim_end()
    );
    std::thread::sleep(secs(1));
    let after = agent.records("outbound connection captured").len();
    ensure!(
        after == captured.len(),
        "the outsider's connection was captured"
    );
    println!("== not captured: the agent still has {after} capture records");

    fail_closed(&tb, &agent, &client, &url)?;
    println!("\n== demo done; tearing down namespaces, cgroups and pins");
    Ok(())
}

fn fail_closed(tb: &Testbed, agent: &Agent, client: &ambit_testbed::Pod, url: &str) -> Result<()> {
    agent.stop_with(libc::SIGKILL)?;
    let (code, _) = tb.curl(client, url)?;
    println!(
        "\n== agent killed with SIGKILL; curl from the client now exits {code} (fails closed)"
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

fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

fn print_record(record: &serde_json::Value) {
    println!(
        "   {} workload={} client={} orig_dst={}",
        record["message"].as_str().unwrap_or_default(),
        record["workload"].as_str().unwrap_or_default(),
        record["client"].as_str().unwrap_or_default(),
        record["orig_dst"].as_str().unwrap_or_default(),
    );
}
