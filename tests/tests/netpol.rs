//! The upstream Kubernetes NetworkPolicy truth-table suite (kubernetes/kubernetes
//! test/e2e/network/netpol/network_policy.go), run on one shared two-node lab with the real
//! `weir-agent` and `weir-cni`. The cases live in `weir_tests::netpol_cases` (shared with the
//! offline check of the compiler); this file runs each one against the lab, with real connections
//! from inside the pods to the pods' addresses on the port and protocol upstream probes.
//!
//! The lab and the running of a case are `weir_tests::netpol_lab` (over weir-lab's shared lab):
//! the pods are spread over both nodes, so every case exercises enforcement on both sides of a
//! node boundary.
//!
//! After the upstream cases come Weir's own (`weir_*`): a named port with an ipBlock peer, and
//! policies only a manifest can carry, which are rejected and fail closed (issue 11).
//!
//! The cases share the lab of this test process and run one at a time; the lab is brought up by
//! the first case and taken down when the test binary exits (and by the next run if it was
//! killed).
//!
//! Every truth table is probed once, after both agents report the manifests directory as it is
//! applied (`weir status`): a policy change that is applied but not yet enforced fails the case.

use weir_lab::lab::{Lab, Proto};
use weir_tests::netpol_cases::{self, Cluster as _, Reach, ns, pod, policy};
use weir_tests::netpol_lab::{lab_case, run};

use Proto::{Tcp as TCP, Udp as UDP};

// ---------------------------------------------------------------------------------------------
// The cases, each a #[test] of its own
// ---------------------------------------------------------------------------------------------

macro_rules! lab_cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*
        /// The cases run here, to check that none of the shared table is left out.
        const LAB_CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

lab_cases!(
    default_deny_ingress,
    default_deny_all,
    allow_from_pods_within_namespace_by_pod_selector,
    allow_ingress_for_a_target,
    allow_ingress_from_pods_in_all_namespaces,
    allow_only_from_other_namespace_by_namespace_selector,
    pod_selector_with_match_expressions,
    namespace_selector_with_match_expressions,
    pod_selector_or_namespace_selector,
    pod_selector_and_namespace_selector,
    multiple_pod_selectors_and_namespace_selectors,
    any_pod_selectors,
    allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector,
    ports,
    multiple_stacked_policies_with_overlapping_pod_selectors,
    allow_all_policy,
    allow_ingress_on_one_named_port,
    allow_ingress_from_namespace_on_one_named_port,
    allow_egress_on_one_named_port,
    enforce_updated_policy,
    allow_ingress_from_updated_namespace,
    allow_ingress_from_updated_pod,
    deny_ingress_from_pods_on_other_namespaces,
    deny_ingress_access_to_updated_pod,
    deny_egress_from_pods_by_pod_selector,
    deny_egress_from_all_pods_in_a_namespace,
    ingress_and_egress_specified_together,
    deny_egress_on_client_side_even_if_server_allows,
    egress_to_server_in_other_namespace_by_pod_and_namespace_selector,
    ingress_any_port_on_a_specific_protocol,
    multiple_ingress_policies_with_allow_all_taking_precedence,
    multiple_egress_policies_with_allow_all_taking_precedence,
    stop_enforcing_policies_after_they_are_deleted,
    allow_egress_to_server_in_cidr_block,
    except_clause_in_egress_cidr_block,
    ip_in_both_cidr_and_except_is_allowed_by_another_policy,
    ingress_and_egress_controlled_independently,
    sctp_policy_is_not_treated_as_tcp,
    sctp_policy_still_isolates_pods,
    udp_only_policy_does_not_allow_tcp,
    namespace_selector_match_labels_on_default_namespace_label,
    namespace_selector_match_expressions_on_default_namespace_label,
    end_port_range,
    udp_default_deny_ingress,
    udp_ports,
    udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector,
);

/// The pinned path counters of every node of the lab, summed: (bpf_redirect_peer,
/// bpf_redirect_neigh).
fn shortcut_packets(lab: &Lab) -> (u64, u64) {
    use aya::maps::{Map, MapData, PerCpuArray};
    use weir_common::{COUNTER_PATH_REDIRECT_NEIGH, COUNTER_PATH_REDIRECT_PEER, MAP_COUNTERS};
    let mut total = (0, 0);
    for node in &lab.state().nodes {
        let data = MapData::from_pin(node.bpffs_dir.join("maps").join(MAP_COUNTERS))
            .expect("the node's pinned counters");
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
        let sum = |slot: u32| -> u64 { counters.get(&slot, 0).expect("slot").iter().sum() };
        total.0 += sum(COUNTER_PATH_REDIRECT_PEER);
        total.1 += sum(COUNTER_PATH_REDIRECT_NEIGH);
    }
    total
}

