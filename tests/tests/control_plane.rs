//! The test control plane is a real Kubernetes API server: the testbed acts
//! as kubelet for its netns pods, watches filter by node and label, CRDs
//! validate and prune, RBAC decides, bound service-account tokens review as
//! their pod, and a restarted API server keeps its data.

use std::{net::IpAddr, path::Path, time::Duration};

use ambit_testbed::{
    ControlPlane, KubePod, Testbed,
    control_plane::{ServicePort, Watch},
    wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

/// Bounds one watch event; generous because the machine is shared.
const EVENT_WAIT: Duration = Duration::from_secs(30);
const AUDIENCE: &str = "ambit-ca";

fn next_event_for(watch: &Watch) -> Result<(String, String, Value)> {
    let event = watch.next(EVENT_WAIT)?;
    Ok((event.kind.clone(), event.name().to_string(), event.object))
}

#[test]
fn pods_of_netns_pods_are_watched_by_node_and_label() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("pods-watch")?;
    let mut tb = Testbed::new(2)?;
    let web = tb.add_pod(0, "web")?;
    let web_elsewhere = tb.add_pod(1, "web-b")?;
    let other = tb.add_pod(0, "other")?;
    let node0 = tb.node(0).clone();
    let node1 = tb.node(1).clone();

    let watch = cp.kubectl.watch(
        &ns,
        "pods",
        "app=web",
        &format!("spec.nodeName={}", node0.netns),
    )?;
    // The decoys go first: if either passed the selectors, its event would
    // arrive before the target's.
    cp.run_pod(
        &ns,
        &KubePod::for_pod(&web_elsewhere, &node1, "default").label("app", "web"),
    )?;
    cp.run_pod(
        &ns,
        &KubePod::for_pod(&other, &node0, "default").label("app", "db"),
    )?;
    let target = KubePod::for_pod(&web, &node0, "web").label("app", "web");
    cp.create_pod(&ns, &target)?;

    let (kind, name, object) = next_event_for(&watch)?;
    ensure!(
        (kind.as_str(), name.as_str()) == ("ADDED", "web"),
        "first event {kind} {name}"
    );
    ensure!(
        object["status"]["phase"] == "Pending",
        "{}",
        object["status"]
    );

    // As kubelet: the pod runs with the addresses of its netns.
    cp.report_running(&ns, &target)?;
    let (kind, name, object) = next_event_for(&watch)?;
    ensure!(
        (kind.as_str(), name.as_str()) == ("MODIFIED", "web"),
        "{kind} {name}"
    );
    let status = &object["status"];
    ensure!(status["phase"] == "Running", "{status}");
    ensure!(
        status["podIPs"] == json!([{"ip": web.ipv4.to_string()}, {"ip": web.ipv6.to_string()}]),
        "podIPs {}",
        status["podIPs"]
    );
    ensure!(status["podIP"] == web.ipv4.to_string(), "{status}");
    ensure!(
        status["conditions"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")),
        "not Ready: {status}"
    );

    // A forced delete of a Running pod first marks it (deletionTimestamp,
    // MODIFIED), then removes it (DELETED).
    cp.delete_pod(&ns, "web")?;
    let (kind, name, object) = next_event_for(&watch)?;
    ensure!(
        (kind.as_str(), name.as_str()) == ("MODIFIED", "web")
            && object["metadata"]["deletionTimestamp"].is_string(),
        "{kind} {name} {}",
        object["metadata"]
    );
    let (kind, name, _) = next_event_for(&watch)?;
    ensure!(
        (kind.as_str(), name.as_str()) == ("DELETED", "web"),
        "{kind} {name}"
    );

    // Services take ClusterIPs from the test range; Endpoints are served.
    let ip = cp.create_service(
        &ns,
        "web",
        &[("app", "web")],
        &[ServicePort::new("http", 80, 8080)],
    )?;
    let IpAddr::V4(v4) = ip else {
        anyhow::bail!("ClusterIP {ip} is not IPv4");
    };
    ensure!(
        v4.octets()[..2] == [198, 19],
        "ClusterIP {ip} outside 198.19.0.0/16"
    );
    cp.create_endpoints(&ns, "web", &[web.ipv4.into()], &[], &[("http", 8080)])?;
    let endpoints = cp.kubectl.json(&["get", "endpoints", "web", "-n", &ns])?;
    ensure!(
        endpoints["subsets"][0]["addresses"][0]["ip"] == web.ipv4.to_string(),
        "{endpoints}"
    );
    Ok(())
}

fn probe_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "probes.e2e.ambit.dev"},
        "spec": {
            "group": "e2e.ambit.dev",
            "scope": "Namespaced",
            "names": {"plural": "probes", "singular": "probe", "kind": "Probe"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "mode": {"type": "string", "enum": ["strict", "permissive"]},
                        },
                    }},
                }},
            }],
        },
    })
}

fn probe(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "e2e.ambit.dev/v1", "kind": "Probe",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

#[test]
fn custom_resources_follow_their_structural_schema() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("crd")?;
    cp.create(&probe_crd())?;
    cp.kubectl.run(&[
        "wait",
        "--for=condition=Established",
        "crd/probes.e2e.ambit.dev",
        "--timeout=60s",
    ])?;

    // Unknown fields are pruned, known ones stored.
    cp.create(&probe(
        &ns,
        "good",
        json!({"port": 8443, "mode": "strict", "colour": "red"}),
    ))?;
    let stored = cp.kubectl.json(&["get", "probe", "good", "-n", &ns])?;
    ensure!(
        stored["spec"] == json!({"port": 8443, "mode": "strict"}),
        "stored spec {}",
        stored["spec"]
    );

    for (name, spec, field) in [
        ("bad-type", json!({"port": "https"}), "spec.port"),
        ("bad-range", json!({"port": 70000}), "spec.port"),
        ("bad-enum", json!({"port": 1, "mode": "lax"}), "spec.mode"),
        ("missing", json!({"mode": "strict"}), "spec.port"),
    ] {
        let refused = cp.create(&probe(&ns, name, spec));
        let message = format!(
            "{:#}",
            refused.err().context(format!("{name} was accepted"))?
        );
        ensure!(message.contains(field), "{name}: {message}");
    }
    Ok(())
}

