//! The upstream Kubernetes NetworkPolicy truth-table cases (kubernetes/kubernetes
//! test/e2e/network/netpol/network_policy.go) as data: each case is a function over a
//! [`Cluster`] (apply policies, change labels, assert a truth table), so that the same cases run
//! against the real agents of a lab (`tests/tests/netpol.rs`) and against the compiler alone
//! (`tests/tests/explain_offline.rs`, what `weir explain --manifests` answers).
//!
//! As upstream: namespaces x, y and z, pods a, b and c in each (label `pod: <name>`), every pod
//! serving TCP and UDP on ports 80 and 81 (container ports named `serve-80-tcp`, `serve-80-udp`,
//! `serve-81-tcp`, `serve-81-udp`). Each case starts from no policy and the original labels.
//! Pairs of a pod with itself are not asserted (upstream's `ignoreLoopback`).
//!
//! Upstream cases are written against the pods they need; with all nine pods present the same
//! expectations hold, and we assert them for all nine. Upstream's policy builders always set
//! `policyTypes` (SetSpecIngressRules adds Ingress, SetSpecEgressRules adds Egress); the YAML
//! here does the same wherever the default would differ (a policy with only egress rules).
//!
//! Not here: the three cases of the "using SCTP" context, which probe with SCTP (this machine's
//! kernel has no SCTP, see TOOLCHAIN.md). The two cases that apply SCTP *policies* and probe TCP
//! (an SCTP allowance must not open TCP, and must still isolate) are here.

use std::collections::BTreeMap;

use weir_lab::lab::{Expectations, Proto, Target};

use Proto::{Tcp as TCP, Udp as UDP};

/// Upstream's namespaces and pods.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// The nine pods in namespaces x, y and z, as manifests.
pub fn cluster_yaml() -> String {
    let mut yaml = String::new();
    for ns in NAMESPACES {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n"
        ));
    }
    // Pods in order x/a, x/b, ... z/c: the lab places them round robin on node1, node2.
    for ns in NAMESPACES {
        for pod in PODS {
            yaml.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  labels:\n    pod: {pod}\nspec:\n  containers:\n"
            ));
            for port in [80, 81] {
                for proto in ["tcp", "udp"] {
                    yaml.push_str(&format!(
                        "  - name: cont-{port}-{proto}\n    image: agnhost\n    ports:\n    - containerPort: {port}\n      name: serve-{port}-{proto}\n      protocol: {}\n",
                        proto.to_uppercase()
                    ));
                }
            }
            yaml.push_str("---\n");
        }
    }
    yaml
}

/// What a case does to a cluster; the lab and the offline compiler each implement it.
pub trait Cluster {
    /// Applies manifests (creates or replaces the objects).
    fn apply(&mut self, yaml: &str);
    /// Deletes every NetworkPolicy.
    fn delete_policies(&mut self);
    /// The address of pod `namespace/name`.
    fn pod_ip(&self, key: &str) -> String;
    /// Upstream `AddPodLabels`: merges labels into the pod's.
    fn add_pod_labels(&mut self, ns: &str, name: &str, labels: &[(&str, &str)]);
    /// Upstream `AddNamespaceLabel`.
    fn add_namespace_label(&mut self, ns: &str, key: &str, value: &str);
    /// Upstream `ValidateOrFail`: the full truth table on one port and protocol.
    fn validate(&mut self, port: u16, proto: Proto, reach: &Reach);
}

/// One case: the test's name, upstream's description, and what it does.
pub struct NetpolCase {
    pub name: &'static str,
    pub upstream: &'static str,
    pub run: fn(&mut dyn Cluster),
}

