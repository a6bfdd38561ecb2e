//! Local delivery without the node's IP stack: a packet a pod sends to another pod on this node,
//! once `weir_from_pod` allowed its egress, gets the destination's ingress check right here (the
//! same `decide` that `weir_to_pod` runs, on the same conntrack entry) and goes with
//! `bpf_redirect_peer` straight into the destination's namespace, as a router would deliver it:
//! MACs from the FIB and neighbour table, TTL or hop limit decremented.
//!
//! Where the shortcut cannot be taken the packet goes to the stack as before, and the
//! destination's `weir_to_pod` checks it there: the destination is not a local pod (the node
//! itself, another node's pod, the world), a fragment, an ICMP error or link-local traffic, the
//! FIB does not route the address to the pod's own veth or has no neighbour for it, or the TTL
//! is running out. `COUNTER_PATH_REDIRECT_PEER` and `COUNTER_PATH_STACK` count which way each
//! allowed packet went.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_redirect_peer},
    programs::TcContext,
};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, CtKey, DIR_INGRESS,
    EndpointKey,
};

use crate::{
    datapath::decide,
    maps::{WEIR_CONFIG, WEIR_ENDPOINTS},
    parse::{Class, ETH_HLEN, Fragment, Parsed},
    report::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// IPv4 header: TTL (followed by the protocol, one 16-bit checksum word) and the checksum.
const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;
/// IPv6 header: hop limit.
const IPV6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;

#[inline(always)]
fn stack() -> i32 {
    count(COUNTER_PATH_STACK);
    TC_ACT_OK as i32
}

/// FIB lookup parameters, 8-byte aligned so they can be zeroed with word stores (see `key`: a
/// `memset` costs a byte loop).
#[repr(C, align(8))]
struct ParamsBuf {
    params: FibParams,
}
const PARAMS_WORDS: usize = size_of::<FibParams>() / 8;
const _: () = assert!(size_of::<ParamsBuf>() == PARAMS_WORDS * 8);

#[inline(always)]
fn zeroed_params(slot: &mut MaybeUninit<ParamsBuf>) -> &mut FibParams {
    let words = slot.as_mut_ptr().cast::<u64>();
    for i in 0..PARAMS_WORDS {
        // SAFETY: `ParamsBuf` is 8-byte aligned and PARAMS_WORDS * 8 bytes long.
        unsafe { write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; every bit pattern is a valid `ParamsBuf`.
    unsafe { &mut slot.assume_init_mut().params }
}

/// For a packet `weir_from_pod` allowed (at the veth with `ifindex`): delivers it into the
/// destination pod's namespace if it can, else hands it to the stack.
#[inline(always)]
pub fn deliver(ctx: &TcContext, ifindex: u32, parsed: &Parsed, key: &CtKey) -> i32 {
    let enabled = match WEIR_CONFIG.get(0) {
        Some(c) => c.flags & CONFIG_REDIRECT_LOCAL != 0,
        None => false,
    };
    if !enabled || parsed.class != Class::Normal || parsed.fragment != Fragment::Whole {
        return stack();
    }
    let Some(ep) = WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: key.daddr }) else {
        return stack();
    };
    // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
    let ep_ifindex = unsafe { (*ep).ifindex };
    if ep_ifindex == ifindex {
        // To itself, or to another address of the same pod: the stack turns it around.
        return stack();
    }

    let mut slot = MaybeUninit::uninit();
    let params = zeroed_params(&mut slot);
    params.ifindex = ifindex;
    params.l4_protocol = key.proto;
    params.sport = key.sport;
    params.dport = key.dport;
    if parsed.v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(&key.saddr);
        params.__bindgen_anon_4.ipv6_dst = words(&key.daddr);
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = ipv4_word(&key.saddr);
        params.__bindgen_anon_4.ipv4_dst = ipv4_word(&key.daddr);
    }
    // SAFETY: `params` is a whole `bpf_fib_lookup` on the stack; the helper reads and writes it.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            params as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex != ep_ifindex {
        return stack();
    }
    // The hop a router takes: the stack would answer an expiring TTL with an ICMP error.
    let ttl_off = if parsed.v6 {
        IPV6_HOP_LIMIT_OFF
    } else {
        IPV4_TTL_OFF
    };
    let Ok(ttl_word) = ctx.load::<[u8; 2]>(ttl_off) else {
        return stack();
    };
    if ttl_word[0] <= 1 {
        return stack();
    }

    // The destination's ingress, exactly as its `weir_to_pod` would check it (and report a drop:
    // its veth, its identity, ingress).
    let verdict = decide(ctx, DIR_INGRESS, ep_ifindex, parsed, key);
    if !verdict.allowed() {
        return verdict.action;
    }

    let new_word = [ttl_word[0] - 1, ttl_word[1]];
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    let rewritten = ctx.store(0, &macs, 0).is_ok()
        && if parsed.v6 {
            ctx.store(IPV6_HOP_LIMIT_OFF, &new_word[0], 0).is_ok()
        } else {
            ctx.l3_csum_replace(
                IPV4_CSUM_OFF,
                u16::from_ne_bytes(ttl_word) as u64,
                u16::from_ne_bytes(new_word) as u64,
                2,
            )
            .is_ok()
                && ctx.store(IPV4_TTL_OFF, &new_word[0], 0).is_ok()
        };
    if !rewritten {
        // The destination's side is recorded in conntrack: its `weir_to_pod` finds it there.
        return stack();
    }
    count(COUNTER_PATH_REDIRECT_PEER);
    // SAFETY: a helper taking plain integers.
    unsafe { bpf_redirect_peer(ep_ifindex, 0) as i32 }
}

/// An address as the four 32-bit words of `bpf_fib_lookup` (network order, as in memory).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The IPv4 address of an IPv4-mapped one, network order as in memory.
#[inline(always)]
fn ipv4_word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}
