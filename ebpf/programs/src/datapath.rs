//! The verdict of one packet at one hook: parse, endpoint, conntrack, policy.
//!
//! Each side of a connection is checked by the hook of the endpoint on that side: the source's
//! egress at its `weir_from_pod`, the destination's ingress at its `weir_to_pod`. The conntrack
//! entry (keyed by the original tuple) records which sides were allowed and under which config
//! generation; a side checked under an older generation is checked again (revocation).
//!
//! A fragmented datagram is decided by its first fragment, which carries the ports; the later
//! fragments take them from `WEIR_FRAGMENTS` and go the same way (see `fragments`).

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use weir_common::{
    CONFIG_EMIT_ALLOW_EVENTS, CONFIG_REVOKE_ESTABLISHED, CT_EGRESS_ALLOWED, CT_INGRESS_ALLOWED,
    CT_SEEN_REPLY, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, ECHO_REPLY, ECHO_REQUEST, EndpointKey,
    PROTO_ICMP, PROTO_ICMPV6, REASON_ESTABLISHED, REASON_FRAGMENT_WITHOUT_FIRST, REASON_INTERNAL,
    REASON_IPV6_EXTENSIONS, REASON_LINK_LOCAL, REASON_MALFORMED, REASON_NOT_ISOLATED,
    REASON_POLICY_DENIED, REASON_RELATED, REASON_REVOKED, REASON_SPOOFED_SOURCE,
    REASON_UNKNOWN_ENDPOINT,
};

use crate::{
    fragments::{Datagram, record_first, resume_later},
    key::KeyBuf,
    maps::{WEIR_CONFIG, WEIR_CONNTRACK, WEIR_ENDPOINTS},
    parse::{Class, Fragment, ParseError, Parsed, parse, parse_ip},
    policy::{evaluate, resolve_peer, subject_policy},
    redirect::deliver,
    report::{Report, Verdict, allow, allow_reported, drop_packet},
};

/// A helper's error code. No path produces one today (every failure is a counted, reported
/// drop), but the entry points turn any `Err` into `TC_ACT_SHOT` all the same: fail closed.
pub type Error = i64;

#[inline(always)]
fn is_icmp(proto: u8) -> bool {
    proto == PROTO_ICMP || proto == PROTO_ICMPV6
}

#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}

/// The conntrack clock: the coarse monotonic clock, which reads the last tick's time instead of
/// the clock source (conntrack works in seconds, and this runs on every packet).
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Runs the datapath for a packet at the hook enforcing direction `hook_dir` of its endpoint:
/// `DIR_EGRESS` at `weir_from_pod`, `DIR_INGRESS` at `weir_to_pod`.
#[inline(always)]
pub fn run(ctx: &TcContext, hook_dir: u8) -> Result<i32, Error> {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed; `ifindex` is a readable
    // field of `__sk_buff`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };

    let mut slot = MaybeUninit::uninit();
    let buf = KeyBuf::zeroed_in(&mut slot);
    let mut parsed = match parse(ctx, buf) {
        Ok(p) => p,
        Err(ParseError::Malformed) => {
            // Whatever was parsed is not reported.
            let mut zero = MaybeUninit::uninit();
            let r = Report {
                key: &KeyBuf::zeroed_in(&mut zero).key,
                direction: hook_dir,
                ifindex,
                subject: 0,
                subject_version: 0,
                peer: 0,
                rule: 0,
            };
            return Ok(drop_packet(&r, REASON_MALFORMED).action);
        }
        Err(ParseError::Extensions) => {
            // The addresses were parsed; protocol and ports stay 0.
            let r = hook_report(&buf.key, hook_dir, ifindex);
            return Ok(drop_packet(&r, REASON_IPV6_EXTENSIONS).action);
        }
    };
    if parsed.fragment == Fragment::Later {
        match resume_later(&mut buf.key, &mut parsed, hook_dir) {
            Datagram::Allowed => {}
            Datagram::Dropped(reason) => {
                let r = hook_report(&buf.key, hook_dir, ifindex);
                return Ok(drop_packet(&r, reason).action);
            }
            Datagram::Unknown => {
                let r = hook_report(&buf.key, hook_dir, ifindex);
                return Ok(drop_packet(&r, REASON_FRAGMENT_WITHOUT_FIRST).action);
            }
        }
    }
    let verdict = decide(ctx, hook_dir, ifindex, &parsed, &buf.key);
    if parsed.fragment == Fragment::First {
        record_first(&buf.key, &parsed, hook_dir, &verdict);
    }
    if hook_dir == DIR_EGRESS && verdict.allowed() {
        return Ok(deliver(ctx, ifindex, &parsed, &buf.key, &verdict));
    }
    Ok(verdict.action)
}

