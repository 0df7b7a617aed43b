//! Policy decision latency as the policy set grows.
//!
//! `cargo bench -p ambit-benches --bench policy` (add `-- --quick` for a
//! short run). Benchmarks read as `policy_decision/<path>/<policies>`:
//!
//! - `uncached_spread`: the realistic shape, 10 policies per namespace,
//!   each selecting one app; the index narrows a decision to the few
//!   policies of the destination's namespace and app.
//! - `uncached_one_namespace`: every policy in the destination's namespace,
//!   each with its own app selector (the label index's case).
//! - `uncached_all_apply`: every policy applies to the destination (no
//!   selectors) and none matches, so each is evaluated: the worst case.
//! - `cached`: the engine's cache hit, what repeated connections pay.
//!
//! `policy_load/<policies>` is parse + validate + index of the YAML text,
//! what a reload costs.

use std::{fmt::Write, hint::black_box, path::Path, sync::Arc};

use ambit::{
    identity::SpiffeId,
    policy::{Destination, Engine, PolicySet, Request, Settings, parse_str},
    workloads::Labels,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const APPS_PER_NAMESPACE: usize = 10;

fn header(out: &mut String, namespace: &str, name: &str) {
    let _ = write!(
        out,
        "---\napiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n"
    );
}

/// Policy `i` of a namespace: ALLOW its client to the app's ports; every
/// tenth is a DENY of a quarantined namespace.
fn app_policy(out: &mut String, namespace: &str, i: usize, selector: bool) {
    header(out, namespace, &format!("policy-{i}"));
    if selector {
        let _ = writeln!(out, "  selector: {{ matchLabels: {{ app: app-{i} }} }}");
    }
    if i % 10 == 9 {
        out.push_str("  action: DENY\n  rules:\n    - from: [{ namespaces: [quarantine] }]\n");
    } else {
        let _ = write!(
            out,
            "  action: ALLOW\n  rules:\n    - from:\n        - principals:\n            \
             - spiffe://cluster.local/ns/{namespace}/sa/client-{i}\n            \
             - spiffe://cluster.local/ns/ops/*\n      to:\n        - ports: [8080, \"9000-9100\"]\n"
        );
    }
}

fn spread(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let namespace = format!("ns-{}", i / APPS_PER_NAMESPACE);
        app_policy(&mut out, &namespace, i % APPS_PER_NAMESPACE, true);
    }
    out
}

fn one_namespace(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        app_policy(&mut out, "ns-0", i, true);
    }
    out
}

fn all_apply(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        header(&mut out, "ns-0", &format!("policy-{i}"));
        let _ = write!(
            out,
            "  rules:\n    - from: [{{ principals: [\"spiffe://cluster.local/ns/x/sa/client-{i}\"] }}]\n"
        );
    }
    out
}

fn build(yaml: &str) -> PolicySet {
    let policies = parse_str(yaml, Path::new("bench.yaml")).expect("valid generated policies");
    PolicySet::new(policies, Settings::default()).expect("unique names")
}

/// A benchmark name, the policy generator, and the expected decision.
type Scenario = (&'static str, fn(usize) -> String, bool);

/// A connection to `ns-0/app-3` from a peer one of its policies allows
/// (except for `uncached_all_apply`, where nothing matches).
struct Probe {
    source: SpiffeId,
    labels: Labels,
}

impl Probe {
    fn new() -> Self {
        Self {
            source: SpiffeId::parse("spiffe://cluster.local/ns/ns-0/sa/client-3")
                .expect("valid ID"),
            labels: [("app".to_owned(), "app-3".to_owned())].into(),
        }
    }

    fn request(&self) -> Request<'_> {
        Request {
            source: Some(&self.source),
            destination: Destination {
                namespace: "ns-0",
                name: "app-3-7d9f",
                labels: &self.labels,
            },
            port: 8080,
        }
    }
}

fn decisions(c: &mut Criterion) {
    let probe = Probe::new();
    let mut group = c.benchmark_group("policy_decision");
    for n in SIZES {
        let scenarios: [Scenario; 3] = [
            ("uncached_spread", spread, true),
            ("uncached_one_namespace", one_namespace, true),
            ("uncached_all_apply", all_apply, false),
        ];
        for (name, generate, allowed) in scenarios {
            let set = build(&generate(n));
            assert_eq!(
                set.evaluate(&probe.request()).allowed,
                allowed,
                "{name}/{n}"
            );
            group.bench_with_input(BenchmarkId::new(name, n), &set, |b, set| {
                b.iter(|| black_box(set.evaluate(black_box(&probe.request()))))
            });
        }
        let engine = Engine::new(Arc::new(build(&spread(n))));
        engine.decide(&probe.request());
        group.bench_with_input(BenchmarkId::new("cached", n), &engine, |b, engine| {
            b.iter(|| black_box(engine.decide(black_box(&probe.request()))))
        });
    }
    group.finish();
}

fn loading(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_load");
    group.sample_size(10);
    for n in SIZES {
        let yaml = spread(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &yaml, |b, yaml| {
            b.iter(|| black_box(build(black_box(yaml))))
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, loading);
criterion_main!(benches);
