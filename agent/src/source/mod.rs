//! Where cluster state comes from. Standalone mode reads a manifests directory; Kubernetes mode
//! (kube-rs watchers) feeds the same `ClusterState` into the same runtime.
//!
//! Both sources hand on a state only when it differs from the last one they handed on: the
//! agent's CPU follows changes, not the size of what it watches. The manifests source names the
//! objects that changed ([`SourceUpdate`]); the Kubernetes source hands on whole states, which
//! the agent compares with the one before to find them ([`StateDelta::between`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use weir_policy::model::{ClusterState, StateDelta};

pub mod kubernetes;
pub mod manifests;
pub mod meshpeer_crd;

/// What changed in the cluster state, as a source hands it on, with the source's fingerprint of
/// what the whole state was read from (standalone: [`manifests::fingerprint`]; empty where the
/// source has none) and the whole state's object counts (so that whoever follows the changes
/// need not keep every object to count them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceUpdate {
    pub delta: StateDelta,
    pub fingerprint: String,
    pub counts: ObjectCounts,
}

/// Counters the cluster source updates (cheap atomics; the health endpoint's `/metrics` reads
/// them).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Whether every watch of the source is currently established (standalone: always).
    pub connected: AtomicBool,
    /// Watch and list failures (connection refused, 410 Gone, API errors), all kinds together.
    pub watch_errors: AtomicU64,
    /// 410 Gone answers that forced a relist.
    pub relists: AtomicU64,
    /// Complete cluster states handed to the runtime.
    pub updates: AtomicU64,
    /// Kubernetes Events written for rejected policies.
    pub events_written: AtomicU64,
    /// Scans of the manifests directory (after an inotify event, or the periodic rescan).
    pub manifest_scans: AtomicU64,
    /// Manifest files parsed: new files and files whose bytes changed.
    pub manifest_files_parsed: AtomicU64,
    pods: AtomicU64,
    namespaces: AtomicU64,
    policies: AtomicU64,
    nodes: AtomicU64,
}

/// The object counts of the last state handed on, as `/metrics` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectCounts {
    pub pods: u64,
    pub namespaces: u64,
    pub policies: u64,
    pub nodes: u64,
}

impl ObjectCounts {
    /// The counts of `state`'s objects.
    pub fn of(state: &ClusterState) -> Self {
        let n = |len: usize| u64::try_from(len).unwrap_or(u64::MAX);
        Self {
            pods: n(state.pods.len()),
            namespaces: n(state.namespaces.len()),
            policies: n(state.policies.len()),
            nodes: n(state.nodes.len()),
        }
    }
}

impl SourceStats {
    /// Records a cluster state about to be handed to the runtime.
    pub fn observe_state(&self, state: &ClusterState) {
        self.observe_counts(ObjectCounts::of(state));
    }

    /// Records a cluster state about to be handed to the runtime, by its object counts.
    pub fn observe_counts(&self, counts: ObjectCounts) {
        self.pods.store(counts.pods, Ordering::Relaxed);
        self.namespaces.store(counts.namespaces, Ordering::Relaxed);
        self.policies.store(counts.policies, Ordering::Relaxed);
        self.nodes.store(counts.nodes, Ordering::Relaxed);
        self.updates.fetch_add(1, Ordering::Relaxed);
    }

    /// The object counts of the last state observed.
    pub fn object_counts(&self) -> ObjectCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ObjectCounts {
            pods: load(&self.pods),
            namespaces: load(&self.namespaces),
            policies: load(&self.policies),
            nodes: load(&self.nodes),
        }
    }
}
