//! Datapath unit tests through `BPF_PROG_TEST_RUN`: the real kernel object, maps seeded from user
//! space with the shared types, packets built in Rust, verdicts, conntrack and counters asserted.
//! The harness is `weir_tests::testrun`; fragments and IPv6 extension headers have their own file
//! (`datapath_fragments.rs`).
//!
//! Root only (loading programs needs CAP_BPF and CAP_NET_ADMIN); CI runs them as root through
//! `cargo xtask test`. Each test loads its own, unpinned object, so tests are independent.

use aya::programs::SchedClassifier;
use weir_common::{
    CONFIG_EMIT_ALLOW_EVENTS, CONFIG_REVOKE_ESTABLISHED, COUNTER_EVENTS_LOST,
    COUNTER_EVENTS_THROTTLED, COUNTER_PATH_STACK, CT_EGRESS_ALLOWED, CT_INGRESS_ALLOWED,
    CT_SEEN_REPLY, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_FIRST_CIDR,
    IDENTITY_WORLD, PROG_FROM_POD, PROG_TO_POD, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, REASON_ESTABLISHED, REASON_LINK_LOCAL, REASON_MALFORMED, REASON_NOT_ISOLATED,
    REASON_POLICY_DENIED, REASON_RELATED, REASON_REVOKED, REASON_RULE, REASON_SPOOFED_SOURCE,
    REASON_UNKNOWN_ENDPOINT, SUBJECT_ISOLATED_EGRESS, SUBJECT_ISOLATED_INGRESS, VERDICT_ALLOW,
    VERDICT_DROP,
};
use weir_tests::{
    packet::{
        self, ICMP_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, TCP_ACK, TCP_SYN, addr, arp_request,
        icmp_error, ip, neighbour_solicitation, ping, pong, tcp_header, udp, udp_datagram,
    },
    testrun::*,
};

#[test]
fn unknown_endpoint_drops() {
    let mut dp = Datapath::new();
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_A, 80)), SHOT);
    assert_eq!(dp.counter(REASON_UNKNOWN_ENDPOINT), 2);
    assert_eq!(dp.ct_len(), 0);
    let events = dp.events();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.verdict == VERDICT_DROP && e.reason == REASON_UNKNOWN_ENDPOINT)
    );
    assert_eq!(events[0].direction, DIR_EGRESS);
    assert_eq!(events[1].direction, DIR_INGRESS);
}

/// An established packet whose side was checked under the current generation, on the veth it
/// arrives on, is allowed on its conntrack entry alone: an endpoint removed without a new
/// generation is not even looked up (the agent bumps the generation after every endpoint change,
/// and then it is).
#[test]
fn an_established_packet_skips_the_endpoint_lookup_until_the_generation_changes() {
    let mut dp = Datapath::with_pods();
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 80)), OK);
    let entry = dp
        .ct(&ct_key(POD_A, 40000, REMOTE, 80, PROTO_TCP))
        .expect("an entry");
    assert_eq!(
        entry.egress_ifindex, TEST_RUN_IFINDEX,
        "the side's veth is recorded"
    );
    assert_eq!(
        entry.ingress_ifindex, 0,
        "the remote side is checked on its node"
    );

    dp.remove_endpoint(POD_A);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 80)), OK);
    assert_eq!(dp.counter(REASON_ESTABLISHED), 1);
    dp.config(2, 0);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 80)), SHOT);
    assert_eq!(dp.counter(REASON_UNKNOWN_ENDPOINT), 1);
}

/// A packet with the tuple of another pod's established connection, arriving on a veth that is
/// not the one its side was checked on, meets the source check: the fast path is no way around
/// it.
#[test]
fn a_packet_of_anothers_established_connection_is_spoofed() {
    let mut dp = Datapath::with_pods();
    // A sits behind veth 7 and its connection's egress was checked there, under this generation.
    dp.endpoint(POD_A, 7, ID_A);
    let key = ct_key(POD_A, 40000, REMOTE, 80, PROTO_TCP);
    dp.ct_insert(
        &key,
        CtValue {
            egress_generation: 1,
            flags: CT_EGRESS_ALLOWED,
            egress_ifindex: 7,
            ..CtValue::default()
        },
    );
    // The test run's packets arrive on loopback, where B and C are.
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 80)), SHOT);
    assert_eq!(dp.counter(REASON_SPOOFED_SOURCE), 1);
    assert_eq!(dp.counter(REASON_ESTABLISHED), 0);
    assert_eq!(
        dp.ct(&key).unwrap().egress_ifindex,
        7,
        "the entry is untouched"
    );
}

/// An entry that records no veth for a side (one an earlier agent's table carried over) has that
/// side checked again, by policy, on its next packet, which records the veth: from then on the
/// side takes the fast path.
#[test]
fn an_entry_without_veths_is_checked_again_once_and_records_them() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(80),
        5,
    );
    let key = ct_key(POD_A, 40000, REMOTE, 80, PROTO_TCP);
    dp.ct_insert(
        &key,
        CtValue {
            egress_generation: 1,
            flags: CT_EGRESS_ALLOWED,
            egress_rule: 5,
            ..CtValue::default()
        },
    );
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 80)), OK);
    let entry = dp.ct(&key).unwrap();
    assert_eq!(entry.egress_ifindex, TEST_RUN_IFINDEX);
    assert_eq!((entry.egress_generation, entry.egress_rule), (1, 5));

    // The side is current on its veth now: the endpoint is no longer looked up.
    dp.remove_endpoint(POD_A);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 80)), OK);
    assert_eq!(dp.counter(REASON_UNKNOWN_ENDPOINT), 0);
}

