//! Local delivery with `bpf_redirect_peer`, through `BPF_PROG_TEST_RUN`: a packet one local pod
//! sends to another gets the destination's ingress check inline in `weir_from_pod` (same
//! conntrack entry, same drop report as `weir_to_pod`), the MACs a router would write and a
//! decremented TTL, and is redirected into the destination's namespace; everything the shortcut
//! cannot take goes to the stack. Counters say which way each allowed packet went. The next hop
//! is cached per destination veth under the config generation, and not used under another one or
//! once it is older than the recheck interval.
//!
//! The FIB lookup runs in the namespace of the thread that runs the test: each test builds one
//! with the destination pod's host veth, its route and its permanent neighbour entry, as the CNI
//! plugin leaves them. Root only.

use aya::maps::{Array, HashMap};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, CONFIG_REVOKE_ESTABLISHED, COUNTER_PATH_REDIRECT_PEER,
    COUNTER_PATH_STACK, CT_EGRESS_ALLOWED, CT_INGRESS_ALLOWED, DIR_INGRESS, EndpointInfo,
    EndpointKey, LocalNextHop, MAP_ENDPOINTS, MAP_NEXTHOPS, NEXTHOP_RECHECK_NS, NEXTHOP_SLOTS,
    PROG_FROM_POD, PROTO_TCP, REASON_ESTABLISHED, REASON_NOT_ISOLATED, REASON_POLICY_DENIED,
    REASON_REVOKED, REASON_RULE, SUBJECT_ISOLATED_INGRESS, VERDICT_DROP,
};
use weir_tests::packet::{ipv4_checksum_ok, with_ipv4_checksum};
use weir_tests::{
    netns::{Netns, run, spawn_in},
    packet::{ETH_P_IP, TCP_SYN, addr, ethernet, ipv4_fragment, tcp, tcp_header},
    testrun::*,
};

/// `bpf_redirect_peer`'s verdict.
const TC_ACT_REDIRECT: u32 = 7;
/// The destination pod's MAC (its neighbour entry) and its host veth's.
const POD_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const HOST_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const POD_B6: &str = "fd00:1::2";

/// Runs `f` in a namespace holding pod B's host veth `vb` (route and permanent neighbour for
/// B's IPv4 and IPv6 address, forwarding on), with pods A, B and C loaded and B's endpoint on
/// `vb`, and redirection `on` or off.
fn with_host_veth<T: Send + 'static>(
    tag: &str,
    on: bool,
    f: impl FnOnce(&mut Datapath, u32) -> T + Send + 'static,
) -> T {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link",
        "add",
        "vb",
        "address",
        "02:00:00:00:00:aa",
        "type",
        "veth",
        "peer",
        "name",
        "vbp",
    ]);
    ns.ip(&["link", "set", "vb", "up"]);
    ns.ip(&["link", "set", "vbp", "up"]);
    ns.ip(&["route", "add", &format!("{POD_B}/32"), "dev", "vb"]);
    ns.ip(&["-6", "route", "add", &format!("{POD_B6}/128"), "dev", "vb"]);
    for addr in [POD_B, POD_B6] {
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            "02:00:00:00:00:0b",
            "dev",
            "vb",
            "nud",
            "permanent",
        ]);
    }
    for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", sysctl]);
    }
    let result = spawn_in(ns.path(), move || {
        let vb = nix::net::if_::if_nametoindex("vb").expect("vb");
        let mut dp = Datapath::with_pods();
        dp.endpoint(POD_B, vb, ID_B);
        dp.endpoint(POD_B6, vb, ID_B);
        dp.config(1, if on { CONFIG_REDIRECT_LOCAL } else { 0 });
        f(&mut dp, vb)
    })
    .join();
    drop(ns);
    result.expect("the test panicked in the namespace")
}

