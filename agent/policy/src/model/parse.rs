//! Manifests text → objects: several YAML documents per file, JSON, and `kind: List`.

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::{MeshPeer, Namespace, NetworkPolicy, Node, Object, Pod};

/// Why one document (or one item of a `List`) could not be read. Every variant names the file
/// (`origin`) and the document's index in it (from 0); items of a `List` also their index.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{origin}: document {document}: not valid YAML or JSON: {source}")]
    Syntax {
        origin: String,
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "{origin}: document {document}{item}: expected an object (a mapping with apiVersion and kind)"
    )]
    NotAnObject {
        origin: String,
        document: usize,
        item: ItemIndex,
    },
    #[error(
        "{origin}: document {document}{item}: no `kind` field; every object needs apiVersion and kind"
    )]
    MissingKind {
        origin: String,
        document: usize,
        item: ItemIndex,
    },
    #[error(
        "{origin}: document {document}{item}: unsupported kind `{kind}` (apiVersion `{api_version}`); Weir reads v1 Namespace, Pod, Node, List, networking.k8s.io/v1 NetworkPolicy and weir.io/v1alpha1 MeshPeer"
    )]
    UnknownKind {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: String,
        api_version: String,
    },
    #[error("{origin}: document {document}{item}: `kind: List` needs an `items` list")]
    BadList {
        origin: String,
        document: usize,
        item: ItemIndex,
    },
    #[error(
        "{origin}: document {document}{item}: {kind} `{name}` does not have the expected shape: {source}"
    )]
    Shape {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: &'static str,
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: document {document}{item}: {kind} has no metadata.name")]
    MissingName {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: &'static str,
    },
}

/// Position inside a `kind: List` (displayed as ` item N`), or nothing at top level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemIndex(pub Vec<usize>);

impl std::fmt::Display for ItemIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for i in &self.0 {
            write!(f, " item {i}")?;
        }
        Ok(())
    }
}

/// Nesting bound for `List`s inside `List`s.
const MAX_LIST_DEPTH: usize = 4;

/// Reads every object in `text` (YAML 1.2 documents separated by `---`, or JSON), applying the
/// API server's defaulting. `origin` (usually the file name) is named in every error. Empty
/// documents are skipped. One bad document does not affect the others.
pub fn parse_documents(text: &str, origin: &str) -> Vec<Result<Object, ParseError>> {
    let mut out = Vec::new();
    for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize_from(de) {
            Ok(Value::Null) => {}
            Ok(value) => read_value(value, origin, document, &mut Vec::new(), &mut out),
            Err(source) => {
                out.push(Err(ParseError::Syntax {
                    origin: origin.to_owned(),
                    document,
                    source,
                }));
                // After a syntax error the YAML stream cannot be resumed reliably.
                break;
            }
        }
    }
    out
}

trait DeserializeFrom: Sized {
    fn deserialize_from(de: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error>;
}

impl DeserializeFrom for Value {
    fn deserialize_from(de: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error> {
        serde::Deserialize::deserialize(de)
    }
}

fn read_value(
    value: Value,
    origin: &str,
    document: usize,
    item: &mut Vec<usize>,
    out: &mut Vec<Result<Object, ParseError>>,
) {
    let idx = || ItemIndex(item.clone());
    let Value::Mapping(map) = &value else {
        out.push(Err(ParseError::NotAnObject {
            origin: origin.to_owned(),
            document,
            item: idx(),
        }));
        return;
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        _ => {
            out.push(Err(ParseError::MissingKind {
                origin: origin.to_owned(),
                document,
                item: idx(),
            }));
            return;
        }
    };
    let api_version = match map.get("apiVersion") {
        Some(Value::String(v)) => v.clone(),
        _ => String::new(),
    };
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let typed = |kind: &'static str| -> Result<(), ParseError> {
        if name.is_empty() {
            return Err(ParseError::MissingName {
                origin: origin.to_owned(),
                document,
                item: idx(),
                kind,
            });
        }
        Ok(())
    };
    let shape = |kind: &'static str, source| ParseError::Shape {
        origin: origin.to_owned(),
        document,
        item: idx(),
        kind,
        name: name.clone(),
        source,
    };
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1" | "", "List") => {
            let items = match map.get("items") {
                Some(Value::Sequence(items)) if item.len() < MAX_LIST_DEPTH => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                _ => {
                    out.push(Err(ParseError::BadList {
                        origin: origin.to_owned(),
                        document,
                        item: idx(),
                    }));
                    return;
                }
            };
            for (i, v) in items.into_iter().enumerate() {
                item.push(i);
                read_value(v, origin, document, item, out);
                item.pop();
            }
            return;
        }
        ("v1", "Namespace") => typed("Namespace").and_then(|()| {
            let mut n: Namespace = from_value(value).map_err(|e| shape("Namespace", e))?;
            n.apply_defaults();
            Ok(Object::Namespace(n))
        }),
        ("v1", "Pod") => typed("Pod").and_then(|()| {
            let p: Pod = from_value(value).map_err(|e| shape("Pod", e))?;
            Ok(Object::Pod(p))
        }),
        ("v1", "Node") => typed("Node").and_then(|()| {
            let n: Node = from_value(value).map_err(|e| shape("Node", e))?;
            Ok(Object::Node(n))
        }),
        ("weir.io/v1alpha1", "MeshPeer") => typed("MeshPeer").and_then(|()| {
            let p: MeshPeer = from_value(value).map_err(|e| shape("MeshPeer", e))?;
            Ok(Object::MeshPeer(p))
        }),
        ("networking.k8s.io/v1", "NetworkPolicy") => typed("NetworkPolicy").and_then(|()| {
            let mut p: NetworkPolicy = from_value(value).map_err(|e| shape("NetworkPolicy", e))?;
            p.apply_defaults();
            Ok(Object::NetworkPolicy(p))
        }),
        _ => Err(ParseError::UnknownKind {
            origin: origin.to_owned(),
            document,
            item: idx(),
            kind,
            api_version,
        }),
    };
    out.push(result);
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, serde_yaml::Error> {
    serde_yaml::from_value(value)
}
