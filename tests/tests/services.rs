//! Kubernetes Services end to end: a real API server (the testbed writes
//! the Endpoints, as there is no endpoints controller), agents in
//! `--kubernetes` mode on two simulated nodes. A connection to a ClusterIP
//! is captured before anything could translate it (nothing routes the
//! service range here), so only the agent's resolution makes it arrive.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use ambit_testbed::{
    ControlPlane, Pod, Testbed, WorkloadEntry,
    agent::Agent,
    control_plane::{ServicePort, endpoints_object},
    kube_pods::{agent_kubeconfig, kube_pod},
    wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The pods' HTTP port, which the `http` service port names as its target.
const HTTP: u16 = 9000;
const MESH: &str = "ambit.dev/mesh";

/// GETs `http://ip:port/index.txt?query` from `from`; the body (each
/// server answers its own name) or `None` when the request failed.
fn get(tb: &Testbed, from: &Pod, ip: IpAddr, port: u16, query: &str) -> Result<Option<String>> {
    let (code, body) = tb.curl(from, &format!("http://{ip}:{port}/index.txt?{query}"))?;
    Ok((code == 0).then(|| body.trim().to_owned()))
}

/// `count` GETs of `ip:80` that must all be answered; the answers.
fn get_all(tb: &Testbed, from: &Pod, ip: IpAddr, count: usize, tag: &str) -> Result<Vec<String>> {
    (0..count)
        .map(|n| {
            get(tb, from, ip, 80, &format!("{tag}={n}"))?
                .with_context(|| format!("request {tag}={n} to {ip}:80 failed"))
        })
        .collect()
}

fn servers(answers: &[String]) -> BTreeSet<&str> {
    answers.iter().map(String::as_str).collect()
}

/// The audit records of `agent` about connections to the service at
/// `cluster_ip` (outbound, with a `service` member).
fn service_records(agent: &Agent, cluster_ip: IpAddr, event: &str) -> Vec<Value> {
    agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event && r["service"]["address"] == cluster_ip.to_string())
        .collect()
}

