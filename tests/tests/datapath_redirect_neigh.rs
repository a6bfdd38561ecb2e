//! Delivery towards another node's pod with `bpf_redirect_neigh`, through `BPF_PROG_TEST_RUN`:
//! once `weir_from_pod` allowed a packet's egress and the ipcache knows its destination as a pod
//! of this cluster on another node, the packet goes to the egress device of the node's route,
//! towards its next hop, with the TTL (hop limit) decremented; the destination's ingress is left
//! to its node (only the egress side is in conntrack). Everything the shortcut cannot take goes
//! to the stack, and the path counters say which way each allowed packet went.
//!
//! The FIB lookup runs in the namespace of the thread that runs the test: each test builds one
//! with an uplink, the node route to the other node's pod CIDR via that node, and a permanent
//! neighbour entry for it, as the agent's native routing leaves them. Root only.

use weir_common::{
    CONFIG_REDIRECT_LOCAL, CONFIG_REDIRECT_REMOTE, COUNTER_PATH_REDIRECT_NEIGH,
    COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, CT_EGRESS_ALLOWED, CT_INGRESS_ALLOWED,
    IDENTITY_CLUSTER_SHIFT, IDENTITY_REMOTE_NODE, PROTO_TCP, REASON_POLICY_DENIED,
    SUBJECT_ISOLATED_EGRESS,
};
use weir_tests::packet::{ipv4_checksum_ok, with_ipv4_checksum};
use weir_tests::{
    netns::{Netns, run, spawn_in},
    packet::{ETH_P_IP, TCP_SYN, ethernet, ipv4_fragment, tcp, tcp_header},
    testrun::*,
};

/// `bpf_redirect_neigh`'s verdict.
const TC_ACT_REDIRECT: u32 = 7;
/// The other node (the route's next hop) on the uplink, and this node's own address there.
const OTHER_NODE: &str = "192.168.61.2";
const THIS_NODE: &str = "192.168.61.1";
const OTHER_NODE6: &str = "fd00:61::2";
/// A pod of the other node over IPv6 (`REMOTE` is its IPv4 one, in 10.2.0.0/24).
const REMOTE6: &str = "fd00:2::9";
/// A pod the ipcache knows in a pod CIDR this node has no route to.
const UNROUTED: &str = "10.3.0.9";
/// A pod in a pod CIDR whose next hop has no neighbour entry yet.
const NO_NEIGHBOUR: &str = "10.4.0.9";
/// A pod of a mesh peer cluster (cluster 1), inside the routed CIDR.
const MESH_PEER_POD: &str = "10.2.0.77";

/// Runs `f` in a namespace with the uplink `uplink` (this node at THIS_NODE), routes to the other
/// node's pod CIDRs 10.2.0.0/24 and fd00:2::/64 via OTHER_NODE(6) with permanent neighbours,
/// 10.4.0.0/24 via a next hop without one, and the datapath with pods A, B, C local, the remote
/// pods in the ipcache, and `flags`.
fn with_uplink<T: Send + 'static>(
    tag: &str,
    flags: u32,
    f: impl FnOnce(&mut Datapath, u32) -> T + Send + 'static,
) -> T {
    let ns = Netns::new(tag);
    ns.ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "upp",
    ]);
    ns.ip(&["link", "set", "uplink", "up"]);
    ns.ip(&["link", "set", "upp", "up"]);
    ns.ip(&["addr", "add", &format!("{THIS_NODE}/24"), "dev", "uplink"]);
    ns.ip(&["addr", "add", "fd00:61::1/64", "dev", "uplink", "nodad"]);
    ns.ip(&[
        "route",
        "add",
        "10.2.0.0/24",
        "via",
        OTHER_NODE,
        "dev",
        "uplink",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.4.0.0/24",
        "via",
        "192.168.61.3",
        "dev",
        "uplink",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:2::/64",
        "via",
        OTHER_NODE6,
        "dev",
        "uplink",
    ]);
    for addr in [OTHER_NODE, OTHER_NODE6] {
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            "02:00:00:00:00:0c",
            "dev",
            "uplink",
            "nud",
            "permanent",
        ]);
    }
    for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", sysctl]);
    }
    let result = spawn_in(ns.path(), move || {
        let up = nix::net::if_::if_nametoindex("uplink").expect("uplink");
        let mut dp = Datapath::with_pods();
        dp.endpoint("fd00:1::1", TEST_RUN_IFINDEX, ID_A);
        dp.ipcache(REMOTE6, 128, ID_REMOTE);
        dp.ipcache(UNROUTED, 32, ID_REMOTE);
        dp.ipcache(NO_NEIGHBOUR, 32, ID_REMOTE);
        dp.ipcache(MESH_PEER_POD, 32, (1 << IDENTITY_CLUSTER_SHIFT) | ID_REMOTE);
        dp.ipcache(OTHER_NODE, 32, IDENTITY_REMOTE_NODE);
        dp.config(1, flags);
        f(&mut dp, up)
    })
    .join();
    drop(ns);
    result.expect("the test panicked in the namespace")
}

