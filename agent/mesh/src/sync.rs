//! The export/import sync protocol as two pure state machines, with no I/O: an [`Exporter`] (the
//! authority for what this cluster exports to a peer) and an [`Importer`] (what we hold of a
//! peer's exports). The gRPC session code only moves their [`Frame`]s.
//!
//! # Versions and resume
//! Every change of the exporter's entries bumps its version. Versions are only comparable within
//! one `incarnation`, a random number the exporter picks when it starts without history (agent
//! start). A subscriber that reconnects names the incarnation and version it holds
//! ([`Importer::resume`]); the exporter answers with one coalesced [`Delta`] from its bounded
//! history, or, if it cannot (other incarnation, history too short, delta too large), with a
//! full snapshot: [`Frame::Snapshot`], the entries in chunks, then [`Frame::Synced`].
//!
//! # The rule that makes reconnects safe (the Cilium #24740 class of bugs)
//! The importer never deletes an entry because a session ended or a snapshot started. A snapshot
//! marks what it holds *stale*; entries the snapshot sends again become fresh, and only at
//! `Synced` are the remaining stale entries deleted. So at every moment the importer holds a
//! superset of what the exporter held at the importer's version, and exactly that after
//! `Synced`. A delta is validated as a whole before any of it applies (NACK otherwise).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Where a subscriber stands in an exporter's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    pub incarnation: u64,
    pub version: u64,
}

/// Entries added or replaced (`upsert`) and removed, taking the holder from `base_version` to
/// `version`. In a snapshot, `base_version == version` and there are no removals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta<R> {
    pub incarnation: u64,
    pub base_version: u64,
    pub version: u64,
    pub upsert: Vec<(String, R)>,
    pub remove: Vec<String>,
}

impl<R> Delta<R> {
    pub fn len(&self) -> usize {
        self.upsert.len() + self.remove.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an exporter sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<R> {
    /// A full snapshot at `version` starts; its entries follow as deltas.
    Snapshot {
        incarnation: u64,
        version: u64,
    },
    Delta(Delta<R>),
    /// The receiver now holds exactly the exporter's entries at `version`.
    Synced {
        incarnation: u64,
        version: u64,
    },
}

/// How much an importer accepts from one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries held from the peer (not counting stale ones awaiting `Synced`).
    pub max_entries: usize,
    /// Upserts + removals in one delta.
    pub max_delta_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_delta_entries: 10_000,
        }
    }
}

/// The authority for what one cluster exports to a peer.
#[derive(Clone, Debug)]
pub struct Exporter<R> {
    incarnation: u64,
    version: u64,
    entries: BTreeMap<String, R>,
    /// Changes after `history_base`, oldest first: (version, name, new value or removal).
    history: VecDeque<(u64, String, Option<R>)>,
    history_base: u64,
    history_limit: usize,
}

