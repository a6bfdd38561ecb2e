//! The upstream Kubernetes NetworkPolicy truth-table suite (kubernetes/kubernetes
//! test/e2e/network/netpol/network_policy.go), run on one shared two-node lab with the real
//! `weir-agent` and `weir-cni`. The cases live in `weir_tests::netpol_cases` (shared with the
//! offline check of the compiler); this file runs each one against the lab, with real connections
//! from inside the pods to the pods' addresses on the port and protocol upstream probes.
//!
//! The pods are spread over both nodes (x/a, x/c, y/b, z/a, z/c on node1; x/b, y/a, y/c, z/b on
//! node2), so every case exercises enforcement on both sides of a node boundary.
//!
//! After the upstream cases come Weir's own (`weir_*`): a named port with an ipBlock peer, and
//! policies only a manifest can carry, which are rejected and fail closed (issue 11).
//!
//! The cases share the lab and run one at a time (a mutex); the lab is brought up by the first
//! case and taken down when the test binary exits (and by the next run if it was killed).
//!
//! Every truth table is probed once, after both agents report the manifests directory as it is
//! applied (`weir status`): a policy change that is applied but not yet enforced fails the case.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use weir_lab::lab::{self, Lab, LabSpec, Manifest, ProbeOptions, ProbeSpec, Proto};
use weir_tests::applied::{APPLY_TIMEOUT, wait_applied};
use weir_tests::netpol_cases::{
    self, Cluster, NAMESPACES, PODS, Reach, cluster_yaml, ns, pod, policy,
};

const LAB: &str = "netpol";

use Proto::{Tcp as TCP, Udp as UDP};

// ---------------------------------------------------------------------------------------------
// The shared lab
// ---------------------------------------------------------------------------------------------

static SHARED: OnceLock<Result<Mutex<Lab>, String>> = OnceLock::new();

extern "C" fn take_down_at_exit() {
    if let Err(e) = lab::down(LAB) {
        eprintln!("taking down lab {LAB}: {e:#}");
    }
}

