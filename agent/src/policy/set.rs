//! A validated, indexed set of policies and the decision procedure.
//!
//! Order of evaluation (Istio's, with a configurable last step):
//! 1. a matching DENY policy denies;
//! 2. otherwise, if any ALLOW policy applies to the workload, the
//!    connection is allowed iff one of them matches;
//! 3. otherwise the mesh default decides.
//!
//! A policy applies to a workload when it is in the workload's namespace
//! (or the root namespace) and its selector labels are a subset of the
//! workload's labels.

use std::{collections::HashMap, fmt, path::PathBuf};

use super::{
    Decision,
    decision::{DefaultAction, Destination, Request, Settings},
    model::{Action, Policy},
};

/// Two policies with the same `namespace/name`: decisions and audit
/// records name policies by it, so it must be unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicatePolicy(pub String);

impl fmt::Display for DuplicatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {} is defined more than once", self.0)
    }
}

impl std::error::Error for DuplicatePolicy {}

#[derive(Debug)]
pub struct PolicySet {
    /// Sorted by `namespace/name`, so which of several matching policies
    /// is reported does not depend on file names or document order.
    policies: Vec<Policy>,
    index: HashMap<String, NamespaceIndex>,
    settings: Settings,
    files: Vec<PathBuf>,
    /// False only for [`PolicySet::fail_closed`].
    loaded: bool,
}

/// The policies of one namespace, by what they select, so a decision looks
/// at the few policies that can apply instead of the whole set.
#[derive(Debug, Default)]
struct NamespaceIndex {
    /// Empty selector: every workload of the namespace.
    unselected: Vec<usize>,
    /// Each other policy under one of its selector labels (the first):
    /// only a workload carrying that label can be selected by it. The full
    /// selector is still checked.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl PolicySet {
    pub fn new(mut policies: Vec<Policy>, settings: Settings) -> Result<Self, DuplicatePolicy> {
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if let Some(pair) = policies
            .windows(2)
            .find(|w| w[0].namespace == w[1].namespace && w[0].name == w[1].name)
        {
            return Err(DuplicatePolicy(pair[0].id()));
        }
        let mut index: HashMap<String, NamespaceIndex> = HashMap::new();
        for (i, policy) in policies.iter().enumerate() {
            let ns = index.entry(policy.namespace.clone()).or_default();
            match policy.selector.iter().next() {
                None => ns.unselected.push(i),
                Some((key, value)) => ns
                    .by_label
                    .entry(key.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .push(i),
            }
        }
        Ok(Self {
            policies,
            index,
            settings,
            files: Vec::new(),
            loaded: true,
        })
    }

    /// The set to serve before any valid policy has been loaded: denies
    /// everything, whatever the mesh default (fail closed).
    pub fn fail_closed(settings: Settings) -> Self {
        Self {
            policies: Vec::new(),
            index: HashMap::new(),
            settings,
            files: Vec::new(),
            loaded: false,
        }
    }

    pub(super) fn with_files(mut self, files: Vec<PathBuf>) -> Self {
        self.files = files;
        self
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The files the set was loaded from, sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// The policies that apply to `destination`, DENY and ALLOW, in
    /// evaluation order.
    pub fn applicable(&self, destination: &Destination<'_>) -> Vec<&Policy> {
        self.candidates(destination)
            .into_iter()
            .map(|i| &self.policies[i])
            .filter(|p| p.selects(destination.labels))
            .collect()
    }

    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        if !self.loaded {
            return Decision {
                allowed: false,
                policy: None,
                rule: None,
                reason: "denied: no valid policy set has been loaded yet (fail closed)".into(),
            };
        }
        let destination = &request.destination;
        let mut allow_applies = false;
        let mut allowed_by = None;
        for i in self.candidates(destination) {
            let policy = &self.policies[i];
            if !policy.selects(destination.labels) {
                continue;
            }
            match policy.action {
                Action::Deny => {
                    if let Some(rule) = policy.matching_rule(request.source, request.port) {
                        return decided(false, policy, rule);
                    }
                }
                Action::Allow => {
                    allow_applies = true;
                    if allowed_by.is_none() {
                        allowed_by = policy
                            .matching_rule(request.source, request.port)
                            .map(|rule| (policy, rule));
                    }
                }
            }
        }
        match (allowed_by, allow_applies) {
            (Some((policy, rule)), _) => decided(true, policy, rule),
            (None, true) => Decision {
                allowed: false,
                policy: None,
                rule: None,
                reason: "no ALLOW policy of the workload matched".into(),
            },
            (None, false) => {
                let allowed = self.settings.default_action == DefaultAction::Allow;
                Decision {
                    allowed,
                    policy: None,
                    rule: None,
                    reason: format!(
                        "{} by default-{} mesh mode",
                        if allowed { "allowed" } else { "denied" },
                        self.settings.default_action
                    ),
                }
            }
        }
    }

    /// Indices of the policies that may apply, ascending: those of the
    /// workload's namespace and of the root namespace whose first selector
    /// label the workload carries, or whose selector is empty.
    fn candidates(&self, destination: &Destination<'_>) -> Vec<usize> {
        let root = self.settings.root_namespace.as_str();
        let namespaces: &[&str] = if destination.namespace == root {
            &[root]
        } else {
            &[destination.namespace, root]
        };
        let mut out = Vec::new();
        for ns in namespaces {
            let Some(index) = self.index.get(*ns) else {
                continue;
            };
            out.extend_from_slice(&index.unselected);
            for (key, value) in destination.labels {
                if let Some(list) = index.by_label.get(key).and_then(|v| v.get(value)) {
                    out.extend_from_slice(list);
                }
            }
        }
        // Each policy sits in exactly one list, so sorting is all it takes
        // to restore evaluation order.
        out.sort_unstable();
        out
    }
}

fn decided(allowed: bool, policy: &Policy, rule: usize) -> Decision {
    let id = policy.id();
    Decision {
        allowed,
        reason: format!(
            "{} by {id} rule {rule}",
            if allowed { "allowed" } else { "denied" }
        ),
        policy: Some(id),
        rule: Some(rule),
    }
}
