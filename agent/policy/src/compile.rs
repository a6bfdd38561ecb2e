//! The compiler proper: cluster state → desired map contents for one node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    rc::Rc,
    sync::Arc,
};

use ipnet::IpNet;
use weir_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, RULE_FROM_HOST, ports::port_range_blocks,
};

use crate::{
    cidr::{CidrIdentities, cidr_identities},
    identity::{AllocError, IdentityAllocator, NamedPort, PodIdentityKey},
    model::{ClusterState, ObjectKey, Pod},
    output::{Compiled, RuleMatch, RuleOrigin, SubjectRules},
    selector::Selector,
    validate::{IpBlockLabel, ValidPeer, ValidPolicy, ValidPort, ValidRule, check},
};

/// What the compiler needs besides the cluster objects.
#[derive(Clone, Debug, Default)]
pub struct CompileInput {
    pub state: ClusterState,
    /// This node's name (`spec.nodeName` of local pods, `metadata.name` of its Node).
    pub node_name: String,
    /// This cluster's id (0..=255), the top 8 bits of pod identities.
    pub cluster_id: u32,
    /// Local endpoints' addresses from the agent's IPAM; authoritative for local pods.
    pub local_endpoints: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

/// Something that stopped the whole compile (as opposed to a rejected policy).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("allocating identities for node {node}: {source}")]
    Identity {
        node: String,
        #[source]
        source: AllocError,
    },
}

fn protocol_number(p: &str) -> Option<u8> {
    match p {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// The identity key of a pod: its namespace, labels and valid named container ports.
pub fn pod_identity_key(namespace: &str, pod: &Pod) -> PodIdentityKey {
    let named_ports = pod
        .spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .filter_map(|p| {
            let name = p.name.as_ref()?;
            let proto = protocol_number(&p.protocol)?;
            let port = u16::try_from(p.container_port).ok().filter(|&n| n != 0)?;
            Some(NamedPort {
                name: name.clone(),
                proto,
                port,
            })
        })
        .collect();
    PodIdentityKey {
        namespace: namespace.to_owned(),
        labels: pod.metadata.labels.clone(),
        named_ports,
    }
}

/// Pod identities of the cluster, indexed for selector evaluation.
struct Identities {
    keys: BTreeMap<u32, PodIdentityKey>,
    by_namespace: BTreeMap<String, Vec<u32>>,
    /// (name, proto) → (identity, port) of every identity that has that named port.
    named: HashMap<(String, u8), Vec<(u32, u16)>>,
}

/// Memoised selector results.
struct Resolver<'a> {
    state: &'a ClusterState,
    ids: &'a Identities,
    namespaces: BTreeSet<String>,
    ns_memo: HashMap<Selector, Rc<Vec<String>>>,
    pod_memo: HashMap<(String, Selector), Rc<Vec<u32>>>,
    peer_memo: HashMap<(Option<Selector>, Selector, String), Rc<Vec<u32>>>,
}

impl Resolver<'_> {
    fn namespaces(&mut self, sel: &Selector) -> Rc<Vec<String>> {
        if let Some(r) = self.ns_memo.get(sel) {
            return Rc::clone(r);
        }
        let r: Rc<Vec<String>> = Rc::new(
            self.namespaces
                .iter()
                .filter(|ns| {
                    self.state.namespace_selectable(ns)
                        && sel.matches_namespace(&self.state.namespace_labels(ns))
                })
                .cloned()
                .collect(),
        );
        self.ns_memo.insert(sel.clone(), Rc::clone(&r));
        r
    }

    /// Identities in `namespace` whose labels match `sel`.
    fn pods_in(&mut self, namespace: &str, sel: &Selector) -> Rc<Vec<u32>> {
        let key = (namespace.to_owned(), sel.clone());
        if let Some(r) = self.pod_memo.get(&key) {
            return Rc::clone(r);
        }
        let r: Rc<Vec<u32>> = Rc::new(
            self.ids
                .by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| {
                    self.ids
                        .keys
                        .get(id)
                        .is_some_and(|k| sel.matches(&k.labels))
                })
                .collect(),
        );
        self.pod_memo.insert(key, Rc::clone(&r));
        r
    }

    /// Identities a pod peer of a policy in `policy_ns` matches.
    fn peer(
        &mut self,
        namespaces: &Option<Selector>,
        pods: &Selector,
        policy_ns: &str,
    ) -> Rc<Vec<u32>> {
        let scope_ns = if namespaces.is_some() { "" } else { policy_ns };
        let key = (namespaces.clone(), pods.clone(), scope_ns.to_owned());
        if let Some(r) = self.peer_memo.get(&key) {
            return Rc::clone(r);
        }
        let r = match namespaces {
            None => self.pods_in(policy_ns, pods),
            Some(ns_sel) => {
                let nss = self.namespaces(ns_sel);
                let mut out = Vec::new();
                for ns in nss.iter() {
                    out.extend(self.pods_in(ns, pods).iter().copied());
                }
                Rc::new(out)
            }
        };
        self.peer_memo.insert(key, Rc::clone(&r));
        r
    }
}

