//! AuthorizationPolicy objects end to end: a real API server with the
//! chart's CRD, agents in `--kubernetes` mode on two simulated nodes (mesh
//! default deny), a client pod on node 0 and a server pod on node 1.
//! Creating, changing and deleting an object changes real decisions; an
//! invalid object is reported in its status and the last good version keeps
//! deciding, also through an API server outage; `ambit policy explain
//! --kubeconfig` answers from the cluster.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use ambit_testbed::{
    ControlPlane, Pod, Testbed, WorkloadEntry,
    agent::{Agent, agent_binary},
    kube_pods::{agent_kubeconfig, kube_pod},
    wait_until,
};
use anyhow::{Context, Result, ensure};
use serde_json::Value;

const HTTP: u16 = 8080;
const BODY: &str = "crd-policy-body-7d2a\n";
const MESH: &str = "ambit.dev/mesh";
/// Generous: the agents apply a change within about a second.
const DEADLINE: Duration = Duration::from_secs(30);

struct Scene {
    tb: Testbed,
    cp: ControlPlane,
    ns: String,
    /// Clients on node 0, under service accounts `a` and `c`.
    a: Pod,
    c: Pod,
    /// `app=server` on node 1, HTTP on 8080.
    server: Pod,
    /// The agent deciding for the server (node 1).
    agent1: Agent,
    _agent0: Agent,
    _ca: Agent,
}

impl Scene {
    fn get(&self, from: &Pod) -> Result<bool> {
        let url = format!("http://{}:{HTTP}/index.txt", self.server.ipv4);
        Ok(self.tb.curl(from, &url)? == (0, BODY.to_string()))
    }

