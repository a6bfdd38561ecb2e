//! Standalone mode's source: a directory of manifests (YAML, several documents per file, JSON,
//! `kind: List`), followed with inotify and a periodic rescan as a safety net.
//!
//! Rules (the standalone contract): files ending in `.yaml`, `.yml` or `.json` are read;
//! dotfiles, editor leftovers (`~`, `.swp`, `.tmp`) and subdirectories are ignored; deleting a file
//! deletes its objects; when two files define the same object, the one seen first wins and the
//! agent logs both names.
//!
//! The work follows changes, not the size of the directory:
//! - a scan stats every file and reads only those whose stamp (device, inode, size, mtime,
//!   ctime) changed or that inotify named since the last scan;
//! - a file read with the same bytes as last time (a `touch`, a rewrite of the same content) is
//!   not parsed again;
//! - the state is kept up to date object by object: a file whose objects changed (or that came
//!   or went) updates only the objects it defines or defined, and only the objects whose
//!   definition in force really changed are handed on ([`StateDelta`]), so that nothing after
//!   the source compares or copies the whole state.
//!
//! inotify names the files it saw written because a stamp alone can miss a rewrite: a file
//! rewritten with the same size within the filesystem's timestamp granularity keeps its stamp.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    hash::{BuildHasher as _, RandomState},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use weir_policy::model::{
    ClusterState, MAX_FILE_BYTES, Object, ObjectRef, StateDelta, parse_documents,
};

use super::{ObjectCounts, SourceStats, SourceUpdate};

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

/// What tells a file's versions apart without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A file's parsed contents, kept until its bytes change.
struct ParsedFile {
    stamp: Stamp,
    /// Hash of the bytes `objects` were parsed from (`None`: the file could not be read).
    content: Option<u64>,
    /// The stable hash of the bytes last read, for the directory's [`fingerprint`].
    fingerprint: Option<u64>,
    objects: Vec<Object>,
    /// Where each object `objects` defines appears first (a file that defines an object twice
    /// is read as its first definition).
    first: BTreeMap<ObjectRef, usize>,
    /// Order in which the file was first seen: earlier files win duplicates.
    first_seen: u64,
}

/// Where each object first appears in `objects`.
fn first_definitions(objects: &[Object]) -> BTreeMap<ObjectRef, usize> {
    let mut first = BTreeMap::new();
    for (i, object) in objects.iter().enumerate() {
        first.entry(object.object_ref()).or_insert(i);
    }
    first
}

/// The objects of a file read again, each replaced by its previous definition in the file
/// when equal to it: an object that did not change stays one allocation, shared with the state
/// and whoever holds what the state handed on.
fn reuse_unchanged(
    previous: &[Object],
    previous_first: &BTreeMap<ObjectRef, usize>,
    objects: Vec<Object>,
) -> Vec<Object> {
    objects
        .into_iter()
        .map(|object| {
            match previous_first
                .get(&object.object_ref())
                .map(|&i| &previous[i])
            {
                Some(before) if *before == object => before.clone(),
                _ => object,
            }
        })
        .collect()
}

/// What a scan found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Files whose bytes were read.
    pub read: u64,
    /// Files parsed (new, or their bytes changed).
    pub parsed: u64,
    /// Whether the objects the directory describes changed (a file's objects, a file added or
    /// removed).
    pub changed: bool,
}

/// The directory and what was read from it.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ParsedFile>,
    next_seen: u64,
    /// The files that define each object, by the order they were first seen (`first_seen`):
    /// the first one's definition is in `state`.
    definers: BTreeMap<ObjectRef, Definers>,
    /// Each file by the order it was first seen.
    seen: BTreeMap<u64, PathBuf>,
    /// The state the files describe, updated per object as files change (boxed: it is
    /// large, and the directory is held by value until it is followed).
    state: Box<ClusterState>,
    /// What changed in `state` since the last [`Self::take_delta`] (or [`Self::scan`]).
    pending: StateDelta,
    /// Duplicates already reported, so a steady state does not repeat the error.
    reported_duplicates: BTreeSet<(ObjectRef, PathBuf)>,
    /// File names inotify reported since the last scan: read even when their stamp is the same.
    dirty: BTreeSet<OsString>,
    /// Every file is read at the next scan (inotify lost events, or the watch just started).
    all_dirty: bool,
    /// Keyed per process, so file contents cannot be crafted to collide.
    hasher: RandomState,
    /// Where scans and parses are counted.
    stats: Arc<SourceStats>,
}

