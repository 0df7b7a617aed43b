//! Any bytes as a policy file: parsing must never panic, and whatever it
//! accepts must build into a set that can decide.
#![no_main]

use std::path::Path;

use ambit::{
    identity::SpiffeId,
    policy::{Destination, PolicySet, Request, Settings, parse_str},
    workloads::Labels,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Policy files are read as UTF-8; lossy conversion still lets the
    // fuzzer reach the parser with every byte pattern it tries.
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.yaml");
    let policies = match parse_str(&text, file) {
        Ok(policies) => policies,
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert!(error.to_string().starts_with("fuzz.yaml"));
            }
            return;
        }
    };
    // Duplicate names are the loader's error, not a parser bug.
    let Ok(set) = PolicySet::new(policies, Settings::default()) else {
        return;
    };
    let labels: Labels = set
        .policies()
        .iter()
        .flat_map(|p| p.selector.clone())
        .collect();
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").ok();
    for policy in set.policies() {
        for port in [1, 80, 8080, 65535] {
            let decision = set.evaluate(&Request {
                source: peer.as_ref(),
                destination: Destination {
                    namespace: &policy.namespace,
                    name: "w",
                    labels: &labels,
                },
                port,
            });
            // A decision naming a policy names one of the set.
            if let Some(id) = &decision.policy {
                assert!(set.policies().iter().any(|p| &p.id() == id));
            }
        }
    }
});
