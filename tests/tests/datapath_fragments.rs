//! Fragments and IPv6 extension headers through `BPF_PROG_TEST_RUN`: every extension header kind
//! in front of TCP and UDP against a port rule, chains too long or of unknown layout (dropped),
//! and fragmented datagrams of both families in order and out of order: the first fragment
//! decides, later ones follow it, a later one without its first is dropped and counted.
//!
//! Root only; each test loads its own unpinned object (harness: `weir_tests::testrun`).

use std::net::IpAddr;

use weir_common::{
    COUNTER_EVENTS_THROTTLED, DIR_EGRESS, DIR_INGRESS, ECHO_NONE, FragKey, FragValue, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, REASON_ESTABLISHED, REASON_FRAGMENT_WITHOUT_FIRST,
    REASON_IPV6_EXTENSIONS, REASON_LINK_LOCAL, REASON_MALFORMED, REASON_NOT_ISOLATED,
    REASON_POLICY_DENIED, REASON_RULE, REASON_UNKNOWN_ENDPOINT, SUBJECT_ISOLATED_EGRESS,
    SUBJECT_ISOLATED_INGRESS, VERDICT_ALLOW, VERDICT_DROP,
};
use weir_tests::{
    packet::{
        ETH_P_IPV6, Ext, Fragmented, TCP_SYN, addr, ethernet, icmp_message, ipv6_chain, mld_report,
        tcp_header, udp_datagram,
    },
    testrun::*,
};

const UDP_PORT: u16 = 5353;
const TCP_PORT: u16 = 80;
const RULE_UDP: u32 = 501;
const RULE_TCP: u32 = 502;
const RULE_ICMP: u32 = 503;
/// Pods a and b of each family (IPv4: the harness's POD_A and POD_B).
const V4: (&str, &str) = (POD_A, POD_B);
const V6: (&str, &str) = ("fd00:10:1::1", "fd00:10:1::2");

/// Pods a and b of `family` on the test-run interface; b is isolated for ingress and admits
/// UDP 5353 and TCP 80 from a.
fn b_admits_a(family: (&str, &str)) -> Datapath {
    let mut dp = Datapath::with_pods();
    let (a, b) = family;
    if a.contains(':') {
        dp.endpoint(a, TEST_RUN_IFINDEX, ID_A);
        dp.endpoint(b, TEST_RUN_IFINDEX, ID_B);
        dp.ipcache(a, 128, ID_A);
        dp.ipcache(b, 128, ID_B);
    }
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_UDP),
        Ports::One(UDP_PORT),
        RULE_UDP,
    );
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(TCP_PORT),
        RULE_TCP,
    );
    dp
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>()
        .expect("IPv6 address")
        .octets()
}

/// An IPv6 frame from a to b with `exts` in front of `transport` of protocol `proto`.
fn with_extensions(exts: &[Ext], proto: u8, transport: &[u8]) -> Vec<u8> {
    ethernet(
        ETH_P_IPV6,
        &ipv6_chain(v6(V6.0), v6(V6.1), exts, proto, transport),
    )
}

/// The transport header (and a little payload) of `proto` from `sport` to `dport`.
fn transport(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    if proto == PROTO_TCP {
        tcp_header(sport, dport, TCP_SYN)
    } else {
        udp_datagram(sport, dport, b"weir")
    }
}

/// The fragment record key of a datagram from `src` to `dst` at the hook of `direction`.
fn frag_key(src: &str, dst: &str, id: u32, proto: u8, direction: u8) -> FragKey {
    let src = ip_of(src);
    // IPv4 ids are 16 bits, in the first two bytes of the key's id (network order).
    let id_bytes = if src.is_ipv4() {
        let [hi, lo] = (id as u16).to_be_bytes();
        [hi, lo, 0, 0]
    } else {
        id.to_be_bytes()
    };
    FragKey {
        saddr: addr(src),
        daddr: addr(ip_of(dst)),
        id: u32::from_ne_bytes(id_bytes),
        proto,
        direction,
        _pad: [0; 2],
    }
}

