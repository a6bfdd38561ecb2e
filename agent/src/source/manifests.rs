//! Standalone mode's source: a directory of manifests (YAML, several documents per file, JSON,
//! `kind: List`), followed with inotify and a periodic rescan as a safety net.
//!
//! Rules (the standalone contract): files ending in `.yaml`, `.yml` or `.json` are read;
//! dotfiles, editor leftovers (`~`, `.swp`, `.tmp`) and subdirectories are ignored; deleting a file
//! deletes its objects; when two files define the same object, the one seen first wins and the
//! agent logs both names. Files are re-parsed only when their size or mtime changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use weir_policy::model::{ClusterState, Object, ObjectRef, parse_documents};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "reading the manifests directory {path}: {source}; create it or pass another --manifests"
    )]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the manifests directory {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// A file's parsed contents, kept until its size or mtime changes.
struct ParsedFile {
    stamp: (u64, Option<SystemTime>),
    objects: Vec<Object>,
    /// Order in which the file was first seen: earlier files win duplicates.
    first_seen: u64,
}

/// The directory and what was read from it.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ParsedFile>,
    next_seen: u64,
    /// Duplicates already reported, so a steady state does not repeat the error.
    reported_duplicates: BTreeSet<(ObjectRef, PathBuf)>,
}

/// Whether a directory entry is a manifest the agent reads.
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            next_seen: 0,
            reported_duplicates: BTreeSet::new(),
        }
    }

    /// Reads what changed and returns the whole cluster state the directory describes.
    pub fn scan(&mut self) -> Result<ClusterState, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SourceError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut present = BTreeSet::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || !is_manifest(&path) {
                continue;
            }
            present.insert(path.clone());
            let stamp = (meta.len(), meta.modified().ok());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let first_seen = match self.files.get(&path) {
                Some(f) => f.first_seen,
                None => {
                    self.next_seen += 1;
                    self.next_seen
                }
            };
            let objects = self.parse_file(&path);
            self.files.insert(
                path,
                ParsedFile {
                    stamp,
                    objects,
                    first_seen,
                },
            );
        }
        self.files.retain(|path, _| present.contains(path));
        Ok(self.merge())
    }

    fn parse_file(&self, path: &Path) -> Vec<Object> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read manifest; its objects are ignored until it is readable");
                return Vec::new();
            }
        };
        let origin = path.display().to_string();
        parse_documents(&text, &origin)
            .into_iter()
            .filter_map(|doc| match doc {
                Ok(object) => Some(object),
                Err(e) => {
                    tracing::error!(file = %origin, error = %e, "rejected a manifest document; the rest of the directory is still applied");
                    None
                }
            })
            .collect()
    }

    /// Builds the state, earlier-seen files first, so the first definition of an object wins.
    fn merge(&mut self) -> ClusterState {
        let mut files: Vec<(&PathBuf, &ParsedFile)> = self.files.iter().collect();
        files.sort_by_key(|(_, f)| f.first_seen);
        let mut owners: BTreeMap<ObjectRef, &PathBuf> = BTreeMap::new();
        let mut state = ClusterState::default();
        let mut duplicates = BTreeSet::new();
        for (path, file) in files {
            for object in &file.objects {
                let what = object.object_ref();
                if let Some(owner) = owners.get(&what) {
                    if *owner != path {
                        duplicates.insert((what, path.clone(), (*owner).clone()));
                    }
                    continue;
                }
                owners.insert(what, path);
                state.apply(object.clone());
            }
        }
        for (what, loser, winner) in duplicates {
            if self
                .reported_duplicates
                .insert((what.clone(), loser.clone()))
            {
                tracing::error!(object = %what, kept = %winner.display(), ignored = %loser.display(),
                    "two files define the same object; keeping the one seen first — delete or rename one of them");
            }
        }
        state
    }
}

/// Follows the directory, sending the whole state after every change (debounced) and on a
/// periodic rescan. Returns when the receiver is gone.
pub async fn follow(
    mut dir: ManifestDir,
    states: mpsc::Sender<ClusterState>,
    rescan_every: Duration,
) -> Result<(), SourceError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .map_err(|source| SourceError::Watch {
        path: dir.dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir.dir, RecursiveMode::NonRecursive)
        .map_err(|source| SourceError::Watch {
            path: dir.dir.clone(),
            source,
        })?;
    let mut last: Option<ClusterState> = None;
    loop {
        match dir.scan() {
            Ok(state) => {
                if last.as_ref() != Some(&state) {
                    last = Some(state.clone());
                    if states.send(state).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "scanning the manifests directory"),
        }
        tokio::select! {
            _ = rx.recv() => {
                // Let a burst of writes (an editor's save, a rename) settle, then read once.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(rescan_every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";

    #[test]
    fn only_manifests_are_read() {
        assert!(is_manifest(Path::new("/d/a.yaml")));
        assert!(is_manifest(Path::new("/d/a.json")));
        assert!(!is_manifest(Path::new("/d/.a.yaml")));
        assert!(!is_manifest(Path::new("/d/a.yaml~")));
        assert!(!is_manifest(Path::new("/d/a.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/a.tmp")));
    }

    #[test]
    fn duplicates_keep_the_first_and_deletion_removes() {
        let dir = std::env::temp_dir().join(format!("weir-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), NS).unwrap();
        let mut source = ManifestDir::new(&dir);
        assert!(source.scan().unwrap().namespaces.contains_key("x"));
        let with_label = format!("{NS}  labels:\n    team: b\n");
        std::fs::write(dir.join("b.yaml"), with_label).unwrap();
        let state = source.scan().unwrap();
        assert!(!state.namespaces["x"].metadata.labels.contains_key("team"));
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let state = source.scan().unwrap();
        assert_eq!(state.namespaces["x"].metadata.labels["team"], "b");
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert!(source.scan().unwrap().namespaces.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
