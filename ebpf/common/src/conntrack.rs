//! Connection tracking: `WEIR_CONNTRACK`, an LRU hash keyed by the 5-tuple of the connection's
//! first packet (its original direction).

use crate::maps::Addr;

/// The 5-tuple in the original direction. For ICMP echo, `sport` holds the echo id and `dport`
/// is zero, so request and reply map to the same entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

impl CtKey {
    /// The same connection seen from the other end.
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `CtValue::flags`: the source endpoint's egress allowed the connection.
pub const CT_EGRESS_ALLOWED: u32 = 1 << 0;
/// `CtValue::flags`: the destination endpoint's ingress allowed the connection.
pub const CT_INGRESS_ALLOWED: u32 = 1 << 1;
/// `CtValue::flags`: a packet of the reply direction was seen.
pub const CT_SEEN_REPLY: u32 = 1 << 2;

/// `WEIR_CONNTRACK` value. Each side (the source's egress, the destination's ingress) is checked
/// by the hook of the endpoint on that side, which records the config generation it checked
/// under and the endpoint's host veth; when the generation moves, that side is checked again
/// (revocation).
///
/// The veth lets an established packet skip the endpoint lookup: the agent bumps the generation
/// on every endpoint change, so a side current under this generation whose veth is the packet's
/// was checked against the same endpoint (the source check included), and the other side's veth
/// is where a redirect delivers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` of the last packet (refreshed at most every second); the LRU
    /// evicts idle entries.
    pub last_seen_ns: u64,
    /// Generation the egress side was checked under.
    pub egress_generation: u32,
    /// Generation the ingress side was checked under.
    pub ingress_generation: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// Rule that allowed the egress side (0 when not isolated).
    pub egress_rule: u32,
    /// Rule that allowed the ingress side (0 when not isolated).
    pub ingress_rule: u32,
    /// The host veth of the source endpoint when its egress was checked (0 before).
    pub egress_ifindex: u32,
    /// The host veth of the destination endpoint when its ingress was checked (0 before, and for
    /// a destination on another node).
    pub ingress_ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 40);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
}
