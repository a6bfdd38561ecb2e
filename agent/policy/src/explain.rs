//! Why a connection between two pods is allowed or denied, from compiled state.
//!
//! A connection passes when the source's egress allows it (decided on the source's node) and the
//! destination's ingress allows it (on the destination's node). Each side is evaluated with
//! [`crate::verdict::evaluate`], the datapath's own lookup, and named: the policies that select
//! the pod in that direction, and the rule (policy and rule index) whose entry matched, or the
//! statement that none did.
//!
//! [`Scenario`] answers for a whole cluster state without an agent or a kernel (`weir explain
//! --manifests`): it compiles every pod as a local endpoint of one imaginary node, which gives
//! each pod exactly the rule set its own node would compile for it (identities and rules do not
//! depend on the node; only which pods are subjects does).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};
use weir_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RULE_FROM_HOST,
};

use crate::{
    CompileError, CompileInput, IdentityAllocator, compile,
    model::{ClusterState, ObjectKey},
    output::{Compiled, Rejection, RuleMatch},
    verdict::{self, Reason},
};

/// ALLOW or DENY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn from_allowed(allowed: bool) -> Self {
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    pub fn allowed(self) -> bool {
        self == Verdict::Allow
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        })
    }
}

/// A transport protocol a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A destination port and protocol, written `8080/TCP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortProto {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Why `PORT/PROTO` text could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortProtoError {
    #[error("{text:?} is not PORT/PROTO; write it like 8080/TCP (protocols: TCP, UDP, SCTP)")]
    Shape { text: String },
    #[error("{text:?}: port {port:?} is not a number from 1 to 65535")]
    Port { text: String, port: String },
    #[error("{text:?}: unknown protocol {protocol:?}; use TCP, UDP or SCTP")]
    Protocol { text: String, protocol: String },
}

impl std::str::FromStr for PortProto {
    type Err = PortProtoError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (port, protocol) = text.split_once('/').ok_or_else(|| PortProtoError::Shape {
            text: text.to_owned(),
        })?;
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| PortProtoError::Port {
                text: text.to_owned(),
                port: port.to_owned(),
            })?;
        let protocol = match protocol.trim().to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            _ => {
                return Err(PortProtoError::Protocol {
                    text: text.to_owned(),
                    protocol: protocol.to_owned(),
                });
            }
        };
        Ok(PortProto { port, protocol })
    }
}

/// One end of an explained connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `namespace/name`
    pub pod: String,
    pub address: IpAddr,
    /// The manifests gave the pod no address (`status.podIPs`), so one was assumed; ipBlock
    /// rules are then judged against the assumed address.
    pub address_assumed: bool,
    pub identity: u32,
    /// The identity described: `namespace/{labels}`.
    pub identity_name: String,
}

/// The rule that allowed one side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// The rule's id in the datapath (what verdict events carry).
    pub id: u32,
    /// `namespace/name` of the policy; absent for the built-in rule.
    pub policy: Option<String>,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: Option<u32>,
    /// For people: `ns/policy ingress[0]`.
    pub name: String,
    /// The peer the matching entry names: a pod identity, a CIDR identity or `any`.
    pub peer: String,
    /// The ports the matching entry covers: `any`, `TCP any port`, `TCP 8080`, `TCP 8080-8087`.
    pub ports: String,
}

/// The decision of one side of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// The pod whose policy decides: the source for egress, the destination for ingress.
    pub pod: String,
    /// `egress` or `ingress`.
    pub direction: String,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The policies that select the pod in this direction (and so isolate it).
    pub selected_by: Vec<String>,
    /// The rule that allowed it, if one did.
    pub rule: Option<RuleRef>,
    /// Where the decision was evaluated, when an agent answered: `enforced on node N` (the
    /// maps that node enforces) or `compiled for the pod's node` (the pod runs elsewhere).
    /// Absent offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
}

/// Why a connection from one pod to another is allowed or denied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u16,
    pub protocol: Protocol,
    /// The source's egress.
    pub egress: Side,
    /// The destination's ingress.
    pub ingress: Side,
}

