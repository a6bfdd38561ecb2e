//! Pod traffic without the node's IP stack, once `weir_from_pod` allowed its egress:
//!
//! - to another pod on this node: the destination's ingress is checked right here (the same
//!   `decide` that `weir_to_pod` runs, on the same conntrack entry) and the packet goes with
//!   `bpf_redirect_peer` straight into the destination's namespace, as a router would deliver it:
//!   MACs from the FIB and neighbour table, TTL or hop limit decremented;
//! - to a pod of another node of the cluster (the ipcache knows its address): the packet goes with
//!   `bpf_redirect_neigh` to the egress device of the node's route (the uplink, the overlay
//!   device), towards the route's next hop, TTL decremented; the destination's ingress is checked
//!   on its node, as through the stack.
//!
//! Where a shortcut cannot be taken the packet goes to the stack as before (and a local
//! destination's `weir_to_pod` checks it there): the destination is the node itself, another
//! node, the world, a pod of a mesh peer or unknown, the packet is a fragment, an ICMP error or
//! link-local, the FIB has no route, no neighbour for the next hop or a smaller MTU on the way,
//! the route goes back out of the pod's own veth (or, for a local pod, not to its veth), or the
//! TTL is running out. `COUNTER_PATH_REDIRECT_PEER`, `COUNTER_PATH_REDIRECT_NEIGH` and
//! `COUNTER_PATH_STACK` count which way each allowed packet went.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, bpf_fib_lookup as FibParams, bpf_redir_neigh as RedirNeigh,
        bpf_redir_neigh__bindgen_ty_1 as RedirNeighAddr,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, CONFIG_REDIRECT_REMOTE, COUNTER_PATH_REDIRECT_NEIGH,
    COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, CtKey, DIR_INGRESS, EndpointKey,
    IDENTITY_CLUSTER_SHIFT, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, REASON_ESTABLISHED,
};