/// A UDP datagram of 40 bytes of payload from a:`sport` to b:`dport`, in three fragments of 16
/// bytes (the first holds the UDP header and 8 bytes of payload).
fn udp_fragments(family: (&str, &str), id: u32, sport: u16, dport: u16) -> Vec<Vec<u8>> {
    let (a, b) = family;
    let frames = Fragmented::new(ip_of(a), ip_of(b), PROTO_UDP, id)
        .frames(&udp_datagram(sport, dport, &[0x5a; 40]), 16);
    assert_eq!(frames.len(), 3);
    frames
}

#[test]
fn each_extension_header_in_front_of_tcp_and_udp_meets_the_port_rule() {
    let mut dp = b_admits_a(V6);
    let atomic_fragment = Ext::Fragment {
        offset: 0,
        more: false,
        id: 99,
    };
    let kinds = [
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestOpts,
        atomic_fragment,
        Ext::Ah,
    ];
    let mut sport = 40000;
    let mut denied = 0;
    let start = coarse_now_ns();
    for ext in kinds {
        for (proto, port) in [(PROTO_TCP, TCP_PORT), (PROTO_UDP, UDP_PORT)] {
            sport += 1;
            let allowed = with_extensions(&[ext], proto, &transport(proto, sport, port));
            assert_eq!(
                dp.to_pod(&allowed),
                OK,
                "{ext:?} in front of {proto}:{port}"
            );
            assert!(
                dp.ct(&ct_key(V6.0, sport, V6.1, port, proto)).is_some(),
                "{ext:?}: tracked with the real protocol and ports"
            );
            let other = with_extensions(&[ext], proto, &transport(proto, sport, port + 1));
            assert_eq!(
                dp.to_pod(&other),
                SHOT,
                "{ext:?} in front of {proto}:{}",
                port + 1
            );
            denied += 1;
        }
    }
    let intervals = report_intervals_since(start);
    assert_eq!(dp.counter(REASON_RULE), 10);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), denied);
    // Two kinds of drop (TCP and UDP to the other port), each reported with the real protocol
    // and port, the first time and then at most once per interval.
    let events = dp.events();
    for (proto, port) in [(PROTO_TCP, TCP_PORT + 1), (PROTO_UDP, UDP_PORT + 1)] {
        let of_kind = events
            .iter()
            .filter(|e| e.proto == proto && u16::from_be(e.dport) == port)
            .count();
        assert!((1..=intervals).contains(&of_kind), "{proto}:{port}");
    }
    assert!(
        events
            .iter()
            .all(|e| e.reason == REASON_POLICY_DENIED && u16::from_be(e.sport) > 40000),
        "{events:?}"
    );
    assert_eq!(
        dp.counter_slot(COUNTER_EVENTS_THROTTLED),
        denied - events.len() as u64
    );
    // An atomic fragment (offset 0, no more) is a whole datagram: nothing recorded.
    assert_eq!(dp.fragments_len(), 0);
}

#[test]
fn a_chain_of_six_headers_is_walked_and_a_seventh_fails_closed() {
    let mut dp = b_admits_a(V6);
    let six = [
        Ext::HopByHop,
        Ext::DestOpts,
        Ext::Routing,
        Ext::Fragment {
            offset: 0,
            more: false,
            id: 5,
        },
        Ext::Ah,
        Ext::DestOpts,
    ];
    let datagram = udp_datagram(41000, UDP_PORT, b"weir");
    assert_eq!(dp.to_pod(&with_extensions(&six, PROTO_UDP, &datagram)), OK);
    assert_eq!(dp.counter(REASON_RULE), 1);
    let mut seven = six.to_vec();
    seven.push(Ext::DestOpts);
    assert_eq!(
        dp.to_pod(&with_extensions(&seven, PROTO_UDP, &datagram)),
        SHOT
    );
    assert_eq!(dp.counter(REASON_IPV6_EXTENSIONS), 1);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    let e = events[0];
    assert_eq!(
        (e.verdict, e.reason, e.direction),
        (VERDICT_DROP, REASON_IPV6_EXTENSIONS, DIR_INGRESS)
    );
    // The drop names both ends and the endpoint, so flows.jsonl can explain it.
    assert_eq!(e.saddr, addr(ip_of(V6.0)));
    assert_eq!(e.daddr, addr(ip_of(V6.1)));
    assert_eq!((e.subject, e.peer), (ID_B, ID_A));
}

