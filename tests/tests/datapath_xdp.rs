//! `weir_xdp`, the early filter on the node's uplink, through `BPF_PROG_TEST_RUN`: it drops a new
//! connection that the destination pod's ingress policy denies and sources on the operator's deny
//! list, reports both like any drop, and passes everything else (allowed connections, replies of
//! connections local pods opened, traffic not for a local pod, non-IP, fragments). Whatever it
//! drops, `weir_to_pod` would drop too: it is a filter in front of the enforcer. A flood of drops
//! is counted packet by packet and reported once per kind and interval, within a per-CPU budget.
//!
//! Root only (loading programs needs CAP_BPF and CAP_NET_ADMIN).

use weir_common::{
    COUNTER_EVENTS_THROTTLED, COUNTER_XDP_PASSED, DIR_INGRESS, DROP_REPORTS_PER_CPU,
    IDENTITY_WORLD, PROTO_TCP, PROTO_UDP, REASON_ESTABLISHED, REASON_PREFILTER_DENIED,
    REASON_XDP_POLICY_DENIED, SUBJECT_ISOLATED_INGRESS, VERDICT_DROP,
};
use weir_tests::{
    packet::{ETH_P_IP, addr, arp_request, ethernet, ipv4_fragment, ping, pong, tcp_header, udp},
    testrun::*,
};

/// `BPF_PROG_TEST_RUN` runs XDP programs on the loopback device.
const TEST_RUN_XDP_IFINDEX: u32 = 1;

/// Pods A and B local, B isolated for ingress and admitting only the remote pod on TCP 80
/// (rule 7).
fn b_admits_remote_on_80() -> Datapath {
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
    dp
}

#[test]
fn an_allowed_new_connection_passes_unreported() {
    let mut dp = b_admits_remote_on_80();
    assert_eq!(dp.xdp(&syn(REMOTE, 40000, POD_B, 80)), XDP_PASS);
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), 1);
    assert!(dp.events().is_empty());
    // The filter creates no conntrack entry: the tc program that enforces does, as before.
    assert_eq!(dp.ct_len(), 0);
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_B, 80)), OK);
    assert_eq!(dp.ct_len(), 1);
}

#[test]
fn a_new_connection_the_policy_denies_is_dropped_and_explained() {
    let mut dp = b_admits_remote_on_80();
    for frame in [
        syn(REMOTE, 40000, POD_B, 81),
        udp(ip_of(REMOTE), 5353, ip_of(POD_B), 80),
        syn(WORLD, 40000, POD_B, 80),
    ] {
        assert_eq!(dp.xdp(&frame), XDP_DROP);
        // The enforcer agrees.
        assert_eq!(dp.to_pod(&frame), SHOT);
    }
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 3);
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), 0);
    let events: Vec<_> = dp
        .events()
        .into_iter()
        .filter(|e| e.reason == REASON_XDP_POLICY_DENIED)
        .collect();
    assert_eq!(events.len(), 3);
    let first = &events[0];
    assert_eq!(first.verdict, VERDICT_DROP);
    assert_eq!(first.direction, DIR_INGRESS);
    assert_eq!(first.ifindex, TEST_RUN_XDP_IFINDEX);
    assert_eq!(first.subject, ID_B);
    assert_eq!(first.subject_version, 1);
    assert_eq!(first.peer, ID_REMOTE);
    assert_eq!(first.saddr, addr(ip_of(REMOTE)));
    assert_eq!(u16::from_be(first.dport), 81);
    assert_eq!(first.proto, PROTO_TCP);
    assert_eq!(events[1].proto, PROTO_UDP);
    assert_eq!(events[2].peer, IDENTITY_WORLD);
}

#[test]
fn the_deny_list_drops_every_new_packet_from_a_listed_source() {
    let mut dp = Datapath::with_pods();
    dp.prefilter("192.0.2.0", 24, 3);
    // Pod A is not isolated, and the node's own address is no endpoint: the list still applies.
    for frame in [
        syn(WORLD, 40000, POD_A, 80),
        syn("192.0.2.77", 40000, "10.9.9.9", 22),
        ping(ip_of(WORLD), ip_of(POD_A), 9),
    ] {
        assert_eq!(dp.xdp(&frame), XDP_DROP);
    }
    // Outside the listed prefix.
    assert_eq!(dp.xdp(&syn("192.0.3.1", 40000, POD_A, 80)), XDP_PASS);
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), 3);
    let events = dp.events();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e.reason == REASON_PREFILTER_DENIED && e.rule == 3)
    );
    assert_eq!(events[0].subject, ID_A);
    assert_eq!(events[1].subject, 0, "not for a local pod");
}