use crate::{
    datapath::decide,
    debug_log,
    maps::{WEIR_CONFIG, WEIR_ENDPOINTS},
    parse::{Class, ETH_HLEN, Fragment, Parsed},
    policy::resolve_peer,
    report::{Verdict, count},
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
fn stack(ifindex: u32) -> i32 {
    count(COUNTER_PATH_STACK);
    debug_log::path(COUNTER_PATH_STACK, ifindex, 0);
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
/// destination pod's namespace, or hands it to the next hop towards another node's pod, if it
/// can; else hands it to the stack.
#[inline(always)]
pub fn deliver(
    ctx: &TcContext,
    ifindex: u32,
    parsed: &Parsed,
    key: &CtKey,
    egress: &Verdict,
) -> i32 {
    let flags = match WEIR_CONFIG.get(0) {
        Some(c) => c.flags,
        None => 0,
    };
    if flags & (CONFIG_REDIRECT_LOCAL | CONFIG_REDIRECT_REMOTE) == 0
        || parsed.class != Class::Normal
        || parsed.fragment != Fragment::Whole
    {
        return stack(ifindex);
    }
    match WEIR_ENDPOINTS.get_ptr(EndpointKey { addr: key.daddr }) {
        Some(ep) if flags & CONFIG_REDIRECT_LOCAL != 0 => {
            // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
            let ep_ifindex = unsafe { (*ep).ifindex };
            to_local_pod(ctx, ifindex, parsed, key, ep_ifindex, egress)
        }
        None if flags & CONFIG_REDIRECT_REMOTE != 0 && is_cluster_pod(&key.daddr) => {
            to_next_hop(ctx, ifindex, parsed, key)
        }
        _ => stack(ifindex),
    }
}

/// Whether the ipcache knows `addr` as a pod of this cluster (not a node, the world, or a pod
/// of a mesh peer, whose traffic takes the gateways' routes).
#[inline(always)]
fn is_cluster_pod(addr: &[u8; 16]) -> bool {
    match resolve_peer(addr).pod {
        Some(identity) => {
            identity >> IDENTITY_CLUSTER_SHIFT == 0
                && (IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR).contains(&identity)
        }
        None => false,
    }
}

/// Looks up the route of `key` as a router receiving it on `ifindex` would; `params` holds the
/// result (egress device, next hop, MACs) when it returns success.
#[inline(always)]
fn fib_lookup(
    ctx: &TcContext,
    ifindex: u32,
    parsed: &Parsed,
    key: &CtKey,
    params: &mut FibParams,
) -> i64 {
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
    // Without `tot_len` the helper checks the packet against the egress device's MTU itself
    // (GSO-aware) and answers "fragmentation needed": the stack then does what it must.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            params as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    }
}

/// The TTL (or hop limit) word of the packet, if a router may forward it: the stack would answer
/// an expiring TTL with an ICMP error.
#[inline(always)]
fn forwardable_ttl(ctx: &TcContext, parsed: &Parsed) -> Option<[u8; 2]> {
    let ttl_off = if parsed.v6 {
        IPV6_HOP_LIMIT_OFF
    } else {
        IPV4_TTL_OFF
    };
    let ttl_word = ctx.load::<[u8; 2]>(ttl_off).ok()?;
    if ttl_word[0] <= 1 {
        return None;
    }
    Some(ttl_word)
}

/// Decrements the TTL (or hop limit), the IPv4 checksum with it: the hop a router takes.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, parsed: &Parsed, ttl_word: [u8; 2]) -> bool {
    let new_word = [ttl_word[0] - 1, ttl_word[1]];
    if parsed.v6 {
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
    }
}

/// A local destination pod on the veth `ep_ifindex`: its ingress checked here, then
/// `bpf_redirect_peer` into its namespace.
#[inline(always)]
fn to_local_pod(
    ctx: &TcContext,
    ifindex: u32,
    parsed: &Parsed,
    key: &CtKey,
    ep_ifindex: u32,
    egress: &Verdict,
) -> i32 {
    if ep_ifindex == ifindex {
        // To itself, or to another address of the same pod: the stack turns it around.
        return stack(ifindex);
    }
    let mut slot = MaybeUninit::uninit();
    let params = zeroed_params(&mut slot);
    let ret = fib_lookup(ctx, ifindex, parsed, key, params);
    if ret != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex != ep_ifindex {
        return stack(ifindex);
    }
    let Some(ttl_word) = forwardable_ttl(ctx, parsed) else {
        return stack(ifindex);
    };

    // The destination's ingress, exactly as its `weir_to_pod` would check it (and report a drop:
    // its veth, its identity, ingress). On an established connection whose entry the egress check
    // found with both sides current, that check would find the same entry and allow it: it is
    // counted as such without the lookups again.
    if egress.both_sides_current {
        count(REASON_ESTABLISHED as u32);
    } else {
        let verdict = decide(ctx, DIR_INGRESS, ep_ifindex, parsed, key);
        if !verdict.allowed() {
            return verdict.action;
        }
    }

    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    if !(ctx.store(0, &macs, 0).is_ok() && decrement_ttl(ctx, parsed, ttl_word)) {
        // The destination's side is recorded in conntrack: its `weir_to_pod` finds it there.
        return stack(ifindex);
    }
    count(COUNTER_PATH_REDIRECT_PEER);
    debug_log::path(COUNTER_PATH_REDIRECT_PEER, ifindex, ep_ifindex);
    // SAFETY: a helper taking plain integers.
    unsafe { bpf_redirect_peer(ep_ifindex, 0) as i32 }
}

/// A pod of another node: `bpf_redirect_neigh` to the egress device of the node's route, towards
/// its next hop (the neighbour subsystem writes the MACs). The destination's ingress is checked
/// by its own node, as through the stack.
#[inline(always)]
fn to_next_hop(ctx: &TcContext, ifindex: u32, parsed: &Parsed, key: &CtKey) -> i32 {
    let mut slot = MaybeUninit::uninit();
    let params = zeroed_params(&mut slot);
    let ret = fib_lookup(ctx, ifindex, parsed, key, params);
    // Back out of the veth it came in on: not a route through this node.
    if ret != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex == ifindex {
        return stack(ifindex);
    }
    let Some(ttl_word) = forwardable_ttl(ctx, parsed) else {
        return stack(ifindex);
    };
    // The next hop as the lookup left it: the gateway of the route, or the destination itself on
    // a directly connected route (of the family the route's gateway has).
    let mut nh = RedirNeigh {
        nh_family: u32::from(params.family),
        __bindgen_anon_1: RedirNeighAddr { ipv6_nh: [0; 4] },
    };
    // SAFETY: plain integers in unions the lookup filled according to `params.family`.
    unsafe {
        if params.family == AF_INET6 {
            nh.__bindgen_anon_1.ipv6_nh = params.__bindgen_anon_4.ipv6_dst;
        } else {
            nh.__bindgen_anon_1.ipv4_nh = params.__bindgen_anon_4.ipv4_dst;
        }
    }
    let out_ifindex = params.ifindex;
    if !decrement_ttl(ctx, parsed, ttl_word) {
        return stack(ifindex);
    }
    count(COUNTER_PATH_REDIRECT_NEIGH);
    debug_log::path(COUNTER_PATH_REDIRECT_NEIGH, ifindex, out_ifindex);
    // SAFETY: `nh` is a whole `bpf_redir_neigh` on the stack, read by the helper.
    unsafe {
        bpf_redirect_neigh(
            out_ifindex,
            &mut nh as *mut RedirNeigh,
            size_of::<RedirNeigh>() as i32,
            0,
        ) as i32
    }
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
