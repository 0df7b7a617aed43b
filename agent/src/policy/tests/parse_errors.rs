//! Every rejected document names file, line and column, and why.

use std::path::{Path, PathBuf};

use crate::policy::{Action, PolicyError, Settings, build, parse_str};

fn err(yaml: &str) -> PolicyError {
    match parse_str(yaml, Path::new("policies/allow.yaml")) {
        Ok(p) => panic!("accepted: {p:?}\n{yaml}"),
        Err(mut e) => {
            assert_eq!(e.0.len(), 1, "{e}");
            e.0.remove(0)
        }
    }
}

const HEAD: &str = "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                    metadata: { name: p, namespace: default }\n";

#[test]
fn unknown_field_points_at_the_key() {
    let yaml = format!("{HEAD}spec:\n  acton: ALLOW\n");
    let e = err(&yaml);
    assert_eq!(e.position, Some((5, 3)), "{e}");
    assert!(e.reason.contains("unknown field `acton`"), "{e}");
    assert!(
        e.reason
            .contains("expected one of `selector`, `action`, `rules`"),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("policies/allow.yaml:5:3: spec: unknown field `acton`"),
        "{e}"
    );
}

#[test]
fn leaf_values_are_reported_where_written() {
    // (spec body, line, column, text the reason must contain)
    let cases = [
        ("  action: MAYBE\n", 5, 11, "unknown action \"MAYBE\""),
        ("  action: AUDIT\n", 5, 11, "not supported"),
        (
            "  rules:\n    - to: [{ ports: [80, 70000] }]\n",
            6,
            26,
            "out of range",
        ),
        (
            "  rules:\n    - to: [{ ports: [\"90-80\"] }]\n",
            6,
            22,
            "empty range",
        ),
        (
            "  rules:\n    - to: [{ ports: [0] }]\n",
            6,
            22,
            "out of range",
        ),
        (
            "  rules:\n    - to: [{ ports: [80.5] }]\n",
            6,
            22,
            "port number",
        ),
        (
            "  rules:\n    - from:\n        - principals:\n            - spiffe://td/ns/a/sa/b\n            - spiffe://td/*/sa/b\n",
            9,
            15,
            "only allowed at the end",
        ),
        (
            "  rules:\n    - from: [{ principals: [\"spiffe://TD/x\"] }]\n",
            6,
            29,
            "not a canonical SPIFFE ID",
        ),
        (
            "  rules:\n    - from: [{ namespaces: [Default] }]\n",
            6,
            29,
            "not a valid Kubernetes namespace",
        ),
        (
            "  selector: { matchLabels: { app: \"*\" } }\n",
            5,
            13,
            "wildcards are not supported",
        ),
    ];
    for (spec, line, column, reason) in cases {
        let e = err(&format!("{HEAD}spec:\n{spec}"));
        assert_eq!(e.position, Some((line, column)), "{spec}: {e}");
        assert!(e.reason.contains(reason), "{spec}: {e}");
    }
}

#[test]
fn structural_errors_point_at_the_mapping() {
    let cases = [
        ("  action: DENY\n", 5, 3, "DENY policy without rules"),
        (
            "  action: DENY\n  rules: []\n",
            5,
            3,
            "DENY policy without rules",
        ),
        (
            "  rules:\n    - from: []\n",
            6,
            7,
            "`from` must not be empty",
        ),
        (
            "  rules:\n    - {}\n    - to: []\n",
            7,
            7,
            "`to` must not be empty",
        ),
        (
            "  rules:\n    - from:\n        - {}\n",
            7,
            11,
            "needs `principals` or `namespaces`",
        ),
        (
            "  rules:\n    - from: [{ principals: [] }]\n",
            6,
            14,
            "`principals` must not be empty",
        ),
        (
            "  rules:\n    - to: [{ ports: [] }]\n",
            6,
            12,
            "`ports` must not be empty",
        ),
        ("  rules:\n    - to: [{}]\n", 6, 12, "missing field `ports`"),
        (
            "  rules:\n    - from: [{ ipBlocks: [10.0.0.0/8] }]\n",
            6,
            16,
            "unknown field `ipBlocks`",
        ),
    ];
    for (spec, line, column, reason) in cases {
        let e = err(&format!("{HEAD}spec:\n{spec}"));
        assert_eq!(e.position, Some((line, column)), "{spec}: {e}");
        assert!(e.reason.contains(reason), "{spec}: {e}");
    }
}

