//! Every map of the kernel object, with the names and capacities of `weir_common`.
//!
//! None is pinned by the object itself (`PinningType::None`): the agent pins them by path under
//! the node's bpffs directory (and adopts them from there after a restart).

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use weir_common::{
    AddrKey, Config, CtKey, CtValue, DropBudget, DropKind, DropReported, EVENTS_BYTES,
    EndpointInfo, EndpointKey, FragKey, FragValue, IdentityValue, LocalNextHop,
    MAX_CIDR_IDENTITIES, MAX_CONNTRACK, MAX_DROP_KINDS, MAX_ENDPOINTS, MAX_FRAGMENTS, MAX_IPCACHE,
    MAX_POLICY_ENTRIES, MAX_PREFILTER, MAX_SUBJECTS, MAX_XDP_DENIALS, NEXTHOP_SLOTS, PolicyKey,
    PolicyValue, PrefilterValue, REASON_COUNT, SubjectKey, SubjectPolicy, UplinkConfig, XdpDenial,
};

/// `WEIR_CONFIG[0]`: generation and flags.
#[map(name = "WEIR_CONFIG")]
pub static WEIR_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Local endpoints by address.
#[map(name = "WEIR_ENDPOINTS")]
pub static WEIR_ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Address → identity of pods and nodes (local and remote).
#[map(name = "WEIR_IPCACHE")]
pub static WEIR_IPCACHE: LpmTrie<AddrKey, IdentityValue> =
    LpmTrie::with_max_entries(MAX_IPCACHE, 0);

/// Address → CIDR identity of the policy prefixes that contain it.
#[map(name = "WEIR_CIDR_IDS")]
pub static WEIR_CIDR_IDS: LpmTrie<AddrKey, IdentityValue> =
    LpmTrie::with_max_entries(MAX_CIDR_IDENTITIES, 0);

/// Subject identity → isolation and live rule version.
#[map(name = "WEIR_SUBJECTS")]
pub static WEIR_SUBJECTS: HashMap<SubjectKey, SubjectPolicy> =
    HashMap::with_max_entries(MAX_SUBJECTS, 0);

/// (subject, version, peer, direction, proto, port prefix) → rule.
#[map(name = "WEIR_POLICY")]
pub static WEIR_POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

/// Connection tracking, keyed by the original 5-tuple.
#[map(name = "WEIR_CONNTRACK")]
pub static WEIR_CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// Fragmented datagrams per hook: the first fragment's ports and verdict, for the later ones.
#[map(name = "WEIR_FRAGMENTS")]
pub static WEIR_FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// The operator's deny list: source prefixes `weir_xdp` drops on the node's uplink.
#[map(name = "WEIR_PREFILTER")]
pub static WEIR_PREFILTER: LpmTrie<AddrKey, PrefilterValue> =
    LpmTrie::with_max_entries(MAX_PREFILTER, 0);

/// `WEIR_UPLINK[0]`: the uplink's settings for `weir_xdp` (the overlay's VXLAN port).
#[map(name = "WEIR_UPLINK")]
pub static WEIR_UPLINK: Array<UplinkConfig> = Array::with_max_entries(1, 0);

/// The next hop towards each local pod delivered to with `bpf_redirect_peer` (see
/// `weir_common::nexthop`): a cache the programs fill, not pinned.
#[map(name = "WEIR_NEXTHOPS")]
pub static WEIR_NEXTHOPS: Array<LocalNextHop> = Array::with_max_entries(NEXTHOP_SLOTS, 0);

/// When each kind of XDP drop was last reported (see `weir_common::throttle`); not pinned.
#[map(name = "WEIR_DROP_REPORTS")]
pub static WEIR_DROP_REPORTS: LruHashMap<DropKind, DropReported> =
    LruHashMap::with_max_entries(MAX_DROP_KINDS, 0);

/// The kinds of new connection `weir_xdp` found denied by policy, under a config generation (see
/// `weir_common::xdp_denials`); not pinned. Each CPU evicts from its own LRU list: a flood on one
/// CPU does not contend for another's.
#[map(name = "WEIR_XDP_DENIALS")]
pub static WEIR_XDP_DENIALS: LruHashMap<DropKind, XdpDenial> =
    LruHashMap::with_max_entries(MAX_XDP_DENIALS, BPF_F_NO_COMMON_LRU);

/// `WEIR_XDP_DENIALS_GENERATION[0]`: the config generation of the newest denial remembered or
/// refreshed in `WEIR_XDP_DENIALS` (0 before the first); not pinned. Under any other generation
/// every entry is stale, and `weir_xdp` skips the lookup.
#[map(name = "WEIR_XDP_DENIALS_GENERATION")]
pub static WEIR_XDP_DENIALS_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Each CPU's XDP drop reports in its current interval; not pinned.
#[map(name = "WEIR_DROP_BUDGET")]
pub static WEIR_DROP_BUDGET: PerCpuArray<DropBudget> = PerCpuArray::with_max_entries(1, 0);

/// Verdict events (`weir_common::VerdictEvent`).
#[map(name = "WEIR_EVENTS")]
pub static WEIR_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU counters indexed by `REASON_*` (and `COUNTER_EVENTS_LOST`).
#[map(name = "WEIR_COUNTERS")]
pub static WEIR_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