#[test]
fn a_local_destination_is_delivered_into_its_namespace_with_its_ingress_checked_inline() {
    with_host_veth("rd1", true, |dp, _| {
        let frame = with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80));
        let ttl = frame[14 + 8];
        let (verdict, out) = dp.run_out(PROG_FROM_POD, &frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[..6], &POD_B_MAC, "destination MAC: the pod's");
        assert_eq!(&out[6..12], &HOST_B_MAC, "source MAC: its host veth's");
        assert_eq!(out[14 + 8], ttl - 1, "TTL decremented");
        assert!(ipv4_checksum_ok(&out[14..34]), "header checksum updated");
        assert_eq!(&out[34..], &frame[34..], "payload untouched");
        // Both sides are in the one conntrack entry, as if both hooks had run.
        let ct = dp
            .ct(&ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP))
            .expect("a conntrack entry");
        assert_eq!(
            ct.flags & (CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED),
            CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED
        );
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 1);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 0);
        // IPv6: hop limit decremented, same MACs.
        let frame6 = tcp(ip_of("fd00:1::1"), 40000, ip_of(POD_B6), 80, TCP_SYN);
        dp.endpoint("fd00:1::1", TEST_RUN_IFINDEX, ID_A);
        let (verdict, out) = dp.run_out(PROG_FROM_POD, &frame6);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[..6], &POD_B_MAC);
        assert_eq!(out[14 + 7], frame6[14 + 7] - 1, "hop limit decremented");
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 2);
    });
}

/// Once both sides of a connection are current, its conntrack entry names the destination's veth
/// and the redirect delivers there without looking the destination up: an endpoint removed
/// without a new generation is not seen; under the next generation (which the agent writes after
/// every endpoint change) the packet takes the stack, as to any address that is no local pod.
#[test]
fn an_established_connection_is_delivered_to_the_veth_its_entry_names() {
    with_host_veth("rd9", true, |dp, vb| {
        let syn_frame = with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80));
        assert_eq!(dp.run_out(PROG_FROM_POD, &syn_frame).0, TC_ACT_REDIRECT);
        let ct = dp
            .ct(&ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP))
            .expect("a conntrack entry");
        assert_eq!(
            (ct.egress_ifindex, ct.ingress_ifindex),
            (TEST_RUN_IFINDEX, vb)
        );

        HashMap::<_, EndpointKey, EndpointInfo>::try_from(dp.ebpf.map_mut(MAP_ENDPOINTS).unwrap())
            .unwrap()
            .remove(&pod_b_key())
            .unwrap();
        let ack_frame = with_ipv4_checksum(ack(POD_A, 40000, POD_B, 80));
        let (verdict, out) = dp.run_out(PROG_FROM_POD, &ack_frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[..6], &POD_B_MAC);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 2);

        dp.config(2, CONFIG_REDIRECT_LOCAL);
        assert_eq!(dp.from_pod(&ack_frame), OK);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 2);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 1);
    });
}

#[test]
fn a_drop_by_the_destinations_ingress_is_reported_as_its_own() {
    with_host_veth("rd2", true, |dp, vb| {
        dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
        assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
        assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
        let events = dp.events();
        assert_eq!(events.len(), 1);
        let e = events[0];
        assert_eq!(e.verdict, VERDICT_DROP);
        assert_eq!(e.reason, REASON_POLICY_DENIED);
        assert_eq!(e.direction, DIR_INGRESS);
        assert_eq!(e.subject, ID_B);
        assert_eq!(e.peer, ID_A);
        assert_eq!(e.ifindex, vb, "reported on the destination's veth");
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 0);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 0);
    });
}

/// An established connection whose entry has both sides allowed under the current generation is
/// delivered on the egress check's lookup alone (the destination's side counted as established,
/// as its own check would); after a policy change the destination's ingress is checked inline
/// again, and a revoked connection is cut and reported as the destination's drop.
#[test]
fn established_connections_are_redirected_and_rechecked_inline_after_a_policy_change() {
    with_host_veth("rd5", true, |dp, vb| {
        dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
        dp.allow(
            ID_B,
            1,
            DIR_INGRESS,
            ID_A,
            Some(PROTO_TCP),
            Ports::One(80),
            5,
        );
        let syn_frame = with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80));
        let ack_frame = with_ipv4_checksum(ack(POD_A, 40000, POD_B, 80));
        assert_eq!(dp.run_out(PROG_FROM_POD, &syn_frame).0, TC_ACT_REDIRECT);
        assert_eq!(dp.counter(REASON_NOT_ISOLATED), 1, "A's egress");
        assert_eq!(dp.counter(REASON_RULE), 1, "B's ingress");
        for _ in 0..3 {
            assert_eq!(dp.run_out(PROG_FROM_POD, &ack_frame).0, TC_ACT_REDIRECT);
        }
        // Each packet counts both sides as established, as two hooks would.
        assert_eq!(dp.counter(REASON_ESTABLISHED), 6);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 4);

        // The rule goes, with revocation on: B's ingress is checked again on the next packet.
        dp.revoke(ID_B, 1, DIR_INGRESS, ID_A, Some(PROTO_TCP), Ports::One(80));
        dp.config(2, CONFIG_REDIRECT_LOCAL | CONFIG_REVOKE_ESTABLISHED);
        assert_eq!(dp.from_pod(&ack_frame), SHOT);
        assert_eq!(dp.counter(REASON_REVOKED), 1);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 4);
        let events = dp.events();
        let e = events
            .iter()
            .find(|e| e.reason == REASON_REVOKED)
            .expect("the revocation is reported");
        assert_eq!(e.direction, DIR_INGRESS);
        assert_eq!(e.subject, ID_B);
        assert_eq!(e.ifindex, vb, "reported on the destination's veth");
        assert!(
            dp.ct(&ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP)).is_none(),
            "the revoked entry is gone"
        );
    });
}

