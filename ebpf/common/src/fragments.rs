//! Fragment tracking: `WEIR_FRAGMENTS`, an LRU hash from a fragmented datagram (per hook) to what
//! its first fragment carried and the verdict it got.
//!
//! Only the first fragment of a datagram carries the transport header, so only it can be matched
//! against rules with ports. Each hook records the first fragment's ports and verdict; the later
//! fragments take the ports from there (so conntrack and policy see them as the same flow), pass
//! when the first fragment passed and are dropped when it was dropped. A later fragment whose
//! first fragment was never seen at this hook cannot be checked and is dropped.

use crate::maps::Addr;

/// `WEIR_FRAGMENTS` key: one datagram at one hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// The datagram's identification, network order: the IPv4 header's 16-bit id in the first
    /// two bytes (the rest zero), or the IPv6 Fragment header's 32-bit id.
    pub id: u32,
    /// IPv4: the protocol. IPv6: the Fragment header's next header (the same in every fragment,
    /// which is not always the transport protocol: a destination options header may follow).
    pub proto: u8,
    /// The hook: `DIR_EGRESS` (`weir_from_pod`) or `DIR_INGRESS` (`weir_to_pod`). A datagram
    /// between two pods of one node passes both hooks, and each keeps its own verdict.
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// `WEIR_FRAGMENTS` value: what the first fragment carried, and its verdict at this hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Network order (for ICMP echo: the echo id, then 0).
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    /// The transport protocol, found behind any IPv6 extension headers of the first fragment.
    pub proto: u8,
    /// `ECHO_*`: whether the datagram is an ICMP echo request or reply.
    pub echo: u8,
    /// `VERDICT_ALLOW` or `VERDICT_DROP`.
    pub verdict: u8,
    /// The `REASON_*` of that verdict; later fragments of a dropped datagram are dropped with it.
    pub reason: u8,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 8);

/// `FragValue::echo` (and the parser's echo classification).
pub const ECHO_NONE: u8 = 0;
pub const ECHO_REQUEST: u8 = 1;
pub const ECHO_REPLY: u8 = 2;

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
}
