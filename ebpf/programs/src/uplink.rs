//! `weir_xdp`: an early filter on the node's uplink (the device that carries node-to-node and
//! overlay traffic), run before the kernel allocates an skb.
//!
//! It drops two kinds of packets and passes everything else unchanged:
//! - a source in the operator's deny list (`WEIR_PREFILTER`), unless the packet is a reply of a
//!   connection a local pod opened;
//! - a new connection to a local pod whose ingress policy does not allow the source's identity:
//!   the same lookups `weir_to_pod` does (ipcache, subject, policy), with the same result. The
//!   denial is remembered per kind under the config generation (`WEIR_XDP_DENIALS`), so a flood
//!   of one kind pays one lookup for them instead of up to six.
//!
//! Every drop is counted; the first of each kind in an interval is reported (see `throttle`), so
//! that a flood of denied packets does not become a flood of events.
//!
//! On a node with the VXLAN overlay (`WEIR_UPLINK` names its port), pods of other nodes arrive
//! inside tunnel packets addressed to the node: the filter looks through the outer IP, UDP and
//! VXLAN headers and decides on the pod packet inside, as on a native one, with the same reports
//! (the inner tuple; the uplink's ifindex).
//!
//! It is a filter, not the enforcer: `weir_to_pod` still checks every packet it passes. So where
//! it cannot be sure it passes: anything conntrack knows in either direction (established flows,
//! replies, revocation are tc's), fragments, ICMP errors, packets it cannot parse (a truncated or
//! malformed tunnel packet included: the stack drops it or decapsulates it, and `weir_to_pod`
//! checks what comes out), non-IP, and traffic that is not for a local pod (the node itself,
//! other tunnels).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use weir_common::{
    AddrKey, COUNTER_EVENTS_THROTTLED, COUNTER_XDP_PASSED, CtKey, DIR_INGRESS, DropKind,
    EndpointKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, REASON_PREFILTER_DENIED,
    REASON_XDP_POLICY_DENIED, VERDICT_DROP, XdpDenial,
};

use crate::{
    key::KeyBuf,
    maps::{
        WEIR_CONFIG, WEIR_CONNTRACK, WEIR_ENDPOINTS, WEIR_PREFILTER, WEIR_UPLINK, WEIR_XDP_DENIALS,
        WEIR_XDP_DENIALS_GENERATION,
    },
    packet::Packet,
    parse::{Class, Fragment, Parsed, parse, parse_at},
    policy::{evaluate_under, is_isolated, resolve_peer, subject_policy},
    report::{Report, count, count_and_report_drop, emit},
    throttle::{drop_kind, report_again},
};

/// Full-length prefix of a 16-byte address.
const ADDR_PREFIX_FULL: u32 = 128;
/// The UDP header, and the VXLAN header after it (RFC 7348): flags, reserved, VNI, reserved.
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// The VXLAN flag that says the VNI is valid (RFC 7348: must be set).
const VXLAN_FLAG_VNI: u8 = 0x08;

#[inline(always)]
fn pass() -> u32 {
    count(COUNTER_XDP_PASSED);
    XDP_PASS
}

/// Whether conntrack has the packet's connection as the reply direction (`key` reversed): a
/// connection the local end opened.
#[inline(always)]
fn is_reply(key: &CtKey) -> bool {
    let mut slot = MaybeUninit::uninit();
    WEIR_CONNTRACK
        .get_ptr(&KeyBuf::reverse_in(&mut slot, key).key)
        .is_some()
}

