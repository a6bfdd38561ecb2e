//! Manifests text → objects: several YAML documents per file, JSON, and `kind: List`, checked
//! the way the API server checks them before storing anything.
//!
//! - **Size**: a file holds at most [`MAX_FILE_BYTES`] (it may carry many objects: a `List` of
//!   10,000 policies is about 6 MB), an object at most [`MAX_OBJECT_BYTES`] as JSON (etcd's
//!   default request limit, so the largest object a cluster can store; the API server's own
//!   request limit is 3 MiB). A larger file is refused before YAML parsing.
//! - **apiVersion and kind**: `v1` Namespace, Pod and Node, `networking.k8s.io/v1`
//!   NetworkPolicy (the only versions today's API servers serve), `v1` List.
//! - **Names and labels**: Pod, Node and NetworkPolicy names are DNS-1123 subdomains, Namespace
//!   names and the namespace of namespaced objects DNS-1123 labels, label keys qualified names
//!   and values valid label values ([`crate::names`]).
//!
//! What a rejection does is chosen so that it never opens traffic:
//! - A **Pod** or **Node** is dropped (with the error). A dropped local Pod cannot be wired (the
//!   CNI ADD waits for a Pod it never gets, and fails), and an already wired one loses its map
//!   entries, so its packets drop as an unknown endpoint's; as a peer, a dropped pod is a plain
//!   address, which only pod selectors would have matched more widely.
//! - A **Namespace** whose name is valid stays, without its labels and marked rejected: it is
//!   matched by no `namespaceSelector` (it must not match a `NotIn` its real labels would fail).
//!   One with an invalid name is dropped: no valid Pod or policy can be in it.
//! - A **NetworkPolicy** (any document of kind NetworkPolicy) that cannot be read whole keeps
//!   its namespace, its `podSelector` (empty, every pod of the namespace, if unreadable) and
//!   its `policyTypes` (both if unreadable) and carries the reasons
//!   ([`NetworkPolicy::problems`]); validation rejects it and it isolates without allowing.
//!   Only a policy whose namespace is not a string is dropped: it cannot be placed.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use yaml_serde::{Mapping, Value};

use super::{LabelSelector, MeshPeer, Namespace, NetworkPolicy, Node, Object, Pod, Problem};
use crate::names;

/// The apiVersion of Weir's own MeshPeer kind.
pub const MESH_PEER_API_VERSION: &str = "weir.io/v1alpha1";
/// Largest manifest file read (bytes). Files are read whole, so this also bounds the memory
/// one file can make the agent use.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Largest object (bytes of its JSON encoding): etcd's default limit, 1.5 MiB.
pub const MAX_OBJECT_BYTES: usize = 1536 << 10;
/// Largest `podSelector` a rejected NetworkPolicy keeps (bytes); a larger one is replaced by
/// the empty selector (every pod of the namespace), which fails closed.
const MAX_KEPT_SELECTOR_BYTES: usize = 64 << 10;

/// Why one document (or one item of a `List`) could not be read. Every variant names the file
/// (`origin`) and the document's index in it (from 0); items of a `List` also their index.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{origin}: document {document}: not valid YAML or JSON: {source}")]
    Syntax {
        origin: String,
        document: usize,
        #[source]
        source: yaml_serde::Error,
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
        source: yaml_serde::Error,
    },
    #[error("{origin}: document {document}{item}: {kind} has no metadata.name")]
    MissingName {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: &'static str,
    },
    #[error(
        "{origin}: {bytes} bytes, more than the {limit} a manifest file may have; split it into several files"
    )]
    FileTooLarge {
        origin: String,
        bytes: usize,
        limit: usize,
    },
    #[error(
        "{origin}: document {document}{item}: {kind} {name} is more than {limit} bytes (the largest object a cluster stores); make it smaller"
    )]
    ObjectTooLarge {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: String,
        name: String,
        limit: usize,
    },
    #[error(
        "{origin}: document {document}{item}: apiVersion `{api_version}` is not served for {kind}; use `{expected}`"
    )]
    ApiVersion {
        origin: String,
        document: usize,
        item: ItemIndex,
        kind: &'static str,
        api_version: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Invalid(Box<InvalidObject>),
    #[error(
        "{origin}: document {document}{item}: NetworkPolicy {name}: metadata.namespace is not a string; the policy cannot be placed in a namespace and is ignored"
    )]
    PolicyNamespace {
        origin: String,
        document: usize,
        item: ItemIndex,
        name: String,
    },
}