/// The endpoint this hook enforces and the other end of `key`.
#[inline(always)]
fn ends(key: &CtKey, hook_dir: u8) -> (&[u8; 16], &[u8; 16]) {
    if hook_dir == DIR_EGRESS {
        (&key.saddr, &key.daddr)
    } else {
        (&key.daddr, &key.saddr)
    }
}

/// The report of a drop decided before conntrack and policy, at this hook: its endpoint (if the
/// address is one) and the peer, so the drop is explained like any other.
#[inline(always)]
fn hook_report(key: &CtKey, hook_dir: u8, ifindex: u32) -> Report<'_> {
    let (ep_addr, _) = ends(key, hook_dir);
    let subject = match WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: *ep_addr }) {
        // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
        Some(ep) => unsafe { (*ep).identity },
        None => 0,
    };
    subject_report(key, hook_dir, ifindex, subject)
}

/// The report of a drop at this hook before policy, with `subject` as the hook's endpoint (0 when
/// the address is none) and the peer resolved.
#[inline(always)]
fn subject_report(key: &CtKey, hook_dir: u8, ifindex: u32, subject: u32) -> Report<'_> {
    let (_, peer_addr) = ends(key, hook_dir);
    Report {
        key,
        direction: hook_dir,
        ifindex,
        subject,
        subject_version: subject_policy(subject).0,
        peer: resolve_peer(peer_addr).reported(),
        rule: 0,
    }
}

/// The endpoint a hook enforces, as `WEIR_ENDPOINTS` has it.
#[derive(Clone, Copy)]
struct Endpoint {
    ifindex: u32,
    subject: u32,
}

/// The endpoint on this hook's side of `key`, or the drop verdict when there is none or (at
/// `weir_from_pod`) the packet did not come from its veth.
#[inline(always)]
fn hook_endpoint(key: &CtKey, hook_dir: u8, ifindex: u32) -> Result<Endpoint, Verdict> {
    let (ep_addr, _) = ends(key, hook_dir);
    let Some(ep) = WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: *ep_addr }) else {
        let r = subject_report(key, hook_dir, ifindex, 0);
        return Err(drop_packet(&r, REASON_UNKNOWN_ENDPOINT));
    };
    // SAFETY: the pointer comes from a successful lookup; the fields are plain integers.
    let ep = unsafe {
        Endpoint {
            ifindex: (*ep).ifindex,
            subject: (*ep).identity,
        }
    };
    if hook_dir == DIR_EGRESS && ep.ifindex != ifindex {
        let r = subject_report(key, hook_dir, ifindex, ep.subject);
        return Err(drop_packet(&r, REASON_SPOOFED_SOURCE));
    }
    Ok(ep)
}

/// Whether the ICMP error `parsed` (whose own tuple is `key`) is about a tracked connection, in
/// either direction, and goes back to whoever sent the quoted packet: an error addressed to
/// anyone else (a pod quoting somebody else's connection to get past an isolated peer) is not
/// related.
#[inline(always)]
fn is_related(ctx: &TcContext, parsed: &Parsed, key: &CtKey) -> bool {
    let mut inner_slot = MaybeUninit::uninit();
    let inner = KeyBuf::zeroed_in(&mut inner_slot);
    if parse_ip(ctx, parsed.inner_off, parsed.v6, true, inner).is_err()
        || !same_addr(&inner.key.saddr, &key.daddr)
    {
        return false;
    }
    let mut reversed = MaybeUninit::uninit();
    WEIR_CONNTRACK.get_ptr(&inner.key).is_some()
        || WEIR_CONNTRACK
            .get_ptr(&KeyBuf::reverse_in(&mut reversed, &inner.key).key)
            .is_some()
}

