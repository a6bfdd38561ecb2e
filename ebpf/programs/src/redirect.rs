//! Pod traffic without the node's IP stack, once `weir_from_pod` allowed its egress:
//!
//! - to another pod on this node: the destination's ingress is checked right here (the same
//!   `decide` that `weir_to_pod` runs, on the same conntrack entry) and the packet goes with
//!   `bpf_redirect_peer` straight into the destination's namespace, as a router would deliver it:
//!   MACs from the FIB and neighbour table, TTL or hop limit decremented. The next hop is cached
//!   per destination veth (`WEIR_NEXTHOPS`, valid under one config generation and for a second),
//!   so an established flow's packets take it without a FIB lookup. An established connection
//!   whose both sides are current needs neither the destination's check nor its endpoint lookup:
//!   its conntrack entry names the destination's veth;
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

use core::{
    mem::MaybeUninit,
    ptr::{null, write_volatile},
};

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, bpf_fib_lookup as FibParams, bpf_redir_neigh as RedirNeigh,
        bpf_redir_neigh__bindgen_ty_1 as RedirNeighAddr,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, CONFIG_REDIRECT_REMOTE, COUNTER_PATH_REDIRECT_NEIGH,
    COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, CtKey, DIR_INGRESS, EndpointKey,
    IDENTITY_CLUSTER_SHIFT, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, LocalNextHop,
    NEXTHOP_RECHECK_NS, NEXTHOP_SLOTS, REASON_ESTABLISHED,
};