#[test]
fn extension_headers_that_are_not_walked_fail_closed() {
    let dp = b_admits_a(V6);
    let datagram = udp_datagram(42000, UDP_PORT, b"weir");
    let atomic = |id| Ext::Fragment {
        offset: 0,
        more: false,
        id,
    };
    let refused: [&[Ext]; 6] = [
        // Mobility, HIP, shim6, experimental: layouts the walker does not know.
        &[Ext::Other(135)],
        &[Ext::Other(139)],
        &[Ext::DestOpts, Ext::Other(140)],
        &[Ext::Other(253)],
        // Hop-by-hop anywhere but first.
        &[Ext::Routing, Ext::HopByHop],
        // Two Fragment headers.
        &[atomic(1), atomic(2)],
    ];
    for chain in refused {
        assert_eq!(
            dp.to_pod(&with_extensions(chain, PROTO_UDP, &datagram)),
            SHOT,
            "{chain:?}"
        );
    }
    assert_eq!(dp.counter(REASON_IPV6_EXTENSIONS), refused.len() as u64);
    // A header cut short by the end of the packet is malformed.
    let cut = with_extensions(&[Ext::DestOpts], PROTO_UDP, &datagram);
    assert_eq!(dp.to_pod(&cut[..14 + 40 + 10]), SHOT);
    assert_eq!(dp.counter(REASON_MALFORMED), 1);
    // ESP ends the chain like a transport protocol without ports: a port rule does not match it.
    assert_eq!(dp.to_pod(&with_extensions(&[], 50, &[0; 16])), SHOT);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
    assert_eq!(dp.ct_len(), 0);
}

#[test]
fn link_local_icmpv6_behind_extension_headers_is_only_mld_behind_hop_by_hop() {
    let mut dp = Datapath::new();
    let link_local = v6("fe80::2");
    // MLD as the kernel sends it (hop-by-hop with router alert, hop limit 1) still passes.
    assert_eq!(dp.from_pod(&mld_report(link_local)), OK);
    assert_eq!(dp.to_pod(&mld_report([0; 16])), OK);
    assert_eq!(dp.counter(REASON_LINK_LOCAL), 2);
    // Behind any other chain, ND and MLD messages are ordinary ICMPv6 and meet the policy (here:
    // no endpoint for the address).
    let behind = |exts: &[Ext], ty: u8| {
        let mut packet = ipv6_chain(
            link_local,
            v6("ff02::16"),
            exts,
            PROTO_ICMPV6,
            &icmp_message(ty, 0, &[0; 20]),
        );
        packet[7] = 1; // hop limit
        dp.from_pod(&ethernet(ETH_P_IPV6, &packet))
    };
    assert_eq!(behind(&[Ext::HopByHop, Ext::DestOpts], 143), SHOT);
    assert_eq!(behind(&[Ext::Routing], 143), SHOT);
    assert_eq!(behind(&[Ext::Routing], 135), SHOT);
    assert_eq!(behind(&[Ext::HopByHop], 135), SHOT);
    assert_eq!(dp.counter(REASON_UNKNOWN_ENDPOINT), 4);
    assert_eq!(dp.counter(REASON_LINK_LOCAL), 2);
    let events = dp.events();
    assert!(events.iter().all(|e| e.proto == PROTO_ICMPV6));
}