/// Every case, in upstream's order.
pub const CASES: &[NetpolCase] = &[
    NetpolCase {
        name: "default_deny_ingress",
        upstream: "should support a 'default-deny-ingress' policy",
        run: default_deny_ingress,
    },
    NetpolCase {
        name: "default_deny_all",
        upstream: "should support a 'default-deny-all' policy",
        run: default_deny_all,
    },
    NetpolCase {
        name: "allow_from_pods_within_namespace_by_pod_selector",
        upstream: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        run: allow_from_pods_within_namespace_by_pod_selector,
    },
    NetpolCase {
        name: "allow_ingress_for_a_target",
        upstream: "should enforce policy to allow ingress traffic for a target",
        run: allow_ingress_for_a_target,
    },
    NetpolCase {
        name: "allow_ingress_from_pods_in_all_namespaces",
        upstream: "should enforce policy to allow ingress traffic from pods in all namespaces",
        run: allow_ingress_from_pods_in_all_namespaces,
    },
    NetpolCase {
        name: "allow_only_from_other_namespace_by_namespace_selector",
        upstream: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        run: allow_only_from_other_namespace_by_namespace_selector,
    },
    NetpolCase {
        name: "pod_selector_with_match_expressions",
        upstream: "should enforce policy based on PodSelector with MatchExpressions",
        run: pod_selector_with_match_expressions,
    },
    NetpolCase {
        name: "namespace_selector_with_match_expressions",
        upstream: "should enforce policy based on NamespaceSelector with MatchExpressions",
        run: namespace_selector_with_match_expressions,
    },
    NetpolCase {
        name: "pod_selector_or_namespace_selector",
        upstream: "should enforce policy based on PodSelector or NamespaceSelector",
        run: pod_selector_or_namespace_selector,
    },
    NetpolCase {
        name: "pod_selector_and_namespace_selector",
        upstream: "should enforce policy based on PodSelector and NamespaceSelector",
        run: pod_selector_and_namespace_selector,
    },
    NetpolCase {
        name: "multiple_pod_selectors_and_namespace_selectors",
        upstream: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        run: multiple_pod_selectors_and_namespace_selectors,
    },
    NetpolCase {
        name: "any_pod_selectors",
        upstream: "should enforce policy based on any PodSelectors",
        run: any_pod_selectors,
    },
    NetpolCase {
        name: "allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        run: allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector,
    },
    NetpolCase {
        name: "ports",
        upstream: "should enforce policy based on Ports",
        run: ports,
    },
    NetpolCase {
        name: "multiple_stacked_policies_with_overlapping_pod_selectors",
        upstream: "should enforce multiple, stacked policies with overlapping podSelectors",
        run: multiple_stacked_policies_with_overlapping_pod_selectors,
    },
    NetpolCase {
        name: "allow_all_policy",
        upstream: "should support allow-all policy",
        run: allow_all_policy,
    },
    NetpolCase {
        name: "allow_ingress_on_one_named_port",
        upstream: "should allow ingress access on one named port",
        run: allow_ingress_on_one_named_port,
    },
    NetpolCase {
        name: "allow_ingress_from_namespace_on_one_named_port",
        upstream: "should allow ingress access from namespace on one named port",
        run: allow_ingress_from_namespace_on_one_named_port,
    },
    NetpolCase {
        name: "allow_egress_on_one_named_port",
        upstream: "should allow egress access on one named port",
        run: allow_egress_on_one_named_port,
    },
    NetpolCase {
        name: "enforce_updated_policy",
        upstream: "should enforce updated policy",
        run: enforce_updated_policy,
    },
    NetpolCase {
        name: "allow_ingress_from_updated_namespace",
        upstream: "should allow ingress access from updated namespace",
        run: allow_ingress_from_updated_namespace,
    },
    NetpolCase {
        name: "allow_ingress_from_updated_pod",
        upstream: "should allow ingress access from updated pod",
        run: allow_ingress_from_updated_pod,
    },
    NetpolCase {
        name: "deny_ingress_from_pods_on_other_namespaces",
        upstream: "should deny ingress from pods on other namespaces",
        run: deny_ingress_from_pods_on_other_namespaces,
    },
    NetpolCase {
        name: "deny_ingress_access_to_updated_pod",
        upstream: "should deny ingress access to updated pod",
        run: deny_ingress_access_to_updated_pod,
    },
    NetpolCase {
        name: "deny_egress_from_pods_by_pod_selector",
        upstream: "should deny egress from pods based on PodSelector",
        run: deny_egress_from_pods_by_pod_selector,
    },
    NetpolCase {
        name: "deny_egress_from_all_pods_in_a_namespace",
        upstream: "should deny egress from all pods in a namespace",
        run: deny_egress_from_all_pods_in_a_namespace,
    },
    NetpolCase {
        name: "ingress_and_egress_specified_together",
        upstream: "should work with Ingress, Egress specified together",
        run: ingress_and_egress_specified_together,
    },
    NetpolCase {
        name: "deny_egress_on_client_side_even_if_server_allows",
        upstream: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        run: deny_egress_on_client_side_even_if_server_allows,
    },
    NetpolCase {
        name: "egress_to_server_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        run: egress_to_server_in_other_namespace_by_pod_and_namespace_selector,
    },
    NetpolCase {
        name: "ingress_any_port_on_a_specific_protocol",
        upstream: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        run: ingress_any_port_on_a_specific_protocol,
    },
    NetpolCase {
        name: "multiple_ingress_policies_with_allow_all_taking_precedence",
        upstream: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        run: multiple_ingress_policies_with_allow_all_taking_precedence,
    },
    NetpolCase {
        name: "multiple_egress_policies_with_allow_all_taking_precedence",
        upstream: "should enforce multiple egress policies with egress allow-all policy taking precedence",
        run: multiple_egress_policies_with_allow_all_taking_precedence,
    },
    NetpolCase {
        name: "stop_enforcing_policies_after_they_are_deleted",
        upstream: "should stop enforcing policies after they are deleted",
        run: stop_enforcing_policies_after_they_are_deleted,
    },
    NetpolCase {
        name: "allow_egress_to_server_in_cidr_block",
        upstream: "should allow egress access to server in CIDR block",
        run: allow_egress_to_server_in_cidr_block,
    },
    NetpolCase {
        name: "except_clause_in_egress_cidr_block",
        upstream: "should enforce except clause while egress access to server in CIDR block",
        run: except_clause_in_egress_cidr_block,
    },
    NetpolCase {
        name: "ip_in_both_cidr_and_except_is_allowed_by_another_policy",
        upstream: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        run: ip_in_both_cidr_and_except_is_allowed_by_another_policy,
    },
    NetpolCase {
        name: "ingress_and_egress_controlled_independently",
        upstream: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        run: ingress_and_egress_controlled_independently,
    },
    NetpolCase {
        name: "sctp_policy_is_not_treated_as_tcp",
        upstream: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        run: sctp_policy_is_not_treated_as_tcp,
    },
    NetpolCase {
        name: "sctp_policy_still_isolates_pods",
        upstream: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        run: sctp_policy_still_isolates_pods,
    },
    NetpolCase {
        name: "udp_only_policy_does_not_allow_tcp",
        upstream: "should not allow access by TCP when a policy specifies only UDP",
        run: udp_only_policy_does_not_allow_tcp,
    },
    NetpolCase {
        name: "namespace_selector_match_labels_on_default_namespace_label",
        upstream: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        run: namespace_selector_match_labels_on_default_namespace_label,
    },
    NetpolCase {
        name: "namespace_selector_match_expressions_on_default_namespace_label",
        upstream: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        run: namespace_selector_match_expressions_on_default_namespace_label,
    },
    NetpolCase {
        name: "end_port_range",
        upstream: "beyond upstream: endPort ranges",
        run: end_port_range,
    },
    NetpolCase {
        name: "udp_default_deny_ingress",
        upstream: "UDP: should support a 'default-deny-ingress' policy",
        run: udp_default_deny_ingress,
    },
    NetpolCase {
        name: "udp_ports",
        upstream: "UDP: should enforce policy based on Ports",
        run: udp_ports,
    },
    NetpolCase {
        name: "udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        run: udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector,
    },
];

