//! The Helm chart (deploy/chart). Its RBAC against a real API server: the
//! chart's ServiceAccounts, Roles and bindings installed as shipped
//! (tests/src/chart.rs), then `kubectl auth can-i` with real tokens of the
//! agent's and the CA's service accounts; each may do what its component
//! needs (docs/operations.md, "API access") and nothing around it. And
//! what `helm template` renders: the agent's and the CA's agreed command
//! lines (the flags each component implements), and the agent pod's
//! privileges.

use ambit_testbed::{
    ControlPlane,
    chart::{AGENT_SERVICE_ACCOUNT, CA_SERVICE_ACCOUNT, RELEASE_NAMESPACE, render},
    control_plane::Kubectl,
};
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// `kubectl auth can-i` arguments: verb, resource[/name], scope.
const AGENT_MAY: &[&str] = &[
    "get pods --all-namespaces",
    "list pods --all-namespaces",
    "watch pods --all-namespaces",
    "list namespaces",
    "watch namespaces",
    "get namespaces",
    "list services --all-namespaces",
    "watch services --all-namespaces",
    "list endpoints --all-namespaces",
    "watch endpoints --all-namespaces",
    "list authorizationpolicies.ambit.dev --all-namespaces",
    "watch authorizationpolicies.ambit.dev --all-namespaces",
    "get authorizationpolicies.ambit.dev -n default",
    "patch authorizationpolicies.ambit.dev --subresource=status -n default",
    "update authorizationpolicies.ambit.dev --subresource=status -n default",
    "create events -n default",
    "patch events -n default",
    "create events.events.k8s.io -n default",
    "get configmaps/ambit-trust-bundle -n ambit-system",
    "list configmaps -n ambit-system",
    "watch configmaps -n ambit-system",
];

const AGENT_MAY_NOT: &[&str] = &[
    // No secrets anywhere: its SVIDs come from the CA, never the API.
    "get secrets --all-namespaces",
    "list secrets --all-namespaces",
    "watch secrets --all-namespaces",
    "get secrets/ambit-ca-root -n ambit-system",
    "list secrets -n ambit-system",
    "get secrets -n default",
    // Reads pods, never changes or enters them.
    "create pods -n default",
    "delete pods -n default",
    "update pods -n default",
    "patch pods -n default",
    "update pods --subresource=status -n default",
    "create pods --subresource=exec -n default",
    "create pods --subresource=eviction -n default",
    "update namespaces",
    "patch namespaces",
    "delete namespaces",
    "create namespaces",
    "update services -n default",
    "create endpoints -n default",
    // Serves policies; only their status is its to write.
    "create authorizationpolicies.ambit.dev -n default",
    "update authorizationpolicies.ambit.dev -n default",
    "patch authorizationpolicies.ambit.dev -n default",
    "delete authorizationpolicies.ambit.dev -n default",
    "delete events -n default",
    // The bundle is the CA's to write; other namespaces' ConfigMaps are none of its business.
    "update configmaps/ambit-trust-bundle -n ambit-system",
    "create configmaps -n ambit-system",
    "get configmaps -n default",
    "list configmaps --all-namespaces",
    // No identity tricks.
    "create serviceaccounts --subresource=token -n ambit-system",
    "create tokenreviews.authentication.k8s.io",
    "impersonate serviceaccounts -n ambit-system",
    "update clusterroles.rbac.authorization.k8s.io",
    "get nodes",
    "list customresourcedefinitions.apiextensions.k8s.io",
];

const CA_MAY: &[&str] = &[
    "create tokenreviews.authentication.k8s.io",
    "get pods --all-namespaces",
    "list pods --all-namespaces",
    "watch pods --all-namespaces",
    "get namespaces",
    "list namespaces",
    "watch namespaces",
    "get secrets/ambit-ca-root -n ambit-system",
    "update secrets/ambit-ca-root -n ambit-system",
    "create secrets -n ambit-system",
    "get configmaps/ambit-trust-bundle -n ambit-system",
    "update configmaps/ambit-trust-bundle -n ambit-system",
    "create configmaps -n ambit-system",
];

