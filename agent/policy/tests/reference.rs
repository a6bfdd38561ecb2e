//! The compiler against an independent, deliberately simple evaluator written straight from the
//! NetworkPolicy spec text, over random small clusters. The compiled maps are evaluated the way
//! the datapath does it (`common::datapath_allows`: LPM in ipcache and cidr identities, policy
//! lookup for the peer's pod identity, CIDR identity and ANY, isolation flags).

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{Value, json};
use weir_common::{DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use weir_policy::{CompileInput, IdentityAllocator, model::ClusterState, model::ObjectKey};

// ---------------------------------------------------------------------------------------------
// Random cluster description (test-side types; the reference reads these, the compiler reads
// the JSON made from them).

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

#[derive(Clone, Debug)]
struct TNs {
    name: String,
    labels: BTreeMap<String, String>,
    /// Whether a Namespace object exists (pods and policies may live in one that has none).
    exists: bool,
}

#[derive(Clone, Debug)]
struct TPod {
    ns: String,
    name: String,
    labels: BTreeMap<String, String>,
    local: bool,
    /// A hostNetwork pod (on n2): not a pod for policy purposes; its address is n2's.
    host_network: bool,
    addrs: Vec<IpAddr>,
    ports: Vec<(String, &'static str, u16)>,
}

#[derive(Clone, Debug, Default)]
struct TSel {
    labels: Vec<(String, String)>,
    exprs: Vec<(String, &'static str, Vec<String>)>,
}

#[derive(Clone, Debug)]
enum TPeer {
    Pods {
        pods: Option<TSel>,
        namespaces: Option<TSel>,
    },
    Block {
        cidr: String,
        except: Vec<String>,
    },
}

#[derive(Clone, Debug)]
enum TPortV {
    Num(u16),
    Name(String),
}

#[derive(Clone, Debug)]
struct TPort {
    proto: Option<&'static str>,
    port: Option<TPortV>,
    end: Option<u16>,
}

#[derive(Clone, Debug)]
struct TRule {
    peers: Vec<TPeer>,
    ports: Vec<TPort>,
    /// Write an empty peer list as `[]` instead of leaving it out.
    explicit_empty: bool,
}

/// How a generated policy is made invalid (the API server would refuse it; standalone manifests
/// can carry it). A rejected policy allows nothing but keeps isolating what it selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invalid {
    /// `metadata.name: UPPER_case!`.
    Name,
    /// A podSelector expression with an unknown operator: every pod of the namespace.
    Selector,
    /// `policyTypes` with an unknown type: both directions.
    Types,
    /// An ingress rule with a CIDR that does not parse.
    Cidr,
}

#[derive(Clone, Debug)]
struct TPolicy {
    ns: String,
    name: String,
    invalid: Option<Invalid>,
    sel: TSel,
    types: Option<Vec<&'static str>>,
    ingress: Option<Vec<TRule>>,
    egress: Option<Vec<TRule>>,
}

#[derive(Clone, Debug)]
struct TCluster {
    namespaces: Vec<TNs>,
    pods: Vec<TPod>,
    policies: Vec<TPolicy>,
    nodes: Vec<(String, IpAddr)>,
}

const LABEL_KEYS: &[&str] = &["app", "tier", "team"];
const LABEL_VALUES: &[&str] = &["a", "b", "c"];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics"];
const BLOCKS: &[(&str, &[&str])] = &[
    (
        "10.0.0.0/24",
        &["10.0.0.0/30", "10.0.0.4/31", "10.0.0.128/25", "10.0.0.3/32"],
    ),
    (
        "10.0.0.0/16",
        &["10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/29"],
    ),
    ("10.0.0.0/30", &["10.0.0.2/32", "10.0.0.2/31"]),
    (
        "0.0.0.0/0",
        &["10.0.0.0/8", "10.0.0.0/24", "172.16.0.0/12", "10.0.0.1/32"],
    ),
    ("10.0.0.1/32", &[]),
    ("172.16.0.0/16", &["172.16.0.1/32"]),
    ("fd00::/64", &["fd00::/124", "fd00::2/128", "fd00::/126"]),
    ("::/0", &["fd00::/16", "fd00::1/128"]),
    ("fd00::1/128", &[]),
];

fn labels(rng: &mut Rng) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    for k in LABEL_KEYS {
        if rng.chance(50) {
            l.insert((*k).to_owned(), (*rng.pick(LABEL_VALUES)).to_owned());
        }
    }
    l
}

fn selector(rng: &mut Rng) -> TSel {
    let mut s = TSel::default();
    if rng.chance(40) {
        return s;
    }
    for _ in 0..rng.below(2) {
        s.labels.push((
            (*rng.pick(LABEL_KEYS)).to_owned(),
            (*rng.pick(LABEL_VALUES)).to_owned(),
        ));
    }
    for _ in 0..rng.below(3) {
        let key = (*rng.pick(LABEL_KEYS)).to_owned();
        let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
        let values = if op == "In" || op == "NotIn" {
            (0..1 + rng.below(2))
                .map(|_| (*rng.pick(LABEL_VALUES)).to_owned())
                .collect()
        } else {
            Vec::new()
        };
        s.exprs.push((key, op, values));
    }
    s
}

fn rule(rng: &mut Rng) -> TRule {
    if rng.chance(12) {
        // The shape of issue 11: a named port (and maybe a protocol-only entry) to an ipBlock
        // that holds pods.
        let (cidr, excepts) = BLOCKS[*rng.pick(&[0, 1, 2, 4, 6, 8])];
        let except = excepts
            .iter()
            .filter(|_| rng.chance(40))
            .map(|e| (*e).to_owned())
            .collect();
        let mut ports = vec![TPort {
            proto: *rng.pick(&[None, Some("TCP"), Some("UDP")]),
            port: Some(TPortV::Name((*rng.pick(PORT_NAMES)).to_owned())),
            end: None,
        }];
        if rng.chance(50) {
            ports.push(TPort {
                proto: Some("UDP"),
                port: None,
                end: None,
            });
        }
        return TRule {
            peers: vec![TPeer::Block {
                cidr: cidr.to_owned(),
                except,
            }],
            ports,
            explicit_empty: false,
        };
    }
    let mut peers = Vec::new();
    if !rng.chance(25) {
        for _ in 0..1 + rng.below(2) {
            peers.push(match rng.below(4) {
                0 => TPeer::Pods {
                    pods: Some(selector(rng)),
                    namespaces: None,
                },
                1 => TPeer::Pods {
                    pods: None,
                    namespaces: Some(selector(rng)),
                },
                2 => TPeer::Pods {
                    pods: Some(selector(rng)),
                    namespaces: Some(selector(rng)),
                },
                _ => {
                    let (cidr, excepts) = *rng.pick(BLOCKS);
                    let except = excepts
                        .iter()
                        .filter(|_| rng.chance(40))
                        .map(|e| (*e).to_owned())
                        .collect();
                    TPeer::Block {
                        cidr: cidr.to_owned(),
                        except,
                    }
                }
            });
        }
    }
    let mut ports = Vec::new();
    if rng.chance(60) {
        for _ in 0..1 + rng.below(2) {
            let proto = *rng.pick(&[None, Some("TCP"), Some("UDP"), Some("SCTP")]);
            let (port, end) = match rng.below(5) {
                0 => (None, None),
                1 => (Some(TPortV::Num(*rng.pick(&[53, 80, 8080]))), None),
                2 => (Some(TPortV::Num(79)), Some(*rng.pick(&[79, 81, 8080]))),
                3 => (Some(TPortV::Num(8000)), Some(8100)),
                _ => (Some(TPortV::Name((*rng.pick(PORT_NAMES)).to_owned())), None),
            };
            ports.push(TPort { proto, port, end });
        }
    }
    TRule {
        peers,
        ports,
        explicit_empty: rng.chance(50),
    }
}

fn rules(rng: &mut Rng) -> Option<Vec<TRule>> {
    match rng.below(5) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some((0..1 + rng.below(2)).map(|_| rule(rng)).collect()),
    }
}

