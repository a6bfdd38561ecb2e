//! Manifests read the way the agent's standalone source reads it: files ending in
//! `.yaml`, `.yml` or `.json`, not dotfiles or editor leftovers, no subdirectories; when two
//! files define the same object the first by file name wins (the agent keeps the first it saw). Unlike the agent, which keeps
//! enforcing everything else, the CLI stops at a document it cannot read: an answer that
//! silently left an object out would not be the one enforced.

use std::path::{Path, PathBuf};

use weir_policy::model::{ClusterState, ObjectRef, parse_documents};

use crate::error::CliError;

/// Whether the agent reads `path` as a manifest.
fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && !name.ends_with('~')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// The manifest files of `dir`, by name.
fn files_of(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let read_err = |source| CliError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        if path.is_file() && is_manifest(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The cluster state `paths` describe (directories, as the agent reads them, or single files,
/// in the order given), and warnings for people (duplicate objects).
pub fn read(paths: &[PathBuf]) -> Result<(ClusterState, Vec<String>), CliError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(files_of(path)?);
        } else {
            files.push(path.clone());
        }
    }
    let mut state = ClusterState::default();
    let mut seen: std::collections::BTreeMap<ObjectRef, PathBuf> = Default::default();
    let mut warnings = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| CliError::ReadFile {
            path: path.clone(),
            source,
        })?;
        for object in parse_documents(&text, &path.display().to_string()) {
            let object = object?;
            let what = object.object_ref();
            if let Some(first) = seen.get(&what) {
                warnings.push(format!(
                    "{what} is defined in {} and again in {}; this answer uses the first (by file name); keep one",
                    first.display(),
                    path.display()
                ));
                continue;
            }
            seen.insert(what, path.clone());
            state.apply(object);
        }
    }
    Ok((state, warnings))
}