#[test]
fn replies_of_connections_local_pods_opened_always_pass() {
    let mut dp = b_admits_remote_on_80();
    // B's ingress denies the world, which is also on the deny list.
    dp.prefilter(WORLD, 32, 1);
    // B opens connections out (its egress is not isolated): conntrack has them.
    assert_eq!(dp.from_pod(&syn(POD_B, 40001, REMOTE, 443)), OK);
    assert_eq!(dp.from_pod(&syn(POD_B, 40002, WORLD, 443)), OK);
    assert_eq!(dp.from_pod(&ping(ip_of(POD_B), ip_of(REMOTE), 77)), OK);
    let replies = [
        ack(REMOTE, 443, POD_B, 40001),
        ack(WORLD, 443, POD_B, 40002),
        pong(ip_of(REMOTE), ip_of(POD_B), 77),
    ];
    for reply in &replies {
        assert_eq!(dp.xdp(reply), XDP_PASS);
    }
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), 3);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 0);
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), 0);
    // And the enforcer lets them in as established.
    for reply in &replies {
        assert_eq!(dp.to_pod(reply), OK);
    }
    assert_eq!(dp.counter(REASON_ESTABLISHED), 3);
    // A new connection from the same peers is still dropped.
    assert_eq!(dp.xdp(&syn(REMOTE, 443, POD_B, 40009)), XDP_DROP);
    assert_eq!(dp.xdp(&syn(WORLD, 443, POD_B, 40010)), XDP_DROP);
}

#[test]
fn established_connections_are_left_to_the_enforcer() {
    let mut dp = b_admits_remote_on_80();
    assert_eq!(dp.to_pod(&syn(REMOTE, 40000, POD_B, 80)), OK);
    // The rule goes: revocation is the tc program's (it knows the generation), not XDP's.
    dp.revoke(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(80),
    );
    assert_eq!(dp.xdp(&ack(REMOTE, 40000, POD_B, 80)), XDP_PASS);
    assert_eq!(dp.xdp(&syn(REMOTE, 40001, POD_B, 80)), XDP_DROP);
}

/// A denied kind is remembered under the config generation it was decided under, and its next
/// packets are dropped and explained from there, without the policy lookups. The agent bumps the
/// generation after every map write: a policy or identity that changed is evaluated afresh.
#[test]
fn a_remembered_denial_holds_until_the_generation_changes() {
    let mut dp = b_admits_remote_on_80();
    assert_eq!(dp.xdp_denials_generation(), 0, "nothing remembered yet");
    let denied = syn(REMOTE, 40000, POD_B, 81);
    assert_eq!(dp.xdp(&denied), XDP_DROP);
    assert_eq!(dp.xdp_denials_generation(), 1);
    let remembered = dp.xdp_denials();
    assert_eq!(remembered.len(), 1);
    let (kind, denial) = remembered[0];
    assert_eq!(kind.saddr, addr(ip_of(REMOTE)));
    assert_eq!(kind.daddr, addr(ip_of(POD_B)));
    assert_eq!(u16::from_be(kind.dport), 81);
    assert_eq!(
        (kind.proto, kind.reason, kind.direction),
        (PROTO_TCP, REASON_XDP_POLICY_DENIED, DIR_INGRESS)
    );
    assert_eq!(
        (
            denial.generation,
            denial.subject,
            denial.subject_version,
            denial.peer
        ),
        (1, ID_B, 1, ID_REMOTE)
    );

    // A rule written without a new generation is not seen: the remembered denial decides. (The
    // agent never writes that way; this shows the lookups were not made.)
    admit_remote_on_81(&mut dp);
    assert_eq!(dp.xdp(&syn(REMOTE, 40001, POD_B, 81)), XDP_DROP);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 2);
    assert_eq!(dp.counter_slot(COUNTER_EVENTS_THROTTLED), 1);

    // The write's generation: evaluated again, and now allowed.
    dp.config(2, 0);
    assert_eq!(dp.xdp(&syn(REMOTE, 40002, POD_B, 81)), XDP_PASS);
    assert_eq!(dp.to_pod(&syn(REMOTE, 40002, POD_B, 81)), OK);

    // Revoked under generation 3: denied again, and the stale entry refreshed in place (its kind
    // was reported within the interval, so only a known kind is written again).
    revoke_remote_on_81(&mut dp);
    dp.config(3, 0);
    assert_eq!(dp.xdp(&syn(REMOTE, 40003, POD_B, 81)), XDP_DROP);
    let remembered = dp.xdp_denials();
    assert_eq!(remembered.len(), 1);
    assert_eq!(remembered[0].1.generation, 3);
    assert_eq!(dp.xdp_denials_generation(), 3);
    // And the refreshed entry decides the next packet under generation 3: a rule written without
    // a new generation is again not seen.
    admit_remote_on_81(&mut dp);
    assert_eq!(dp.xdp(&syn(REMOTE, 40005, POD_B, 81)), XDP_DROP);
    revoke_remote_on_81(&mut dp);

    // The source becomes another identity, one B admits on 81: evaluated afresh under the
    // ipcache write's generation.
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_C,
        Some(PROTO_TCP),
        Ports::One(81),
        9,
    );
    dp.ipcache(REMOTE, 32, ID_C);
    dp.config(4, 0);
    assert_eq!(dp.xdp(&syn(REMOTE, 40004, POD_B, 81)), XDP_PASS);
}

