//! NetworkPolicy semantics, case by case (most from the upstream NetworkPolicy docs), checked
//! through the datapath-style reference lookup.

mod common;

use common::{compile_local, datapath_allows, ip, state_from_yaml};
use weir_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_CLUSTER_SHIFT, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD,
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, PROTO_ICMP, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};
use weir_policy::{
    CompileInput, IdentityAllocator,
    model::{ClusterState, Object, ObjectKey, ObjectRef},
    output::Compiled,
};

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

fn ns(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )
}

fn pod(ns: &str, name: &str, labels: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}\nstatus: {{podIPs: [{{ip: '{ip}'}}]}}\n---\n"
    )
}

/// `allow(c, dir, local addr, peer addr, proto, port)`.
fn allow(c: &Compiled, dir: u8, local: &str, peer: &str, proto: u8, port: u16) -> bool {
    datapath_allows(c, dir, ip(local), ip(peer), proto, port).expect("local endpoint")
}

/// The docs' `test-network-policy` example.
#[test]
fn upstream_example_policy() {
    let text = format!(
        "{}{}{}{}{}{}{NP}metadata: {{name: test-network-policy, namespace: default}}
spec:
  podSelector: {{matchLabels: {{role: db}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {{cidr: 172.17.0.0/16, except: [172.17.1.0/24]}}
    - namespaceSelector: {{matchLabels: {{project: myproject}}}}
    - podSelector: {{matchLabels: {{role: frontend}}}}
    ports: [{{protocol: TCP, port: 6379}}]
  egress:
  - to: [{{ipBlock: {{cidr: 10.0.0.0/24}}}}]
    ports: [{{protocol: TCP, port: 5978}}]
",
        ns("default", ""),
        ns("mine", "project: myproject"),
        pod("default", "db", "role: db", "n1", "10.1.0.1"),
        pod("default", "fe", "role: frontend", "n2", "10.1.0.2"),
        pod("mine", "any", "x: y", "n2", "10.1.0.3"),
        pod("default", "other", "role: other", "n2", "10.1.0.4"),
    );
    let c = compile_local(&state_from_yaml(&text), &[("default", "db", &["10.1.0.1"])]);
    assert!(c.rejections.is_empty(), "{:?}", c.rejections);
    let db = "10.1.0.1";
    assert!(allow(&c, DIR_INGRESS, db, "10.1.0.2", PROTO_TCP, 6379));
    assert!(allow(&c, DIR_INGRESS, db, "10.1.0.3", PROTO_TCP, 6379));
    assert!(!allow(&c, DIR_INGRESS, db, "10.1.0.4", PROTO_TCP, 6379));
    assert!(!allow(&c, DIR_INGRESS, db, "10.1.0.2", PROTO_TCP, 6380));
    assert!(!allow(&c, DIR_INGRESS, db, "10.1.0.2", PROTO_UDP, 6379));
    assert!(allow(&c, DIR_INGRESS, db, "172.17.0.9", PROTO_TCP, 6379));
    assert!(!allow(&c, DIR_INGRESS, db, "172.17.1.9", PROTO_TCP, 6379));
    assert!(!allow(&c, DIR_INGRESS, db, "172.18.0.1", PROTO_TCP, 6379));
    assert!(allow(&c, DIR_EGRESS, db, "10.0.0.7", PROTO_TCP, 5978));
    assert!(!allow(&c, DIR_EGRESS, db, "10.0.0.7", PROTO_TCP, 5979));
    assert!(!allow(&c, DIR_EGRESS, db, "10.1.0.2", PROTO_TCP, 5978));
    // Rules with ports never match ICMP.
    assert!(!allow(&c, DIR_EGRESS, db, "10.0.0.7", PROTO_ICMP, 0));
    let s = c.subjects.values().next().unwrap();
    assert_eq!(
        s.selected_by_ingress.iter().next(),
        Some(&ObjectKey::new("default", "test-network-policy"))
    );
    // Every rule id is explained: by its policy, or it is the built-in allowance for the node.
    for id in s.rules.values() {
        assert!(c.rule_origins.contains_key(id) || *id == weir_common::RULE_FROM_HOST);
    }
}

fn one_pod_with(policy_spec: &str) -> Compiled {
    let text = format!(
        "{}{}{NP}metadata: {{name: p, namespace: default}}\nspec:\n{policy_spec}\n",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
    );
    compile_local(&state_from_yaml(&text), &[("default", "a", &["10.1.0.1"])])
}

#[test]
fn default_deny_and_allow_all() {
    // Default deny all ingress.
    let c = one_pod_with("  podSelector: {}\n  policyTypes: [Ingress]");
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "8.8.8.8",
        PROTO_TCP,
        80
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "8.8.8.8",
        PROTO_ICMP,
        0
    ));
    assert!(allow(&c, DIR_EGRESS, "10.1.0.1", "8.8.8.8", PROTO_TCP, 80));
    // `ingress: []` is deny all too.
    let c = one_pod_with("  podSelector: {}\n  ingress: []");
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "8.8.8.8",
        PROTO_TCP,
        80
    ));
    // Allow all ingress: `[{}]`, including ICMP and non-pod addresses.
    let c = one_pod_with("  podSelector: {}\n  ingress: [{}]");
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "8.8.8.8", PROTO_TCP, 80));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "8.8.8.8", PROTO_ICMP, 0));
    assert!(c.subjects.values().next().unwrap().isolated_ingress);
    // Default deny egress; allow all egress.
    let c = one_pod_with("  podSelector: {}\n  policyTypes: [Egress]");
    assert!(!allow(&c, DIR_EGRESS, "10.1.0.1", "8.8.8.8", PROTO_UDP, 53));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "8.8.8.8", PROTO_UDP, 53));
    let c = one_pod_with("  podSelector: {}\n  egress: [{}]\n  policyTypes: [Egress]");
    assert!(allow(&c, DIR_EGRESS, "10.1.0.1", "8.8.8.8", PROTO_UDP, 53));
    // Default deny all.
    let c = one_pod_with("  podSelector: {}\n  policyTypes: [Ingress, Egress]");
    assert!(!allow(&c, DIR_EGRESS, "10.1.0.1", "8.8.8.8", PROTO_UDP, 53));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "8.8.8.8",
        PROTO_UDP,
        53
    ));
    // A policy that does not select the pod does not isolate it.
    let c = one_pod_with("  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]");
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "8.8.8.8", PROTO_TCP, 80));
}