#[test]
fn spoofed_source_drops() {
    let mut dp = Datapath::new();
    // The test run's skb->ifindex is loopback's: an endpoint there passes...
    dp.endpoint(POD_A, TEST_RUN_IFINDEX, ID_A);
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 80)), OK);
    // ...an endpoint behind another interface is spoofed when its address shows up here.
    dp.endpoint(POD_B, 7, ID_B);
    dp.subject(ID_B, 4, 0);
    assert_eq!(dp.from_pod(&syn(POD_B, 40000, REMOTE, 80)), SHOT);
    assert_eq!(dp.counter(REASON_SPOOFED_SOURCE), 1);
    // The interface check is for sources only: delivering to B is judged by B's ingress.
    assert_eq!(dp.to_pod(&syn(REMOTE, 40001, POD_B, 80)), OK);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, REASON_SPOOFED_SOURCE);
    assert_eq!(events[0].subject, ID_B);
    assert_eq!(events[0].subject_version, 4);
    assert_eq!(
        events[0].peer, IDENTITY_WORLD,
        "REMOTE is not in this test's ipcache"
    );
}

#[test]
fn not_isolated_allows_and_tracks_both_sides() {
    let mut dp = Datapath::with_pods();
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    let key = ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP);
    let ct = dp.ct(&key).expect("entry created by the source's egress");
    assert_eq!(ct.flags, CT_EGRESS_ALLOWED);
    assert_eq!(ct.egress_generation, 1);
    assert_ne!(ct.last_seen_ns, 0);
    // The same packet reaching the destination's veth checks the destination's ingress.
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    let ct = dp.ct(&key).unwrap();
    assert_eq!(ct.flags, CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED);
    assert_eq!(ct.ingress_generation, 1);
    assert_eq!(dp.counter(REASON_NOT_ISOLATED), 2);
    // Replies are established at both hooks.
    assert_eq!(dp.from_pod(&ack(POD_B, 80, POD_A, 40000)), OK);
    assert_eq!(dp.to_pod(&ack(POD_B, 80, POD_A, 40000)), OK);
    assert_eq!(dp.counter(REASON_ESTABLISHED), 2);
    assert_ne!(dp.ct(&key).unwrap().flags & CT_SEEN_REPLY, 0);
    assert_eq!(dp.ct_len(), 1);
    assert!(dp.events().is_empty());
}

#[test]
fn ingress_identity_match() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        11,
    );
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.counter(REASON_RULE), 1);
    let ct = dp.ct(&ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP)).unwrap();
    assert_eq!(ct.flags, CT_INGRESS_ALLOWED);
    assert_eq!(ct.ingress_rule, 11);
    // Another identity, and a remote one, are not allowed.
    assert_eq!(dp.to_pod(&syn(POD_C, 40000, POD_B, 80)), SHOT);
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_B, 80)), SHOT);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 2);
    // Ingress isolation does not touch B's egress.
    assert_eq!(dp.from_pod(&syn(POD_B, 40001, REMOTE, 443)), OK);
}

#[test]
fn egress_identity_match() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(443),
        21,
    );
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 443)), OK);
    let ct = dp
        .ct(&ct_key(POD_A, 40000, REMOTE, 443, PROTO_TCP))
        .unwrap();
    assert_eq!((ct.flags, ct.egress_rule), (CT_EGRESS_ALLOWED, 21));
    assert_eq!(dp.from_pod(&syn(POD_A, 40001, WORLD, 443)), SHOT);
    assert_eq!(dp.from_pod(&syn(POD_A, 40002, POD_B, 443)), SHOT);
    assert_eq!(dp.counter(REASON_RULE), 1);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 2);
    // Egress isolation does not touch A's ingress.
    assert_eq!(dp.to_pod(&syn(WORLD, 50000, POD_A, 22)), OK);
}

#[test]
fn wildcard_peer() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_INGRESS,
        IDENTITY_ANY,
        Some(PROTO_TCP),
        Ports::One(8080),
        31,
    );
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_A, 8080)), OK);
    assert_eq!(dp.to_pod(&syn(WORLD, 40000, POD_A, 8080)), OK);
    assert_eq!(dp.to_pod(&syn(POD_B, 40000, POD_A, 8080)), OK);
    assert_eq!(dp.to_pod(&syn(WORLD, 40001, POD_A, 8081)), SHOT);
    assert_eq!(dp.counter(REASON_RULE), 3);
}

#[test]
fn single_port_vs_other_port() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        41,
    );
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40001, POD_B, 81)), SHOT);
    assert_eq!(dp.to_pod(&syn(POD_A, 40002, POD_B, 79)), SHOT);
    // Same port number, other protocol.
    assert_eq!(dp.to_pod(&udp(ip_of(POD_A), 40003, ip_of(POD_B), 80)), SHOT);
    // The source port plays no part.
    assert_eq!(dp.to_pod(&syn(POD_A, 80, POD_B, 80)), OK);
}

