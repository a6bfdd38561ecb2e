//! `WEIR_DROP_REPORTS`: how often the programs (`weir_xdp` and the tc classifiers alike) report
//! drops, so that a flood of denied packets is not one ring-buffer event per packet.
//!
//! Every drop is still counted exactly (`WEIR_COUNTERS`, per reason). The first drop of each
//! kind is reported: per source address, destination (address, protocol, port), reason and
//! direction, at most one event per `DROP_REPORT_INTERVAL_NS`; and each CPU reports at most
//! `DROP_REPORTS_PER_CPU` kinds per interval, so that a flood from ever new sources is bounded too. Drops not reported are counted in `COUNTER_EVENTS_THROTTLED`.
//! `weir_xdp`'s policy denials keep their kind's last report in their `WEIR_XDP_DENIALS` entry
//! instead (same interval, same budget; see `xdp_denials`).

use crate::maps::Addr;

/// `WEIR_DROP_REPORTS` key: one kind of drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKind {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// `DIR_*` of the check that dropped it: a drop at the destination's ingress is not the
    /// same explanation as one at the source's egress.
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<DropKind>() == 40);

/// `WEIR_DROP_REPORTS` value: when this kind was last reported (`bpf_ktime_get_coarse_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropReported {
    pub at_ns: u64,
}

/// `WEIR_DROP_BUDGET` (per CPU, one slot): the reports this CPU made in its current interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropBudget {
    /// Start of the interval (`bpf_ktime_get_coarse_ns`).
    pub since_ns: u64,
    pub reports: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DropBudget>() == 16);

/// One report per kind of drop per interval.
pub const DROP_REPORT_INTERVAL_NS: u64 = 1_000_000_000;
/// Reports per CPU per interval, over all kinds.
pub const DROP_REPORTS_PER_CPU: u32 = 1_024;
/// Kinds of drop remembered (LRU); one forgotten is reported again on its next drop.
pub const MAX_DROP_KINDS: u32 = 16_384;

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for DropKind {}
    unsafe impl aya::Pod for DropReported {}
    unsafe impl aya::Pod for DropBudget {}
}
