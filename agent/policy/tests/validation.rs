//! Rejections: each names the policy, the field path and what to do; a rejected policy allows
//! nothing but keeps isolating the pods it selects (fail closed), and the others keep being
//! enforced. Policies the API server accepts are never rejected.

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
        // Fail closed: the subject is still isolated by it, and nothing is allowed but the
        // node's own built-in allowance.
        let s = c.subjects.values().next().expect("subject");
        assert!(
            s.selected_by_ingress
                .contains(&ObjectKey::new("default", "bad"))
                || s.selected_by_egress
                    .contains(&ObjectKey::new("default", "bad"))
        );
        assert!(
            s.rules
                .values()
                .all(|id| *id == weir_common::RULE_FROM_HOST)
        );
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
    // As the API server parses CIDRs: IPv4-mapped IPv6 prefixes and leading zeros are accepted.
    assert!(
        rejections(
            "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: '::ffff:10.0.0.0/104', except: ['::ffff:10.1.0.0/112']}}, {ipBlock: {cidr: 010.0.0.0/8, except: [10.1.0.0/16]}}]}]"
        )
        .is_empty()
    );
    // The except must be strictly inside as written (the API server compares the lengths).
    rejected_at(
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: '::ffff:10.0.0.0/104', except: [10.1.0.0/16]}}]}]",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "not strictly inside",
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
    // A named port with an ipBlock peer is valid (and enforced exactly, see semantics.rs).
    assert!(
        rejections(
            "  podSelector: {}\n  egress: [{to: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: http}]}]"
        )
        .is_empty()
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
        vec![
            ObjectKey::new("default", "bad"),
            ObjectKey::new("default", "good")
        ]
    );
    // The good policy's one rule, and the built-in allowance for the node itself.
    assert_eq!(s.rules.len(), 2);
    assert!(
        s.rules
            .values()
            .any(|id| *id == weir_common::RULE_FROM_HOST)
    );
}

#[test]
fn names_labels_and_selector_syntax() {
    let text = format!(
        "{POD}apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: UPPER_case!, namespace: default}}\nspec: {{podSelector: {{}}, ingress: [{{}}]}}\n"
    );
    let c = compile_local(&state_from_yaml(&text), &[("default", "a", &["10.0.0.1"])]);
    assert_eq!(c.rejections.len(), 1, "{:?}", c.rejections);
    let r = &c.rejections[0];
    assert_eq!(r.policy, ObjectKey::new("default", "UPPER_case!"));
    assert_eq!(r.field, "metadata.name");
    assert!(r.reason.contains("DNS-1123 subdomain"), "{}", r.reason);
    // The allow-all rule of the rejected policy allows nothing: the pod is isolated.
    let s = c.subjects.values().next().unwrap();
    assert!(s.isolated_ingress);
    assert!(
        s.rules
            .values()
            .all(|id| *id == weir_common::RULE_FROM_HOST)
    );

    // A name of 100,000 characters: rejected, and cut in the key so logs and Events stay small.
    let text = format!(
        "{POD}apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}, namespace: default}}\nspec: {{podSelector: {{}}}}\n",
        "n".repeat(100_000)
    );
    let c = compile_local(&state_from_yaml(&text), &[("default", "a", &["10.0.0.1"])]);
    assert_eq!(c.rejections.len(), 1, "{:?}", c.rejections);
    assert!(c.rejections[0].policy.name.len() < 200);
    assert!(c.rejections[0].policy.name.contains("(100000 bytes)"));

    rejected_at(
        "  podSelector: {matchLabels: {'bad key!': a}}",
        "spec.podSelector.matchLabels",
        "not a valid label",
    );
    rejected_at(
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: ['has space']}]}}]}]",
        "spec.ingress[0].from[0].podSelector.matchExpressions[0].values[0]",
        "label value",
    );
    rejected_at(
        "  podSelector: {matchExpressions: [{key: 'Example.com/app', operator: Exists}]}",
        "spec.podSelector.matchExpressions[0].key",
        "prefix",
    );
    let long = "v".repeat(64);
    rejected_at(
        &format!("  podSelector: {{matchLabels: {{app: {long}}}}}"),
        "spec.podSelector.matchLabels",
        "at most 63",
    );
}