#[test]
fn protocol_without_port_and_icmp() {
    let c = one_pod_with("  podSelector: {}\n  ingress: [{ports: [{protocol: UDP}]}]");
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "1.2.3.4", PROTO_UDP, 1));
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.2.3.4",
        PROTO_UDP,
        65535
    ));
    assert!(!allow(&c, DIR_INGRESS, "10.1.0.1", "1.2.3.4", PROTO_TCP, 1));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.2.3.4",
        PROTO_ICMP,
        0
    ));
    // SCTP is enforced by protocol number.
    let c = one_pod_with("  podSelector: {}\n  ingress: [{ports: [{protocol: SCTP, port: 9}]}]");
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "1.2.3.4", PROTO_SCTP, 9));
    assert!(!allow(&c, DIR_INGRESS, "10.1.0.1", "1.2.3.4", PROTO_TCP, 9));
}

#[test]
fn end_port_ranges() {
    let c = one_pod_with(
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}], ports: [{protocol: TCP, port: 32000, endPort: 32768}]}]",
    );
    for (port, want) in [
        (31999, false),
        (32000, true),
        (32500, true),
        (32768, true),
        (32769, false),
    ] {
        assert_eq!(
            allow(&c, DIR_EGRESS, "10.1.0.1", "10.0.0.5", PROTO_TCP, port),
            want,
            "{port}"
        );
    }
    // One entry per aligned block.
    let n = c.subjects.values().next().unwrap().rules.len();
    assert_eq!(n, weir_common::ports::port_range_blocks(32000, 32768).1);
}

