//! Stable numeric identities for pods and CIDR label sets, and stable rule ids.
//!
//! The allocator is state the agent persists in its state directory: the same (namespace,
//! labels, named ports) keeps its identity across compiles and agent restarts, so map contents
//! only change where the cluster changed. Ids are never handed out twice while the counter has
//! room; after that, the lowest free id is reused.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use weir_common::{
    IDENTITY_CLUSTER_SHIFT, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, IDENTITY_LOCAL_MASK,
};

use crate::{output::RuleOrigin, validate::IpBlockLabel};

/// A named container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// What a pod identity stands for. Named ports are part of it so that a named port resolves to
/// exactly the numbers of the pods that carry the identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodIdentityKey {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub named_ports: BTreeSet<NamedPort>,
}

impl PodIdentityKey {
    /// The port numbers `name` stands for with protocol `proto`.
    pub fn resolve<'a>(&'a self, proto: u8, name: &'a str) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.proto == proto && p.name == name)
            .map(|p| p.port)
    }
}

impl std::fmt::Display for PodIdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, "{}/{{{}}}", self.namespace, labels.join(","))?;
        if !self.named_ports.is_empty() {
            let ports: Vec<String> = self
                .named_ports
                .iter()
                .map(|p| format!("{}={}/{}", p.name, p.port, p.proto))
                .collect();
            write!(f, " ports[{}]", ports.join(","))?;
        }
        Ok(())
    }
}

/// The label set of a CIDR identity: the ipBlocks that contain its prefixes and, for the exact
/// prefix of a pod address (see [`crate::cidr`]), the named ports that pod has.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "CidrLabelsRepr", into = "CidrLabelsRepr")]
pub struct CidrLabels {
    pub blocks: BTreeSet<IpBlockLabel>,
    /// Empty except on a pod address's own prefix.
    pub pod_ports: BTreeSet<NamedPort>,
}

impl CidrLabels {
    pub fn blocks(blocks: BTreeSet<IpBlockLabel>) -> Self {
        Self {
            blocks,
            pod_ports: BTreeSet::new(),
        }
    }
}

impl std::fmt::Display for CidrLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let blocks: Vec<String> = self.blocks.iter().map(ToString::to_string).collect();
        write!(f, "{}", blocks.join(" | "))?;
        if !self.pod_ports.is_empty() {
            let ports: Vec<String> = self
                .pod_ports
                .iter()
                .map(|p| format!("{}={}/{}", p.name, p.port, p.proto))
                .collect();
            write!(f, " pod ports[{}]", ports.join(","))?;
        }
        Ok(())
    }
}

/// Stored form: a plain list of blocks when there are no pod ports (what identities.json held
/// before pod prefixes existed, so old state files still load), else both.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CidrLabelsRepr {
    Blocks(BTreeSet<IpBlockLabel>),
    Pod {
        blocks: BTreeSet<IpBlockLabel>,
        pod_ports: BTreeSet<NamedPort>,
    },
}

impl From<CidrLabelsRepr> for CidrLabels {
    fn from(r: CidrLabelsRepr) -> Self {
        match r {
            CidrLabelsRepr::Blocks(blocks) => Self::blocks(blocks),
            CidrLabelsRepr::Pod { blocks, pod_ports } => Self { blocks, pod_ports },
        }
    }
}

impl From<CidrLabels> for CidrLabelsRepr {
    fn from(l: CidrLabels) -> Self {
        if l.pod_ports.is_empty() {
            Self::Blocks(l.blocks)
        } else {
            Self::Pod {
                blocks: l.blocks,
                pod_ports: l.pod_ports,
            }
        }
    }
}

/// Number of cluster-local pod identities.
const POD_SPACE: u32 = IDENTITY_FIRST_CIDR - IDENTITY_FIRST_POD;
/// Number of CIDR identities.
const CIDR_SPACE: u32 = IDENTITY_LOCAL_MASK + 1 - IDENTITY_FIRST_CIDR;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Table<K: Ord> {
    ids: BTreeMap<K, u32>,
    /// Offset of the next never-used id.
    next: u32,
}

impl<K: Ord> Default for Table<K> {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            next: 0,
        }
    }
}

