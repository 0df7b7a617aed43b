//! `ambit ca --kubernetes` end to end: a real API server, the chart's
//! ServiceAccounts and RBAC (tests/src/chart.rs), the CA with its root in a
//! Secret and its bundle in a ConfigMap, and agents on two simulated nodes
//! that attest with projected tokens bound to their own pods.

use std::time::Duration;

use ambit_testbed::{
    ControlPlane, Testbed,
    agent::{Agent, CA_PORT},
    kube_ca::{
        AGENT_SERVICE_ACCOUNT, CA_AUDIENCE, RELEASE_NAMESPACE, ROOT_SECRET, echo,
        echo_crosses_in_clear, install_release, published_bundle, secret_value,
    },
    kube_pods::kube_pod,
    wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const ECHO: u16 = 9000;
const MESH: &str = "ambit.dev/mesh";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The base64 bodies of the PEM certificates in `pem` (formatting aside).
fn certificates(pem: &str) -> Vec<String> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|block| block.split("-----END CERTIFICATE-----").next())
        .map(|body| body.split_whitespace().collect())
        .collect()
}

/// Waits until `daemon` logged `msg` with a record `matches` accepts.
fn wait_for_record(
    daemon: &Agent,
    msg: &str,
    timeout: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut found = None;
    wait_until(timeout, || {
        found = daemon.records(msg).into_iter().find(|r| matches(r));
        Ok(found.is_some())
    })
    .with_context(|| {
        format!(
            "{} never logged a matching {msg:?}:\n{}",
            daemon.name,
            daemon.raw_log()
        )
    })?;
    Ok(found.expect("found"))
}

fn field_is(record: &Value, key: &str, value: &str) -> bool {
    record[key].as_str() == Some(value)
}

fn field_has(record: &Value, key: &str, part: &str) -> bool {
    record[key].as_str().is_some_and(|v| v.contains(part))
}

fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn wait_for_svid(agent: &Agent, id: &str) -> Result<()> {
    wait_for_record(agent, "svid issued", secs(30), |r| {
        field_is(r, "spiffe_id", id)
    })
    .map(drop)
}