/// Port matches of one resolved port entry.
fn port_matches(
    proto: u8,
    first: u16,
    last: u16,
    mut f: impl FnMut(Option<u8>, Option<(u16, u8)>),
) {
    let (blocks, n) = port_range_blocks(first, last);
    for &b in blocks.iter().take(n) {
        f(Some(proto), Some(b));
    }
}

/// Compiles the cluster state for one node. `alloc` keeps identities and rule ids stable across
/// calls (persist it); ids no longer in use are forgotten.
pub fn compile(
    input: &CompileInput,
    alloc: &mut IdentityAllocator,
) -> Result<Compiled, CompileError> {
    let state = &input.state;
    let node = &input.node_name;
    let err = |source| CompileError::Identity {
        node: node.clone(),
        source,
    };
    let mut out = Compiled::default();

    // 1. Validate policies. A rejected one still isolates what it selects (fail closed).
    let mut policies: Vec<ValidPolicy> = Vec::new();
    for (key, p) in &state.policies {
        match check(key, p) {
            Ok(v) => policies.push(v),
            Err(r) => {
                let r = *r;
                out.rejections.extend(r.rejections);
                policies.push(r.isolation);
            }
        }
    }

    // 2. Pod identities and addresses.
    let mut ids = Identities {
        keys: BTreeMap::new(),
        by_namespace: BTreeMap::new(),
        named: HashMap::new(),
    };
    let mut local_ids: BTreeSet<u32> = BTreeSet::new();
    let mut pod_addrs: Vec<(bool, IpAddr, u32, &ObjectKey)> = Vec::new();
    for (key, pod) in &state.pods {
        if pod.spec.host_network {
            continue;
        }
        let ikey = pod_identity_key(&key.namespace, pod);
        let id = alloc.pod(input.cluster_id, &ikey).map_err(err)?;
        if !ids.keys.contains_key(&id) {
            ids.by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(id);
            for np in &ikey.named_ports {
                ids.named
                    .entry((np.name.clone(), np.proto))
                    .or_default()
                    .push((id, np.port));
            }
            ids.keys.insert(id, ikey);
        }
        let local_addrs = input.local_endpoints.get(key);
        let on_this_node = pod.spec.node_name.as_deref() == Some(node.as_str());
        if local_addrs.is_some() || on_this_node {
            local_ids.insert(id);
        }
        match local_addrs {
            Some(addrs) => {
                for a in addrs {
                    pod_addrs.push((true, *a, id, key));
                }
            }
            // A pod of this node that the agent has not wired (yet) has no address here.
            None if on_this_node => {}
            // A terminated pod's addresses may already belong to another pod.
            None if pod.status.terminated() => {}
            None => {
                for ip in &pod.status.pod_ips {
                    if let Ok(a) = ip.ip.trim().parse::<IpAddr>().map(|a| a.to_canonical()) {
                        pod_addrs.push((false, a, id, key));
                    }
                }
            }
        }
    }
    // Local addresses first: the IPAM is authoritative over a stale status elsewhere.
    pod_addrs.sort_by_key(|(local, ..)| !*local);
    for (local, addr, id, key) in pod_addrs {
        if out.ipcache.contains_key(&IpNet::from(addr)) {
            continue;
        }
        out.ipcache.insert(IpNet::from(addr), id);
        if local {
            out.local_addresses.insert(addr, (key.clone(), id));
        }
    }
    for (id, k) in &ids.keys {
        out.identity_names.insert(*id, k.to_string());
    }

    // 3. Node addresses.
    for (name, n) in &state.nodes {
        let id = if name == node {
            IDENTITY_HOST
        } else {
            IDENTITY_REMOTE_NODE
        };
        for a in &n.status.addresses {
            if a.kind != "InternalIP" {
                continue;
            }
            if let Ok(addr) = a.address.trim().parse::<IpAddr>().map(|a| a.to_canonical()) {
                out.ipcache.entry(IpNet::from(addr)).or_insert(id);
            }
        }
    }
    out.identity_names
        .insert(IDENTITY_HOST, "reserved:host".into());
    out.identity_names
        .insert(IDENTITY_WORLD, "reserved:world".into());
    out.identity_names
        .insert(IDENTITY_REMOTE_NODE, "reserved:remote-node".into());

    // 4. CIDR identities.
    let blocks: BTreeSet<Arc<IpBlockLabel>> = policies
        .iter()
        .flat_map(|p| p.ingress.iter().flatten().chain(p.egress.iter().flatten()))
        .flat_map(|r| r.peers.iter())
        .filter_map(|p| match p {
            ValidPeer::IpBlock(b) => Some(Arc::clone(b)),
            ValidPeer::Pods { .. } => None,
        })
        .collect();
    let pod_prefixes = named_port_pod_prefixes(&policies, &out.ipcache, &ids);
    let cidrs: CidrIdentities = cidr_identities(&blocks, &pod_prefixes, alloc).map_err(err)?;
    out.cidr_identities = cidrs.prefixes.clone();
    for (id, labels) in &cidrs.labels {
        out.identity_names.insert(*id, format!("cidr:{labels}"));
    }

    // 5. Subjects.
    let mut namespaces: BTreeSet<String> = state.namespaces.keys().cloned().collect();
    namespaces.extend(ids.by_namespace.keys().cloned());
    let mut resolver = Resolver {
        state,
        ids: &ids,
        namespaces,
        ns_memo: HashMap::new(),
        pod_memo: HashMap::new(),
        peer_memo: HashMap::new(),
    };
    let mut local_by_ns: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for id in &local_ids {
        out.subjects.insert(*id, SubjectRules::default());
        if let Some(k) = ids.keys.get(id) {
            local_by_ns
                .entry(k.namespace.as_str())
                .or_default()
                .push(*id);
        }
    }
    let mut used_rules: BTreeSet<RuleOrigin> = BTreeSet::new();
    // Matches are collected per subject and sorted once at the end (much cheaper than a map
    // insert per match: rules of many policies overlap).
    let mut acc: HashMap<u32, Vec<(RuleMatch, u32)>> = HashMap::new();
    // Subject → each distinct compiled rule it gets, with the lowest rule id that gave it.
    type Shared = HashMap<*const CompiledRule, (Rc<CompiledRule>, u32)>;
    let mut shared_acc: HashMap<u32, Shared> = HashMap::new();
    let mut rule_memo: HashMap<RuleKey, Rc<CompiledRule>> = HashMap::new();
    let mut scratch: Vec<RuleMatch> = Vec::new();
    for p in &policies {
        let selected: Vec<u32> = local_by_ns
            .get(p.key.namespace.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| {
                ids.keys
                    .get(id)
                    .is_some_and(|k| p.subjects.matches(&k.labels))
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        for (direction, rules) in [(DIR_INGRESS, &p.ingress), (DIR_EGRESS, &p.egress)] {
            let Some(rules) = rules else { continue };
            for s in &selected {
                if let Some(sr) = out.subjects.get_mut(s) {
                    if direction == DIR_INGRESS {
                        sr.isolated_ingress = true;
                        sr.selected_by_ingress.insert(p.key.clone());
                    } else {
                        sr.isolated_egress = true;
                        sr.selected_by_egress.insert(p.key.clone());
                    }
                }
            }
            for rule in rules {
                let origin = RuleOrigin {
                    policy: p.key.clone(),
                    direction,
                    index: rule.index,
                };
                let rule_id = alloc.rule(&origin);
                out.rule_origins.insert(rule_id, origin.clone());
                used_rules.insert(origin);
                let key: RuleKey = (
                    direction,
                    p.key.namespace.clone(),
                    rule.peers.clone(),
                    rule.ports.clone(),
                );
                let compiled = match rule_memo.get(&key) {
                    Some(c) => Rc::clone(c),
                    None => {
                        let c = Rc::new(compile_rule(
                            direction,
                            rule,
                            &p.key.namespace,
                            &mut resolver,
                            &cidrs,
                        ));
                        rule_memo.insert(key, Rc::clone(&c));
                        c
                    }
                };
                for s in &selected {
                    let shared = shared_acc.entry(*s).or_default();
                    shared
                        .entry(Rc::as_ptr(&compiled))
                        .and_modify(|(_, id)| *id = (*id).min(rule_id))
                        .or_insert((Rc::clone(&compiled), rule_id));
                    if !compiled.named_ingress.is_empty()
                        && let Some(k) = ids.keys.get(s)
                    {
                        scratch.clear();
                        subject_matches(&compiled, k, &mut scratch);
                        acc.entry(*s)
                            .or_default()
                            .extend(scratch.iter().map(|m| (*m, rule_id)));
                    }
                }
            }
        }
    }

    for (subject, shared) in shared_acc {
        let matches = acc.entry(subject).or_default();
        for (rule, id) in shared.into_values() {
            matches.extend(rule.common.iter().map(|m| (*m, id)));
        }
    }
    for (subject, mut matches) in acc {
        // Sorted by match, then rule id: the first of each match has the lowest id.
        matches.sort_unstable();
        matches.dedup_by_key(|(m, _)| *m);
        if let Some(sr) = out.subjects.get_mut(&subject) {
            sr.rules = matches.into_iter().collect();
        }
    }
    // The node itself reaches its own pods even when they are isolated: kubelet's probes come
    // from there. A rule that already allows the host keeps its own id.
    let from_host = RuleMatch {
        direction: DIR_INGRESS,
        peer: IDENTITY_HOST,
        proto: None,
        port: None,
    };
    for sr in out.subjects.values_mut().filter(|sr| sr.isolated_ingress) {
        sr.rules.entry(from_host).or_insert(RULE_FROM_HOST);
    }

    let pods_used: BTreeSet<&PodIdentityKey> = ids.keys.values().collect();
    let cidrs_used: BTreeSet<_> = cidrs.labels.values().collect();
    alloc.retain(&pods_used, &cidrs_used, &used_rules.iter().collect());
    Ok(out)
}

/// The exact prefixes of pod addresses that egress rules with a named port and an ipBlock peer
/// can allow (see [`crate::cidr`]): every pod address inside such a block whose pod has a port
/// name (and protocol) those rules use, with those named ports.
fn named_port_pod_prefixes(
    policies: &[ValidPolicy],
    ipcache: &BTreeMap<IpNet, u32>,
    ids: &Identities,
) -> BTreeMap<IpNet, BTreeSet<NamedPort>> {
    let mut blocks: BTreeSet<&IpBlockLabel> = BTreeSet::new();
    let mut names: BTreeSet<(&str, u8)> = BTreeSet::new();
    for rule in policies.iter().flat_map(|p| p.egress.iter().flatten()) {
        let named: Vec<(&str, u8)> = rule
            .ports
            .iter()
            .filter_map(|p| match p {
                ValidPort::Named(proto, name) => Some((name.as_str(), *proto)),
                _ => None,
            })
            .collect();
        let rule_blocks: Vec<&IpBlockLabel> = rule
            .peers
            .iter()
            .filter_map(|p| match p {
                ValidPeer::IpBlock(b) => Some(b.as_ref()),
                ValidPeer::Pods { .. } => None,
            })
            .collect();
        if !named.is_empty() && !rule_blocks.is_empty() {
            blocks.extend(rule_blocks);
            names.extend(named);
        }
    }
    let mut out = BTreeMap::new();
    if blocks.is_empty() {
        return out;
    }
    for (prefix, id) in ipcache {
        let Some(key) = ids.keys.get(id) else {
            continue; // a node address: not a pod, no named ports
        };
        let ports: BTreeSet<NamedPort> = key
            .named_ports
            .iter()
            .filter(|np| names.contains(&(np.name.as_str(), np.proto)))
            .cloned()
            .collect();
        if ports.is_empty() {
            continue;
        }
        let addr = prefix.addr();
        if blocks.iter().any(|b| b.contains(&addr)) {
            out.insert(*prefix, ports);
        }
    }
    out
}

/// The subject-independent part of a compiled rule, shared by every policy with the same rule
/// in the same namespace.
struct CompiledRule {
    /// Matches that hold for every subject.
    common: Vec<RuleMatch>,
    /// Ingress named ports, resolved per subject.
    named_ingress: Vec<(u8, String)>,
    /// Every peer identity of the rule.
    peers: Vec<u32>,
}

/// What makes two rules compile the same.
type RuleKey = (u8, String, Vec<ValidPeer>, Vec<ValidPort>);

fn compile_rule(
    direction: u8,
    rule: &ValidRule,
    policy_ns: &str,
    resolver: &mut Resolver<'_>,
    cidrs: &CidrIdentities,
) -> CompiledRule {
    // Peer identities: pod identities (eligible for named-port resolution) and others.
    let mut pod_peers: BTreeSet<u32> = BTreeSet::new();
    let mut other_peers: BTreeSet<u32> = BTreeSet::new();
    let any_peer = rule.peers.is_empty();
    if any_peer {
        other_peers.insert(IDENTITY_ANY);
    }
    for peer in &rule.peers {
        match peer {
            ValidPeer::Pods { namespaces, pods } => {
                pod_peers.extend(resolver.peer(namespaces, pods, policy_ns).iter().copied());
            }
            ValidPeer::IpBlock(b) => {
                other_peers.extend(cidrs.by_block.get(b).into_iter().flatten().copied());
            }
        }
    }
    let peers: Vec<u32> = pod_peers
        .iter()
        .chain(other_peers.iter())
        .copied()
        .collect();

    let mut common: Vec<RuleMatch> = Vec::new();
    let push_all = |proto: Option<u8>, port: Option<(u16, u8)>, common: &mut Vec<RuleMatch>| {
        for &peer in &peers {
            common.push(RuleMatch {
                direction,
                peer,
                proto,
                port,
            });
        }
    };
    if rule.ports.is_empty() {
        push_all(None, None, &mut common);
    }
    let mut named: Vec<(u8, String)> = Vec::new();
    for port in &rule.ports {
        match port {
            ValidPort::AnyPort(proto) => push_all(Some(*proto), None, &mut common),
            ValidPort::Range(proto, first, last) => {
                port_matches(*proto, *first, *last, |pr, po| {
                    push_all(pr, po, &mut common)
                });
            }
            ValidPort::Named(proto, name) => named.push((*proto, name.clone())),
        }
    }
    if direction == DIR_EGRESS {
        // Named ports resolve on each peer (the destination); a peer without the port gets
        // no entry. Any peer (no `to`) means every pod identity that has the port.
        for (proto, name) in named.drain(..) {
            if any_peer {
                for &(peer, port) in resolver
                    .ids
                    .named
                    .get(&(name.clone(), proto))
                    .into_iter()
                    .flatten()
                {
                    common.push(RuleMatch {
                        direction,
                        peer,
                        proto: Some(proto),
                        port: Some((port, 16)),
                    });
                }
            }
            // An ipBlock peer: the exact prefixes of pods inside the block that have the port.
            for peer in &rule.peers {
                let ValidPeer::IpBlock(b) = peer else {
                    continue;
                };
                for &id in cidrs.by_block.get(b).into_iter().flatten() {
                    let Some(labels) = cidrs.labels.get(&id) else {
                        continue;
                    };
                    for np in labels
                        .pod_ports
                        .iter()
                        .filter(|np| np.proto == proto && np.name == name)
                    {
                        common.push(RuleMatch {
                            direction,
                            peer: id,
                            proto: Some(proto),
                            port: Some((np.port, 16)),
                        });
                    }
                }
            }
            for &peer in &pod_peers {
                if let Some(k) = resolver.ids.keys.get(&peer) {
                    for port in k.resolve(proto, &name) {
                        common.push(RuleMatch {
                            direction,
                            peer,
                            proto: Some(proto),
                            port: Some((port, 16)),
                        });
                    }
                }
            }
        }
    }
    common.sort_unstable();
    common.dedup();
    CompiledRule {
        common,
        named_ingress: named,
        peers,
    }
}

/// The matches of `rule` for `subject` that depend on it: ingress named ports resolve on the
/// subject (the destination).
fn subject_matches(rule: &CompiledRule, subject: &PodIdentityKey, out: &mut Vec<RuleMatch>) {
    for (proto, name) in &rule.named_ingress {
        for port in subject.resolve(*proto, name) {
            for &peer in &rule.peers {
                out.push(RuleMatch {
                    direction: DIR_INGRESS,
                    peer,
                    proto: Some(*proto),
                    port: Some((port, 16)),
                });
            }
        }
    }
}
