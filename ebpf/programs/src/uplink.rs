//! `weir_xdp`: an early filter on the node's uplink (the device that carries node-to-node and
//! overlay traffic), run before the kernel allocates an skb.
//!
//! It drops two kinds of packets and passes everything else unchanged:
//! - a source in the operator's deny list (`WEIR_PREFILTER`), unless the packet is a reply of a
//!   connection a local pod opened;
//! - a new connection to a local pod whose ingress policy does not allow the source's identity:
//!   the same lookups `weir_to_pod` does (ipcache, subject, policy), with the same result.
//!
//! It is a filter, not the enforcer: `weir_to_pod` still checks every packet it passes. So where
//! it cannot be sure it passes: anything conntrack knows in either direction (established flows,
//! replies, revocation are tc's), fragments, ICMP errors, packets it cannot parse, non-IP, and
//! traffic that is not for a local pod (the node itself, the VXLAN underlay: the inner packet
//! meets `weir_to_pod` after decapsulation).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use weir_common::{
    AddrKey, COUNTER_XDP_PASSED, CtKey, DIR_INGRESS, EndpointKey, PROTO_ICMP, PROTO_ICMPV6,
    REASON_PREFILTER_DENIED, REASON_XDP_POLICY_DENIED, VERDICT_DROP,
};

use crate::{
    key::KeyBuf,
    maps::{WEIR_CONNTRACK, WEIR_ENDPOINTS, WEIR_PREFILTER},
    parse::{Class, Fragment, parse},
    policy::{evaluate, resolve_peer, subject_policy},
    report::{Report, count, emit},
};

/// Full-length prefix of a 16-byte address.
const ADDR_PREFIX_FULL: u32 = 128;

#[inline(always)]
fn pass() -> u32 {
    count(COUNTER_XDP_PASSED);
    XDP_PASS
}

#[inline(always)]
fn drop_packet(r: &Report<'_>, reason: u8) -> u32 {
    count(reason as u32);
    emit(r, VERDICT_DROP, reason);
    XDP_DROP
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
    let key = &buf.key;

    let listed = Key::new(ADDR_PREFIX_FULL, AddrKey { addr: key.saddr });
    if let Some(entry) = WEIR_PREFILTER.get(&listed) {
        if is_reply(key) {
            return pass();
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
        return drop_packet(&r, REASON_PREFILTER_DENIED);
    }

    let Some(ep) = WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: key.daddr }) else {
        return pass();
    };
    // SAFETY: as above.
    let subject = unsafe { (*ep).identity };
    if WEIR_CONNTRACK.get_ptr(key).is_some() || is_reply(key) {
        return pass();
    }
    let dport = if key.proto == PROTO_ICMP || key.proto == PROTO_ICMPV6 {
        0
    } else {
        key.dport
    };
    let eval = evaluate(subject, DIR_INGRESS, &key.saddr, key.proto, dport);
    if eval.allowed {
        return pass();
    }
    let r = Report {
        key,
        direction: DIR_INGRESS,
        ifindex,
        subject,
        subject_version: eval.version,
        peer: eval.peer,
        rule: 0,
    };
    drop_packet(&r, REASON_XDP_POLICY_DENIED)
}