#[test]
fn agents_attest_with_pod_tokens_and_keep_tunnelling_across_ca_restarts_and_a_root_rotation()
-> Result<()> {
    let cp = ControlPlane::start()?;
    let release = install_release(&cp)?;
    let ns = cp.namespace("ca-cluster")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, &format!("{MESH}=enabled")])?;

    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let d = tb.add_pod(0, "d")?;
    let b = tb.add_pod(1, "b")?;
    let c = tb.add_pod(1, "c")?;
    tb.echo_server(&b, "echo-b", ECHO)?;
    tb.echo_server(&c, "echo-c", ECHO)?;

    // First start: the CA makes the root, keeps it in the Secret and
    // publishes it as the bundle.
    let ca = tb.start_kubernetes_ca(&cp, &release.ca_kubeconfig)?;
    let root = secret_value(&cp, "root.pem")?.context("the Secret has no root.pem")?;
    ensure!(secret_value(&cp, "root-key.pem")?.is_some(), "no root key");
    ensure!(
        certificates(&published_bundle(&cp)?) == certificates(&root),
        "the published bundle is not the root"
    );

    // Each agent attests with a token bound to its own pod on its node.
    // Node 0 reaches the CA by host name (resolved at connect time).
    let mut tokens = Vec::new();
    for node in 0..2 {
        let pod = tb.create_agent_pod(&cp, node, AGENT_SERVICE_ACCOUNT, "main")?;
        tokens.push(tb.write_pod_token(&cp, &pod, AGENT_SERVICE_ACCOUNT, CA_AUDIENCE)?);
    }
    let by_name = format!("localhost:{CA_PORT}");
    let by_address = format!("{}:{CA_PORT}", tb.node(0).link_ipv4);
    let kubeconfig = &release.agent_kubeconfig;
    let agent0 = tb.start_attesting_agent(0, &cp, kubeconfig, &by_name, &tokens[0])?;
    let agent1 = tb.start_attesting_agent(1, &cp, kubeconfig, &by_address, &tokens[1])?;
    for pod in [&a, &b] {
        tb.run_kube_pod(&cp, &ns, pod, &kube_pod(pod, &tb, &pod.name))?;
    }
    wait_for_svid(&agent0, &spiffe_id(&ns, "a"))?;
    wait_for_svid(&agent1, &spiffe_id(&ns, "b"))?;
    for node in ["node0", "node1"] {
        wait_for_record(&ca, "node attested", secs(5), |r| field_is(r, "node", node))?;
    }
    ensure!(
        !echo_crosses_in_clear(&tb, &a, &b, ECHO, "attested", secs(30))?,
        "a to b crossed the link in clear"
    );

    // The CA restarts: running tunnels carry traffic while it is away, and
    // the new process signs under the same root, so a pod that arrives
    // afterwards is reached through a new tunnel.
    ca.stop_with(libc::SIGTERM)?;
    ensure!(
        echo(&tb, &a, &b, ECHO, "while-ca-down")?,
        "the running tunnel broke"
    );
    let ca = tb.start_kubernetes_ca(&cp, &release.ca_kubeconfig)?;
    let kept = ca.records("CA root kept in a Secret");
    ensure!(
        kept.first().is_some_and(|r| r["created"] == false),
        "the restarted CA made a new root: {kept:?}"
    );
    ensure!(secret_value(&cp, "root.pem")?.as_deref() == Some(root.as_str()));
    tb.run_kube_pod(&cp, &ns, &c, &kube_pod(&c, &tb, "c"))?;
    wait_for_svid(&agent1, &spiffe_id(&ns, "c"))?;
    ensure!(
        !echo_crosses_in_clear(&tb, &a, &c, ECHO, "after-restart", secs(30))?,
        "a to c crossed the link in clear"
    );
    ensure!(echo(&tb, &a, &b, ECHO, "after-restart-b")?);

    // Root rotation (docs/operations.md): the old root moves to
    // trusted-roots.pem and the root keys are removed; the restarted CA
    // makes a new root and publishes both. The running agents pick the new
    // bundle up: agent 0 verifies the CA's new serving chain to obtain d's
    // SVID, agent 1 accepts d's new-root SVID, and old SVIDs keep working.
    let secret = cp.kubectl.json(&[
        "get",
        "secret",
        ROOT_SECRET,
        "--namespace",
        RELEASE_NAMESPACE,
    ])?;
    let old_root_b64 = secret["data"]["root.pem"].as_str().context("no root.pem")?;
    let patch = serde_json::json!({"data": {
        "trusted-roots.pem": old_root_b64, "root.pem": null, "root-key.pem": null,
    }});
    cp.kubectl.run(&[
        "patch",
        "secret",
        ROOT_SECRET,
        "--namespace",
        RELEASE_NAMESPACE,
        "--type",
        "merge",
        "--patch",
        &patch.to_string(),
    ])?;
    ca.stop_with(libc::SIGTERM)?;
    let ca = tb.start_kubernetes_ca(&cp, &release.ca_kubeconfig)?;
    let new_root = secret_value(&cp, "root.pem")?.context("no new root.pem")?;
    ensure!(new_root != root, "the rotation kept the old root");
    let bundle = certificates(&published_bundle(&cp)?);
    ensure!(
        bundle == [certificates(&new_root), certificates(&root)].concat(),
        "the bundle is not new root + old root: {} certificates",
        bundle.len()
    );
    for agent in [&agent0, &agent1] {
        wait_for_record(agent, "trust bundle updated", secs(20), |r| r["roots"] == 2)?;
    }
    tb.run_kube_pod(&cp, &ns, &d, &kube_pod(&d, &tb, "d"))?;
    wait_for_svid(&agent0, &spiffe_id(&ns, "d"))?;
    ensure!(
        !echo_crosses_in_clear(&tb, &d, &b, ECHO, "rotated", secs(30))?,
        "d to b crossed the link in clear"
    );
    ensure!(echo(&tb, &a, &c, ECHO, "old-svids-after-rotation")?);
    for agent in [&agent0, &agent1] {
        ensure!(
            agent.records("agent ready").len() == 1 && !agent.has_exited(),
            "{} restarted",
            agent.name
        );
    }
    drop(ca);
    Ok(())
}

