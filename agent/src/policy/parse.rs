//! One policy file: a YAML stream of `AuthorizationPolicy` documents.

use std::{fmt, path::Path, sync::Arc};

use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, Visitor},
};

use super::{LoadErrors, PolicyError, document::Document, model::Policy};

/// Parses every document of `text`; `file` names it in errors and becomes
/// each policy's origin. Empty documents (a leading `---`, a file of
/// comments) are skipped. Reports every invalid document, or only the
/// YAML syntax error if there is one (serde_yaml cannot resynchronise
/// after it).
pub fn parse_str(text: &str, file: &Path) -> Result<Vec<Policy>, LoadErrors> {
    match parse_indexed(text, file) {
        Ok(policies) => Ok(policies.into_iter().map(|(_, policy)| policy).collect()),
        Err(errors) => Err(LoadErrors(errors)),
    }
}

/// [`parse_str`], with the index of the document each policy came from
/// (for [`document_position`]).
pub(super) fn parse_indexed(
    text: &str,
    file: &Path,
) -> Result<Vec<(usize, Policy)>, Vec<PolicyError>> {
    let origin: Arc<Path> = Arc::from(file);
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Option::<Document>::deserialize(document) {
            Ok(Some(document)) => {
                let mut policy = document.into_policy();
                policy.origin = Some(Arc::clone(&origin));
                policies.push((index, policy));
            }
            Ok(None) => {}
            Err(e) => {
                // A document cut short by a syntax error fails on whatever
                // its events happen to lack ("missing field"), which would
                // mislead; the syntax error is the one to show. Checked
                // once, on the first error only, so valid files parse once.
                if errors.is_empty()
                    && let Some(syntax) = syntax_error(text)
                {
                    errors.push(PolicyError::from_yaml(file, &syntax));
                    return Err(errors);
                }
                errors.push(PolicyError::from_yaml(file, &e));
            }
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

/// The first YAML syntax error of the stream, if any.
fn syntax_error(text: &str) -> Option<serde_yaml::Error> {
    serde_yaml::Deserializer::from_str(text)
        .find_map(|document| IgnoredAny::deserialize(document).err())
}

/// Where the `index`-th document (counting empty ones) of `text` starts,
/// 1-based. serde_yaml reports positions only on errors, so this reads the
/// document again with a type that fails on its first value; used for
/// errors found after parsing, such as a duplicate policy name.
pub fn document_position(text: &str, index: usize) -> Option<(usize, usize)> {
    struct Probe;
    impl<'de> Deserialize<'de> for Probe {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct ProbeVisitor;
            impl Visitor<'_> for ProbeVisitor {
                type Value = Probe;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    // Every visit fails with "expected nothing": the error
                    // is the point, it carries the position.
                    f.write_str("nothing")
                }
            }
            deserializer.deserialize_any(ProbeVisitor)
        }
    }
    let document = serde_yaml::Deserializer::from_str(text).nth(index)?;
    let location = Probe::deserialize(document).err()?.location()?;
    Some((location.line(), location.column()))
}
