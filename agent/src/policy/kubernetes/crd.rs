//! The CRD stays in step with the parser.
//!
//! The schema is written by hand in
//! `deploy/chart/crds/authorizationpolicies.ambit.dev.yaml` (a generated one
//! would need schemars impls mirroring every hand-written deserializer of
//! `document.rs`, which validates inside deserialization for positions, and
//! would still need the hand edits below). These tests tie the two:
//! - the schema is structural (every node typed) and names what the chart
//!   and the agents use (group, version, kind, status subresource);
//! - every shipped example policy is valid under the schema, and its spec
//!   read as an API object gives the same policy as the file;
//! - each object of the spec declares exactly the fields the parser
//!   accepts there (read from the parser's own "unknown field" errors);
//! - enums and patterns accept everything the parser accepts.
//!
//! The schema may accept more than the parser where only CEL could say it
//! (port ranges, SPIFFE ID details, a DENY policy without rules); the
//! agents refuse those and report them on the object.

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use regex::Regex;
    use serde::Deserialize;
    use serde_json::{Value, json};

    use crate::policy::{
        PolicySet, Settings, load_paths, object::from_object, parse_str, read_sources,
    };

    const CRD: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/chart/crds/authorizationpolicies.ambit.dev.yaml"
    ));

    fn crd() -> Value {
        serde_yaml::from_str(CRD).expect("the CRD is YAML")
    }

    fn version() -> Value {
        crd()["spec"]["versions"][0].clone()
    }

    fn schema() -> Value {
        version()["schema"]["openAPIV3Schema"].clone()
    }

    /// The schema of `path` (`spec.rules[].from[]`), from the root.
    fn schema_at(path: &str) -> Value {
        let mut node = schema();
        for part in path.split('.') {
            let (field, items) = match part.strip_suffix("[]") {
                Some(field) => (field, true),
                None => (part, false),
            };
            node = node["properties"][field].clone();
            if items {
                node = node["items"].clone();
            }
            assert!(node.is_object(), "no schema at {path}");
        }
        node
    }

    /// What the API server checks of a value (the subset of OpenAPI the
    /// CRD uses), with unknown fields refused where they would be pruned.
    fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let fail = |why: &str| Err(format!("{at}: {why}"));
        if let Some(allowed) = schema["enum"].as_array()
            && !allowed.contains(value)
        {
            return fail(&format!("{value} is not one of {allowed:?}"));
        }
        if schema["x-kubernetes-int-or-string"] == true {
            return match value {
                Value::Number(n) if n.is_i64() => Ok(()),
                Value::String(_) => Ok(()),
                _ => fail("not an integer or a string"),
            };
        }
        match (schema["type"].as_str(), value) {
            (Some("object"), Value::Object(map)) => {
                for required in schema["required"].as_array().into_iter().flatten() {
                    let required = required.as_str().expect("field names");
                    if !map.contains_key(required) {
                        return fail(&format!("missing required field {required}"));
                    }
                }
                let properties = schema["properties"].as_object();
                let known_only =
                    properties.is_some() && schema["x-kubernetes-preserve-unknown-fields"] != true;
                for (key, item) in map {
                    let at = format!("{at}.{key}");
                    match properties.and_then(|p| p.get(key)) {
                        Some(sub) => validate(sub, item, &at)?,
                        None if schema["additionalProperties"].is_object() => {
                            validate(&schema["additionalProperties"], item, &at)?
                        }
                        None if known_only => return Err(format!("{at}: unknown field")),
                        None => {}
                    }
                }
                Ok(())
            }
            (Some("array"), Value::Array(items)) => {
                if let Some(min) = schema["minItems"].as_u64()
                    && (items.len() as u64) < min
                {
                    return fail(&format!("fewer than {min} items"));
                }
                for (i, item) in items.iter().enumerate() {
                    validate(&schema["items"], item, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            (Some("string"), Value::String(text)) => {
                if let Some(max) = schema["maxLength"].as_u64()
                    && text.len() as u64 > max
                {
                    return fail("too long");
                }
                if let Some(pattern) = schema["pattern"].as_str()
                    && !Regex::new(pattern).expect("valid pattern").is_match(text)
                {
                    return fail(&format!("{text:?} does not match {pattern}"));
                }
                Ok(())
            }
            (Some("integer"), Value::Number(n)) if n.is_i64() => Ok(()),
            (Some("boolean"), Value::Bool(_)) => Ok(()),
            (kind, _) => fail(&format!("{value} is not of type {kind:?}")),
        }
    }

    /// Every node has a type (or is int-or-string): structural.
    fn assert_structural(schema: &Value, at: &str) {
        assert!(
            schema["type"].is_string() || schema["x-kubernetes-int-or-string"] == true,
            "{at} has no type"
        );
        for (key, sub) in schema["properties"].as_object().into_iter().flatten() {
            assert_structural(sub, &format!("{at}.{key}"));
        }
        for nested in ["items", "additionalProperties"] {
            if schema[nested].is_object() {
                assert_structural(&schema[nested], &format!("{at}.{nested}"));
            }
        }
        assert!(
            schema.get("anyOf").is_none() && schema.get("oneOf").is_none(),
            "{at}: keep the schema free of alternatives"
        );
    }

    #[test]
    fn the_crd_names_what_the_agents_use_and_is_structural() {
        let crd = crd();
        let spec = &crd["spec"];
        assert_eq!(
            crd["metadata"]["name"],
            format!("{}.{}", super::super::PLURAL, super::super::GROUP)
        );
        assert_eq!(spec["group"], super::super::GROUP);
        assert_eq!(spec["names"]["kind"], crate::policy::KIND);
        assert_eq!(spec["names"]["plural"], super::super::PLURAL);
        assert_eq!(spec["scope"], "Namespaced");
        let version = version();
        assert_eq!(
            format!(
                "{}/{}",
                spec["group"].as_str().unwrap(),
                version["name"].as_str().unwrap()
            ),
            crate::policy::API_VERSION
        );
        assert_eq!(version["subresources"]["status"], json!({}));
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .expect("printer columns")
            .iter()
            .map(|c| c["name"].as_str().expect("named"))
            .collect();
        assert_eq!(columns, ["Action", "Accepted", "Reason", "Age"]);
        assert_structural(&schema(), "openAPIV3Schema");
    }

    fn example_files() -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let sources = read_sources(&[dir.clone(), dir.join("examples")]).expect("readable");
        assert!(sources.len() >= 4);
        sources.into_iter().map(|(path, _)| path).collect()
    }

    #[test]
    fn every_example_policy_is_valid_under_the_schema_and_reads_the_same_as_an_object() {
        let mut documents = 0;
        for file in example_files() {
            let text = std::fs::read_to_string(&file).expect("readable");
            let from_file = parse_str(&text, &file).expect("valid example");
            let values: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).expect("YAML"))
                .filter(|v| !v.is_null())
                .collect();
            assert_eq!(values.len(), from_file.len(), "{}", file.display());
            for (value, policy) in values.iter().zip(&from_file) {
                validate(&schema(), value, "")
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                let object = from_object(
                    value["metadata"]["namespace"].as_str().expect("namespace"),
                    value["metadata"]["name"].as_str().expect("name"),
                    value.get("spec"),
                )
                .expect("valid as an object");
                assert_eq!(object.rules, policy.rules);
                assert_eq!(
                    (object.action, &object.selector),
                    (policy.action, &policy.selector)
                );
                documents += 1;
            }
        }
        assert!(documents >= 4, "{documents} documents");
        // And together they load, as the agent would serve them.
        let set: PolicySet = load_paths(&example_files(), Settings::default()).expect("valid");
        assert_eq!(set.len(), documents);
    }

    /// The fields the parser accepts in the mapping at `path` of a valid
    /// spec, read from its error for an unknown field there.
    fn parser_fields(spec: &Value, pointer: &str) -> Vec<String> {
        let mut spec = spec.clone();
        spec.pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("no mapping at {pointer}"))
            .insert("unknownProbe".into(), json!(1));
        let error = from_object("default", "probe", Some(&spec)).expect_err("unknown field");
        let expected = error
            .reason
            .split_once("expected")
            .unwrap_or_else(|| panic!("{error}"))
            .1;
        let mut fields: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        fields.sort();
        fields
    }

    fn schema_fields(path: &str) -> Vec<String> {
        let mut fields: Vec<String> = schema_at(path)["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} has no properties"))
            .keys()
            .cloned()
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn each_mapping_of_the_schema_declares_the_fields_the_parser_accepts() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "server"}},
            "action": "ALLOW",
            "rules": [{"from": [{"principals": ["*"]}], "to": [{"ports": [80]}]}],
        });
        validate(&schema_at("spec"), &spec, "spec").expect("valid spec");
        for (path, pointer) in [
            ("spec", ""),
            ("spec.selector", "/selector"),
            ("spec.rules[]", "/rules/0"),
            ("spec.rules[].from[]", "/rules/0/from/0"),
            ("spec.rules[].to[]", "/rules/0/to/0"),
        ] {
            assert_eq!(schema_fields(path), parser_fields(&spec, pointer), "{path}");
            // Unknown fields reach the parser, which refuses them, instead
            // of being pruned into a broader policy.
            assert_eq!(
                schema_at(path)["x-kubernetes-preserve-unknown-fields"],
                true,
                "{path}"
            );
        }
    }

    #[test]
    fn enums_and_patterns_accept_everything_the_parser_accepts() {
        let with = |spec: Value| {
            let valid = validate(&schema_at("spec"), &spec, "spec");
            (valid, from_object("default", "p", Some(&spec)))
        };
        for action in ["ALLOW", "DENY"] {
            let (schema, parser) = with(json!({"action": action, "rules": [{}]}));
            assert!(schema.is_ok() && parser.is_ok(), "{action}");
        }
        for refused in ["AUDIT", "allow"] {
            let (schema, parser) = with(json!({"action": refused, "rules": [{}]}));
            assert!(schema.is_err() && parser.is_err(), "{refused}");
        }
        for principal in [
            "*",
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/*",
            "spiffe://td/ns/a/sa/web-*",
        ] {
            let (schema, parser) =
                with(json!({"rules": [{"from": [{"principals": [principal]}]}]}));
            assert!(
                schema.is_ok() && parser.is_ok(),
                "{principal}: {schema:?} {parser:?}"
            );
        }
        for principal in ["cluster.local/ns/a/sa/b", "*foo", "spiffe://td/*/sa/x"] {
            let (schema, parser) =
                with(json!({"rules": [{"from": [{"principals": [principal]}]}]}));
            assert!(schema.is_err() && parser.is_err(), "{principal}");
        }
        for namespace in ["default", "ambit-system", "a1"] {
            let (schema, parser) =
                with(json!({"rules": [{"from": [{"namespaces": [namespace]}]}]}));
            assert!(schema.is_ok() && parser.is_ok(), "{namespace}");
        }
        for namespace in ["Default", "-a", "a_b", &"a".repeat(64)] {
            let (schema, parser) =
                with(json!({"rules": [{"from": [{"namespaces": [namespace]}]}]}));
            assert!(schema.is_err() && parser.is_err(), "{namespace}");
        }
        for empty in [
            json!({"from": []}),
            json!({"to": []}),
            json!({"to": [{"ports": []}]}),
        ] {
            let (schema, parser) = with(json!({"rules": [empty]}));
            assert!(schema.is_err() && parser.is_err(), "{empty}");
        }
        // Only the agents can refuse these (no CEL before Kubernetes 1.25).
        for spec in [
            json!({"action": "DENY"}),
            json!({"rules": [{"to": [{"ports": [0]}]}]}),
            json!({"rules": [{"to": [{"ports": ["10-5"]}]}]}),
        ] {
            let (schema, parser) = with(spec.clone());
            assert!(schema.is_ok() && parser.is_err(), "{spec}");
        }
    }
}