#[test]
fn the_ca_refuses_tokens_of_another_audience_or_account_and_pods_on_other_nodes() -> Result<()> {
    let cp = ControlPlane::start()?;
    let release = install_release(&cp)?;
    let ns = cp.namespace("ca-refusals")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, &format!("{MESH}=enabled")])?;
    let mut tb = Testbed::new(2)?;
    let b = tb.add_pod(1, "b")?;
    // Short lifetimes, so that renewals (and re-attestation) happen within
    // the test: certificates start 60 s in the past (clock skew), so a TTL
    // of 120 s means renewal 30 s after issue.
    let ca = tb.start_kubernetes_ca_with(
        &cp,
        &release.ca_kubeconfig,
        &["--svid-ttl-secs", "120", "--attested-node-ttl-secs", "120"],
    )?;
    tb.run_kube_pod(&cp, &ns, &b, &kube_pod(&b, &tb, "b"))?;
    let ca_addr = format!("{}:{CA_PORT}", tb.node(0).link_ipv4);
    let kubeconfig = &release.agent_kubeconfig;
    let id_b = spiffe_id(&ns, "b");

    // Starts an agent on node 1 with `token`, waits until the CA logged a
    // matching `msg`, checks b got no SVID, and stops the agent.
    let refused = |token: &std::path::Path, msg: &str, matches: &dyn Fn(&Value) -> bool| {
        let agent = tb.start_attesting_agent(1, &cp, kubeconfig, &ca_addr, token)?;
        let record = wait_for_record(&ca, msg, secs(30), matches)?;
        wait_for_record(&agent, "cannot obtain svid", secs(10), |r| {
            field_is(r, "spiffe_id", &id_b) && field_has(r, "error", "the CA refused")
        })?;
        ensure!(
            agent.records("svid issued").is_empty(),
            "{} obtained an SVID",
            agent.name
        );
        agent.stop_with(libc::SIGTERM)?;
        Ok::<Value, anyhow::Error>(record)
    };

    let agent_pod1 = tb.create_agent_pod(&cp, 1, AGENT_SERVICE_ACCOUNT, "main")?;

    // A token for another audience: TokenReview does not authenticate it.
    let token = tb.write_pod_token(&cp, &agent_pod1, AGENT_SERVICE_ACCOUNT, "not-ambit-ca")?;
    refused(&token, "refused node attestation", &|r| {
        field_has(
            r,
            "reason",
            "did not authenticate the token for audience \"ambit-ca\"",
        )
    })?;

    // A valid token of another ServiceAccount (a pod on node 1 running as
    // it): not an agent.
    cp.create_service_account(RELEASE_NAMESPACE, "impostor")?;
    let impostor = tb.create_agent_pod(&cp, 1, "impostor", "impostor")?;
    let token = tb.write_pod_token(&cp, &impostor, "impostor", CA_AUDIENCE)?;
    refused(&token, "refused node attestation", &|r| {
        field_has(r, "reason", "system:serviceaccount:ambit-system:impostor")
    })?;

    // The token of an agent pod deleted since: refused.
    let gone = tb.create_agent_pod(&cp, 1, AGENT_SERVICE_ACCOUNT, "gone")?;
    let token = tb.write_pod_token(&cp, &gone, AGENT_SERVICE_ACCOUNT, CA_AUDIENCE)?;
    cp.delete_pod(RELEASE_NAMESPACE, &gone.name)?;
    // The API server invalidates a token whose bound pod is gone; were it
    // to pass, the CA's own lookup finds no pod with the bound uid.
    refused(&token, "refused node attestation", &|r| {
        field_has(r, "reason", "Token has been invalidated")
            || field_has(r, "reason", "no longer exists")
    })?;

    // The token of node 0's agent pod used on node 1: the CA attests node
    // 0 (where that pod is scheduled) and refuses b, which runs on node 1.
    let agent_pod0 = tb.create_agent_pod(&cp, 0, AGENT_SERVICE_ACCOUNT, "main")?;
    let token = tb.write_pod_token(&cp, &agent_pod0, AGENT_SERVICE_ACCOUNT, CA_AUDIENCE)?;
    let record = refused(&token, "refused SVID request", &|r| {
        field_is(r, "spiffe_id", &id_b)
    })?;
    ensure!(
        field_is(&record, "node", "node0")
            && field_has(
                &record,
                "reason",
                "no workload with that service account runs on node node0"
            ),
        "unexpected refusal: {record}"
    );
    ensure!(
        ca.records("node attested")
            .iter()
            .all(|r| field_is(r, "node", "node0")),
        "the CA attested another node than node0"
    );

    // The right token: b gets its SVID.
    let token = tb.write_pod_token(&cp, &agent_pod1, AGENT_SERVICE_ACCOUNT, CA_AUDIENCE)?;
    let agent = tb.start_attesting_agent(1, &cp, kubeconfig, &ca_addr, &token)?;
    wait_for_svid(&agent, &id_b)?;

    // The kubelet rotates the token file (here: a token of a newer agent
    // pod on the same node). The agent re-reads it when it attests again,
    // at the node credential's half life, before renewing b's SVID.
    let newer = tb.create_agent_pod(&cp, 1, AGENT_SERVICE_ACCOUNT, "newer")?;
    let rotated = tb.write_pod_token(&cp, &newer, AGENT_SERVICE_ACCOUNT, CA_AUDIENCE)?;
    std::fs::rename(&rotated, &token)?;
    wait_for_record(&ca, "node attested", secs(60), |r| {
        field_has(r, "pod", &newer.name) && field_is(r, "node", "node1")
    })?;
    wait_for_record(&agent, "svid rotated", secs(30), |r| {
        field_is(r, "spiffe_id", &id_b)
    })?;
    Ok(())
}