fn cluster(seed: u64) -> TCluster {
    let mut rng = Rng(seed);
    let namespaces: Vec<TNs> = (0..2 + rng.below(2))
        .map(|i| TNs {
            name: format!("ns{i}"),
            labels: labels(&mut rng),
            exists: rng.chance(85),
        })
        .collect();
    let pods: Vec<TPod> = (0..1 + rng.below(6))
        .map(|i| {
            let mut addrs = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i as u8))];
            if rng.chance(50) {
                addrs.push(IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    1 + i as u16,
                )));
            }
            let mut ports: Vec<(String, &'static str, u16)> = Vec::new();
            for name in PORT_NAMES {
                if rng.chance(40) {
                    ports.push((
                        (*name).to_owned(),
                        *rng.pick(&["TCP", "UDP", "SCTP"]),
                        *rng.pick(&[53, 80, 8080, 8050]),
                    ));
                }
            }
            let host_network = rng.chance(10);
            TPod {
                ns: namespaces[rng.below(namespaces.len())].name.clone(),
                name: format!("p{i}"),
                labels: labels(&mut rng),
                local: !host_network && rng.chance(60),
                host_network,
                addrs: if host_network {
                    vec![IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2))]
                } else {
                    addrs
                },
                ports,
            }
        })
        .collect();
    let policies: Vec<TPolicy> = (0..rng.below(5))
        .map(|i| {
            let types = match rng.below(6) {
                0 => Some(vec!["Ingress"]),
                1 => Some(vec!["Egress"]),
                2 => Some(vec!["Ingress", "Egress"]),
                // Defaulted like an absent list.
                3 => Some(vec![]),
                _ => None,
            };
            let invalid = if rng.chance(12) {
                Some(*rng.pick(&[
                    Invalid::Name,
                    Invalid::Selector,
                    Invalid::Types,
                    Invalid::Cidr,
                ]))
            } else {
                None
            };
            TPolicy {
                ns: namespaces[rng.below(namespaces.len())].name.clone(),
                name: if invalid == Some(Invalid::Name) {
                    format!("UPPER_case{i}!")
                } else {
                    format!("pol{i}")
                },
                invalid,
                sel: selector(&mut rng),
                types,
                ingress: rules(&mut rng),
                egress: rules(&mut rng),
            }
        })
        .collect();
    TCluster {
        namespaces,
        pods,
        policies,
        nodes: vec![
            ("n1".into(), IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1))),
            ("n2".into(), IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2))),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// JSON for the compiler.

