//! Protocol numbers, directions, reserved identities, verdict reasons and config flags.

/// IP protocol numbers as they appear on the wire.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Direction of a policy check, seen from the endpoint being enforced.
/// Egress: the endpoint sends (tc ingress on its host-side veth).
pub const DIR_EGRESS: u8 = 1;
/// Ingress: the endpoint receives (tc egress on its host-side veth).
pub const DIR_INGRESS: u8 = 2;

/// Identities are u32: the cluster id in the top 8 bits, a cluster-local id in the low 24, so
/// identities of peer clusters (mesh link) never collide with ours.
pub const IDENTITY_CLUSTER_SHIFT: u32 = 24;
pub const IDENTITY_LOCAL_MASK: u32 = (1 << IDENTITY_CLUSTER_SHIFT) - 1;
/// In a policy key: any peer.
pub const IDENTITY_ANY: u32 = 0;
/// The node itself (its own addresses).
pub const IDENTITY_HOST: u32 = 1;
/// Any address not known to belong to a pod or a node.
pub const IDENTITY_WORLD: u32 = 2;
/// Another node of the cluster.
pub const IDENTITY_REMOTE_NODE: u32 = 3;
/// First identity handed to a (namespace, labels) set.
pub const IDENTITY_FIRST_POD: u32 = 256;
/// CIDR identities (ipBlock label sets) live in this cluster-local range.
pub const IDENTITY_FIRST_CIDR: u32 = 0x0080_0000;

/// The rule id of the built-in allowance for traffic from the node itself to its local pods
/// (kubelet's liveness and readiness probes), as Cilium and Calico allow by default.
pub const RULE_FROM_HOST: u32 = u32::MAX;

/// Verdicts.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DROP: u8 = 2;

/// Why a packet was allowed or dropped. Also the index into the `COUNTERS` map.
pub const REASON_NONE: u8 = 0;
/// Allowed: the endpoint is not isolated in this direction.
pub const REASON_NOT_ISOLATED: u8 = 1;
/// Allowed: a policy rule allowed it (the event carries the rule id).
pub const REASON_RULE: u8 = 2;
/// Allowed: part of a connection that was allowed (either direction).
pub const REASON_ESTABLISHED: u8 = 3;
/// Allowed: an ICMP error about a tracked connection.
pub const REASON_RELATED: u8 = 4;
/// Allowed: not IP, or neighbour discovery the link needs.
pub const REASON_LINK_LOCAL: u8 = 5;
/// Dropped: the endpoint is isolated in this direction and no rule allowed the packet.
pub const REASON_POLICY_DENIED: u8 = 16;
/// Dropped: the interface has no endpoint for this address yet (fail closed before ADD finished,
/// or after DEL).
pub const REASON_UNKNOWN_ENDPOINT: u8 = 17;
/// Dropped: the source address is not the one the endpoint was given.
pub const REASON_SPOOFED_SOURCE: u8 = 18;
/// Dropped: an established connection that policy no longer allows.
pub const REASON_REVOKED: u8 = 19;
/// Dropped: the packet could not be parsed.
pub const REASON_MALFORMED: u8 = 20;
/// Dropped: an internal error (map update failed); fail closed.
pub const REASON_INTERNAL: u8 = 21;
/// Dropped: a later fragment of a datagram whose first fragment (the one with the ports) this
/// hook never saw: out of order, lost, or forged. It cannot be checked against port rules.
pub const REASON_FRAGMENT_WITHOUT_FIRST: u8 = 22;
/// Dropped: an IPv6 extension header chain the parser does not walk: longer than
/// `MAX_IPV6_EXTENSION_HEADERS`, or holding a header whose layout it does not know (mobility,
/// HIP, shim6, experimental), a second Fragment header or a misplaced hop-by-hop header.
pub const REASON_IPV6_EXTENSIONS: u8 = 23;
/// Dropped at XDP on the node's uplink, before an skb exists: a new connection to a local pod
/// whose ingress policy does not allow the source's identity (the same lookup `weir_to_pod` does;
/// replies of connections that pods opened are never dropped there).
pub const REASON_XDP_POLICY_DENIED: u8 = 24;
/// Dropped at XDP on the node's uplink: the source address is in the operator's deny list
/// (`WEIR_PREFILTER`, from `--prefilter-file`).
pub const REASON_PREFILTER_DENIED: u8 = 25;
/// Number of counter slots (reasons are < this).
pub const REASON_COUNT: u32 = 32;
/// `WEIR_COUNTERS` slot (not a reason) counting verdict events lost to a full ring buffer.
pub const COUNTER_EVENTS_LOST: u32 = REASON_COUNT - 1;
/// `WEIR_COUNTERS` slot (not a reason) counting packets `weir_xdp` passed on to the stack.
pub const COUNTER_XDP_PASSED: u32 = REASON_COUNT - 2;
/// `WEIR_COUNTERS` slot (not a reason): packets a pod sent that `weir_from_pod` allowed and
/// delivered straight into the local destination pod's namespace (`bpf_redirect_peer`).
pub const COUNTER_PATH_REDIRECT_PEER: u32 = REASON_COUNT - 3;
/// `WEIR_COUNTERS` slot (not a reason): packets a pod sent that `weir_from_pod` allowed and left
/// to the node's stack (the destination is not a local pod, the node itself, a fragment, ...).
pub const COUNTER_PATH_STACK: u32 = REASON_COUNT - 4;
/// `WEIR_COUNTERS` slot (not a reason): packets a pod sent that `weir_from_pod` allowed and handed
/// straight to the next hop towards a pod of another node (`bpf_redirect_neigh`).
pub const COUNTER_PATH_REDIRECT_NEIGH: u32 = REASON_COUNT - 5;
/// `WEIR_COUNTERS` slot (not a reason): drops `weir_xdp` counted but did not report, because the
/// same kind of drop was reported within the interval or the CPU's report budget was spent (see
/// `throttle`).
pub const COUNTER_EVENTS_THROTTLED: u32 = REASON_COUNT - 6;
/// The lowest counter slot that is not a reason.
pub const FIRST_COUNTER_SLOT: u32 = COUNTER_EVENTS_THROTTLED;
// The counter slots that are not reasons sit above every reason.
const _: () = assert!((REASON_PREFILTER_DENIED as u32) < FIRST_COUNTER_SLOT);