#[test]
fn any_port_of_a_protocol() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(ID_B, 1, DIR_INGRESS, ID_A, Some(PROTO_UDP), Ports::Any, 42);
    assert_eq!(dp.to_pod(&udp(ip_of(POD_A), 1, ip_of(POD_B), 53)), OK);
    assert_eq!(dp.to_pod(&udp(ip_of(POD_A), 1, ip_of(POD_B), 65535)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 1, POD_B, 53)), SHOT);
}

#[test]
fn port_range_via_blocks() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::Range(32000, 32768),
        51,
    );
    for (sport, dport, want) in [
        (1, 31999, SHOT),
        (2, 32000, OK),
        (3, 32001, OK),
        (4, 32511, OK),
        (5, 32512, OK),
        (6, 32767, OK),
        (7, 32768, OK),
        (8, 32769, SHOT),
        (9, 80, SHOT),
    ] {
        assert_eq!(
            dp.to_pod(&syn(POD_A, sport, POD_B, dport)),
            want,
            "port {dport}"
        );
    }
    let ct = dp.ct(&ct_key(POD_A, 4, POD_B, 32511, PROTO_TCP)).unwrap();
    assert_eq!(ct.ingress_rule, 51);
}

#[test]
fn any_protocol_rule_allows_icmp() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(ID_B, 1, DIR_INGRESS, ID_A, None, Ports::Any, 61);
    assert_eq!(dp.to_pod(&ping(ip_of(POD_A), ip_of(POD_B), 7)), OK);
    assert_eq!(dp.to_pod(&udp(ip_of(POD_A), 5, ip_of(POD_B), 9999)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 5, POD_B, 1)), OK);
    assert_eq!(dp.to_pod(&ping(ip_of(POD_C), ip_of(POD_B), 7)), SHOT);
    let ct = dp.ct(&ct_key(POD_A, 7, POD_B, 0, PROTO_ICMP)).unwrap();
    assert_eq!(ct.ingress_rule, 61);
}

#[test]
fn icmp_echo_reply_shares_the_request_entry() {
    let mut dp = Datapath::with_pods();
    // A may ping out; nothing may come in.
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS | SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_ICMP),
        Ports::Any,
        71,
    );
    assert_eq!(dp.from_pod(&ping(ip_of(POD_A), ip_of(REMOTE), 99)), OK);
    assert_eq!(dp.to_pod(&pong(ip_of(REMOTE), ip_of(POD_A), 99)), OK);
    assert_eq!(dp.counter(REASON_ESTABLISHED), 1);
    let ct = dp.ct(&ct_key(POD_A, 99, REMOTE, 0, PROTO_ICMP)).unwrap();
    assert_eq!(ct.flags, CT_EGRESS_ALLOWED | CT_SEEN_REPLY);
    assert_eq!(dp.ct_len(), 1);
    // A reply to an echo id nobody asked for, and a request in, are denied.
    assert_eq!(dp.to_pod(&pong(ip_of(REMOTE), ip_of(POD_A), 100)), SHOT);
    assert_eq!(dp.to_pod(&ping(ip_of(REMOTE), ip_of(POD_A), 99)), SHOT);
}

#[test]
fn ip_block_with_except() {
    let mut dp = Datapath::with_pods();
    // ipBlock 203.0.113.0/24 except 203.0.113.128/25: the /24 gets a CIDR identity whose
    // labels include the allowing block, the /25 one whose labels do not.
    let block = IDENTITY_FIRST_CIDR + 1;
    let except = IDENTITY_FIRST_CIDR + 2;
    dp.cidr("203.0.113.0", 24, block);
    dp.cidr("203.0.113.128", 25, except);
    // A pod address inside the block: ipBlock applies to pod addresses too.
    dp.ipcache("203.0.113.7", 32, ID_REMOTE);
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(ID_A, 1, DIR_EGRESS, block, Some(PROTO_TCP), Ports::Any, 81);
    assert_eq!(dp.from_pod(&syn(POD_A, 1, "203.0.113.5", 443)), OK);
    assert_eq!(dp.from_pod(&syn(POD_A, 2, "203.0.113.127", 443)), OK);
    assert_eq!(dp.from_pod(&syn(POD_A, 3, "203.0.113.7", 443)), OK);
    assert_eq!(dp.from_pod(&syn(POD_A, 4, "203.0.113.128", 443)), SHOT);
    assert_eq!(dp.from_pod(&syn(POD_A, 5, "203.0.113.200", 443)), SHOT);
    assert_eq!(dp.from_pod(&syn(POD_A, 6, "203.0.114.1", 443)), SHOT);
    let ct = dp
        .ct(&ct_key(POD_A, 3, "203.0.113.7", 443, PROTO_TCP))
        .unwrap();
    assert_eq!(ct.egress_rule, 81);
    // The drop event names the except identity as the peer.
    let events = dp.events();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].peer, except);
    assert_eq!(events[2].peer, IDENTITY_WORLD);
}

#[test]
fn both_directions_must_allow() {
    let mut dp = Datapath::with_pods();
    // A's egress allows B; B's ingress allows nothing yet.
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(ID_A, 1, DIR_EGRESS, ID_B, Some(PROTO_TCP), Ports::Any, 91);
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
    let key = ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP);
    assert_eq!(dp.ct(&key).unwrap().flags, CT_EGRESS_ALLOWED);
    // The retransmission is judged again once B's ingress allows A.
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        92,
    );
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    let ct = dp.ct(&key).unwrap();
    assert_eq!(ct.flags, CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED);
    assert_eq!((ct.egress_rule, ct.ingress_rule), (91, 92));
    // The other way round: B's ingress would allow C, C's egress does not allow B.
    dp.allow(ID_B, 1, DIR_INGRESS, ID_C, Some(PROTO_TCP), Ports::Any, 93);
    dp.subject(ID_C, 1, SUBJECT_ISOLATED_EGRESS);
    assert_eq!(dp.from_pod(&syn(POD_C, 40000, POD_B, 80)), SHOT);
    assert!(dp.ct(&ct_key(POD_C, 40000, POD_B, 80, PROTO_TCP)).is_none());
}