#[test]
fn another_nodes_pod_is_handed_to_the_next_hop_with_only_the_egress_side_checked() {
    with_uplink(
        "rn1",
        CONFIG_REDIRECT_LOCAL | CONFIG_REDIRECT_REMOTE,
        |dp, _| {
            let frame = with_ipv4_checksum(syn(POD_A, 40000, REMOTE, 80));
            let (verdict, out) = dp.run_out(weir_common::PROG_FROM_POD, &frame);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out[14 + 8], frame[14 + 8] - 1, "TTL decremented");
            assert!(ipv4_checksum_ok(&out[14..34]), "header checksum updated");
            assert_eq!(
                &out[..12],
                &frame[..12],
                "MACs are the neighbour layer's to write"
            );
            assert_eq!(&out[34..], &frame[34..], "payload untouched");
            let ct = dp
                .ct(&ct_key(POD_A, 40000, REMOTE, 80, PROTO_TCP))
                .expect("a conntrack entry");
            assert_eq!(
                ct.flags & (CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED),
                CT_EGRESS_ALLOWED,
                "the destination's ingress is its own node's to check"
            );
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 1);
            assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 0);

            // IPv6: hop limit decremented.
            let frame6 = tcp(ip_of("fd00:1::1"), 40000, ip_of(REMOTE6), 80, TCP_SYN);
            let (verdict, out) = dp.run_out(weir_common::PROG_FROM_POD, &frame6);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out[14 + 7], frame6[14 + 7] - 1, "hop limit decremented");
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 2);

            // A local destination still takes bpf_redirect_peer's path or the stack, never this one.
            assert_eq!(dp.from_pod(&syn(POD_A, 40001, POD_B, 80)), OK);
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 2);
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_PEER), 0);
            assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 1);
        },
    );
}

#[test]
fn an_egress_drop_happens_before_the_shortcut() {
    with_uplink(
        "rn2",
        CONFIG_REDIRECT_LOCAL | CONFIG_REDIRECT_REMOTE,
        |dp, _| {
            dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
            assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 80)), SHOT);
            assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 0);
            assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 0);
        },
    );
}

#[test]
fn what_the_neighbour_shortcut_cannot_take_goes_to_the_stack() {
    with_uplink(
        "rn3",
        CONFIG_REDIRECT_LOCAL | CONFIG_REDIRECT_REMOTE,
        |dp, _| {
            let first_fragment = ethernet(
                ETH_P_IP,
                &ipv4_fragment(
                    [10, 1, 0, 1],
                    [10, 2, 0, 9],
                    PROTO_TCP,
                    0x4243,
                    0,
                    true,
                    &tcp_header(40001, 80, TCP_SYN),
                ),
            );
            let mut last_hop = syn(POD_A, 40002, REMOTE, 80);
            last_hop[14 + 8] = 1;
            let frames = [
                // Unknown to the ipcache: the world, an address of the routed CIDR nobody published.
                syn(POD_A, 40000, WORLD, 80),
                syn(POD_A, 40000, "10.2.0.200", 80),
                // The node itself, and another node (not a pod).
                syn(POD_A, 40000, THIS_NODE, 22),
                syn(POD_A, 40000, OTHER_NODE, 22),
                // A pod of a mesh peer: its traffic takes the gateways' routes.
                syn(POD_A, 40000, MESH_PEER_POD, 80),
                // A known pod the node has no route to, or no neighbour for the next hop yet (the
                // stack resolves it).
                syn(POD_A, 40000, UNROUTED, 80),
                syn(POD_A, 40000, NO_NEIGHBOUR, 80),
                // A fragment: its later fragments would follow another path.
                first_fragment,
                // The TTL runs out: the stack answers with an ICMP error.
                last_hop,
            ];
            for frame in &frames {
                assert_eq!(dp.from_pod(frame), OK);
            }
            assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), frames.len() as u64);
            assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 0);
        },
    );
}

#[test]
fn without_the_flag_another_nodes_pod_goes_through_the_stack() {
    with_uplink("rn4", CONFIG_REDIRECT_LOCAL, |dp, _| {
        assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 80)), OK);
        assert_eq!(dp.counter_slot(COUNTER_PATH_STACK), 1);
        assert_eq!(dp.counter_slot(COUNTER_PATH_REDIRECT_NEIGH), 0);
    });
}