impl<K: Ord + Clone> Table<K> {
    /// Offset of `key`, allocating the next free one; `None` when the space is full.
    fn get_or_insert(&mut self, key: &K, space: u32) -> Option<u32> {
        if let Some(&id) = self.ids.get(key) {
            return Some(id);
        }
        let id = if self.next < space {
            self.next += 1;
            self.next - 1
        } else {
            let used: BTreeSet<u32> = self.ids.values().copied().collect();
            (0..space).find(|i| !used.contains(i))?
        };
        self.ids.insert(key.clone(), id);
        Some(id)
    }
}

/// Hands out identities and rule ids; serialisable so the agent can persist it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AllocatorRepr", into = "AllocatorRepr")]
pub struct IdentityAllocator {
    pods: Table<PodIdentityKey>,
    cidrs: Table<CidrLabels>,
    rules: Table<RuleOrigin>,
}

/// Why an identity could not be allocated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free pod identity left for {key} (all {POD_SPACE} are in use)")]
    PodsExhausted { key: String },
    #[error("no free CIDR identity left for {labels} (all {CIDR_SPACE} are in use)")]
    CidrsExhausted { labels: String },
    #[error("cluster id {cluster_id} does not fit in 8 bits")]
    BadClusterId { cluster_id: u32 },
}

impl IdentityAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of a pod key in cluster `cluster_id` (0..=255).
    pub fn pod(&mut self, cluster_id: u32, key: &PodIdentityKey) -> Result<u32, AllocError> {
        if cluster_id > (u32::MAX >> IDENTITY_CLUSTER_SHIFT) {
            return Err(AllocError::BadClusterId { cluster_id });
        }
        let off =
            self.pods
                .get_or_insert(key, POD_SPACE)
                .ok_or_else(|| AllocError::PodsExhausted {
                    key: key.to_string(),
                })?;
        Ok((cluster_id << IDENTITY_CLUSTER_SHIFT) | (IDENTITY_FIRST_POD + off))
    }

    /// The identity `key` has now, without allocating one (`None`: it has none).
    pub fn pod_id(&self, cluster_id: u32, key: &PodIdentityKey) -> Option<u32> {
        if cluster_id > (u32::MAX >> IDENTITY_CLUSTER_SHIFT) {
            return None;
        }
        let off = self.pods.ids.get(key)?;
        Some((cluster_id << IDENTITY_CLUSTER_SHIFT) | (IDENTITY_FIRST_POD + off))
    }

    /// The identity of a CIDR label set (its blocks must not be empty: that is `IDENTITY_WORLD`).
    pub fn cidr(&mut self, labels: &CidrLabels) -> Result<u32, AllocError> {
        let off = self
            .cidrs
            .get_or_insert(labels, CIDR_SPACE)
            .ok_or_else(|| AllocError::CidrsExhausted {
                labels: labels.to_string(),
            })?;
        Ok(IDENTITY_FIRST_CIDR + off)
    }

    /// The id of a rule (from 1).
    pub fn rule(&mut self, origin: &RuleOrigin) -> u32 {
        // The space is u32: it cannot run out in practice; saturate rather than fail.
        self.rules
            .get_or_insert(origin, u32::MAX - 1)
            .map_or(u32::MAX, |o| o + 1)
    }

    /// Forgets one rule that is no longer in use (what [`Self::retain`] does for a policy
    /// that changed alone).
    pub fn forget_rule(&mut self, origin: &RuleOrigin) {
        self.rules.ids.remove(origin);
    }

    /// Forgets every pod key, label set and rule not in use, so the state does not grow
    /// without bound. Forgotten ids are not reused until the id space wraps.
    pub fn retain(
        &mut self,
        pods: &BTreeSet<&PodIdentityKey>,
        cidrs: &BTreeSet<&CidrLabels>,
        rules: &BTreeSet<&RuleOrigin>,
    ) {
        self.pods.ids.retain(|k, _| pods.contains(k));
        self.cidrs.ids.retain(|k, _| cidrs.contains(k));
        self.rules.ids.retain(|k, _| rules.contains(k));
    }
}

#[derive(Serialize, Deserialize)]
struct AllocatorRepr {
    pods: Vec<(PodIdentityKey, u32)>,
    next_pod: u32,
    cidrs: Vec<(CidrLabels, u32)>,
    next_cidr: u32,
    rules: Vec<(RuleOrigin, u32)>,
    next_rule: u32,
}

