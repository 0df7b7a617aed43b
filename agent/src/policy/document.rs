//! The YAML schema of an `AuthorizationPolicy` document.
//!
//! Validation happens inside deserialization, on purpose: serde_yaml puts
//! the line and column of the value being read on any error raised while
//! it is read, so a bad port or principal is reported where it is written,
//! not at the top of the document. Leaf values validate in their visitors;
//! structures that need a check across fields are wrapped in [`Checked`].

use std::{collections::BTreeMap, fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, Visitor, value::MapAccessDeserializer},
};

use super::{
    API_VERSION, KIND,
    model::{Action, Operation, Policy, PortRange, PrincipalPattern, Rule, Source},
    syntax,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Document {
    #[allow(dead_code)] // Checked while parsing; nothing to keep.
    api_version: ApiVersion,
    #[allow(dead_code)]
    kind: Kind,
    metadata: Metadata,
    spec: Checked<Spec>,
}

impl Document {
    pub(super) fn into_policy(self) -> Policy {
        let spec = self.spec.0;
        Policy {
            namespace: self.metadata.namespace.0,
            name: self.metadata.name.0,
            selector: spec
                .selector
                .map(|s| s.0.match_labels.0)
                .unwrap_or_default(),
            action: spec.action.0,
            rules: spec
                .rules
                .unwrap_or_default()
                .into_iter()
                .map(|rule| rule.0.into_rule())
                .collect(),
            origin: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: ObjectName,
    namespace: Namespace,
    // Accepted so Kubernetes manifests load unchanged; they mean nothing
    // to the decision.
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<Checked<Selector>>,
    /// Istio's default: an omitted action is ALLOW.
    #[serde(default)]
    action: ActionField,
    #[serde(default)]
    rules: Option<Vec<Checked<RuleDoc>>>,
}

impl Validate for Spec {
    fn validate(&self) -> Result<(), String> {
        // Istio refuses this too: a DENY policy that matches nothing is a
        // mistake, not a way to express anything.
        if self.action.0 == Action::Deny && self.rules.as_ref().is_none_or(Vec::is_empty) {
            return Err("a DENY policy without rules matches nothing; \
                        add rules (an empty rule `{}` matches every connection)"
                .into());
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: UniqueLabels,
}

impl Validate for Selector {
    fn validate(&self) -> Result<(), String> {
        self.match_labels
            .0
            .iter()
            .try_for_each(|(k, v)| syntax::selector_label(k, v))
    }
}

/// Labels where a repeated key is an error: a plain map would keep the
/// last value silently, and a selector must not be ambiguous.
#[derive(Default)]
struct UniqueLabels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueLabels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = UniqueLabels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of label names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueLabels, A::Error> {
                let mut labels = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if labels.contains_key(&key) {
                        return Err(de::Error::custom(format!("label `{key}` is given twice")));
                    }
                    labels.insert(key, value);
                }
                Ok(UniqueLabels(labels))
            }
        }
        deserializer.deserialize_map(LabelsVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    from: Option<Vec<Checked<SourceDoc>>>,
    #[serde(default)]
    to: Option<Vec<Checked<OperationDoc>>>,
}

impl RuleDoc {
    fn into_rule(self) -> Rule {
        Rule {
            from: self
                .from
                .map(|from| from.into_iter().map(|s| s.0.into_source()).collect()),
            to: self.to.map(|to| {
                to.into_iter()
                    .map(|o| Operation {
                        ports: o.0.ports.into_iter().map(|p| p.0).collect(),
                    })
                    .collect()
            }),
        }
    }
}

impl Validate for RuleDoc {
    fn validate(&self) -> Result<(), String> {
        // Istio: an empty list is an error, never "no constraint", so a
        // template that renders `from: []` cannot open a workload up.
        if self.from.as_ref().is_some_and(Vec::is_empty) {
            return Err("`from` must not be empty; omit it to match any source".into());
        }
        if self.to.as_ref().is_some_and(Vec::is_empty) {
            return Err("`to` must not be empty; omit it to match any port".into());
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceDoc {
    #[serde(default)]
    principals: Option<Vec<Principal>>,
    #[serde(default)]
    namespaces: Option<Vec<Namespace>>,
}

impl SourceDoc {
    fn into_source(self) -> Source {
        Source {
            principals: self
                .principals
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.0)
                .collect(),
            namespaces: self
                .namespaces
                .unwrap_or_default()
                .into_iter()
                .map(|n| n.0)
                .collect(),
        }
    }
}

impl Validate for SourceDoc {
    fn validate(&self) -> Result<(), String> {
        match (&self.principals, &self.namespaces) {
            (None, None) => Err("a `from` entry needs `principals` or `namespaces`".into()),
            (Some(p), _) if p.is_empty() => Err("`principals` must not be empty".into()),
            (_, Some(n)) if n.is_empty() => Err("`namespaces` must not be empty".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationDoc {
    ports: Vec<Port>,
}

impl Validate for OperationDoc {
    fn validate(&self) -> Result<(), String> {
        if self.ports.is_empty() {
            return Err("`ports` must not be empty; omit `to` to match any port".into());
        }
        Ok(())
    }
}

/// Checks across the fields of a mapping, run as soon as it is read.
trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// A mapping deserialized as `T` and then validated, inside serde_yaml's
/// visit of that mapping so a failure carries the mapping's position.
struct Checked<T>(T);

impl<'de, T: Deserialize<'de> + Validate> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CheckedVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Validate> Visitor<'de> for CheckedVisitor<T> {
            type Value = Checked<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let value = T::deserialize(MapAccessDeserializer::new(map))?;
                value.validate().map_err(de::Error::custom)?;
                Ok(Checked(value))
            }
        }
        deserializer.deserialize_map(CheckedVisitor(PhantomData))
    }
}

/// Declares a newtype read from a YAML string (and, with `numbers`, a
/// YAML integer) by a `syntax` function, so its error is raised while
/// serde_yaml still knows the value's position.
macro_rules! leaf {
    ($name:ident($inner:ty), $expecting:literal, $parse:expr) => {
        leaf!($name($inner), $expecting, $parse, |n: u64| Err(format!(
            "expected {}, found the number {n}",
            $expecting
        )));
    };
    ($name:ident($inner:ty), $expecting:literal, $parse:expr, $number:expr) => {
        struct $name($inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct LeafVisitor;
                impl<'de> Visitor<'de> for LeafVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$name, E> {
                        let parse: fn(&str) -> Result<$inner, String> = $parse;
                        parse(text).map($name).map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, n: u64) -> Result<$name, E> {
                        let number: fn(u64) -> Result<$inner, String> = $number;
                        number(n).map($name).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$name, E> {
                        Err(E::custom(format!("expected {}, found {n}", $expecting)))
                    }
                }
                deserializer.deserialize_any(LeafVisitor)
            }
        }
    };
}

leaf!(ApiVersion(()), "the apiVersion string", |text| {
    if text == API_VERSION {
        Ok(())
    } else {
        Err(format!(
            "unsupported apiVersion {text:?}, expected {API_VERSION:?}"
        ))
    }
});
leaf!(Kind(()), "the kind string", |text| {
    if text == KIND {
        Ok(())
    } else {
        Err(format!("unsupported kind {text:?}, expected {KIND:?}"))
    }
});
leaf!(ObjectName(String), "a name", syntax::object_name);
leaf!(Namespace(String), "a namespace name", syntax::namespace);
leaf!(
    Principal(PrincipalPattern),
    "a SPIFFE ID pattern",
    syntax::principal
);
leaf!(
    Port(PortRange),
    "a port number or a range like \"9000-9100\"",
    syntax::port_text,
    syntax::port_number
);
leaf!(ActionField(Action), "ALLOW or DENY", |text| match text {
    "ALLOW" => Ok(Action::Allow),
    "DENY" => Ok(Action::Deny),
    "AUDIT" | "CUSTOM" => Err(format!(
        "action {text} is not supported by Ambit; use ALLOW or DENY"
    )),
    _ => Err(format!("unknown action {text:?}, expected ALLOW or DENY")),
});

impl Default for ActionField {
    fn default() -> Self {
        ActionField(Action::Allow)
    }
}
