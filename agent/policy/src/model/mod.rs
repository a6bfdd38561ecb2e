//! Kubernetes objects as the compiler reads them, and the cluster state they add up to.

mod delta;
mod labels;
mod mesh_peer;
mod objects;
mod parse;

use std::{collections::BTreeMap, sync::Arc};

pub use delta::StateDelta;
pub use labels::Labels;
pub use mesh_peer::*;
pub use objects::*;
pub use parse::{
    InvalidObject, MAX_FILE_BYTES, MAX_OBJECT_BYTES, MESH_PEER_API_VERSION, ParseError,
    parse_documents,
};

/// Namespace and name of a namespaced object.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One object the compiler understands, defaulted as the API server would.
///
/// Objects are shared, never copied: the manifests source's files, its state, the changes it
/// hands on and the reconcile task's merged state all hold the same allocation of an object
/// (a cluster of 10,000 policies would otherwise be held three times over).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    NetworkPolicy(Arc<NetworkPolicy>),
    Node(Arc<Node>),
    MeshPeer(Arc<MeshPeer>),
}

/// Which object an [`Object`] is: its kind and key, for removal and duplicate detection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectRef {
    Namespace(String),
    Pod(ObjectKey),
    NetworkPolicy(ObjectKey),
    Node(String),
    MeshPeer(String),
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectRef::Namespace(n) => write!(f, "Namespace {n}"),
            ObjectRef::Pod(k) => write!(f, "Pod {k}"),
            ObjectRef::NetworkPolicy(k) => write!(f, "NetworkPolicy {k}"),
            ObjectRef::Node(n) => write!(f, "Node {n}"),
            ObjectRef::MeshPeer(n) => write!(f, "MeshPeer {n}"),
        }
    }
}

fn key_of(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone(),
    )
}

/// Whether a file of a manifests directory is read as manifests: YAML or JSON by its name, not
/// a dotfile (editors' and atomic writers' temporary files) nor an editor's backup (`name~`).
pub fn is_manifest_file(path: &std::path::Path) -> bool {
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

macro_rules! object_from {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(object: $kind) -> Self {
                Object::$kind(Arc::new(object))
            }
        }

        impl From<Arc<$kind>> for Object {
            fn from(object: Arc<$kind>) -> Self {
                Object::$kind(object)
            }
        }
    )*};
}
object_from!(Namespace, Pod, NetworkPolicy, Node, MeshPeer);

impl Object {
    /// The object's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::Node(_) => "Node",
            Object::MeshPeer(_) => "MeshPeer",
        }
    }

    /// The `apiVersion` its kind is served at.
    pub fn api_version(&self) -> &'static str {
        match self {
            Object::Namespace(_) | Object::Pod(_) | Object::Node(_) => "v1",
            Object::NetworkPolicy(_) => "networking.k8s.io/v1",
            Object::MeshPeer(_) => MESH_PEER_API_VERSION,
        }
    }

    /// The object's kind and key. Namespaced objects without a namespace are in `default`.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Object::Namespace(n) => ObjectRef::Namespace(n.metadata.name.clone()),
            Object::Pod(p) => ObjectRef::Pod(key_of(&p.metadata)),
            Object::NetworkPolicy(p) => ObjectRef::NetworkPolicy(key_of(&p.metadata)),
            Object::Node(n) => ObjectRef::Node(n.metadata.name.clone()),
            Object::MeshPeer(p) => ObjectRef::MeshPeer(p.metadata.name.clone()),
        }
    }
}

/// Everything the compiler reads: the objects of the cluster, by name or key. Objects are
/// shared ([`Arc`]): a clone of the state copies no object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub policies: BTreeMap<ObjectKey, Arc<NetworkPolicy>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Peer clusters of the mesh link (read by gateways; the compiler does not use them).
    pub mesh_peers: BTreeMap<String, Arc<MeshPeer>>,
}