#[test]
fn namespace_and_pod_selector_and_versus_or() {
    let base = format!(
        "{}{}{}{}{}",
        ns("default", ""),
        ns("alice", "user: alice"),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("alice", "client", "role: client", "n2", "10.1.0.2"),
        pod("alice", "other", "role: other", "n2", "10.1.0.3"),
    );
    let base = format!(
        "{base}{}",
        pod("default", "client", "role: client", "n2", "10.1.0.4")
    );
    // AND: clients in alice's namespaces.
    let and = format!(
        "{base}{NP}metadata: {{name: p, namespace: default}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{user: alice}}}}, podSelector: {{matchLabels: {{role: client}}}}}}]}}]\n"
    );
    let c = compile_local(&state_from_yaml(&and), &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.2", PROTO_TCP, 1));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.3",
        PROTO_TCP,
        1
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.4",
        PROTO_TCP,
        1
    ));
    // OR: anything in alice's namespaces, or clients in the policy's namespace.
    let or = format!(
        "{base}{NP}metadata: {{name: p, namespace: default}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{user: alice}}}}}}, {{podSelector: {{matchLabels: {{role: client}}}}}}]}}]\n"
    );
    let c = compile_local(&state_from_yaml(&or), &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.2", PROTO_TCP, 1));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.3", PROTO_TCP, 1));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.4", PROTO_TCP, 1));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.9.9.9",
        PROTO_TCP,
        1
    ));
    // Empty namespaceSelector: every pod of every namespace, but no non-pod address.
    let all = format!(
        "{base}{NP}metadata: {{name: p, namespace: default}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{}}}}]}}]\n"
    );
    let c = compile_local(&state_from_yaml(&all), &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.3", PROTO_TCP, 1));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.9.9.9",
        PROTO_TCP,
        1
    ));
}

#[test]
fn named_ports_resolve_on_the_destination() {
    let text = format!(
        "{}{}{}{}{NP}metadata: {{name: in, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  ingress: [{{ports: [{{port: http}}, {{port: dns, protocol: UDP}}, {{port: dns}}]}}]
---
{NP}metadata: {{name: out, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  policyTypes: [Egress]
  egress: [{{ports: [{{port: http}}]}}]
",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("default", "b", "app: b", "n2", "10.1.0.2"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: default}\nspec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}\nstatus: {podIPs: [{ip: 10.1.0.3}]}\n---\n",
    );
    let c = compile_local(&state_from_yaml(&text), &[("default", "a", &["10.1.0.1"])]);
    assert!(c.rejections.is_empty(), "{:?}", c.rejections);
    // Ingress: on the subject (8080/TCP, 5353/UDP; no `dns` over TCP).
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.1.1.1",
        PROTO_TCP,
        8080
    ));
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.1.1.1",
        PROTO_UDP,
        5353
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.1.1.1",
        PROTO_TCP,
        5353
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "1.1.1.1",
        PROTO_TCP,
        9090
    ));
    // Egress: on each peer; a non-pod destination has no named ports.
    assert!(allow(
        &c, DIR_EGRESS, "10.1.0.1", "10.1.0.2", PROTO_TCP, 8080
    ));
    assert!(!allow(
        &c, DIR_EGRESS, "10.1.0.1", "10.1.0.2", PROTO_TCP, 9090
    ));
    assert!(allow(
        &c, DIR_EGRESS, "10.1.0.1", "10.1.0.3", PROTO_TCP, 9090
    ));
    assert!(!allow(
        &c, DIR_EGRESS, "10.1.0.1", "10.1.0.3", PROTO_TCP, 8080
    ));
    assert!(!allow(
        &c, DIR_EGRESS, "10.1.0.1", "1.1.1.1", PROTO_TCP, 8080
    ));
}

#[test]
fn ip_block_applies_to_pod_addresses_and_except_works() {
    let text = format!(
        "{}{}{}{}{NP}metadata: {{name: p, namespace: default}}
spec:
  podSelector: {{}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.1.0.0/16, except: [10.1.0.2/32]}}}}, {{ipBlock: {{cidr: '::/0'}}}}]}}]