#[test]
fn reply_passes_when_the_replying_side_is_isolated() {
    let mut dp = Datapath::with_pods();
    // B accepts A on 80 and may send nothing on its own; A may not receive anything new.
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS | SUBJECT_ISOLATED_EGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        101,
    );
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    // B's reply leaves B (B's egress is isolated) and reaches A (A's ingress is isolated).
    assert_eq!(dp.from_pod(&ack(POD_B, 80, POD_A, 40000)), OK);
    assert_eq!(dp.to_pod(&ack(POD_B, 80, POD_A, 40000)), OK);
    assert_eq!(dp.counter(REASON_ESTABLISHED), 2);
    let ct = dp.ct(&ct_key(POD_A, 40000, POD_B, 80, PROTO_TCP)).unwrap();
    assert_ne!(ct.flags & CT_SEEN_REPLY, 0);
    // A connection B starts itself is still denied.
    assert_eq!(dp.from_pod(&syn(POD_B, 80, POD_A, 40001)), SHOT);
    // Same for a connection from a remote peer that B's reply goes back to.
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(80),
        102,
    );
    assert_eq!(dp.to_pod(&syn(REMOTE, 50000, POD_B, 80)), OK);
    assert_eq!(dp.from_pod(&ack(POD_B, 80, REMOTE, 50000)), OK);
}

/// A's egress to REMOTE:443 is allowed by rule version 1; returns the conntrack key.
fn established_then_rule_removed(dp: &mut Datapath, flags: u32) -> CtKey {
    dp.config(1, flags);
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(443),
        111,
    );
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 443)), OK);
    assert_eq!(dp.to_pod(&ack(REMOTE, 443, POD_A, 40000)), OK);
    // The agent writes version 2 without the rule, flips the subject, removes version 1, and
    // bumps the generation.
    dp.subject(ID_A, 2, SUBJECT_ISOLATED_EGRESS);
    dp.revoke(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(443),
    );
    dp.config(2, flags);
    ct_key(POD_A, 40000, REMOTE, 443, PROTO_TCP)
}

#[test]
fn revocation_drops_established_flow() {
    let mut dp = Datapath::with_pods();
    let key = established_then_rule_removed(&mut dp, CONFIG_REVOKE_ESTABLISHED);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 443)), SHOT);
    assert_eq!(dp.counter(REASON_REVOKED), 1);
    assert!(dp.ct(&key).is_none(), "revoked entry deleted");
    let events = dp.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, REASON_REVOKED);
    assert_eq!(events[0].subject_version, 2);
    // A new attempt is plainly denied.
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 443)), SHOT);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
}

#[test]
fn revocation_applies_to_replies() {
    let mut dp = Datapath::with_pods();
    let key = established_then_rule_removed(&mut dp, CONFIG_REVOKE_ESTABLISHED);
    // The first packet after the change is a reply: A's egress side is re-checked at A's to_pod.
    assert_eq!(dp.to_pod(&ack(REMOTE, 443, POD_A, 40000)), SHOT);
    assert_eq!(dp.counter(REASON_REVOKED), 1);
    assert!(dp.ct(&key).is_none());
    let events = dp.events();
    assert_eq!(
        events[0].direction, DIR_EGRESS,
        "the side whose policy revoked it"
    );
}

#[test]
fn without_revocation_established_flow_continues() {
    let mut dp = Datapath::with_pods();
    let key = established_then_rule_removed(&mut dp, 0);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 443)), OK);
    assert_eq!(dp.to_pod(&ack(REMOTE, 443, POD_A, 40000)), OK);
    assert_eq!(dp.counter(REASON_REVOKED), 0);
    let ct = dp.ct(&key).unwrap();
    // Kept under the old generation, so enabling revocation later still cuts it.
    assert_eq!(ct.egress_generation, 1);
    dp.config(2, CONFIG_REVOKE_ESTABLISHED);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 443)), SHOT);
    assert_eq!(dp.counter(REASON_REVOKED), 1);
    // New connections were denied all along.
    assert_eq!(dp.from_pod(&syn(POD_A, 40001, REMOTE, 443)), SHOT);
}

#[test]
fn generation_bump_rechecks_and_keeps_allowed_flows() {
    let mut dp = Datapath::with_pods();
    dp.config(1, CONFIG_REVOKE_ESTABLISHED);
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::Any,
        121,
    );
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, REMOTE, 443)), OK);
    // Version 2 allows it through another rule.
    dp.allow(
        ID_A,
        2,
        DIR_EGRESS,
        IDENTITY_ANY,
        Some(PROTO_TCP),
        Ports::One(443),
        122,
    );
    dp.subject(ID_A, 2, SUBJECT_ISOLATED_EGRESS);
    dp.config(2, CONFIG_REVOKE_ESTABLISHED);
    assert_eq!(dp.from_pod(&ack(POD_A, 40000, REMOTE, 443)), OK);
    let ct = dp
        .ct(&ct_key(POD_A, 40000, REMOTE, 443, PROTO_TCP))
        .unwrap();
    assert_eq!((ct.egress_generation, ct.egress_rule), (2, 122));
    assert_eq!(dp.counter(REASON_ESTABLISHED), 1);
}

