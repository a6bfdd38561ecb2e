//! Fragment tracking at one hook (see `weir_common::fragments`): the first fragment of a datagram
//! records its transport protocol, ports and verdict; each later fragment takes them back, so it
//! meets conntrack and policy as part of the same flow, and shares the first fragment's fate.

use aya_ebpf::bindings::BPF_ANY;
use weir_common::{CtKey, FragKey, FragValue, VERDICT_ALLOW, VERDICT_DROP};

use crate::{maps::WEIR_FRAGMENTS, parse::Parsed, report::Verdict};

/// The datagram of a fragment at the hook enforcing `hook_dir`.
#[inline(always)]
fn frag_key(key: &CtKey, parsed: &Parsed, hook_dir: u8) -> FragKey {
    FragKey {
        saddr: key.saddr,
        daddr: key.daddr,
        id: parsed.frag_id,
        proto: parsed.frag_proto,
        direction: hook_dir,
        _pad: [0; 2],
    }
}

/// What became of a later fragment's datagram at this hook.
pub enum Datagram {
    /// Its first fragment was not seen here.
    Unknown,
    /// Its first fragment was dropped for this reason.
    Dropped(u8),
    /// Its first fragment passed; `key` and `parsed` now carry its protocol, ports and echo kind.
    Allowed,
}

/// For a later fragment: looks up its first fragment, and when that passed, restores the
/// transport protocol, ports and echo kind into `key` and `parsed`. A dropped datagram's
/// fragment also gets the ports, for its drop report.
#[inline(always)]
pub fn resume_later(key: &mut CtKey, parsed: &mut Parsed, hook_dir: u8) -> Datagram {
    let Some(first) = WEIR_FRAGMENTS.get_ptr(frag_key(key, parsed, hook_dir)) else {
        return Datagram::Unknown;
    };
    // SAFETY: the pointer comes from a successful lookup; the fields are plain integers.
    let first = unsafe { *first };
    key.proto = first.proto;
    key.sport = first.sport;
    key.dport = first.dport;
    parsed.echo = first.echo;
    if first.verdict == VERDICT_ALLOW {
        Datagram::Allowed
    } else {
        Datagram::Dropped(first.reason)
    }
}

/// For a first fragment: records what it carried and the verdict it got. When the map cannot
/// take it, the later fragments are dropped as fragments without a first one: closed.
#[inline(always)]
pub fn record_first(key: &CtKey, parsed: &Parsed, hook_dir: u8, verdict: &Verdict) {
    let value = FragValue {
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
        echo: parsed.echo,
        verdict: if verdict.allowed() {
            VERDICT_ALLOW
        } else {
            VERDICT_DROP
        },
        reason: verdict.reason,
    };
    let _ = WEIR_FRAGMENTS.insert(frag_key(key, parsed, hook_dir), value, BPF_ANY as u64);
}
