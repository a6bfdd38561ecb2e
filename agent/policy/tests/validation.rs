//! Rejections: each names the policy, the field path and what to do; a rejected policy is
//! dropped whole and the others keep being enforced.

mod common;

use common::{compile_local, state_from_yaml};
use weir_policy::model::ObjectKey;

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default, labels: {app: a}}\nspec: {nodeName: n1}\n---\n";

fn rejections(spec: &str) -> Vec<(String, String)> {
    let text = format!(
        "{POD}apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: default}}\nspec:\n{spec}\n"
    );
    let state = state_from_yaml(&text);
    let c = compile_local(&state, &[("default", "a", &["10.0.0.1"])]);
    for r in &c.rejections {
        assert_eq!(r.policy, ObjectKey::new("default", "bad"));
    }
    if !c.rejections.is_empty() {
        // Dropped whole: the subject is not isolated by it.
        let s = c.subjects.values().next().expect("subject");
        assert!(!s.isolated_ingress && !s.isolated_egress);
    }
    c.rejections
        .into_iter()
        .map(|r| (r.field, r.reason))
        .collect()
}

fn rejected_at(spec: &str, field: &str, reason_has: &str) {
    let r = rejections(spec);
    assert!(
        r.iter()
            .any(|(f, why)| f == field && why.contains(reason_has)),
        "expected a rejection at {field} ({reason_has}), got {r:?}"
    );
}

#[test]
fn bad_cidrs_and_excepts() {
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.0/33}}]}]",
        "spec.ingress[0].from[1].ipBlock.cidr",
        "not a CIDR",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/16, 11.0.0.0/16]}}]}]",
        "spec.ingress[0].from[0].ipBlock.except[1]",
        "not strictly inside",
    );
    rejected_at(
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]}]",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "same address family",
    );
    rejected_at(
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: '::ffff:10.0.0.0/104'}}]}]",
        "spec.egress[0].to[0].ipBlock.cidr",
        "IPv4 form",
    );
    // Host bits are accepted and masked, as the API server's CIDR parsing does.
    assert!(
        rejections("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/8}}]}]")
            .is_empty()
    );
}

#[test]
fn bad_ports() {
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]",
        "spec.ingress[0].ports[0].endPort",
        "must be >= port",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: http, endPort: 80}]}]",
        "spec.ingress[0].ports[0].endPort",
        "named port",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{endPort: 80}]}]",
        "spec.ingress[0].ports[0].endPort",
        "numeric port",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: ICMP}]}]",
        "spec.ingress[0].ports[0].protocol",
        "TCP, UDP or SCTP",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: tcp}]}]",
        "spec.ingress[0].ports[0].protocol",
        "uppercase",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{}, {ports: [{port: 70000}]}]",
        "spec.ingress[1].ports[0].port",
        "out of range",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]",
        "spec.ingress[0].ports[0].port",
        "out of range",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{ports: [{port: 'Not_A_Name'}]}]",
        "spec.ingress[0].ports[0].port",
        "not a valid port name",
    );
    // SCTP is enforced like any protocol number: accepted.
    assert!(
        rejections("  podSelector: {}\n  ingress: [{ports: [{port: 80, protocol: SCTP}]}]")
            .is_empty()
    );
}

#[test]
fn bad_selectors_and_peers() {
    rejected_at(
        "  podSelector: {matchExpressions: [{key: app, operator: In}]}",
        "spec.podSelector.matchExpressions[0].values",
        "at least one value",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]}]",
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "takes no values",
    );
    rejected_at(
        "  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}",
        "spec.podSelector.matchExpressions[0].operator",
        "unknown operator",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
        "spec.ingress[0].from[0]",
        "not both",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{}]}]",
        "spec.ingress[0].from[0]",
        "needs podSelector",
    );
    rejected_at(
        "  podSelector: {}\n  policyTypes: [Ingress, Sideways]",
        "spec.policyTypes[1]",
        "Ingress or Egress",
    );
    rejected_at(
        "  podSelector: {}\n  egress: [{to: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: http}]}]",
        "spec.egress[0].to[1].ipBlock",
        "named port",
    );
}

#[test]
fn a_rejected_policy_does_not_disturb_the_others() {
    let state = state_from_yaml(&format!(
        "{POD}apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: default}}\nspec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 0}}]}}]}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: good, namespace: default}}\nspec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 80}}]}}]}}\n"
    ));
    let c = compile_local(&state, &[("default", "a", &["10.0.0.1"])]);
    assert_eq!(c.rejections.len(), 1);
    let s = c.subjects.values().next().unwrap();
    assert!(s.isolated_ingress);
    assert_eq!(
        s.selected_by_ingress.iter().cloned().collect::<Vec<_>>(),
        vec![ObjectKey::new("default", "good")]
    );
    // The good policy's one rule, and the built-in allowance for the node itself.
    assert_eq!(s.rules.len(), 2);
    assert!(
        s.rules
            .values()
            .any(|id| *id == weir_common::RULE_FROM_HOST)
    );
}