/// What the filter made of one (outer or inner) packet.
enum Filtered {
    /// Dropped (counted and reported).
    Dropped,
    /// For a local pod, and left to `weir_to_pod`.
    Passed,
    /// Not for a local pod: the node's, another node's, or a tunnel's.
    NotForLocalPod,
}

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    // SAFETY: `ctx.ctx` is the context pointer the kernel passed.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut slot = MaybeUninit::uninit();
    let buf = KeyBuf::zeroed_in(&mut slot);
    let Ok(parsed) = parse(ctx, buf) else {
        return pass();
    };
    if parsed.class != Class::Normal || parsed.fragment != Fragment::Whole {
        return pass();
    }
    match filter(ifindex, &buf.key) {
        Filtered::Dropped => return XDP_DROP,
        Filtered::Passed => return pass(),
        Filtered::NotForLocalPod => {}
    }
    // A tunnel packet of the overlay: the pod packet inside meets the same filter. Whatever is
    // not a well-formed VXLAN packet with a whole, parsable IP packet inside passes: the stack
    // decapsulates it (or not) and `weir_to_pod` enforces on what comes out.
    let Some(inner_base) = vxlan_inner_frame(ctx, &parsed, &buf.key) else {
        return pass();
    };
    // The outer tuple is no longer needed: the inner one takes its place.
    let inner = KeyBuf::zeroed_in(&mut slot);
    let Ok(inner_parsed) = parse_at(ctx, inner_base, inner) else {
        return pass();
    };
    if inner_parsed.class != Class::Normal || inner_parsed.fragment != Fragment::Whole {
        return pass();
    }
    match filter(ifindex, &inner.key) {
        Filtered::Dropped => XDP_DROP,
        Filtered::Passed | Filtered::NotForLocalPod => pass(),
    }
}

/// The offset of the Ethernet frame inside `parsed` if it is a VXLAN packet of the node's overlay
/// (UDP to the configured port, the VNI flag set); `None` without an overlay.
#[inline(always)]
fn vxlan_inner_frame(ctx: &XdpContext, parsed: &Parsed, key: &CtKey) -> Option<usize> {
    let port = WEIR_UPLINK.get(0)?.vxlan_port;
    if port == 0 || key.proto != PROTO_UDP || key.dport != port {
        return None;
    }
    let header: [u8; VXLAN_HLEN] = ctx.load(parsed.l4_off + UDP_HLEN)?;
    if header[0] & VXLAN_FLAG_VNI == 0 {
        return None;
    }
    Some(parsed.l4_off + UDP_HLEN + VXLAN_HLEN)
}

/// The filter's decision on a whole, parsed IP packet with tuple `key`: the deny list, then (for
/// a local pod) conntrack and the pod's ingress policy.
#[inline(always)]
fn filter(ifindex: u32, key: &CtKey) -> Filtered {
    let listed = Key::new(ADDR_PREFIX_FULL, AddrKey { addr: key.saddr });
    if let Some(entry) = WEIR_PREFILTER.get(&listed) {
        if is_reply(key) {
            return Filtered::Passed;
        }
        let (subject, subject_version) =
            match WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: key.daddr }) {
                // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
                Some(ep) => {
                    let subject = unsafe { (*ep).identity };
                    (subject, subject_policy(subject).0)
                }
                None => (0, 0),
            };
        let r = Report {
            key,
            direction: DIR_INGRESS,
            ifindex,
            subject,
            subject_version,
            peer: resolve_peer(&key.saddr).reported(),
            rule: entry.entry,
        };
        count_and_report_drop(&r, REASON_PREFILTER_DENIED);
        return Filtered::Dropped;
    }

    let Some(ep) = WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: key.daddr }) else {
        return Filtered::NotForLocalPod;
    };
    // SAFETY: as above.
    let subject = unsafe { (*ep).identity };
    if WEIR_CONNTRACK.get_ptr(key).is_some() || is_reply(key) {
        return Filtered::Passed;
    }
    // Read before the policy: a denial is remembered under the generation whose maps decided it
    // (the agent writes the maps first, then bumps the generation).
    let generation = match WEIR_CONFIG.get(0) {
        Some(c) => c.generation,
        None => 0,
    };
    if denials_remembered_under(generation) && drop_if_denied_before(ifindex, key, generation) {
        return Filtered::Dropped;
    }
    let (version, flags) = subject_policy(subject);
    if !is_isolated(flags, DIR_INGRESS) {
        // Nothing to deny, and the filter reports no allowed connection: the peer's identity is
        // not needed.
        return Filtered::Passed;
    }
    let dport = if key.proto == PROTO_ICMP || key.proto == PROTO_ICMPV6 {
        0
    } else {
        key.dport
    };
    let eval = evaluate_under(
        subject,
        (version, flags),
        DIR_INGRESS,
        &key.saddr,
        key.proto,
        dport,
    );
    if eval.allowed {
        return Filtered::Passed;
    }
    let denial = XdpDenial {
        generation,
        subject,
        subject_version: eval.version,
        peer: eval.peer,
        reported_ns: 0,
    };
    drop_denied(ifindex, key, denial);
    Filtered::Dropped
}