#[test]
fn ipv6_variant() {
    let mut dp = Datapath::new();
    let (a, b, remote) = ("fd00:10:1::1", "fd00:10:1::2", "fd00:10:2::9");
    dp.endpoint(a, TEST_RUN_IFINDEX, ID_A);
    dp.endpoint(b, TEST_RUN_IFINDEX, ID_B);
    dp.ipcache(a, 128, ID_A);
    dp.ipcache(b, 128, ID_B);
    dp.ipcache("fd00:10:2::", 64, ID_REMOTE);
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        131,
    );
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_ICMPV6),
        Ports::Any,
        132,
    );
    assert_eq!(dp.from_pod(&syn(a, 40000, b, 80)), OK);
    assert_eq!(dp.to_pod(&syn(a, 40000, b, 80)), OK);
    assert_eq!(dp.from_pod(&ack(b, 80, a, 40000)), OK);
    assert_eq!(dp.to_pod(&ack(b, 80, a, 40000)), OK);
    assert_eq!(dp.to_pod(&syn(a, 40001, b, 81)), SHOT);
    // The ipcache prefix covers the remote pod: ping allowed, TCP not.
    assert_eq!(dp.to_pod(&ping(ip_of(remote), ip_of(b), 5)), OK);
    assert_eq!(dp.from_pod(&pong(ip_of(b), ip_of(remote), 5)), OK);
    assert_eq!(dp.to_pod(&syn(remote, 1, b, 80)), SHOT);
    let ct = dp.ct(&ct_key(a, 40000, b, 80, PROTO_TCP)).unwrap();
    assert_eq!(
        ct.flags,
        CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED | CT_SEEN_REPLY
    );
    assert!(
        dp.ct(&ct_key(remote, 5, b, 0, PROTO_ICMPV6)).is_some(),
        "echo keyed by id"
    );
    let events = dp.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].daddr, addr(ip_of(b)));
    assert_eq!(events[1].peer, ID_REMOTE);
}

#[test]
fn icmp_error_related_to_a_tracked_flow_passes() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS | SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        IDENTITY_ANY,
        Some(PROTO_UDP),
        Ports::One(53),
        141,
    );
    let query = udp_datagram(40000, 53, b"query");
    assert_eq!(
        dp.from_pod(&packet::frame(
            ip_of(POD_A),
            ip_of(WORLD),
            PROTO_UDP,
            &query
        )),
        OK
    );
    // A router says the destination is unreachable, quoting A's datagram.
    let quoted = ip(ip_of(POD_A), ip_of(WORLD), PROTO_UDP, &query);
    let router = ip_of("198.51.100.1");
    assert_eq!(
        dp.to_pod(&icmp_error(
            router,
            ip_of(POD_A),
            ICMP_DEST_UNREACH,
            3,
            &quoted
        )),
        OK
    );
    assert_eq!(dp.counter(REASON_RELATED), 1);
    // An error about a flow nobody tracks is an ordinary packet: A's ingress denies it.
    let other = ip(
        ip_of(POD_A),
        ip_of(WORLD),
        PROTO_UDP,
        &udp_datagram(40001, 53, b"x"),
    );
    assert_eq!(
        dp.to_pod(&icmp_error(
            router,
            ip_of(POD_A),
            ICMP_DEST_UNREACH,
            3,
            &other
        )),
        SHOT
    );
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
    // An error A itself sends about a packet of a tracked flow's reply direction (quoting only
    // 8 bytes of its TCP header) is related through the reversed key.
    let tcp_out = ip(
        ip_of(POD_A),
        ip_of(WORLD),
        PROTO_TCP,
        &tcp_header(40002, 53, TCP_SYN),
    );
    dp.allow(
        ID_A,
        1,
        DIR_EGRESS,
        IDENTITY_ANY,
        Some(PROTO_TCP),
        Ports::One(53),
        142,
    );
    assert_eq!(
        dp.from_pod(&packet::ethernet(packet::ETH_P_IP, &tcp_out)),
        OK
    );
    let reply_quoted = ip(
        ip_of(WORLD),
        ip_of(POD_A),
        PROTO_TCP,
        &tcp_header(53, 40002, TCP_ACK)[..8],
    );
    assert_eq!(
        dp.from_pod(&icmp_error(
            ip_of(POD_A),
            ip_of(WORLD),
            ICMP_DEST_UNREACH,
            3,
            &reply_quoted
        )),
        OK
    );
    assert_eq!(dp.counter(REASON_RELATED), 2);
}