/// `Config::flags`: cut established connections that a policy change no longer allows.
pub const CONFIG_REVOKE_ESTABLISHED: u32 = 1 << 0;
/// `Config::flags`: emit an event for every new allowed connection, not only for drops.
pub const CONFIG_EMIT_ALLOW_EVENTS: u32 = 1 << 1;

/// `Config::flags`: deliver a packet from one local pod to another straight into the destination
/// pod's namespace, its ingress policy checked inline, instead of through the node's IP stack.
pub const CONFIG_REDIRECT_LOCAL: u32 = 1 << 2;
/// `Config::flags`: hand a packet from a local pod to a pod of another node straight to the next
/// hop of the node's route (`bpf_redirect_neigh`) instead of through the node's IP stack.
pub const CONFIG_REDIRECT_REMOTE: u32 = 1 << 3;

/// `SubjectPolicy::flags`.
pub const SUBJECT_ISOLATED_INGRESS: u32 = 1 << 0;
pub const SUBJECT_ISOLATED_EGRESS: u32 = 1 << 1;

/// IPv6 extension headers the parser walks in front of the transport header (hop-by-hop,
/// routing, fragment, destination options, AH; RFC 8200's recommended order has at most six,
/// with destination options twice). A longer chain is dropped (`REASON_IPV6_EXTENSIONS`).
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 6;

/// Map names, as in the kernel object and under the bpffs pin directory.
pub const MAP_CONFIG: &str = "WEIR_CONFIG";
pub const MAP_ENDPOINTS: &str = "WEIR_ENDPOINTS";
pub const MAP_IPCACHE: &str = "WEIR_IPCACHE";
pub const MAP_CIDR_IDENTITIES: &str = "WEIR_CIDR_IDS";
pub const MAP_SUBJECTS: &str = "WEIR_SUBJECTS";
pub const MAP_POLICY: &str = "WEIR_POLICY";
pub const MAP_CONNTRACK: &str = "WEIR_CONNTRACK";
pub const MAP_EVENTS: &str = "WEIR_EVENTS";
pub const MAP_COUNTERS: &str = "WEIR_COUNTERS";
pub const MAP_FRAGMENTS: &str = "WEIR_FRAGMENTS";
pub const MAP_PREFILTER: &str = "WEIR_PREFILTER";
pub const MAP_UPLINK: &str = "WEIR_UPLINK";
pub const MAP_NEXTHOPS: &str = "WEIR_NEXTHOPS";
pub const MAP_DROP_REPORTS: &str = "WEIR_DROP_REPORTS";
pub const MAP_DROP_BUDGET: &str = "WEIR_DROP_BUDGET";
pub const MAP_XDP_DENIALS: &str = "WEIR_XDP_DENIALS";
pub const MAP_XDP_DENIALS_GENERATION: &str = "WEIR_XDP_DENIALS_GENERATION";

/// Program names in the kernel object.
/// Attached at tc ingress of a pod's host-side veth: packets the pod sends.
pub const PROG_FROM_POD: &str = "weir_from_pod";
/// Attached at tc egress of a pod's host-side veth: packets delivered to the pod.
pub const PROG_TO_POD: &str = "weir_to_pod";
/// Attached (XDP, native mode) to the node's uplink: drops early what `weir_to_pod` would drop
/// for a new connection, and the operator's deny list.
pub const PROG_XDP: &str = "weir_xdp";

/// Map capacities.
pub const MAX_ENDPOINTS: u32 = 16_384;
pub const MAX_IPCACHE: u32 = 262_144;
pub const MAX_CIDR_IDENTITIES: u32 = 65_536;
pub const MAX_SUBJECTS: u32 = 65_536;
pub const MAX_POLICY_ENTRIES: u32 = 1_048_576;
pub const MAX_CONNTRACK: u32 = 262_144;
/// Fragmented datagrams in flight (per hook), as Cilium's default.
pub const MAX_FRAGMENTS: u32 = 8_192;
pub const EVENTS_BYTES: u32 = 1 << 22;
/// Prefixes in the operator's deny list.
pub const MAX_PREFILTER: u32 = 16_384;