#[test]
fn fragments_of_an_allowed_datagram_pass_both_families() {
    for family in [V4, V6] {
        let (a, b) = family;
        let mut dp = b_admits_a(family);
        let frames = udp_fragments(family, 0x4242, 40000, UDP_PORT);
        for (n, frame) in frames.iter().enumerate() {
            assert_eq!(dp.from_pod(frame), OK, "{a}: fragment {n} leaves a");
            assert_eq!(dp.to_pod(frame), OK, "{a}: fragment {n} reaches b");
        }
        // The first fragment was checked against the port rule, the later ones are part of the
        // flow it started.
        assert_eq!(dp.counter(REASON_RULE), 1, "{a}");
        assert_eq!(dp.counter(REASON_NOT_ISOLATED), 1, "{a}");
        assert_eq!(dp.counter(REASON_ESTABLISHED), 4, "{a}");
        assert_eq!(dp.ct_len(), 1, "{a}: one flow, with the ports");
        assert!(
            dp.ct(&ct_key(a, 40000, b, UDP_PORT, PROTO_UDP)).is_some(),
            "{a}"
        );
        let first = FragValue {
            sport: 40000u16.to_be(),
            dport: UDP_PORT.to_be(),
            proto: PROTO_UDP,
            echo: ECHO_NONE,
            verdict: VERDICT_ALLOW,
            reason: REASON_RULE,
        };
        assert_eq!(
            dp.fragment(&frag_key(a, b, 0x4242, PROTO_UDP, DIR_INGRESS)),
            Some(first),
            "{a}"
        );
        assert_eq!(
            dp.fragment(&frag_key(a, b, 0x4242, PROTO_UDP, DIR_EGRESS))
                .map(|v| (v.verdict, v.reason)),
            Some((VERDICT_ALLOW, REASON_NOT_ISOLATED)),
            "{a}"
        );
        assert!(dp.events().is_empty(), "{a}");
    }
}