#[test]
fn two_cas_starting_at_once_keep_one_root() -> Result<()> {
    let cp = ControlPlane::start()?;
    let release = install_release(&cp)?;
    let tb = Testbed::new(2)?;
    // Bridged first, so that both CAs start as close together as possible.
    tb.bridge_api_server(0, &cp)?;
    tb.bridge_api_server(1, &cp)?;
    let cas = [
        tb.spawn_kubernetes_ca(0, &cp, &release.ca_kubeconfig, &[])?,
        tb.spawn_kubernetes_ca(1, &cp, &release.ca_kubeconfig, &[])?,
    ];
    for ca in &cas {
        ca.wait_for("CA ready")?;
    }
    let created: Vec<bool> = cas
        .iter()
        .map(|ca| ca.records("CA root kept in a Secret")[0]["created"] == true)
        .collect();
    ensure!(
        created.iter().filter(|c| **c).count() == 1,
        "not exactly one CA made the root: {created:?}"
    );
    let raced = cas.iter().any(|ca| {
        !ca.records("another CA stored a root first; reading it")
            .is_empty()
    });
    eprintln!("the losing CA's create conflicted (the race happened): {raced}");
    let root = secret_value(&cp, "root.pem")?.context("no root.pem")?;
    ensure!(
        certificates(&published_bundle(&cp)?) == certificates(&root),
        "the published bundle is not the one kept root"
    );
    Ok(())
}