impl Explanation {
    /// The side that denied it (egress first, as the packet meets it first), if one did.
    pub fn deciding_side(&self) -> Option<&Side> {
        [&self.egress, &self.ingress]
            .into_iter()
            .find(|s| !s.verdict.allowed())
    }
}

fn direction_name(direction: u8) -> &'static str {
    if direction == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// Describes the ports an allow entry covers.
fn describe_ports(m: &RuleMatch) -> String {
    let proto =
        |n: u8| Protocol::from_number(n).map_or_else(|| format!("proto {n}"), |p| p.to_string());
    match (m.proto, m.port) {
        (None, _) => "any".to_owned(),
        (Some(p), None) => format!("{} any port", proto(p)),
        (Some(p), Some((first, 16))) => format!("{} {first}", proto(p)),
        (Some(p), Some((first, bits))) => {
            let last = u32::from(first) + (1u32 << (16 - u32::from(bits))) - 1;
            format!("{} {first}-{last}", proto(p))
        }
    }
}

/// Describes an identity with the compiled names.
pub fn identity_name(c: &Compiled, identity: u32) -> String {
    if identity == IDENTITY_ANY {
        return "any".to_owned();
    }
    c.identity_names
        .get(&identity)
        .cloned()
        .unwrap_or_else(|| format!("identity {identity}"))
}

/// Names rule `id` (matched by entry `m`) from the compiled rule origins.
pub fn rule_ref(c: &Compiled, m: &RuleMatch, id: u32) -> RuleRef {
    let origin = c.rule_origins.get(&id);
    let name = match origin {
        Some(o) => format!("{} {}[{}]", o.policy, direction_name(o.direction), o.index),
        None if id == RULE_FROM_HOST => "built-in: the node reaches its own pods".to_owned(),
        None => format!("rule {id}"),
    };
    RuleRef {
        id,
        policy: origin.map(|o| o.policy.to_string()),
        index: origin.map(|o| o.index),
        name,
        peer: identity_name(c, m.peer),
        ports: describe_ports(m),
    }
}

/// Evaluates one side: `subject` (at `pod`) in `direction` against `peer_addr`.
pub fn explain_side(
    c: &Compiled,
    pod: &str,
    subject: u32,
    direction: u8,
    peer_addr: IpAddr,
    port: PortProto,
) -> Side {
    let v = verdict::evaluate(
        c,
        subject,
        direction,
        peer_addr,
        port.protocol.number(),
        port.port,
    );
    let selected_by = c
        .subjects
        .get(&subject)
        .map(|r| {
            if direction == DIR_EGRESS {
                &r.selected_by_egress
            } else {
                &r.selected_by_ingress
            }
        })
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    Side {
        pod: pod.to_owned(),
        direction: direction_name(direction).to_owned(),
        verdict: Verdict::from_allowed(v.allowed),
        reason: v.reason,
        selected_by,
        rule: v.rule.map(|(m, id)| rule_ref(c, &m, id)),
        basis: None,
    }
}

/// Why a scenario could not answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("compiling the scenario: {0}")]
    Compile(#[from] CompileError),
    #[error("{what:?} is not a pod; write it as namespace/name")]
    NotAPodName { what: String },
    #[error("no pod {pod}; {known}")]
    UnknownPod { pod: String, known: String },
    #[error(
        "pod {pod} uses the host's network (hostNetwork: true): its traffic is the node's and no NetworkPolicy selects it"
    )]
    HostNetwork { pod: String },
    #[error("pod {pod} has terminated (phase {phase}); it has no address and no traffic")]
    Terminated { pod: String, phase: String },
    #[error(
        "pods {source_pod} and {destination} have no address of the same IP family ({source_addrs} / {destination_addrs})"
    )]
    NoCommonFamily {
        source_pod: String,
        destination: String,
        source_addrs: String,
        destination_addrs: String,
    },
}

/// A pod of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioPod {
    pub identity: u32,
    pub addresses: Vec<IpAddr>,
    /// The addresses were assumed (the manifests gave none).
    pub address_assumed: bool,
    /// The ports its containers declare, in declaration order, without duplicates.
    pub ports: Vec<PortProto>,
}

