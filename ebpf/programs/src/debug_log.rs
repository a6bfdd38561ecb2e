//! Kernel-side debug logging through aya-log, off unless the agent runs with `--bpf-log`.
//!
//! The switch is aya-log's `AYA_LOG_LEVEL`, a global in `.rodata` that the agent sets when it
//! loads the object. aya freezes `.rodata`, so the verifier knows the level: with logging off,
//! every statement below is a branch it knows is never taken, and it removes the logging code
//! from the program it accepts.
//!
//! With logging on, the datapath does not format anything where it decides: the verdict events
//! it reports and the path it takes are noted in a per-CPU scratch record, and the program's
//! entry point logs them once the packet is decided. aya-log's formatting needs about 130 bytes
//! of stack, which the deepest decision paths do not have left under the verifier's 512-byte
//! limit; at the entry point the datapath's frames are gone. One call site per program also
//! keeps the verifier's work small.
//!
//! Only verdicts that are reported anyway (drops, reported allows) and the path of each packet
//! leaving a pod are logged.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use weir_common::VerdictEvent;

use crate::report::Report;

/// What one packet's run noted for the log: up to two verdict events (a packet one pod sends to
/// another on this node can be reported by both sides) and the path it took.
#[repr(C)]
pub struct Scratch {
    first: VerdictEvent,
    second: VerdictEvent,
    events: u32,
    /// A `COUNTER_PATH_*` slot, 0 if none was taken.
    path: u32,
    from_ifindex: u32,
    to_ifindex: u32,
}

#[map(name = "WEIR_LOG_SCRATCH")]
static WEIR_LOG_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Whether debug logging is on (a constant to the verifier).
#[inline(always)]
pub fn enabled() -> bool {
    level_enabled(Level::Debug)
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; the program runs to completion on this CPU before another run
    // of it (or of the other programs, which run with bottom halves off) uses the slot.
    WEIR_LOG_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// At a program's entry: a new packet, nothing noted yet.
#[inline(always)]
pub fn begin() {
    if enabled()
        && let Some(s) = scratch()
    {
        s.events = 0;
        s.path = 0;
    }
}

/// Notes a verdict event for the log.
#[inline(always)]
pub fn verdict(r: &Report<'_>, verdict: u8, reason: u8) {
    if !enabled() {
        return;
    }
    let Some(s) = scratch() else {
        return;
    };
    let e = match s.events {
        0 => &mut s.first,
        1 => &mut s.second,
        _ => return,
    };
    e.saddr = r.key.saddr;
    e.daddr = r.key.daddr;
    e.sport = r.key.sport;
    e.dport = r.key.dport;
    e.proto = r.key.proto;
    e.direction = r.direction;
    e.verdict = verdict;
    e.reason = reason;
    e.ifindex = r.ifindex;
    e.subject = r.subject;
    e.peer = r.peer;
    e.rule = r.rule;
    s.events += 1;
}

/// Notes the path an allowed packet took (a `COUNTER_PATH_*` slot) from the veth
/// `from_ifindex` to `to_ifindex` (0: the stack).
#[inline(always)]
pub fn path(path: u32, from_ifindex: u32, to_ifindex: u32) {
    if enabled()
        && let Some(s) = scratch()
    {
        s.path = path;
        s.from_ifindex = from_ifindex;
        s.to_ifindex = to_ifindex;
    }
}

/// At a program's exit: logs what the packet's run noted.
#[inline(always)]
pub fn finish() {
    if enabled() {
        log_noted();
    }
}

#[inline(never)]
fn log_noted() {
    let Some(s) = scratch() else {
        return;
    };
    if s.events > 0 {
        log_event(&s.first);
    }
    if s.events > 1 {
        log_event(&s.second);
    }
    if s.path != 0 {
        log_path(s.path, s.from_ifindex, s.to_ifindex);
    }
}

#[inline(never)]
fn log_event(e: &VerdictEvent) {
    debug!(
        &(),
        "verdict {} reason {} direction {} ifindex {} {:i} -> {:i} proto {} dport {} subject {} peer {} rule {}",
        e.verdict,
        e.reason,
        e.direction,
        e.ifindex,
        e.saddr,
        e.daddr,
        e.proto,
        u16::from_be(e.dport),
        e.subject,
        e.peer,
        e.rule
    );
}

#[inline(never)]
fn log_path(path: u32, from_ifindex: u32, to_ifindex: u32) {
    debug!(
        &(),
        "path {} from ifindex {} to ifindex {}", path, from_ifindex, to_ifindex
    );
}
