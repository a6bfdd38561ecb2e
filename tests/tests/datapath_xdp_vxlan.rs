//! `weir_xdp` on a node with the VXLAN overlay, through `BPF_PROG_TEST_RUN`: a pod of another node
//! arrives inside a tunnel packet addressed to this node, and the filter decides on the pod packet
//! inside as on a native one: a new connection the destination pod's ingress denies (or from a
//! source on the deny list) is dropped and reported with the inner tuple; allowed connections and
//! replies of connections local pods opened pass; a tunnel packet it cannot look into (truncated,
//! without the VNI flag, another port, no overlay configured, a fragment inside) passes to the
//! stack, which decapsulates or drops it, and `weir_to_pod` enforces on what comes out.
//!
//! Root only (loading programs needs CAP_BPF and CAP_NET_ADMIN).

use aya::maps::Array;
use weir_common::{
    COUNTER_XDP_PASSED, DIR_INGRESS, MAP_UPLINK, PROTO_TCP, PROTO_UDP, REASON_PREFILTER_DENIED,
    REASON_XDP_POLICY_DENIED, SUBJECT_ISOLATED_INGRESS, UplinkConfig, VERDICT_DROP,
};
use weir_tests::{
    packet::{ETH_P_IP, addr, ethernet, frame, ipv4_fragment, ping, pong, udp_datagram},
    testrun::*,
};

/// `BPF_PROG_TEST_RUN` runs XDP programs on the loopback device.
const TEST_RUN_XDP_IFINDEX: u32 = 1;
/// The overlay's port (the agent's `overlay::VXLAN_PORT`) and VNI.
const VXLAN_PORT: u16 = 4789;
const VNI: u32 = 87;
/// The two nodes' underlay addresses: the tunnel's outer source and destination.
const REMOTE_NODE: &str = "192.168.78.2";
const THIS_NODE: &str = "192.168.78.1";

/// Pods A and B local, B isolated for ingress and admitting only the remote pod on TCP 80
/// (rule 7); the uplink carries the VXLAN overlay on `VXLAN_PORT`.
fn overlay_node() -> Datapath {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(80),
        7,
    );
    vxlan_port(&mut dp, VXLAN_PORT);
    dp
}

/// Writes the uplink settings as the agent does with `--overlay vxlan` (0: no overlay).
fn vxlan_port(dp: &mut Datapath, port: u16) {
    let mut m: Array<_, UplinkConfig> =
        Array::try_from(dp.ebpf.map_mut(MAP_UPLINK).expect("uplink settings map")).unwrap();
    m.set(
        0,
        UplinkConfig {
            vxlan_port: port.to_be(),
            _pad: [0; 6],
        },
        0,
    )
    .unwrap();
}

/// The VXLAN header: the VNI flag (when `vni_flag`), the VNI.
fn vxlan_header(vni_flag: bool) -> Vec<u8> {
    let vni = VNI.to_be_bytes();
    vec![
        if vni_flag { 0x08 } else { 0 },
        0,
        0,
        0,
        vni[1],
        vni[2],
        vni[3],
        0,
    ]
}

/// `inner` (an Ethernet frame) in a VXLAN packet from the remote node to this one, to `port`.
fn tunnelled_to(port: u16, vni_flag: bool, inner: &[u8]) -> Vec<u8> {
    let mut payload = vxlan_header(vni_flag);
    payload.extend_from_slice(inner);
    frame(
        ip_of(REMOTE_NODE),
        ip_of(THIS_NODE),
        PROTO_UDP,
        &udp_datagram(50123, port, &payload),
    )
}

fn tunnelled(inner: &[u8]) -> Vec<u8> {
    tunnelled_to(VXLAN_PORT, true, inner)
}

#[test]
fn a_tunnelled_new_connection_the_policy_denies_is_dropped_and_explained() {
    let mut dp = overlay_node();
    let inner = syn(REMOTE, 40000, POD_B, 81);
    assert_eq!(dp.xdp(&tunnelled(&inner)), XDP_DROP);
    // The enforcer agrees on the decapsulated packet.
    assert_eq!(dp.to_pod(&inner), SHOT);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 1);
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), 0);
    let events: Vec<_> = dp
        .events()
        .into_iter()
        .filter(|e| e.reason == REASON_XDP_POLICY_DENIED)
        .collect();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    // Explained with the pod packet inside, not the tunnel.
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!(e.direction, DIR_INGRESS);
    assert_eq!(e.ifindex, TEST_RUN_XDP_IFINDEX);
    assert_eq!(e.subject, ID_B);
    assert_eq!(e.subject_version, 1);
    assert_eq!(e.peer, ID_REMOTE);
    assert_eq!(e.saddr, addr(ip_of(REMOTE)));
    assert_eq!(e.daddr, addr(ip_of(POD_B)));
    assert_eq!(u16::from_be(e.sport), 40000);
    assert_eq!(u16::from_be(e.dport), 81);
    assert_eq!(e.proto, PROTO_TCP);
}