/// The key of a policy denial's kind in `WEIR_XDP_DENIALS`.
#[inline(always)]
fn denial_kind(key: &CtKey) -> DropKind {
    drop_kind(key, REASON_XDP_POLICY_DENIED, DIR_INGRESS)
}

/// Whether `WEIR_XDP_DENIALS` may hold a denial decided under `generation`: one array read that
/// spares a new connection the hash lookup while no denial was remembered since the last map
/// write (a remembered one is only trusted under its own generation anyway).
#[inline(always)]
fn denials_remembered_under(generation: u32) -> bool {
    WEIR_XDP_DENIALS_GENERATION
        .get(0)
        .is_none_or(|newest| *newest == generation)
}

/// Counts and drops the packet if its kind was denied under `generation` (see
/// `weir_common::xdp_denials`), reporting it as that denial was unless throttled.
///
/// Inlined (unlike `drop_denied`): it runs for every new connection to a local pod, and
/// `weir_xdp`'s frame has room for its key.
#[inline(always)]
fn drop_if_denied_before(ifindex: u32, key: &CtKey, generation: u32) -> bool {
    let Some(denial) = WEIR_XDP_DENIALS.get_ptr_mut(&denial_kind(key)) else {
        return false;
    };
    // SAFETY: the pointer comes from a successful lookup; the fields are plain integers, which a
    // concurrent refresh of the same kind overwrites with values as current.
    let denial = unsafe { &mut *denial };
    if denial.generation != generation {
        return false;
    }
    count(REASON_XDP_POLICY_DENIED as u32);
    report_throttled(ifindex, key, denial);
    true
}

/// Counts a drop the policy decided just now, reports it unless its kind was reported within the
/// interval (or this CPU's budget is spent), and remembers it: a kind remembered under an older
/// generation is refreshed in place; a new kind is remembered if it was reported.
#[inline(never)]
fn drop_denied(ifindex: u32, key: &CtKey, mut denial: XdpDenial) {
    count(REASON_XDP_POLICY_DENIED as u32);
    // Only a gate for the lookup: a reader that misses this store evaluates the packet, which is
    // never wrong.
    if let Some(newest) = WEIR_XDP_DENIALS_GENERATION.get_ptr_mut(0) {
        // SAFETY: a pointer into the array's only slot; a plain integer, which every writer
        // sets to a generation as current as its own.
        unsafe {
            if *newest != denial.generation {
                *newest = denial.generation;
            }
        }
    }
    let kind = denial_kind(key);
    if let Some(known) = WEIR_XDP_DENIALS.get_ptr_mut(&kind) {
        // SAFETY: as in `drop_if_denied_before`.
        let known = unsafe { &mut *known };
        *known = XdpDenial {
            reported_ns: known.reported_ns,
            ..denial
        };
        report_throttled(ifindex, key, known);
        return;
    }
    if report_throttled(ifindex, key, &mut denial) {
        // If the LRU cannot take it, the next packet of the kind is evaluated again.
        let _ = WEIR_XDP_DENIALS.insert(&kind, &denial, 0);
    }
}

/// Reports the denial's drop unless its kind was reported within the interval or this CPU's
/// budget is spent (then it is counted as throttled); whether it was reported.
#[inline(always)]
fn report_throttled(ifindex: u32, key: &CtKey, denial: &mut XdpDenial) -> bool {
    let last = (denial.reported_ns != 0).then_some(denial.reported_ns);
    let Some(now) = report_again(last) else {
        count(COUNTER_EVENTS_THROTTLED);
        return false;
    };
    denial.reported_ns = now;
    let r = Report {
        key,
        direction: DIR_INGRESS,
        ifindex,
        subject: denial.subject,
        subject_version: denial.subject_version,
        peer: denial.peer,
        rule: 0,
    };
    emit(&r, VERDICT_DROP, REASON_XDP_POLICY_DENIED);
    true
}