/// B's rule 8 admitting the remote pod on TCP 81, written without a new generation.
fn admit_remote_on_81(dp: &mut Datapath) {
    dp.allow(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(81),
        8,
    );
}

fn revoke_remote_on_81(dp: &mut Datapath) {
    dp.revoke(
        ID_B,
        1,
        DIR_INGRESS,
        ID_REMOTE,
        Some(PROTO_TCP),
        Ports::One(81),
    );
}

/// Conntrack comes before a remembered denial: once a local pod opened a connection to the
/// source, its replies pass, though packets of the same kind were denied before.
#[test]
fn a_remembered_denial_never_drops_a_reply() {
    let dp = b_admits_remote_on_80();
    // The remote pod knocks on B's port 40001 from its port 443: denied, and remembered.
    assert_eq!(dp.xdp(&syn(REMOTE, 443, POD_B, 40001)), XDP_DROP);
    assert_eq!(dp.xdp(&syn(REMOTE, 443, POD_B, 40001)), XDP_DROP);
    assert_eq!(dp.xdp_denials().len(), 1);
    // B opens a connection from that port to the remote pod's 443: the reply is the same kind.
    assert_eq!(dp.from_pod(&syn(POD_B, 40001, REMOTE, 443)), OK);
    let reply = ack(REMOTE, 443, POD_B, 40001);
    assert_eq!(dp.xdp(&reply), XDP_PASS);
    assert_eq!(dp.to_pod(&reply), OK);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), 2);
}

/// Sources that are each denied once are remembered only as far as their drops are reported: a
/// flood from ever new sources writes no entry per packet beyond each CPU's report budget.
#[test]
fn denials_are_remembered_only_within_the_report_budget() {
    pin_to_one_cpu();
    let mut dp = b_admits_remote_on_80();
    dp.ipcache("10.200.0.0", 16, ID_REMOTE);
    const SOURCES: u32 = 2 * DROP_REPORTS_PER_CPU;
    let start = coarse_now_ns();
    for n in 0..SOURCES {
        let source = format!("10.200.{}.{}", n / 250, n % 250 + 1);
        assert_eq!(dp.xdp(&syn(&source, 40_000, POD_B, 81)), XDP_DROP);
    }
    let intervals = report_intervals_since(start);
    assert_eq!(dp.counter(REASON_XDP_POLICY_DENIED), u64::from(SOURCES));
    let reported = dp.events().len();
    let remembered = dp.xdp_denials().len();
    assert_eq!(
        remembered, reported,
        "each reported kind remembered, no other ({intervals} interval(s))"
    );
    assert!(remembered <= DROP_REPORTS_PER_CPU as usize * intervals);
}

#[test]
fn non_ip_fragments_and_traffic_not_for_a_local_pod_pass() {
    let mut dp = b_admits_remote_on_80();
    let later_fragment = ethernet(
        ETH_P_IP,
        &ipv4_fragment(
            [10, 2, 0, 9],
            [10, 1, 0, 2],
            PROTO_UDP,
            0x4242,
            10,
            false,
            &[0; 16],
        ),
    );
    let first_fragment = ethernet(
        ETH_P_IP,
        &ipv4_fragment(
            [10, 2, 0, 9],
            [10, 1, 0, 2],
            PROTO_TCP,
            0x4243,
            0,
            true,
            &tcp_header(40000, 81, 0x02),
        ),
    );
    let frames = [
        arp_request([10, 2, 0, 9], [10, 1, 0, 2]),
        later_fragment,
        first_fragment,
        // To the node (or anything that is not a local pod): not the filter's business.
        syn(REMOTE, 40000, "10.9.9.9", 22),
        // Truncated: the enforcer decides.
        syn(REMOTE, 40000, POD_B, 81)[..30].to_vec(),
    ];
    for frame in &frames {
        assert_eq!(dp.xdp(frame), XDP_PASS);
    }
    assert_eq!(dp.counter_slot(COUNTER_XDP_PASSED), frames.len() as u64);
    assert!(dp.events().is_empty());
}