#[test]
fn icmp_error_must_go_back_to_the_quoted_sender() {
    let mut dp = Datapath::with_pods();
    // A talks to B on 80; B accepts only A.
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        181,
    );
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    // C forges an error to B quoting A's segment: not related, and B does not accept C.
    let quoted = ip(
        ip_of(POD_A),
        ip_of(POD_B),
        PROTO_TCP,
        &tcp_header(40000, 80, TCP_SYN),
    );
    let forged = icmp_error(ip_of(POD_C), ip_of(POD_B), ICMP_DEST_UNREACH, 3, &quoted);
    assert_eq!(dp.from_pod(&forged), OK, "C's egress is not isolated");
    assert_eq!(dp.to_pod(&forged), SHOT);
    assert_eq!(dp.counter(REASON_RELATED), 0);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
    // The same quote sent to A, the quoted sender, is related.
    let genuine = icmp_error(ip_of(POD_C), ip_of(POD_A), ICMP_DEST_UNREACH, 3, &quoted);
    assert_eq!(dp.to_pod(&genuine), OK);
    assert_eq!(dp.counter(REASON_RELATED), 1);
}

#[test]
fn icmpv6_error_related_to_a_tracked_flow_passes() {
    let mut dp = Datapath::new();
    let (a, far) = ("fd00:10:1::1", "2001:db8::80");
    dp.endpoint(a, TEST_RUN_IFINDEX, ID_A);
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.from_pod(&syn(a, 40000, far, 443)), OK);
    let quoted = ip(
        ip_of(a),
        ip_of(far),
        PROTO_TCP,
        &tcp_header(40000, 443, TCP_SYN),
    );
    let router = ip_of("2001:db8::1");
    assert_eq!(
        dp.to_pod(&icmp_error(
            router,
            ip_of(a),
            ICMPV6_PACKET_TOO_BIG,
            0,
            &quoted
        )),
        OK
    );
    assert_eq!(dp.counter(REASON_RELATED), 1);
    // Unrelated: denied by A's isolated ingress.
    let unrelated = ip(
        ip_of(a),
        ip_of(far),
        PROTO_TCP,
        &tcp_header(40001, 443, TCP_SYN),
    );
    assert_eq!(
        dp.to_pod(&icmp_error(
            router,
            ip_of(a),
            ICMPV6_PACKET_TOO_BIG,
            0,
            &unrelated
        )),
        SHOT
    );
}

#[test]
fn malformed_and_truncated_packets_drop() {
    // BPF_PROG_TEST_RUN itself refuses (EINVAL) frames whose IPv4 or IPv6 header is cut short,
    // so truncation is exercised past the fixed IP header.
    let mut dp = Datapath::with_pods();
    let full = syn(POD_A, 40000, POD_B, 80);
    let start = coarse_now_ns();
    // TCP header cut short.
    assert_eq!(dp.from_pod(&full[..14 + 20 + 10]), SHOT);
    // IHL below 5.
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(dp.from_pod(&bad_ihl), SHOT);
    // IHL (60 bytes) beyond the packet (40 bytes of IP).
    let mut long_ihl = full.clone();
    long_ihl[14] = 0x4f;
    assert_eq!(dp.from_pod(&long_ihl[..14 + 40]), SHOT);
    // Version field disagreeing with the ethertype.
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    assert_eq!(dp.from_pod(&bad_version), SHOT);
    // UDP, IPv6 TCP and ICMP headers cut short.
    let datagram = udp(ip_of(POD_A), 1, ip_of(POD_B), 2);
    assert_eq!(dp.from_pod(&datagram[..14 + 20 + 6]), SHOT);
    let v6 = syn("fd00::1", 1, "fd00::2", 2);
    assert_eq!(dp.to_pod(&v6[..14 + 40 + 19]), SHOT);
    let echo = ping(ip_of(POD_A), ip_of(POD_B), 1);
    assert_eq!(dp.from_pod(&echo[..14 + 20 + 4]), SHOT);
    let intervals = report_intervals_since(start);
    assert_eq!(dp.counter(REASON_MALFORMED), 7);
    assert_eq!(dp.ct_len(), 0);
    // A malformed packet is reported without its tuple: one kind of drop per direction.
    let events = dp.events();
    assert!(
        events
            .iter()
            .all(|e| e.reason == REASON_MALFORMED && e.verdict == VERDICT_DROP)
    );
    for direction in [DIR_EGRESS, DIR_INGRESS] {
        let of_direction = events.iter().filter(|e| e.direction == direction).count();
        assert!(
            (1..=intervals).contains(&of_direction),
            "{of_direction} reports in {intervals} interval(s)"
        );
    }
    assert_eq!(
        dp.counter_slot(COUNTER_EVENTS_THROTTLED),
        7 - events.len() as u64
    );
    // The whole packet passes.
    assert_eq!(dp.from_pod(&full), OK);
}

#[test]
fn drop_produces_a_verdict_event() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 7, SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_B, 8443)), SHOT);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    let e = events[0];
    assert_ne!(e.timestamp_ns, 0);
    assert_eq!(e.saddr, addr(ip_of(REMOTE)));
    assert_eq!(e.daddr, addr(ip_of(POD_B)));
    assert_eq!(e.sport, 40000u16.to_be());
    assert_eq!(e.dport, 8443u16.to_be());
    assert_eq!(e.proto, PROTO_TCP);
    assert_eq!(e.direction, DIR_INGRESS);
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!(e.reason, REASON_POLICY_DENIED);
    assert_eq!(e.ifindex, TEST_RUN_IFINDEX);
    assert_eq!(e.subject, ID_B);
    assert_eq!(e.subject_version, 7);
    assert_eq!(e.peer, ID_REMOTE);
    assert_eq!(e.rule, 0);
    assert_eq!(e._pad, 0);
}