/// The verdict of a parsed packet (for a later fragment: with its first fragment's protocol and
/// ports): endpoint, conntrack, policy. `ifindex` is the veth of the hook's endpoint (reported).
///
/// An established packet whose side of its connection was checked under the current generation,
/// on this veth, is allowed on its conntrack entry alone; everything else meets the endpoint
/// checks and, where conntrack does not settle it, the policy.
#[inline(always)]
pub fn decide(
    ctx: &TcContext,
    hook_dir: u8,
    ifindex: u32,
    parsed: &Parsed,
    key: &CtKey,
) -> Verdict {
    let (generation, config_flags) = match WEIR_CONFIG.get(0) {
        Some(c) => (c.generation, c.flags),
        None => (0, 0),
    };
    if parsed.class == Class::NotIp || parsed.class == Class::LinkLocal {
        return allow(REASON_LINK_LOCAL);
    }
    let (_, peer_addr) = ends(key, hook_dir);

    // An ICMP error is related before it is anything else, once its sender is known to be the
    // endpoint's. Not related, it is an ordinary packet (its ports are 0).
    let mut checked = None;
    if parsed.class == Class::IcmpError {
        let ep = match hook_endpoint(key, hook_dir, ifindex) {
            Ok(ep) => ep,
            Err(drop) => return drop,
        };
        if !same_addr(&key.saddr, &key.daddr) && is_related(ctx, parsed, key) {
            return allow(REASON_RELATED);
        }
        checked = Some(ep);
    }

    // Forward entry first, then the reverse one. An echo request is looked up only as a
    // forward packet and an echo reply only as a reply: their tuples are the same. The reversed
    // key is built only when the forward lookup misses (a packet in a connection's original
    // direction does not need it).
    let mut rslot = MaybeUninit::uninit();
    let forward = if parsed.echo == ECHO_REPLY {
        None
    } else {
        WEIR_CONNTRACK.get_ptr_mut(key)
    };
    // `orig`: the connection's original tuple, as its entry is keyed.
    let (entry, is_reply, orig) = match forward {
        Some(e) => (Some(e), false, key),
        None if parsed.echo == ECHO_REQUEST => (None, false, key),
        None => {
            let rkey = &KeyBuf::reverse_in(&mut rslot, key).key;
            match WEIR_CONNTRACK.get_ptr_mut(rkey) {
                Some(e) => (Some(e), true, rkey),
                None => (None, false, key),
            }
        }
    };
    // The side of the original tuple this endpoint is on.
    let side = match (hook_dir, is_reply) {
        (DIR_EGRESS, false) | (DIR_INGRESS, true) => DIR_EGRESS,
        _ => DIR_INGRESS,
    };

    // Fast path: this side was allowed under the current generation, on this veth. No entry has
    // a pod's own address on both ends (those packets are never tracked), so one found here is
    // not such a packet.
    if let Some(entry) = entry {
        // SAFETY: the pointer comes from a successful lookup of an LRU hash value; concurrent
        // writers race only on plain integer fields, which the next packet corrects.
        let ct = unsafe { &mut *entry };
        let this = side_state(ct, side);
        if this.current(generation) && this.veth == ifindex {
            touch(ct, is_reply);
            let other = side_state(ct, other_side(side));
            let mut verdict = allow(REASON_ESTABLISHED);
            if other.current(generation) {
                verdict.current_peer_veth = other.veth;
            }
            return verdict;
        }
    }

    let ep = match checked {
        Some(ep) => ep,
        None => match hook_endpoint(key, hook_dir, ifindex) {
            Ok(ep) => ep,
            Err(drop) => return drop,
        },
    };
    // A pod talking to its own address: not subject to policy.
    if same_addr(&key.saddr, &key.daddr) {
        return allow(REASON_NOT_ISOLATED);
    }

    let dport = if is_icmp(orig.proto) { 0 } else { orig.dport };
    let eval = evaluate(ep.subject, side, peer_addr, orig.proto, dport);
    let report = Report {
        key,
        direction: side,
        ifindex,
        subject: ep.subject,
        subject_version: eval.version,
        peer: eval.peer,
        rule: eval.rule,
    };

    let Some(entry) = entry else {
        // A new connection in this packet's direction.
        if !eval.allowed {
            return drop_packet(&report, REASON_POLICY_DENIED);
        }
        let mut value = CtValue {
            last_seen_ns: now(),
            ..CtValue::default()
        };
        record(&mut value, side, generation, eval.rule, ep.ifindex);
        if WEIR_CONNTRACK.insert(key, &value, BPF_ANY as u64).is_err() {
            return drop_packet(&report, REASON_INTERNAL);
        }
        return if config_flags & CONFIG_EMIT_ALLOW_EVENTS != 0 {
            allow_reported(&report, eval.reason)
        } else {
            allow(eval.reason)
        };
    };

    // SAFETY: as above.
    let ct = unsafe { &mut *entry };
    let checked = side_state(ct, side).allowed;
    // This side is checked for the first time, or again after a policy change (or on an entry
    // from before the veths were recorded).
    if eval.allowed {
        record(ct, side, generation, eval.rule, ep.ifindex);
        touch(ct, is_reply);
        if checked {
            return allow(REASON_ESTABLISHED);
        }
        return if config_flags & CONFIG_EMIT_ALLOW_EVENTS != 0 {
            allow_reported(&report, eval.reason)
        } else {
            allow(eval.reason)
        };
    }
    if !checked {
        return drop_packet(&report, REASON_POLICY_DENIED);
    }
    if config_flags & CONFIG_REVOKE_ESTABLISHED != 0 {
        let _ = WEIR_CONNTRACK.remove(orig);
        return drop_packet(&report, REASON_REVOKED);
    }
    // Revocation is off: the connection keeps going, and is checked again on its next packet
    // (so turning revocation on later still cuts it).
    touch(ct, is_reply);
    allow(REASON_ESTABLISHED)
}