#[test]
fn a_cluster_ip_is_sent_through_the_tunnel_to_its_ready_endpoints_in_turn() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let kubeconfig = agent_kubeconfig(cp)?;
    let ns = cp.namespace("services")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, &format!("{MESH}=enabled")])?;

    let mut tb = Testbed::new(2)?;
    let client = tb.add_pod(0, "client")?;
    let ready = [tb.add_pod(1, "s1")?, tb.add_pod(1, "s2")?];
    let not_ready = tb.add_pod(1, "s3")?;
    let plain = tb.add_pod(1, "plain")?;
    for server in ready.iter().chain([&not_ready, &plain]) {
        tb.http_server(server, &format!("http-{}", server.name), HTTP, &server.name)?;
    }
    let entries: Vec<WorkloadEntry> = [&client, &ready[0], &ready[1], &not_ready]
        .into_iter()
        .map(|pod| WorkloadEntry::enrolled(pod).in_namespace(&ns))
        .collect();
    let _ca = tb.start_ca(&entries, 3600)?;
    for pod in [&client, &ready[0], &ready[1], &not_ready] {
        let kube = kube_pod(pod, &tb, &pod.name).label("app", "web");
        tb.run_kube_pod(cp, &ns, pod, &kube)?;
    }
    let opted_out = kube_pod(&plain, &tb, "plain").label(MESH, "disabled");
    tb.run_kube_pod(cp, &ns, &plain, &opted_out)?;

    // Port 80 targets the pods' port by name: the Endpoints carry its
    // number under the service port's name, listed in another order than
    // the service's ports (nothing listens on 9001).
    let web = cp.create_service(
        &ns,
        "web",
        &[("app", "web")],
        &[
            ServicePort::new("metrics", 81, 9001),
            ServicePort::new("http", 80, "http"),
        ],
    )?;
    let ip = |pod: &Pod| IpAddr::from(pod.ipv4);
    cp.create_endpoints(
        &ns,
        "web",
        &[ip(&ready[0]), ip(&ready[1])],
        &[ip(&not_ready)],
        &[("http", HTTP), ("metrics", 9001)],
    )?;
    let http_port = [ServicePort::new("http", 80, HTTP)];
    let outside = cp.create_service(&ns, "outside", &[("app", "plain")], &http_port)?;
    cp.create_endpoints(&ns, "outside", &[ip(&plain)], &[], &[("http", HTTP)])?;
    let empty = cp.create_service(&ns, "empty", &[("app", "none")], &http_port)?;
    cp.create_endpoints(&ns, "empty", &[], &[ip(&not_ready)], &[("http", HTTP)])?;

    let agent0 = tb.start_kubernetes_agent(0, cp, &kubeconfig)?;
    let agent1 = tb.start_kubernetes_agent(1, cp, &kubeconfig)?;

    // Through the tunnel: the request, and the answer, cross encrypted.
    let capture = tb.capture_link("link-web")?;
    let marker = "marker-web-7d1c";
    let mut first = None;
    wait_until(Duration::from_secs(30), || {
        first = get(&tb, &client, web, 80, marker)?;
        Ok(first.is_some())
    })
    .with_context(|| format!("{web}:80 never answered:\n{}", agent0.raw_log()))?;
    ensure!(
        !capture.saw_in_clear(&tb, marker)?,
        "the request to the ClusterIP crossed in clear"
    );

    // Both ready endpoints answer in turn; the not-ready one never does.
    let mut answers = vec![first.unwrap_or_default()];
    answers.extend(get_all(&tb, &client, web, 9, "n")?);
    ensure!(
        servers(&answers) == BTreeSet::from(["s1", "s2"]),
        "answered by {answers:?}"
    );
    ensure!(
        !tb.stderr_of("http-s3").contains("GET"),
        "the not-ready endpoint got a request"
    );

    // The endpoints controller's next word applies to new connections:
    // s2 is no longer ready, s3 now is.
    let changed = Instant::now();
    cp.replace(&endpoints_object(
        &ns,
        "web",
        &[ip(&ready[0]), ip(&not_ready)],
        &[ip(&ready[1])],
        &[("http", HTTP), ("metrics", 9001)],
    ))?;
    wait_until(Duration::from_secs(30), || {
        Ok(get(&tb, &client, web, 80, "switch")?.as_deref() == Some("s3"))
    })
    .context("the endpoint that became ready never answered")?;
    eprintln!(
        "Endpoints replaced to the new endpoint answering: {:?}",
        changed.elapsed()
    );
    let served_by_s2 = tb.stderr_of("http-s2").matches("GET").count();
    let answers = get_all(&tb, &client, web, 6, "after")?;
    ensure!(
        servers(&answers) == BTreeSet::from(["s1", "s3"]),
        "answered by {answers:?} after the change"
    );
    ensure!(
        tb.stderr_of("http-s2").matches("GET").count() == served_by_s2,
        "the endpoint no longer ready got a request"
    );

    // The client's agent records the service dialled next to the endpoint
    // chosen; the server's agent saw the client's identity in the tunnel.
    let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let decisions = service_records(&agent0, web, "decision");
    ensure!(decisions.len() >= 10, "{decisions:?}");
    for record in &decisions {
        let destination = &record["destination"];
        let sa = destination["workload"]
            .as_str()
            .and_then(|w| w.strip_prefix(&format!("{ns}/")))
            .unwrap_or_default();
        ensure!(
            record["direction"] == "outbound"
                && record["decision"] == "allow"
                && record["service"]["name"] == format!("{ns}/web")
                && record["service"]["port"] == 80
                && record["source"]["spiffe_id"] == spiffe("client")
                && ["s1", "s2", "s3"].contains(&sa)
                && destination["spiffe_id"] == spiffe(sa)
                && destination["port"] == HTTP,
            "{record}"
        );
    }
    wait_until(Duration::from_secs(10), || {
        Ok(service_records(&agent0, web, "close")
            .iter()
            .filter(|r| r["reason"] == "closed" && r["bytes_received"].as_u64() > Some(0))
            .count()
            >= 10)
    })
    .context("no close record for every connection to the service")?;
    let inbound = agent1
        .audit_records()
        .into_iter()
        .filter(|r| r["direction"] == "inbound" && r["source"]["spiffe_id"] == spiffe("client"))
        .count();
    ensure!(inbound >= 10, "{inbound} inbound records from the client");

    // An endpoint outside the mesh is dialled in plaintext from the pod.
    let capture = tb.capture_link("link-outside")?;
    let marker = "marker-outside-3b9e";
    ensure!(
        get(&tb, &client, outside, 80, marker)?.as_deref() == Some("plain"),
        "the endpoint outside the mesh did not answer"
    );
    ensure!(
        capture.saw_in_clear(&tb, marker)?,
        "plaintext expected to a pod outside the mesh"
    );
    let sent = service_records(&agent0, outside, "decision");
    ensure!(
        sent.len() == 1 && sent[0]["destination"]["spiffe_id"].is_null(),
        "{sent:?}"
    );

    // No ready endpoint: refused, and the refusal audited.
    ensure!(
        get(&tb, &client, empty, 80, "empty")?.is_none(),
        "a service without ready endpoints answered"
    );
    let denied = service_records(&agent0, empty, "decision");
    ensure!(
        denied.len() == 1
            && denied[0]["decision"] == "deny"
            && denied[0]["service"]["name"] == format!("{ns}/empty")
            && denied[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no ready endpoint")),
        "{denied:?}"
    );
    let outcome = |o: &str| {
        agent0.metric(
            &tb,
            &format!(r#"ambit_service_connections_total{{outcome="{o}"}}"#),
        )
    };
    ensure!(outcome("endpoint")? >= 11.0 && outcome("no_ready_endpoint")? == 1.0);
    Ok(())
}