#[test]
fn allow_events_only_when_enabled() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 3, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        3,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_TCP),
        Ports::One(80),
        151,
    );
    assert_eq!(dp.to_pod(&syn(POD_A, 1, POD_B, 80)), OK);
    assert!(dp.events().is_empty());
    dp.config(1, CONFIG_EMIT_ALLOW_EVENTS);
    assert_eq!(dp.to_pod(&syn(POD_A, 2, POD_B, 80)), OK);
    // Established packets do not report.
    assert_eq!(dp.to_pod(&ack(POD_A, 2, POD_B, 80)), OK);
    let events = dp.events();
    assert_eq!(events.len(), 1);
    let e = events[0];
    assert_eq!(
        (e.verdict, e.reason, e.rule),
        (VERDICT_ALLOW, REASON_RULE, 151)
    );
    assert_eq!((e.subject, e.subject_version, e.peer), (ID_B, 3, ID_A));
}

#[test]
fn non_ip_and_neighbour_discovery_pass_uncounted_by_policy() {
    let mut dp = Datapath::new();
    // No endpoints at all: ARP and ND still pass.
    assert_eq!(
        dp.from_pod(&arp_request([10, 1, 0, 1], [169, 254, 1, 1])),
        OK
    );
    assert_eq!(dp.to_pod(&arp_request([169, 254, 1, 1], [10, 1, 0, 1])), OK);
    let target: [u8; 16] = "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(
        dp.from_pod(&neighbour_solicitation(ip_of("fe80::2"), target)),
        OK
    );
    // An MLD message without the hop-by-hop header it always has in practice.
    let bare_mld = ip(
        ip_of("fe80::2"),
        ip_of("ff02::16"),
        PROTO_ICMPV6,
        &packet::icmp_message(143, 0, &[0; 4]),
    );
    assert_eq!(
        dp.from_pod(&packet::ethernet(packet::ETH_P_IPV6, &bare_mld)),
        OK
    );
    // MLDv2 listener reports as interfaces send them when they come up (behind a hop-by-hop
    // header with the router alert), from a link-local address or, before it has one, from ::.
    let unspecified = [0u8; 16];
    let link_local = "fe80::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
    for src in [link_local, unspecified] {
        assert_eq!(dp.from_pod(&packet::mld_report(src)), OK);
        assert_eq!(dp.to_pod(&packet::mld_report(src)), OK);
    }
    assert_eq!(dp.counter(REASON_LINK_LOCAL), 8);
    assert!(dp.events().is_empty());
    // A hop-by-hop header with hop limit 64 is not MLD: it meets the policy (no endpoint here).
    let mut routed = packet::mld_report(link_local);
    routed[packet::ETH_HLEN + 7] = 64;
    assert_eq!(dp.from_pod(&routed), SHOT);
    // Other ICMPv6 from an unknown address is not link-local.
    assert_eq!(
        dp.from_pod(&ping(ip_of("fe80::2"), ip_of("fe80::1"), 1)),
        SHOT
    );
}

#[test]
fn pod_to_its_own_address_is_allowed() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS | SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.from_pod(&syn(POD_A, 1, POD_A, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 1, POD_A, 80)), OK);
    assert_eq!(dp.from_pod(&syn(POD_A, 1, POD_B, 80)), SHOT);
}

#[test]
fn every_verdict_is_counted() {
    let dp = Datapath::with_pods();
    let packets = [
        syn(POD_A, 1, POD_B, 80),
        ack(POD_A, 1, POD_B, 80),
        syn(WORLD, 1, POD_B, 80),
    ];
    for p in &packets {
        dp.from_pod(p);
        dp.to_pod(p);
    }
    // Each hook counts each packet once under its reason; the slots above the reasons count
    // other things (which path an allowed packet took, lost events).
    let counters = dp.counters();
    let total: u64 = counters[..COUNTER_PATH_STACK as usize].iter().sum();
    assert_eq!(total, 2 * packets.len() as u64);
    // The two packets from_pod allowed went to the stack (redirection is off).
    assert_eq!(counters[COUNTER_PATH_STACK as usize], 2);
}

/// Allow events are not throttled (each is a new connection): a ring nobody reads overflows, the
/// connections are still allowed and tracked, and every event that did not fit is counted as lost.
#[test]
fn full_event_ring_still_allows_and_counts_the_loss() {
    let mut dp = Datapath::with_pods();
    dp.config(1, CONFIG_EMIT_ALLOW_EVENTS);
    // EVENTS_BYTES (4 MiB) holds about 52,000 72-byte events with their headers: 60,000 new
    // connections without a reader overflow it.
    let connections: u16 = 60_000;
    for sport in 1..=connections {
        assert_eq!(dp.to_pod(&syn(WORLD, sport, POD_B, 80)), OK);
    }
    assert_eq!(dp.counter(REASON_NOT_ISOLATED), u64::from(connections));
    assert_eq!(dp.ct_len(), usize::from(connections));
    let lost = dp.counter_slot(COUNTER_EVENTS_LOST);
    let delivered = dp.events().len() as u64;
    assert!(lost > 0, "the ring overflowed");
    assert_eq!(delivered + lost, u64::from(connections));
}