#[test]
fn what_the_shortcut_cannot_take_goes_to_the_stack() {
    with_host_veth("rd3", true, |dp, _| {
        let first_fragment = ethernet(
            ETH_P_IP,
            &ipv4_fragment(
                [10, 1, 0, 1],
                [10, 1, 0, 2],
                PROTO_TCP,
                0x4243,
                0,
                true,
                &tcp_header(40001, 80, TCP_SYN),
            ),
        );
        let mut last_hop = syn(POD_A, 40002, POD_B, 80);
        last_hop[14 + 8] = 1;
        let frames = [
            // Another node's pod, the world, the node itself: not a local pod.
            syn(POD_A, 40000, REMOTE, 80),
            syn(POD_A, 40000, WORLD, 80),
            syn(POD_A, 40000, "10.1.0.254", 22),
            // A fragment: its later fragments meet the destination's hook on the stack path.
            first_fragment,
            // The TTL runs out: the stack answers with an ICMP error.
            last_hop,
            // C is a local endpoint the FIB does not route to its veth.
            syn(POD_A, 40003, POD_C, 80),
        ];
        for frame in &frames {
            assert_eq!(dp.from_pod(frame), OK);
        }
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), frames.len() as u64);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 0);
        // Only the egress side was checked: the destination's own hook checks the rest.
        let ct = dp
            .ct(&ct_key(POD_A, 40003, POD_C, 80, PROTO_TCP))
            .expect("a conntrack entry");
        assert_eq!(ct.flags & CT_INGRESS_ALLOWED, 0);
    });
}

#[test]
fn without_the_flag_everything_goes_to_the_stack() {
    with_host_veth("rd4", false, |dp, _| {
        assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 1);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 0);
    });
}

fn next_hops(dp: &mut Datapath) -> Array<&mut aya::maps::MapData, LocalNextHop> {
    Array::try_from(dp.ebpf.map_mut(MAP_NEXTHOPS).expect("the next hop cache")).unwrap()
}

/// The cached hop towards the pod on the veth `veth`: its slot, if it holds that veth's.
fn cached_hop(dp: &mut Datapath, veth: u32) -> Option<LocalNextHop> {
    let hop = next_hops(dp).get(&(veth & (NEXTHOP_SLOTS - 1)), 0).unwrap();
    (hop.ifindex == veth).then_some(hop)
}

fn pod_b_key() -> EndpointKey {
    EndpointKey {
        addr: addr(ip_of(POD_B)),
    }
}

/// A MAC no neighbour entry has: where a packet carries it, it came from the cache.
const PLANTED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xee];

/// Puts a next hop towards B with `PLANTED_MAC` into the cache, filled under `generation` and
/// confirmed at `checked_ns`.
fn plant_hop(dp: &mut Datapath, vb: u32, generation: u32, checked_ns: u64) {
    let mut macs = [0; 12];
    macs[..6].copy_from_slice(&PLANTED_MAC);
    macs[6..].copy_from_slice(&HOST_B_MAC);
    let hop = LocalNextHop {
        checked_ns,
        generation,
        ifindex: vb,
        macs,
        _pad: 0,
    };
    next_hops(dp).set(vb & (NEXTHOP_SLOTS - 1), hop, 0).unwrap();
}