",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("default", "b", "app: b", "n2", "10.1.0.2"),
        pod("default", "c", "app: c", "n2", "10.1.0.3"),
    );
    let c = compile_local(
        &state_from_yaml(&text),
        &[("default", "a", &["10.1.0.1", "fd00::1"])],
    );
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_TCP,
        1
    ));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.3", PROTO_TCP, 1));
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.9.9", PROTO_TCP, 1));
    // ::/0 matches every IPv6 address and no IPv4 one (not even in the kernel's mapped form).
    assert!(allow(
        &c,
        DIR_INGRESS,
        "fd00::1",
        "2001:db8::1",
        PROTO_TCP,
        1
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "192.168.0.1",
        PROTO_TCP,
        1
    ));
    assert_eq!(
        c.cidr_identities.get(&"0.0.0.0/0".parse().unwrap()),
        Some(&IDENTITY_WORLD)
    );
    assert!(
        c.cidr_identities
            .values()
            .all(|&id| id == IDENTITY_WORLD || id >= IDENTITY_FIRST_CIDR)
    );
    assert!(
        c.identity_names
            .values()
            .any(|n| n.contains("10.1.0.0/16 except 10.1.0.2/32"))
    );
}

#[test]
fn policies_add_up_and_labels_take_effect_on_recompile() {
    let text = format!(
        "{}{}{}{NP}metadata: {{name: p1, namespace: default}}
spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: b}}}}}}]}}]}}
---
{NP}metadata: {{name: p2, namespace: default}}
spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 443}}]}}]}}
",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("default", "b", "app: b", "n2", "10.1.0.2"),
    );
    let mut state = state_from_yaml(&text);
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.2", PROTO_UDP, 9));
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "9.9.9.9",
        PROTO_TCP,
        443
    ));
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "9.9.9.9",
        PROTO_TCP,
        444
    ));
    assert_eq!(
        c.subjects
            .values()
            .next()
            .unwrap()
            .selected_by_ingress
            .len(),
        2
    );
    // Relabel b: no policy change, a recompile.
    std::sync::Arc::make_mut(state.pods.get_mut(&ObjectKey::new("default", "b")).unwrap())
        .metadata
        .labels
        .insert("app".into(), "z".into());
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_UDP,
        9
    ));
    // Removing p2 and p1 un-isolates.
    assert!(state.remove(&ObjectRef::NetworkPolicy(ObjectKey::new("default", "p1"))));
    assert!(state.remove(&ObjectRef::NetworkPolicy(ObjectKey::new("default", "p2"))));
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "9.9.9.9",
        PROTO_TCP,
        444
    ));
}

#[test]
fn namespace_label_change_takes_effect() {
    let text = format!(
        "{}{}{}{}{NP}metadata: {{name: p, namespace: default}}
spec: {{podSelector: {{}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}}}]}}]}}
",
        ns("default", ""),
        ns("other", "env: prod"),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("other", "b", "app: b", "n2", "10.1.0.2"),
    );
    let mut state = state_from_yaml(&text);
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(&c, DIR_INGRESS, "10.1.0.1", "10.1.0.2", PROTO_TCP, 1));
    std::sync::Arc::make_mut(state.namespaces.get_mut("other").unwrap())
        .metadata
        .labels
        .insert("env".into(), "dev".into());
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_TCP,
        1
    ));
}