use crate::{
    datapath::decide,
    debug_log,
    maps::{WEIR_CONFIG, WEIR_ENDPOINTS, WEIR_NEXTHOPS},
    parse::{Class, ETH_HLEN, Fragment, Parsed},
    policy::resolve_peer,
    report::{Verdict, count},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// IPv4 header: TTL (followed by the protocol and the checksum).
const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
/// IPv6 header: hop limit.
const IPV6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;

#[inline(always)]
fn stack(ifindex: u32) -> i32 {
    count(COUNTER_PATH_STACK);
    debug_log::path(COUNTER_PATH_STACK, ifindex, 0);
    TC_ACT_OK as i32
}

/// Destination and source MAC, 8-byte aligned for the helper's copy into the frame.
#[repr(C, align(8))]
struct MacsBuf {
    macs: [u8; 12],
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
    let (flags, generation) = match WEIR_CONFIG.get(0) {
        Some(c) => (c.flags, c.generation),
        None => (0, 0),
    };
    if flags & (CONFIG_REDIRECT_LOCAL | CONFIG_REDIRECT_REMOTE) == 0
        || parsed.class != Class::Normal
        || parsed.fragment != Fragment::Whole
    {
        return stack(ifindex);
    }
    if flags & CONFIG_REDIRECT_LOCAL != 0 && egress.current_peer_veth != 0 {
        // Both sides current: the destination is the local pod behind that veth, and its ingress
        // allowed this connection under this generation.
        return to_local_pod(
            ctx,
            ifindex,
            parsed,
            key,
            egress.current_peer_veth,
            generation,
            true,
        );
    }
    match WEIR_ENDPOINTS.get_ptr(endpoint_key(&key.daddr)) {
        Some(ep) if flags & CONFIG_REDIRECT_LOCAL != 0 => {
            // SAFETY: the pointer comes from a successful lookup; the field is a plain integer.
            let ep_ifindex = unsafe { (*ep).ifindex };
            to_local_pod(ctx, ifindex, parsed, key, ep_ifindex, generation, false)
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
fn fib_lookup(ctx: &TcContext, ifindex: u32, v6: bool, key: &CtKey, params: &mut FibParams) -> i64 {
    params.ifindex = ifindex;
    params.l4_protocol = key.proto;
    params.sport = key.sport;
    params.dport = key.dport;
    if v6 {
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

/// The TTL (or hop limit) with what follows it (see `Parsed::ttl_check`), if a router may forward
/// the packet: the stack would answer an expiring TTL with an ICMP error.
#[inline(always)]
fn forwardable_ttl(parsed: &Parsed) -> Option<[u8; 4]> {
    if parsed.ttl_check[0] <= 1 {
        return None;
    }
    Some(parsed.ttl_check)
}

/// One's complement sum of two 16-bit words (RFC 1071).
#[inline(always)]
fn ones_add(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Decrements the TTL (or hop limit), the IPv4 checksum with it: the hop a router takes. IPv4
/// writes TTL, protocol and checksum in one store, the checksum updated incrementally (RFC 1624,
/// eq. 3: HC' = ~(~HC + ~m + m'), m the TTL and protocol word).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, parsed: &Parsed, ttl_check: [u8; 4]) -> bool {
    let ttl = ttl_check[0] - 1;
    if parsed.v6 {
        // The hop limit is the last byte of the word from the payload length on: a one-byte
        // bounds check gives the verifier no range (see `Packet::load_linear`).
        return match linear_window::<4>(ctx, IPV6_HOP_LIMIT_OFF - 3) {
            Some(at) => {
                // SAFETY: the four bytes from `at` are in the linear part.
                unsafe { at.add(3).write(ttl) };
                true
            }
            None => ctx.store(IPV6_HOP_LIMIT_OFF, &ttl, 0).is_ok(),
        };
    }
    let old_word = u16::from_be_bytes([ttl_check[0], ttl_check[1]]);
    let new_word = u16::from_be_bytes([ttl, ttl_check[1]]);
    let check = u16::from_be_bytes([ttl_check[2], ttl_check[3]]);
    let check = !ones_add(ones_add(!check, !old_word), new_word);
    let [c0, c1] = check.to_be_bytes();
    store(ctx, IPV4_TTL_OFF, &[ttl, ttl_check[1], c0, c1])
}

/// A pointer to the `N` bytes at `off`, if they lie in the packet's linear part: a bounds check
/// the verifier follows, as for the parser's direct reads.
#[inline(always)]
fn linear_window<const N: usize>(ctx: &TcContext, off: usize) -> Option<*mut u8> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + off + N <= data_end {
        Some((data + off) as *mut u8)
    } else {
        None
    }
}

/// Writes `bytes` at `off`: straight into the linear part where they lie there, as the headers of
/// pod traffic nearly always do (stores, no helper call and its `memcpy`), else through
/// `bpf_skb_store_bytes`, which also reaches paged data.
///
/// A program with a direct write gets a prologue from the verifier that makes the packet's
/// linear part writable (`bpf_skb_pull_data(skb, 0)`): a cloned skb (TCP keeps the original for
/// retransmission) is uncloned there, on every packet of `weir_from_pod`, instead of in the
/// helper, on the packets it rewrites. Nearly all of them are rewritten once the redirect is on.
#[inline(always)]
fn store<const N: usize>(ctx: &TcContext, off: usize, bytes: &[u8; N]) -> bool {
    match linear_window::<N>(ctx, off) {
        Some(at) => {
            // SAFETY: `N` bytes from `at` are in the linear part (checked, and by the verifier)
            // and do not overlap `bytes`, which is on the stack.
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), at, N) };
            true
        }
        None => ctx.store(off, bytes, 0).is_ok(),
    }
}

/// The address as the endpoint map's key, in place (a copy would take 16 more bytes of the
/// programs' short stack).
#[inline(always)]
fn endpoint_key(addr: &[u8; 16]) -> &EndpointKey {
    // SAFETY: `EndpointKey` is `repr(C)` with the address as its only field: same size, same
    // alignment (1), every bit pattern valid.
    unsafe { &*addr.as_ptr().cast::<EndpointKey>() }
}

#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The next hop cache's slot of the veth `ifindex` (see `NEXTHOP_SLOTS`).
#[inline(always)]
fn hop_slot(ifindex: u32) -> Option<*mut LocalNextHop> {
    WEIR_NEXTHOPS.get_ptr_mut(ifindex & (NEXTHOP_SLOTS - 1))
}

/// The cached next hop towards the local pod on the veth `ep_ifindex`, if its slot holds that
/// veth's, filled under `generation` (no endpoint changed since) and confirmed by the FIB within
/// `NEXTHOP_RECHECK_NS`.
///
/// The entry is read in place, not copied whole (the programs' stack is short; only its MACs go
/// to the stack, right before the write). A refill by another CPU writes the same veth's hop;
/// only another veth of the same slot could overwrite it in between, and then the frame carries
/// a wrong MAC into the right veth, which the pod's stack discards.
#[inline(always)]
fn cached_hop(ep_ifindex: u32, generation: u32) -> Option<*const LocalNextHop> {
    let hop = hop_slot(ep_ifindex)?;
    // SAFETY: the pointer comes from a successful lookup; the fields are plain integers.
    let (hop_ifindex, hop_generation, checked_ns) =
        unsafe { ((*hop).ifindex, (*hop).generation, (*hop).checked_ns) };
    if hop_ifindex != ep_ifindex
        || hop_generation != generation
        || coarse_now().wrapping_sub(checked_ns) >= NEXTHOP_RECHECK_NS
    {
        return None;
    }
    Some(hop)
}

/// The next hop towards the local pod on the veth `ep_ifindex` from the FIB, as a router receiving
/// the packet on `ifindex` would route it, put into the cache under `generation` and used from
/// there; null if the route does not go to the pod's veth (or there is none, or no neighbour
/// entry).
#[inline(always)]
fn next_hop(
    ctx: &TcContext,
    ifindex: u32,
    v6: bool,
    key: &CtKey,
    ep_ifindex: u32,
    generation: u32,
) -> *const LocalNextHop {
    let mut slot = MaybeUninit::uninit();
    let params = zeroed_params(&mut slot);
    let ret = fib_lookup(ctx, ifindex, v6, key, params);
    if ret != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex != ep_ifindex {
        return null();
    }
    let Some(hop) = hop_slot(ep_ifindex) else {
        return null();
    };
    // SAFETY: the pointer comes from a successful lookup of an array slot; plain integers and
    // bytes, written in place (see `cached_hop` for a concurrent reader).
    let entry = unsafe { &mut *hop };
    entry.checked_ns = coarse_now();
    entry.generation = generation;
    entry.ifindex = ep_ifindex;
    entry.macs[..6].copy_from_slice(&params.dmac);
    entry.macs[6..].copy_from_slice(&params.smac);
    hop
}

/// A local destination pod on the veth `ep_ifindex`: its ingress checked here (unless
/// `ingress_current`: allowed under `generation` already), then `bpf_redirect_peer` into its
/// namespace, towards the next hop of the node's route.
#[inline(always)]
fn to_local_pod(
    ctx: &TcContext,
    ifindex: u32,
    parsed: &Parsed,
    key: &CtKey,
    ep_ifindex: u32,
    generation: u32,
    ingress_current: bool,
) -> i32 {
    if ep_ifindex == ifindex {
        // To itself, or to another address of the same pod: the stack turns it around.
        return stack(ifindex);
    }
    let Some(ttl_check) = forwardable_ttl(parsed) else {
        return stack(ifindex);
    };
    // `deliver` read `generation` before any FIB lookup here: a hop filled now is the FIB's answer
    // under that generation or a later one.
    let hop = match cached_hop(ep_ifindex, generation) {
        Some(hop) => hop,
        None => next_hop(ctx, ifindex, parsed.v6, key, ep_ifindex, generation),
    };
    if hop.is_null() {
        return stack(ifindex);
    }

    // The destination's ingress, exactly as its `weir_to_pod` would check it (and report a drop:
    // its veth, its identity, ingress). On an established connection whose entry the egress check
    // found with both sides current, that check would find the same entry and allow it: it is
    // counted as such without the lookups again.
    if ingress_current {
        count(REASON_ESTABLISHED as u32);
    } else {
        let verdict = decide(ctx, DIR_INGRESS, ep_ifindex, parsed, key);
        if !verdict.allowed() {
            return verdict.action;
        }
    }

    // Copied to the stack first: where the write falls back to the helper, its copy from
    // wherever the entry sits in the map can cost several times more than from an aligned stack
    // slot.
    // SAFETY: as above; plain bytes.
    let macs = MacsBuf {
        macs: unsafe { (*hop).macs },
    };
    if !(store(ctx, 0, &macs.macs) && decrement_ttl(ctx, parsed, ttl_check)) {
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
    let ret = fib_lookup(ctx, ifindex, parsed.v6, key, params);
    // Back out of the veth it came in on: not a route through this node.
    if ret != BPF_FIB_LKUP_RET_SUCCESS || params.ifindex == ifindex {
        return stack(ifindex);
    }
    let Some(ttl_check) = forwardable_ttl(parsed) else {
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
    if !decrement_ttl(ctx, parsed, ttl_check) {
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
