//! What is asked of the policy engine and what it answers.

use std::{fmt, str::FromStr};

use crate::{
    identity::SpiffeId,
    workloads::{Labels, Workload},
};

/// One inbound connection to decide on.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The peer's verified SPIFFE ID; `None` for plaintext from outside
    /// the mesh.
    pub source: Option<&'a SpiffeId>,
    pub destination: Destination<'a>,
    pub port: u16,
}

/// The workload a connection is for: policies select it by namespace and
/// labels; the name only keys the decision cache.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a Labels,
}

impl<'a> From<&'a Workload> for Destination<'a> {
    fn from(workload: &'a Workload) -> Self {
        Self {
            namespace: &workload.namespace,
            name: &workload.name,
            labels: &workload.labels,
        }
    }
}

/// The answer, with enough to audit and explain it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; `None` when no rule
    /// decided (mesh default, or no ALLOW policy of the workload matched).
    pub policy: Option<String>,
    /// Index of the deciding rule within that policy.
    pub rule: Option<usize>,
    pub reason: String,
}

/// The decision for workloads no ALLOW or DENY policy decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DefaultAction {
    Allow,
    /// The shipped configuration: nothing passes without a policy.
    #[default]
    Deny,
}

impl fmt::Display for DefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultAction::Allow => "allow",
            DefaultAction::Deny => "deny",
        })
    }
}

impl FromStr for DefaultAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(DefaultAction::Allow),
            "deny" => Ok(DefaultAction::Deny),
            _ => Err(format!("{s:?} is not a mesh default; use allow or deny")),
        }
    }
}

/// Istio's name for the namespace whose policies apply to the whole mesh
/// is "root namespace"; Ambit's default is its own system namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "ambit-system";

/// How a policy set is evaluated, fixed when the set is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub default_action: DefaultAction,
    /// Policies in this namespace apply to workloads of every namespace.
    pub root_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_action: DefaultAction::Deny,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
        }
    }
}
