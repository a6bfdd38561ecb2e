//! The upstream Kubernetes NetworkPolicy truth-table cases (kubernetes/kubernetes
//! test/e2e/network/netpol/network_policy.go) as data: each case is a row of steps run over a
//! [`Cluster`] (apply policies, change labels, assert a truth table; a function for the few that
//! compute from the pods' addresses), so that the same cases run
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
    pub run: Run,
}

/// What a case does: most are a list of steps; those that compute from the pods' addresses
/// are code.
pub enum Run {
    Steps(&'static [Step]),
    Code(fn(&mut dyn Cluster)),
}

/// One step of a case.
pub enum Step {
    /// Applies a NetworkPolicy: namespace, name, and the YAML under `spec:` (see [`policy`]).
    Apply(&'static str, &'static str, &'static str),
    /// Upstream `AddPodLabels`: namespace, pod, labels.
    AddPodLabels(
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    ),
    /// Upstream `AddNamespaceLabel`: namespace, key, value.
    AddNamespaceLabel(&'static str, &'static str, &'static str),
    DeletePolicies,
    /// Upstream `ValidateOrFail` on a port and protocol: everything reaches everything but for
    /// these (from, to, allowed), later ones winning (see [`Reach::peer`]).
    Validate(u16, Proto, &'static [(Peer, Peer, bool)]),
}

impl NetpolCase {
    pub fn run(&self, c: &mut dyn Cluster) {
        let steps = match self.run {
            Run::Code(f) => return f(c),
            Run::Steps(steps) => steps,
        };
        for step in steps {
            match *step {
                Step::Apply(ns, name, spec) => c.apply(&policy(ns, name, spec)),
                Step::AddPodLabels(ns, pod, labels) => c.add_pod_labels(ns, pod, labels),
                Step::AddNamespaceLabel(ns, key, value) => c.add_namespace_label(ns, key, value),
                Step::DeletePolicies => c.delete_policies(),
                Step::Validate(port, proto, changes) => {
                    let mut reach = Reach::new();
                    for &(from, to, allowed) in changes {
                        reach.peer(from, to, allowed);
                    }
                    c.validate(port, proto, &reach);
                }
            }
        }
    }
}

use Run::{Code, Steps};
use Step::{AddNamespaceLabel, AddPodLabels, Apply, DeletePolicies, Validate};

/// Every case, in upstream's order. (One line a step: a table, left as written by rustfmt.)
#[rustfmt::skip]
pub const CASES: &[NetpolCase] = &[
    NetpolCase {
        name: "default_deny_ingress",
        upstream: "should support a 'default-deny-ingress' policy",
        run: Steps(&[
            Apply("x", "deny-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            Validate(80, TCP, &[(ANY, ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "default_deny_all",
        upstream: "should support a 'default-deny-all' policy",
        run: Steps(&[
            Apply("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
            Validate(80, TCP, &[(ANY, ns("x"), false), (ns("x"), ANY, false)]),
        ]),
    },
    NetpolCase {
        name: "allow_from_pods_within_namespace_by_pod_selector",
        upstream: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        run: Steps(&[
            Apply("x", "x-a-allows-x-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "b"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_for_a_target",
        upstream: "should enforce policy to allow ingress traffic for a target",
        run: Steps(&[
            Apply("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            Apply("x", "allow-all-to-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {}\n      namespaceSelector: {}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), true), (ANY, pod("x", "b"), false), (ANY, pod("x", "c"), false)]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_from_pods_in_all_namespaces",
        upstream: "should enforce policy to allow ingress traffic from pods in all namespaces",
        run: Steps(&[
            Apply("x", "allow-from-another-ns", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {}}\n"),
            Validate(80, TCP, &[]),
        ]),
    },
    NetpolCase {
        name: "allow_only_from_other_namespace_by_namespace_selector",
        upstream: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "pod_selector_with_match_expressions",
        upstream: "should enforce policy based on PodSelector with MatchExpressions",
        run: Steps(&[
            Apply("x", "x-a-allows-x-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [b]}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "b"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "namespace_selector_with_match_expressions",
        upstream: "should enforce policy based on NamespaceSelector with MatchExpressions",
        run: Steps(&[
            Apply("x", "allow-ns-y-match-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: In, values: [y]}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "pod_selector_or_namespace_selector",
        upstream: "should enforce policy based on PodSelector or NamespaceSelector",
        run: Steps(&[
            Apply("x", "allow-ns-y-match-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n    - podSelector: {matchLabels: {pod: b}}\n"),
            Validate(80, TCP, &[(pod("x", "a"), pod("x", "a"), false), (pod("x", "c"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "pod_selector_and_namespace_selector",
        upstream: "should enforce policy based on PodSelector and NamespaceSelector",
        run: Steps(&[
            Apply("x", "allow-ns-y-podselector-and-nsselector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n      podSelector: {matchLabels: {pod: b}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("y", "b"), pod("x", "a"), true), (pod("z", "b"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "multiple_pod_selectors_and_namespace_selectors",
        upstream: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        run: Steps(&[
            Apply("x", "allow-ns-y-z-pod-b-c", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}\n      podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [b, c]}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (pod("y", "a"), pod("x", "a"), false), (pod("z", "a"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "any_pod_selectors",
        upstream: "should enforce policy based on any PodSelectors",
        run: Steps(&[
            Apply("x", "allow-ns-x-pod-b-c", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n    - podSelector: {matchLabels: {pod: c}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "b"), pod("x", "a"), true), (pod("x", "c"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        run: Steps(&[
            Apply("x", "allow-ns-y-pod-a-via-namespace-pod-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("y", "a"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "ports",
        upstream: "should enforce policy based on Ports",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector", ALLOW_Y_TO_X_A_81_TCP),
            Validate(81, TCP, &[(ns("x"), pod("x", "a"), false), (ns("y"), pod("x", "a"), true), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "multiple_stacked_policies_with_overlapping_pod_selectors",
        upstream: "should enforce multiple, stacked policies with overlapping podSelectors",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector", ALLOW_Y_TO_X_A_81_TCP),
            Validate(81, TCP, &[(ns("x"), pod("x", "a"), false), (ns("y"), pod("x", "a"), true), (ns("z"), pod("x", "a"), false)]),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
            Apply("x", "allow-client-a-via-ns-selector-80", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 80, protocol: TCP}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (ns("y"), pod("x", "a"), true), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "allow_all_policy",
        upstream: "should support allow-all policy",
        run: Steps(&[
            Apply("x", "allow-all", "  podSelector: {}\n  ingress:\n  - {}\n"),
            Validate(80, TCP, &[]),
            Validate(81, TCP, &[]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_on_one_named_port",
        upstream: "should allow ingress access on one named port",
        run: Steps(&[
            Apply("x", "allow-all", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n"),
            Validate(81, TCP, &[]),
            Validate(80, TCP, &[(ANY, ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_from_namespace_on_one_named_port",
        upstream: "should allow ingress access from namespace on one named port",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector-80", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: serve-80-tcp, protocol: TCP}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (ns("z"), pod("x", "a"), false)]),
            Validate(81, TCP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "allow_egress_on_one_named_port",
        upstream: "should allow egress access on one named port",
        run: Steps(&[
            Apply("x", "allow-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-80-tcp\n"),
            Validate(80, TCP, &[]),
            Validate(81, TCP, &[(ns("x"), ANY, false)]),
        ]),
    },
    NetpolCase {
        name: "enforce_updated_policy",
        upstream: "should enforce updated policy",
        run: Steps(&[
            Apply("x", "allow-all-mutate-to-deny-all", "  podSelector: {}\n  ingress:\n  - {}\n"),
            Validate(81, TCP, &[]),
            // The same policy, updated in place to `ingress: []`.
            Apply("x", "allow-all-mutate-to-deny-all", "  podSelector: {}\n  ingress: []\n"),
            Validate(81, TCP, &[(ANY, ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_from_updated_namespace",
        upstream: "should allow ingress access from updated namespace",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns2: updated}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
            AddNamespaceLabel("y", "ns2", "updated"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (ns("y"), ANY, true)]),
        ]),
    },
    NetpolCase {
        name: "allow_ingress_from_updated_pod",
        upstream: "should allow ingress access from updated pod",
        run: Steps(&[
            Apply("x", "allow-client-a-via-pod-selector", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b, pod2: updated}}\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
            AddPodLabels("x", "b", &[("pod", "b"), ("pod2", "updated")]),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "b"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "deny_ingress_from_pods_on_other_namespaces",
        upstream: "should deny ingress from pods on other namespaces",
        run: Steps(&[
            Apply("x", "deny-empty-policy", "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {}}\n"),
            Validate(80, TCP, &[(ns("y"), ns("x"), false), (ns("z"), ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "deny_ingress_access_to_updated_pod",
        upstream: "should deny ingress access to updated pod",
        run: Steps(&[
            Apply("x", "deny-ingress-via-label-selector", "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n"),
            Validate(80, TCP, &[]),
            AddPodLabels("x", "a", &[("target", "isolated")]),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "deny_egress_from_pods_by_pod_selector",
        upstream: "should deny egress from pods based on PodSelector",
        run: Steps(&[
            Apply("x", "deny-egress-pod-a", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n"),
            Validate(80, TCP, &[(pod("x", "a"), ANY, false)]),
        ]),
    },
    NetpolCase {
        name: "deny_egress_from_all_pods_in_a_namespace",
        upstream: "should deny egress from all pods in a namespace",
        run: Steps(&[
            Apply("x", "deny-egress-ns-x", "  podSelector: {}\n  policyTypes: [Egress]\n"),
            Validate(80, TCP, &[(ns("x"), ANY, false)]),
        ]),
    },
    NetpolCase {
        name: "ingress_and_egress_specified_together",
        upstream: "should work with Ingress, Egress specified together",
        run: Steps(&[
            Apply("x", "allow-client-a-via-pod-selector", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress, Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n  egress:\n  - ports:\n    - port: 80\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "b"), pod("x", "a"), true)]),
            Validate(81, TCP, &[(ANY, pod("x", "a"), false), (pod("x", "a"), ANY, false), (pod("x", "b"), pod("x", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "deny_egress_on_client_side_even_if_server_allows",
        upstream: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        run: Code(deny_egress_on_client_side_even_if_server_allows),
    },
    NetpolCase {
        name: "egress_to_server_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        run: Steps(&[
            Apply("x", "allow-to-ns-y-pod-a", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n"),
            Validate(80, TCP, &[(pod("x", "a"), ANY, false), (pod("x", "a"), pod("y", "a"), true)]),
        ]),
    },
    NetpolCase {
        name: "ingress_any_port_on_a_specific_protocol",
        upstream: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        run: Steps(&[
            Apply("x", "allow-ingress-by-proto", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - protocol: TCP\n"),
            Validate(80, TCP, &[]),
            Validate(80, UDP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "multiple_ingress_policies_with_allow_all_taking_precedence",
        upstream: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        run: Steps(&[
            Apply("x", "allow-ingress-port-80", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n"),
            Validate(81, TCP, &[(ANY, ns("x"), false)]),
            Apply("x", "allow-ingress", "  podSelector: {}\n  ingress:\n  - {}\n"),
            Validate(81, TCP, &[]),
        ]),
    },
    NetpolCase {
        name: "multiple_egress_policies_with_allow_all_taking_precedence",
        upstream: "should enforce multiple egress policies with egress allow-all policy taking precedence",
        run: Steps(&[
            Apply("x", "allow-egress-port-80", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: 80\n"),
            Validate(81, TCP, &[(ns("x"), ANY, false)]),
            Apply("x", "allow-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - {}\n"),
            Validate(81, TCP, &[]),
        ]),
    },
    NetpolCase {
        name: "stop_enforcing_policies_after_they_are_deleted",
        upstream: "should stop enforcing policies after they are deleted",
        run: Steps(&[
            Apply("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
            Validate(80, TCP, &[(ns("x"), ANY, false), (ANY, ns("x"), false)]),
            DeletePolicies,
            Validate(80, TCP, &[]),
        ]),
    },
    NetpolCase {
        name: "allow_egress_to_server_in_cidr_block",
        upstream: "should allow egress access to server in CIDR block",
        run: Code(allow_egress_to_server_in_cidr_block),
    },
    NetpolCase {
        name: "except_clause_in_egress_cidr_block",
        upstream: "should enforce except clause while egress access to server in CIDR block",
        run: Code(except_clause_in_egress_cidr_block),
    },
    NetpolCase {
        name: "ip_in_both_cidr_and_except_is_allowed_by_another_policy",
        upstream: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        run: Code(ip_in_both_cidr_and_except_is_allowed_by_another_policy),
    },
    NetpolCase {
        name: "ingress_and_egress_controlled_independently",
        upstream: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        run: Steps(&[
            Apply("x", "allow-egress-for-target", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - {}\n"),
            Validate(80, TCP, &[]),
            Apply("x", "deny-ingress-via-label-selector", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n"),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "sctp_policy_is_not_treated_as_tcp",
        upstream: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        run: Steps(&[
            Apply("x", "deny-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            Apply("x", "allow-only-sctp-ingress-on-port-81", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 81, protocol: SCTP}\n"),
            Validate(81, TCP, &[(ANY, ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "sctp_policy_still_isolates_pods",
        upstream: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        run: Steps(&[
            Apply("x", "allow-only-sctp-ingress-on-port-80", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 80, protocol: SCTP}\n"),
            Validate(81, TCP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "udp_only_policy_does_not_allow_tcp",
        upstream: "should not allow access by TCP when a policy specifies only UDP",
        run: Steps(&[
            Apply("x", "allow-only-udp-ingress-on-port-81", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 81, protocol: UDP}\n"),
            Validate(81, TCP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "namespace_selector_match_labels_on_default_namespace_label",
        upstream: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        run: Steps(&[
            Apply("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n"),
            Validate(80, TCP, &[(ns("x"), pod("x", "a"), false), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "namespace_selector_match_expressions_on_default_namespace_label",
        upstream: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        run: Steps(&[
            Apply("x", "allow-ns-y-match-selector-for-immutable-ns-label", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}\n"),
            Validate(80, TCP, &[(pod("x", "a"), ns("y"), false)]),
        ]),
    },
    NetpolCase {
        name: "end_port_range",
        upstream: "beyond upstream: endPort ranges",
        // Upstream's endPort cases were removed with the feature gate: a port range admits
        // every port in it and no other, for the protocol it names.
        run: Steps(&[
            Apply("x", "allow-81-to-90-from-y", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, endPort: 90, protocol: TCP}\n"),
            Validate(81, TCP, &[(ANY, pod("x", "a"), false), (ns("y"), pod("x", "a"), true)]),
            Validate(80, TCP, &[(ANY, pod("x", "a"), false)]),
            Validate(81, UDP, &[(ANY, pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "udp_default_deny_ingress",
        upstream: "UDP: should support a 'default-deny-ingress' policy",
        run: Steps(&[
            Apply("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            Validate(80, UDP, &[(ANY, ns("x"), false)]),
        ]),
    },
    NetpolCase {
        name: "udp_ports",
        upstream: "UDP: should enforce policy based on Ports",
        run: Steps(&[
            Apply("x", "allow-ingress-on-port-81-ns-x", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: UDP}\n"),
            Validate(81, UDP, &[(ns("x"), pod("x", "a"), false), (ns("z"), pod("x", "a"), false)]),
        ]),
    },
    NetpolCase {
        name: "udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector",
        upstream: "UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        run: Code(udp_allow_only_from_pod_in_other_namespace_by_pod_and_namespace_selector),
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

pub const fn ns(ns: &'static str) -> Peer {
    Peer {
        ns: Some(ns),
        pod: None,
    }
}

pub const fn pod(ns: &'static str, pod: &'static str) -> Peer {
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
// Cases of "NetworkPolicy between server and client" that compute from the pods' addresses (the
// others are rows of CASES)
// ---------------------------------------------------------------------------------------------

const ALLOW_Y_TO_X_A_81_TCP: &str = "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: TCP}\n";

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

// ---------------------------------------------------------------------------------------------
// "NetworkPolicy between server and client using UDP"
// ---------------------------------------------------------------------------------------------

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