#[test]
fn a_tunnelled_allowed_connection_passes_unreported() {
    let mut dp = overlay_node();
    assert_eq!(dp.xdp(&tunnelled(&syn(REMOTE, 40000, POD_B, 80))), XDP_PASS);
    // Pod A is not isolated.
    assert_eq!(dp.xdp(&tunnelled(&syn(REMOTE, 40000, POD_A, 81))), XDP_PASS);
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), 2);
    assert!(dp.events().is_empty());
    assert_eq!(dp.ct_len(), 0, "the filter creates no conntrack entry");
}

#[test]
fn tunnelled_replies_of_connections_local_pods_opened_pass() {
    let mut dp = overlay_node();
    // B's ingress denies the world, which is also on the deny list.
    dp.prefilter(WORLD, 32, 1);
    assert_eq!(dp.from_pod(&syn(POD_B, 40001, REMOTE, 443)), OK);
    assert_eq!(dp.from_pod(&syn(POD_B, 40002, WORLD, 443)), OK);
    assert_eq!(dp.from_pod(&ping(ip_of(POD_B), ip_of(REMOTE), 77)), OK);
    for reply in [
        ack(REMOTE, 443, POD_B, 40001),
        ack(WORLD, 443, POD_B, 40002),
        pong(ip_of(REMOTE), ip_of(POD_B), 77),
    ] {
        assert_eq!(dp.xdp(&tunnelled(&reply)), XDP_PASS);
    }
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 0);
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), 0);
    // A new connection from the same peers is dropped.
    assert_eq!(
        dp.xdp(&tunnelled(&syn(REMOTE, 443, POD_B, 40009))),
        XDP_DROP
    );
    assert_eq!(dp.xdp(&tunnelled(&syn(WORLD, 443, POD_B, 40010))), XDP_DROP);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 1);
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), 1);
}

#[test]
fn the_deny_list_applies_to_the_tunnelled_source() {
    let mut dp = overlay_node();
    dp.prefilter("192.0.2.0", 24, 4);
    // To pod A, which is not isolated: only the deny list drops it.
    assert_eq!(dp.xdp(&tunnelled(&syn(WORLD, 40000, POD_A, 80))), XDP_DROP);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, REASON_PREFILTER_DENIED);
    assert_eq!(events[0].rule, 4);
    assert_eq!(events[0].subject, ID_A);
    assert_eq!(events[0].saddr, addr(ip_of(WORLD)));
}

#[test]
fn tunnel_packets_the_filter_cannot_look_into_pass() {
    let mut dp = overlay_node();
    let denied = syn(REMOTE, 40000, POD_B, 81);
    let whole = tunnelled(&denied);
    // Outer headers: Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
    let inner_at = 14 + 20 + 8 + 8;
    let later_fragment = ethernet(
        ETH_P_IP,
        &ipv4_fragment(
            [10, 2, 0, 9],
            [10, 1, 0, 2],
            PROTO_TCP,
            0x4242,
            10,
            false,
            &[0; 16],
        ),
    );
    let frames = [
        // Cut inside the VXLAN header, and inside the inner IPv4 header.
        whole[..inner_at - 4].to_vec(),
        whole[..inner_at + 14 + 10].to_vec(),
        // No VNI flag: not VXLAN as RFC 7348 has it.
        tunnelled_to(VXLAN_PORT, false, &denied),
        // Another UDP port: not the overlay's.
        tunnelled_to(VXLAN_PORT + 1, true, &denied),
        // A later fragment inside: no ports to decide on.
        tunnelled(&later_fragment),
    ];
    for f in &frames {
        assert_eq!(dp.xdp(f), XDP_PASS);
    }
    // Without an overlay, the same tunnel packet is only a UDP packet for the node.
    vxlan_port(&mut dp, 0);
    assert_eq!(dp.xdp(&whole), XDP_PASS);
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), frames.len() as u64 + 1);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 0);
    assert!(dp.events().is_empty());
    // And the enforcer still drops the pod packet once the stack decapsulated it.
    assert_eq!(dp.to_pod(&denied), SHOT);
}