/// A Role granting read access to pods, bound to `service_account`.
fn grant_pod_reading(cp: &ControlPlane, ns: &str, service_account: &str) -> Result<()> {
    cp.kubectl.run(&[
        "create",
        "role",
        "pod-reader",
        "-n",
        ns,
        "--verb=get,list,watch",
        "--resource=pods",
    ])?;
    cp.kubectl.run(&[
        "create",
        "rolebinding",
        "pod-reader",
        "-n",
        ns,
        "--role=pod-reader",
        &format!("--serviceaccount={ns}:{service_account}"),
    ])?;
    Ok(())
}

fn can_i(cp: &ControlPlane, ns: &str, verb: &str, resource: &str, who: &str) -> Result<String> {
    // `auth can-i` answers "no" with exit status 1: read the answer, not the status.
    let out = cp
        .kubectl
        .output(&["auth", "can-i", verb, resource, "-n", ns, "--as", who])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn rbac_decides_and_bound_service_account_tokens_review_as_their_pod() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.namespace("rbac")?;
    let other_ns = cp.namespace("rbac-other")?;
    cp.create_service_account(&ns, "reader")?;
    let reader = format!("system:serviceaccount:{ns}:reader");

    ensure!(can_i(cp, &ns, "list", "pods", &reader)? == "no");
    grant_pod_reading(cp, &ns, "reader")?;
    ensure!(can_i(cp, &ns, "list", "pods", &reader)? == "yes");
    ensure!(can_i(cp, &ns, "delete", "pods", &reader)? == "no");
    ensure!(can_i(cp, &other_ns, "list", "pods", &reader)? == "no");

    // The same decisions for a real token of that service account.
    let api_token = cp.request_token(
        &ns,
        "reader",
        ambit_testbed::control_plane::SERVICE_ACCOUNT_ISSUER,
        None,
    )?;
    let as_reader =
        ambit_testbed::control_plane::Kubectl::new(&cp.write_kubeconfig("reader", &api_token)?);
    as_reader.run(&["get", "pods", "-n", &ns])?;
    let denied = as_reader.run(&["get", "secrets", "-n", &ns]);
    let message = format!("{:#}", denied.err().context("reader listed secrets")?);
    ensure!(message.contains("Forbidden"), "{message}");

    // A token bound to a pod, as a kubelet would project it.
    cp.create_service_account(&ns, "app")?;
    let pod = KubePod {
        labels: vec![("app".into(), "app".into())],
        ips: vec!["198.18.0.200".parse()?],
        ..KubePod::new("app-0", "node-a", "app", "198.18.255.1".parse()?)
    };
    let uid = cp.run_pod(&ns, &pod)?;
    let token = cp.request_token(&ns, "app", AUDIENCE, Some(("app-0", &uid)))?;

    let review = cp.review_token(&token, AUDIENCE)?;
    ensure!(review["authenticated"] == true, "{review}");
    ensure!(
        review["user"]["username"] == format!("system:serviceaccount:{ns}:app"),
        "{review}"
    );
    let extra = &review["user"]["extra"];
    ensure!(
        extra["authentication.kubernetes.io/pod-name"] == json!(["app-0"]),
        "{review}"
    );
    ensure!(
        extra["authentication.kubernetes.io/pod-uid"] == json!([uid]),
        "{review}"
    );

    let wrong_audience = cp.review_token(&token, "someone-else")?;
    ensure!(
        wrong_audience["authenticated"] != true,
        "accepted for another audience: {wrong_audience}"
    );

    // The token dies with its pod.
    cp.delete_pod(&ns, "app-0")?;
    wait_until(Duration::from_secs(30), || {
        Ok(cp.review_token(&token, AUDIENCE)?["authenticated"] != true)
    })
    .context("the token of a deleted pod still authenticates")?;
    Ok(())
}

#[test]
fn api_server_restarts_with_its_data() -> Result<()> {
    // Its own control plane: the shared one must stay up for other tests.
    let cp = ControlPlane::start()?;
    let ns = cp.namespace("restart")?;
    cp.kubectl.run(&[
        "create",
        "configmap",
        "kept",
        "-n",
        &ns,
        "--from-literal=answer=42",
    ])?;

    cp.stop_api_server()?;
    let down = cp.kubectl.output(&["get", "namespace", &ns])?;
    ensure!(!down.status.success(), "answered while stopped");

    cp.start_api_server()?;
    let kept = cp.kubectl.json(&["get", "configmap", "kept", "-n", &ns])?;
    ensure!(kept["data"]["answer"] == "42", "{kept}");

    // Drop kills both processes and removes the data.
    let pids = cp.pids();
    ensure!(pids.len() == 2, "pids {pids:?}");
    let kubeconfig = cp.kubeconfig.clone();
    drop(cp);
    for pid in pids {
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} survived"
        );
    }
    ensure!(!kubeconfig.exists(), "{} survived", kubeconfig.display());
    Ok(())
}
