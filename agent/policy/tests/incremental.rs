//! Incremental events against the reference, the full compile: after every event of a random
//! sequence (pods and policies written and removed), the output patched by
//! [`Incremental::pods_changed`], [`Incremental::policies_changed`] or
//! [`Incremental::endpoints_changed`] (when it takes the event)
//! equals a full compile of the new state, and the identity allocator is the one a full compile
//! leaves.

use std::{collections::BTreeMap, net::IpAddr};

use proptest::{prelude::*, strategy::ValueTree as _};
use serde_json::{Value, json};
use weir_policy::{
    CompileInput, IdentityAllocator, Incremental, compile,
    model::{ClusterState, ObjectKey, parse_documents},
    output::Compiled,
};

const HERE: &str = "here";
const NODES: [&str; 3] = [HERE, "there", "far"];
/// Pod addresses: some shared between pods, one a node's, one a local endpoint's.
const ADDRESSES: [&str; 6] = [
    "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "fd00::5",
];

fn state_of(objects: &[Value]) -> ClusterState {
    let mut state = ClusterState::default();
    for object in objects {
        for parsed in parse_documents(&object.to_string(), "test") {
            state.apply(parsed.expect("the test's objects are valid"));
        }
    }
    state
}

fn base_objects(named_port_blocks: bool) -> Vec<Value> {
    let mut objects = Vec::new();
    for (n, team) in [("a", "x"), ("b", "y"), ("c", "x")] {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": n, "labels": {"team": team}}}));
    }
    for (k, node) in NODES.iter().enumerate() {
        let address = if k == 2 {
            "10.0.0.9".to_owned()
        } else {
            format!("192.168.0.{k}")
        };
        objects.push(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}),
        );
    }
    objects.push(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": "a"},
        "spec": {"podSelector": {"matchLabels": {"app": "a0"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}}],
                "ports": [{"port": "http"}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}],
            "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "http"}]}],
            "policyTypes": ["Ingress", "Egress"]}}),
    );
    objects.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "blocks", "namespace": "b"},
        "spec": {"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.4/32"]}}]}]}}));
    if named_port_blocks {
        objects.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "named-block", "namespace": "c"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": "http"}]}]}}));
    }
    objects
}

/// A pod as an event writes it.
#[derive(Clone, Debug)]
struct PodSpec {
    namespace: usize,
    name: usize,
    app: usize,
    http: bool,
    node: usize,
    address: usize,
    terminated: bool,
    host_network: bool,
}

impl PodSpec {
    fn key(&self) -> ObjectKey {
        ObjectKey::new(["a", "b", "c"][self.namespace], format!("p{}", self.name))
    }

    fn object(&self) -> Value {
        let ports = if self.http {
            json!([{"name": "http", "containerPort": 80}])
        } else {
            json!([])
        };
        let key = self.key();
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": key.name, "namespace": key.namespace,
                "labels": {"app": format!("a{}", self.app)}},
            "spec": {"nodeName": NODES[self.node], "hostNetwork": self.host_network,
                "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": if self.terminated { "Failed" } else { "Running" },
                "podIPs": [{"ip": ADDRESSES[self.address]}]}})
    }
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..3usize,
        0..6usize,
        0..3usize,
        any::<bool>(),
        // Mostly other nodes: those are the events the incremental path takes.
        prop_oneof![1 => Just(0usize), 4 => 1..3usize],
        0..ADDRESSES.len(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
    )
        .prop_map(
            |(namespace, name, app, http, node, address, terminated, host_network)| PodSpec {
                namespace,
                name,
                app,
                http,
                node,
                address,
                terminated,
                host_network,
            },
        )
}

/// Policies an event writes: (namespace, name) and a variant of its spec.
const POLICY_NAMES: [(&str, &str); 3] = [("a", "web"), ("b", "blocks"), ("c", "extra")];

