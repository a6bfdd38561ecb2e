//! Verdict events sent through the `WEIR_EVENTS` ring buffer.

use crate::maps::Addr;

/// One verdict: every drop, and (when `CONFIG_EMIT_ALLOW_EVENTS` is set) every new allowed
/// connection. The agent turns `subject`/`subject_version` into the list of policies that
/// selected the endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub timestamp_ns: u64,
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    /// `DIR_EGRESS` or `DIR_INGRESS`, seen from the endpoint.
    pub direction: u8,
    /// `VERDICT_ALLOW` or `VERDICT_DROP`.
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// ifindex of the host-side veth the program ran on.
    pub ifindex: u32,
    /// Identity of the endpoint (0 if unknown).
    pub subject: u32,
    /// Rule version of the endpoint at the time.
    pub subject_version: u32,
    /// Identity of the peer (pod identity, else CIDR identity, else world).
    pub peer: u32,
    /// Rule that allowed it (`REASON_RULE`), else 0.
    pub rule: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 72);

#[cfg(feature = "user")]
unsafe impl aya::Pod for VerdictEvent {}