/// A flood of denied packets at the tc hooks is counted packet by packet, but each kind of drop
/// (source, destination address and port, reason, direction) is reported once per interval, not
/// once per packet: the first drop of a kind is reported, with everything an unthrottled report
/// says, and every drop not reported is counted as throttled.
#[test]
fn a_flood_of_denied_packets_at_tc_is_counted_exactly_and_reported_once_per_kind() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 7, SUBJECT_ISOLATED_INGRESS);
    dp.subject(ID_C, 3, SUBJECT_ISOLATED_EGRESS);
    const FLOOD: u16 = 1_000;
    let start = coarse_now_ns();
    // New connections (new source ports) of two kinds, interleaved: denied by B's ingress (at
    // its `weir_to_pod`), and by C's egress (at its `weir_from_pod`).
    for n in 0..FLOOD {
        assert_eq!(dp.to_pod(&syn(REMOTE, 20_000 + n, POD_B, 81)), SHOT);
        assert_eq!(dp.from_pod(&syn(POD_C, 20_000 + n, REMOTE, 80)), SHOT);
    }
    // A third kind: another port.
    assert_eq!(dp.to_pod(&syn(REMOTE, 40_000, POD_B, 82)), SHOT);
    let intervals = report_intervals_since(start);

    assert_eq!(
        dp.counter(REASON_POLICY_DENIED),
        2 * u64::from(FLOOD) + 1,
        "every drop counted"
    );
    assert_eq!(dp.ct_len(), 0);
    let events = dp.events();
    let of_kind = |direction: u8, port: u16| {
        events
            .iter()
            .filter(|e| e.direction == direction && u16::from_be(e.dport) == port)
            .collect::<Vec<_>>()
    };
    let ingress_81 = of_kind(DIR_INGRESS, 81);
    let egress_80 = of_kind(DIR_EGRESS, 80);
    let ingress_82 = of_kind(DIR_INGRESS, 82);
    for kind in [&ingress_81, &egress_80] {
        assert!(
            (1..=intervals).contains(&kind.len()),
            "{} reports of one kind in {intervals} interval(s)",
            kind.len()
        );
    }
    assert_eq!(ingress_82.len(), 1, "a new kind is reported at once");
    assert_eq!(
        events.len(),
        ingress_81.len() + egress_80.len() + 1,
        "no other reports"
    );
    // Each report explains its kind as an unthrottled one would.
    let first = ingress_81[0];
    assert_eq!(
        (
            first.verdict,
            first.reason,
            first.subject,
            first.subject_version
        ),
        (VERDICT_DROP, REASON_POLICY_DENIED, ID_B, 7)
    );
    assert_eq!(first.peer, ID_REMOTE);
    assert_eq!(
        u16::from_be(first.sport),
        20_000,
        "the first drop of the kind"
    );
    let first = egress_80[0];
    assert_eq!(
        (first.subject, first.subject_version, first.peer),
        (ID_C, 3, ID_REMOTE)
    );
    assert_eq!(u16::from_be(first.sport), 20_000);
    assert_eq!(
        dp.counter_slot(COUNTER_EVENTS_THROTTLED),
        2 * u64::from(FLOOD) + 1 - events.len() as u64,
        "every drop not reported is counted as throttled"
    );
}

/// The same tuple dropped by the other side's check is another kind of drop: its explanation
/// (the other endpoint's policy) is reported at once, not throttled behind the first.
#[test]
fn a_drop_by_the_other_side_is_reported_at_once() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_A, 1, SUBJECT_ISOLATED_EGRESS);
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    // A's egress denies.
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
    // Now A's egress allows B, and B's ingress denies the retransmission.
    dp.allow(ID_A, 1, DIR_EGRESS, ID_B, Some(PROTO_TCP), Ports::Any, 91);
    assert_eq!(dp.from_pod(&syn(POD_A, 40000, POD_B, 80)), OK);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
    let events = dp.events();
    let directions: Vec<_> = events.iter().map(|e| (e.direction, e.subject)).collect();
    assert_eq!(
        directions,
        [(DIR_EGRESS, ID_A), (DIR_INGRESS, ID_B)],
        "both drops reported, each with its own side"
    );
    assert_eq!(dp.counter_slot(COUNTER_EVENTS_THROTTLED), 0);
}

#[test]
fn sctp_ports() {
    let mut dp = Datapath::with_pods();
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_A,
        Some(PROTO_SCTP),
        Ports::One(9000),
        171,
    );
    let common = |dport: u16| {
        let mut h = Vec::new();
        h.extend_from_slice(&5000u16.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&[0; 8]); // verification tag, checksum
        packet::frame(ip_of(POD_A), ip_of(POD_B), PROTO_SCTP, &h)
    };
    assert_eq!(dp.to_pod(&common(9000)), OK);
    assert_eq!(dp.to_pod(&common(9001)), SHOT);
    assert_eq!(dp.to_pod(&common(9000)[..14 + 20 + 8]), SHOT);
    assert_eq!(dp.counter(REASON_MALFORMED), 1);
}

#[test]
fn programs_pass_the_verifier_within_budget() {
    let dp = Datapath::new();
    for name in [PROG_FROM_POD, PROG_TO_POD] {
        let prog: &SchedClassifier = dp.ebpf.program(name).unwrap().try_into().unwrap();
        let info = prog.info().unwrap();
        let insns = info.size_translated().unwrap_or(0) / 8;
        let verified = info.verified_instruction_count().unwrap_or(0);
        println!("{name}: {insns} instructions, {verified} verified");
        assert!(insns > 0);
        // The kernel's limit is 1,000,000 verified instructions; stay far below it.
        assert!(
            verified < 200_000,
            "{name}: {verified} verified instructions"
        );
    }
}