/// Whether a directory entry is a manifest the agent reads.
pub fn is_manifest(path: &Path) -> bool {
    weir_policy::model::is_manifest_file(path)
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            next_seen: 0,
            definers: BTreeMap::new(),
            seen: BTreeMap::new(),
            state: Box::default(),
            pending: StateDelta::default(),
            reported_duplicates: BTreeSet::new(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            hasher: RandomState::new(),
            stats: Arc::default(),
        }
    }

    /// Counts scans and parses in `stats` (the health endpoint's).
    pub fn with_stats(mut self, stats: Arc<SourceStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Reads what changed and returns the whole cluster state the directory describes (the
    /// changes since the last delta taken are then part of what it returns).
    pub fn scan(&mut self) -> Result<ClusterState, SourceError> {
        self.rescan()?;
        self.pending = StateDelta::default();
        Ok(self.state())
    }

    /// The objects whose definition in force changed since the last delta taken or the last
    /// [`Self::scan`]: added, changed or removed, each named once with what it is now.
    pub fn take_delta(&mut self) -> StateDelta {
        std::mem::take(&mut self.pending)
    }

    /// The next scan reads this file even if its stamp is unchanged.
    pub fn mark_dirty(&mut self, path: &Path) {
        if let Some(name) = path.file_name() {
            self.dirty.insert(name.to_owned());
        }
    }

    /// The next scan reads every file (their bytes are compared, not parsed again if equal).
    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    /// Stats every file and reads the ones that may have changed, and updates the state with
    /// the objects of the files that changed ([`Self::state`] hands it out).
    pub fn rescan(&mut self) -> Result<ScanReport, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SourceError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let dirty = std::mem::take(&mut self.dirty);
        let all_dirty = std::mem::take(&mut self.all_dirty);
        let mut report = ScanReport::default();
        let mut present = BTreeSet::new();
        // Objects that a file now defines or no longer defines: their winner is decided again.
        let mut touched = BTreeSet::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            present.insert(path.clone());
            let stamp = Stamp::of(&meta);
            let known = self.files.get(&path);
            let named = all_dirty || dirty.contains(&entry.file_name());
            if known.is_some_and(|f| f.stamp == stamp) && !named {
                continue;
            }
            report.read += 1;
            let read = read_file(&path, meta.len());
            let hash = read.as_ref().ok().map(|text| self.hasher.hash_one(text));
            let fingerprint = read.as_ref().ok().map(|text| file_fingerprint(text));
            if let Some(file) = self.files.get_mut(&path)
                && file.content.is_some()
                && file.content == hash
            {
                file.stamp = stamp;
                file.fingerprint = fingerprint;
                continue;
            }
            report.parsed += 1;
            let parsed = match read {
                Ok(text) => parse_file(&path, &text),
                Err(reason) => FileContents {
                    objects: Vec::new(),
                    whole: Some(reason),
                },
            };
            match self.files.get_mut(&path) {
                // A file that cannot be read whole keeps the objects it last held: an edit
                // that breaks the YAML must not take the file's policies away and open what
                // they isolate, just as a failed `kubectl apply` leaves the cluster as it was.
                Some(file) if parsed.whole.is_some() => {
                    tracing::error!(file = %path.display(), reason = parsed.whole.as_deref().unwrap_or_default(), kept = file.objects.len(),
                        "manifest cannot be read whole; the objects it held before stay in force until it is fixed or deleted");
                    file.stamp = stamp;
                    file.content = hash;
                    file.fingerprint = fingerprint;
                }
                Some(file) => {
                    file.stamp = stamp;
                    file.content = hash;
                    file.fingerprint = fingerprint;
                    let objects = reuse_unchanged(&file.objects, &file.first, parsed.objects);
                    if file.objects != objects {
                        report.changed = true;
                        let first = first_definitions(&objects);
                        unregister(&mut self.definers, &file.first, file.first_seen);
                        register(&mut self.definers, &first, file.first_seen);
                        touched.extend(file.first.keys().cloned());
                        touched.extend(first.keys().cloned());
                        file.objects = objects;
                        file.first = first;
                    }
                }
                None => {
                    if let Some(reason) = &parsed.whole {
                        tracing::error!(file = %path.display(), %reason, applied = parsed.objects.len(),
                            "manifest cannot be read whole and was never read before; only the objects in front of the error are applied until it is fixed");
                    }
                    report.changed = true;
                    self.next_seen += 1;
                    let first = first_definitions(&parsed.objects);
                    register(&mut self.definers, &first, self.next_seen);
                    self.seen.insert(self.next_seen, path.clone());
                    touched.extend(first.keys().cloned());
                    self.files.insert(
                        path,
                        ParsedFile {
                            stamp,
                            content: hash,
                            fingerprint,
                            objects: parsed.objects,
                            first,
                            first_seen: self.next_seen,
                        },
                    );
                }
            }
        }
        let before = self.files.len();
        let (definers, seen) = (&mut self.definers, &mut self.seen);
        self.files.retain(|path, file| {
            let keep = present.contains(path);
            if !keep {
                unregister(definers, &file.first, file.first_seen);
                seen.remove(&file.first_seen);
                touched.extend(file.first.keys().cloned());
            }
            keep
        });
        report.changed |= self.files.len() != before;
        self.settle(touched);
        self.stats.manifest_scans.fetch_add(1, Ordering::Relaxed);
        self.stats
            .manifest_files_parsed
            .fetch_add(report.parsed, Ordering::Relaxed);
        Ok(report)
    }

    /// The fingerprint of the files as last read (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        combine_fingerprints(
            self.files
                .iter()
                .filter_map(|(path, file)| Some((path.file_name()?, file.fingerprint))),
        )
    }

    /// The state the files describe (as of the last scan).
    pub fn state(&mut self) -> ClusterState {
        (*self.state).clone()
    }

    /// Puts in the state, for each of `objects`, the definition of the earliest-seen file that
    /// defines it (or takes it out when none does), records in the pending delta those whose
    /// definition changed, and reports duplicates not reported yet.
    fn settle(&mut self, objects: BTreeSet<ObjectRef>) {
        for what in objects {
            let before = self.state.object(&what);
            self.settle_one(&what);
            let now = self.state.object(&what);
            if now != before {
                self.pending.set(what, now);
            }
        }
    }

    fn settle_one(&mut self, what: &ObjectRef) {
        let Some(definers) = self.definers.get(what) else {
            self.state.remove(what);
            return;
        };
        let mut definers = definers.0.iter().map(|seen| &self.seen[seen]);
        let winner = definers
            .next()
            .expect("an object's definers are never empty");
        let file = &self.files[winner];
        self.state.apply(file.objects[file.first[what]].clone());
        for loser in definers {
            if self
                .reported_duplicates
                .insert((what.clone(), loser.clone()))
            {
                tracing::error!(object = %what, kept = %winner.display(), ignored = %loser.display(),
                        "two files define the same object; keeping the one seen first — delete or rename one of them");
            }
        }
    }
}