fn sel_json(s: &TSel) -> Value {
    let labels: serde_json::Map<String, Value> = s
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let exprs: Vec<Value> = s
        .exprs
        .iter()
        .map(|(k, op, vs)| {
            if vs.is_empty() {
                json!({"key": k, "operator": op})
            } else {
                json!({"key": k, "operator": op, "values": vs})
            }
        })
        .collect();
    json!({"matchLabels": labels, "matchExpressions": exprs})
}

fn rule_json(r: &TRule, peer_key: &str) -> Value {
    let mut o = serde_json::Map::new();
    let peers: Vec<Value> = r
        .peers
        .iter()
        .map(|p| match p {
            TPeer::Pods { pods, namespaces } => {
                let mut m = serde_json::Map::new();
                if let Some(s) = pods {
                    m.insert("podSelector".into(), sel_json(s));
                }
                if let Some(s) = namespaces {
                    m.insert("namespaceSelector".into(), sel_json(s));
                }
                Value::Object(m)
            }
            TPeer::Block { cidr, except } => json!({"ipBlock": {"cidr": cidr, "except": except}}),
        })
        .collect();
    if !peers.is_empty() || r.explicit_empty {
        o.insert(peer_key.into(), Value::Array(peers));
    }
    let ports: Vec<Value> = r
        .ports
        .iter()
        .map(|p| {
            let mut m = serde_json::Map::new();
            if let Some(proto) = p.proto {
                m.insert("protocol".into(), json!(proto));
            }
            match &p.port {
                Some(TPortV::Num(n)) => {
                    m.insert("port".into(), json!(n));
                }
                Some(TPortV::Name(n)) => {
                    m.insert("port".into(), json!(n));
                }
                None => {}
            }
            if let Some(e) = p.end {
                m.insert("endPort".into(), json!(e));
            }
            Value::Object(m)
        })
        .collect();
    if !ports.is_empty() || r.explicit_empty {
        o.insert("ports".into(), Value::Array(ports));
    }
    Value::Object(o)
}

