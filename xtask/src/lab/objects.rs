//! Kubernetes objects as the lab handles them: read from YAML/JSON files (several documents, or a
//! `kind: List`), one object per file in the manifests directory the agents read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_yaml::Value;

use super::matrix::Proto;

#[derive(Clone, Debug)]
pub struct Object {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub value: Value,
}

/// A port a pod declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredPort {
    pub port: u16,
    pub proto: Proto,
    pub name: Option<String>,
}

impl Object {
    pub fn from_value(value: Value) -> anyhow::Result<Self> {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .context("object without kind")?
            .to_string();
        let meta = value.get("metadata").context("object without metadata")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .with_context(|| format!("{kind} without metadata.name"))?
            .to_string();
        let namespace = match kind.as_str() {
            "Namespace" | "Node" | "MeshPeer" => None,
            _ => Some(
                meta.get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_string(),
            ),
        };
        let mut object = Object {
            kind,
            namespace,
            name,
            value,
        };
        // Written out explicitly so the file is self-contained.
        if let Some(ns) = object.namespace.clone() {
            object.set_meta("namespace", Value::String(ns));
        }
        Ok(object)
    }

    /// `ns/name` for namespaced objects, `name` otherwise.
    pub fn key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The file this object lives in inside the manifests directory.
    pub fn file_name(&self) -> String {
        file_name(&self.kind, self.namespace.as_deref(), &self.name)
    }

    pub fn set_meta(&mut self, field: &str, value: Value) {
        if let Some(Value::Mapping(meta)) = self.value.get_mut("metadata") {
            meta.insert(Value::String(field.into()), value);
        }
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        if let Some(Value::Mapping(map)) = self.value.get("metadata").and_then(|m| m.get("labels"))
        {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                    labels.insert(k.to_string(), v.to_string());
                }
            }
        }
        labels
    }

    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        let map: serde_yaml::Mapping = labels
            .iter()
            .map(|(k, v)| (Value::String(k.clone()), Value::String(v.clone())))
            .collect();
        self.set_meta("labels", Value::Mapping(map));
    }

    /// `spec.nodeName` of a Pod.
    pub fn node_name(&self) -> Option<String> {
        self.value
            .get("spec")
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    pub fn set_node_name(&mut self, node: &str) {
        if let Some(Value::Mapping(spec)) = self.value.get_mut("spec") {
            spec.insert("nodeName".into(), Value::String(node.into()));
        }
    }

    /// Writes `status.podIP(s)`, as kubelet does after the CNI ADD.
    pub fn set_pod_ips(&mut self, ips: &[String]) {
        let mut status = serde_yaml::Mapping::new();
        status.insert("phase".into(), "Running".into());
        if let Some(first) = ips.first() {
            status.insert("podIP".into(), Value::String(first.clone()));
        }
        let list: Vec<Value> = ips
            .iter()
            .map(|ip| {
                let mut m = serde_yaml::Mapping::new();
                m.insert("ip".into(), Value::String(ip.clone()));
                Value::Mapping(m)
            })
            .collect();
        status.insert("podIPs".into(), Value::Sequence(list));
        if let Value::Mapping(root) = &mut self.value {
            root.insert("status".into(), Value::Mapping(status));
        }
    }

    /// The ports of a Pod's containers.
    pub fn pod_ports(&self) -> Vec<DeclaredPort> {
        let mut ports = Vec::new();
        let containers = self
            .value
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_sequence);
        for container in containers.into_iter().flatten() {
            let list = container.get("ports").and_then(Value::as_sequence);
            for port in list.into_iter().flatten() {
                let Some(number) = port.get("containerPort").and_then(Value::as_u64) else {
                    continue;
                };
                let proto = match port.get("protocol").and_then(Value::as_str) {
                    Some("UDP") => Proto::Udp,
                    Some("SCTP") => continue,
                    _ => Proto::Tcp,
                };
                ports.push(DeclaredPort {
                    port: number as u16,
                    proto,
                    name: port.get("name").and_then(Value::as_str).map(str::to_string),
                });
            }
        }
        ports
    }

    pub fn to_yaml(&self) -> anyhow::Result<String> {
        Ok(serde_yaml::to_string(&self.value)?)
    }
}

pub fn file_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}_{ns}_{name}.yaml", kind.to_lowercase()),
        None => format!("{}_{name}.yaml", kind.to_lowercase()),
    }
}

/// Every object in a file, or in the YAML/JSON files of a directory (sorted by name).
pub fn load(path: &Path) -> anyhow::Result<Vec<Object>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {path:?}"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file:?}"))?;
        objects.extend(parse(&text).with_context(|| format!("parsing {file:?}"))?);
    }
    Ok(objects)
}

pub fn parse(text: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        push(value, &mut objects)?;
    }
    Ok(objects)
}

fn push(value: Value, objects: &mut Vec<Object>) -> anyhow::Result<()> {
    if value.is_null() {
        return Ok(());
    }
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        let items = value
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for item in items {
            push(item, objects)?;
        }
        return Ok(());
    }
    if !value.is_mapping() {
        bail!("a document that is not an object");
    }
    objects.push(Object::from_value(value)?);
    Ok(())
}

/// Writes the object into `dir` atomically (a dotfile renamed into place).
pub fn write(dir: &Path, object: &Object) -> anyhow::Result<()> {
    let name = object.file_name();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, object.to_yaml()?).with_context(|| format!("writing {tmp:?}"))?;
    std::fs::rename(&tmp, dir.join(&name)).with_context(|| format!("renaming into {name}"))?;
    Ok(())
}

pub fn read(dir: &Path, kind: &str, namespace: Option<&str>, name: &str) -> anyhow::Result<Object> {
    let path = dir.join(file_name(kind, namespace, name));
    let mut objects = load(&path)?;
    objects
        .pop()
        .with_context(|| format!("{path:?} holds no object"))
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents_and_lists() {
        let objects = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
             kind: List\nitems:\n- kind: Pod\n  metadata: {name: a, namespace: x}\n  spec:\n    containers:\n    - ports:\n      - containerPort: 80\n        name: serve-80-tcp\n      - containerPort: 53\n        protocol: UDP\n",
        )
        .unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].key(), "x/a");
        assert_eq!(objects[1].file_name(), "pod_x_a.yaml");
        let ports = objects[1].pod_ports();
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[1].proto, Proto::Udp);
    }
}
