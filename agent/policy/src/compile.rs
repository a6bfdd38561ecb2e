//! The compiler proper: cluster state → desired map contents for one node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
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
    output::{Compiled, Rejection, RuleMatch, RuleOrigin, SubjectRules},
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
#[derive(Debug, Default)]
struct Identities {
    keys: BTreeMap<u32, PodIdentityKey>,
    by_namespace: BTreeMap<String, Vec<u32>>,
    /// (name, proto) → (identity, port) of every identity that has that named port.
    named: HashMap<(String, u8), Vec<(u32, u16)>>,
}

/// Selector results and compiled rules, memoised. They depend on pod identities, namespaces and
/// CIDR identities only, so they stay valid across policy changes.
#[derive(Debug, Default)]
struct Memo {
    namespaces: HashMap<Selector, Arc<Vec<String>>>,
    pods: HashMap<(String, Selector), Arc<Vec<u32>>>,
    peers: HashMap<(Option<Selector>, Selector, String), Arc<Vec<u32>>>,
    rules: HashMap<RuleKey, Arc<CompiledRule>>,
}

/// Evaluates selectors through the memo.
struct Resolver<'a> {
    state: &'a ClusterState,
    ids: &'a Identities,
    namespaces: &'a BTreeSet<String>,
    memo: &'a mut Memo,
}