fn to_input(c: &TCluster) -> CompileInput {
    let mut items = Vec::new();
    for n in c.namespaces.iter().filter(|n| n.exists) {
        items.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": n.name, "labels": n.labels}}));
    }
    let mut local_endpoints = BTreeMap::new();
    for p in &c.pods {
        let ports: Vec<Value> = p
            .ports
            .iter()
            .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "containerPort": port}))
            .collect();
        let ips: Vec<Value> = p
            .addrs
            .iter()
            .map(|a| json!({"ip": a.to_string()}))
            .collect();
        // Local pods' addresses come from the IPAM; their status is left empty.
        items.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.ns, "labels": p.labels},
            "spec": {"nodeName": if p.local { "n1" } else { "n2" }, "hostNetwork": p.host_network,
                     "containers": [{"name": "c", "ports": ports}]},
            "status": {"podIPs": if p.local { Vec::new() } else { ips }}}));
        if p.local {
            local_endpoints.insert(ObjectKey::new(&p.ns, &p.name), p.addrs.clone());
        }
    }
    for (name, addr) in &c.nodes {
        items.push(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": addr.to_string()}]}}),
        );
    }
    for p in &c.policies {
        let mut spec = serde_json::Map::new();
        let mut sel = sel_json(&p.sel);
        if p.invalid == Some(Invalid::Selector) {
            sel["matchExpressions"]
                .as_array_mut()
                .expect("expressions")
                .push(json!({"key": "app", "operator": "Near", "values": ["a"]}));
        }
        spec.insert("podSelector".into(), sel);
        if let Some(t) = &p.types {
            let mut t: Vec<&str> = t.clone();
            if p.invalid == Some(Invalid::Types) {
                t.push("Sideways");
            }
            spec.insert("policyTypes".into(), json!(t));
        } else if p.invalid == Some(Invalid::Types) {
            spec.insert("policyTypes".into(), json!(["Sideways"]));
        }
        let mut ingress: Option<Vec<Value>> = p
            .ingress
            .as_ref()
            .map(|r| r.iter().map(|r| rule_json(r, "from")).collect());
        if p.invalid == Some(Invalid::Cidr) {
            ingress
                .get_or_insert_with(Vec::new)
                .push(json!({"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}));
        }
        if let Some(r) = ingress {
            spec.insert("ingress".into(), Value::Array(r));
        }
        if let Some(r) = &p.egress {
            let r: Vec<Value> = r.iter().map(|r| rule_json(r, "to")).collect();
            spec.insert("egress".into(), Value::Array(r));
        }
        items.push(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": p.name, "namespace": p.ns}, "spec": spec}),
        );
    }
    let text = serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("json");
    let mut state = ClusterState::default();
    for o in weir_policy::model::parse_documents(&text, "generated.json") {
        state.apply(o.expect("generated objects parse"));
    }
    CompileInput {
        state,
        node_name: "n1".into(),
        cluster_id: 0,
        local_endpoints,
    }
}

// ---------------------------------------------------------------------------------------------
// The reference evaluator, straight from the spec text.

fn sel_matches(s: &TSel, labels: &BTreeMap<String, String>) -> bool {
    s.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && s.exprs.iter().all(|(k, op, vs)| match *op {
            "In" => labels.get(k).is_some_and(|v| vs.contains(v)),
            "NotIn" => !labels.get(k).is_some_and(|v| vs.contains(v)),
            "Exists" => labels.contains_key(k),
            "DoesNotExist" => !labels.contains_key(k),
            _ => unreachable!(),
        })
}

/// One end of a connection: an address, and the pod that has it, if any.
#[derive(Clone, Copy, Debug)]
struct End<'a> {
    addr: IpAddr,
    pod: Option<&'a TPod>,
}

fn proto_num(p: Option<&str>) -> u8 {
    match p.unwrap_or("TCP") {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        _ => unreachable!(),
    }
}

/// Every policy the API server accepts is enforced; the generated invalid ones are rejected.
fn policy_is_valid(p: &TPolicy) -> bool {
    p.invalid.is_none()
}

/// The pods a policy selects: by its podSelector, or every pod of its namespace when that is
/// invalid (a rejected policy fails closed).
fn policy_selects(p: &TPolicy, pod: &TPod) -> bool {
    p.ns == pod.ns && (p.invalid == Some(Invalid::Selector) || sel_matches(&p.sel, &pod.labels))
}

fn policy_types(p: &TPolicy) -> (bool, bool) {
    if p.invalid == Some(Invalid::Types) {
        // Unknown policy types: both directions stay isolated.
        return (true, true);
    }
    match &p.types {
        Some(t) if !t.is_empty() => (t.contains(&"Ingress"), t.contains(&"Egress")),
        // "If no policyTypes are specified on a NetworkPolicy then by default Ingress will
        // always be set and Egress will be set if the NetworkPolicy has any egress rules."
        _ => (true, p.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

fn ns_labels(c: &TCluster, ns: &str) -> BTreeMap<String, String> {
    let mut l = c
        .namespaces
        .iter()
        .find(|n| n.name == ns && n.exists)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    l.insert("kubernetes.io/metadata.name".into(), ns.to_owned());
    l
}

fn peer_matches(c: &TCluster, policy: &TPolicy, peer: &TPeer, other: End<'_>) -> bool {
    match peer {
        TPeer::Block { cidr, except } => {
            let cidr: IpNet = cidr.parse().unwrap();
            cidr.contains(&other.addr)
                && !except
                    .iter()
                    .any(|e| e.parse::<IpNet>().unwrap().contains(&other.addr))
        }
        TPeer::Pods { pods, namespaces } => {
            let Some(pod) = other.pod else { return false };
            let ns_ok = match namespaces {
                None => pod.ns == policy.ns,
                Some(s) => sel_matches(s, &ns_labels(c, &pod.ns)),
            };
            ns_ok && pods.as_ref().is_none_or(|s| sel_matches(s, &pod.labels))
        }
    }
}

/// `dst` is where the named port is looked up.
fn port_matches(ports: &[TPort], dst: Option<&TPod>, proto: u8, port: u16) -> bool {
    if ports.is_empty() {
        return true;
    }
    ports.iter().any(|p| {
        proto_num(p.proto) == proto
            && match &p.port {
                None => true,
                Some(TPortV::Num(n)) => match p.end {
                    None => port == *n,
                    Some(e) => (*n..=e).contains(&port),
                },
                Some(TPortV::Name(name)) => dst.is_some_and(|d| {
                    d.ports.iter().any(|(pn, pp, num)| {
                        pn == name && proto_num(Some(pp)) == proto && *num == port
                    })
                }),
            }
    })
}

/// Does `pod`'s egress (ingress = false) or ingress (ingress = true) allow this?
fn direction_allows(
    c: &TCluster,
    pod: &TPod,
    other: End<'_>,
    ingress: bool,
    proto: u8,
    port: u16,
    dst: Option<&TPod>,
) -> bool {
    let selecting: Vec<&TPolicy> = c
        .policies
        .iter()
        .filter(|p| policy_selects(p, pod))
        .filter(|p| {
            let (i, e) = policy_types(p);
            if ingress { i } else { e }
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    // Weir's one addition to the spec: the local node (n1) reaches its own pods (kubelet probes).
    let from_local_node =
        other.pod.is_none() && c.nodes.iter().any(|(n, a)| n == "n1" && *a == other.addr);
    if ingress && pod.local && from_local_node {
        return true;
    }
    // A rejected policy isolates but allows nothing.
    selecting.iter().filter(|p| policy_is_valid(p)).any(|p| {
        let rules = if ingress { &p.ingress } else { &p.egress };
        rules.iter().flatten().any(|r| {
            (r.peers.is_empty() || r.peers.iter().any(|peer| peer_matches(c, p, peer, other)))
                && port_matches(&r.ports, dst, proto, port)
        })
    })
}

/// The whole verdict from the spec: the source's egress and the destination's ingress. Weir's
/// one addition: the local node (n1) always reaches its own pods (kubelet probes).
fn allowed(c: &TCluster, src: End<'_>, dst: End<'_>, proto: u8, port: u16) -> bool {
    let from_local_node =
        src.pod.is_none() && c.nodes.iter().any(|(n, a)| n == "n1" && *a == src.addr);
    src.pod
        .is_none_or(|s| direction_allows(c, s, dst, false, proto, port, dst.pod))
        && dst.pod.is_none_or(|d| {
            (from_local_node && d.local) || direction_allows(c, d, src, true, proto, port, dst.pod)
        })
}

// ---------------------------------------------------------------------------------------------

fn check(seed: u64) -> Result<usize, TestCaseError> {
    let c = cluster(seed);
    let input = to_input(&c);
    let compiled = weir_policy::compile(&input, &mut IdentityAllocator::new()).expect("compiles");
    let valid = c.policies.iter().filter(|p| policy_is_valid(p)).count();
    prop_assert_eq!(
        compiled.rejections.is_empty(),
        valid == c.policies.len(),
        "rejections {:?}",
        compiled.rejections
    );

    // Deterministic: a fresh allocator gives the same output, and so does a warm one.
    let mut alloc = IdentityAllocator::new();
    let again = weir_policy::compile(&input, &mut alloc).expect("compiles");
    prop_assert_eq!(&again, &compiled);
    let warm = weir_policy::compile(&input, &mut alloc).expect("compiles");
    prop_assert_eq!(&warm, &compiled);

    let mut ends: Vec<End<'_>> = Vec::new();
    for p in c.pods.iter().filter(|p| !p.host_network) {
        for a in &p.addrs {
            ends.push(End {
                addr: *a,
                pod: Some(p),
            });
        }
    }
    for a in [
        "10.0.0.200",
        "10.0.1.5",
        "10.0.0.2",
        "192.168.1.1",
        "172.16.0.1",
        "172.16.0.2",
        "fd00::99",
        "fd00::3",
        "2001:db8::1",
        "fd01::1",
    ] {
        let addr: IpAddr = a.parse().unwrap();
        if !ends.iter().any(|e| e.addr == addr) {
            ends.push(End { addr, pod: None });
        }
    }
    let mut checked = 0;
    for src in &ends {
        for dst in &ends {
            if src.addr == dst.addr || src.addr.is_ipv4() != dst.addr.is_ipv4() {
                continue;
            }
            for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP] {
                for port in [53u16, 79, 80, 81, 8050, 8080, 8100, 8101, 9999] {
                    let port = if proto == PROTO_ICMP { 0 } else { port };
                    if let Some(s) = src.pod.filter(|p| p.local) {
                        let want = direction_allows(&c, s, *dst, false, proto, port, dst.pod);
                        let got = common::datapath_allows(
                            &compiled, DIR_EGRESS, src.addr, dst.addr, proto, port,
                        );
                        prop_assert_eq!(
                            got,
                            Some(want),
                            "egress {} -> {} proto {} port {}\ncluster {:#?}\ncompiled {:#?}",
                            src.addr,
                            dst.addr,
                            proto,
                            port,
                            c,
                            compiled
                        );
                        checked += 1;
                    }
                    if let Some(d) = dst.pod.filter(|p| p.local) {
                        let want = direction_allows(&c, d, *src, true, proto, port, dst.pod);
                        let got = common::datapath_allows(
                            &compiled,
                            DIR_INGRESS,
                            dst.addr,
                            src.addr,
                            proto,
                            port,
                        );
                        prop_assert_eq!(
                            got,
                            Some(want),
                            "ingress {} -> {} proto {} port {}\ncluster {:#?}\ncompiled {:#?}",
                            src.addr,
                            dst.addr,
                            proto,
                            port,
                            c,
                            compiled
                        );
                        checked += 1;
                    }
                    // Sanity of the composed verdict helper.
                    let _ = allowed(&c, *src, *dst, proto, port);
                }
            }
        }
    }
    Ok(checked)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compile_agrees_with_the_spec(seed in any::<u64>()) {
        check(seed)?;
    }
}

/// The random clusters do exercise the interesting cases (not all-allow by accident).
#[test]
fn random_clusters_cover_denials_and_allows() {
    let (mut allows, mut denies) = (0, 0);
    let (mut named_blocks, mut rejected) = (0, 0);
    for seed in 0..300 {
        let c = cluster(seed);
        rejected += c.policies.iter().filter(|p| !policy_is_valid(p)).count();
        // Egress rules with a named port and an ipBlock that holds a pod with that port name.
        named_blocks += c
            .policies
            .iter()
            .flat_map(|p| p.egress.iter().flatten())
            .filter(|r| {
                r.ports.iter().any(|port| {
                    let Some(TPortV::Name(name)) = &port.port else {
                        return false;
                    };
                    c.pods.iter().any(|pod| {
                        !pod.host_network
                            && pod.ports.iter().any(|(n, ..)| n == name)
                            && r.peers.iter().any(|peer| {
                                matches!(peer, TPeer::Block { .. })
                                    && pod.addrs.iter().any(|a| {
                                        peer_matches(
                                            &c,
                                            &c.policies[0],
                                            peer,
                                            End {
                                                addr: *a,
                                                pod: Some(pod),
                                            },
                                        )
                                    })
                            })
                    })
                })
            })
            .count();
        let pods: Vec<&TPod> = c.pods.iter().filter(|p| !p.host_network).collect();
        for s in &pods {
            for d in &pods {
                let e = End {
                    addr: d.addrs[0],
                    pod: Some(d),
                };
                let src = End {
                    addr: s.addrs[0],
                    pod: Some(s),
                };
                if allowed(&c, src, e, PROTO_TCP, 80) {
                    allows += 1;
                } else {
                    denies += 1;
                }
            }
        }
        check(seed).expect("agrees");
    }
    assert!(
        allows > 100 && denies > 100,
        "allows {allows} denies {denies}"
    );
    assert!(
        named_blocks > 10 && rejected > 20,
        "named-port ipBlock rules {named_blocks}, rejected policies {rejected}"
    );
}

/// A soak over seeds spread across the whole range. The suite runs 1,000 of them; a long soak
/// sets more: `WEIR_SOAK_SEEDS=100000 cargo test --release -p weir-policy --test reference soak`.
#[test]
fn soak_many_seeds() {
    let n: u64 = std::env::var("WEIR_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    for seed in 0..n {
        if let Err(e) = check(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
            panic!("seed {seed}: {e}");
        }
    }
}
