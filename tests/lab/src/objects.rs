//! Kubernetes objects as the lab handles them. They are read through the compiler's model
//! (`weir_policy::model::parse_documents`, the agents' own parser, with its limits, defaulting
//! and errors), so the lab and the agents agree on what a manifest holds; a directory is read
//! under the agents' file rules ([`model::is_manifest_file`]: YAML or JSON, no dotfiles). Each
//! object is written to a file of its own in the manifests directory the agents read, as the
//! model serializes it: exactly the fields the agents read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use weir_policy::model::{self, NAMESPACE_NAME_LABEL, ObjectMeta};

use crate::matrix::Proto;

/// One object of a manifest, as the compiler reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object(pub model::Object);

/// A port a pod declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredPort {
    pub port: u16,
    pub proto: Proto,
    pub name: Option<String>,
}

impl Object {
    /// Takes a parsed object; namespaced objects get their namespace written out (`default`
    /// when absent), so that the file is self-contained.
    fn new(mut object: model::Object) -> Self {
        let meta = match &mut object {
            model::Object::Pod(p) => Some(&mut Arc::make_mut(p).metadata),
            model::Object::NetworkPolicy(p) => Some(&mut Arc::make_mut(p).metadata),
            _ => None,
        };
        if let Some(meta) = meta
            && meta.namespace.is_none()
        {
            meta.namespace = Some("default".to_owned());
        }
        Object(object)
    }

    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            model::Object::Namespace(o) => &o.metadata,
            model::Object::Pod(o) => &o.metadata,
            model::Object::NetworkPolicy(o) => &o.metadata,
            model::Object::Node(o) => &o.metadata,
            model::Object::MeshPeer(o) => &o.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            model::Object::Namespace(o) => &mut Arc::make_mut(o).metadata,
            model::Object::Pod(o) => &mut Arc::make_mut(o).metadata,
            model::Object::NetworkPolicy(o) => &mut Arc::make_mut(o).metadata,
            model::Object::Node(o) => &mut Arc::make_mut(o).metadata,
            model::Object::MeshPeer(o) => &mut Arc::make_mut(o).metadata,
        }
    }

    pub fn name(&self) -> &str {
        &self.meta().name
    }

    /// The namespace of a namespaced object.
    pub fn namespace(&self) -> Option<&str> {
        self.meta().namespace.as_deref()
    }

    /// `ns/name` for namespaced objects, `name` otherwise.
    pub fn key(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{ns}/{}", self.name()),
            None => self.name().to_owned(),
        }
    }

    /// The file this object lives in inside the manifests directory.
    pub fn file_name(&self) -> String {
        file_name(self.kind(), self.namespace(), self.name())
    }

    /// The labels the object carries. A Namespace's do not include the one the API server adds
    /// to every Namespace (`kubernetes.io/metadata.name`), which the agents add themselves.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.meta().labels.clone();
        if let model::Object::Namespace(n) = &self.0
            && labels.get(NAMESPACE_NAME_LABEL) == Some(&n.metadata.name)
        {
            labels.remove(NAMESPACE_NAME_LABEL);
        }
        labels
    }

    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        self.meta_mut().labels = labels.clone();
    }

    fn pod(&self) -> Option<&model::Pod> {
        match &self.0 {
            model::Object::Pod(p) => Some(p),
            _ => None,
        }
    }

    /// `spec.nodeName` of a Pod.
    pub fn node_name(&self) -> Option<String> {
        self.pod()?.spec.node_name.clone()
    }

    pub fn set_node_name(&mut self, node: &str) {
        if let model::Object::Pod(p) = &mut self.0 {
            Arc::make_mut(p).spec.node_name = Some(node.to_owned());
        }
    }

    /// Writes `status.podIPs` and the Running phase, as kubelet does after the CNI ADD.
    pub fn set_pod_ips(&mut self, ips: &[String]) {
        if let model::Object::Pod(p) = &mut self.0 {
            let p = Arc::make_mut(p);
            p.status.phase = Some("Running".to_owned());
            p.status.pod_ips = ips
                .iter()
                .map(|ip| model::PodIp { ip: ip.clone() })
                .collect();
        }
    }

    /// The TCP and UDP ports of a Pod's containers.
    pub fn pod_ports(&self) -> Vec<DeclaredPort> {
        let containers = self.pod().map(|p| p.spec.containers.as_slice());
        containers
            .unwrap_or_default()
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|port| {
                let proto = match port.protocol.as_str() {
                    "UDP" => Proto::Udp,
                    "TCP" => Proto::Tcp,
                    _ => return None,
                };
                Some(DeclaredPort {
                    port: u16::try_from(port.container_port).ok()?,
                    proto,
                    name: port.name.clone(),
                })
            })
            .collect()
    }

    /// The object as a Kubernetes manifest (apiVersion, kind and the fields the model keeps).
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = self.0.clone();
        if let model::Object::Namespace(n) = &mut object {
            Arc::make_mut(n).metadata.labels = self.labels();
        }
        let mut value = match &object {
            model::Object::Namespace(o) => serde_json::to_value(&**o),
            model::Object::Pod(o) => serde_json::to_value(&**o),
            model::Object::NetworkPolicy(o) => serde_json::to_value(&**o),
            model::Object::Node(o) => serde_json::to_value(&**o),
            model::Object::MeshPeer(o) => serde_json::to_value(&**o),
        }
        .expect("the model's objects serialize");
        value["apiVersion"] = self.0.api_version().into();
        value["kind"] = self.kind().into();
        value
    }
}