/// An object with a field the API server would refuse.
#[derive(Debug)]
pub struct InvalidObject {
    pub origin: String,
    pub document: usize,
    pub item: ItemIndex,
    pub kind: &'static str,
    /// The object's name, cut if long.
    pub name: String,
    /// JSON path of the field, e.g. `metadata.labels`.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: document {}{}: {} {}: {}: {}",
            self.origin, self.document, self.item, self.kind, self.name, self.field, self.reason
        )
    }
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
    if text.len() > MAX_FILE_BYTES {
        out.push(Err(ParseError::FileTooLarge {
            origin: origin.to_owned(),
            bytes: text.len(),
            limit: MAX_FILE_BYTES,
        }));
        return out;
    }
    for (document, de) in yaml_serde::Deserializer::from_str(text).enumerate() {
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

impl ParseError {
    /// Whether the error concerns the whole file rather than one document: the file is too large
    /// or its YAML stream broke, so what the rest of it holds is unknown.
    pub fn is_whole_file(&self) -> bool {
        matches!(self, Self::Syntax { .. } | Self::FileTooLarge { .. })
    }
}

trait DeserializeFrom: Sized {
    fn deserialize_from(de: yaml_serde::Deserializer<'_>) -> Result<Self, yaml_serde::Error>;
}

impl DeserializeFrom for Value {
    fn deserialize_from(de: yaml_serde::Deserializer<'_>) -> Result<Self, yaml_serde::Error> {
        serde::Deserialize::deserialize(de)
    }
}

/// Where a document is: for errors.
struct At<'a> {
    origin: &'a str,
    document: usize,
    item: ItemIndex,
}

fn read_value(
    value: Value,
    origin: &str,
    document: usize,
    item: &mut Vec<usize>,
    out: &mut Vec<Result<Object, ParseError>>,
) {
    let at = At {
        origin,
        document,
        item: ItemIndex(item.clone()),
    };
    let Value::Mapping(map) = &value else {
        out.push(Err(ParseError::NotAnObject {
            origin: origin.to_owned(),
            document,
            item: at.item,
        }));
        return;
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        _ => {
            out.push(Err(ParseError::MissingKind {
                origin: origin.to_owned(),
                document,
                item: at.item,
            }));
            return;
        }
    };
    let api_version = match map.get("apiVersion") {
        Some(Value::String(v)) => v.clone(),
        _ => String::new(),
    };
    if kind == "List" && matches!(api_version.as_str(), "v1" | "") {
        let items = match map.get("items") {
            Some(Value::Sequence(items)) if item.len() < MAX_LIST_DEPTH => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            _ => {
                out.push(Err(ParseError::BadList {
                    origin: origin.to_owned(),
                    document,
                    item: at.item,
                }));
                return;
            }
        };
        drop(value);
        for (i, v) in items.into_iter().enumerate() {
            item.push(i);
            read_value(v, origin, document, item, out);
            item.pop();
        }
        return;
    }
    let kind: &'static str = match kind.as_str() {
        "Namespace" => "Namespace",
        "Pod" => "Pod",
        "Node" => "Node",
        "MeshPeer" => "MeshPeer",
        "NetworkPolicy" => {
            out.push(network_policy(value, &api_version, &at));
            return;
        }
        _ => {
            out.push(Err(ParseError::UnknownKind {
                origin: origin.to_owned(),
                document,
                item: at.item,
                kind,
                api_version,
            }));
            return;
        }
    };
    let expected = if kind == "MeshPeer" {
        MESH_PEER_API_VERSION
    } else {
        "v1"
    };
    if api_version != expected {
        out.push(Err(ParseError::ApiVersion {
            origin: origin.to_owned(),
            document,
            item: at.item,
            kind,
            api_version,
            expected,
        }));
        return;
    }
    let raw_name = metadata_str(map, "name").unwrap_or("").to_owned();
    if raw_name.is_empty() {
        out.push(Err(ParseError::MissingName {
            origin: origin.to_owned(),
            document,
            item: at.item,
            kind,
        }));
        return;
    }
    let name = names::shown(&raw_name);
    let invalid = |field: &str, reason: String| {
        ParseError::Invalid(Box::new(InvalidObject {
            origin: origin.to_owned(),
            document,
            item: at.item.clone(),
            kind,
            name: name.clone(),
            field: field.to_owned(),
            reason,
        }))
    };
    let name_problem = if kind == "Namespace" {
        names::dns1123_label(&raw_name)
    } else {
        names::dns1123_subdomain(&raw_name)
    };
    if let Some(why) = name_problem {
        // A Namespace with an invalid name is dropped too: no valid Pod or policy is in it.
        out.push(Err(invalid("metadata.name", format!("the name {why}"))));
        return;
    }
    // A rejected Namespace with a valid name stays, labels dropped and marked (fail closed).
    let namespace_stub = |reason: String| {
        let mut n = Namespace::default();
        n.metadata.name = raw_name.clone();
        n.apply_defaults();
        n.rejected = Some(reason);
        Ok(Object::Namespace(Arc::new(n)))
    };
    if encoded_size(&value, MAX_OBJECT_BYTES) > MAX_OBJECT_BYTES {
        let e = ParseError::ObjectTooLarge {
            origin: origin.to_owned(),
            document,
            item: at.item.clone(),
            kind: kind.to_owned(),
            name: name.clone(),
            limit: MAX_OBJECT_BYTES,
        };
        let reason = e.to_string();
        out.push(Err(e));
        if kind == "Namespace" {
            out.push(namespace_stub(reason));
        }
        return;
    }
    let shape = |source| ParseError::Shape {
        origin: origin.to_owned(),
        document,
        item: at.item.clone(),
        kind,
        name: raw_name.clone(),
        source,
    };
    let (object, meta) = match kind {
        "Namespace" => match from_value::<Namespace>(value) {
            Ok(mut n) => {
                n.apply_defaults();
                let meta = n.metadata.clone();
                (Object::Namespace(Arc::new(n)), meta)
            }
            Err(e) => {
                let e = shape(e);
                let reason = e.to_string();
                out.push(Err(e));
                out.push(namespace_stub(reason));
                return;
            }
        },
        "Pod" => match from_value::<Pod>(value) {
            Ok(p) => {
                let meta = p.metadata.clone();
                (Object::Pod(Arc::new(p)), meta)
            }
            Err(e) => {
                out.push(Err(shape(e)));
                return;
            }
        },
        "MeshPeer" => match from_value::<MeshPeer>(value) {
            Ok(p) => {
                let meta = p.metadata.clone();
                (Object::MeshPeer(Arc::new(p)), meta)
            }
            Err(e) => {
                out.push(Err(shape(e)));
                return;
            }
        },
        _ => match from_value::<Node>(value) {
            Ok(n) => {
                let meta = n.metadata.clone();
                (Object::Node(Arc::new(n)), meta)
            }
            Err(e) => {
                out.push(Err(shape(e)));
                return;
            }
        },
    };
    if kind == "Pod"
        && let Some(ns) = &meta.namespace
        && let Some(why) = names::dns1123_label(ns)
    {
        out.push(Err(invalid(
            "metadata.namespace",
            format!("namespace {}", names::why_of(ns, &why)),
        )));
        return;
    }
    if let Some(why) = names::first_bad_label(&meta.labels) {
        let e = invalid("metadata.labels", why);
        let reason = e.to_string();
        out.push(Err(e));
        if kind == "Namespace" {
            out.push(namespace_stub(reason));
        }
        return;
    }
    out.push(Ok(object));
}