fn policy(name: usize, variant: usize) -> Value {
    let (namespace, name) = POLICY_NAMES[name];
    let app = |n: usize| json!({"matchLabels": {"app": format!("a{}", n % 3)}});
    let spec = match variant % 6 {
        0 => json!({"podSelector": app(variant),
            "ingress": [{"from": [{"podSelector": app(variant + 1)}], "ports": [{"port": "http"}]}]}),
        1 => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}],
                "ports": [{"port": 80 + variant}]}],
            "egress": [{"to": [{"podSelector": app(variant)}], "ports": [{"port": "http"}]}]}),
        // The same ipBlock as "blocks" has: CIDR identities stay.
        2 => json!({"podSelector": app(variant),
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.4/32"]}}]}]}),
        // A new ipBlock: CIDR identities change, a full compile.
        3 => {
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
        }
        4 => json!({"podSelector": app(variant), "policyTypes": ["Egress"], "egress": []}),
        // Rejected: a bad port; it isolates and allows nothing.
        _ => json!({"podSelector": app(variant), "ingress": [{"ports": [{"port": 0}]}]}),
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// One change of a pod or a policy: written (added or modified), or removed.
#[derive(Clone, Debug)]
enum Change {
    Write(PodSpec),
    Remove {
        namespace: usize,
        name: usize,
    },
    WritePolicy {
        name: usize,
        variant: usize,
    },
    RemovePolicy {
        name: usize,
    },
    /// A CNI ADD: the pod's local endpoint holds `WIRED[address]` (replacing what it held).
    Wire {
        namespace: usize,
        name: usize,
        address: usize,
    },
    /// A CNI DEL: the pod has no local endpoint any more.
    Unwire {
        namespace: usize,
        name: usize,
    },
}

/// Addresses a local endpoint is wired with: some claimed by other pods, one a node's.
const WIRED: [&str; 5] = ["10.0.0.1", "10.0.0.3", "10.0.0.9", "10.9.1.7", "fd00::5"];

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => pod_spec().prop_map(Change::Write),
        1 => (0..3usize, 0..6usize).prop_map(|(namespace, name)| Change::Remove { namespace, name }),
        2 => (0..3usize, 0..12usize).prop_map(|(name, variant)| Change::WritePolicy { name, variant }),
        1 => (0..3usize).prop_map(|name| Change::RemovePolicy { name }),
        2 => (0..3usize, 0..6usize, 0..WIRED.len())
            .prop_map(|(namespace, name, address)| Change::Wire { namespace, name, address }),
        1 => (0..3usize, 0..6usize).prop_map(|(namespace, name)| Change::Unwire { namespace, name }),
    ]
}

/// Which incremental paths a sequence took.
#[derive(Debug, Default)]
struct Taken {
    pods: usize,
    policies: usize,
    endpoints: usize,
}

fn input_of(pods: &[PodSpec], named_port_blocks: bool) -> CompileInput {
    let mut objects = base_objects(named_port_blocks);
    objects.extend(pods.iter().map(PodSpec::object));
    // Local endpoints: every pod of this node, the first at an address other pods claim.
    let local_endpoints: BTreeMap<ObjectKey, Vec<IpAddr>> = pods
        .iter()
        .filter(|p| p.node == 0 && !p.host_network)
        .enumerate()
        .map(|(k, p)| {
            let addr = if k == 0 {
                "10.0.0.1".to_owned()
            } else {
                format!("10.9.0.{k}")
            };
            (p.key(), vec![addr.parse().expect("an address")])
        })
        .collect();
    CompileInput {
        state: state_of(&objects),
        node_name: HERE.to_owned(),
        cluster_id: 0,
        local_endpoints,
    }
}

/// Checks `compiled` and `alloc` against a full compile of `input`.
fn agrees(
    input: &CompileInput,
    compiled: &Compiled,
    alloc: &IdentityAllocator,
    before: &IdentityAllocator,
) -> Result<Compiled, TestCaseError> {
    let mut fresh = before.clone();
    let full = compile(input, &mut fresh).expect("compiles");
    prop_assert_eq!(
        compiled,
        &full,
        "patched output differs from a full compile"
    );
    prop_assert_eq!(&fresh, alloc, "a full compile would allocate differently");
    Ok(full)
}

