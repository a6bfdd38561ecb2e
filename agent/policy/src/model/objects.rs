//! Serde shapes of the Kubernetes objects the compiler reads: only the fields it needs, in the
//! API's JSON spelling. Fields whose values need checking (CIDRs, protocols, ports, selector
//! operators) stay strings or raw numbers here, so that a bad value becomes a [`Rejection`]
//! naming the field instead of a parse error for the whole document.
//!
//! [`Rejection`]: crate::output::Rejection

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Labels;

/// `metadata` of any object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
}

/// `v1/Namespace`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Set when the manifest was rejected (bad labels, too large) but its name is valid: the
    /// namespace is then matched by no `namespaceSelector`, so that its pods never match a
    /// selector that its real labels would have kept them out of. The labels are not kept.
    #[serde(skip)]
    pub rejected: Option<String>,
}

/// `v1/Pod`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PodSpec,
    #[serde(default, deserialize_with = "null_default")]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub host_network: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: i64,
    /// Defaulted to `TCP` on read.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, deserialize_with = "null_default", rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`. Pods that have terminated
    /// (`Succeeded`, `Failed`) no longer own their addresses: they may already be reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl PodStatus {
    /// Whether the pod has terminated and released its addresses.
    pub fn terminated(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// `v1/Node`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: NodeSpec,
    #[serde(default, deserialize_with = "null_default")]
    pub status: NodeStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, deserialize_with = "null_default", rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(default, deserialize_with = "null_default")]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

/// `networking.k8s.io/v1/NetworkPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: NetworkPolicySpec,
    /// What the parser could not read (wrong apiVersion, a field of the wrong shape, too
    /// large). Such a policy keeps only what fails closed: its `podSelector` (empty, i.e. every
    /// pod of its namespace, when that could not be read) and its `policyTypes` (both when they
    /// could not be read); validation rejects it with these problems.
    #[serde(skip)]
    pub problems: Vec<Problem>,
}

/// A field the parser could not read, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the field, e.g. `spec.ingress`.
    pub field: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    #[serde(default, deserialize_with = "null_default")]
    pub pod_selector: LabelSelector,
    /// After defaulting (see [`NetworkPolicy::apply_defaults`]) always present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    /// `None` and `Some([])` are the same: no ingress rule (deny all ingress when isolated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRule {
    #[serde(default, deserialize_with = "null_default")]
    pub from: Vec<Peer>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    #[serde(default, deserialize_with = "null_default")]
    pub to: Vec<Peer>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, deserialize_with = "null_default")]
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    /// Defaulted to `TCP` on read.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

/// A port number or a named port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// `metav1.LabelSelector`. An empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub match_labels: Labels,
    #[serde(default, deserialize_with = "null_default")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

fn default_protocol() -> String {
    "TCP".to_owned()
}

/// `null` reads as the default, as the API server does for optional lists and maps.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The label the API server puts on every Namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl Namespace {
    /// Whether [`Self::apply_defaults`] would change nothing.
    pub fn is_defaulted(&self) -> bool {
        self.metadata.namespace.is_none()
            && self.metadata.labels.get(NAMESPACE_NAME_LABEL) == Some(&self.metadata.name)
    }

    /// Defaulting as the API server does it: the `kubernetes.io/metadata.name` label.
    pub fn apply_defaults(&mut self) {
        self.metadata.namespace = None;
        self.metadata
            .labels
            .insert(NAMESPACE_NAME_LABEL.to_owned(), self.metadata.name.clone());
    }
}

impl NetworkPolicy {
    /// Whether [`Self::apply_defaults`] would change nothing.
    pub fn is_defaulted(&self) -> bool {
        self.spec
            .policy_types
            .as_ref()
            .is_some_and(|t| !t.is_empty())
    }

    /// Defaulting as the API server does it: `policyTypes` absent or empty → `Ingress`, plus
    /// `Egress` when there are egress rules. (Protocols default to TCP on read.)
    pub fn apply_defaults(&mut self) {
        if self.spec.policy_types.as_ref().is_none_or(Vec::is_empty) {
            let mut types = vec!["Ingress".to_owned()];
            if self.spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress".to_owned());
            }
            self.spec.policy_types = Some(types);
        }
    }

    /// The policy types after defaulting.
    pub fn policy_types(&self) -> (bool, bool) {
        match &self.spec.policy_types {
            Some(t) => (
                t.iter().any(|t| t == "Ingress"),
                t.iter().any(|t| t == "Egress"),
            ),
            None => (
                true,
                self.spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
            ),
        }
    }
}
