//! What changed between two cluster states, object by object. Sources hand on deltas rather
//! than whole states, so that the work after them (keeping a copy, telling what kind of change
//! it is, compiling) follows the change and not the size of the cluster.

use std::collections::BTreeMap;

use super::{ClusterState, Object, ObjectRef};

/// Objects added, changed or removed: each with its definition now (`None`: removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDelta {
    changes: BTreeMap<ObjectRef, Option<Object>>,
}

impl StateDelta {
    /// Records that `what` is now `now` (`None`: gone); a later record of one object replaces
    /// an earlier one.
    pub fn set(&mut self, what: ObjectRef, now: Option<Object>) {
        self.changes.insert(what, now);
    }

    /// Every object whose definition differs between `old` and `new` (present in one only, or
    /// different), in one walk of both states in key order. This compares every object: it is
    /// for sources that only have whole states, and for tests.
    pub fn between(old: &ClusterState, new: &ClusterState) -> Self {
        // Every field named, so that a new kind of object cannot be missed here.
        let ClusterState {
            namespaces,
            pods,
            policies,
            nodes,
            mesh_peers,
        } = new;
        let mut delta = Self::default();
        diff(&old.namespaces, namespaces, &mut delta, |k| {
            ObjectRef::Namespace(k.clone())
        });
        diff(&old.pods, pods, &mut delta, |k| ObjectRef::Pod(k.clone()));
        diff(&old.policies, policies, &mut delta, |k| {
            ObjectRef::NetworkPolicy(k.clone())
        });
        diff(&old.nodes, nodes, &mut delta, |k| {
            ObjectRef::Node(k.clone())
        });
        diff(&old.mesh_peers, mesh_peers, &mut delta, |k| {
            ObjectRef::MeshPeer(k.clone())
        });
        delta
    }

    /// Two deltas in a row, as one.
    pub fn then(&mut self, later: StateDelta) {
        if self.changes.is_empty() {
            *self = later;
        } else {
            self.changes.extend(later.changes);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// The changes in object order.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectRef, Option<&Object>)> {
        self.changes.iter().map(|(what, now)| (what, now.as_ref()))
    }

    /// Makes `state` what it was plus this delta.
    pub fn apply_to(&self, state: &mut ClusterState) {
        for (what, now) in &self.changes {
            match now {
                Some(object) => state.apply(object.clone()),
                None => {
                    state.remove(what);
                }
            }
        }
    }
}

impl IntoIterator for StateDelta {
    type Item = (ObjectRef, Option<Object>);
    type IntoIter = std::collections::btree_map::IntoIter<ObjectRef, Option<Object>>;

    fn into_iter(self) -> Self::IntoIter {
        self.changes.into_iter()
    }
}

/// The entries of one kind whose values differ, recorded with their new value.
fn diff<K: Ord, V: PartialEq + Clone + Into<Object>>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    delta: &mut StateDelta,
    object_ref: impl Fn(&K) -> ObjectRef,
) {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((k, _)), None) => {
                delta.set(object_ref(k), None);
                a.next();
            }
            (None, Some((k, v))) => {
                delta.set(object_ref(k), Some((*v).clone().into()));
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    delta.set(object_ref(ka), None);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    delta.set(object_ref(kb), Some((*vb).clone().into()));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        delta.set(object_ref(ka), Some((*vb).clone().into()));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        for object in parse_documents(yaml, "test") {
            state.apply(object.expect("valid"));
        }
        state
    }

    #[test]
    fn a_delta_between_two_states_turns_one_into_the_other() {
        let old = state(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {x: '1'}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
        );
        let new = state(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {x: '2'}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: a}\nspec: {podSelector: {}}\n",
        );
        let delta = StateDelta::between(&old, &new);
        let names: Vec<String> = delta.iter().map(|(what, _)| what.to_string()).collect();
        assert_eq!(names, ["Pod a/p", "NetworkPolicy a/np", "Node n1"]);
        let mut patched = old.clone();
        delta.apply_to(&mut patched);
        assert_eq!(patched, new);
        assert!(StateDelta::between(&new, &new).is_empty());
    }

    #[test]
    fn a_later_change_of_an_object_replaces_an_earlier_one() {
        let pod = ObjectRef::Pod(crate::model::ObjectKey::new("a", "p"));
        let node = ObjectRef::Node("n1".to_owned());
        let mut first = StateDelta::default();
        first.set(pod.clone(), None);
        first.set(node.clone(), None);
        let added = state("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\n");
        let mut second = StateDelta::default();
        second.set(pod.clone(), added.object(&pod));
        first.then(second);
        assert_eq!(first.len(), 2);
        assert_eq!(
            first.iter().next().map(|(_, now)| now.is_some()),
            Some(true)
        );
    }
}
