//! The shipped `policies/` directory: valid, and meaning what it says.

use std::path::PathBuf;

use super::{decide, labels};
use crate::policy::{Settings, load_paths};

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn shipped_policies_pass_check() {
    let dirs = [policies_dir(), policies_dir().join("examples")];
    for dir in &dirs {
        if let Err(errors) = load_paths(std::slice::from_ref(dir), Settings::default()) {
            panic!("{}: {errors}", dir.display());
        }
    }
    let set = load_paths(&dirs, Settings::default()).expect("valid together");
    assert!(set.len() >= 4, "{} policies", set.len());
    assert!(set.files().len() >= 4);
}

#[test]
fn examples_decide_as_documented() {
    let set = load_paths(&[policies_dir().join("examples")], Settings::default())
        .expect("valid examples");
    let server = labels(&[("app", "server")]);
    let frontend = "spiffe://cluster.local/ns/default/sa/frontend";
    let cases = [
        // allow-frontend: one service account to one port.
        (frontend, "default/server", 8080, true),
        (frontend, "default/server", 9090, false),
        // deny-legacy: nothing from the legacy namespace, whatever allows it.
        (
            "spiffe://cluster.local/ns/legacy/sa/app",
            "default/server",
            8080,
            false,
        ),
        // shop namespace: open to its own namespace.
        (
            "spiffe://cluster.local/ns/shop/sa/cart",
            "shop/payments",
            443,
            true,
        ),
        (
            "spiffe://cluster.local/ns/default/sa/x",
            "shop/payments",
            443,
            false,
        ),
        // mesh-wide: the monitoring scraper may reach metrics everywhere.
        (
            "spiffe://cluster.local/ns/monitoring/sa/prometheus",
            "shop/payments",
            15020,
            true,
        ),
        (
            "spiffe://cluster.local/ns/monitoring/sa/prometheus",
            "other/app",
            15020,
            true,
        ),
        ("plaintext", "other/app", 15020, false),
        // nothing else: default deny.
        (frontend, "other/app", 80, false),
    ];
    for (from, to, port, want) in cases {
        let d = decide(&set, from, to, &server, port);
        assert_eq!(d.allowed, want, "{from} -> {to}:{port}: {d:?}");
    }
}

#[test]
fn explain_names_the_policy_rule_and_file() {
    use crate::policy::{Destination, Request, explain};

    let set = load_paths(&[policies_dir().join("examples")], Settings::default())
        .expect("valid examples");
    let server = labels(&[("app", "server")]);
    let peer = super::spiffe("spiffe://cluster.local/ns/default/sa/frontend");
    let request = |port| Request {
        source: Some(&peer),
        destination: Destination {
            namespace: "default",
            name: "server",
            labels: &server,
        },
        port,
    };
    let text = explain(&set, &request(8080)).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ALLOW", "{text}");
    assert_eq!(
        lines[1],
        "reason:     allowed by default/allow-frontend rule 0"
    );
    assert!(
        lines[2].starts_with("policy:     default/allow-frontend (ALLOW, "),
        "{text}"
    );
    assert!(
        lines[2].ends_with("examples/allow-frontend-to-server.yaml)"),
        "{text}"
    );
    assert_eq!(
        lines[3],
        "rule 0:     from (principals [spiffe://cluster.local/ns/default/sa/frontend]), to ports 8080"
    );
    let text = explain(&set, &request(9999)).to_string();
    assert!(
        text.starts_with("DENY\nreason:     no ALLOW policy of the workload matched\n"),
        "{text}"
    );
    assert!(
        text.contains("applicable: ambit-system/allow-metrics-scrape (ALLOW), "),
        "{text}"
    );
}