/// The files that define one object, as the order each was first seen, ascending. Almost
/// always one file: a sorted vector of those numbers (the paths are in [`ManifestDir`]'s
/// `seen`, once per file) holds it in a few bytes, where a map of paths per object would
/// hold a tree node and a copy of the path for every object of the directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Definers(Vec<u64>);

impl Definers {
    fn insert(&mut self, seen: u64) {
        if let Err(at) = self.0.binary_search(&seen) {
            self.0.insert(at, seen);
        }
    }

    fn remove(&mut self, seen: u64) {
        if let Ok(at) = self.0.binary_search(&seen) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Records that the file first seen at `seen` defines `objects`.
fn register(
    definers: &mut BTreeMap<ObjectRef, Definers>,
    objects: &BTreeMap<ObjectRef, usize>,
    seen: u64,
) {
    for what in objects.keys() {
        definers.entry(what.clone()).or_default().insert(seen);
    }
}

/// Records that the file first seen at `seen` no longer defines `objects`.
fn unregister(
    definers: &mut BTreeMap<ObjectRef, Definers>,
    objects: &BTreeMap<ObjectRef, usize>,
    seen: u64,
) {
    for what in objects.keys() {
        if let Some(files) = definers.get_mut(what) {
            files.remove(seen);
            if files.is_empty() {
                definers.remove(what);
            }
        }
    }
}

/// The fingerprint of a manifests directory as it is now: a stable hash of the names and bytes
/// of the files the agent reads (the others cannot change what it enforces). The agent reports
/// the fingerprint of the files behind the state it last applied (`weir status`), so whoever
/// writes the directory can wait until what they wrote is enforced.
pub fn fingerprint(dir: &Path) -> std::io::Result<String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !is_manifest(&path) || !entry.metadata()?.is_file() {
            continue;
        }
        let bytes = read_file(&path, entry.metadata()?.len()).ok();
        files.insert(entry.file_name(), bytes.map(|text| file_fingerprint(&text)));
    }
    Ok(combine_fingerprints(
        files.iter().map(|(name, fp)| (name.as_os_str(), *fp)),
    ))
}