/// A string field of `metadata`, if it is one.
fn metadata_str<'a>(map: &'a Mapping, field: &str) -> Option<&'a str> {
    map.get("metadata")?.get(field)?.as_str()
}

/// A name or namespace as the key of a rejected policy: invalid ones longer than any valid
/// name are cut (still invalid, so still rejected), so that logs and Events stay small.
fn bounded(text: &str) -> String {
    if text.len() <= names::DNS1123_SUBDOMAIN_MAX {
        text.to_owned()
    } else {
        names::shown(text)
    }
}

/// A document of kind NetworkPolicy. Anything wrong with it still yields a policy (see the
/// module docs), unless its namespace cannot be read.
fn network_policy(value: Value, api_version: &str, at: &At<'_>) -> Result<Object, ParseError> {
    let mut problems: Vec<Problem> = Vec::new();
    fn push(problems: &mut Vec<Problem>, field: &str, reason: String) {
        problems.push(Problem {
            field: field.to_owned(),
            reason,
        });
    }
    let position = format!("{} document {}{}", at.origin, at.document, at.item);
    if api_version != "networking.k8s.io/v1" {
        push(
            &mut problems,
            "apiVersion",
            format!(
                "{} does not serve NetworkPolicy; use networking.k8s.io/v1 ({position})",
                names::shown(api_version)
            ),
        );
    }
    let Value::Mapping(map) = &value else {
        unreachable!("read_value passes mappings only")
    };
    let name = match map.get("metadata").and_then(|m| m.get("name")) {
        Some(Value::String(n)) if !n.is_empty() => bounded(n),
        _ => {
            push(
                &mut problems,
                "metadata.name",
                format!("missing or not a string; every object needs a name ({position})"),
            );
            format!("(unnamed, {position})")
        }
    };
    let namespace = match map.get("metadata").and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => None,
        Some(Value::String(ns)) => Some(bounded(ns)),
        Some(_) => {
            return Err(ParseError::PolicyNamespace {
                origin: at.origin.to_owned(),
                document: at.document,
                item: at.item.clone(),
                name: names::shown(&name),
            });
        }
    };
    let too_large = encoded_size(&value, MAX_OBJECT_BYTES) > MAX_OBJECT_BYTES;
    if too_large {
        push(
            &mut problems,
            "metadata",
            format!(
                "the policy is more than {MAX_OBJECT_BYTES} bytes (the largest object a cluster stores); make it smaller ({position})"
            ),
        );
    }
    let spec = map.get("spec");
    if problems.is_empty() {
        match from_value::<NetworkPolicy>(value.clone()) {
            Ok(mut p) => {
                p.apply_defaults();
                p.metadata.name = name;
                p.metadata.namespace = namespace;
                return Ok(Object::NetworkPolicy(Arc::new(p)));
            }
            Err(e) => push(
                &mut problems,
                "spec",
                format!("does not have the expected shape: {e} ({position})"),
            ),
        }
    }
    // The fail-closed remainder: podSelector and policyTypes, as far as they can be read.
    let pod_selector = match spec.and_then(|s| s.get("podSelector")) {
        None | Some(Value::Null) => LabelSelector::default(),
        Some(v) if encoded_size(v, MAX_KEPT_SELECTOR_BYTES) > MAX_KEPT_SELECTOR_BYTES => {
            LabelSelector::default()
        }
        Some(v) => match from_value::<LabelSelector>(v.clone()) {
            Ok(s) => s,
            Err(e) => {
                push(
                    &mut problems,
                    "spec.podSelector",
                    format!(
                        "is not a label selector: {e}; every pod of the namespace stays isolated"
                    ),
                );
                LabelSelector::default()
            }
        },
    };
    let both = || vec!["Ingress".to_owned(), "Egress".to_owned()];
    let declared = match spec.and_then(|s| s.get("policyTypes")) {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => match from_value::<Vec<String>>(v.clone()) {
            Ok(t) if t.iter().all(|t| t.len() <= 16) => t,
            _ => {
                push(
                    &mut problems,
                    "spec.policyTypes",
                    "is not a list of Ingress and Egress; both directions stay isolated".to_owned(),
                );
                both()
            }
        },
    };
    // Defaulting, as for a readable policy: absent or empty → Ingress, plus Egress when there
    // are egress rules (of any shape, unreadable ones too).
    let policy_types = if declared.is_empty() {
        let mut t = vec!["Ingress".to_owned()];
        match spec.and_then(|s| s.get("egress")) {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(rules)) if rules.is_empty() => {}
            Some(_) => t.push("Egress".to_owned()),
        }
        t
    } else {
        declared
    };
    let mut p = NetworkPolicy::default();
    p.metadata.name = name;
    p.metadata.namespace = namespace;
    p.spec.pod_selector = pod_selector;
    p.spec.policy_types = Some(policy_types);
    p.problems = problems;
    Ok(Object::NetworkPolicy(Arc::new(p)))
}

/// The length of `value`'s JSON encoding, counted until it passes `limit` (then some number
/// above `limit`). Iterative: the YAML parser bounds nesting, but this need not rely on it.
fn encoded_size(value: &Value, limit: usize) -> usize {
    let mut total = 0usize;
    let mut stack: Vec<&Value> = vec![value];
    while let Some(v) = stack.pop() {
        total += match v {
            Value::Null | Value::Bool(_) => 5,
            Value::Number(_) => 20,
            Value::String(s) => s.len() + 2,
            Value::Sequence(items) => {
                stack.extend(items);
                2 + items.len()
            }
            Value::Mapping(m) => {
                for (k, v) in m {
                    stack.push(k);
                    stack.push(v);
                }
                2 + 2 * m.len()
            }
            Value::Tagged(t) => {
                stack.push(&t.value);
                t.tag.to_string().len()
            }
        };
        if total > limit {
            return total;
        }
    }
    total
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, yaml_serde::Error> {
    yaml_serde::from_value(value)
}