/// What a conntrack entry holds about one side of its connection.
struct SideState {
    /// The side's `CT_*_ALLOWED` flag is set.
    allowed: bool,
    /// The generation it was checked under.
    generation: u32,
    /// The endpoint's host veth it was checked on.
    veth: u32,
}

impl SideState {
    /// Allowed under `generation`.
    #[inline(always)]
    fn current(&self, generation: u32) -> bool {
        self.allowed && self.generation == generation
    }
}

#[inline(always)]
fn side_state(ct: &CtValue, side: u8) -> SideState {
    if side == DIR_EGRESS {
        SideState {
            allowed: ct.flags & CT_EGRESS_ALLOWED != 0,
            generation: ct.egress_generation,
            veth: ct.egress_ifindex,
        }
    } else {
        SideState {
            allowed: ct.flags & CT_INGRESS_ALLOWED != 0,
            generation: ct.ingress_generation,
            veth: ct.ingress_ifindex,
        }
    }
}

#[inline(always)]
fn other_side(side: u8) -> u8 {
    if side == DIR_EGRESS {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    }
}

#[inline(always)]
fn record(ct: &mut CtValue, side: u8, generation: u32, rule: u32, veth: u32) {
    if side == DIR_EGRESS {
        ct.flags |= CT_EGRESS_ALLOWED;
        ct.egress_generation = generation;
        ct.egress_rule = rule;
        ct.egress_ifindex = veth;
    } else {
        ct.flags |= CT_INGRESS_ALLOWED;
        ct.ingress_generation = generation;
        ct.ingress_rule = rule;
        ct.ingress_ifindex = veth;
    }
}

/// How stale `CtValue::last_seen_ns` may get on an established flow. The entry is shared by both
/// directions, which often run on different CPUs: writing it on every packet moves its cache line
/// back and forth between them on every request and reply. Idle expiry works in seconds.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Marks the entry as used: its timestamp at most every `CT_REFRESH_NS`, the reply flag once.
#[inline(always)]
fn touch(ct: &mut CtValue, is_reply: bool) {
    let now = now();
    if now.wrapping_sub(ct.last_seen_ns) >= CT_REFRESH_NS {
        ct.last_seen_ns = now;
    }
    if is_reply && ct.flags & CT_SEEN_REPLY == 0 {
        ct.flags |= CT_SEEN_REPLY;
    }
}
