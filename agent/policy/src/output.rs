//! What the policy compiler produces: the desired contents of the datapath maps, plus what the
//! agent needs to explain a verdict. The datapath writer diffs this against what is in the maps.
//! Addresses and prefixes are `ipnet`/`std::net` types here; the writer maps them into the
//! kernel's 16-byte form.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::model::ObjectKey;

/// A rule's match inside one subject's rule set: one entry of the `WEIR_POLICY` LPM trie
/// (without the subject and version, which the writer adds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleMatch {
    /// `weir_common::DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// Peer identity; `weir_common::IDENTITY_ANY` for any peer.
    pub peer: u32,
    /// IP protocol; `None` for any protocol (a rule without `ports`), which also covers ICMP.
    pub proto: Option<u8>,
    /// `(first port, prefix bits)`, a block from `weir_common::ports::port_range_blocks`;
    /// `None` for every port of `proto`. Always `None` when `proto` is `None`.
    pub port: Option<(u16, u8)>,
}

/// Everything enforced for one subject identity (the identity of local endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectRules {
    /// Some policy with policyTypes Ingress selects the subject.
    pub isolated_ingress: bool,
    /// Some policy with policyTypes Egress selects the subject.
    pub isolated_egress: bool,
    /// Allow entries, each with the id of the rule that produced it (the lowest id when several
    /// rules produce the same match).
    pub rules: BTreeMap<RuleMatch, u32>,
    /// The policies that select the subject, per direction: a drop names these.
    pub selected_by_ingress: BTreeSet<ObjectKey>,
    pub selected_by_egress: BTreeSet<ObjectKey>,
}

/// Where a rule id came from, for verdict events and `explain`.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct RuleOrigin {
    pub policy: ObjectKey,
    /// `weir_common::DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: u32,
}

/// A policy (or one field of it) that was rejected; every other policy is still enforced.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub policy: ObjectKey,
    /// JSON path of the offending field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

/// The compiler's whole output for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Pod and node addresses (as /32 or /128) → identity, for every pod with a known address on
    /// any node: the `WEIR_IPCACHE` LPM trie.
    pub ipcache: BTreeMap<IpNet, u32>,
    /// Policy prefixes (every ipBlock cidr and except) → CIDR identity: the `WEIR_CIDR_IDS` trie.
    pub cidr_identities: BTreeMap<IpNet, u32>,
    /// Local endpoints' addresses → their identity (the writer adds the ifindex).
    pub local_addresses: BTreeMap<IpAddr, (ObjectKey, u32)>,
    /// Rule sets of every identity that a local endpoint has.
    pub subjects: BTreeMap<u32, SubjectRules>,
    /// Identity → a human description (`ns/labels`, `cidr:10.0.0.0/8 except …`, reserved names).
    pub identity_names: BTreeMap<u32, String>,
    /// Rule id → where it came from.
    pub rule_origins: BTreeMap<u32, RuleOrigin>,
    /// Rejected policies and fields, with reasons.
    pub rejections: Vec<Rejection>,
}
