//! The cluster state the compiler reads: the source's objects with the mesh peers' imports laid
//! over them, by the rules of [`crate::mesh::merge_imports`] (a Namespace of the source wins over
//! an imported one of the same name; an imported Pod wins over the source's of the same key).
//!
//! It is kept object by object: a change of the source, or of the imports, costs what it
//! changes, never a copy or a comparison of the whole cluster, and it reports exactly which
//! objects of the merged state changed, so the reconcile task can tell what to recompile.

use std::collections::{BTreeMap, BTreeSet};

use weir_policy::model::{ClusterState, Object, ObjectKey, ObjectRef, StateDelta};

/// What the merged state needs besides itself to take the next change: the imports' objects,
/// and the source's objects an import hides.
#[derive(Debug, Default)]
pub(crate) struct ImportLayer {
    /// The imports' own Namespaces and Pods (`merge_imports` of an empty state).
    imports: ClusterState,
    /// The source's Pods that an imported Pod of the same key hides.
    hidden_pods: BTreeMap<ObjectKey, Object>,
    /// Namespaces the merged state has from the imports (the source has none of that name).
    imported_namespaces: BTreeSet<String>,
}

impl ImportLayer {
    /// Applies a change of the source to `merged`; returns the objects of `merged` that changed.
    pub fn apply_source(&mut self, merged: &mut ClusterState, delta: StateDelta) -> Vec<ObjectRef> {
        let mut changed = Vec::new();
        for (what, now) in delta {
            let before = merged.object(&what);
            match (&what, now) {
                (ObjectRef::Pod(key), now) if self.imports.pods.contains_key(key) => match now {
                    Some(pod) => {
                        self.hidden_pods.insert(key.clone(), pod);
                    }
                    None => {
                        self.hidden_pods.remove(key);
                    }
                },
                (ObjectRef::Namespace(name), None) => match self.imports.namespaces.get(name) {
                    Some(imported) => {
                        merged.namespaces.insert(name.clone(), imported.clone());
                        self.imported_namespaces.insert(name.clone());
                    }
                    None => {
                        merged.namespaces.remove(name);
                    }
                },
                (ObjectRef::Namespace(name), Some(namespace)) => {
                    self.imported_namespaces.remove(name);
                    merged.apply(namespace);
                }
                (_, Some(object)) => merged.apply(object),
                (_, None) => {
                    merged.remove(&what);
                }
            }
            if merged.object(&what) != before {
                changed.push(what);
            }
        }
        changed
    }

