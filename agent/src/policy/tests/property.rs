//! Random policy sets against a brute-force reading of the rules.

use proptest::{collection::vec, option, prelude::*, sample::select};

use super::{labels, spiffe};
use crate::{
    identity::SpiffeId,
    policy::{
        Action, DefaultAction, Destination, Operation, Policy, PolicySet, PortRange,
        PrincipalPattern, Request, Rule, Settings, Source,
    },
    workloads::Labels,
};

const ROOT: &str = "ambit-system";
const NAMESPACES: [&str; 3] = ["a", "b", ROOT];
const IDS: [&str; 5] = [
    "spiffe://td/ns/a/sa/s1",
    "spiffe://td/ns/a/sa/s2",
    "spiffe://td/ns/b/sa/s1",
    "spiffe://td/job/nightly",
    "spiffe://other/ns/a/sa/s1",
];

fn principal() -> impl Strategy<Value = PrincipalPattern> {
    prop_oneof![
        Just(PrincipalPattern::Any),
        select(&IDS[..]).prop_map(|id| PrincipalPattern::Exact(spiffe(id))),
        select(&["spiffe://td/ns/a/", "spiffe://td/", "spiffe://td/ns/b/sa/s"][..])
            .prop_map(|p| PrincipalPattern::Prefix(p.to_owned())),
    ]
}

fn source() -> impl Strategy<Value = Source> {
    (
        vec(principal(), 0..3),
        vec(select(&["a", "b"][..]).prop_map(str::to_owned), 0..2),
    )
        .prop_filter("a from entry constrains something", |(p, n)| {
            !p.is_empty() || !n.is_empty()
        })
        .prop_map(|(principals, namespaces)| Source {
            principals,
            namespaces,
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    vec((1u16..=10, 0u16..3), 1..3).prop_map(|ranges| Operation {
        ports: ranges
            .into_iter()
            .filter_map(|(first, len)| PortRange::new(first, first + len))
            .collect(),
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        option::of(vec(source(), 1..3)),
        option::of(vec(operation(), 1..3)),
    )
        .prop_map(|(from, to)| Rule { from, to })
}

fn selector() -> impl Strategy<Value = Labels> {
    (
        option::of(select(&["x", "y"][..])),
        option::of(select(&["1", "2"][..])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(app) = app {
                l.insert("app".into(), app.into());
            }
            if let Some(tier) = tier {
                l.insert("tier".into(), tier.into());
            }
            l
        })
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    vec(
        (
            select(&NAMESPACES[..]),
            selector(),
            prop_oneof![Just(Action::Allow), Just(Action::Deny)],
            vec(rule(), 0..3),
        ),
        0..8,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (namespace, selector, action, rules))| Policy {
                namespace: namespace.into(),
                name: format!("p{i}"),
                selector,
                action,
                rules,
                origin: None,
            })
            .collect()
    })
}

type LabelPairs = &'static [(&'static str, &'static str)];
const WORKLOAD_LABELS: [LabelPairs; 4] = [
    &[],
    &[("app", "x")],
    &[("app", "y"), ("tier", "1")],
    &[("app", "x"), ("tier", "2")],
];

#[derive(Debug, Clone)]
struct Req {
    source: Option<SpiffeId>,
    namespace: &'static str,
    labels: Labels,
    port: u16,
}

fn request() -> impl Strategy<Value = Req> {
    (
        option::of(select(&IDS[..]).prop_map(spiffe)),
        select(&NAMESPACES[..]),
        select(&WORKLOAD_LABELS[..]),
        1u16..=12,
    )
        .prop_map(|(source, namespace, l, port)| Req {
            source,
            namespace,
            labels: labels(l),
            port,
        })
}

/// The policy rules of docs/architecture.md read literally, over every policy.
fn reference(policies: &[Policy], req: &Req, default: DefaultAction) -> (bool, bool) {
    let applies = |p: &&Policy| {
        (p.namespace == req.namespace || p.namespace == ROOT) && p.selects(&req.labels)
    };
    let matches = |p: &&Policy| {
        p.rules
            .iter()
            .any(|r| r.matches(req.source.as_ref(), req.port))
    };
    let applicable: Vec<&Policy> = policies.iter().filter(applies).collect();
    let deny = applicable
        .iter()
        .any(|p| p.action == Action::Deny && matches(p));
    let allows: Vec<_> = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    let allowed = if deny {
        false
    } else if !allows.is_empty() {
        allows.iter().any(|p| matches(p))
    } else {
        default == DefaultAction::Allow
    };
    (deny, allowed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_matching_deny_always_denies(
        policies in policies(),
        req in request(),
        default_allow in any::<bool>(),
    ) {
        let default = if default_allow { DefaultAction::Allow } else { DefaultAction::Deny };
        let set = PolicySet::new(policies.clone(), Settings { default_action: default, root_namespace: ROOT.into() })
            .expect("unique names");
        let decision = set.evaluate(&Request {
            source: req.source.as_ref(),
            destination: Destination { namespace: req.namespace, name: "w", labels: &req.labels },
            port: req.port,
        });
        let (deny_matches, allowed) = reference(&policies, &req, default);
        if deny_matches {
            prop_assert!(!decision.allowed, "{decision:?}");
            let id = decision.policy.clone().expect("a DENY policy decided");
            let policy = policies.iter().find(|p| p.id() == id).expect("known policy");
            prop_assert_eq!(policy.action, Action::Deny);
            let rule = decision.rule.expect("a rule decided");
            prop_assert!(policy.rules[rule].matches(req.source.as_ref(), req.port));
        }
        prop_assert_eq!(decision.allowed, allowed, "{:?}", decision);
        if decision.allowed && decision.policy.is_none() {
            prop_assert_eq!(default, DefaultAction::Allow);
        }
    }
}