#[test]
fn ipcache_nodes_host_network_and_local_addresses() {
    let text = format!(
        "{}{}{}{}apiVersion: v1
kind: Pod
metadata: {{name: hn, namespace: default}}
spec: {{nodeName: n2, hostNetwork: true}}
status: {{podIPs: [{{ip: 192.168.0.2}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: n1}}
status: {{addresses: [{{type: InternalIP, address: 192.168.0.1}}, {{type: Hostname, address: n1}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: n2}}
status: {{addresses: [{{type: InternalIP, address: 192.168.0.2}}]}}
",
        ns("default", ""),
        // Status is stale for a local pod: the IPAM's address wins.
        pod("default", "a", "app: a", "n1", "10.1.0.99"),
        pod("default", "b", "app: b", "n2", "10.1.0.2"),
        pod("default", "c", "app: c", "n1", "10.1.0.3"),
    );
    let c = compile_local(
        &state_from_yaml(&text),
        &[("default", "a", &["10.1.0.1", "fd00::1"])],
    );
    let get = |a: &str| c.ipcache.get(&ip(a).into()).copied();
    assert_eq!(get("192.168.0.1"), Some(IDENTITY_HOST));
    assert_eq!(get("192.168.0.2"), Some(IDENTITY_REMOTE_NODE));
    assert!(get("10.1.0.1").is_some_and(|id| id >= IDENTITY_FIRST_POD));
    assert_eq!(get("fd00::1"), get("10.1.0.1"));
    assert!(get("10.1.0.2").is_some());
    assert_eq!(get("10.1.0.99"), None);
    // c is on this node but not wired yet: a subject, but no address.
    assert_eq!(get("10.1.0.3"), None);
    assert_eq!(c.local_addresses.len(), 2);
    assert_eq!(
        c.local_addresses[&ip("10.1.0.1")].0,
        ObjectKey::new("default", "a")
    );
    assert_eq!(c.subjects.len(), 2);
    // The hostNetwork pod has no identity of its own.
    assert_eq!(c.ipcache.len(), 5);
    assert_eq!(c.identity_names[&IDENTITY_HOST], "reserved:host");
}

#[test]
fn allocator_is_stable_and_persists() {
    let text = format!(
        "{}{}{}{NP}metadata: {{name: p, namespace: default}}
spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}]}}, {{ports: [{{port: 1}}]}}]}}
",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("default", "b", "app: b", "n2", "10.1.0.2"),
    );
    let state = state_from_yaml(&text);
    let input = CompileInput {
        state: state.clone(),
        node_name: "n1".into(),
        cluster_id: 7,
        local_endpoints: [(ObjectKey::new("default", "a"), vec![ip("10.1.0.1")])].into(),
    };
    let mut alloc = IdentityAllocator::new();
    let c1 = weir_policy::compile(&input, &mut alloc).unwrap();
    assert!(
        c1.ipcache
            .values()
            .filter(|&&id| id >= IDENTITY_FIRST_POD)
            .all(|id| id >> IDENTITY_CLUSTER_SHIFT == 7)
    );
    let saved = serde_json::to_string(&alloc).unwrap();
    let mut restored: IdentityAllocator = serde_json::from_str(&saved).unwrap();
    assert_eq!(restored, alloc);
    // A new pod appears; the old identities and rule ids do not move.
    let mut state2 = state;
    for o in
        weir_policy::model::parse_documents(&pod("default", "z", "app: z", "n2", "10.1.0.9"), "z")
    {
        state2.apply(o.unwrap());
    }
    let c2 = weir_policy::compile(
        &CompileInput {
            state: state2,
            ..input.clone()
        },
        &mut restored,
    )
    .unwrap();
    for (addr, id) in &c1.ipcache {
        assert_eq!(c2.ipcache.get(addr), Some(id));
    }
    assert_eq!(c1.cidr_identities, c2.cidr_identities);
    assert_eq!(c1.rule_origins, c2.rule_origins);
    assert_eq!(c1.subjects, c2.subjects);
    assert!(c1.rule_origins.keys().all(|&id| id >= 1));
}

#[test]
fn objects_apply_and_remove() {
    let mut state = ClusterState::default();
    let o = common::object(&pod("default", "a", "app: a", "n1", "10.1.0.1"));
    let r = o.object_ref();
    state.apply(o);
    assert!(state.remove(&r));
    assert!(!state.remove(&r));
    // A namespace without a Namespace object still has its name label.
    assert_eq!(
        state.namespace_labels("x")["kubernetes.io/metadata.name"],
        "x"
    );
    let _ = Object::Node(Default::default());
}

#[test]
fn a_cluster_id_that_does_not_fit_is_an_error() {
    let state = state_from_yaml(&pod("default", "a", "app: a", "n1", "10.1.0.1"));
    let input = CompileInput {
        state,
        node_name: "n1".into(),
        cluster_id: 256,
        local_endpoints: Default::default(),
    };
    let e = weir_policy::compile(&input, &mut IdentityAllocator::new()).unwrap_err();
    assert!(e.to_string().contains("cluster id 256"), "{e}");
}