#[test]
fn document_level_errors() {
    let cases = [
        (
            "apiVersion: security.istio.io/v1\n",
            1,
            13,
            "unsupported apiVersion",
        ),
        ("kind: Pod\n", 2, 7, "unsupported kind"),
        (
            "metadata: { name: p }\n",
            3,
            11,
            "missing field `namespace`",
        ),
        (
            "metadata: { name: P_Q, namespace: default }\n",
            3,
            19,
            "not a valid Kubernetes object name",
        ),
        ("spec: 7\n", 4, 7, "expected a mapping"),
    ];
    let lines = [
        "apiVersion: ambit.dev/v1alpha1\n",
        "kind: AuthorizationPolicy\n",
        "metadata: { name: p, namespace: default }\n",
        "spec: {}\n",
    ];
    for (replacement, line, column, reason) in cases {
        let mut doc: Vec<&str> = lines.to_vec();
        doc[line - 1] = replacement;
        let e = err(&doc.concat());
        assert_eq!(e.position, Some((line, column)), "{replacement}: {e}");
        assert!(e.reason.contains(reason), "{replacement}: {e}");
    }
    let e = err("kind: AuthorizationPolicy\nmetadata: { name: p, namespace: d }\nspec: {}\n");
    assert!(e.reason.contains("missing field `apiVersion`"), "{e}");
    assert_eq!(e.line(), Some(1), "{e}");
}

#[test]
fn positions_count_from_the_start_of_the_file() {
    let good = format!("{HEAD}spec:\n  rules: [{{}}]\n");
    let yaml = format!(
        "# comment\n---\n{good}---\n{good}---\n{HEAD}spec:\n  rules: [{{ to: [{{ ports: [x] }}] }}]\n"
    );
    let e = err(&yaml);
    // Lines 1-2 comment and `---`, 3-7 and 9-13 the good documents, 14
    // `---`, 15-18 the bad one's head: `rules:` is line 19.
    assert_eq!(e.position, Some((19, 28)), "{e}");
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n    - to: [{{ ports: [80 }}]\n"
    ));
    assert!(e.position.is_some(), "{e}");
    assert_eq!(e.line(), Some(6), "{e}");
    let e = err(&format!(
        "{HEAD}spec:\n  rules: [{{}}]\n bad indentation: x\n"
    ));
    assert!(e.line().is_some(), "{e}");
}

#[test]
fn a_syntax_error_wins_over_what_the_cut_document_lacks() {
    // The events before the error form `{a: ...}`, which alone would read
    // as "unknown field `a`".
    let e = err("a: [\n");
    assert!(!e.reason.contains("unknown field"), "{e}");
    assert_eq!(e.line(), Some(2), "{e}");
    let e = err(&format!(
        "{HEAD}spec: {{}}\n---\n{HEAD}spec: {{ rules: [ }}\n"
    ));
    assert_eq!(e.line(), Some(9), "{e}");
}

#[test]
fn every_invalid_document_of_a_file_is_reported() {
    let yaml = format!(
        "{HEAD}spec: {{ acton: ALLOW }}\n---\n{HEAD}spec: {{}}\n---\n{HEAD}spec: {{ action: deny }}\n"
    );
    let errors = parse_str(&yaml, Path::new("f.yaml"))
        .expect_err("invalid")
        .0;
    let lines: Vec<_> = errors.iter().map(|e| e.line()).collect();
    assert_eq!(lines, [Some(4), Some(14)], "{errors:?}");
}