    fn id(&self, service_account: &str) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{service_account}", self.ns)
    }

    /// `kubectl apply` of an AuthorizationPolicy named `name` with `spec`
    /// (YAML flow text); returns when the API server stored it.
    fn apply(&self, name: &str, spec: &str) -> Result<Instant> {
        let file = self
            .tb
            .dir
            .path()
            .join(format!("{name}-{}.yaml", fastrand_suffix()));
        std::fs::write(
            &file,
            format!(
                "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {name}, namespace: {}}}\nspec: {spec}\n",
                self.ns
            ),
        )?;
        self.cp
            .kubectl
            .run(&["apply", "-f", &file.display().to_string()])?;
        Ok(Instant::now())
    }

    /// Waits until `from` is allowed (`true`) or denied, as the server's
    /// agent decides and audits it; returns how long after `since` the
    /// expected decision was first seen.
    fn wait_decision(&self, from: &Pod, allowed: bool, since: Instant) -> Result<Duration> {
        self.wait_decision_within(from, allowed, since, DEADLINE)
    }

    fn wait_decision_within(
        &self,
        from: &Pod,
        allowed: bool,
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let source = self.id(&from.name);
        let decision = if allowed { "allow" } else { "deny" };
        let audited = || {
            self.agent1
                .audit_records()
                .iter()
                .filter(|r| {
                    r["source"]["spiffe_id"] == source.as_str() && r["decision"] == decision
                })
                .count()
        };
        let before = audited();
        // A denial counts once the server's agent audited a new one: refused
        // by the policy, not by a pod still starting.
        wait_until(timeout, || {
            Ok(self.get(from)? == allowed && audited() > before)
        })
        .with_context(|| format!("{source} never got {decision}:\n{}", self.agent1.raw_log()))?;
        Ok(since.elapsed())
    }

    /// The object's `Accepted` condition and `metadata.generation`.
    fn accepted(&self, name: &str) -> Result<(Option<Value>, i64)> {
        let object = self.cp.kubectl.json(&[
            "get",
            "authorizationpolicies.ambit.dev",
            name,
            "-n",
            &self.ns,
            "-o",
            "json",
        ])?;
        let condition = object["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
            .cloned();
        let generation = object["metadata"]["generation"]
            .as_i64()
            .context("no generation")?;
        Ok((condition, generation))
    }

    /// Waits until the object's `Accepted` condition has `status` for its
    /// current generation; returns the condition.
    fn wait_accepted(&self, name: &str, status: &str) -> Result<Value> {
        let mut last = None;
        wait_until(DEADLINE, || {
            let (condition, generation) = self.accepted(name)?;
            let done = condition.as_ref().is_some_and(|c| {
                c["status"] == status && c["observedGeneration"].as_i64() == Some(generation)
            });
            last = condition;
            Ok(done)
        })
        .with_context(|| format!("{name} never Accepted={status}; last condition {last:?}"))?;
        last.context("no condition")
    }

    /// `ambit policy explain --kubeconfig` (the admin's) for `from` to the
    /// server's HTTP port.
    fn explain(&self, from: &str) -> Result<String> {
        let out = Command::new(agent_binary()?)
            .args([
                "policy",
                "explain",
                "--kubeconfig",
                &self.cp.kubeconfig.display().to_string(),
                "--from",
                from,
                "--to",
                &format!("{}/{}:{HTTP}", self.ns, self.server.name),
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "explain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// File names differ per apply, so each apply reads its own version.
fn fastrand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn scene() -> Result<Scene> {
    let cp = ControlPlane::start()?;
    let kubeconfig = agent_kubeconfig(&cp)?;
    let ns = cp.namespace("crd-policy")?;
    cp.kubectl
        .run(&["label", "namespace", &ns, &format!("{MESH}=enabled")])?;
    let mut tb = Testbed::new(2)?;
    let a = tb.add_pod(0, "a")?;
    let c = tb.add_pod(0, "c")?;
    let server = tb.add_pod(1, "server")?;
    tb.http_server(&server, "http", HTTP, BODY)?;
    let entries: Vec<WorkloadEntry> = [&a, &c, &server]
        .into_iter()
        .map(|pod| WorkloadEntry::enrolled(pod).in_namespace(&ns))
        .collect();
    let ca = tb.start_ca(&entries, 3600)?;
    for pod in [&a, &c] {
        tb.run_kube_pod(&cp, &ns, pod, &kube_pod(pod, &tb, &pod.name))?;
    }
    let server_object = kube_pod(&server, &tb, "server").label("app", "server");
    tb.run_kube_pod(&cp, &ns, &server, &server_object)?;
    let deny_by_default = ["--default-policy", "deny"];
    let agent0 = tb.start_kubernetes_agent_with(0, &cp, &kubeconfig, &deny_by_default)?;
    let agent1 = tb.start_kubernetes_agent_with(1, &cp, &kubeconfig, &deny_by_default)?;
    for agent in [&agent0, &agent1] {
        // Ready includes the first list of AuthorizationPolicies.
        wait_until(DEADLINE, || Ok(agent.admin_get(&tb, "/readyz")?.0 == "200"))
            .with_context(|| format!("{} never ready:\n{}", agent.name, agent.raw_log()))?;
    }
    Ok(Scene {
        tb,
        cp,
        ns,
        a,
        c,
        server,
        agent1,
        _agent0: agent0,
        _ca: ca,
    })
}

#[test]
fn authorization_policy_objects_decide_connections_and_an_invalid_one_keeps_the_last_good_version()
-> Result<()> {
    let s = scene()?;
    let allow = |who: &str| {
        format!(
            "{{selector: {{matchLabels: {{app: server}}}}, rules: \
             [{{from: [{{principals: [\"{}\"]}}], to: [{{ports: [{HTTP}]}}]}}]}}",
            s.id(who)
        )
    };

    // No policy, mesh default deny.
    s.wait_decision(&s.a, false, Instant::now())?;

    // Created: `a` is allowed, by that policy.
    let created = s.apply("allow-client", &allow("a"))?;
    let took = s.wait_decision(&s.a, true, created)?;
    eprintln!("create to allowed: {took:?}");
    let by_policy = s.agent1.audit_records().into_iter().any(|r| {
        r["source"]["spiffe_id"] == s.id("a").as_str()
            && r["decision"] == "allow"
            && r["policy"] == format!("{}/allow-client", s.ns).as_str()
    });
    ensure!(by_policy, "no allow record naming the policy");
    s.wait_decision(&s.c, false, Instant::now())?;
    let condition = s.wait_accepted("allow-client", "True")?;
    ensure!(condition["reason"] == "Accepted", "{condition}");

    // Changed: `c` instead of `a`.
    let changed = s.apply("allow-client", &allow("c"))?;
    let took = s.wait_decision(&s.c, true, changed)?;
    eprintln!("change to allowed: {took:?}");
    s.wait_decision(&s.a, false, changed)?;
    s.wait_accepted("allow-client", "True")?;

    // Explained from the cluster, as the agents decide.
    let allowed = s.explain(&s.id("c"))?;
    ensure!(
        allowed.starts_with("ALLOW\n")
            && allowed.contains(&format!("policy:     {}/allow-client (ALLOW)", s.ns))
            && allowed.contains(&format!("rule 0:     from (principals [{}])", s.id("c"))),
        "{allowed}"
    );
    let denied = s.explain(&s.id("a"))?;
    ensure!(
        denied.starts_with("DENY\n") && denied.contains("none matched"),
        "{denied}"
    );

    // Invalid (port 0 passes the schema; only the agents can refuse it): it
    // would allow `a`, but is reported and the last good version serves.
    let invalid = format!(
        "{{selector: {{matchLabels: {{app: server}}}}, rules: \
         [{{from: [{{principals: [\"{}\"]}}], to: [{{ports: [0]}}]}}]}}",
        s.id("a")
    );
    s.apply("allow-client", &invalid)?;
    let condition = s.wait_accepted("allow-client", "False")?;
    let message = condition["message"].as_str().unwrap_or_default();
    ensure!(
        condition["reason"] == "Invalid"
            && message.contains("spec.rules[0].to[0].ports[0]")
            && message.contains("out of range (1-65535)")
            && message.contains("last valid version"),
        "{condition}"
    );
    let table =
        s.cp.kubectl
            .run(&["get", "authorizationpolicies", "-n", &s.ns, "-o", "wide"])?;
    ensure!(
        table.contains("ACCEPTED") && table.contains("False") && table.contains("Invalid"),
        "{table}"
    );
    // And a Warning Event for `kubectl describe`.
    wait_until(DEADLINE, || {
        let events = s.cp.kubectl.json(&[
            "get",
            "events",
            "-n",
            &s.ns,
            "--field-selector",
            "involvedObject.name=allow-client",
            "-o",
            "json",
        ])?;
        Ok(events["items"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "Invalid"
                && e["involvedObject"]["kind"] == "AuthorizationPolicy"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("spec.rules[0].to[0].ports[0]"))
        }))
    })
    .context("no Warning Event for the invalid version")?;
    let version = |s: &Scene| -> Result<Value> {
        let object = s.cp.kubectl.json(&[
            "get",
            "authorizationpolicy",
            "allow-client",
            "-n",
            &s.ns,
            "-o",
            "json",
        ])?;
        Ok(object["metadata"]["resourceVersion"].clone())
    };
    let settled = version(&s)?;
    for _ in 0..5 {
        ensure!(s.get(&s.c)?, "the last good version stopped allowing c");
        ensure!(!s.get(&s.a)?, "the invalid version allowed a");
    }
    // Both agents agree on the condition: neither rewrites it.
    ensure!(version(&s)? == settled, "the status keeps being rewritten");
    let explained = s.explain(&s.id("c"))?;
    ensure!(
        explained.contains(&format!("invalid:    {}/allow-client", s.ns)),
        "{explained}"
    );

    // A typo is kept by the API server (not pruned into a policy allowing
    // `a` on every port) and refused by the agents.
    let typo = format!(
        "{{selector: {{matchLabels: {{app: server}}}}, rules: \
         [{{from: [{{principals: [\"{}\"]}}], too: [{{ports: [{HTTP}]}}]}}]}}",
        s.id("a")
    );
    s.apply("allow-client", &typo)?;
    wait_until(DEADLINE, || {
        let (condition, generation) = s.accepted("allow-client")?;
        Ok(condition.is_some_and(|c| {
            c["observedGeneration"].as_i64() == Some(generation)
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("unknown field `too`"))
        }))
    })
    .context("the typo was not reported")?;
    ensure!(!s.get(&s.a)?, "the typo allowed a");
    ensure!(s.get(&s.c)?, "the last good version stopped allowing c");

    // The API server stopped for 30 s: the policies keep applying.
    s.cp.stop_api_server()?;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        ensure!(s.get(&s.c)?, "c lost its access during the outage");
        ensure!(!s.get(&s.a)?, "a got access during the outage");
        std::thread::sleep(Duration::from_secs(3));
    }
    s.cp.start_api_server()?;

    // A long-lived connection the last good version allows...
    let allowed = || s.agent1.allowed_decisions("inbound");
    let accepted = allowed();
    let _long = s.tb.spawn(
        &s.c,
        "long-connection",
        &[
            "sh",
            "-c",
            &format!("sleep 60 | socat - TCP:{}:{HTTP}", s.server.ipv4),
        ],
    )?;
    wait_until(DEADLINE, || Ok(allowed() > accepted))?;

    // Deleted: back to the mesh default.
    s.cp.kubectl
        .run(&["delete", "authorizationpolicy", "allow-client", "-n", &s.ns])?;
    let deleted = Instant::now();
    // The watches resume within about 20 s of the restart (backoff).
    let took = s.wait_decision_within(&s.c, false, deleted, Duration::from_secs(90))?;
    eprintln!("delete (just after the API server restarted) to denied: {took:?}");
    // ...is closed by the deletion, as by a policy file change.
    wait_until(DEADLINE, || {
        Ok(s.agent1
            .records("inbound connection closed")
            .iter()
            .any(|r| {
                r["reason"]
                    .as_str()
                    .is_some_and(|x| x.contains("policy no longer allows"))
            }))
    })
    .with_context(|| {
        format!(
            "the running connection stayed open:\n{}",
            s.agent1.raw_log()
        )
    })?;
    Ok(())
}