/// The case called `name`.
pub fn case(name: &str) -> &'static NetpolCase {
    CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no netpol case {name}"))
}

// ---------------------------------------------------------------------------------------------
// Upstream's Reachability, over all nine pods
// ---------------------------------------------------------------------------------------------

/// A set of pods: any, a namespace, or one pod (upstream's `Peer`).
#[derive(Clone, Copy)]
pub struct Peer {
    pub ns: Option<&'static str>,
    pub pod: Option<&'static str>,
}

pub const ANY: Peer = Peer {
    ns: None,
    pod: None,
};

pub fn ns(ns: &'static str) -> Peer {
    Peer {
        ns: Some(ns),
        pod: None,
    }
}

pub fn pod(ns: &'static str, pod: &'static str) -> Peer {
    Peer {
        ns: Some(ns),
        pod: Some(pod),
    }
}

impl Peer {
    pub fn matches(&self, key: &str) -> bool {
        let (ns, name) = key.split_once('/').expect("ns/name");
        self.ns.is_none_or(|n| n == ns) && self.pod.is_none_or(|p| p == name)
    }
}

pub fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Expected connectivity between the nine pods, all allowed to start with; later calls win.
#[derive(Clone)]
pub struct Reach {
    pub cells: BTreeMap<(String, String), bool>,
}

