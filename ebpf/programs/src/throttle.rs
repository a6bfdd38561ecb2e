//! How often a program reports a drop (see `weir_common::throttle`): the first drop of each kind
//! (source, destination address, protocol and port, reason, direction) in an interval, and at most
//! `DROP_REPORTS_PER_CPU` kinds per CPU in an interval. The counters stay exact: the caller counts
//! every drop, and a drop not reported in `COUNTER_EVENTS_THROTTLED`.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use weir_common::{CtKey, DROP_REPORT_INTERVAL_NS, DROP_REPORTS_PER_CPU, DropKind, DropReported};

use crate::maps::{WEIR_DROP_BUDGET, WEIR_DROP_REPORTS};

/// Whether this drop of the packet with tuple `key` for `reason`, by the check of `direction`, is
/// to be reported; if so, it is remembered as reported now.
///
/// A function of its own (a BPF-to-BPF call), not inlined: its key then takes the stack only
/// while it runs, not in the frame of the classifiers, which are at the verifier's stack limit
/// with aya-log on. A drop is off the hot path.
#[inline(never)]
pub fn report_drop(key: &CtKey, reason: u8, direction: u8) -> bool {
    let kind = drop_kind(key, reason, direction);
    let last = WEIR_DROP_REPORTS.get_ptr(&kind).map(|last| {
        // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
        unsafe { (*last).at_ns }
    });
    let Some(now) = report_again(last) else {
        return false;
    };
    // If the LRU cannot take it, the next drop of this kind is reported again.
    let _ = WEIR_DROP_REPORTS.insert(&kind, &DropReported { at_ns: now }, 0);
    true
}

/// The kind of a drop of the packet with tuple `key` for `reason`, by the check of `direction`.
#[inline(always)]
pub fn drop_kind(key: &CtKey, reason: u8, direction: u8) -> DropKind {
    DropKind {
        saddr: key.saddr,
        daddr: key.daddr,
        dport: key.dport,
        proto: key.proto,
        reason,
        direction,
        _pad: [0; 3],
    }
}

/// Whether a kind of drop last reported at `last_ns` (`None`: never) is to be reported again now:
/// outside the interval, and within this CPU's budget for the interval, which the report then
/// takes. The time of the report (the coarse clock) if so.
#[inline(always)]
pub fn report_again(last_ns: Option<u64>) -> Option<u64> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if last_ns.is_some_and(|last| now.wrapping_sub(last) < DROP_REPORT_INTERVAL_NS) {
        return None;
    }
    take_report_budget(now).then_some(now)
}

/// Whether this CPU may report one more kind of drop in its current interval (at `now`, the
/// coarse clock); if so, the report is counted against its budget.
#[inline(always)]
fn take_report_budget(now: u64) -> bool {
    // Without its budget slot (which every CPU has) the drop is reported: a report too many is
    // better than a kind of drop left unexplained.
    let Some(budget) = WEIR_DROP_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.since_ns) >= DROP_REPORT_INTERVAL_NS {
        budget.since_ns = now;
        budget.reports = 0;
    }
    if budget.reports >= DROP_REPORTS_PER_CPU {
        return false;
    }
    budget.reports += 1;
    true
}