#[test]
fn terminated_pods_do_not_claim_their_old_addresses() {
    let text = format!(
        "{}apiVersion: v1
kind: Pod
metadata: {{name: done, namespace: default, labels: {{app: job}}}}
spec: {{nodeName: n2}}
status: {{phase: Succeeded, podIPs: [{{ip: 10.1.0.2}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: new, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: n2}}
status: {{phase: Running, podIPs: [{{ip: 10.1.0.2}}]}}
---
{NP}metadata: {{name: p, namespace: default}}
spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]}}]}}
",
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
    );
    let c = compile_local(&state_from_yaml(&text), &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_TCP,
        80
    ));
}

/// A named port with an ipBlock peer (egress): the destination must be in the block (minus its
/// excepts) and a pod whose named port resolves to the packet's port; non-pod addresses never
/// match. Numeric rules with blocks still see the pods' addresses as before.
#[test]
fn named_port_with_ip_block_is_exact() {
    let pod_with_http = |name: &str, port: u16, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: web}}}}\nspec: {{nodeName: n2, containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}\nstatus: {{podIPs: [{{ip: '{ip}'}}]}}\n---\n"
        )
    };
    let text = format!(
        "{}{}{}{}{}{}{}{NP}metadata: {{name: out, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 10.1.0.0/16, except: [10.1.0.2/32]}}}}]
    ports: [{{protocol: UDP}}, {{port: http}}]
---
{NP}metadata: {{name: in, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.1.0.0/24}}}}], ports: [{{port: 80}}]}}]
",
        ns("x", ""),
        pod("x", "a", "app: a", "n1", "10.1.0.1"),
        pod_with_http("b", 8080, "10.1.0.2"),
        pod_with_http("c", 9090, "10.1.0.3"),
        // d and e have the same identity (labels and ports); only e is inside the block.
        pod_with_http("d", 8080, "10.2.0.4"),
        pod_with_http("e", 8080, "10.1.0.5"),
        pod_with_http("f", 8080, "fd00::5"),
    );
    let mut state = state_from_yaml(&text);
    let c = compile_local(&state, &[("x", "a", &["10.1.0.1"])]);
    assert!(c.rejections.is_empty(), "{:?}", c.rejections);
    let a = "10.1.0.1";
    assert!(allow(&c, DIR_EGRESS, a, "10.1.0.3", PROTO_TCP, 9090));
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.3", PROTO_TCP, 8080));
    assert!(allow(&c, DIR_EGRESS, a, "10.1.0.5", PROTO_TCP, 8080));
    assert!(allow(&c, DIR_EGRESS, a, "10.1.0.5", PROTO_UDP, 53));
    // Excepted, outside the block, another family: no.
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.2", PROTO_TCP, 8080));
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.2", PROTO_UDP, 53));
    assert!(!allow(&c, DIR_EGRESS, a, "10.2.0.4", PROTO_TCP, 8080));
    // A non-pod address in the block has no named ports; the protocol-only entry matches it.
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.200", PROTO_TCP, 8080));
    assert!(allow(&c, DIR_EGRESS, a, "10.1.0.200", PROTO_UDP, 53));
    // The numeric ipBlock rule still matches pod addresses and others.
    assert!(allow(&c, DIR_INGRESS, a, "10.1.0.5", PROTO_TCP, 80));
    assert!(allow(&c, DIR_INGRESS, a, "10.1.0.200", PROTO_TCP, 80));
    assert!(!allow(&c, DIR_INGRESS, a, "10.1.0.5", PROTO_TCP, 81));
    // Exact prefixes for the pods inside the block that have the port (a itself too), besides
    // the except; none for d (outside) or the non-pod address.
    let exact: Vec<String> = c
        .cidr_identities
        .keys()
        .filter(|p| p.prefix_len() == 32)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        exact,
        vec!["10.1.0.1/32", "10.1.0.2/32", "10.1.0.3/32", "10.1.0.5/32"]
    );

    // Pod churn: e leaves, c's port changes; the next compile follows.
    state.remove(&ObjectRef::Pod(ObjectKey::new("x", "e")));
    state.apply(common::object(&pod_with_http("c", 7070, "10.1.0.3")));
    let c = compile_local(&state, &[("x", "a", &["10.1.0.1"])]);
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.5", PROTO_TCP, 8080));
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.0.3", PROTO_TCP, 9090));
    assert!(allow(&c, DIR_EGRESS, a, "10.1.0.3", PROTO_TCP, 7070));
}

