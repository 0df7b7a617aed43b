//! Identity-based L4 authorization (docs/architecture.md, "Policy, audit, metrics").
//!
//! Policies are `AuthorizationPolicy` documents, with Istio's semantics
//! restricted to what an L4 agent can see (peer SPIFFE ID, destination
//! workload, port):
//!
//! ```yaml
//! apiVersion: ambit.dev/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: { name: allow-frontend, namespace: default }
//! spec:
//!   selector: { matchLabels: { app: server } }
//!   action: ALLOW
//!   rules:
//!     - from:
//!         - principals: ["spiffe://cluster.local/ns/default/sa/frontend"]
//!         - namespaces: ["ops"]
//!       to:
//!         - ports: [8080, "9000-9100"]
//! ```
//!
//! - `selector` omitted or empty: every workload of `metadata.namespace`;
//!   of the whole mesh for a policy in the root namespace (`ambit-system`
//!   by default, like Istio's `istio-system`). Otherwise its labels must be
//!   a subset of the workload's.
//! - `action`: `ALLOW` (the default, as in Istio) or `DENY`.
//! - `rules`: a connection matches the policy if any rule matches. No
//!   rules (omitted or `[]`): matches nothing, so an ALLOW policy without
//!   rules denies everything to its workloads (Istio's "allow-nothing"),
//!   and a DENY policy without rules is refused as meaningless. An empty
//!   rule `{}` matches every connection.
//! - A rule matches if any `from` entry matches (or `from` is omitted) and
//!   any `to` entry matches (or `to` is omitted). `from: []`, `to: []` and
//!   empty entries are errors, as in Istio, so that a template rendering
//!   an empty list cannot silently mean "anything".
//! - A `from` entry matches if all its fields match: `principals` (OR-ed;
//!   exact canonical SPIFFE IDs, `*` for any authenticated peer, or a
//!   prefix ending in `*` such as `spiffe://cluster.local/ns/ops/*`) and
//!   `namespaces` (OR-ed; the namespace of a `.../ns/NS/sa/SA` peer ID).
//!   A plaintext connection has no identity and matches no `from` entry.
//! - `to` entries list `ports`: numbers, numeric strings or inclusive
//!   ranges `"9000-9100"`.
//! - Unknown fields are errors.
//!
//! Decision order: a matching DENY denies; else, if an ALLOW policy applies
//! to the workload, allow iff one matches; else the mesh default
//! ([`DefaultAction`], `deny` in the shipped configuration).

mod decision;
mod document;
mod engine;
mod error;
mod explain;
pub mod kubernetes;
mod load;
mod model;
mod object;
mod parse;
mod set;
mod syntax;
mod watch;

#[cfg(test)]
mod tests;

pub use decision::{
    DEFAULT_ROOT_NAMESPACE, Decision, DefaultAction, Destination, Request, Settings,
};
pub use engine::{CacheStats, DEFAULT_CACHE_CAPACITY, Engine};
pub use error::{LoadErrors, PolicyError};
pub use explain::{ConnectionTarget, Explanation, Peer, explain};
pub use load::{build, load_paths, read_sources};
pub use model::{Action, Operation, Policy, PortRange, PrincipalPattern, Rule, Source};
pub use object::{FieldError, from_object};
pub use parse::parse_str;
pub use set::{DuplicatePolicy, PolicySet};
pub use watch::{PolicyWatch, Rejections, watch_dir};

/// The `apiVersion` every policy document must carry.
pub const API_VERSION: &str = "ambit.dev/v1alpha1";
/// The `kind` every policy document must carry.
pub const KIND: &str = "AuthorizationPolicy";