/// The first packet to a local pod fills the next hop cache from the FIB; the next packets of the
/// same generation take the cached hop without a FIB lookup (a planted MAC shows it).
#[test]
fn the_next_hop_to_a_local_pod_is_cached_under_its_generation() {
    with_host_veth("rd6", true, |dp, vb| {
        let syn_frame = with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80));
        assert_eq!(dp.run_out(PROG_FROM_POD, &syn_frame).0, TC_ACT_REDIRECT);
        let hop = cached_hop(dp, vb).expect("a cached hop");
        assert_eq!(hop.ifindex, vb);
        assert_eq!(hop.generation, 1);
        assert_eq!(&hop.macs[..6], &POD_B_MAC);
        assert_eq!(&hop.macs[6..], &HOST_B_MAC);
        assert!(hop.checked_ns <= coarse_now_ns());

        // A cached hop is used as it is. The cache trusts an entry for NEXTHOP_RECHECK_NS: if
        // the machine stalled that long between planting and the run, plant it again.
        let ack_frame = with_ipv4_checksum(ack(POD_A, 40000, POD_B, 80));
        let out = loop {
            let planted = coarse_now_ns();
            plant_hop(dp, vb, 1, planted);
            let (verdict, out) = dp.run_out(PROG_FROM_POD, &ack_frame);
            if coarse_now_ns() - planted < NEXTHOP_RECHECK_NS {
                assert_eq!(verdict, TC_ACT_REDIRECT);
                break out;
            }
        };
        assert_eq!(&out[..6], &PLANTED_MAC, "the cached MAC, not the FIB's");
        assert_eq!(&out[6..12], &HOST_B_MAC);
        assert!(ipv4_checksum_ok(&out[14..34]));
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 2);
    });
}

/// A cached hop is not used under another config generation (the agent bumps it on every
/// endpoint change), nor once it is older than the recheck interval: the FIB is asked again and
/// the entry refilled. A pod whose endpoint went is not delivered to on its cached hop.
#[test]
fn a_cached_next_hop_is_dropped_on_a_generation_change_or_when_stale() {
    with_host_veth("rd7", true, |dp, vb| {
        let ack_frame = with_ipv4_checksum(ack(POD_A, 40000, POD_B, 80));
        assert_eq!(
            dp.run_out(
                PROG_FROM_POD,
                &with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80))
            )
            .0,
            TC_ACT_REDIRECT
        );

        // Filled under generation 1, the config is at 2.
        plant_hop(dp, vb, 1, coarse_now_ns());
        dp.config(2, CONFIG_REDIRECT_LOCAL);
        let (verdict, out) = dp.run_out(PROG_FROM_POD, &ack_frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[..6], &POD_B_MAC, "the FIB's MAC");
        let hop = cached_hop(dp, vb).expect("refilled");
        assert_eq!(hop.generation, 2);
        assert_eq!(&hop.macs[..6], &POD_B_MAC);

        // Current generation, but confirmed longer ago than the recheck interval.
        plant_hop(dp, vb, 2, coarse_now_ns() - 2 * NEXTHOP_RECHECK_NS);
        let (verdict, out) = dp.run_out(PROG_FROM_POD, &ack_frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[..6], &POD_B_MAC, "the FIB's MAC");
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 3);

        // B's endpoint goes (generation 3): its cached hop is not taken, the packet goes to the
        // stack like any packet to an address that is no local pod.
        plant_hop(dp, vb, 2, coarse_now_ns());
        HashMap::<_, EndpointKey, EndpointInfo>::try_from(dp.ebpf.map_mut(MAP_ENDPOINTS).unwrap())
            .unwrap()
            .remove(&pod_b_key())
            .unwrap();
        dp.config(3, CONFIG_REDIRECT_LOCAL);
        assert_eq!(dp.from_pod(&ack_frame), OK);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 3);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 1);
    });
}

/// The hop's TTL rewrite updates the IPv4 header checksum incrementally: it stays valid whatever
/// the header's other fields make of it (the one's complement carry included).
#[test]
fn the_ttl_rewrite_keeps_the_ipv4_checksum_valid_for_every_header() {
    with_host_veth("rd8", true, |dp, _| {
        assert_eq!(
            dp.run_out(
                PROG_FROM_POD,
                &with_ipv4_checksum(syn(POD_A, 40000, POD_B, 80))
            )
            .0,
            TC_ACT_REDIRECT
        );
        let mut frame = ack(POD_A, 40000, POD_B, 80);
        for id in (0..=u16::MAX).step_by(61) {
            for ttl in [2, 64, 128, 255] {
                frame[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
                frame[14 + 8] = ttl;
                frame = with_ipv4_checksum(frame);
                let (verdict, out) = dp.run_out(PROG_FROM_POD, &frame);
                assert_eq!(verdict, TC_ACT_REDIRECT);
                assert_eq!(out[14 + 8], ttl - 1);
                assert!(
                    ipv4_checksum_ok(&out[14..34]),
                    "checksum after the hop, id {id} ttl {ttl}"
                );
            }
        }
    });
}