impl<R: Clone + PartialEq> Exporter<R> {
    /// An exporter with nothing exported yet. `incarnation` must be fresh (random) each time the
    /// exporter starts without its history.
    pub fn new(incarnation: u64, history_limit: usize) -> Self {
        Self {
            incarnation,
            version: 0,
            entries: BTreeMap::new(),
            history: VecDeque::new(),
            history_base: 0,
            history_limit,
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn entries(&self) -> &BTreeMap<String, R> {
        &self.entries
    }

    /// Makes the exported entries equal to `desired`, as one new version if anything changed.
    /// Returns whether it did.
    pub fn replace_all(&mut self, desired: BTreeMap<String, R>) -> bool {
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        let upserts: Vec<(String, R)> = desired
            .into_iter()
            .filter(|(k, v)| self.entries.get(k) != Some(v))
            .collect();
        self.update(upserts, removed)
    }

    /// Applies upserts and removals as one new version if anything changed (an upsert of an
    /// unchanged value or a removal of an absent name is not a change).
    pub fn update(&mut self, upserts: Vec<(String, R)>, removes: Vec<String>) -> bool {
        let mut changes: Vec<(String, Option<R>)> = Vec::new();
        for name in removes {
            if self.entries.contains_key(&name) {
                changes.push((name, None));
            }
        }
        for (name, value) in upserts {
            if self.entries.get(&name) != Some(&value) {
                changes.push((name, Some(value)));
            }
        }
        if changes.is_empty() {
            return false;
        }
        self.version += 1;
        for (name, value) in changes {
            match &value {
                Some(v) => self.entries.insert(name.clone(), v.clone()),
                None => self.entries.remove(&name),
            };
            self.history.push_back((self.version, name, value));
        }
        while self.history.len() > self.history_limit {
            if let Some((v, _, _)) = self.history.pop_front() {
                // Versions before v's batch can no longer be caught up exactly, nor v itself
                // if part of its batch is gone.
                self.history_base = self.history_base.max(v);
            }
        }
        // Never leave half a version in the history.
        while self
            .history
            .front()
            .is_some_and(|(v, _, _)| *v <= self.history_base)
        {
            self.history.pop_front();
        }
        true
    }

    /// The frames that bring a holder at `from` (None: holds nothing) to the current version.
    /// One coalesced delta when the history allows it and it is at most `max_delta` entries,
    /// otherwise a full snapshot (chunks of at most `max_delta` entries) ending with `Synced`.
    /// With `announce_synced`, a delta (or nothing, when `from` is current) is followed by
    /// `Synced` too, so a resumed session also tells the holder it is complete.
    pub fn catch_up(
        &self,
        from: Option<Resume>,
        max_delta: usize,
        announce_synced: bool,
    ) -> Vec<Frame<R>> {
        let max_delta = max_delta.max(1);
        let synced = Frame::Synced {
            incarnation: self.incarnation,
            version: self.version,
        };
        if let Some(from) = from
            && from.incarnation == self.incarnation
            && from.version >= self.history_base
            && from.version <= self.version
        {
            let mut frames = Vec::new();
            if from.version < self.version {
                let mut coalesced: BTreeMap<&str, Option<&R>> = BTreeMap::new();
                for (v, name, value) in &self.history {
                    if *v > from.version {
                        coalesced.insert(name, value.as_ref());
                    }
                }
                if coalesced.len() <= max_delta {
                    let mut delta = Delta {
                        incarnation: self.incarnation,
                        base_version: from.version,
                        version: self.version,
                        upsert: Vec::new(),
                        remove: Vec::new(),
                    };
                    for (name, value) in coalesced {
                        match value {
                            Some(v) => delta.upsert.push((name.to_owned(), v.clone())),
                            None => delta.remove.push(name.to_owned()),
                        }
                    }
                    frames.push(Frame::Delta(delta));
                } else {
                    return self.snapshot(max_delta);
                }
            }
            if announce_synced {
                frames.push(synced);
            }
            return frames;
        }
        self.snapshot(max_delta)
    }

    fn snapshot(&self, max_delta: usize) -> Vec<Frame<R>> {
        let mut frames = vec![Frame::Snapshot {
            incarnation: self.incarnation,
            version: self.version,
        }];
        let entries: Vec<(String, R)> = self
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for chunk in entries.chunks(max_delta) {
            frames.push(Frame::Delta(Delta {
                incarnation: self.incarnation,
                base_version: self.version,
                version: self.version,
                upsert: chunk.to_vec(),
                remove: Vec::new(),
            }));
        }
        frames.push(Frame::Synced {
            incarnation: self.incarnation,
            version: self.version,
        });
        frames
    }
}

/// Why the importer refused a frame (sent back as a NACK; nothing of the frame was applied).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportError<E> {
    #[error("frame for incarnation {got}, but the session is on {expected:?}")]
    Incarnation { expected: Option<u64>, got: u64 },
    #[error("delta from version {got}, but we hold version {expected}")]
    VersionGap { expected: u64, got: u64 },
    #[error("delta does not advance the version ({base} -> {version})")]
    NotAdvancing { base: u64, version: u64 },
    #[error("snapshot chunk for version {got} while snapshot {expected} runs")]
    SnapshotVersion { expected: u64, got: u64 },
    #[error("snapshot chunks may not remove entries")]
    RemoveInSnapshot,
    #[error("delta of {len} entries is larger than the limit of {limit}")]
    DeltaTooLarge { len: usize, limit: usize },
    #[error("the peer would hold {count} entries here, more than the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("entry `{name}` twice in one delta")]
    Duplicate { name: String },
    #[error("entry `{name}` refused: {reason}")]
    Refused { name: String, reason: E },
}

/// What applying a frame did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Names added, replaced or deleted.
    pub changed: BTreeSet<String>,
    /// The frame was `Synced`: the importer now mirrors the exporter.
    pub synced: bool,
}

/// What we hold of one peer's exports. Serialisable, so it survives an agent restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Importer<R> {
    /// Incarnation and version we hold, once a snapshot or resumed session completed.
    held: Option<Resume>,
    entries: BTreeMap<String, R>,
    /// Entries held from before the running snapshot; deleted at its `Synced` unless re-sent.
    stale: BTreeSet<String>,
    /// The snapshot being received, if any.
    snapshot: Option<Resume>,
    /// Whether the current session has reached `Synced` (not persisted meaningfully: a restored
    /// importer is not synced until its next session says so).
    #[serde(skip)]
    synced: bool,
}

impl<R: Clone + PartialEq> Importer<R> {
    pub fn new() -> Self {
        Self {
            held: None,
            entries: BTreeMap::new(),
            stale: BTreeSet::new(),
            snapshot: None,
            synced: false,
        }
    }

