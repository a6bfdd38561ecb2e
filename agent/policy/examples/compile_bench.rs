//! Compile timings on synthetic clusters. Run in release:
//! `cargo run --release -p weir-policy --example compile_bench`
//!
//! Prints one line per scenario; it asserts nothing (benchmarks are not tests).

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use serde_json::json;
use weir_policy::{
    CompileInput, IdentityAllocator,
    model::{ClusterState, Namespace, NetworkPolicy, ObjectKey, Pod},
};

/// `distinct`: every policy gets its own ipBlock (10k CIDR prefixes at 10k policies) and no two
/// policies share a rule.
fn cluster(pods: usize, policies: usize, namespaces: usize, distinct: bool) -> CompileInput {
    let mut state = ClusterState::default();
    let mut local_endpoints = BTreeMap::new();
    for n in 0..namespaces {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("ns{n}"),
                "labels": {"team": format!("t{}", n % 7)}}}))
            .expect("namespace");
        state.apply(namespace.into());
    }
    for i in 0..pods {
        let ns = format!("ns{}", i % namespaces);
        let node = if i % 10 == 0 { "n1" } else { "n2" };
        let addr: IpAddr = format!("10.{}.{}.{}", i / 62500, (i / 250) % 250, i % 250 + 1)
            .parse()
            .expect("addr");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p{i}"), "namespace": ns,
                "labels": {"app": format!("app{}", i % 40), "tier": format!("tier{}", i % 3)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080 + (i % 3) as i64}]}]},
            "status": {"podIPs": [{"ip": addr.to_string()}]}
        }))
        .expect("pod");
        if node == "n1" {
            local_endpoints.insert(ObjectKey::new(&ns, format!("p{i}")), vec![addr]);
        }
        state.apply(pod.into());
    }
    for j in 0..policies {
        let ns = format!("ns{}", j % namespaces);
        let (cidr, except) = if distinct {
            (
                format!("172.{}.{}.0/24", 16 + j / 250 % 200, j % 250),
                format!("172.{}.{}.128/25", 16 + j / 250 % 200, j % 250),
            )
        } else {
            (
                format!("172.{}.0.0/16", j % 200),
                format!("172.{}.1.0/24", j % 200),
            )
        };
        let p: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("pol{j}"), "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("app{}", j % 40)}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", (j + 1) % 40)}}},
                              {"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 7)}},
                               "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["tier1", "tier2"]}]}}],
                     "ports": [{"port": 80}, {"port": "http"}, {"port": 30000, "endPort": 32767, "protocol": "UDP"}]},
                    {"from": [{"ipBlock": {"cidr": cidr, "except": [except]}}]}
                ],
                "egress": [
                    {"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]},
                    {"to": [{"podSelector": {"matchLabels": {"app": format!("app{}", (j + 2) % 40)}}}],
                     "ports": [{"port": "http"}]}
                ]
            }
        }))
        .expect("policy");
        state.apply(p.into());
    }
    CompileInput {
        state,
        node_name: "n1".into(),
        cluster_id: 0,
        local_endpoints,
    }
}

fn main() {
    for (pods, policies, namespaces, distinct) in [
        (1_000, 1_000, 50, false),
        (1_000, 10_000, 50, false),
        (5_000, 10_000, 100, false),
        (1_000, 1_000, 50, true),
        (1_000, 10_000, 50, true),
    ] {
        let input = cluster(pods, policies, namespaces, distinct);
        let mut alloc = IdentityAllocator::new();
        let t = Instant::now();
        let out = weir_policy::compile(&input, &mut alloc).expect("compile");
        let first = t.elapsed();
        let t = Instant::now();
        let again = weir_policy::compile(&input, &mut alloc).expect("compile");
        let second = t.elapsed();
        assert_eq!(out, again, "compile is deterministic with a warm allocator");
        let entries: usize = out.subjects.values().map(|s| s.rules.len()).sum();
        println!(
            "{pods} pods, {policies} policies, {namespaces} namespaces, distinct rules {distinct}: first compile {first:?}, \
             recompile {second:?}; {} subjects, {entries} policy entries, {} ipcache, {} cidr prefixes, {} rejections",
            out.subjects.len(),
            out.ipcache.len(),
            out.cidr_identities.len(),
            out.rejections.len()
        );
    }
}