    /// Replaces the imports' objects with `imports`; returns the objects of `merged` that
    /// changed.
    pub fn set_imports(
        &mut self,
        merged: &mut ClusterState,
        imports: ClusterState,
    ) -> Vec<ObjectRef> {
        let old = std::mem::replace(&mut self.imports, imports);
        let mut changed = Vec::new();
        let names: BTreeSet<String> = old
            .namespaces
            .keys()
            .chain(self.imports.namespaces.keys())
            .cloned()
            .collect();
        for name in names {
            let source_has =
                merged.namespaces.contains_key(&name) && !self.imported_namespaces.contains(&name);
            if source_has {
                continue;
            }
            let before = merged.namespaces.get(&name).cloned();
            match self.imports.namespaces.get(&name) {
                Some(imported) => {
                    merged.namespaces.insert(name.clone(), imported.clone());
                    self.imported_namespaces.insert(name.clone());
                }
                None => {
                    merged.namespaces.remove(&name);
                    self.imported_namespaces.remove(&name);
                }
            }
            if merged.namespaces.get(&name) != before.as_ref() {
                changed.push(ObjectRef::Namespace(name));
            }
        }
        let keys: BTreeSet<ObjectKey> = old
            .pods
            .keys()
            .chain(self.imports.pods.keys())
            .cloned()
            .collect();
        for key in keys {
            let before = merged.pods.get(&key).cloned();
            match self.imports.pods.get(&key) {
                Some(imported) => {
                    if !old.pods.contains_key(&key)
                        && let Some(source) = merged.pods.remove(&key)
                    {
                        self.hidden_pods.insert(key.clone(), Object::Pod(source));
                    }
                    merged.pods.insert(key.clone(), imported.clone());
                }
                None => match self.hidden_pods.remove(&key) {
                    Some(source) => merged.apply(source),
                    None => {
                        merged.pods.remove(&key);
                    }
                },
            }
            if merged.pods.get(&key) != before.as_ref() {
                changed.push(ObjectRef::Pod(key));
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use weir_policy::model::parse_documents;

    use super::*;

    /// The rules of `merge_imports`, written out over whole states.
    fn merged_from_scratch(source: &ClusterState, imports: &ClusterState) -> ClusterState {
        let mut out = source.clone();
        for (name, namespace) in &imports.namespaces {
            out.namespaces
                .entry(name.clone())
                .or_insert_with(|| namespace.clone());
        }
        for (key, pod) in &imports.pods {
            out.pods.insert(key.clone(), pod.clone());
        }
        out
    }

    /// A random state out of a few names, so the source and the imports often define the same
    /// Namespaces and Pods.
    fn random_state(next: &mut impl FnMut() -> u64) -> ClusterState {
        // Objects named like an import's cannot be written as manifests; the merged state
        // must still keep them apart.
        let mut state = ClusterState::default();
        for name in ["a", "east/a", "b"] {
            if next().is_multiple_of(2) {
                let yaml = format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{v: v{}}}}}\n",
                    next() % 2
                );
                let Some(Ok(Object::Namespace(mut namespace))) =
                    parse_documents(&yaml, "test").pop()
                else {
                    panic!("a namespace");
                };
                std::sync::Arc::make_mut(&mut namespace).metadata.name = name.to_owned();
                state.apply(Object::Namespace(namespace));
            }
        }
        for (namespace, name) in [("a", "p0"), ("a", "p1"), ("east/a", "10.0.0.1")] {
            if next().is_multiple_of(2) {
                let yaml = format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: x, labels: {{v: v{}}}}}\n",
                    next() % 2
                );
                let Some(Ok(Object::Pod(mut pod))) = parse_documents(&yaml, "test").pop() else {
                    panic!("a pod");
                };
                let edited = std::sync::Arc::make_mut(&mut pod);
                edited.metadata.name = name.to_owned();
                edited.metadata.namespace = Some(namespace.to_owned());
                state.apply(Object::Pod(pod));
            }
        }
        state.nodes.clear();
        state
    }

    /// Two peers' imports that collide with each other and with the source: a namespace both
    /// peers and the source define, and an address both peers export.
    fn views() -> Vec<std::sync::Arc<weir_mesh::link::ImportView>> {
        use std::collections::HashMap;

        use weir_mesh::{export::IdentityExport, link::ImportView};
        let view = |cluster: &str, app: &str, addrs: &[&str]| {
            std::sync::Arc::new(ImportView {
                cluster: cluster.into(),
                identities: BTreeMap::from([(
                    300,
                    IdentityExport {
                        id: 300,
                        namespace: "pay".into(),
                        pod_labels: BTreeMap::from([("app".into(), app.into())]),
                        namespace_labels: BTreeMap::from([("team".into(), app.into())]),
                    },
                )]),
                endpoints: addrs
                    .iter()
                    .map(|a| (a.parse().expect("an address"), 300))
                    .collect::<HashMap<_, _>>(),
            })
        };
        vec![
            view("east", "api", &["10.245.0.5", "10.245.0.6"]),
            view("east", "web", &["10.245.0.6", "10.245.0.7"]),
        ]
    }

    #[test]
    fn merging_the_imports_per_object_equals_merge_imports() {
        let mut source = random_state(&mut || 0);
        source.apply(Object::from(weir_policy::model::Pod {
            metadata: weir_policy::model::ObjectMeta {
                name: "10.245.0.5".into(),
                namespace: Some("east/pay".into()),
                labels: BTreeMap::new(),
            },
            ..Default::default()
        }));
        let mut namespace = source.namespaces["a"].clone();
        std::sync::Arc::make_mut(&mut namespace).metadata.name = "east/pay".into();
        source.apply(Object::Namespace(namespace));
        let views = views();
        let expected = crate::mesh::merge_imports(&source, &views);
        let mut layer = ImportLayer::default();
        let mut merged = ClusterState::default();
        layer.apply_source(
            &mut merged,
            StateDelta::between(&ClusterState::default(), &source),
        );
        layer.set_imports(
            &mut merged,
            crate::mesh::merge_imports(&ClusterState::default(), &views),
        );
        assert_eq!(merged, expected);
        // And taken away again, the source's objects are back.
        layer.set_imports(&mut merged, ClusterState::default());
        assert_eq!(merged, source);
    }

    #[test]
    fn the_merged_state_kept_per_object_equals_the_merge_from_scratch() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut layer = ImportLayer::default();
        let mut merged = ClusterState::default();
        let mut source = ClusterState::default();
        let mut imports = ClusterState::default();
        let mut kinds = [0; 2];
        for round in 0..2_000 {
            let before = merged.clone();
            let changed = if next().is_multiple_of(3) {
                imports = random_state(&mut next);
                imports.policies.clear();
                kinds[0] += 1;
                layer.set_imports(&mut merged, imports.clone())
            } else {
                let new = random_state(&mut next);
                let delta = StateDelta::between(&source, &new);
                source = new;
                kinds[1] += 1;
                layer.apply_source(&mut merged, delta)
            };
            assert_eq!(
                merged,
                merged_from_scratch(&source, &imports),
                "after round {round}"
            );
            let changed: BTreeSet<ObjectRef> = changed.into_iter().collect();
            let expected: BTreeSet<ObjectRef> = StateDelta::between(&before, &merged)
                .iter()
                .map(|(what, _)| what.clone())
                .collect();
            assert_eq!(changed, expected, "the changes of round {round}");
        }
        assert!(kinds.iter().all(|n| *n > 100), "both kinds of change ran");
    }
}