fn shared_lab() -> MutexGuard<'static, Lab> {
    let shared = SHARED.get_or_init(|| {
        let started = Instant::now();
        let result = Lab::up(LabSpec::new(LAB, 2).manifest(Manifest::Yaml(cluster_yaml())));
        match result {
            Ok(lab) => {
                // SAFETY: registering a plain extern "C" function.
                unsafe { libc::atexit(take_down_at_exit) };
                eprintln!("lab {LAB} up in {:.1} s", started.elapsed().as_secs_f64());
                Ok(Mutex::new(lab))
            }
            Err(e) => Err(format!("{e:#}")),
        }
    });
    match shared {
        Ok(m) => m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        Err(e) => panic!("the shared lab did not come up: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A case: the lab reset to no policy and original labels, then policies and assertions
// ---------------------------------------------------------------------------------------------

struct Case {
    lab: MutexGuard<'static, Lab>,
    name: &'static str,
    started: Instant,
}

impl Case {
    fn new(name: &'static str) -> Case {
        let mut lab = shared_lab();
        let started = Instant::now();
        lab.delete_kind("NetworkPolicy").expect("deleting policies");
        for ns in NAMESPACES {
            let want: BTreeMap<String, String> = BTreeMap::new();
            if lab.labels("Namespace", None, ns).expect("namespace labels") != want {
                lab.set_labels("Namespace", None, ns, &want)
                    .expect("resetting labels");
            }
            for p in PODS {
                let want = BTreeMap::from([("pod".to_string(), p.to_string())]);
                if lab.labels("Pod", Some(ns), p).expect("pod labels") != want {
                    lab.set_labels("Pod", Some(ns), p, &want)
                        .expect("resetting labels");
                }
            }
        }
        let mut case = Case { lab, name, started };
        // Start from a clean slate: everything reaches everything again.
        for (port, proto) in [(80, TCP), (81, TCP), (80, UDP), (81, UDP)] {
            case.check(port, proto, &Reach::new(), "resetting to no policy");
        }
        case
    }

    fn check(&mut self, port: u16, proto: Proto, reach: &Reach, what: &str) {
        let expect = reach.expectations(port, proto);
        let spec = ProbeSpec {
            ports: Some(vec![(port, proto)]),
            options: ProbeOptions {
                timeout: Duration::from_millis(1000),
                udp_attempts: 2,
            },
            denied_timeout: Some(Duration::from_millis(250)),
            ..ProbeSpec::default()
        };
        let since = std::time::SystemTime::now();
        self.wait_applied();
        let (matrix, diffs) = self.lab.probe_once(&spec, &expect).expect("probing");
        if !diffs.is_empty() {
            let mut logs = String::new();
            for d in diffs.iter().filter(|d| !d.observed) {
                for line in self.lab.explain_drop(&d.from, &d.to, since) {
                    logs.push_str(&format!("{} -> {}: {line}\n", d.from, d.to.pod));
                }
            }
            for node in ["node1", "node2"] {
                logs.push_str(&format!(
                    "\n--- {node} agent log (tail) ---\n{}\n",
                    self.lab.agent_log(node, 15)
                ));
            }
            panic!(
                "{what}: {port}/{proto} truth table differs once both agents applied the manifests\n\
                 observed (. allowed, X denied, ! differs from expected):\n{}\n{}{logs}",
                matrix.render(Some(&expect)),
                lab::matrix::render_differences(&diffs),
            );
        }
    }
}

impl Case {
    /// Waits until both agents have written the manifests directory, as it is now, to their
    /// datapath.
    fn wait_applied(&self) {
        let state = self.lab.state();
        for node in &state.nodes {
            wait_applied(&node.socket, &state.manifests_dir(), APPLY_TIMEOUT);
        }
    }
}

impl Cluster for Case {
    fn apply(&mut self, yaml: &str) {
        self.lab.apply_yaml(yaml).expect("applying policies");
    }

    fn delete_policies(&mut self) {
        self.lab
            .delete_kind("NetworkPolicy")
            .expect("deleting policies");
    }

    fn pod_ip(&self, key: &str) -> String {
        self.lab.pod_ip(key).expect("pod address").to_string()
    }

    fn add_pod_labels(&mut self, ns: &str, name: &str, labels: &[(&str, &str)]) {
        let mut now = self.lab.labels("Pod", Some(ns), name).expect("labels");
        now.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.lab
            .set_labels("Pod", Some(ns), name, &now)
            .expect("setting labels");
    }

    fn add_namespace_label(&mut self, ns: &str, key: &str, value: &str) {
        let mut now = self.lab.labels("Namespace", None, ns).expect("labels");
        now.insert(key.to_string(), value.to_string());
        self.lab
            .set_labels("Namespace", None, ns, &now)
            .expect("setting labels");
    }

    fn validate(&mut self, port: u16, proto: Proto, reach: &Reach) {
        let name = self.name;
        self.check(port, proto, reach, name);
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        eprintln!(
            "case {} took {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The cases, each a #[test] of its own
// ---------------------------------------------------------------------------------------------

fn run(name: &str) {
    let case = netpol_cases::case(name);
    let mut c = Case::new(case.upstream);
    case.run(&mut c);
}

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
    let mut case = Case::new("weir_the_truth_table_runs_through_both_shortcuts");
    let before = shortcut_packets(&case.lab);
    case.check(80, TCP, &Reach::new(), "every pod reaches every pod");
    let after = shortcut_packets(&case.lab);
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

impl Case {
    /// An ipBlock covering every pod of the lab (the nodes' pod CIDRs are 10.<lab>.<node>.0/24).
    fn pods_cover(&self) -> String {
        let ip = self.pod_ip("x/a");
        let octets: Vec<&str> = ip.split('.').collect();
        format!("{}.{}.0.0/16", octets[0], octets[1])
    }

    /// Asserts that both agents, having applied the manifests directory, logged every one of
    /// `texts` (an agent logs a rejection before it reports the state applied).
    fn assert_logged(&self, texts: &[&str]) {
        self.wait_applied();
        let logs: Vec<String> = ["node1", "node2"]
            .iter()
            .map(|n| self.lab.agent_log(n, 100_000))
            .collect();
        assert!(
            logs.iter().all(|l| texts.iter().all(|t| l.contains(t))),
            "the agents' logs do not say {texts:?}:\n{}",
            logs.join("\n---\n")
        );
    }
}

/// The policy of issue 11, which Weir used to reject whole (and so fail open): ingress from
/// pod=b and from an ipBlock with two excepts naming pods of other namespaces, egress to an
/// ipBlock on `[{protocol: TCP}, {port: serve-80-tcp}]`. Accepted now, and enforced exactly.
#[test]
fn weir_issue_11_named_port_and_ip_block_policy() {
    let mut c = Case::new("Weir: a named port with an ipBlock peer is enforced (issue 11)");
    let cover = c.pods_cover();
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
    let mut c = Case::new("Weir: egress to a named port of the pods in an ipBlock");
    let cover = c.pods_cover();
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
    let mut c = Case::new("Weir: a rejected policy never allows what it would have denied");
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
    c.assert_logged(&["rejected NetworkPolicy", "UPPER_case!", "y/bad-selector"]);
}
