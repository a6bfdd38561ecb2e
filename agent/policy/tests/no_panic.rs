//! Nothing panics on any input: random text, random JSON-ish documents, and valid policies with
//! random fields swapped for random values go through parse, validate and compile.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};
use weir_policy::{
    CompileInput, IdentityAllocator,
    model::{ClusterState, ObjectKey, parse_documents},
};

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "spec",
    "status",
    "items",
    "podSelector",
    "namespaceSelector",
    "policyTypes",
    "ingress",
    "egress",
    "from",
    "to",
    "ipBlock",
    "cidr",
    "except",
    "ports",
    "port",
    "endPort",
    "protocol",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "nodeName",
    "hostNetwork",
    "containers",
    "containerPort",
    "podIPs",
    "ip",
    "addresses",
    "type",
    "address",
    "podCIDRs",
];

const STRINGS: &[&str] = &[
    "v1",
    "networking.k8s.io/v1",
    "NetworkPolicy",
    "Pod",
    "Namespace",
    "Node",
    "List",
    "Ingress",
    "Egress",
    "TCP",
    "UDP",
    "SCTP",
    "ICMP",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "http",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "0.0.0.0/0",
    "::/0",
    "fd00::/64",
    "::ffff:0:0/96",
    "10.0.0.1",
    "fd00::1",
    "not-an-ip",
    "",
    "a",
    "InternalIP",
    "n1",
    "default",
    "-1",
    "80",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-2i64..70000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(STRINGS).prop_map(|s| json!(s)),
        ".{0,12}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn template() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "p", "namespace": "default"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "a"},
            "matchExpressions": [{"key": "x", "operator": "In", "values": ["y"]}]},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {"matchLabels": {"a": "b"}}},
                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                     "ports": [{"protocol": "TCP", "port": 80, "endPort": 90}, {"port": "http"}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "::/0", "except": ["fd00::/64"]}}],
                    "ports": [{"protocol": "UDP", "port": 53}]}]
    }})
}

/// Replaces the `n`-th node (pre-order) of `v` with `with`.
fn replace_nth(v: &mut Value, n: &mut usize, with: &Value) -> bool {
    if *n == 0 {
        *v = with.clone();
        return true;
    }
    *n -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| replace_nth(x, n, with)),
        Value::Object(o) => o.values_mut().any(|x| replace_nth(x, n, with)),
        _ => false,
    }
}

fn run(text: &str) {
    let mut state = ClusterState::default();
    for o in parse_documents(text, "fuzz").into_iter().flatten() {
        state.apply(o);
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "namespace": "default", "labels": {"app": "a"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]}});
    for o in parse_documents(&pod.to_string(), "pod")
        .into_iter()
        .flatten()
    {
        state.apply(o);
    }
    let local: BTreeMap<ObjectKey, Vec<std::net::IpAddr>> = [(
        ObjectKey::new("default", "a"),
        vec!["10.0.0.1".parse().unwrap()],
    )]
    .into();
    let input = CompileInput {
        state,
        node_name: "n1".into(),
        cluster_id: 0,
        local_endpoints: local,
    };
    let _ = weir_policy::compile(&input, &mut IdentityAllocator::new());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in ".{0,200}") {
        run(&text);
    }

    #[test]
    fn random_json_never_panics(v in value()) {
        run(&v.to_string());
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [v]});
        run(&list.to_string());
    }

    #[test]
    fn mutated_policies_never_panic(muts in prop::collection::vec((0usize..60, value()), 1..4)) {
        let mut v = template();
        for (mut n, with) in muts {
            replace_nth(&mut v, &mut n, &with);
        }
        run(&v.to_string());
        // And as YAML.
        if let Ok(y) = yaml_serde::to_string(&v) {
            run(&y);
        }
    }
}