const CA_MAY_NOT: &[&str] = &[
    // Its own root and nothing else: no other Secret, no listing, nowhere else.
    "get secrets/other -n ambit-system",
    "update secrets/other -n ambit-system",
    "list secrets -n ambit-system",
    "watch secrets -n ambit-system",
    "delete secrets/ambit-ca-root -n ambit-system",
    "patch secrets/ambit-ca-root -n ambit-system",
    "get secrets -n default",
    "create secrets -n default",
    "get secrets --all-namespaces",
    "get configmaps/other -n ambit-system",
    "update configmaps/other -n ambit-system",
    "list configmaps -n ambit-system",
    "create configmaps -n default",
    // Reads pods and namespaces, changes none.
    "create pods -n default",
    "delete pods -n default",
    "update pods -n default",
    "update namespaces",
    "delete namespaces",
    // Verifies tokens, never mints them.
    "create serviceaccounts --subresource=token -n ambit-system",
    "create tokenrequests.authentication.k8s.io",
    "list services --all-namespaces",
    "list authorizationpolicies.ambit.dev --all-namespaces",
    "patch authorizationpolicies.ambit.dev --subresource=status -n default",
    "create events -n default",
    "impersonate users",
    "get nodes",
];

/// `kubectl auth can-i` as the kubeconfig's own token: true for "yes".
fn can_i(kubectl: &Kubectl, question: &str) -> Result<bool> {
    let mut args = vec!["auth", "can-i"];
    args.extend(question.split_whitespace());
    let out = kubectl.output(&args)?;
    let answer = String::from_utf8_lossy(&out.stdout);
    match answer.lines().next().map(str::trim) {
        Some("yes") => Ok(true),
        Some("no") => Ok(false),
        _ => bail!(
            "kubectl auth can-i {question}: no answer: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Asks every question; fails naming each wrong answer.
fn check_rights(who: &str, kubectl: &Kubectl, may: &[&str], may_not: &[&str]) -> Result<()> {
    let mut wrong = Vec::new();
    for (questions, expected) in [(may, true), (may_not, false)] {
        for question in questions {
            if can_i(kubectl, question)? != expected {
                let verdict = if expected { "may not" } else { "may" };
                wrong.push(format!("{who} {verdict}: {question}"));
            }
        }
    }
    ensure!(wrong.is_empty(), "wrong rights:\n{}", wrong.join("\n"));
    Ok(())
}

#[test]
fn the_agents_token_reads_what_the_agent_routes_by_and_writes_only_policy_status_and_events()
-> Result<()> {
    let cp = ControlPlane::shared()?;
    let as_agent = Kubectl::new(&cp.chart_kubeconfig(AGENT_SERVICE_ACCOUNT)?);
    check_rights(AGENT_SERVICE_ACCOUNT, &as_agent, AGENT_MAY, AGENT_MAY_NOT)?;
    // The answers hold for real requests too.
    as_agent.run(&["get", "pods", "--all-namespaces"])?;
    let denied = as_agent.output(&["get", "secrets", "--namespace", "ambit-system"])?;
    ensure!(
        !denied.status.success() && String::from_utf8_lossy(&denied.stderr).contains("Forbidden"),
        "the agent's token read secrets: {denied:?}"
    );
    Ok(())
}

#[test]
fn the_cas_token_reviews_tokens_and_keeps_only_its_root_secret_and_bundle() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let as_ca = Kubectl::new(&cp.chart_kubeconfig(CA_SERVICE_ACCOUNT)?);
    check_rights(CA_SERVICE_ACCOUNT, &as_ca, CA_MAY, CA_MAY_NOT)?;
    let denied = as_ca.output(&["get", "secret", "other", "--namespace", "ambit-system"])?;
    ensure!(
        !denied.status.success() && String::from_utf8_lossy(&denied.stderr).contains("Forbidden"),
        "the CA's token read another secret: {denied:?}"
    );
    Ok(())
}

/// The one object of `kind` named `name` in the default rendering.
fn rendered(kind: &str, name: &str) -> Result<Value> {
    render(RELEASE_NAMESPACE)?
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("the chart renders no {kind} {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `expected` appears in `args` (in this order, other flags between).
fn ensure_in_order(args: &[&str], expected: &[&str]) -> Result<()> {
    let mut rest = args.iter();
    for want in expected {
        ensure!(
            rest.any(|a| a == want),
            "{want} missing or out of order in {args:?}"
        );
    }
    Ok(())
}

#[test]
fn the_agent_and_ca_command_lines_are_the_agreed_ones() -> Result<()> {
    let agent = rendered("DaemonSet", "ambit-agent")?;
    let spec = &agent["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    ensure_in_order(
        &strings(&container["command"]),
        &[
            "/usr/local/bin/ambit",
            "run",
            "--kubernetes",
            "--node-name=$(NODE_NAME)",
            "--namespace=$(POD_NAMESPACE)",
            "--ca-addr=ambit-ca.$(POD_NAMESPACE).svc:15012",
            "--ca-token-file=/var/run/secrets/ambit/ca-token",
            "--cni-socket=/var/run/ambit/cni.sock",
            "--state-dir=/var/run/ambit",
            "--admin-addr=0.0.0.0:15020",
            "--audit-log=-",
        ],
    )?;
    // NODE_NAME and POD_NAMESPACE from the downward API.
    let env = container["env"].as_array().context("no env")?;
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        ensure!(
            env.iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "{name} is not {field} from the downward API: {env:?}"
        );
    }
    // The CA token file: a projected token for audience ambit-ca.
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| m["mountPath"] == "/var/run/secrets/ambit")
        })
        .context("nothing mounted at /var/run/secrets/ambit")?;
    let volume = spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .context("the CA token volume is missing")?;
    ensure!(
        volume["projected"]["sources"][0]["serviceAccountToken"]
            == json!({"path": "ca-token", "audience": "ambit-ca", "expirationSeconds": 3600}),
        "the CA token is not a projected ambit-ca token: {volume}"
    );
    // ambit-cni install, into the host's CNI dirs, pointing at the agent.
    let install = spec["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "install-cni"))
        .context("no install-cni init container")?;
    ensure_in_order(
        &strings(&install["command"]),
        &[
            "/usr/local/bin/ambit-cni",
            "install",
            "--agent-socket=/var/run/ambit/cni.sock",
        ],
    )?;

    let ca = rendered("Deployment", "ambit-ca")?;
    ensure!(ca["spec"]["replicas"] == 1, "the CA is not one replica");
    ensure_in_order(
        &strings(&ca["spec"]["template"]["spec"]["containers"][0]["command"]),
        &[
            "/usr/local/bin/ambit",
            "ca",
            "--kubernetes",
            "--namespace=$(POD_NAMESPACE)",
            "--listen=0.0.0.0:15012",
            "--root-secret=ambit-ca-root",
            "--bundle-configmap=ambit-trust-bundle",
            "--token-audience=ambit-ca",
            "--agent-service-account=ambit-agent",
        ],
    )?;
    let service = rendered("Service", "ambit-ca")?;
    ensure!(
        service["spec"]["ports"][0]["port"] == 15012,
        "the CA Service is not on 15012: {service}"
    );
    Ok(())
}

#[test]
fn the_agent_runs_on_every_node_with_named_capabilities_instead_of_privileged() -> Result<()> {
    let agent = rendered("DaemonSet", "ambit-agent")?;
    let spec = &agent["spec"]["template"]["spec"];
    let security = &spec["containers"][0]["securityContext"];
    ensure!(
        security["privileged"] != true,
        "the agent is privileged: {security}"
    );
    ensure!(
        strings(&security["capabilities"]["drop"]) == ["ALL"],
        "the agent keeps the runtime's default capabilities: {security}"
    );
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort_unstable();
    ensure!(
        added == ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
        "the agent's capabilities are {added:?}"
    );
    ensure!(spec["hostNetwork"] == true && spec["hostPID"] == true);
    ensure!(spec["priorityClassName"] == "system-node-critical");
    ensure!(
        spec["tolerations"] == json!([{"operator": "Exists"}]),
        "the agent does not tolerate every taint: {}",
        spec["tolerations"]
    );
    ensure!(agent["spec"]["updateStrategy"]["type"] == "RollingUpdate");
    // Privileged only where Kubernetes demands it for Bidirectional
    // propagation: the bpffs mount, which runs and exits.
    for init in spec["initContainers"]
        .as_array()
        .context("no init containers")?
    {
        let privileged = init["securityContext"]["privileged"] == true;
        ensure!(
            !privileged || init["name"] == "mount-bpffs",
            "init container {} is privileged",
            init["name"]
        );
    }
    let bpffs = spec["containers"][0]["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
        .context("bpffs is not mounted into the agent")?;
    ensure!(bpffs["mountPropagation"] == "HostToContainer", "{bpffs}");
    Ok(())
}