impl Default for Reach {
    fn default() -> Self {
        Self::new()
    }
}

impl Reach {
    /// Every pod reaches every pod.
    pub fn new() -> Self {
        let mut cells = BTreeMap::new();
        for from in all_pods() {
            for to in all_pods() {
                cells.insert((from.clone(), to), true);
            }
        }
        Reach { cells }
    }

    /// Upstream `ExpectPeer`.
    pub fn peer(&mut self, from: Peer, to: Peer, allowed: bool) -> &mut Self {
        for ((f, t), v) in self.cells.iter_mut() {
            if from.matches(f) && to.matches(t) {
                *v = allowed;
            }
        }
        self
    }

    /// Upstream `Expect`: one pair.
    pub fn pair(&mut self, from: Peer, to: Peer, allowed: bool) -> &mut Self {
        self.peer(from, to, allowed)
    }

    /// Upstream `ExpectAllIngress`: everything into `to`.
    pub fn ingress(&mut self, to: Peer, allowed: bool) -> &mut Self {
        self.peer(ANY, to, allowed)
    }

    /// Upstream `ExpectAllEgress`: everything out of `from`.
    pub fn egress(&mut self, from: Peer, allowed: bool) -> &mut Self {
        self.peer(from, ANY, allowed)
    }

    pub fn expectations(&self, port: u16, proto: Proto) -> Expectations {
        let mut e = Expectations::default();
        for ((from, to), &allowed) in &self.cells {
            if from != to {
                e.set(from, Target::new(to, port, proto), allowed);
            }
        }
        e
    }
}

// ---------------------------------------------------------------------------------------------
// Policy builders (YAML, as a user would write them)
// ---------------------------------------------------------------------------------------------

/// A NetworkPolicy in `ns`: `spec` is the YAML body under `spec:` (indented by 2).
pub fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

// ---------------------------------------------------------------------------------------------
// The cases of "NetworkPolicy between server and client"
// ---------------------------------------------------------------------------------------------

pub fn default_deny_ingress(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(80, TCP, &r);
}

pub fn default_deny_all(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false).peer(ns("x"), ANY, false);
    c.validate(80, TCP, &r);
}

pub fn allow_from_pods_within_namespace_by_pod_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "x-a-allows-x-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true);
    c.validate(80, TCP, &r);
}

pub fn allow_ingress_for_a_target(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ));
    c.apply(&policy(
        "x",
        "allow-all-to-a",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {}\n      namespaceSelector: {}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), true)
        .ingress(pod("x", "b"), false)
        .ingress(pod("x", "c"), false);
    c.validate(80, TCP, &r);
}

pub fn allow_ingress_from_pods_in_all_namespaces(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-from-another-ns",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {}}\n",
    ));
    c.validate(80, TCP, &Reach::new());
}

pub fn allow_only_from_other_namespace_by_namespace_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn pod_selector_with_match_expressions(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "x-a-allows-x-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [b]}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true);
    c.validate(80, TCP, &r);
}

