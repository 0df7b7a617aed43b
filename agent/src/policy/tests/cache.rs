//! The engine's decision cache: hits, and no stale decision after a swap.

use std::sync::Arc;

use super::{doc, labels, set_from_yaml, settings, spiffe};
use crate::policy::{CacheStats, DefaultAction, Destination, Engine, PolicySet, Request};

fn request<'a>(
    source: Option<&'a crate::identity::SpiffeId>,
    labels: &'a crate::workloads::Labels,
    port: u16,
) -> Request<'a> {
    Request {
        source,
        destination: Destination {
            namespace: "default",
            name: "server",
            labels,
        },
        port,
    }
}

fn allow_all() -> Arc<PolicySet> {
    Arc::new(set_from_yaml(
        &doc("default", "allow-all", "  rules: [{}]"),
        settings(DefaultAction::Deny),
    ))
}

fn deny_all() -> Arc<PolicySet> {
    Arc::new(set_from_yaml("", settings(DefaultAction::Deny)))
}

#[test]
fn repeated_requests_hit_the_cache() {
    let engine = Engine::new(allow_all());
    let peer = spiffe("spiffe://cluster.local/ns/default/sa/web");
    let l = labels(&[("app", "server")]);
    let first = engine.decide(&request(Some(&peer), &l, 80));
    let second = engine.decide(&request(Some(&peer), &l, 80));
    assert!(first.allowed);
    assert!(Arc::ptr_eq(&first, &second), "served from the cache");
    // Each field of the key makes its own entry.
    engine.decide(&request(None, &l, 80));
    engine.decide(&request(Some(&peer), &l, 81));
    engine.decide(&request(Some(&peer), &labels(&[]), 80));
    assert_eq!(
        engine.cache_stats(),
        CacheStats {
            hits: 1,
            misses: 4,
            entries: 4
        }
    );
}

#[test]
fn replacing_the_set_invalidates_the_cache() {
    let engine = Engine::new(allow_all());
    let peer = spiffe("spiffe://cluster.local/ns/default/sa/web");
    let l = labels(&[]);
    assert!(engine.decide(&request(Some(&peer), &l, 80)).allowed);
    assert_eq!(engine.generation(), 0);
    assert_eq!(engine.replace(deny_all()), 1);
    assert_eq!(engine.cache_stats().entries, 0);
    let after = engine.decide(&request(Some(&peer), &l, 80));
    assert!(!after.allowed, "{after:?}");
    assert_eq!(after.reason, "denied by default-deny mesh mode");
    assert_eq!(engine.cache_stats().misses, 2);
    assert_eq!(engine.replace(allow_all()), 2);
    assert!(engine.decide(&request(Some(&peer), &l, 80)).allowed);
}

#[test]
fn labels_are_part_of_the_key() {
    // Same workload name, relabelled by a workloads-file reload: a policy
    // selecting the new label must apply at once.
    let set = set_from_yaml(
        &doc(
            "default",
            "allow-server",
            "  selector: { matchLabels: { app: server } }\n  rules: [{}]",
        ),
        settings(DefaultAction::Deny),
    );
    let engine = Engine::new(Arc::new(set));
    assert!(!engine.decide(&request(None, &labels(&[]), 80)).allowed);
    assert!(
        engine
            .decide(&request(None, &labels(&[("app", "server")]), 80))
            .allowed
    );
}

#[test]
fn capacity_bounds_the_cache() {
    let engine = Engine::with_cache_capacity(allow_all(), 3);
    let l = labels(&[]);
    for port in 1..=10 {
        engine.decide(&request(None, &l, port));
        assert!(engine.cache_stats().entries <= 3);
    }
    let disabled = Engine::with_cache_capacity(allow_all(), 0);
    disabled.decide(&request(None, &l, 1));
    disabled.decide(&request(None, &l, 1));
    assert_eq!(disabled.cache_stats().hits, 0);
    assert_eq!(disabled.cache_stats().entries, 0);
}

#[test]
fn clear_cache_forgets_decisions() {
    let engine = Engine::new(allow_all());
    let l = labels(&[]);
    engine.decide(&request(None, &l, 1));
    engine.clear_cache();
    assert_eq!(engine.cache_stats().entries, 0);
    engine.decide(&request(None, &l, 1));
    assert_eq!(engine.cache_stats().hits, 0);
}

#[tokio::test]
async fn follow_serves_each_published_set() {
    let (tx, rx) = tokio::sync::watch::channel(allow_all());
    let engine = Arc::new(Engine::new(deny_all()));
    let task = engine.follow(rx);
    let l = labels(&[]);
    let wait_for = |want: bool| {
        let engine = Arc::clone(&engine);
        let l = l.clone();
        async move {
            for _ in 0..200 {
                if engine.decide(&request(None, &l, 80)).allowed == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("the engine never served a set that answers {want}");
        }
    };
    wait_for(true).await;
    tx.send(deny_all()).expect("engine follows");
    wait_for(false).await;
    drop(tx);
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("follow ends with the sender")
        .expect("no panic");
}