/// A flood of denied packets is counted packet by packet, but each kind of drop (source,
/// destination address and port, reason) is reported once per interval, not once per packet;
/// a new kind is reported at once, and the drops not reported are counted.
#[test]
fn a_flood_of_denied_packets_is_counted_exactly_and_reported_once_per_kind() {
    let mut dp = b_admits_remote_on_80();
    dp.prefilter(WORLD, 32, 4);
    const FLOOD: u16 = 1_000;
    let start = coarse_now_ns();
    // New connections (new source ports) of two kinds, interleaved.
    for n in 0..FLOOD {
        assert_eq!(dp.xdp(&syn(REMOTE, 20_000 + n, POD_B, 81)), XDP_DROP);
        assert_eq!(dp.xdp(&syn(WORLD, 20_000 + n, POD_A, 80)), XDP_DROP);
    }
    // A third kind: another port.
    assert_eq!(dp.xdp(&syn(REMOTE, 40_000, POD_B, 82)), XDP_DROP);
    let intervals = report_intervals_since(start);

    assert_eq!(
        dp.counter(REASON_XDP_POLICY_DENIED),
        u64::from(FLOOD) + 1,
        "every drop counted"
    );
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), u64::from(FLOOD));
    let events = dp.events();
    let of_kind = |reason: u8, port: u16| {
        events
            .iter()
            .filter(|e| e.reason == reason && u16::from_be(e.dport) == port)
            .collect::<Vec<_>>()
    };
    let denied_81 = of_kind(REASON_XDP_POLICY_DENIED, 81);
    let listed = of_kind(REASON_PREFILTER_DENIED, 80);
    let denied_82 = of_kind(REASON_XDP_POLICY_DENIED, 82);
    for kind in [&denied_81, &listed] {
        assert!(
            (1..=intervals).contains(&kind.len()),
            "{} reports of one kind in {intervals} interval(s)",
            kind.len()
        );
    }
    assert_eq!(denied_82.len(), 1, "a new kind is reported at once");
    assert_eq!(events.len(), denied_81.len() + listed.len() + 1);
    // Each report explains its kind as an unthrottled one would.
    let first = denied_81[0];
    assert_eq!((first.subject, first.peer), (ID_B, ID_REMOTE));
    assert_eq!(
        u16::from_be(first.sport),
        20_000,
        "the first drop of the kind"
    );
    assert_eq!((listed[0].subject, listed[0].rule), (ID_A, 4));
    assert_eq!(
        dp.counter_slot(COUNTER_EVENTS_THROTTLED),
        2 * u64::from(FLOOD) + 1 - events.len() as u64,
        "every drop not reported is counted as throttled"
    );
}

/// A flood from ever new sources (each drop a new kind) is reported up to each CPU's budget per
/// interval; every drop is still counted.
#[test]
fn a_flood_from_ever_new_sources_is_reported_within_the_cpus_budget() {
    pin_to_one_cpu();
    let mut dp = Datapath::with_pods();
    dp.prefilter("10.200.0.0", 16, 9);
    const SOURCES: u32 = 3 * DROP_REPORTS_PER_CPU;
    let start = coarse_now_ns();
    for n in 0..SOURCES {
        let source = format!("10.200.{}.{}", n / 250, n % 250 + 1);
        assert_eq!(dp.xdp(&syn(&source, 40_000, POD_A, 80)), XDP_DROP);
    }
    let intervals = report_intervals_since(start);
    assert_eq!(dp.counter(REASON_PREFILTER_DENIED), u64::from(SOURCES));
    let events = dp.events();
    let budget = DROP_REPORTS_PER_CPU as usize;
    assert!(
        events.len() >= budget && events.len() <= budget * intervals,
        "{} reports in {intervals} interval(s) with a budget of {budget}",
        events.len()
    );
    let sources: std::collections::BTreeSet<_> = events.iter().map(|e| e.saddr).collect();
    assert_eq!(sources.len(), events.len(), "each report a new source");
    assert!(
        events
            .iter()
            .all(|e| e.reason == REASON_PREFILTER_DENIED && e.rule == 9)
    );
    assert_eq!(
        dp.counter_slot(COUNTER_EVENTS_THROTTLED),
        u64::from(SOURCES) - events.len() as u64
    );
}

/// Keeps this test's thread on one CPU, so that one report budget applies.
fn pin_to_one_cpu() {
    let cpu = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .ok()
        .and_then(|set| (0..nix::sched::CpuSet::count()).find(|&c| set.is_set(c).unwrap_or(false)))
        .expect("a CPU this thread may run on");
    let mut one = nix::sched::CpuSet::new();
    one.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
}
