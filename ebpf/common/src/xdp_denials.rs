//! `WEIR_XDP_DENIALS`: the new connections `weir_xdp` found denied by a local pod's ingress
//! policy, so that a flood of one kind is dropped without evaluating the policy for each packet
//! (the ipcache, CIDR identity, subject and up to three policy lookups become one).
//!
//! Keyed like a drop report (`DropKind`: source, destination address, protocol and port, reason
//! `REASON_XDP_POLICY_DENIED`, ingress): all that the ingress policy decides on. An entry is
//! trusted only under the config generation it was decided under, and the agent bumps the
//! generation after every write of endpoints, the ipcache, CIDR identities, subjects or policies,
//! so a changed policy or identity is evaluated afresh. Conntrack is still checked first on every
//! packet: a reply of a connection a pod opened since the denial passes.
//!
//! An entry is also its kind's report throttle (in place of `WEIR_DROP_REPORTS`, with the same
//! interval and per-CPU budget; see `throttle`), so a remembered drop costs one lookup in all. A
//! kind is remembered only when its drop is reported, that is within each CPU's report budget,
//! so a flood from ever new sources costs no insert per packet; an entry decided under an older
//! generation is refreshed in place. Not pinned: a cache, which a new object starts empty.

/// `WEIR_XDP_DENIALS` value (keyed by `DropKind`): what the drop's reports say, and when the
/// kind was last reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDenial {
    /// The config generation the policy was evaluated under.
    pub generation: u32,
    /// The destination pod's identity and the version of its rules.
    pub subject: u32,
    pub subject_version: u32,
    /// The source's reported identity.
    pub peer: u32,
    /// When the kind was last reported (`bpf_ktime_get_coarse_ns`); 0 for never.
    pub reported_ns: u64,
}
const _: () = assert!(core::mem::size_of::<XdpDenial>() == 24);

/// Kinds of denial remembered (LRU, per-CPU lists).
pub const MAX_XDP_DENIALS: u32 = 16_384;

#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpDenial {}