    pub fn entries(&self) -> &BTreeMap<String, R> {
        &self.entries
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// What to ask the exporter to resume from: only a completed state can be resumed; after
    /// an interrupted snapshot the exporter must send a whole one again.
    pub fn resume(&self) -> Option<Resume> {
        match self.snapshot {
            Some(_) => None,
            None => self.held,
        }
    }

    /// The session ended. Nothing is deleted: entries stay until a later snapshot's `Synced`
    /// says they are gone (or the stale TTL, which is the caller's policy).
    pub fn disconnected(&mut self) {
        self.synced = false;
    }

    /// Deletes everything (the stale TTL expired, or the peer was removed from the config).
    pub fn clear(&mut self) -> BTreeSet<String> {
        let changed = self.entries.keys().cloned().collect();
        *self = Self::new();
        changed
    }

    /// Applies one frame, checking every entry with `check` first. On error nothing changed.
    pub fn apply<E>(
        &mut self,
        frame: &Frame<R>,
        limits: &Limits,
        mut check: impl FnMut(&str, &R) -> Result<(), E>,
    ) -> Result<Applied, ImportError<E>> {
        match frame {
            Frame::Snapshot {
                incarnation,
                version,
            } => {
                self.stale = self.entries.keys().cloned().collect();
                self.snapshot = Some(Resume {
                    incarnation: *incarnation,
                    version: *version,
                });
                self.synced = false;
                Ok(Applied::default())
            }
            Frame::Delta(delta) => {
                if delta.len() > limits.max_delta_entries {
                    return Err(ImportError::DeltaTooLarge {
                        len: delta.len(),
                        limit: limits.max_delta_entries,
                    });
                }
                match self.snapshot {
                    Some(s) => {
                        if delta.incarnation != s.incarnation {
                            return Err(ImportError::Incarnation {
                                expected: Some(s.incarnation),
                                got: delta.incarnation,
                            });
                        }
                        if delta.base_version != s.version || delta.version != s.version {
                            return Err(ImportError::SnapshotVersion {
                                expected: s.version,
                                got: delta.version,
                            });
                        }
                        if !delta.remove.is_empty() {
                            return Err(ImportError::RemoveInSnapshot);
                        }
                    }
                    None => {
                        let held = self.held.ok_or(ImportError::Incarnation {
                            expected: None,
                            got: delta.incarnation,
                        })?;
                        if delta.incarnation != held.incarnation {
                            return Err(ImportError::Incarnation {
                                expected: Some(held.incarnation),
                                got: delta.incarnation,
                            });
                        }
                        if delta.base_version != held.version {
                            return Err(ImportError::VersionGap {
                                expected: held.version,
                                got: delta.base_version,
                            });
                        }
                        if delta.version <= delta.base_version {
                            return Err(ImportError::NotAdvancing {
                                base: delta.base_version,
                                version: delta.version,
                            });
                        }
                    }
                }
                self.check_delta(delta, limits, &mut check)?;
                let mut applied = Applied::default();
                for name in &delta.remove {
                    if self.entries.remove(name).is_some() {
                        applied.changed.insert(name.clone());
                    }
                    self.stale.remove(name);
                }
                for (name, value) in &delta.upsert {
                    self.stale.remove(name);
                    if self.entries.get(name) != Some(value) {
                        self.entries.insert(name.clone(), value.clone());
                        applied.changed.insert(name.clone());
                    }
                }
                if self.snapshot.is_none()
                    && let Some(held) = &mut self.held
                {
                    held.version = delta.version;
                }
                Ok(applied)
            }
            Frame::Synced {
                incarnation,
                version,
            } => {
                let at = Resume {
                    incarnation: *incarnation,
                    version: *version,
                };
                match self.snapshot {
                    Some(s) if s == at => {}
                    Some(s) => {
                        return Err(ImportError::SnapshotVersion {
                            expected: s.version,
                            got: *version,
                        });
                    }
                    None if self.held == Some(at) => {}
                    None => {
                        return Err(ImportError::VersionGap {
                            expected: self.held.map_or(0, |h| h.version),
                            got: *version,
                        });
                    }
                }
                let mut applied = Applied {
                    synced: true,
                    ..Applied::default()
                };
                for name in std::mem::take(&mut self.stale) {
                    if self.entries.remove(&name).is_some() {
                        applied.changed.insert(name);
                    }
                }
                self.snapshot = None;
                self.held = Some(at);
                self.synced = true;
                Ok(applied)
            }
        }
    }

    fn check_delta<E>(
        &self,
        delta: &Delta<R>,
        limits: &Limits,
        check: &mut impl FnMut(&str, &R) -> Result<(), E>,
    ) -> Result<(), ImportError<E>> {
        let mut seen = BTreeSet::new();
        for name in delta
            .upsert
            .iter()
            .map(|(n, _)| n)
            .chain(delta.remove.iter())
        {
            if !seen.insert(name.as_str()) {
                return Err(ImportError::Duplicate { name: name.clone() });
            }
        }
        for (name, value) in &delta.upsert {
            check(name, value).map_err(|reason| ImportError::Refused {
                name: name.clone(),
                reason,
            })?;
        }
        // Fresh (non-stale) entries after applying: stale ones are bounded by an earlier count.
        let fresh_before = self.entries.len() - self.stale.len();
        let added = delta
            .upsert
            .iter()
            .filter(|(n, _)| !self.entries.contains_key(n) || self.stale.contains(n))
            .count();
        let removed = delta
            .remove
            .iter()
            .filter(|n| self.entries.contains_key(*n) && !self.stale.contains(*n))
            .count();
        let count = fresh_before + added - removed;
        if count > limits.max_entries {
            return Err(ImportError::TooManyEntries {
                count,
                limit: limits.max_entries,
            });
        }
        Ok(())
    }
}