fn file_fingerprint(text: &str) -> u64 {
    weir_proto::naming::fnv1a64(text.bytes())
}

/// Files in name order, each with the hash of its bytes (`None`: it could not be read).
fn combine_fingerprints<'a>(
    files: impl Iterator<Item = (&'a std::ffi::OsStr, Option<u64>)>,
) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let mut parts = Vec::new();
    for (name, fingerprint) in files {
        parts.extend_from_slice(name.as_bytes());
        parts.push(0);
        match fingerprint {
            Some(fp) => parts.extend_from_slice(&fp.to_le_bytes()),
            None => parts.extend_from_slice(b"unreadable"),
        }
        parts.push(0);
    }
    format!("{:016x}", weir_proto::naming::fnv1a64(parts.into_iter()))
}

/// The objects read from one file, and why the file as a whole could not be read, if it could
/// not (a read error, a size over the limit, a YAML syntax error: after one, what the rest of the
/// file holds is unknown).
struct FileContents {
    objects: Vec<Object>,
    whole: Option<String>,
}

/// The file's text; a file over the size limit is refused from its length, without reading it.
fn read_file(path: &Path, len: u64) -> Result<String, String> {
    if len > MAX_FILE_BYTES as u64 {
        return Err(format!(
            "{len} bytes, more than the {MAX_FILE_BYTES} a manifest file may have; split it into several files"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

fn parse_file(path: &Path, text: &str) -> FileContents {
    let origin = path.display().to_string();
    let mut contents = FileContents {
        objects: Vec::new(),
        whole: None,
    };
    for document in parse_documents(text, &origin) {
        match document {
            Ok(object) => contents.objects.push(object),
            Err(e) if e.is_whole_file() => contents.whole = Some(e.to_string()),
            Err(e) => {
                tracing::error!(file = %origin, error = %e, "rejected a manifest document; the rest of the directory is still applied");
            }
        }
    }
    contents
}

/// What the watcher tells the follow loop.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// These manifests were written, created, renamed or removed.
    Files(Vec<PathBuf>),
    /// inotify lost events (queue overflow): every file must be compared.
    Lost,
}

impl Change {
    /// What an inotify event means for the manifests, if anything. Opening a file or the
    /// directory changes nothing (and every scan opens the directory, every read a file: were
    /// those events followed, each scan would cause the next); nor does anything happening to
    /// files the agent does not read (an editor's swap file, a dotfile written before its
    /// rename into place).
    fn of(event: notify::Result<notify::Event>) -> Option<Self> {
        use notify::event::{AccessKind, AccessMode, EventKind};
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            _ => return Some(Change::Lost),
        };
        if let EventKind::Access(kind) = event.kind
            && kind != AccessKind::Close(AccessMode::Write)
        {
            return None;
        }
        let paths: Vec<PathBuf> = event.paths.into_iter().filter(|p| is_manifest(p)).collect();
        (!paths.is_empty()).then_some(Change::Files(paths))
    }
}

impl ManifestDir {
    fn note(&mut self, change: Change) {
        match change {
            Change::Files(paths) => paths.iter().for_each(|p| self.mark_dirty(p)),
            Change::Lost => self.mark_all_dirty(),
        }
    }
}

/// Follows the directory, sending what changed after every change (debounced) and after a
/// periodic rescan that found one. A change of bytes that changes no object (a comment, a
/// reformatted file) sends an empty delta under its new fingerprint. `dir` has been scanned
/// once and its state handed on by the caller. Returns when the receiver is gone.
pub async fn follow(
    mut dir: ManifestDir,
    updates: mpsc::Sender<SourceUpdate>,
    rescan_every: Duration,
) -> Result<(), SourceError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Some(change) = Change::of(event) {
            let _ = tx.send(change);
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
    // What was written between the caller's scan and the watch's start has no event.
    dir.mark_all_dirty();
    let mut sent_fingerprint = dir.fingerprint();
    loop {
        match dir.rescan() {
            Ok(report) => {
                let fingerprint = dir.fingerprint();
                if report.changed || fingerprint != sent_fingerprint {
                    sent_fingerprint = fingerprint.clone();
                    let update = SourceUpdate {
                        delta: dir.take_delta(),
                        fingerprint,
                        counts: ObjectCounts::of(&dir.state),
                    };
                    if updates.send(update).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "scanning the manifests directory"),
        }
        tokio::select! {
            Some(change) = rx.recv() => {
                dir.note(change);
                // Let a burst of writes (an editor's save, a rename) settle, then read once.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while let Ok(change) = rx.try_recv() {
                    dir.note(change);
                }
            }
            _ = tokio::time::sleep(rescan_every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, fs::File, time::SystemTime};

    use super::*;
    use weir_policy::model::ObjectKey;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";

    /// A directory of its own under /tmp, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weir-manifests-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `n` NetworkPolicies in one `kind: List` whose first policy admits `port`.
    fn policies(n: usize, port: u16) -> String {
        let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..n {
            let port = if i == 0 { port } else { 80 };
            let _ = write!(
                y,
                "- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {{name: p{i}, namespace: x}}\n  spec:\n    podSelector: {{matchLabels: {{app: a{i}}}}}\n    ingress: [{{ports: [{{port: {port}}}]}}]\n"
            );
        }
        y
    }

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
        let tmp = TempDir::new("dup");
        let dir = &tmp.0;
        std::fs::write(dir.join("a.yaml"), NS).unwrap();
        let mut source = ManifestDir::new(dir);
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
    }

    /// One allocation per object: the state handed out, the delta and the file's parsed
    /// objects share it, and a rewrite of one object leaves the others shared.
    #[test]
    fn the_state_and_the_files_share_each_object() {
        let tmp = TempDir::new("shared");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(3, 80)).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        let state = source.scan().unwrap();
        let file = &source.files[&path];
        for object in &file.objects {
            let Object::NetworkPolicy(parsed) = object else {
                panic!("a policy");
            };
            let key = ObjectKey::new("x", parsed.metadata.name.clone());
            assert!(Arc::ptr_eq(parsed, &state.policies[&key]));
            assert!(Arc::ptr_eq(parsed, &source.state.policies[&key]));
        }
        std::fs::write(&path, policies(3, 81)).unwrap();
        source.mark_dirty(&path);
        source.rescan().unwrap();
        let delta: Vec<_> = source.take_delta().into_iter().collect();
        assert_eq!(delta.len(), 1, "only p0 changed");
        let (ObjectRef::NetworkPolicy(changed), Some(Object::NetworkPolicy(now))) = &delta[0]
        else {
            panic!("p0 changed: {delta:?}");
        };
        assert_eq!(changed.name, "p0");
        assert!(Arc::ptr_eq(now, &source.state.policies[changed]));
        let unchanged = ObjectKey::new("x", "p1");
        assert!(Arc::ptr_eq(
            &state.policies[&unchanged],
            &source.state.policies[&unchanged]
        ));
        assert!(!Arc::ptr_eq(
            &state.policies[changed],
            &source.state.policies[changed]
        ));
    }

    #[test]
    fn definers_keep_the_order_first_seen_and_each_file_once() {
        let mut d = Definers::default();
        d.insert(7);
        d.insert(3);
        d.insert(7);
        assert_eq!(d.0, [3, 7]);
        d.remove(3);
        d.remove(99);
        assert_eq!(d.0, [7]);
        d.remove(7);
        assert!(d.is_empty());
    }

    #[test]
    fn a_file_that_breaks_keeps_the_objects_it_held() {
        let tmp = TempDir::new("broken");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(3, 80)).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        assert_eq!(source.scan().unwrap().policies.len(), 3);
        // An edit that breaks the YAML (here in the middle of the file) takes nothing away.
        let broken = policies(3, 81).replacen("kind: NetworkPolicy", "kind: [NetworkPolicy", 2);
        std::fs::write(&path, broken).unwrap();
        let report = source.rescan().unwrap();
        assert_eq!((report.parsed, report.changed), (1, false));
        let state = source.state();
        assert_eq!(state.policies.len(), 3);
        assert!(
            state
                .policies
                .values()
                .all(|p| !format!("{p:?}").contains("81"))
        );
        // Fixed: the new version applies.
        std::fs::write(&path, policies(2, 81)).unwrap();
        assert_eq!(source.scan().unwrap().policies.len(), 2);
        // A new file that is broken from the start applies what stands in front of the error.
        let fresh = policies(2, 80).replacen("kind: NetworkPolicy", "kind: [NetworkPolicy", 2);
        std::fs::write(tmp.0.join("fresh.yaml"), fresh).unwrap();
        assert_eq!(source.scan().unwrap().policies.len(), 2);
        // Deleting the broken file removes what it held.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.scan().unwrap().policies.len(), 0);
    }

    /// The state rebuilt from scratch out of the files as last read, earlier-seen files first
    /// and the first definition in a file winning: what the incremental state must equal.
    fn rebuilt(source: &ManifestDir) -> ClusterState {
        let mut files: Vec<&ParsedFile> = source.files.values().collect();
        files.sort_by_key(|f| f.first_seen);
        let mut seen = BTreeSet::new();
        let mut state = ClusterState::default();
        for object in files.iter().flat_map(|f| &f.objects) {
            if seen.insert(object.object_ref()) {
                state.apply(object.clone());
            }
        }
        state
    }

    /// One random document: a namespace, a pod or a policy out of a small set of names, so
    /// files often define the same objects (within a file and across files).
    fn random_document(next: &mut impl FnMut() -> u64) -> String {
        let (name, value) = (next() % 3, next() % 3);
        match next() % 3 {
            0 => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n{name}\n  labels: {{team: t{value}}}\n"
            ),
            1 => format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod{name}, namespace: n{}, labels: {{app: a{value}}}}}\nspec: {{nodeName: node-1}}\nstatus: {{podIPs: [{{ip: 10.0.0.{}}}]}}\n",
                name % 2,
                name + 1
            ),
            _ => format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{name}, namespace: n0}}\nspec:\n  podSelector: {{matchLabels: {{app: a{value}}}}}\n  ingress: [{{ports: [{{port: {}}}]}}]\n",
                80 + value
            ),
        }
    }

    #[test]
    fn the_state_kept_per_file_equals_the_state_rebuilt_from_every_file() {
        let tmp = TempDir::new("incremental");
        let mut source = ManifestDir::new(&tmp.0);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let names = ["a.yaml", "b.yaml", "c.json", "d.yml", "e.yaml"];
        for round in 0..400 {
            let path = tmp.0.join(names[(next() % names.len() as u64) as usize]);
            match next() % 6 {
                0 => {
                    let _ = std::fs::remove_file(&path);
                }
                // Broken YAML: a known file keeps its objects, a new one applies those in
                // front of the error.
                1 => {
                    let text = format!("{}---\nkind: [\n", random_document(&mut next));
                    std::fs::write(&path, text).unwrap();
                }
                _ => {
                    let documents: Vec<String> = (0..next() % 5)
                        .map(|_| random_document(&mut next))
                        .collect();
                    std::fs::write(&path, documents.join("---\n")).unwrap();
                }
            }
            // Writes land within one timestamp tick: name every file, as inotify would.
            source.mark_all_dirty();
            let before = source.state();
            source.rescan().unwrap();
            assert_eq!(source.state(), rebuilt(&source), "after round {round}");
            // The objects the source names as changed are exactly those a full comparison finds.
            assert_eq!(
                source.take_delta(),
                StateDelta::between(&before, &source.state()),
                "the delta of round {round}"
            );
        }
        assert!(
            !source.state().namespaces.is_empty() || !source.state().policies.is_empty(),
            "the edits left some objects to compare"
        );
    }

    #[test]
    fn an_unchanged_directory_is_only_statted() {
        let tmp = TempDir::new("unchanged");
        std::fs::write(tmp.0.join("policies.yaml"), policies(200, 80)).unwrap();
        std::fs::write(tmp.0.join("ns.yaml"), NS).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        let first = source.rescan().unwrap();
        assert_eq!((first.read, first.parsed, first.changed), (2, 2, true));
        assert_eq!(source.state().policies.len(), 200);
        for _ in 0..3 {
            assert_eq!(source.rescan().unwrap(), ScanReport::default());
        }
    }

    #[test]
    fn same_bytes_under_a_new_stamp_are_read_but_not_parsed() {
        let tmp = TempDir::new("touch");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(50, 80)).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        source.rescan().unwrap();
        // touch: a new mtime, the same bytes.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        let report = source.rescan().unwrap();
        assert_eq!((report.read, report.parsed, report.changed), (1, 0, false));
        // Every file compared after lost inotify events: still nothing parsed.
        source.mark_all_dirty();
        let report = source.rescan().unwrap();
        assert_eq!((report.read, report.parsed, report.changed), (1, 0, false));
    }

    #[test]
    fn new_bytes_with_the_same_objects_change_nothing() {
        let tmp = TempDir::new("comment");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(50, 80)).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        source.rescan().unwrap();
        std::fs::write(&path, format!("# reviewed\n{}", policies(50, 80))).unwrap();
        let report = source.rescan().unwrap();
        assert_eq!((report.read, report.parsed, report.changed), (1, 1, false));
    }

    #[test]
    fn a_rewrite_that_keeps_the_stamp_is_found_through_inotify() {
        let tmp = TempDir::new("stamp");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(20, 80)).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        let before = source.scan().unwrap();
        // Same size; pretend it landed in the same timestamp tick as the first write (the
        // filesystem's clock is coarser than a fast writer), so the stamp does not change.
        std::fs::write(&path, policies(20, 81)).unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&path).unwrap());
        source.files.get_mut(&path).unwrap().stamp = stamp;
        assert!(
            !source.rescan().unwrap().changed,
            "the stamp alone cannot tell"
        );
        source.mark_dirty(&path);
        let report = source.rescan().unwrap();
        assert_eq!((report.read, report.parsed, report.changed), (1, 1, true));
        assert_ne!(source.state(), before);
    }

    #[test]
    fn renames_and_deletes_are_changes() {
        let tmp = TempDir::new("rename");
        std::fs::write(tmp.0.join("a.yaml"), NS).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        source.rescan().unwrap();
        std::fs::rename(tmp.0.join("a.yaml"), tmp.0.join("b.yaml")).unwrap();
        let report = source.rescan().unwrap();
        assert!(report.changed);
        assert!(source.state().namespaces.contains_key("x"));
        // Renamed out of the manifests (a dotfile is ignored): its objects go.
        std::fs::rename(tmp.0.join("b.yaml"), tmp.0.join(".b.yaml")).unwrap();
        assert!(source.rescan().unwrap().changed);
        assert!(source.state().namespaces.is_empty());
        assert!(!source.rescan().unwrap().changed);
    }

    #[test]
    fn only_writes_to_manifests_are_changes() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, Event, EventKind, Flag, MetadataKind, ModifyKind,
            RenameMode,
        };
        let event = |kind: EventKind, paths: &[&str]| {
            Ok(Event {
                kind,
                paths: paths.iter().map(PathBuf::from).collect(),
                attrs: Default::default(),
            })
        };
        let files = |paths: &[&str]| Some(Change::Files(paths.iter().map(PathBuf::from).collect()));
        // The agent's own scans and reads (and anyone else's).
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert_eq!(Change::of(event(open, &["/m"])), None);
        assert_eq!(Change::of(event(open, &["/m/a.yaml"])), None);
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(
            Change::of(event(closed, &["/m/a.yaml"])),
            files(&["/m/a.yaml"])
        );
        let created = EventKind::Create(CreateKind::File);
        assert_eq!(Change::of(event(created, &["/m/.a.yaml.swp"])), None);
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(
            Change::of(event(renamed, &["/m/.a.yaml.tmp", "/m/a.yaml"])),
            files(&["/m/a.yaml"])
        );
        let touched = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any));
        assert_eq!(
            Change::of(event(touched, &["/m/a.json"])),
            files(&["/m/a.json"])
        );
        let overflow = Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan));
        assert_eq!(Change::of(overflow), Some(Change::Lost));
    }

    #[tokio::test]
    async fn reading_the_directory_causes_no_scan() {
        let tmp = TempDir::new("reads");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(100, 80)).unwrap();
        let stats = Arc::new(SourceStats::default());
        let mut source = ManifestDir::new(&tmp.0).with_stats(stats.clone());
        let mut state = source.scan().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        // No periodic rescan during the test: every scan after the first is an event's.
        let task = tokio::spawn(follow(source, tx, Duration::from_secs(3600)));
        while stats.manifest_scans.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The follow loop's first scan read every file; someone else reads them too.
        for _ in 0..5 {
            std::fs::read_to_string(&path).unwrap();
            std::fs::read_dir(&tmp.0).unwrap().for_each(drop);
        }
        // Then a change, renamed into place: its state is the next thing handed on.
        std::fs::write(tmp.0.join(".extra.yaml"), NS).unwrap();
        std::fs::rename(tmp.0.join(".extra.yaml"), tmp.0.join("extra.yaml")).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no state after a change")
            .unwrap();
        next.delta.apply_to(&mut state);
        assert!(state.namespaces.contains_key("x"));
        // The start-up scan, the first follow scan, and the rename's (one event, perhaps
        // split in two by the debounce); reads would add scans that cause more.
        let scans = stats.manifest_scans.load(Ordering::Relaxed);
        assert!(
            scans <= 4,
            "{scans} scans: reads of the directory caused scans"
        );
        assert_eq!(stats.manifest_files_parsed.load(Ordering::Relaxed), 2);
        task.abort();
    }

    #[tokio::test]
    async fn follow_hands_on_changes_only() {
        let tmp = TempDir::new("follow");
        let path = tmp.0.join("policies.yaml");
        std::fs::write(&path, policies(100, 80)).unwrap();
        let stats = Arc::new(SourceStats::default());
        let mut source = ManifestDir::new(&tmp.0).with_stats(stats.clone());
        let first = source.scan().unwrap();
        assert_eq!(stats.manifest_files_parsed.load(Ordering::Relaxed), 1);
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(follow(source, tx, Duration::from_millis(20)));
        // Several rescans of an unchanged directory: nothing parsed again, nothing handed on.
        while stats.manifest_scans.load(Ordering::Relaxed) < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(stats.manifest_files_parsed.load(Ordering::Relaxed), 1);
        assert!(
            rx.try_recv().is_err(),
            "an unchanged directory sent a state"
        );
        // A real change is handed on, and it is the next state. (Renamed into place, so no scan
        // sees the file half-written.)
        std::fs::write(tmp.0.join(".policies.yaml"), policies(100, 81)).unwrap();
        std::fs::rename(tmp.0.join(".policies.yaml"), &path).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no state after a change")
            .unwrap();
        let mut next_state = first.clone();
        next.delta.apply_to(&mut next_state);
        assert_ne!(next_state, first);
        assert_eq!(next_state.policies.len(), 100);
        assert_eq!(next.fingerprint, fingerprint(&tmp.0).unwrap());
        // New bytes with the same objects: the same state, under the directory's new
        // fingerprint (whoever wrote them can see them applied).
        std::fs::write(
            tmp.0.join(".policies.yaml"),
            format!("# reviewed\n{}", policies(100, 81)),
        )
        .unwrap();
        std::fs::rename(tmp.0.join(".policies.yaml"), &path).unwrap();
        let commented = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no state after a comment")
            .unwrap();
        assert!(commented.delta.is_empty(), "the same state");
        assert_ne!(commented.fingerprint, next.fingerprint);
        assert_eq!(commented.fingerprint, fingerprint(&tmp.0).unwrap());
        task.abort();
    }

    #[test]
    fn the_fingerprint_covers_the_files_read_and_only_those() {
        let tmp = TempDir::new("fingerprint");
        std::fs::write(tmp.0.join("a.yaml"), NS).unwrap();
        let mut source = ManifestDir::new(&tmp.0);
        source.scan().unwrap();
        let first = source.fingerprint();
        assert_eq!(first, fingerprint(&tmp.0).unwrap());
        // Files the agent does not read change nothing.
        std::fs::write(tmp.0.join(".a.yaml"), "x").unwrap();
        std::fs::write(tmp.0.join("a.yaml~"), "x").unwrap();
        source.scan().unwrap();
        assert_eq!(source.fingerprint(), first);
        assert_eq!(fingerprint(&tmp.0).unwrap(), first);
        // A renamed file is another directory.
        std::fs::rename(tmp.0.join("a.yaml"), tmp.0.join("b.yaml")).unwrap();
        source.scan().unwrap();
        assert_ne!(source.fingerprint(), first);
        assert_eq!(source.fingerprint(), fingerprint(&tmp.0).unwrap());
    }
}
