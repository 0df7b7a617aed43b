//! `ambit policy explain`: one decision, spelled out for a person.

use std::{fmt, str::FromStr};

use super::{Action, Decision, Destination, Policy, PolicySet, Request};
use crate::identity::SpiffeId;

/// The `--from` of `explain`: a SPIFFE ID, or `plaintext`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Plaintext,
    Id(SpiffeId),
}

impl Peer {
    pub fn id(&self) -> Option<&SpiffeId> {
        match self {
            Peer::Plaintext => None,
            Peer::Id(id) => Some(id),
        }
    }
}

impl FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "plaintext" {
            return Ok(Peer::Plaintext);
        }
        SpiffeId::parse(s)
            .map(Peer::Id)
            .map_err(|e| format!("{s:?} is neither `plaintext` nor a canonical SPIFFE ID: {e}"))
    }
}

/// The `--to` of `explain`: `NAMESPACE/WORKLOAD:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionTarget {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

impl FromStr for ConnectionTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not NAMESPACE/WORKLOAD:PORT");
        let (workload, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let (namespace, name) = workload.split_once('/').ok_or_else(bad)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(bad)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        Ok(ConnectionTarget {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port,
        })
    }
}

/// A decision with the policies behind it; `Display` is the `explain`
/// output.
pub struct Explanation<'s> {
    pub decision: Decision,
    /// The deciding policy, when a rule decided.
    pub policy: Option<&'s Policy>,
    /// Every policy that applies to the destination, in evaluation order.
    pub applicable: Vec<&'s Policy>,
    workload: String,
    default_action: String,
}

pub fn explain<'s>(set: &'s PolicySet, request: &Request<'_>) -> Explanation<'s> {
    let decision = set.evaluate(request);
    let applicable = set.applicable(&request.destination);
    let policy = decision
        .policy
        .as_deref()
        .and_then(|id| applicable.iter().copied().find(|p| p.id() == id));
    let Destination {
        namespace, name, ..
    } = request.destination;
    Explanation {
        decision,
        policy,
        applicable,
        workload: format!("{namespace}/{name}"),
        default_action: set.settings().default_action.to_string(),
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        writeln!(f, "{}", if d.allowed { "ALLOW" } else { "DENY" })?;
        writeln!(f, "reason:     {}", d.reason)?;
        match (self.policy, d.rule) {
            (Some(policy), Some(rule)) => {
                write!(f, "policy:     {} ({}", policy.id(), policy.action)?;
                if let Some(origin) = &policy.origin {
                    write!(f, ", {}", origin.display())?;
                }
                writeln!(f, ")")?;
                if let Some(rule_spec) = policy.rules.get(rule) {
                    writeln!(f, "rule {rule}:     {rule_spec}")?;
                }
            }
            _ if self.applicable.iter().any(|p| p.action == Action::Allow) => writeln!(
                f,
                "policy:     none; ALLOW policies apply to {} and none matched",
                self.workload
            )?,
            _ => writeln!(
                f,
                "policy:     none; no ALLOW or DENY policy decided for {}, \
                 so the mesh default ({}) did",
                self.workload, self.default_action
            )?,
        }
        if self.applicable.is_empty() {
            writeln!(f, "applicable: none")
        } else {
            let list: Vec<_> = self
                .applicable
                .iter()
                .map(|p| format!("{} ({})", p.id(), p.action))
                .collect();
            writeln!(f, "applicable: {}", list.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peers_and_targets() {
        assert_eq!("plaintext".parse::<Peer>(), Ok(Peer::Plaintext));
        assert!(matches!(
            "spiffe://cluster.local/ns/a/sa/b".parse::<Peer>(),
            Ok(Peer::Id(_))
        ));
        assert!("spiffe://Cluster/x".parse::<Peer>().is_err());
        assert_eq!(
            "default/server:8080".parse::<ConnectionTarget>(),
            Ok(ConnectionTarget {
                namespace: "default".into(),
                name: "server".into(),
                port: 8080
            })
        );
        for bad in [
            "server:80",
            "default/server",
            "default/server:0",
            "/x:1",
            "a/:1",
            "a/b/c:1",
            "a/b:x",
        ] {
            assert!(bad.parse::<ConnectionTarget>().is_err(), "{bad}");
        }
    }
}