/// The file of an object in the manifests directory: `<kind>_<namespace>_<name>.json`.
pub fn file_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}_{ns}_{name}.json", kind.to_lowercase()),
        None => format!("{}_{name}.json", kind.to_lowercase()),
    }
}

/// Every object in a file, or in the manifests of a directory (sorted by name) as the agents
/// would read it.
pub fn load(path: &Path) -> anyhow::Result<Vec<Object>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {path:?}"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && model::is_manifest_file(p))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file:?}"))?;
        objects.extend(parse_from(&text, &file.display().to_string())?);
    }
    Ok(objects)
}

/// Every object in manifests text (YAML documents or JSON, `kind: List` too).
pub fn parse(text: &str) -> anyhow::Result<Vec<Object>> {
    parse_from(text, "the manifests given")
}

/// Reads `text` as the agents do; what they would reject is an error here, naming the object
/// and the field: the lab writes objects as the model serializes them, which for a rejected
/// object would not be what was given.
fn parse_from(text: &str, origin: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for parsed in model::parse_documents(text, origin) {
        match parsed {
            Ok(model::Object::NetworkPolicy(p)) if !p.problems.is_empty() => {
                for problem in &p.problems {
                    errors.push(format!(
                        "NetworkPolicy {}: {}: {}",
                        p.metadata.name, problem.field, problem.reason
                    ));
                }
            }
            Ok(object) => objects.push(Object::new(object)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!(
            "the agents would reject these objects; fix them first:\n{}",
            errors.join("\n")
        );
    }
    Ok(objects)
}

/// Writes the object into `dir` atomically: a dotfile (which the agents ignore) renamed into
/// place.
pub fn write(dir: &Path, object: &Object) -> anyhow::Result<()> {
    let name = object.file_name();
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_string_pretty(&object.to_json())?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {tmp:?}"))?;
    std::fs::rename(&tmp, dir.join(&name)).with_context(|| format!("renaming into {name}"))?;
    Ok(())
}

/// The object of `kind` named so in `dir`.
pub fn read(dir: &Path, kind: &str, namespace: Option<&str>, name: &str) -> anyhow::Result<Object> {
    let path = dir.join(file_name(kind, namespace, name));
    let mut objects = load(&path)?;
    objects
        .pop()
        .with_context(|| format!("{path:?} holds no object"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents_and_lists() {
        let objects = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, namespace: x}\n  spec:\n    containers:\n    - ports:\n      - containerPort: 80\n        name: serve-80-tcp\n      - containerPort: 53\n        protocol: UDP\n",
        )
        .unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].key(), "x/a");
        assert_eq!(objects[1].file_name(), "pod_x_a.json");
        let ports = objects[1].pod_ports();
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[1].proto, Proto::Udp);
    }

    #[test]
    fn a_written_object_reads_back_the_same() {
        let dir = std::env::temp_dir().join(format!("weir-lab-objects-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut objects = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c}]}\n",
        )
        .unwrap();
        objects[1].set_node_name("node1");
        objects[1].set_pod_ips(&["10.1.0.2".to_owned()]);
        for object in &objects {
            write(&dir, object).unwrap();
        }
        let namespace = read(&dir, "Namespace", None, "x").unwrap();
        assert_eq!(
            namespace.labels(),
            BTreeMap::from([("team".to_owned(), "a".to_owned())])
        );
        let pod = read(&dir, "Pod", Some("x"), "a").unwrap();
        assert_eq!(pod, objects[1]);
        assert_eq!(pod.node_name().as_deref(), Some("node1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dotfiles_are_not_manifests_for_the_lab_either() {
        let dir = std::env::temp_dir().join(format!("weir-lab-dotfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        std::fs::write(dir.join("a.yaml"), ns("a")).unwrap();
        std::fs::write(dir.join(".b.yaml"), ns("b")).unwrap();
        std::fs::write(dir.join("c.yaml~"), ns("c")).unwrap();
        let names: Vec<String> = load(&dir).unwrap().iter().map(Object::key).collect();
        assert_eq!(names, ["a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_the_agents_would_reject_is_an_error_naming_the_object() {
        let e = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {ingress: 7}\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("NetworkPolicy p: spec"), "{e:#}");
    }
}
