//! Validated policies and how one rule matches a connection.
//!
//! Values of these types only come out of the parser (or tests), so every
//! field already passed the checks in `syntax`: matching never has to cope
//! with a malformed principal or port.

use std::{fmt, path::Path, sync::Arc};

use crate::{identity::SpiffeId, workloads::Labels};

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// One `AuthorizationPolicy` document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels`; empty selects every workload of
    /// `namespace` (of the mesh, for the root namespace).
    pub selector: Labels,
    pub action: Action,
    /// No rules: the policy matches nothing (an ALLOW policy without rules
    /// therefore denies everything to the workloads it selects).
    pub rules: Vec<Rule>,
    /// The file the policy came from, for `explain` and logs.
    pub origin: Option<Arc<Path>>,
}

impl Policy {
    /// `namespace/name`, the policy's identity in decisions and audit.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the selector's labels are a subset of `labels`.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }

    /// The index of the first rule matching the connection.
    pub fn matching_rule(&self, source: Option<&SpiffeId>, port: u16) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(source, port))
    }
}

/// `from` entries OR-ed, `to` entries OR-ed, the two AND-ed. `None` means
/// the field was absent: no constraint. (An empty list is a parse error,
/// as in Istio, so it can never be mistaken for "anything".)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Option<Vec<Source>>,
    pub to: Option<Vec<Operation>>,
}

impl Rule {
    pub fn matches(&self, source: Option<&SpiffeId>, port: u16) -> bool {
        self.from
            .as_ref()
            .is_none_or(|from| from.iter().any(|s| s.matches(source)))
            && self
                .to
                .as_ref()
                .is_none_or(|to| to.iter().any(|o| o.matches(port)))
    }
}

/// One `from` entry: every non-empty field must match. The parser refuses
/// an entry with no field, so every `Source` constrains the peer identity
/// and a plaintext connection (no identity) matches none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<PrincipalPattern>,
    /// Compared with the namespace of a Kubernetes-form SPIFFE ID
    /// (`.../ns/<namespace>/sa/<sa>`); IDs of another form never match.
    pub namespaces: Vec<String>,
}

impl Source {
    pub fn matches(&self, source: Option<&SpiffeId>) -> bool {
        let Some(id) = source else {
            return self.principals.is_empty() && self.namespaces.is_empty();
        };
        (self.principals.is_empty() || self.principals.iter().any(|p| p.matches(id)))
            && (self.namespaces.is_empty()
                || id
                    .namespace()
                    .is_some_and(|ns| self.namespaces.iter().any(|want| want == ns)))
    }
}

/// One `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<PortRange>,
}

impl Operation {
    pub fn matches(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port))
    }
}

/// A principal in a `from` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrincipalPattern {
    /// `*`: any authenticated peer (never a plaintext one).
    Any,
    /// A canonical SPIFFE ID, compared exactly.
    Exact(SpiffeId),
    /// `<prefix>*`: every ID that starts with the prefix. The prefix
    /// always contains a whole trust domain and its '/', so a wildcard can
    /// never reach into another trust domain.
    Prefix(String),
}

impl PrincipalPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PrincipalPattern::Any => true,
            PrincipalPattern::Exact(want) => want == id,
            PrincipalPattern::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrincipalPattern::Any => f.write_str("*"),
            PrincipalPattern::Exact(id) => write!(f, "{id}"),
            PrincipalPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// An inclusive port range; a single port is `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// `None` for port 0 or a reversed range.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first != 0 && first <= last).then_some(Self { first, last })
    }

    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A one-line summary for `explain`: `from [...] to [...]`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            None => f.write_str("from any source")?,
            Some(from) => {
                f.write_str("from ")?;
                write_list(f, from.iter().map(source_summary), " or ")?;
            }
        }
        match &self.to {
            None => f.write_str(", to any port"),
            Some(to) => {
                f.write_str(", to ports ")?;
                let ports = to
                    .iter()
                    .flat_map(|o| o.ports.iter().map(ToString::to_string));
                write_list(f, ports, ", ")
            }
        }
    }
}

fn source_summary(source: &Source) -> String {
    let mut parts = Vec::new();
    if !source.principals.is_empty() {
        let list: Vec<_> = source.principals.iter().map(|p| p.to_string()).collect();
        parts.push(format!("principals [{}]", list.join(", ")));
    }
    if !source.namespaces.is_empty() {
        parts.push(format!("namespaces [{}]", source.namespaces.join(", ")));
    }
    format!("({})", parts.join(" and "))
}

fn write_list(
    f: &mut fmt::Formatter<'_>,
    items: impl Iterator<Item = String>,
    separator: &str,
) -> fmt::Result {
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        f.write_str(&item)?;
    }
    Ok(())
}