#[test]
fn selectors_are_unambiguous_and_read_like_kubernetes_labels() {
    let e = err(&format!(
        "{HEAD}spec:\n  selector:\n    matchLabels: {{ app: a, app: b }}\n"
    ));
    assert_eq!(e.position, Some((6, 18)), "{e}");
    assert!(e.reason.contains("label `app` is given twice"), "{e}");
    // Unquoted numbers and booleans are label values like any other.
    let yaml =
        format!("{HEAD}spec:\n  selector:\n    matchLabels: {{ version: 2, canary: true }}\n");
    let parsed = parse_str(&yaml, Path::new("x.yaml")).expect("valid");
    let selector: Vec<_> = parsed[0]
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert_eq!(selector, ["canary=true", "version=2"]);
}

#[test]
fn null_values_read_as_omitted() {
    // `spec:` and `selector:` left empty, as editors and templates leave
    // them: the same as `{}` (an ALLOW policy that allows nothing).
    let parsed = parse_str(&format!("{HEAD}spec:\n"), Path::new("x.yaml"));
    let parsed = parsed.expect("valid");
    assert_eq!(parsed[0].action, Action::Allow);
    assert!(parsed[0].rules.is_empty());
    let parsed = parse_str(
        &format!("{HEAD}spec:\n  selector:\n  rules:\n"),
        Path::new("x.yaml"),
    );
    assert!(parsed.expect("valid")[0].selector.is_empty());
}

#[test]
fn empty_documents_are_skipped() {
    let file = Path::new("x.yaml");
    assert_eq!(parse_str("", file).map(|p| p.len()), Ok(0));
    assert_eq!(parse_str("# nothing here\n", file).map(|p| p.len()), Ok(0));
    assert_eq!(parse_str("---\n---\n", file).map(|p| p.len()), Ok(0));
    let good = format!("---\n{HEAD}spec: {{ action: DENY, rules: [{{}}] }}\n---\n# trailing\n");
    let parsed = parse_str(&good, file).expect("valid");
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].action, Action::Deny);
    assert_eq!(parsed[0].origin.as_deref(), Some(file));
}

#[test]
fn metadata_labels_and_annotations_are_accepted() {
    let yaml = "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                metadata:\n  name: p\n  namespace: default\n  labels: { team: a }\n  \
                annotations: { note: b }\nspec: {}\n";
    let parsed = parse_str(yaml, Path::new("x.yaml")).expect("valid");
    assert_eq!(parsed[0].id(), "default/p");
    assert_eq!(parsed[0].action, Action::Allow, "Istio's default action");
    assert!(parsed[0].rules.is_empty());
}

#[test]
fn duplicates_across_files_name_both_places() {
    let a = format!("{HEAD}spec: {{}}\n");
    let b = format!("# other\n---\n{HEAD}spec: {{ rules: [{{}}] }}\n");
    let sources = vec![(PathBuf::from("a.yaml"), a), (PathBuf::from("b.yaml"), b)];
    let errors = build(&sources, Settings::default())
        .expect_err("duplicate")
        .0;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "b.yaml:3:1: policy default/p is already defined at a.yaml:1:1"
    );
}

#[test]
fn every_bad_file_is_reported() {
    let good = format!("{HEAD}spec: {{}}\n");
    let sources = vec![
        (PathBuf::from("1.yaml"), "kind: x\n".to_string()),
        (PathBuf::from("2.yaml"), good),
        (
            PathBuf::from("3.yaml"),
            format!("{HEAD}spec: {{ action: deny }}\n"),
        ),
    ];
    let errors = build(&sources, Settings::default()).expect_err("invalid").0;
    let files: Vec<_> = errors
        .iter()
        .map(|e| e.file.display().to_string())
        .collect();
    assert_eq!(files, ["1.yaml", "3.yaml"]);
}