impl Resolver<'_> {
    fn namespaces(&mut self, sel: &Selector) -> Arc<Vec<String>> {
        if let Some(r) = self.memo.namespaces.get(sel) {
            return Arc::clone(r);
        }
        let r: Arc<Vec<String>> = Arc::new(
            self.namespaces
                .iter()
                .filter(|ns| {
                    self.state.namespace_selectable(ns)
                        && sel.matches_namespace(&self.state.namespace_labels(ns))
                })
                .cloned()
                .collect(),
        );
        self.memo.namespaces.insert(sel.clone(), Arc::clone(&r));
        r
    }

    /// Identities in `namespace` whose labels match `sel`.
    fn pods_in(&mut self, namespace: &str, sel: &Selector) -> Arc<Vec<u32>> {
        let key = (namespace.to_owned(), sel.clone());
        if let Some(r) = self.memo.pods.get(&key) {
            return Arc::clone(r);
        }
        let r: Arc<Vec<u32>> = Arc::new(
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
        self.memo.pods.insert(key, Arc::clone(&r));
        r
    }

    /// Identities a pod peer of a policy in `policy_ns` matches.
    fn peer(
        &mut self,
        namespaces: &Option<Selector>,
        pods: &Selector,
        policy_ns: &str,
    ) -> Arc<Vec<u32>> {
        let scope_ns = if namespaces.is_some() { "" } else { policy_ns };
        let key = (namespaces.clone(), pods.clone(), scope_ns.to_owned());
        if let Some(r) = self.memo.peers.get(&key) {
            return Arc::clone(r);
        }
        let r = match namespaces {
            None => self.pods_in(policy_ns, pods),
            Some(ns_sel) => {
                let nss = self.namespaces(ns_sel);
                let mut out = Vec::new();
                for ns in nss.iter() {
                    out.extend(self.pods_in(ns, pods).iter().copied());
                }
                Arc::new(out)
            }
        };
        self.memo.peers.insert(key, Arc::clone(&r));
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
    compile_indexed(input, alloc).map(|(compiled, _)| compiled)
}

/// [`compile()`], and what it computed on the way, for policy changes that follow
/// ([`PolicyIndex::policies_changed`]).
pub fn compile_indexed(
    input: &CompileInput,
    alloc: &mut IdentityAllocator,
) -> Result<(Compiled, PolicyIndex), CompileError> {
    let state = &input.state;
    let node = &input.node_name;
    let err = |source| CompileError::Identity {
        node: node.clone(),
        source,
    };
    let mut out = Compiled::default();

    // 1. Validate policies. A rejected one still isolates what it selects (fail closed).
    let mut policies: Vec<ValidPolicy> = Vec::new();
    let mut rejected: Vec<Vec<Rejection>> = Vec::new();
    for (key, p) in &state.policies {
        let (valid, rejections) = validate(key, p);
        out.rejections.extend(rejections.iter().cloned());
        policies.push(valid);
        rejected.push(rejections);
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
    let blocks: BTreeSet<Arc<IpBlockLabel>> = policies.iter().flat_map(policy_blocks).collect();
    let pod_prefixes = named_port_pod_prefixes(&policies, &out.ipcache, &ids);
    let cidrs: CidrIdentities = cidr_identities(&blocks, &pod_prefixes, alloc).map_err(err)?;
    out.cidr_identities = cidrs.prefixes.clone();
    for (id, labels) in &cidrs.labels {
        out.identity_names.insert(*id, format!("cidr:{labels}"));
    }

    // 5. Subjects: what each policy gives the local identities it selects, then each subject's
    // rule set from the policies that select it.
    let mut namespaces: BTreeSet<String> = state.namespaces.keys().cloned().collect();
    namespaces.extend(ids.by_namespace.keys().cloned());
    let mut local_by_ns: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for id in &local_ids {
        if let Some(k) = ids.keys.get(id) {
            local_by_ns
                .entry(k.namespace.clone())
                .or_default()
                .push(*id);
        }
    }
    let mut index = PolicyIndex {
        ids,
        namespaces,
        local_by_ns,
        cidrs,
        memo: Memo::default(),
        policies: BTreeMap::new(),
        selecting: HashMap::new(),
    };
    let mut used_rules: BTreeSet<RuleOrigin> = BTreeSet::new();
    {
        let PolicyIndex {
            ids,
            namespaces,
            local_by_ns,
            cidrs,
            memo,
            policies: outputs,
            selecting,
        } = &mut index;
        let mut resolver = Resolver {
            state,
            ids,
            namespaces,
            memo,
        };
        for (p, rejections) in policies.iter().zip(rejected) {
            let po = compile_policy(p, rejections, local_by_ns, &mut resolver, cidrs, alloc);
            for s in &po.selected {
                selecting.entry(*s).or_default().insert(p.key.clone());
            }
            for (id, origin) in &po.origins {
                out.rule_origins.insert(*id, origin.clone());
                used_rules.insert(origin.clone());
            }
            outputs.insert(p.key.clone(), po);
        }
    }
    for id in &local_ids {
        out.subjects.insert(*id, index.subject_rules(*id));
    }

    let pods_used: BTreeSet<&PodIdentityKey> = index.ids.keys.values().collect();
    let cidrs_used: BTreeSet<_> = index.cidrs.labels.values().collect();
    alloc.retain(&pods_used, &cidrs_used, &used_rules.iter().collect());
    Ok((out, index))
}

/// A policy validated: what it enforces, and its rejections (fail closed: a rejected policy
/// still isolates what it selects).
fn validate(
    key: &ObjectKey,
    policy: &crate::model::NetworkPolicy,
) -> (ValidPolicy, Vec<Rejection>) {
    match check(key, policy) {
        Ok(v) => (v, Vec::new()),
        Err(r) => {
            let r = *r;
            (r.isolation, r.rejections)
        }
    }
}

/// What one policy gives the local identities it selects.
#[derive(Debug)]
struct PolicyOutput {
    /// The local identities it selects.
    selected: Vec<u32>,
    /// The directions it isolates.
    ingress: bool,
    egress: bool,
    /// Its compiled rules with their ids (none when it selects nothing here).
    rules: Vec<(u32, Arc<CompiledRule>)>,
    origins: Vec<(u32, RuleOrigin)>,
    rejections: Vec<Rejection>,
    /// Its ipBlocks, and whether one of its egress rules has a named port and an ipBlock: both
    /// shape the CIDR identities.
    blocks: BTreeSet<Arc<IpBlockLabel>>,
    named_port_blocks: bool,
}

fn policy_blocks(p: &ValidPolicy) -> BTreeSet<Arc<IpBlockLabel>> {
    p.ingress
        .iter()
        .flatten()
        .chain(p.egress.iter().flatten())
        .flat_map(|r| r.peers.iter())
        .filter_map(|p| match p {
            ValidPeer::IpBlock(b) => Some(Arc::clone(b)),
            ValidPeer::Pods { .. } => None,
        })
        .collect()
}

fn has_named_port_blocks(p: &ValidPolicy) -> bool {
    p.egress.iter().flatten().any(|r| {
        r.ports.iter().any(|p| matches!(p, ValidPort::Named(..)))
            && r.peers.iter().any(|p| matches!(p, ValidPeer::IpBlock(_)))
    })
}

fn compile_policy(
    p: &ValidPolicy,
    rejections: Vec<Rejection>,
    local_by_ns: &BTreeMap<String, Vec<u32>>,
    resolver: &mut Resolver<'_>,
    cidrs: &CidrIdentities,
    alloc: &mut IdentityAllocator,
) -> PolicyOutput {
    let selected: Vec<u32> = local_by_ns
        .get(p.key.namespace.as_str())
        .into_iter()
        .flatten()
        .copied()
        .filter(|id| {
            resolver
                .ids
                .keys
                .get(id)
                .is_some_and(|k| p.subjects.matches(&k.labels))
        })
        .collect();
    let mut out = PolicyOutput {
        ingress: p.ingress.is_some(),
        egress: p.egress.is_some(),
        rules: Vec::new(),
        origins: Vec::new(),
        rejections,
        blocks: policy_blocks(p),
        named_port_blocks: has_named_port_blocks(p),
        selected,
    };
    if out.selected.is_empty() {
        return out;
    }
    for (direction, rules) in [(DIR_INGRESS, &p.ingress), (DIR_EGRESS, &p.egress)] {
        for rule in rules.iter().flatten() {
            let origin = RuleOrigin {
                policy: p.key.clone(),
                direction,
                index: rule.index,
            };
            let rule_id = alloc.rule(&origin);
            out.origins.push((rule_id, origin));
            let key: RuleKey = (
                direction,
                p.key.namespace.clone(),
                rule.peers.clone(),
                rule.ports.clone(),
            );
            let compiled = match resolver.memo.rules.get(&key) {
                Some(c) => Arc::clone(c),
                None => {
                    let c = Arc::new(compile_rule(
                        direction,
                        rule,
                        &p.key.namespace,
                        resolver,
                        cidrs,
                    ));
                    resolver.memo.rules.insert(key, Arc::clone(&c));
                    c
                }
            };
            out.rules.push((rule_id, compiled));
        }
    }
    out
}

/// What a compile computed on the way, kept so that a change of policies alone recomputes
/// only those policies and the subjects they select (or selected). Valid while pods (their
/// identities and which are local), namespaces, nodes and CIDR identities stay as compiled;
/// see [`crate::incremental`].
#[derive(Debug)]
pub struct PolicyIndex {
    ids: Identities,
    namespaces: BTreeSet<String>,
    local_by_ns: BTreeMap<String, Vec<u32>>,
    cidrs: CidrIdentities,
    memo: Memo,
    /// Every policy's output, in the compiler's order (by key).
    policies: BTreeMap<ObjectKey, PolicyOutput>,
    /// Local identity → the policies that select it.
    selecting: HashMap<u32, BTreeSet<ObjectKey>>,
}

impl PolicyIndex {
    /// The rule set of one local identity, from the policies that select it: each distinct
    /// match once, with the lowest rule id that gives it.
    fn subject_rules(&self, subject: u32) -> SubjectRules {
        let mut sr = SubjectRules::default();
        let key = self.ids.keys.get(&subject);
        // Each distinct compiled rule once (rules of many policies are shared), with the lowest
        // rule id that gave it; matches are sorted once at the end.
        let mut shared: HashMap<*const CompiledRule, (&Arc<CompiledRule>, u32)> = HashMap::new();
        let mut matches: Vec<(RuleMatch, u32)> = Vec::new();
        let mut scratch: Vec<RuleMatch> = Vec::new();
        let selecting = self.selecting.get(&subject).into_iter().flatten();
        for (policy, po) in selecting.filter_map(|k| Some((k, self.policies.get(k)?))) {
            if po.ingress {
                sr.isolated_ingress = true;
                sr.selected_by_ingress.insert(policy.clone());
            }
            if po.egress {
                sr.isolated_egress = true;
                sr.selected_by_egress.insert(policy.clone());
            }
            for (rule_id, rule) in &po.rules {
                shared
                    .entry(Arc::as_ptr(rule))
                    .and_modify(|(_, id)| *id = (*id).min(*rule_id))
                    .or_insert((rule, *rule_id));
                if !rule.named_ingress.is_empty()
                    && let Some(k) = key
                {
                    scratch.clear();
                    subject_matches(rule, k, &mut scratch);
                    matches.extend(scratch.iter().map(|m| (*m, *rule_id)));
                }
            }
        }
        for (rule, id) in shared.into_values() {
            matches.extend(rule.common.iter().map(|m| (*m, id)));
        }
        // Sorted by match, then rule id: the first of each match has the lowest id.
        matches.sort_unstable();
        matches.dedup_by_key(|(m, _)| *m);
        sr.rules = matches.into_iter().collect();
        // The node itself reaches its own pods even when they are isolated: kubelet's probes
        // come from there. A rule that already allows the host keeps its own id.
        if sr.isolated_ingress {
            let from_host = RuleMatch {
                direction: DIR_INGRESS,
                peer: IDENTITY_HOST,
                proto: None,
                port: None,
            };
            sr.rules.entry(from_host).or_insert(RULE_FROM_HOST);
        }
        sr
    }

    /// The policies `changed` (added, modified or removed in `input.state`; pods, namespaces,
    /// nodes and local endpoints as compiled last): recomputes those policies and the subjects
    /// they select or selected, patches `compiled` and `alloc` as a full compile would, and
    /// returns the subjects whose rule sets changed. `None` when the change reshapes CIDR
    /// identities (ipBlocks added or removed, named ports with ipBlocks): then nothing was
    /// changed and the caller compiles in full.
    pub fn policies_changed(
        &mut self,
        input: &CompileInput,
        changed: &[ObjectKey],
        alloc: &mut IdentityAllocator,
        compiled: &mut Compiled,
    ) -> Option<BTreeSet<u32>> {
        let mut changed: Vec<&ObjectKey> = changed.iter().collect();
        // New rule ids are handed out in the order a full compile would.
        changed.sort_unstable();
        changed.dedup();
        let mut validated = Vec::with_capacity(changed.len());
        for key in changed {
            let old = self.policies.get(key);
            let new = input.state.policies.get(key).map(|p| validate(key, p));
            let new_blocks = new
                .as_ref()
                .map(|(v, _)| policy_blocks(v))
                .unwrap_or_default();
            let old_blocks = old.map(|o| &o.blocks);
            if old_blocks.unwrap_or(&BTreeSet::new()) != &new_blocks
                || old.is_some_and(|o| o.named_port_blocks)
                || new.as_ref().is_some_and(|(v, _)| has_named_port_blocks(v))
            {
                return None;
            }
            validated.push((key, new));
        }
        let Self {
            ids,
            namespaces,
            local_by_ns,
            cidrs,
            memo,
            policies,
            selecting,
        } = self;
        let mut resolver = Resolver {
            state: &input.state,
            ids,
            namespaces,
            memo,
        };
        let mut affected: BTreeSet<u32> = BTreeSet::new();
        let mut rejections_changed = false;
        for (key, new) in validated {
            let new = new.map(|(valid, rejections)| {
                compile_policy(&valid, rejections, local_by_ns, &mut resolver, cidrs, alloc)
            });
            let old = match new {
                Some(new) => policies.insert(key.clone(), new),
                None => policies.remove(key),
            };
            let new = policies.get(key);
            let new_origins: BTreeSet<&RuleOrigin> = new
                .iter()
                .flat_map(|n| n.origins.iter().map(|(_, o)| o))
                .collect();
            if let Some(old) = &old {
                rejections_changed |= !old.rejections.is_empty();
                for s in &old.selected {
                    affected.insert(*s);
                    if let Some(set) = selecting.get_mut(s) {
                        set.remove(key);
                    }
                }
                for (id, origin) in &old.origins {
                    if !new_origins.contains(origin) {
                        compiled.rule_origins.remove(id);
                        alloc.forget_rule(origin);
                    }
                }
            }
            if let Some(new) = new {
                rejections_changed |= !new.rejections.is_empty();
                for s in &new.selected {
                    affected.insert(*s);
                    selecting.entry(*s).or_default().insert(key.clone());
                }
                for (id, origin) in &new.origins {
                    compiled.rule_origins.insert(*id, origin.clone());
                }
            }
        }
        if rejections_changed {
            compiled.rejections = self
                .policies
                .values()
                .flat_map(|p| p.rejections.iter().cloned())
                .collect();
        }
        let mut subjects_changed = BTreeSet::new();
        for s in affected {
            let rules = self.subject_rules(s);
            if let Some(old) = compiled.subjects.get_mut(&s)
                && *old != rules
            {
                *old = rules;
                subjects_changed.insert(s);
            }
        }
        Some(subjects_changed)
    }
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
#[derive(Debug)]
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
