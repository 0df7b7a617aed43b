//! An `AuthorizationPolicy` object of the Kubernetes API into a [`Policy`],
//! through the same document type, checks and messages as a policy file;
//! only the way an error is located differs (a field path instead of a
//! line, since the object has no text).

use std::fmt;

use serde_json::{Value, json};

use super::{API_VERSION, KIND, Policy, document::Document};

/// Why an object's spec is refused, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The offending field, e.g. `spec.rules[0].to[0].ports[1]`.
    pub field: String,
    /// What is wrong and how to fix it (the parser's message).
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// The policy `namespace/name` with `spec` (the object's `spec`, `None`
/// when absent). Labels and annotations of the object mean nothing to the
/// decision and are not looked at.
pub fn from_object(
    namespace: &str,
    name: &str,
    spec: Option<&Value>,
) -> Result<Policy, FieldError> {
    let mut document = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": { "name": name, "namespace": namespace },
    });
    if let Some(spec) = spec {
        document["spec"] = spec.clone();
    }
    serde_path_to_error::deserialize::<_, Document>(document)
        .map(Document::into_policy)
        .map_err(|e| FieldError {
            field: match e.path().to_string() {
                // A missing field is reported at the mapping that lacks it.
                root if root == "." => "spec".into(),
                path => path,
            },
            reason: e.into_inner().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn refused(spec: Value) -> FieldError {
        from_object("default", "p", Some(&spec)).expect_err("should be refused")
    }

    #[test]
    fn a_valid_spec_becomes_the_same_policy_as_the_file() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"from": [{"namespaces": ["legacy"]}], "to": [{"ports": [8080, "9000-9100"]}]}],
        });
        let policy = from_object("default", "deny-legacy", Some(&spec)).expect("valid");
        let from_file = crate::policy::parse_str(
            "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-legacy, namespace: default}\n\
             spec: {selector: {matchLabels: {app: server}}, action: DENY, rules: \
             [{from: [{namespaces: [legacy]}], to: [{ports: [8080, \"9000-9100\"]}]}]}\n",
            std::path::Path::new("f.yaml"),
        )
        .expect("valid file");
        assert_eq!(policy.action, Action::Deny);
        assert_eq!(
            Policy {
                origin: None,
                ..from_file[0].clone()
            },
            policy
        );
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let e = refused(json!({"rules": [{"to": [{"ports": [80, 0]}]}]}));
        assert_eq!(e.field, "spec.rules[0].to[0].ports[1]");
        assert!(e.reason.contains("out of range (1-65535)"), "{e}");

        let e = refused(json!({"action": "DENY"}));
        assert_eq!(e.field, "spec");
        assert!(e.reason.contains("add rules"), "{e}");

        let e = refused(json!({"rules": [{"from": []}]}));
        assert_eq!(e.field, "spec.rules[0]");
        assert!(e.reason.contains("omit it to match any source"), "{e}");

        let e = refused(json!({"rules": [{"from": [{"principals": ["spiffe://clus*"]}]}]}));
        assert_eq!(e.field, "spec.rules[0].from[0].principals[0]");

        let e = refused(json!({"rules": [{"too": [{"ports": [22]}]}]}));
        assert!(e.reason.contains("unknown field `too`"), "{e}");

        let e = from_object("default", "p", None).expect_err("no spec");
        assert_eq!(e.field, "spec");
        assert!(e.reason.contains("missing field `spec`"), "{e}");
    }
}
