//! Policy files and directories into a [`PolicySet`], all or nothing.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{
    LoadErrors, PolicyError, PolicySet, Settings,
    parse::{document_position, parse_indexed},
};

/// The text of every policy file under `paths`, in load order.
///
/// A directory contributes its `*.yaml` and `*.yml` files, sorted by name,
/// not recursing and skipping names that start with '.' (editor lock files;
/// the `..data` entries of a Kubernetes ConfigMap mount). A file named
/// explicitly is read whatever its extension.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, LoadErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match policy_files(path) {
            Ok(found) => files.extend(found),
            Err(e) => errors.push(e),
        }
    }
    let mut sources = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push((file, text)),
            Err(e) => errors.push(PolicyError::new(&file, None, format!("cannot read: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(LoadErrors(errors))
    }
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io_error = |e: std::io::Error| PolicyError::new(path, None, format!("cannot read: {e}"));
    if !std::fs::metadata(path).map_err(io_error)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_policy =
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"));
        // `metadata` follows symlinks, as ConfigMap mounts need.
        if is_policy && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and validates every source; any error rejects the whole set.
pub fn build(sources: &[(PathBuf, String)], settings: Settings) -> Result<PolicySet, LoadErrors> {
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    // (namespace, name) -> (source index, document index) of its first
    // definition, to point at both copies of a duplicate.
    let mut first_seen: HashMap<(String, String), (usize, usize)> = HashMap::new();
    for (source, (file, text)) in sources.iter().enumerate() {
        let parsed = match parse_indexed(text, file) {
            Ok(parsed) => parsed,
            Err(e) => {
                errors.extend(e);
                continue;
            }
        };
        for (document, policy) in parsed {
            let key = (policy.namespace.clone(), policy.name.clone());
            if let Some(&(first_source, first_document)) = first_seen.get(&key) {
                let (first_file, first_text) = &sources[first_source];
                let first_at = match document_position(first_text, first_document) {
                    Some((line, column)) => format!("{}:{line}:{column}", first_file.display()),
                    None => first_file.display().to_string(),
                };
                errors.push(PolicyError::new(
                    file,
                    document_position(text, document),
                    format!("policy {} is already defined at {first_at}", policy.id()),
                ));
                continue;
            }
            first_seen.insert(key, (source, document));
            policies.push(policy);
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    let files = sources.iter().map(|(file, _)| file.clone()).collect();
    // Duplicates were refused above, with positions.
    PolicySet::new(policies, settings)
        .map(|set| set.with_files(files))
        .map_err(|e| LoadErrors(vec![PolicyError::new("<policies>", None, e.to_string())]))
}

/// [`read_sources`] then [`build`].
pub fn load_paths(paths: &[PathBuf], settings: Settings) -> Result<PolicySet, LoadErrors> {
    build(&read_sources(paths)?, settings)
}