impl From<IdentityAllocator> for AllocatorRepr {
    fn from(a: IdentityAllocator) -> Self {
        Self {
            pods: a.pods.ids.into_iter().collect(),
            next_pod: a.pods.next,
            cidrs: a.cidrs.ids.into_iter().collect(),
            next_cidr: a.cidrs.next,
            rules: a.rules.ids.into_iter().collect(),
            next_rule: a.rules.next,
        }
    }
}

impl From<AllocatorRepr> for IdentityAllocator {
    fn from(r: AllocatorRepr) -> Self {
        // Keep `next` past every stored id even if the state was edited by hand.
        fn table<K: Ord>(ids: Vec<(K, u32)>, next: u32) -> Table<K> {
            let max = ids
                .iter()
                .map(|(_, v)| v.saturating_add(1))
                .max()
                .unwrap_or(0);
            Table {
                ids: ids.into_iter().collect(),
                next: next.max(max),
            }
        }
        Self {
            pods: table(r.pods, r.next_pod),
            cidrs: table(r.cidrs, r.next_cidr),
            rules: table(r.rules, r.next_rule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str) -> PodIdentityKey {
        PodIdentityKey {
            namespace: "ns".into(),
            labels: BTreeMap::from([("app".into(), app.into())]),
            named_ports: BTreeSet::new(),
        }
    }

    #[test]
    fn ids_are_stable_and_not_reused_until_the_space_wraps() {
        let mut a = IdentityAllocator::new();
        let x = a.pod(0, &key("x")).unwrap();
        let y = a.pod(0, &key("y")).unwrap();
        assert_eq!((x, y), (IDENTITY_FIRST_POD, IDENTITY_FIRST_POD + 1));
        assert_eq!(a.pod(0, &key("x")).unwrap(), x);
        assert_eq!(a.pod(3, &key("x")).unwrap(), (3 << 24) | x);
        // Forget x: its id is not handed out again.
        let ky = key("y");
        a.retain(&BTreeSet::from([&ky]), &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(a.pod(0, &key("z")).unwrap(), IDENTITY_FIRST_POD + 2);
        assert_eq!(a.pod(0, &key("x")).unwrap(), IDENTITY_FIRST_POD + 3);
    }

    #[test]
    fn a_full_table_reuses_the_lowest_free_id() {
        let mut t: Table<u32> = Table::default();
        for k in 0..4 {
            assert_eq!(t.get_or_insert(&k, 4), Some(k));
        }
        assert_eq!(t.get_or_insert(&9, 4), None);
        t.ids.remove(&2);
        assert_eq!(t.get_or_insert(&9, 4), Some(2));
    }

    #[test]
    fn rule_ids_start_at_one() {
        let mut a = IdentityAllocator::new();
        let o = RuleOrigin {
            policy: crate::model::ObjectKey::new("a", "b"),
            direction: 1,
            index: 0,
        };
        assert_eq!(a.rule(&o), 1);
        assert_eq!(a.rule(&o), 1);
    }

    #[test]
    fn cidr_labels_keep_the_old_stored_form_and_round_trip() {
        let block = IpBlockLabel {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: BTreeSet::new(),
        };
        let plain = CidrLabels::blocks(BTreeSet::from([block.clone()]));
        let pod = CidrLabels {
            blocks: BTreeSet::from([block]),
            pod_ports: BTreeSet::from([NamedPort {
                name: "http".into(),
                proto: 6,
                port: 80,
            }]),
        };
        let mut a = IdentityAllocator::new();
        let plain_id = a.cidr(&plain).unwrap();
        let pod_id = a.cidr(&pod).unwrap();
        let json = serde_json::to_value(&a).unwrap();
        // Labels without pod ports are stored as before (a list of blocks), so an
        // identities.json written by an older agent still loads with the same ids.
        assert!(json["cidrs"][0][0].is_array(), "{json}");
        assert!(json["cidrs"][1][0].is_object(), "{json}");
        let mut back: IdentityAllocator = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.cidr(&plain).unwrap(), plain_id);
        assert_eq!(back.cidr(&pod).unwrap(), pod_id);
    }
}