pub fn namespace_selector_with_match_expressions(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-match-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: In, values: [y]}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn pod_selector_or_namespace_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-match-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n    - podSelector: {matchLabels: {pod: b}}\n",
    ));
    let mut r = Reach::new();
    r.pair(pod("x", "a"), pod("x", "a"), false)
        .pair(pod("x", "c"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn pod_selector_and_namespace_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-podselector-and-nsselector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n      podSelector: {matchLabels: {pod: b}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("y", "b"), pod("x", "a"), true)
        .pair(pod("z", "b"), pod("x", "a"), true);
    c.validate(80, TCP, &r);
}

pub fn multiple_pod_selectors_and_namespace_selectors(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-z-pod-b-c",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n      podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [b, c]}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .pair(pod("y", "a"), pod("x", "a"), false)
        .pair(pod("z", "a"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn any_pod_selectors(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-x-pod-b-c",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n    - podSelector: {matchLabels: {pod: c}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true)
        .pair(pod("x", "c"), pod("x", "a"), true);
    c.validate(80, TCP, &r);
}

pub fn allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-pod-a-via-namespace-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("y", "a"), pod("x", "a"), true);
    c.validate(80, TCP, &r);
}

const ALLOW_Y_TO_X_A_81_TCP: &str = "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: TCP}\n";

pub fn ports(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector",
        ALLOW_Y_TO_X_A_81_TCP,
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("y"), pod("x", "a"), true)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(81, TCP, &r);
}

pub fn multiple_stacked_policies_with_overlapping_pod_selectors(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector",
        ALLOW_Y_TO_X_A_81_TCP,
    ));
    let mut allow = Reach::new();
    allow
        .peer(ns("x"), pod("x", "a"), false)
        .peer(ns("y"), pod("x", "a"), true)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(81, TCP, &allow);
    let mut deny = Reach::new();
    deny.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &deny);
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 80, protocol: TCP}\n",
    ));
    c.validate(80, TCP, &allow);
}

pub fn allow_all_policy(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-all",
        "  podSelector: {}\n  ingress:\n  - {}\n",
    ));
    c.validate(80, TCP, &Reach::new());
    c.validate(81, TCP, &Reach::new());
}

pub fn allow_ingress_on_one_named_port(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-all",
        "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n",
    ));
    c.validate(81, TCP, &Reach::new());
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(80, TCP, &r);
}

pub fn allow_ingress_from_namespace_on_one_named_port(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: serve-80-tcp, protocol: TCP}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
    let mut fail = Reach::new();
    fail.ingress(pod("x", "a"), false);
    c.validate(81, TCP, &fail);
}

pub fn allow_egress_on_one_named_port(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-egress",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-80-tcp\n",
    ));
    c.validate(80, TCP, &Reach::new());
    let mut r = Reach::new();
    r.peer(ns("x"), ANY, false);
    c.validate(81, TCP, &r);
}

pub fn enforce_updated_policy(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-all-mutate-to-deny-all",
        "  podSelector: {}\n  ingress:\n  - {}\n",
    ));
    c.validate(81, TCP, &Reach::new());
    // The same policy, updated in place to `ingress: []`.
    c.apply(&policy(
        "x",
        "allow-all-mutate-to-deny-all",
        "  podSelector: {}\n  ingress: []\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(81, TCP, &r);
}

pub fn allow_ingress_from_updated_namespace(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns2: updated}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &r);
    c.add_namespace_label("y", "ns2", "updated");
    let mut with_label = Reach::new();
    with_label
        .ingress(pod("x", "a"), false)
        .peer(ns("y"), ANY, true);
    c.validate(80, TCP, &with_label);
}

pub fn allow_ingress_from_updated_pod(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b, pod2: updated}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &r);
    c.add_pod_labels("x", "b", &[("pod", "b"), ("pod2", "updated")]);
    let mut with_label = Reach::new();
    with_label
        .ingress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true);
    c.validate(80, TCP, &with_label);
}

pub fn deny_ingress_from_pods_on_other_namespaces(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-empty-policy",
        "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {}}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("y"), ns("x"), false)
        .peer(ns("z"), ns("x"), false);
    c.validate(80, TCP, &r);
}

