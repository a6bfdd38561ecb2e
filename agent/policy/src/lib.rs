//! The policy compiler: a pure function from cluster state (Namespaces, Pods, NetworkPolicies,
//! Nodes) to the desired contents of the datapath maps. No kernel, no API client: the agent
//! feeds it objects ([`model::parse_documents`], [`model::ClusterState`]) and this node's
//! endpoints, and diffs the [`output::Compiled`] result against what is pinned.
//!
//! # Pipeline
//! 1. [`model`]: our own serde shapes of the objects (no k8s-openapi), read from YAML 1.2 /
//!    JSON manifests with the API server's defaulting (`policyTypes`, protocol `TCP`, the
//!    `kubernetes.io/metadata.name` namespace label) and its checks of names, labels,
//!    `apiVersion` and size ([`names`], [`model::parse_documents`]).
//! 2. [`validate`]: each NetworkPolicy is checked as the API server checks it; a bad one
//!    becomes [`output::Rejection`]s (policy, field path such as
//!    `spec.ingress[0].from[1].ipBlock.except[0]`, and what to do), allows nothing, and still
//!    isolates the pods it selects (fail closed). Every other policy keeps being enforced.
//! 3. [`identity`]: every (namespace, labels, named container ports) of a pod gets a stable
//!    identity (`IDENTITY_FIRST_POD..`, cluster id in the top 8 bits); every distinct ipBlock
//!    label set a CIDR identity ([`cidr`], which also explains why the LPM longest match over
//!    the inserted prefixes is exact, exact pod prefixes included); every rule a stable id.
//!    The [`IdentityAllocator`] is serialisable so the agent persists it.
//! 4. [`compile()`]: the ipcache (pod and node addresses → identity), CIDR identities, local
//!    addresses, and per local subject identity the isolation flags and allow entries.
//! 5. [`incremental`]: the same full compile keeping what the next events need, so that a change
//!    of policies alone, or of pods of other nodes that only moves addresses, is applied to the
//!    output in place with exactly the result of a full compile of the new state.
//!
//! # How the datapath uses the output
//! For a packet between a local endpoint (the subject) and a peer address, in a direction:
//! if the subject is not isolated in that direction the packet passes; otherwise it passes iff
//! an entry matches for the peer's ipcache identity (`IDENTITY_WORLD` when unknown), for the
//! peer's CIDR identity (longest match in `cidr_identities`), or for `IDENTITY_ANY`, with the
//! packet's protocol and destination port. [`verdict`] is that lookup on the compiler's output
//! (the tests evaluate the maps with it against an independent evaluator written from the spec
//! text), and [`explain`] names each side's policies and rule with it (`weir explain`).
//!
//! # Semantics decisions
//! - **Upstream NetworkPolicy v1, all of it**: a peer with only `podSelector` is limited to the
//!   policy's namespace; `namespaceSelector` alone means all pods of the matching namespaces;
//!   both in one peer AND, several peers OR; empty selectors select all; absent or empty
//!   `ingress`/`egress` with the type in `policyTypes` isolates with nothing allowed, `[{}]`
//!   allows all; an absent or empty `from`/`to` is any peer (`IDENTITY_ANY`, which covers
//!   non-pod addresses too); multiple policies add up. Rules of a direction that is not in
//!   `policyTypes` are ignored, as upstream.
//! - **ipBlock applies to pod addresses too** (unlike Cilium, cilium/cilium#9209): the datapath
//!   looks up the CIDR identity of every peer address. IPv4 and IPv6 never mix: an IPv6 block
//!   matches no IPv4 address even in the kernel's `::ffff:a.b.c.d` form (see [`cidr`]). CIDRs
//!   parse as the API server's Go code does: host bits are masked, IPv4 octets may have leading
//!   zeros (decimal), and an IPv6 prefix of /96 or longer inside `::ffff:0:0/96` means its IPv4
//!   form. An `except` must be strictly inside its `cidr` (by the prefix lengths as written,
//!   as the API server compares them) and of the same family.
//! - **Ports**: a rule without `ports` allows every protocol and port, ICMP included; a port
//!   entry with a protocol and no port allows every port of that protocol; `endPort` ranges
//!   become aligned prefix blocks (one entry each). Port 0 and ports above 65535 are rejected.
//! - **ICMP**: a rule with `ports` never matches ICMP or ICMPv6 (ports only name TCP, UDP and
//!   SCTP); a rule without `ports` allows everything from/to its peers, ICMP included. ICMP
//!   errors related to an allowed connection pass through conntrack, not through rules.
//! - **SCTP**: accepted and enforced. The datapath compares the IP protocol number (132) and
//!   the destination port at the same offset as TCP/UDP, so it needs no SCTP support from the
//!   kernel; on a kernel without SCTP no SCTP traffic exists to allow.
//! - **Named ports** resolve on the destination: for ingress on the subject, for egress on
//!   each peer pod (the protocol must match; a peer without the name gets no entry). Named
//!   ports are part of the identity, so the resolution is exact. An egress rule with no `to`
//!   and a named port allows exactly the pods that have that port. An egress rule with a named
//!   port and an `ipBlock` peer allows an address only if it is in the block (minus its
//!   excepts) **and** is a pod whose named port resolves to the packet's port; non-pod
//!   addresses have no named ports and never match. Each such pod address gets an exact
//!   /32 (/128) CIDR prefix whose identity carries the pod's named ports (see [`cidr`]),
//!   recomputed on every compile so it follows pod churn.
//! - **Validation and fail closed**: no policy the API server accepts is rejected. What only a
//!   manifest can carry (an invalid name, label, selector, CIDR, port, `apiVersion`, a field of
//!   the wrong shape, a too large object) is rejected with the object, the field and the
//!   reason, and fails closed: a rejected NetworkPolicy allows nothing, and the pods its
//!   `podSelector` selects stay isolated in the directions its `policyTypes` declare after
//!   defaulting (every pod of its namespace when the selector is invalid, both directions when
//!   the types are). A rejected Namespace is matched by no `namespaceSelector`; a rejected Pod
//!   or Node is dropped (a dropped local Pod cannot be wired). See [`model::parse_documents`].
//! - **hostNetwork pods** get no identity and no ipcache entry: they are the node's network
//!   stack, their traffic carries the node's address (`IDENTITY_HOST` here,
//!   `IDENTITY_REMOTE_NODE` on other nodes, from Node `InternalIP` addresses) and no pod
//!   selector matches them (upstream leaves this undefined). An `ipBlock` covering a node
//!   address does match it. They are never subjects (no CNI ADD, nothing to enforce on).
//! - **Addresses**: local pods' addresses come from the agent's IPAM (`local_endpoints`) and win
//!   over `status.podIPs`; a pod of this node not wired yet is a subject without an address.
//!   Other pods' addresses come from `status.podIPs`, except for terminated pods (phase
//!   `Succeeded`/`Failed`), whose addresses may already be reused. When two pods still claim
//!   one address, the local one wins, then the first by namespace/name.
//! - **Namespaces without a Namespace object** still carry the `kubernetes.io/metadata.name`
//!   label for namespace selectors.
//!
//! # Cost
//! Selector results are memoised per (namespace scope, selector) and rules are compiled once
//! per distinct (direction, namespace, peers, ports), so compile time grows with the output,
//! not with policies × pods. `examples/compile_bench.rs` prints timings. Exact pod prefixes
//! for named ports with ipBlocks add one CIDR map entry per pod address inside such a block
//! whose pod has one of the rules' port names (the map holds 65,536 prefixes); their
//! identities are shared by pods with the same blocks and named ports, so the policy entries
//! grow with those distinct combinations, not with the pods.

pub mod cidr;
pub mod compile;
pub mod explain;
pub mod identity;
pub mod incremental;
pub mod matrix;
pub mod model;
pub mod names;
pub mod output;
pub mod selector;
pub mod validate;
pub mod verdict;

pub use compile::{CompileError, CompileInput, compile};
pub use identity::IdentityAllocator;
pub use incremental::Incremental;