impl ClusterState {
    /// Adds or replaces an object. Defaulting is applied again (idempotent), so objects built in
    /// code behave like parsed ones; an object already defaulted (any parsed one) is kept as
    /// it is, shared with whoever else holds it.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Namespace(mut n) => {
                if !n.is_defaulted() {
                    Arc::make_mut(&mut n).apply_defaults();
                }
                self.namespaces.insert(n.metadata.name.clone(), n);
            }
            Object::Pod(mut p) => {
                let key = key_of(&p.metadata);
                if p.metadata.namespace.as_ref() != Some(&key.namespace) {
                    Arc::make_mut(&mut p).metadata.namespace = Some(key.namespace.clone());
                }
                self.pods.insert(key, p);
            }
            Object::NetworkPolicy(mut p) => {
                let key = key_of(&p.metadata);
                if !p.is_defaulted() || p.metadata.namespace.as_ref() != Some(&key.namespace) {
                    let p = Arc::make_mut(&mut p);
                    p.apply_defaults();
                    p.metadata.namespace = Some(key.namespace.clone());
                }
                self.policies.insert(key, p);
            }
            Object::Node(n) => {
                self.nodes.insert(n.metadata.name.clone(), n);
            }
            Object::MeshPeer(p) => {
                self.mesh_peers.insert(p.metadata.name.clone(), p);
            }
        }
    }

    /// Removes an object; returns whether it was there.
    pub fn remove(&mut self, what: &ObjectRef) -> bool {
        match what {
            ObjectRef::Namespace(n) => self.namespaces.remove(n).is_some(),
            ObjectRef::Pod(k) => self.pods.remove(k).is_some(),
            ObjectRef::NetworkPolicy(k) => self.policies.remove(k).is_some(),
            ObjectRef::Node(n) => self.nodes.remove(n).is_some(),
            ObjectRef::MeshPeer(n) => self.mesh_peers.remove(n).is_some(),
        }
    }

    /// The object's definition in this state, if it has one.
    pub fn object(&self, what: &ObjectRef) -> Option<Object> {
        match what {
            ObjectRef::Namespace(n) => self.namespaces.get(n).cloned().map(Object::Namespace),
            ObjectRef::Pod(k) => self.pods.get(k).cloned().map(Object::Pod),
            ObjectRef::NetworkPolicy(k) => self.policies.get(k).cloned().map(Object::NetworkPolicy),
            ObjectRef::Node(n) => self.nodes.get(n).cloned().map(Object::Node),
            ObjectRef::MeshPeer(n) => self.mesh_peers.get(n).cloned().map(Object::MeshPeer),
        }
    }

    /// Whether `namespaceSelector`s may match the namespace: not when its Namespace object
    /// was rejected (its real labels are unknown, so it matches none, fail closed).
    pub fn namespace_selectable(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .is_none_or(|n| n.rejected.is_none())
    }

    /// Labels of a namespace. A namespace without a Namespace object (yet) still carries the
    /// `kubernetes.io/metadata.name` label the API server would give it.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        match self.namespaces.get(namespace) {
            Some(n) => n.metadata.labels.clone(),
            None => BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n";

    fn parsed(yaml: &str) -> Object {
        parse_documents(yaml, "test").pop().unwrap().unwrap()
    }

    #[test]
    fn a_parsed_object_is_applied_without_a_copy() {
        let Object::NetworkPolicy(policy) = parsed(POLICY) else {
            panic!("a policy");
        };
        let mut state = ClusterState::default();
        state.apply(Object::NetworkPolicy(policy.clone()));
        assert!(Arc::ptr_eq(
            &policy,
            &state.policies[&ObjectKey::new("x", "p")]
        ));
        // A clone of the state shares every object.
        let copy = state.clone();
        assert!(Arc::ptr_eq(
            &copy.policies[&ObjectKey::new("x", "p")],
            &state.policies[&ObjectKey::new("x", "p")]
        ));
        assert_eq!(copy, state);
    }

    #[test]
    fn an_object_built_in_code_is_defaulted_like_a_parsed_one() {
        let mut built = NetworkPolicy::default();
        built.metadata.name = "p".into();
        built.metadata.namespace = Some("x".into());
        let shared = Arc::new(built);
        let mut state = ClusterState::default();
        state.apply(Object::NetworkPolicy(shared.clone()));
        let applied = &state.policies[&ObjectKey::new("x", "p")];
        assert!(!Arc::ptr_eq(&shared, applied), "defaulting made a copy");
        assert_eq!(
            shared.spec.policy_types, None,
            "the caller's object is untouched"
        );
        let mut reference = ClusterState::default();
        reference.apply(parsed(POLICY));
        assert_eq!(state, reference);

        let mut pod = Pod::default();
        pod.metadata.name = "q".into();
        state.apply(pod.into());
        let key = ObjectKey::new("default", "q");
        assert_eq!(
            state.pods[&key].metadata.namespace.as_deref(),
            Some("default")
        );
    }
}