/// Where a scenario's pods without `status.podIPs` get their address: Kubernetes' usual
/// cluster pod range (kind's default), one address each in `namespace/name` order.
pub const ASSUMED_POD_RANGE: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);

/// A cluster state compiled with every pod as a local endpoint: explains any pair of pods.
#[derive(Clone, Debug)]
pub struct Scenario {
    state: ClusterState,
    compiled: Compiled,
    pods: BTreeMap<ObjectKey, ScenarioPod>,
}

impl Scenario {
    /// The scenario of `state` alone (`weir explain --manifests`).
    pub fn new(state: ClusterState) -> Result<Self, ExplainError> {
        Self::with(state, &BTreeMap::new(), IdentityAllocator::new())
    }

    /// The scenario of `state` where `known` pods have the given addresses (an agent's local
    /// endpoints), compiled with `identities` (a copy of an agent's allocator, so that identity
    /// and rule ids are those the agent enforces).
    pub fn with(
        state: ClusterState,
        known: &BTreeMap<ObjectKey, Vec<IpAddr>>,
        mut identities: IdentityAllocator,
    ) -> Result<Self, ExplainError> {
        let taken: BTreeSet<IpAddr> = state
            .pods
            .values()
            .flat_map(|p| p.status.pod_ips.iter())
            .filter_map(|ip| ip.ip.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .chain(known.values().flatten().copied())
            .collect();
        let mut next = u32::from(ASSUMED_POD_RANGE);
        let mut assumed: BTreeMap<ObjectKey, bool> = BTreeMap::new();
        let mut local_endpoints: BTreeMap<ObjectKey, Vec<IpAddr>> = BTreeMap::new();
        for (key, pod) in &state.pods {
            if pod.spec.host_network || pod.status.terminated() {
                continue;
            }
            let mut addrs: Vec<IpAddr> = match known.get(key) {
                Some(addrs) => addrs.clone(),
                None => pod
                    .status
                    .pod_ips
                    .iter()
                    .filter_map(|ip| ip.ip.trim().parse::<IpAddr>().ok())
                    .map(|a| a.to_canonical())
                    .collect(),
            };
            assumed.insert(key.clone(), addrs.is_empty());
            if addrs.is_empty() {
                let addr = loop {
                    next += 1;
                    let a = IpAddr::V4(Ipv4Addr::from(next));
                    if !taken.contains(&a) {
                        break a;
                    }
                };
                addrs.push(addr);
            }
            local_endpoints.insert(key.clone(), addrs);
        }
        let input = CompileInput {
            state: state.clone(),
            // No Node is called this: every Node address is another node's.
            node_name: String::new(),
            cluster_id: 0,
            local_endpoints,
        };
        let compiled = compile(&input, &mut identities)?;
        let mut pods = BTreeMap::new();
        for (addr, (key, identity)) in &compiled.local_addresses {
            let entry = pods.entry(key.clone()).or_insert_with(|| ScenarioPod {
                identity: *identity,
                addresses: Vec::new(),
                address_assumed: assumed.get(key).copied().unwrap_or(false),
                ports: declared_ports(&state, key),
            });
            entry.addresses.push(*addr);
        }
        Ok(Scenario {
            state,
            compiled,
            pods,
        })
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Every pod that has an identity and an address, by key.
    pub fn pods(&self) -> &BTreeMap<ObjectKey, ScenarioPod> {
        &self.pods
    }

    /// Policies (or fields) the compiler rejected: they enforce nothing, every other one does.
    pub fn rejections(&self) -> &[Rejection] {
        &self.compiled.rejections
    }

    /// Finds a pod by `namespace/name`, with an error that lists what exists.
    pub fn pod(&self, name: &str) -> Result<(ObjectKey, &ScenarioPod), ExplainError> {
        let (ns, pod) = name
            .split_once('/')
            .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty() && !pod.contains('/'))
            .ok_or_else(|| ExplainError::NotAPodName {
                what: name.to_owned(),
            })?;
        let key = ObjectKey::new(ns, pod);
        if let Some(p) = self.pods.get(&key) {
            return Ok((key, p));
        }
        if let Some(p) = self.state.pods.get(&key) {
            if p.spec.host_network {
                return Err(ExplainError::HostNetwork {
                    pod: key.to_string(),
                });
            }
            if p.status.terminated() {
                return Err(ExplainError::Terminated {
                    pod: key.to_string(),
                    phase: p.status.phase.clone().unwrap_or_default(),
                });
            }
        }
        let in_ns: Vec<&str> = self
            .pods
            .keys()
            .filter(|k| k.namespace == ns)
            .map(|k| k.name.as_str())
            .collect();
        let known = if in_ns.is_empty() {
            let namespaces: BTreeSet<&str> =
                self.pods.keys().map(|k| k.namespace.as_str()).collect();
            if namespaces.is_empty() {
                "the manifests define no pods".to_owned()
            } else {
                format!(
                    "no pods in namespace {ns}; namespaces with pods: {}",
                    namespaces.into_iter().collect::<Vec<_>>().join(", ")
                )
            }
        } else {
            format!("known pods in {ns}: {}", in_ns.join(", "))
        };
        Err(ExplainError::UnknownPod {
            pod: key.to_string(),
            known,
        })
    }

    /// Explains a connection from pod `source` to pod `destination` (`namespace/name` each).
    pub fn explain(
        &self,
        source: &str,
        destination: &str,
        port: PortProto,
    ) -> Result<Explanation, ExplainError> {
        let (src_key, src) = self.pod(source)?;
        let (dst_key, dst) = self.pod(destination)?;
        let pair = dst.addresses.iter().find_map(|d| {
            src.addresses
                .iter()
                .find(|s| s.is_ipv4() == d.is_ipv4())
                .map(|s| (*s, *d))
        });
        let list = |a: &[IpAddr]| {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let (src_addr, dst_addr) = pair.ok_or_else(|| ExplainError::NoCommonFamily {
            source_pod: src_key.to_string(),
            destination: dst_key.to_string(),
            source_addrs: list(&src.addresses),
            destination_addrs: list(&dst.addresses),
        })?;
        Ok(explain_connection(
            &self.compiled,
            (
                &src_key.to_string(),
                src.identity,
                src_addr,
                src.address_assumed,
            ),
            (
                &dst_key.to_string(),
                dst.identity,
                dst_addr,
                dst.address_assumed,
            ),
            port,
        ))
    }
}

/// One end for [`explain_connection`]: `(pod, identity, address, address assumed)`.
pub type End<'a> = (&'a str, u32, IpAddr, bool);

/// Explains a connection where both ends are subjects of `c`.
pub fn explain_connection(
    c: &Compiled,
    src: End<'_>,
    dst: End<'_>,
    port: PortProto,
) -> Explanation {
    let endpoint = |(pod, identity, address, assumed): End<'_>| Endpoint {
        pod: pod.to_owned(),
        address,
        address_assumed: assumed,
        identity,
        identity_name: identity_name(c, identity),
    };
    let egress = explain_side(c, src.0, src.1, DIR_EGRESS, dst.2, port);
    let ingress = explain_side(c, dst.0, dst.1, DIR_INGRESS, src.2, port);
    Explanation {
        verdict: Verdict::from_allowed(egress.verdict.allowed() && ingress.verdict.allowed()),
        source: endpoint(src),
        destination: endpoint(dst),
        port: port.port,
        protocol: port.protocol,
        egress,
        ingress,
    }
}

/// The ports a pod's containers declare that a NetworkPolicy can name.
fn declared_ports(state: &ClusterState, key: &ObjectKey) -> Vec<PortProto> {
    let mut out: Vec<PortProto> = Vec::new();
    let Some(pod) = state.pods.get(key) else {
        return out;
    };
    for p in pod.spec.containers.iter().flat_map(|c| c.ports.iter()) {
        let Ok(port) = u16::try_from(p.container_port) else {
            continue;
        };
        let Ok(pp) = format!("{port}/{}", p.protocol).parse::<PortProto>() else {
            continue;
        };
        if !out.contains(&pp) {
            out.push(pp);
        }
    }
    out
}
