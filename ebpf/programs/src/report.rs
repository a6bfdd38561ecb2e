//! Counters and verdict events.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
};
use weir_common::{
    COUNTER_EVENTS_LOST, COUNTER_EVENTS_THROTTLED, CtKey, VERDICT_ALLOW, VERDICT_DROP, VerdictEvent,
};

use crate::{
    debug_log,
    maps::{WEIR_COUNTERS, WEIR_EVENTS},
    throttle::report_drop,
};

/// What a hook decided for a packet: the tc action and the reason it was counted under.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: i32,
    pub reason: u8,
    /// For an established connection whose conntrack entry has both sides (the source's egress
    /// and the destination's ingress) allowed under the current generation: the host veth of the
    /// endpoint on the other side, which checked it on this node. Its check would find the same
    /// entry and allow it too, so the redirect need not run it again, nor look up where that
    /// endpoint is. 0 otherwise.
    pub current_peer_veth: u32,
}

impl Verdict {
    #[inline(always)]
    pub fn allowed(&self) -> bool {
        self.action == TC_ACT_OK as i32
    }
}

/// Everything a verdict event says besides the verdict and the reason.
pub struct Report<'a> {
    /// The packet's own tuple.
    pub key: &'a CtKey,
    pub direction: u8,
    pub ifindex: u32,
    pub subject: u32,
    pub subject_version: u32,
    pub peer: u32,
    pub rule: u32,
}

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(p) = WEIR_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn emit(r: &Report<'_>, verdict: u8, reason: u8) {
    debug_log::verdict(r, verdict, reason);
    match WEIR_EVENTS.reserve::<VerdictEvent>(0) {
        Some(mut entry) => {
            entry.write(VerdictEvent {
                // SAFETY: a helper without arguments.
                timestamp_ns: unsafe { bpf_ktime_get_ns() },
                saddr: r.key.saddr,
                daddr: r.key.daddr,
                sport: r.key.sport,
                dport: r.key.dport,
                proto: r.key.proto,
                direction: r.direction,
                verdict,
                reason,
                ifindex: r.ifindex,
                subject: r.subject,
                subject_version: r.subject_version,
                peer: r.peer,
                rule: r.rule,
                _pad: 0,
            });
            entry.submit(0);
        }
        None => count(COUNTER_EVENTS_LOST),
    }
}

/// Counts a drop for `reason` and reports it, unless the same kind of drop was reported within
/// the interval (or this CPU's report budget is spent; see `throttle`): a flood of denied packets
/// is not one event per packet. A drop not reported is counted as throttled.
#[inline(always)]
pub fn count_and_report_drop(r: &Report<'_>, reason: u8) {
    count(reason as u32);
    if report_drop(r.key, reason, r.direction) {
        emit(r, VERDICT_DROP, reason);
    } else {
        count(COUNTER_EVENTS_THROTTLED);
    }
}

/// Counts and (throttled) reports the drop, and returns the drop verdict.
#[inline(always)]
pub fn drop_packet(r: &Report<'_>, reason: u8) -> Verdict {
    count_and_report_drop(r, reason);
    Verdict {
        action: TC_ACT_SHOT as i32,
        reason,
        current_peer_veth: 0,
    }
}

/// Counts `reason` and returns the allow verdict (no event).
#[inline(always)]
pub fn allow(reason: u8) -> Verdict {
    count(reason as u32);
    Verdict {
        action: TC_ACT_OK as i32,
        reason,
        current_peer_veth: 0,
    }
}

/// Counts `reason`, reports the newly allowed connection, and returns the allow verdict.
#[inline(always)]
pub fn allow_reported(r: &Report<'_>, reason: u8) -> Verdict {
    count(reason as u32);
    emit(r, VERDICT_ALLOW, reason);
    Verdict {
        action: TC_ACT_OK as i32,
        reason,
        current_peer_veth: 0,
    }
}