/// The example of issue 11, compiled: accepted, and every rule enforced.
#[test]
fn issue_11_example_is_enforced() {
    let text = format!(
        "{}{}{}{}{}{NP}metadata: {{name: mixed, namespace: x}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{pod: b}}}}
    - ipBlock: {{cidr: 10.1.0.0/16, except: [10.1.2.0/24, 10.1.3.0/24]}}
  egress:
  - ports: [{{protocol: TCP}}, {{port: http}}]
    to: [{{ipBlock: {{cidr: 10.1.0.0/16}}}}]
",
        ns("x", ""),
        ns("y", ""),
        pod("x", "a", "pod: a", "n1", "10.1.1.1"),
        pod("x", "b", "pod: b", "n2", "10.1.2.2"),
        pod("y", "c", "pod: c", "n2", "10.1.3.3"),
    );
    let c = compile_local(&state_from_yaml(&text), &[("x", "a", &["10.1.1.1"])]);
    assert!(c.rejections.is_empty(), "{:?}", c.rejections);
    let a = "10.1.1.1";
    // Ingress: from b (a pod of x, although in an except), not from c (y, in an except).
    assert!(allow(&c, DIR_INGRESS, a, "10.1.2.2", PROTO_TCP, 80));
    assert!(!allow(&c, DIR_INGRESS, a, "10.1.3.3", PROTO_TCP, 80));
    assert!(allow(&c, DIR_INGRESS, a, "10.1.4.4", PROTO_UDP, 53));
    assert!(!allow(&c, DIR_INGRESS, a, "10.2.0.1", PROTO_TCP, 80));
    // Egress: any TCP into the block; UDP only to the `http` port of pods (none is UDP).
    assert!(allow(&c, DIR_EGRESS, a, "10.1.3.3", PROTO_TCP, 1234));
    assert!(!allow(&c, DIR_EGRESS, a, "10.1.3.3", PROTO_UDP, 8080));
    assert!(!allow(&c, DIR_EGRESS, a, "10.2.0.1", PROTO_TCP, 80));
}

/// A Namespace whose manifest is rejected (a bad label) is matched by no namespaceSelector, so
/// its pods do not fall into a `NotIn` their real labels keep them out of.
#[test]
fn a_rejected_namespace_matches_no_namespace_selector() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: prod, labels: {{env: prod, 'bad key!': x}}}}\n---\n{}{}{}{NP}metadata: {{name: p, namespace: default}}
spec:
  podSelector: {{}}
  ingress: [{{from: [{{namespaceSelector: {{matchExpressions: [{{key: env, operator: NotIn, values: [prod]}}]}}}}]}}]
",
        ns("default", ""),
        pod("default", "a", "app: a", "n1", "10.1.0.1"),
        pod("prod", "p", "app: p", "n2", "10.1.0.2"),
    );
    let mut state = ClusterState::default();
    let mut errors = 0;
    for o in weir_policy::model::parse_documents(&text, "t.yaml") {
        match o {
            Ok(o) => state.apply(o),
            Err(e) => {
                assert!(e.to_string().contains("bad key!"), "{e}");
                errors += 1;
            }
        }
    }
    assert_eq!(errors, 1);
    assert!(state.namespaces["prod"].rejected.is_some());
    assert!(!state.namespaces["prod"].metadata.labels.contains_key("env"));
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(!allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_TCP,
        80
    ));
    // Without a Namespace object at all, prod would have matched (it has no env label).
    state.remove(&ObjectRef::Namespace("prod".into()));
    let c = compile_local(&state, &[("default", "a", &["10.1.0.1"])]);
    assert!(allow(
        &c,
        DIR_INGRESS,
        "10.1.0.1",
        "10.1.0.2",
        PROTO_TCP,
        80
    ));
}