/// The agents run with their defaults, so every case above runs with both shortcuts on: between
/// pods of one node through `bpf_redirect_peer`, across the nodes through `bpf_redirect_neigh`.
#[test]
fn weir_the_truth_table_runs_through_both_shortcuts() {
    let case = lab_case("weir_the_truth_table_runs_through_both_shortcuts");
    let before = shortcut_packets(case.lab());
    case.check(
        80,
        TCP,
        &Reach::new().expectations(80, TCP),
        "every pod reaches every pod",
    );
    let after = shortcut_packets(case.lab());
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "the probes did not take both shortcuts (redirect_peer, redirect_neigh): {before:?} -> {after:?}"
    );
}

#[test]
fn every_shared_case_runs_in_the_lab() {
    let shared: Vec<&str> = netpol_cases::CASES.iter().map(|c| c.name).collect();
    assert_eq!(LAB_CASES, shared.as_slice());
}

// ---------------------------------------------------------------------------------------------
// Beyond upstream: named ports with ipBlocks, and rejected policies (issue 11)
// ---------------------------------------------------------------------------------------------

/// The policy of issue 11, which Weir used to reject whole (and so fail open): ingress from
/// pod=b and from an ipBlock with two excepts naming pods of other namespaces, egress to an
/// ipBlock on `[{protocol: TCP}, {port: serve-80-tcp}]`. Accepted now, and enforced exactly.
#[test]
fn weir_issue_11_named_port_and_ip_block_policy() {
    let mut c = lab_case("Weir: a named port with an ipBlock peer is enforced (issue 11)");
    let cover = c.lab().pods_supernet();
    let (ya, zb, yc) = (c.pod_ip("y/a"), c.pod_ip("z/b"), c.pod_ip("y/c"));
    c.apply(&policy(
        "x",
        "mixed",
        &format!(
            "  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n    - ipBlock:\n        cidr: {cover}\n        except: [{ya}/32, {zb}/32]\n  egress:\n  - ports: [{{protocol: TCP}}, {{port: serve-80-tcp}}]\n    to:\n    - ipBlock: {{cidr: {cover}, except: [{yc}/32]}}\n"
        ),
    ));
    let mut r = Reach::new();
    r.pair(pod("y", "a"), ns("x"), false)
        .pair(pod("z", "b"), ns("x"), false)
        .pair(ns("x"), pod("y", "c"), false);
    c.validate(80, TCP, &r);
    c.validate(81, TCP, &r);
    // Egress allows TCP only: UDP out of x is denied; ingress (no ports) is as for TCP.
    let mut u = r.clone();
    u.egress(ns("x"), false);
    c.validate(80, UDP, &u);
}

/// A named port resolved on each pod inside an ipBlock: UDP to `serve-80-udp` of the pods in
/// the block (but the excepted one), nothing else.
#[test]
fn weir_named_port_to_ip_block_is_exact() {
    let mut c = lab_case("Weir: egress to a named port of the pods in an ipBlock");
    let cover = c.lab().pods_supernet();
    let zc = c.pod_ip("z/c");
    c.apply(&policy(
        "x",
        "udp-80-by-name",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{{protocol: UDP, port: serve-80-udp}}]\n    to: [{{ipBlock: {{cidr: {cover}, except: [{zc}/32]}}}}]\n"
        ),
    ));
    let mut r = Reach::new();
    r.pair(pod("x", "a"), pod("z", "c"), false);
    c.validate(80, UDP, &r);
    let mut closed = Reach::new();
    closed.egress(pod("x", "a"), false);
    c.validate(81, UDP, &closed);
    c.validate(80, TCP, &closed);
}

/// Policies only a manifest can carry (the API server refuses them) are rejected, visibly, and
/// fail closed: each allows nothing, and the pods it selects stay isolated in its directions
/// (all pods of its namespace when its podSelector is invalid).
#[test]
fn weir_rejected_policies_fail_closed() {
    let mut c = lab_case("Weir: a rejected policy never allows what it would have denied");
    // Would admit only x/b into x/a; its name is invalid.
    c.apply(&policy(
        "x",
        "UPPER_case!",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n",
    ));
    // Would allow all egress of y/a; its podSelector is invalid, so all of y is isolated.
    c.apply(&policy(
        "y",
        "bad-selector",
        "  podSelector: {matchExpressions: [{key: pod, operator: Near, values: [a]}]}\n  policyTypes: [Egress]\n  egress: [{}]\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false).egress(ns("y"), false);
    c.validate(80, TCP, &r);
    c.validate(81, UDP, &r);
    c.assert_agents_logged(&["rejected NetworkPolicy", "UPPER_case!", "y/bad-selector"]);
}