/// What a rejected policy keeps: the directions it declares, and its selector when valid.
fn isolation(metadata_and_spec: &str) -> (Vec<(String, bool, bool)>, usize) {
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default, labels: {app: a}}\nspec: {nodeName: n1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: default, labels: {app: b}}\nspec: {nodeName: n1}\n---\n";
    let text = format!("{pods}{metadata_and_spec}");
    let mut state = weir_policy::model::ClusterState::default();
    for o in weir_policy::model::parse_documents(&text, "t.yaml") {
        state.apply(o.expect("a policy of any shape still parses"));
    }
    let c = compile_local(
        &state,
        &[
            ("default", "a", &["10.0.0.1"]),
            ("default", "b", &["10.0.0.2"]),
        ],
    );
    let mut out = Vec::new();
    for (addr, (key, id)) in &c.local_addresses {
        let s = &c.subjects[id];
        assert!(
            s.rules
                .values()
                .all(|id| *id == weir_common::RULE_FROM_HOST)
        );
        let _ = addr;
        out.push((key.name.clone(), s.isolated_ingress, s.isolated_egress));
    }
    (out, c.rejections.len())
}

#[test]
fn a_rejected_policy_fails_closed() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";
    let row = |n: &str, i: bool, e: bool| (n.to_owned(), i, e);
    // A bad rule: its podSelector and declared direction stay.
    let (iso, n) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, policyTypes: [Egress], egress: [{{ports: [{{port: 0}}]}}]}}\n"
    ));
    assert_eq!(n, 1);
    assert_eq!(iso, vec![row("a", false, true), row("b", false, false)]);
    // Defaulted policyTypes: Ingress, plus Egress when there are egress rules.
    let (iso, _) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, egress: [{{to: [{{ipBlock: {{cidr: nonsense}}}}]}}]}}\n"
    ));
    assert_eq!(iso, vec![row("a", true, true), row("b", false, false)]);
    // An invalid podSelector: every pod of the namespace.
    let (iso, _) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchExpressions: [{{key: app, operator: Near}}]}}, policyTypes: [Ingress]}}\n"
    ));
    assert_eq!(iso, vec![row("a", true, false), row("b", true, false)]);
    // Unknown policyTypes: both directions.
    let (iso, _) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Ingress, Sideways]}}\n"
    ));
    assert_eq!(iso, vec![row("a", false, false), row("b", true, true)]);
    // A field of the wrong shape: what can be read is kept.
    let (iso, n) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Egress], egress: [{{ports: 7}}]}}\n"
    ));
    assert_eq!(n, 1);
    assert_eq!(iso, vec![row("a", false, false), row("b", false, true)]);
    // Unreadable podSelector and policyTypes: every pod, both directions.
    let (iso, _) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: [1], policyTypes: Ingress, ingress: [{{}}]}}\n"
    ));
    assert_eq!(iso, vec![row("a", true, true), row("b", true, true)]);
    // An apiVersion the API server does not serve, and a missing name.
    let (iso, n) = isolation(
        "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {namespace: default}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{}]}\n",
    );
    assert_eq!(n, 2);
    assert_eq!(iso, vec![row("a", true, false), row("b", false, false)]);
    // Too large: the selector is kept, nothing else.
    let big: String = (0..60_000)
        .map(|i| format!("{{port: {}}},", 1 + i % 60000))
        .collect();
    let (iso, n) = isolation(&format!(
        "{np}metadata: {{name: p}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, ingress: [{{ports: [{big}]}}, {{}}]}}\n"
    ));
    assert_eq!(n, 1);
    assert_eq!(iso, vec![row("a", true, false), row("b", false, false)]);
}