#[test]
fn fragments_of_a_denied_datagram_are_dropped_both_families() {
    for family in [V4, V6] {
        let (a, b) = family;
        let mut dp = b_admits_a(family);
        let start = coarse_now_ns();
        for frame in udp_fragments(family, 0x5151, 40000, UDP_PORT + 1) {
            assert_eq!(dp.to_pod(&frame), SHOT, "{a}");
        }
        let intervals = report_intervals_since(start);
        assert_eq!(dp.counter(REASON_POLICY_DENIED), 3, "{a}");
        assert_eq!(dp.ct_len(), 0, "{a}");
        assert_eq!(
            dp.fragment(&frag_key(a, b, 0x5151, PROTO_UDP, DIR_INGRESS))
                .map(|v| (v.verdict, v.reason)),
            Some((VERDICT_DROP, REASON_POLICY_DENIED)),
            "{a}"
        );
        // The fragments' drops are one kind: the first is reported (then at most one a report
        // interval), with the datagram's ports and the endpoint; the rest are counted.
        let events = dp.events();
        assert!((1..=intervals).contains(&events.len()), "{a}");
        assert_eq!(
            dp.counter_slot(COUNTER_EVENTS_THROTTLED),
            3 - events.len() as u64,
            "{a}"
        );
        for e in events {
            assert_eq!(e.reason, REASON_POLICY_DENIED);
            assert_eq!((e.proto, u16::from_be(e.dport)), (PROTO_UDP, UDP_PORT + 1));
            assert_eq!((e.subject, e.peer), (ID_B, ID_A));
        }
    }
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_and_counted_both_families() {
    for family in [V4, V6] {
        let (a, b) = family;
        let mut dp = b_admits_a(family);
        let frames = udp_fragments(family, 0x6161, 40000, UDP_PORT);
        // Out of order: the last fragment first.
        assert_eq!(dp.to_pod(&frames[2]), SHOT, "{a}");
        assert_eq!(dp.counter(REASON_FRAGMENT_WITHOUT_FIRST), 1, "{a}");
        let events = dp.events();
        assert_eq!(events.len(), 1, "{a}");
        let e = events[0];
        assert_eq!(
            (e.verdict, e.reason, e.direction),
            (VERDICT_DROP, REASON_FRAGMENT_WITHOUT_FIRST, DIR_INGRESS),
            "{a}"
        );
        assert_eq!((e.proto, e.sport, e.dport), (PROTO_UDP, 0, 0), "{a}");
        assert_eq!((e.subject, e.peer), (ID_B, ID_A), "{a}");
        // Once the first fragment is there, the later ones pass.
        assert_eq!(dp.to_pod(&frames[0]), OK, "{a}");
        assert_eq!(dp.to_pod(&frames[1]), OK, "{a}");
        assert_eq!(dp.to_pod(&frames[2]), OK, "{a}");
        // Another datagram (other id, other source, other protocol) has no first fragment.
        let other_id = udp_fragments(family, 0x6162, 40000, UDP_PORT);
        assert_eq!(dp.to_pod(&other_id[1]), SHOT, "{a}");
        let c = if a.contains(':') {
            "fd00:10:1::3"
        } else {
            POD_C
        };
        let other_source = Fragmented::new(ip_of(c), ip_of(b), PROTO_UDP, 0x6161)
            .frames(&udp_datagram(40000, UDP_PORT, &[0; 40]), 16);
        assert_eq!(dp.to_pod(&other_source[1]), SHOT, "{a}");
        let other_proto = Fragmented::new(ip_of(a), ip_of(b), PROTO_TCP, 0x6161)
            .frames(&tcp_header(40000, TCP_PORT, TCP_SYN), 8);
        assert_eq!(dp.to_pod(&other_proto[1]), SHOT, "{a}");
        assert_eq!(dp.counter(REASON_FRAGMENT_WITHOUT_FIRST), 4, "{a}");
        // The egress hook has its own records: it saw none of these first fragments.
        assert_eq!(dp.from_pod(&frames[1]), SHOT, "{a}");
        assert_eq!(dp.counter(REASON_FRAGMENT_WITHOUT_FIRST), 5, "{a}");
    }
}

#[test]
fn each_hook_keeps_its_own_verdict_for_a_datagram() {
    for family in [V4, V6] {
        let (a, b) = family;
        // a may send UDP 5353 to b; b admits nothing from a.
        let mut dp = b_admits_a(family);
        dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
        dp.revoke(
            ID_B,
            1,
            DIR_INGRESS,
            ID_A,
            Some(PROTO_UDP),
            Ports::One(UDP_PORT),
        );
        dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
        dp.allow(
            ID_A,
            1,
            DIR_EGRESS,
            ID_B,
            Some(PROTO_UDP),
            Ports::One(UDP_PORT),
            601,
        );
        // Both hooks of one node see every fragment, in turn.
        for (n, frame) in udp_fragments(family, 0x7171, 40000, UDP_PORT)
            .iter()
            .enumerate()
        {
            assert_eq!(dp.from_pod(frame), OK, "{a}: fragment {n} leaves a");
            assert_eq!(dp.to_pod(frame), SHOT, "{a}: fragment {n} is refused by b");
        }
        assert_eq!(dp.fragments_len(), 2, "{a}: one record per hook");
        assert_eq!(
            dp.fragment(&frag_key(a, b, 0x7171, PROTO_UDP, DIR_EGRESS))
                .map(|v| v.verdict),
            Some(VERDICT_ALLOW)
        );
        assert_eq!(
            dp.fragment(&frag_key(a, b, 0x7171, PROTO_UDP, DIR_INGRESS))
                .map(|v| v.verdict),
            Some(VERDICT_DROP)
        );
        assert_eq!(dp.counter(REASON_POLICY_DENIED), 3, "{a}");
    }
}

#[test]
fn ipv6_fragments_with_headers_before_and_after_the_fragment_header() {
    let (a, b) = V6;
    let dp = b_admits_a(V6);
    // Hop-by-hop and routing travel in every fragment; destination options only in the first,
    // so the Fragment header announces destination options, not UDP.
    let datagram = Fragmented {
        unfragmentable: &[Ext::HopByHop, Ext::Routing],
        fragmentable: &[Ext::DestOpts],
        ..Fragmented::new(ip_of(a), ip_of(b), PROTO_UDP, 0x0102_0304)
    };
    let frames = datagram.frames(&udp_datagram(43000, UDP_PORT, &[1; 64]), 32);
    assert_eq!(frames.len(), 3);
    for frame in &frames {
        assert_eq!(dp.to_pod(frame), OK);
    }
    let record = dp
        .fragment(&frag_key(a, b, 0x0102_0304, 60, DIR_INGRESS))
        .expect("recorded under the Fragment header's next header");
    assert_eq!(
        (record.proto, u16::from_be(record.dport)),
        (PROTO_UDP, UDP_PORT)
    );
    assert!(dp.ct(&ct_key(a, 43000, b, UDP_PORT, PROTO_UDP)).is_some());
    // The same shape to a port b does not admit: every fragment dropped.
    let denied = Fragmented {
        id: 0x0102_0305,
        ..datagram
    }
    .frames(&udp_datagram(43000, UDP_PORT + 1, &[1; 64]), 32);
    for frame in &denied {
        assert_eq!(dp.to_pod(frame), SHOT);
    }
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 3);
}