/// Runs the events (each a list of changes applied together); returns how many took each
/// incremental path.
fn run(
    initial: &[PodSpec],
    events: &[Vec<Change>],
    named_port_blocks: bool,
) -> Result<Taken, TestCaseError> {
    let mut input = input_of(initial, named_port_blocks);
    let mut alloc = IdentityAllocator::new();
    let (mut compiled, mut incremental) =
        Incremental::compile(&input, &mut alloc).expect("compiles");
    let mut taken = Taken::default();
    for event in events {
        let mut changed = Vec::new();
        let mut policies_changed = Vec::new();
        let mut wired = Vec::new();
        for change in event {
            let key = match change {
                Change::Wire {
                    namespace,
                    name,
                    address,
                } => {
                    let key = ObjectKey::new(["a", "b", "c"][*namespace], format!("p{name}"));
                    let addr: IpAddr = WIRED[*address].parse().expect("an address");
                    input.local_endpoints.insert(key.clone(), vec![addr]);
                    wired.push(key);
                    continue;
                }
                Change::Unwire { namespace, name } => {
                    let key = ObjectKey::new(["a", "b", "c"][*namespace], format!("p{name}"));
                    input.local_endpoints.remove(&key);
                    wired.push(key);
                    continue;
                }
                Change::WritePolicy { name, variant } => {
                    let state = state_of(&[policy(*name, *variant)]);
                    let (key, p) = state.policies.into_iter().next().expect("one policy");
                    input.state.policies.insert(key.clone(), p);
                    policies_changed.push(key);
                    continue;
                }
                Change::RemovePolicy { name } => {
                    let (namespace, name) = POLICY_NAMES[*name];
                    let key = ObjectKey::new(namespace, name);
                    input.state.policies.remove(&key);
                    policies_changed.push(key);
                    continue;
                }
                Change::Write(spec) => {
                    let pod = state_of(&[spec.object()]).pods.into_values().next();
                    input.state.pods.insert(spec.key(), pod.expect("one pod"));
                    spec.key()
                }
                Change::Remove { namespace, name } => {
                    let key = ObjectKey::new(["a", "b", "c"][*namespace], format!("p{name}"));
                    input.state.pods.remove(&key);
                    key
                }
            };
            if !changed.contains(&key) {
                changed.push(key);
            }
        }
        let before = compiled.clone();
        let alloc_before = alloc.clone();
        // One kind of change at a time takes an incremental path, as in the agent.
        let done = match (changed.is_empty(), policies_changed.is_empty()) {
            _ if !wired.is_empty() => {
                if !(changed.is_empty() && policies_changed.is_empty()) {
                    false
                } else if let Some(changes) =
                    incremental.endpoints_changed(&input, &wired, &mut compiled)
                {
                    taken.endpoints += 1;
                    let full = agrees(&input, &compiled, &alloc, &alloc_before)?;
                    // The changes are exactly the difference of the ipcache and local addresses.
                    let mut ipcache = before.ipcache.clone();
                    for (prefix, id) in changes.ipcache {
                        match id {
                            Some(id) => ipcache.insert(prefix, id),
                            None => ipcache.remove(&prefix),
                        };
                    }
                    prop_assert_eq!(&ipcache, &full.ipcache);
                    let mut local = before.local_addresses.clone();
                    for (addr, owner) in changes.local_addresses {
                        match owner {
                            Some(owner) => local.insert(addr, owner),
                            None => local.remove(&addr),
                        };
                    }
                    prop_assert_eq!(&local, &full.local_addresses);
                    true
                } else {
                    false
                }
            }
            (false, true) => {
                match incremental.pods_changed(&input, &changed, &alloc, &mut compiled) {
                    Some(changes) => {
                        taken.pods += 1;
                        let full = agrees(&input, &compiled, &alloc, &alloc_before)?;
                        // The changes are exactly the difference of the ipcache.
                        let mut patched = before.ipcache.clone();
                        for (prefix, id) in changes {
                            match id {
                                Some(id) => patched.insert(prefix, id),
                                None => patched.remove(&prefix),
                            };
                        }
                        prop_assert_eq!(&patched, &full.ipcache);
                        true
                    }
                    None => false,
                }
            }
            (true, false) => {
                match incremental.policies_changed(
                    &input,
                    &policies_changed,
                    &mut alloc,
                    &mut compiled,
                ) {
                    Some(subjects) => {
                        taken.policies += 1;
                        agrees(&input, &compiled, &alloc, &alloc_before)?;
                        // The subjects named are exactly those whose rule sets changed.
                        let differ: std::collections::BTreeSet<u32> = compiled
                            .subjects
                            .iter()
                            .filter(|(s, r)| before.subjects.get(s) != Some(r))
                            .map(|(s, _)| *s)
                            .collect();
                        prop_assert_eq!(subjects, differ);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        };
        if !done {
            prop_assert_eq!(&compiled, &before, "a refused event changed the output");
            prop_assert_eq!(
                &alloc,
                &alloc_before,
                "a refused event changed the allocator"
            );
            (compiled, incremental) = Incremental::compile(&input, &mut alloc).expect("compiles");
        }
    }
    Ok(taken)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn incremental_pod_events_equal_a_full_compile(
        initial in prop::collection::vec(pod_spec(), 0..12),
        events in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..12),
        named_port_blocks in prop::bool::weighted(0.2),
    ) {
        run(&initial, &events, named_port_blocks)?;
    }
}

fn remote(name: usize, app: usize, address: usize) -> PodSpec {
    PodSpec {
        namespace: 0,
        name,
        app,
        http: true,
        node: 1,
        address,
        terminated: false,
        host_network: false,
    }
}

/// The events the incremental path exists for do take it; the others do not.
#[test]
fn only_address_events_are_incremental() {
    let initial = [remote(0, 1, 1), remote(1, 2, 2)];
    let known_labels = vec![vec![Change::Write(remote(3, 1, 3))]];
    assert_eq!(run(&initial, &known_labels, false).unwrap().pods, 1);
    let removal = vec![vec![
        Change::Write(remote(3, 1, 3)),
        Change::Remove {
            namespace: 0,
            name: 3,
        },
    ]];
    assert_eq!(run(&initial, &removal, false).unwrap().pods, 1);
    let new_labels = vec![vec![Change::Write(remote(3, 0, 3))]];
    assert_eq!(run(&initial, &new_labels, false).unwrap().pods, 0);
    let last_of_its_labels = vec![vec![Change::Remove {
        namespace: 0,
        name: 1,
    }]];
    assert_eq!(run(&initial, &last_of_its_labels, false).unwrap().pods, 0);
    let mut local = remote(3, 1, 3);
    local.node = 0;
    assert_eq!(
        run(&initial, &[vec![Change::Write(local)]], false)
            .unwrap()
            .pods,
        0
    );
    // Pod addresses may be CIDR prefixes: every pod event compiles in full.
    assert_eq!(run(&initial, &known_labels, true).unwrap().pods, 0);
}

/// Random sequences do exercise the incremental path.
#[test]
fn random_sequences_take_the_incremental_path() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (
        prop::collection::vec(pod_spec(), 4..12),
        prop::collection::vec(prop::collection::vec(change(), 1..3), 4..12),
    );
    let mut taken = Taken::default();
    for _ in 0..100 {
        let (initial, events) = strategy.new_tree(&mut runner).expect("a value").current();
        let t = run(&initial, &events, false).expect("agrees with a full compile");
        taken.pods += t.pods;
        taken.policies += t.policies;
        taken.endpoints += t.endpoints;
    }
    assert!(
        // Wirings take it only for pods of this node, a fifth of the pods.
        taken.pods > 50 && taken.policies > 50 && taken.endpoints > 5,
        "too few incremental events in 100 sequences: {taken:?}"
    );
}

/// A CNI ADD or DEL of a pod whose Pod names this node patches addresses; one of a pod that
/// names another node (its identity becomes a subject) compiles in full.
#[test]
fn wiring_a_local_pod_is_incremental() {
    let mut here = remote(2, 0, 3);
    here.node = 0;
    let initial = [remote(0, 1, 1), remote(1, 2, 2), here];
    let wire = |name: usize, address: usize| Change::Wire {
        namespace: 0,
        name,
        address,
    };
    // Wired, rewired at an address a remote pod claims, unwired.
    let events = vec![
        vec![wire(2, 3)],
        vec![wire(2, 0)],
        vec![Change::Unwire {
            namespace: 0,
            name: 2,
        }],
    ];
    assert_eq!(run(&initial, &events, false).unwrap().endpoints, 3);
    // An endpoint for a pod of another node, or for no pod.
    assert_eq!(
        run(&initial, &[vec![wire(0, 3)]], false).unwrap().endpoints,
        0
    );
    assert_eq!(
        run(&initial, &[vec![wire(5, 3)]], false).unwrap().endpoints,
        0
    );
    // Pod addresses may be CIDR prefixes: a full compile.
    assert_eq!(
        run(&initial, &[vec![wire(2, 3)]], true).unwrap().endpoints,
        0
    );
}

/// A policy changed alone is recomputed in place; one that adds an ipBlock is not.
#[test]
fn policy_changes_are_incremental_unless_cidrs_change() {
    let initial = [remote(0, 1, 1), remote(1, 2, 2)];
    let mut local = remote(2, 0, 3);
    local.node = 0;
    let initial = [initial[0].clone(), initial[1].clone(), local];
    for variant in [0, 1, 4, 5] {
        let events = vec![vec![Change::WritePolicy { name: 0, variant }]];
        assert_eq!(
            run(&initial, &events, false).unwrap().policies,
            1,
            "variant {variant}"
        );
    }
    // "blocks" keeps its ipBlock.
    let events = vec![vec![Change::WritePolicy {
        name: 1,
        variant: 2,
    }]];
    assert_eq!(run(&initial, &events, false).unwrap().policies, 1);
    // A policy's ipBlocks change: a full compile.
    for (name, variant) in [(2, 3), (0, 2)] {
        let events = vec![vec![Change::WritePolicy { name, variant }]];
        assert_eq!(run(&initial, &events, false).unwrap().policies, 0);
    }
    let events = vec![vec![Change::RemovePolicy { name: 0 }]];
    assert_eq!(run(&initial, &events, false).unwrap().policies, 1);
}