pub fn deny_ingress_access_to_updated_pod(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n",
    ));
    c.validate(80, TCP, &Reach::new());
    c.add_pod_labels("x", "a", &[("target", "isolated")]);
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn deny_egress_from_pods_by_pod_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-egress-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    ));
    let mut r = Reach::new();
    r.egress(pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn deny_egress_from_all_pods_in_a_namespace(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-egress-ns-x",
        "  podSelector: {}\n  policyTypes: [Egress]\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), ANY, false);
    c.validate(80, TCP, &r);
}

pub fn ingress_and_egress_specified_together(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress, Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n  egress:\n  - ports:\n    - port: 80\n",
    ));
    let mut r80 = Reach::new();
    r80.ingress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true);
    c.validate(80, TCP, &r80);
    let mut r81 = Reach::new();
    r81.ingress(pod("x", "a"), false)
        .egress(pod("x", "a"), false)
        .pair(pod("x", "b"), pod("x", "a"), true);
    c.validate(81, TCP, &r81);
}

pub fn deny_egress_on_client_side_even_if_server_allows(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-to-ns-y-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    let from_x_a = "  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}\n      podSelector: {matchLabels: {pod: a}}\n";
    c.apply(&policy(
        "y",
        "allow-from-xa-on-ya-match-selector",
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n{from_x_a}"),
    ));
    c.apply(&policy(
        "y",
        "allow-from-xa-on-yb-match-selector",
        &format!("  podSelector: {{matchLabels: {{pod: b}}}}\n{from_x_a}"),
    ));
    let mut r = Reach::new();
    r.peer(pod("x", "a"), ANY, false)
        .peer(ANY, pod("y", "a"), false)
        .peer(pod("x", "a"), pod("y", "a"), true)
        .peer(ANY, pod("y", "b"), false);
    c.validate(80, TCP, &r);
}

pub fn egress_to_server_in_other_namespace_by_pod_and_namespace_selector(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-to-ns-y-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    let mut r = Reach::new();
    r.egress(pod("x", "a"), false)
        .pair(pod("x", "a"), pod("y", "a"), true);
    c.validate(80, TCP, &r);
}

pub fn ingress_any_port_on_a_specific_protocol(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ingress-by-proto",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - protocol: TCP\n",
    ));
    c.validate(80, TCP, &Reach::new());
    let mut udp = Reach::new();
    udp.peer(ANY, pod("x", "a"), false);
    c.validate(80, UDP, &udp);
}

pub fn multiple_ingress_policies_with_allow_all_taking_precedence(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ingress-port-80",
        "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(81, TCP, &r);
    c.apply(&policy(
        "x",
        "allow-ingress",
        "  podSelector: {}\n  ingress:\n  - {}\n",
    ));
    c.validate(81, TCP, &Reach::new());
}

pub fn multiple_egress_policies_with_allow_all_taking_precedence(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-egress-port-80",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: 80\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), ANY, false);
    c.validate(81, TCP, &r);
    c.apply(&policy(
        "x",
        "allow-egress",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - {}\n",
    ));
    c.validate(81, TCP, &Reach::new());
}

pub fn stop_enforcing_policies_after_they_are_deleted(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), ANY, false).peer(ANY, ns("x"), false);
    c.validate(80, TCP, &r);
    c.delete_policies();
    c.validate(80, TCP, &Reach::new());
}

pub fn allow_egress_to_server_in_cidr_block(c: &mut dyn Cluster) {
    let ip = c.pod_ip("y/b");
    c.apply(&policy(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: {ip}/32}}\n"
        ),
    ));
    let mut r = Reach::new();
    r.egress(pod("x", "a"), false)
        .pair(pod("x", "a"), pod("y", "b"), true);
    c.validate(80, TCP, &r);
}

/// Upstream's `makeLargeCIDRForIP`: the /4 around an IPv4 address.
pub fn large_cidr(ip: &str) -> String {
    let addr: std::net::Ipv4Addr = ip.parse().expect("IPv4");
    let masked = u32::from(addr) & 0xf000_0000;
    format!("{}/4", std::net::Ipv4Addr::from(masked))
}