#[test]
fn fragmented_echo_request_and_reply_pass_both_families() {
    for family in [V4, V6] {
        let (a, b) = family;
        let v4 = !a.contains(':');
        let (proto, request, reply) = if v4 {
            (PROTO_ICMP, 8, 0)
        } else {
            (PROTO_ICMPV6, 128, 129)
        };
        let mut dp = b_admits_a(family);
        dp.allow(
            ID_B,
            1,
            DIR_INGRESS,
            ID_A,
            Some(proto),
            Ports::Any,
            RULE_ICMP,
        );
        // a is isolated for ingress with no rule: the reply passes only as the reply.
        dp.subject(ID_A, 1, SUBJECT_ISOLATED_INGRESS);
        let echo = |ty: u8| {
            let mut rest = Vec::new();
            rest.extend_from_slice(&77u16.to_be_bytes()); // id
            rest.extend_from_slice(&1u16.to_be_bytes()); // sequence
            rest.extend_from_slice(&[0xee; 56]);
            icmp_message(ty, 0, &rest)
        };
        let (ip_a, ip_b): (IpAddr, IpAddr) = (ip_of(a), ip_of(b));
        for frame in Fragmented::new(ip_a, ip_b, proto, 0x1111).frames(&echo(request), 24) {
            assert_eq!(dp.to_pod(&frame), OK, "{a}: request fragment");
        }
        for frame in Fragmented::new(ip_b, ip_a, proto, 0x2222).frames(&echo(reply), 24) {
            assert_eq!(dp.to_pod(&frame), OK, "{a}: reply fragment");
        }
        assert_eq!(dp.counter(REASON_POLICY_DENIED), 0, "{a}");
        assert_eq!(dp.ct_len(), 1, "{a}: request and reply share the entry");
        // The fragments of a reply nobody asked for are dropped at a.
        if v4 {
            let unasked =
                Fragmented::new(ip_of(POD_C), ip_a, proto, 0x3333).frames(&echo(reply), 24);
            assert_eq!(dp.to_pod(&unasked[0]), SHOT, "{a}");
            assert_eq!(dp.to_pod(&unasked[1]), SHOT, "{a}");
            assert_eq!(dp.counter(REASON_POLICY_DENIED), 2, "{a}");
        }
    }
}
