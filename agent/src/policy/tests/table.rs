//! Every rule form and the precedence rules, one case per line.

use super::{decide, doc, labels, set_from_yaml, settings};
use crate::policy::{DefaultAction, PolicySet, Settings};

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const BATCH: &str = "spiffe://cluster.local/ns/batch/sa/job";
const OPS_A: &str = "spiffe://cluster.local/ns/ops/sa/a";
const NON_K8S: &str = "spiffe://cluster.local/job/nightly";

/// What the decision must be: allowed, and the deciding policy and rule.
type Want = (bool, Option<&'static str>, Option<usize>);
const NO_ALLOW_MATCHED: Want = (false, None, None);
const DEFAULT_DENY: Want = (false, None, None);
const DEFAULT_ALLOW: Want = (true, None, None);

struct Case {
    name: &'static str,
    policies: String,
    default: DefaultAction,
    from: &'static str,
    /// `namespace/name` and the workload's labels.
    to: (&'static str, &'static [(&'static str, &'static str)]),
    port: u16,
    want: Want,
}

fn allow_server(rules: &str) -> String {
    doc(
        "default",
        "allow",
        &format!("  selector: {{ matchLabels: {{ app: server }} }}\n  action: ALLOW\n{rules}"),
    )
}

fn case(name: &'static str, policies: String, from: &'static str, port: u16, want: Want) -> Case {
    Case {
        name,
        policies,
        default: DefaultAction::Deny,
        from,
        to: ("default/server", &[("app", "server"), ("version", "v1")]),
        port,
        want,
    }
}

fn cases() -> Vec<Case> {
    let exact = allow_server(&format!(
        "  rules:\n    - from: [{{ principals: [\"{FRONTEND}\"] }}]"
    ));
    let prefix = allow_server(
        "  rules:\n    - from: [{ principals: [\"spiffe://cluster.local/ns/ops/*\"] }]",
    );
    let partial = allow_server(
        "  rules:\n    - from: [{ principals: [\"spiffe://cluster.local/ns/default/sa/front*\"] }]",
    );
    let any = allow_server("  rules:\n    - from: [{ principals: [\"*\"] }]");
    let namespaces = allow_server("  rules:\n    - from: [{ namespaces: [ops, default] }]");
    let both = allow_server(&format!(
        "  rules:\n    - from: [{{ principals: [\"{OPS_A}\", \"{FRONTEND}\"], namespaces: [ops] }}]"
    ));
    let two_entries = allow_server(&format!(
        "  rules:\n    - from: [{{ principals: [\"{FRONTEND}\"] }}, {{ namespaces: [ops] }}]"
    ));
    let ports = allow_server(&format!(
        "  rules:\n    - from: [{{ principals: [\"{FRONTEND}\"] }}]\n      \
         to: [{{ ports: [8080, \"9000-9100\"] }}, {{ ports: [\"443\"] }}]"
    ));
    let from_only = allow_server("  rules:\n    - from: [{ namespaces: [default] }]");
    let to_only = allow_server("  rules:\n    - to: [{ ports: [8080] }]");
    let no_rules = allow_server("");
    let empty_rules = allow_server("  rules: []");
    let empty_rule = allow_server("  rules: [{}]");
    let second_rule = allow_server(&format!(
        "  rules:\n    - to: [{{ ports: [1] }}]\n    - from: [{{ principals: [\"{FRONTEND}\"] }}]"
    ));
    let other_app = doc(
        "default",
        "allow-client",
        "  selector: { matchLabels: { app: client } }\n  rules: [{}]",
    );
    let two_labels = doc(
        "default",
        "allow-v1",
        "  selector: { matchLabels: { app: server, version: v1 } }\n  rules: [{}]",
    );
    let two_labels_v2 = doc(
        "default",
        "allow-v2",
        "  selector: { matchLabels: { app: server, version: v2 } }\n  rules: [{}]",
    );
    let namespace_wide = doc("default", "allow-all", "  rules: [{}]");
    let other_namespace = doc("batch", "allow-all", "  rules: [{}]");
    let root_allow = doc(
        "ambit-system",
        "allow-ops",
        "  rules:\n    - from: [{ namespaces: [ops] }]",
    );
    let root_selected = doc(
        "ambit-system",
        "allow-servers",
        "  selector: { matchLabels: { app: server } }\n  rules: [{}]",
    );
    let root_other_app = doc(
        "ambit-system",
        "allow-clients",
        "  selector: { matchLabels: { app: client } }\n  rules: [{}]",
    );
    let deny_batch = doc(
        "default",
        "deny-batch",
        "  action: DENY\n  rules:\n    - to: [{ ports: [1] }]\n    - from: [{ namespaces: [batch] }]",
    );
    let root_deny_batch = doc(
        "ambit-system",
        "deny-batch",
        "  action: DENY\n  rules:\n    - from: [{ namespaces: [batch] }]",
    );
    let deny_everything = doc("default", "deny-all", "  action: DENY\n  rules: [{}]");
    let deny_port = doc(
        "default",
        "deny-admin",
        "  action: DENY\n  rules:\n    - to: [{ ports: [\"9900-9999\"] }]",
    );
    let allow_all_server = allow_server("  rules: [{}]");

    #[rustfmt::skip]
    let mut cases = vec![
        // principals: exact
        case("exact principal matches", exact.clone(), FRONTEND, 8080, (true, Some("default/allow"), Some(0))),
        case("exact principal, other peer", exact.clone(), OPS_A, 8080, NO_ALLOW_MATCHED),
        case("exact principal, plaintext", exact, "plaintext", 8080, NO_ALLOW_MATCHED),
        // principals: prefix wildcard
        case("prefix wildcard matches", prefix.clone(), OPS_A, 80, (true, Some("default/allow"), Some(0))),
        case("prefix wildcard stops at its '/'", prefix.clone(), "spiffe://cluster.local/ns/opsx/sa/a", 80, NO_ALLOW_MATCHED),
        case("prefix wildcard, other trust domain", prefix, "spiffe://other.td/ns/ops/sa/a", 80, NO_ALLOW_MATCHED),
        case("partial-segment wildcard", partial.clone(), FRONTEND, 80, (true, Some("default/allow"), Some(0))),
        case("partial-segment wildcard, other sa", partial, "spiffe://cluster.local/ns/default/sa/back", 80, NO_ALLOW_MATCHED),
        // principals: "*"
        case("'*' matches any peer", any.clone(), NON_K8S, 80, (true, Some("default/allow"), Some(0))),
        case("'*' needs an identity", any, "plaintext", 80, NO_ALLOW_MATCHED),
        // namespaces
        case("namespaces match", namespaces.clone(), OPS_A, 80, (true, Some("default/allow"), Some(0))),
        case("namespaces OR-ed", namespaces.clone(), FRONTEND, 80, (true, Some("default/allow"), Some(0))),
        case("namespaces, other namespace", namespaces.clone(), BATCH, 80, NO_ALLOW_MATCHED),
        case("namespaces, non-Kubernetes ID", namespaces.clone(), NON_K8S, 80, NO_ALLOW_MATCHED),
        case("namespaces, plaintext", namespaces, "plaintext", 80, NO_ALLOW_MATCHED),
        // fields of one entry AND-ed, entries OR-ed
        case("principal and namespace both match", both.clone(), OPS_A, 80, (true, Some("default/allow"), Some(0))),
        case("principal matches, namespace does not", both, FRONTEND, 80, NO_ALLOW_MATCHED),
        case("second from entry matches", two_entries.clone(), OPS_A, 80, (true, Some("default/allow"), Some(0))),
        case("no from entry matches", two_entries, BATCH, 80, NO_ALLOW_MATCHED),
        // ports
        case("single port", ports.clone(), FRONTEND, 8080, (true, Some("default/allow"), Some(0))),
        case("other port", ports.clone(), FRONTEND, 8081, NO_ALLOW_MATCHED),
        case("range start", ports.clone(), FRONTEND, 9000, (true, Some("default/allow"), Some(0))),
        case("range end", ports.clone(), FRONTEND, 9100, (true, Some("default/allow"), Some(0))),
        case("below range", ports.clone(), FRONTEND, 8999, NO_ALLOW_MATCHED),
        case("above range", ports.clone(), FRONTEND, 9101, NO_ALLOW_MATCHED),
        case("second to entry, port as string", ports.clone(), FRONTEND, 443, (true, Some("default/allow"), Some(0))),
        case("port matches, source does not", ports, OPS_A, 8080, NO_ALLOW_MATCHED),
        // from only / to only
        case("from-only rule, any port", from_only.clone(), FRONTEND, 1, (true, Some("default/allow"), Some(0))),
        case("from-only rule, plaintext", from_only, "plaintext", 1, NO_ALLOW_MATCHED),
        case("to-only rule, any source", to_only.clone(), BATCH, 8080, (true, Some("default/allow"), Some(0))),
        case("to-only rule, plaintext", to_only.clone(), "plaintext", 8080, (true, Some("default/allow"), Some(0))),
        case("to-only rule, other port", to_only, BATCH, 8081, NO_ALLOW_MATCHED),
        // empty rules
        case("ALLOW without rules allows nothing", no_rules, FRONTEND, 8080, NO_ALLOW_MATCHED),
        case("ALLOW with rules: [] allows nothing", empty_rules, FRONTEND, 8080, NO_ALLOW_MATCHED),
        case("empty rule matches everything", empty_rule.clone(), "plaintext", 1, (true, Some("default/allow"), Some(0))),
        case("rule index reported", second_rule, FRONTEND, 8080, (true, Some("default/allow"), Some(1))),
        // selectors
        case("selector of another app", other_app, FRONTEND, 80, DEFAULT_DENY),
        case("selector subset of labels", two_labels.clone(), FRONTEND, 80, (true, Some("default/allow-v1"), Some(0))),
        case("selector with a differing label", two_labels_v2, FRONTEND, 80, DEFAULT_DENY),
        case("empty selector: namespace-wide", namespace_wide.clone(), FRONTEND, 80, (true, Some("default/allow-all"), Some(0))),
        case("policy of another namespace", other_namespace, FRONTEND, 80, DEFAULT_DENY),
        // root namespace
        case("root namespace applies mesh-wide", root_allow.clone(), OPS_A, 80, (true, Some("ambit-system/allow-ops"), Some(0))),
        case("root ALLOW applies, does not match", root_allow.clone(), FRONTEND, 80, NO_ALLOW_MATCHED),
        case("root selector across namespaces", root_selected, FRONTEND, 80, (true, Some("ambit-system/allow-servers"), Some(0))),
        case("root selector of another app", root_other_app, FRONTEND, 80, DEFAULT_DENY),
        // precedence
        case("DENY wins over ALLOW", format!("{deny_batch}{empty_rule}"), BATCH, 80, (false, Some("default/deny-batch"), Some(1))),
        case("DENY rule index", format!("{deny_batch}{empty_rule}"), FRONTEND, 1, (false, Some("default/deny-batch"), Some(0))),
        case("DENY not matching, ALLOW decides", format!("{deny_batch}{empty_rule}"), FRONTEND, 80, (true, Some("default/allow"), Some(0))),
        case("root DENY wins over namespace ALLOW", format!("{root_deny_batch}{namespace_wide}"), BATCH, 80, (false, Some("ambit-system/deny-batch"), Some(0))),
        case("namespace DENY wins over root ALLOW", format!("{deny_everything}{root_allow}"), OPS_A, 80, (false, Some("default/deny-all"), Some(0))),
        case("DENY {} matches plaintext", format!("{deny_everything}{allow_all_server}"), "plaintext", 80, (false, Some("default/deny-all"), Some(0))),
        case("DENY from namespaces skips plaintext", format!("{deny_batch}{allow_all_server}"), "plaintext", 80, (true, Some("default/allow"), Some(0))),
        case("first of two matching ALLOWs, by name", format!("{namespace_wide}{two_labels}"), FRONTEND, 80, (true, Some("default/allow-all"), Some(0))),
        // defaults
        case("no policy: default deny", String::new(), FRONTEND, 80, DEFAULT_DENY),
        case("only a DENY applies, not matching: default", deny_port.clone(), FRONTEND, 80, DEFAULT_DENY),
        case("only a DENY applies, matching", deny_port.clone(), FRONTEND, 9950, (false, Some("default/deny-admin"), Some(0))),
    ];
    #[rustfmt::skip]
    let allow_default = [
        ("no policy: default allow", String::new(), FRONTEND, 80, DEFAULT_ALLOW),
        ("default allow, plaintext", String::new(), "plaintext", 80, DEFAULT_ALLOW),
        ("default allow, DENY not matching", deny_port.clone(), FRONTEND, 80, DEFAULT_ALLOW),
        ("default allow, DENY matching", deny_port, FRONTEND, 9999, (false, Some("default/deny-admin"), Some(0))),
        ("default allow, ALLOW applies, none matches", root_allow, FRONTEND, 80, NO_ALLOW_MATCHED),
    ];
    for (name, policies, from, port, want) in allow_default {
        cases.push(Case {
            default: DefaultAction::Allow,
            ..case(name, policies, from, port, want)
        });
    }
    cases
}

#[test]
fn decision_table() {
    let mut failures = Vec::new();
    for case in cases() {
        let set = set_from_yaml(&case.policies, settings(case.default));
        let (to, workload_labels) = case.to;
        let got = decide(&set, case.from, to, &labels(workload_labels), case.port);
        let (allowed, policy, rule) = case.want;
        if (got.allowed, got.policy.as_deref(), got.rule) != (allowed, policy, rule) {
            failures.push(format!("{}: want {:?}, got {got:?}", case.name, case.want));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reasons_name_the_deciding_policy_and_rule() {
    let server = labels(&[("app", "server")]);
    let yaml = format!(
        "{}{}",
        allow_server(&format!(
            "  rules:\n    - from: [{{ principals: [\"{FRONTEND}\"] }}]"
        )),
        doc(
            "default",
            "deny-batch",
            "  action: DENY\n  rules:\n    - to: [{ ports: [1] }]\n    - from: [{ namespaces: [batch] }]"
        )
    );
    let set = set_from_yaml(&yaml, Settings::default());
    let reason = |from, to, port| decide(&set, from, to, &server, port).reason;
    assert_eq!(
        reason(FRONTEND, "default/server", 80),
        "allowed by default/allow rule 0"
    );
    assert_eq!(
        reason(BATCH, "default/server", 80),
        "denied by default/deny-batch rule 1"
    );
    assert_eq!(
        reason(OPS_A, "default/server", 80),
        "no ALLOW policy of the workload matched"
    );
    assert_eq!(
        reason(OPS_A, "other/server", 80),
        "denied by default-deny mesh mode"
    );
    let open = set_from_yaml("", settings(DefaultAction::Allow));
    assert_eq!(
        decide(&open, OPS_A, "other/server", &server, 80).reason,
        "allowed by default-allow mesh mode"
    );
}

#[test]
fn custom_root_namespace() {
    let yaml = doc("mesh-root", "allow-all", "  rules: [{}]");
    let custom = Settings {
        root_namespace: "mesh-root".into(),
        ..Settings::default()
    };
    let set = set_from_yaml(&yaml, custom);
    assert!(decide(&set, FRONTEND, "default/x", &labels(&[]), 80).allowed);
    // Under the default root namespace the same policy only covers its own.
    let set = set_from_yaml(&yaml, Settings::default());
    assert!(!decide(&set, FRONTEND, "default/x", &labels(&[]), 80).allowed);
    assert!(decide(&set, FRONTEND, "mesh-root/x", &labels(&[]), 80).allowed);
}

#[test]
fn fail_closed_set_denies_even_with_default_allow() {
    let set = PolicySet::fail_closed(settings(DefaultAction::Allow));
    let d = decide(&set, FRONTEND, "default/x", &labels(&[]), 80);
    assert!(!d.allowed);
    assert!(d.reason.contains("fail closed"), "{}", d.reason);
}

#[test]
fn applicable_lists_policies_in_evaluation_order() {
    let yaml = format!(
        "{}{}{}",
        doc("default", "b-all", "  rules: [{}]"),
        doc("ambit-system", "z-mesh", "  rules: [{}]"),
        doc(
            "default",
            "a-server",
            "  selector: { matchLabels: { app: server } }\n  rules: [{}]"
        ),
    ) + &doc(
        "default",
        "c-client",
        "  selector: { matchLabels: { app: client } }\n  rules: [{}]",
    );
    let set = set_from_yaml(&yaml, Settings::default());
    let server = labels(&[("app", "server")]);
    let destination = crate::policy::Destination {
        namespace: "default",
        name: "server",
        labels: &server,
    };
    let ids: Vec<_> = set
        .applicable(&destination)
        .iter()
        .map(|p| p.id())
        .collect();
    assert_eq!(
        ids,
        ["ambit-system/z-mesh", "default/a-server", "default/b-all"]
    );
}