pub fn except_clause_in_egress_cidr_block(c: &mut dyn Cluster) {
    let ip = c.pod_ip("x/b");
    c.apply(&policy(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: {}\n        except: [{ip}/32]\n",
            large_cidr(&ip)
        ),
    ));
    let mut r = Reach::new();
    r.pair(pod("x", "a"), pod("x", "b"), false);
    c.validate(80, TCP, &r);
}

pub fn ip_in_both_cidr_and_except_is_allowed_by_another_policy(c: &mut dyn Cluster) {
    let ip = c.pod_ip("x/b");
    c.apply(&policy(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: {}\n        except: [{ip}/32]\n",
            large_cidr(&ip)
        ),
    ));
    let mut r = Reach::new();
    r.pair(pod("x", "a"), pod("x", "b"), false);
    c.validate(80, TCP, &r);
    // Upstream updates the policy of the same name to allow only x/b's address.
    c.apply(&policy(
        "x",
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: {ip}/32}}\n"
        ),
    ));
    let mut allow = Reach::new();
    allow
        .egress(pod("x", "a"), false)
        .pair(pod("x", "a"), pod("x", "b"), true);
    c.validate(80, TCP, &allow);
}

pub fn ingress_and_egress_controlled_independently(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-egress-for-target",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - {}\n",
    ));
    c.validate(80, TCP, &Reach::new());
    c.apply(&policy(
        "x",
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn sctp_policy_is_not_treated_as_tcp(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ));
    c.apply(&policy(
        "x",
        "allow-only-sctp-ingress-on-port-81",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 81, protocol: SCTP}\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(81, TCP, &r);
}

pub fn sctp_policy_still_isolates_pods(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-only-sctp-ingress-on-port-80",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 80, protocol: SCTP}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(81, TCP, &r);
}

pub fn udp_only_policy_does_not_allow_tcp(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-only-udp-ingress-on-port-81",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 81, protocol: UDP}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false);
    c.validate(81, TCP, &r);
}

pub fn namespace_selector_match_labels_on_default_namespace_label(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-client-a-via-ns-selector-for-immutable-ns-label",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(80, TCP, &r);
}

pub fn namespace_selector_match_expressions_on_default_namespace_label(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ns-y-match-selector-for-immutable-ns-label",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}\n",
    ));
    let mut r = Reach::new();
    r.peer(pod("x", "a"), ns("y"), false);
    c.validate(80, TCP, &r);
}

/// Beyond the upstream file (its endPort cases were removed with the feature gate): a port range
/// admits every port in it and no other, for the protocol it names.
pub fn end_port_range(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-81-to-90-from-y",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, endPort: 90, protocol: TCP}\n",
    ));
    let mut allowed = Reach::new();
    allowed
        .ingress(pod("x", "a"), false)
        .peer(ns("y"), pod("x", "a"), true);
    c.validate(81, TCP, &allowed);
    let mut denied = Reach::new();
    denied.ingress(pod("x", "a"), false);
    c.validate(80, TCP, &denied);
    c.validate(81, UDP, &denied);
}

// ---------------------------------------------------------------------------------------------
// "NetworkPolicy between server and client using UDP"
// ---------------------------------------------------------------------------------------------

pub fn udp_default_deny_ingress(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ));
    let mut r = Reach::new();
    r.peer(ANY, ns("x"), false);
    c.validate(80, UDP, &r);
}

pub fn udp_ports(c: &mut dyn Cluster) {
    c.apply(&policy(
        "x",
        "allow-ingress-on-port-81-ns-x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: UDP}\n",
    ));
    let mut r = Reach::new();
    r.peer(ns("x"), pod("x", "a"), false)
        .peer(ns("z"), pod("x", "a"), false);
    c.validate(81, UDP, &r);
}

pub fn udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector(
    c: &mut dyn Cluster,
) {
    c.apply(&policy(
        "x",
        "allow-ns-y-pod-a-via-namespace-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    let mut r = Reach::new();
    r.ingress(pod("x", "a"), false)
        .pair(pod("y", "a"), pod("x", "a"), true);
    c.validate(80, UDP, &r);
}

// "NetworkPolicy between server and client using SCTP" (3 cases): not ported, this kernel has no
// SCTP to probe with (see the module comment).
