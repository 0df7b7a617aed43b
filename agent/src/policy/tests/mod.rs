//! Tests of the policy module; helpers shared by the test files.

mod cache;
mod examples;
mod parse_errors;
mod property;
mod reload;
mod table;

use std::path::Path;

use super::{Decision, DefaultAction, Destination, PolicySet, Request, Settings, parse_str};
use crate::{identity::SpiffeId, workloads::Labels};

pub(super) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn spiffe(id: &str) -> SpiffeId {
    SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"))
}

/// A set from YAML documents, as a test file named `test.yaml`.
pub(super) fn set_from_yaml(yaml: &str, settings: Settings) -> PolicySet {
    let policies =
        parse_str(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    PolicySet::new(policies, settings).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn settings(default_action: DefaultAction) -> Settings {
    Settings {
        default_action,
        ..Settings::default()
    }
}

/// `from` is a SPIFFE ID or "plaintext"; `to` is `namespace/name`.
pub(super) fn decide(
    set: &PolicySet,
    from: &str,
    to: &str,
    workload_labels: &Labels,
    port: u16,
) -> Decision {
    let source = (from != "plaintext").then(|| spiffe(from));
    let (namespace, name) = to.split_once('/').expect("namespace/name");
    set.evaluate(&Request {
        source: source.as_ref(),
        destination: Destination {
            namespace,
            name,
            labels: workload_labels,
        },
        port,
    })
}

/// Prefixes `spec` (indented YAML under `spec:`) with the boilerplate.
pub(super) fn doc(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n{spec}\n"
    )
}
