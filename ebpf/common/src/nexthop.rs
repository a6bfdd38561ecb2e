//! `WEIR_NEXTHOPS`: the next hop towards each local pod that `weir_from_pod` delivered to with
//! `bpf_redirect_peer`, so that an established flow's packets need no FIB lookup.
//!
//! An array indexed by the pod's host veth (its slot, `NEXTHOP_SLOTS`): the verifier inlines an
//! array lookup, where a hash lookup is a call that hashes the key. Two veths of the same slot
//! take turns in it, each refill a FIB lookup.
//!
//! The programs fill it themselves from a successful FIB lookup (the pod's host veth, the pod's
//! MAC from its permanent neighbour entry, the veth's own MAC) and trust an entry only for the veth
//! it names, under the config generation it was filled under, and for `NEXTHOP_RECHECK_NS` at
//! most. The agent bumps
//! the generation on every endpoint change, so a pod that goes, or comes back on a new veth, is
//! never delivered to on a cached hop; a route or neighbour changed by hand is picked up within
//! the recheck interval. It is not pinned: a cache, which a new object starts empty.

/// `WEIR_NEXTHOPS` value (in the slot of the pod's host veth).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalNextHop {
    /// `bpf_ktime_get_coarse_ns` when the FIB last confirmed it.
    pub checked_ns: u64,
    /// The config generation it was filled under.
    pub generation: u32,
    /// The pod's host veth (the FIB's egress device, which is the endpoint's).
    pub ifindex: u32,
    /// Destination MAC (the pod's) then source MAC (its host veth's), as written into the frame.
    pub macs: [u8; 12],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<LocalNextHop>() == 32);

/// `WEIR_NEXTHOPS` slots: a veth's slot is its ifindex modulo this (a power of two). Twice
/// `MAX_ENDPOINTS`, so the veths of a full node rarely share one, even with their ifindexes
/// spread by churn.
pub const NEXTHOP_SLOTS: u32 = 32_768;
const _: () = assert!(NEXTHOP_SLOTS.is_power_of_two());

/// How long a cached next hop is used before the FIB confirms it again.
pub const NEXTHOP_RECHECK_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
unsafe impl aya::Pod for LocalNextHop {}
