//! Events that cost what they change, not the size of the cluster: [`Incremental::compile`]
//! is the full compile ([`compile()`](crate::compile()), the reference) that also keeps what
//! the next events need, and two kinds of event are then applied to its output in place:
//! - **policies changed** (and nothing else): only those policies are validated and compiled
//!   again, and only the subjects they select or selected get their rule sets recomputed
//!   ([`PolicyIndex::policies_changed`]); selector results and compiled rules are reused;
//! - **pods changed, addresses only** (below);
//! - **local endpoints wired or unwired** for pods of this node (a CNI ADD or DEL): the pod's
//!   identity is a subject already (its Pod names this node), so only the addresses it gains or
//!   loses change, in the ipcache and the local addresses ([`Incremental::endpoints_changed`]).
//!
//! Anything else (namespaces, nodes, the endpoint of a pod that names another node or none, a
//! label set that appears or disappears, ipBlocks added or removed) compiles in full. Each answer of "in place" is exactly what a
//! full compile of the new state gives, with the same identity allocator: the tests compare
//! them over random event sequences.
//!
//! # Pod events that change only addresses
//! Most pod events in a large cluster are pods of other nodes coming and going with labels
//! (and named ports) that other running pods already have: a Deployment scaling, a rollout's
//! new replicas. Such an event changes no identity, hence no selector result, no subject's
//! rules, no rule id: only the ipcache entries of the addresses the pod held and holds. This
//! module recognises exactly those events and patches the ipcache; everything else (a local
//! pod, a label set that appears or disappears, policies, namespaces, nodes) answers "compile
//! in full", and the caller does.
//!
//! Why the patch equals a full compile of the new state, entry by entry: the compiler gives
//! an address, in this order, to a local endpoint's pod (unchanged here: local pods and the
//! IPAM's addresses are not part of such an event), then to the first pod by namespace/name
//! that claims it in `status.podIPs` (not terminated, not hostNetwork), then to a Node's
//! `InternalIP`. [`Incremental`] keeps, per address, the set of pods claiming it, and decides
//! each touched address with that same order. The identity set is unchanged, so the identity
//! allocator hands out nothing and forgets nothing, and every other part of the output is
//! what it was. One part of the output does follow addresses: the exact CIDR prefixes of pods
//! inside ipBlocks that egress rules combine with named ports (see [`crate::cidr`]); while any
//! policy could produce such rules, every pod event compiles in full.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use weir_common::{IDENTITY_HOST, IDENTITY_REMOTE_NODE};

use crate::{
    compile::{CompileError, CompileInput, PolicyIndex, compile_indexed, pod_identity_key},
    identity::IdentityAllocator,
    model::{ClusterState, IntOrString, ObjectKey, Pod},
    output::Compiled,
};

/// What one pod contributes to the output, as far as address-only events are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodFacts {
    /// Its identity (`None`: hostNetwork, no identity).
    identity: Option<u32>,
    /// On this node (a subject): its events are never address-only.
    local: bool,
    /// The addresses it claims in `status.podIPs` (none when local or terminated).
    claims: Vec<IpAddr>,
}

/// What the last compile leaves for the events that follow it.
#[derive(Debug)]
pub struct Incremental {
    addresses: AddressIndex,
    policies: PolicyIndex,
}

impl Incremental {
    /// Compiles `input` in full, as [`compile()`](crate::compile()) does, and keeps what the
    /// next events need.
    pub fn compile(
        input: &CompileInput,
        alloc: &mut IdentityAllocator,
    ) -> Result<(Compiled, Self), CompileError> {
        let (compiled, policies) = compile_indexed(input, alloc)?;
        let addresses = AddressIndex::new(input, alloc);
        Ok((
            compiled,
            Self {
                addresses,
                policies,
            },
        ))
    }

    /// The pods `changed` (added, modified or removed in `input.state`, the new state; every
    /// other object as compiled last) as an address-only event: patches `compiled` (the last
    /// compile's output, or the last event's) and returns the ipcache changes. `None` when
    /// the event changes more than addresses: then nothing was changed and the caller
    /// compiles in full.
    pub fn pods_changed(
        &mut self,
        input: &CompileInput,
        changed: &[ObjectKey],
        alloc: &IdentityAllocator,
        compiled: &mut Compiled,
    ) -> Option<IpcacheChanges> {
        self.addresses.pods_changed(input, changed, alloc, compiled)
    }

    /// The local endpoints of the pods `wired` changed (`input.local_endpoints` holds the new
    /// addresses; everything else as compiled last): patches `compiled` and returns what
    /// changed. `None` when the change needs a full compile (a pod not in the state, of the
    /// host's network, or whose Pod does not name this node, or pod addresses that may be CIDR
    /// prefixes); nothing was changed then.
    pub fn endpoints_changed(
        &mut self,
        input: &CompileInput,
        wired: &[ObjectKey],
        compiled: &mut Compiled,
    ) -> Option<EndpointChanges> {
        self.addresses.endpoints_changed(input, wired, compiled)
    }

    /// The policies `changed` (added, modified or removed in `input.state`; everything else
    /// as compiled last): patches `compiled` and `alloc` and returns the subjects whose rule
    /// sets changed. `None` when the change needs a full compile; nothing was changed then.
    pub fn policies_changed(
        &mut self,
        input: &CompileInput,
        changed: &[ObjectKey],
        alloc: &mut IdentityAllocator,
        compiled: &mut Compiled,
    ) -> Option<BTreeSet<u32>> {
        let subjects = self
            .policies
            .policies_changed(input, changed, alloc, compiled)?;
        self.addresses.addresses_in_cidrs = addresses_in_cidrs(&input.state);
        Some(subjects)
    }
}

/// The indexes an address-only pod event needs, as of the last compile.
#[derive(Clone, Debug, Default)]
struct AddressIndex {
    pods: HashMap<ObjectKey, PodFacts>,
    /// Identity → how many pods carry it.
    uses: HashMap<u32, usize>,
    /// Address → the non-local pods claiming it (the first one wins).
    claims: HashMap<IpAddr, Claimants>,
    /// Addresses of local endpoints → the pods wired with them (the first one wins, as in a
    /// compile): theirs whatever other pods claim.
    local_claims: HashMap<IpAddr, Claimants>,
    /// The local endpoints' addresses of each pod, as last compiled.
    local_of: HashMap<ObjectKey, Vec<IpAddr>>,
    /// Node `InternalIP`s and their identity (the first node by name wins, as in a compile).
    node_addresses: HashMap<IpAddr, u32>,
    /// Some policy may make pod addresses CIDR prefixes (named port and ipBlock in one egress
    /// rule): then every pod event compiles in full.
    addresses_in_cidrs: bool,
}

/// The pods claiming one address, in key order. Almost always one pod: a sorted vector holds
/// it in a fraction of the memory of a `BTreeSet`'s node, and the rare address claimed by a
/// few pods costs a shift.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Claimants(Vec<ObjectKey>);

impl Claimants {
    fn insert(&mut self, key: ObjectKey) {
        if let Err(at) = self.0.binary_search(&key) {
            self.0.insert(at, key);
        }
    }

    fn remove(&mut self, key: &ObjectKey) {
        if let Ok(at) = self.0.binary_search(key) {
            self.0.remove(at);
        }
    }

    /// The claimant that wins: the first by namespace/name.
    fn first(&self) -> Option<&ObjectKey> {
        self.0.first()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ipcache entries an event changes: prefix → its new identity, `None` to delete.
pub type IpcacheChanges = BTreeMap<IpNet, Option<u32>>;

/// What wiring or unwiring local endpoints changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointChanges {
    pub ipcache: IpcacheChanges,
    /// Local addresses → their pod and identity now (`Compiled::local_addresses`), `None`
    /// when the address is no longer a local endpoint's.
    pub local_addresses: BTreeMap<IpAddr, Option<(ObjectKey, u32)>>,
}

fn facts(
    input: &CompileInput,
    key: &ObjectKey,
    pod: &Pod,
    identity: impl FnOnce(&Pod) -> Option<u32>,
) -> Option<PodFacts> {
    if pod.spec.host_network {
        return Some(PodFacts {
            identity: None,
            local: false,
            claims: Vec::new(),
        });
    }
    let identity = identity(pod)?;
    let local = input.local_endpoints.contains_key(key)
        || pod.spec.node_name.as_deref() == Some(input.node_name.as_str());
    let claims = if local || pod.status.terminated() {
        Vec::new()
    } else {
        pod.status
            .pod_ips
            .iter()
            .filter_map(|ip| ip.ip.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .collect()
    };
    Some(PodFacts {
        identity: Some(identity),
        local,
        claims,
    })
}

/// Whether some egress rule of some policy has a named port and an ipBlock peer (read from the
/// objects as written, before validation: a rejected one only costs full compiles).
fn addresses_in_cidrs(state: &ClusterState) -> bool {
    state.policies.values().any(|p| {
        p.spec.egress.iter().flatten().any(|rule| {
            rule.ports
                .iter()
                .any(|port| matches!(port.port, Some(IntOrString::String(_))))
                && rule.to.iter().any(|peer| peer.ip_block.is_some())
        })
    })
}

impl AddressIndex {
    /// The indexes of the state `input` that `alloc` has just compiled (without error).
    fn new(input: &CompileInput, alloc: &IdentityAllocator) -> Self {
        let mut this = Self {
            addresses_in_cidrs: addresses_in_cidrs(&input.state),
            ..Self::default()
        };
        let cluster_id = input.cluster_id;
        for (key, pod) in &input.state.pods {
            let Some(f) = facts(input, key, pod, |pod| {
                alloc.pod_id(cluster_id, &pod_identity_key(&key.namespace, pod))
            }) else {
                // Not allocated: the compile failed part-way; nothing here can be trusted.
                return Self {
                    addresses_in_cidrs: true,
                    ..Self::default()
                };
            };
            this.add(key, f);
        }
        for (key, addrs) in &input.local_endpoints {
            if input
                .state
                .pods
                .get(key)
                .is_some_and(|p| !p.spec.host_network)
            {
                this.wire(key, addrs.clone());
            }
        }
        for (name, node) in &input.state.nodes {
            let id = if *name == input.node_name {
                IDENTITY_HOST
            } else {
                IDENTITY_REMOTE_NODE
            };
            for a in node
                .status
                .addresses
                .iter()
                .filter(|a| a.kind == "InternalIP")
            {
                if let Ok(addr) = a.address.trim().parse::<IpAddr>() {
                    this.node_addresses.entry(addr.to_canonical()).or_insert(id);
                }
            }
        }
        this
    }

    fn add(&mut self, key: &ObjectKey, f: PodFacts) {
        if let Some(id) = f.identity {
            *self.uses.entry(id).or_default() += 1;
        }
        for a in &f.claims {
            self.claims.entry(*a).or_default().insert(key.clone());
        }
        self.pods.insert(key.clone(), f);
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<PodFacts> {
        let f = self.pods.remove(key)?;
        if let Some(id) = f.identity
            && let Some(n) = self.uses.get_mut(&id)
        {
            *n -= 1;
            if *n == 0 {
                self.uses.remove(&id);
            }
        }
        for a in &f.claims {
            if let Some(set) = self.claims.get_mut(a) {
                set.remove(key);
                if set.is_empty() {
                    self.claims.remove(a);
                }
            }
        }
        Some(f)
    }

    fn pods_changed(
        &mut self,
        input: &CompileInput,
        changed: &[ObjectKey],
        alloc: &IdentityAllocator,
        compiled: &mut Compiled,
    ) -> Option<IpcacheChanges> {
        if self.addresses_in_cidrs {
            return None;
        }
        let mut new_facts = Vec::with_capacity(changed.len());
        for key in changed {
            let after = match input.state.pods.get(key) {
                Some(pod) => Some(facts(input, key, pod, |pod| {
                    alloc.pod_id(input.cluster_id, &pod_identity_key(&key.namespace, pod))
                })?),
                None => None,
            };
            let before = self.pods.get(key);
            if before.is_some_and(|f| f.local) || after.as_ref().is_some_and(|f| f.local) {
                return None;
            }
            new_facts.push((key, after));
        }
        // Apply to a copy of the counts first: an identity must neither appear nor vanish.
        let mut uses: HashMap<u32, isize> = HashMap::new();
        for (key, after) in &new_facts {
            if let Some(id) = self.pods.get(*key).and_then(|f| f.identity) {
                *uses.entry(id).or_default() -= 1;
            }
            if let Some(id) = after.as_ref().and_then(|f| f.identity) {
                *uses.entry(id).or_default() += 1;
            }
        }
        for (id, delta) in uses {
            let now = self.uses.get(&id).copied().unwrap_or(0) as isize;
            // A new identity (now 0) or one whose last pod goes.
            if now == 0 || now + delta <= 0 {
                return None;
            }
        }
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for (key, after) in new_facts {
            if let Some(before) = self.remove(key) {
                touched.extend(before.claims);
            }
            if let Some(after) = after {
                touched.extend(after.claims.iter().copied());
                self.add(key, after);
            }
        }
        let mut changes = IpcacheChanges::new();
        for addr in touched {
            if self.local_claims.contains_key(&addr) {
                continue;
            }
            let want = self.remote_owner(&addr);
            let prefix = IpNet::from(addr);
            if compiled.ipcache.get(&prefix).copied() == want {
                continue;
            }
            match want {
                Some(id) => compiled.ipcache.insert(prefix, id),
                None => compiled.ipcache.remove(&prefix),
            };
            changes.insert(prefix, want);
        }
        Some(changes)
    }

    /// The identity an address has when no local endpoint holds it: the first pod claiming it,
    /// else a Node's.
    fn remote_owner(&self, addr: &IpAddr) -> Option<u32> {
        self.claims
            .get(addr)
            .and_then(|set| set.first())
            .and_then(|key| self.pods.get(key))
            .and_then(|f| f.identity)
            .or_else(|| self.node_addresses.get(addr).copied())
    }

    /// Records `addrs` as the local endpoints' addresses of `key` (replacing its earlier ones).
    fn wire(&mut self, key: &ObjectKey, addrs: Vec<IpAddr>) {
        self.unwire(key);
        for a in &addrs {
            self.local_claims.entry(*a).or_default().insert(key.clone());
        }
        if !addrs.is_empty() {
            self.local_of.insert(key.clone(), addrs);
        }
    }

    /// Forgets the local endpoints' addresses of `key`; returns them.
    fn unwire(&mut self, key: &ObjectKey) -> Vec<IpAddr> {
        let addrs = self.local_of.remove(key).unwrap_or_default();
        for a in &addrs {
            if let Some(set) = self.local_claims.get_mut(a) {
                set.remove(key);
                if set.is_empty() {
                    self.local_claims.remove(a);
                }
            }
        }
        addrs
    }

    fn endpoints_changed(
        &mut self,
        input: &CompileInput,
        wired: &[ObjectKey],
        compiled: &mut Compiled,
    ) -> Option<EndpointChanges> {
        if self.addresses_in_cidrs {
            return None;
        }
        for key in wired {
            // A pod whose Pod names this node is a subject with or without endpoints: its
            // identity, rules and facts stay; anything else changes more than addresses.
            let pod = input.state.pods.get(key)?;
            if pod.spec.host_network
                || pod.spec.node_name.as_deref() != Some(input.node_name.as_str())
                || !self
                    .pods
                    .get(key)
                    .is_some_and(|f| f.local && f.identity.is_some())
            {
                return None;
            }
        }
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for key in wired {
            touched.extend(self.unwire(key));
            let addrs = input.local_endpoints.get(key).cloned().unwrap_or_default();
            touched.extend(addrs.iter().copied());
            self.wire(key, addrs);
        }
        let mut changes = EndpointChanges::default();
        for addr in touched {
            let local = self
                .local_claims
                .get(&addr)
                .and_then(|set| set.first())
                .and_then(|key| Some((key.clone(), self.pods.get(key)?.identity?)));
            let want = match &local {
                Some((_, id)) => Some(*id),
                None => self.remote_owner(&addr),
            };
            let prefix = IpNet::from(addr);
            if compiled.ipcache.get(&prefix).copied() != want {
                match want {
                    Some(id) => compiled.ipcache.insert(prefix, id),
                    None => compiled.ipcache.remove(&prefix),
                };
                changes.ipcache.insert(prefix, want);
            }
            if compiled.local_addresses.get(&addr) != local.as_ref() {
                match &local {
                    Some(owner) => compiled.local_addresses.insert(addr, owner.clone()),
                    None => compiled.local_addresses.remove(&addr),
                };
                changes.local_addresses.insert(addr, local);
            }
        }
        Some(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimants_keep_key_order_and_each_key_once() {
        let mut c = Claimants::default();
        assert!(c.is_empty() && c.first().is_none());
        c.insert(ObjectKey::new("b", "p"));
        c.insert(ObjectKey::new("a", "q"));
        c.insert(ObjectKey::new("b", "p"));
        assert_eq!(c.0, [ObjectKey::new("a", "q"), ObjectKey::new("b", "p")]);
        assert_eq!(c.first(), Some(&ObjectKey::new("a", "q")));
        c.remove(&ObjectKey::new("a", "q"));
        assert_eq!(c.first(), Some(&ObjectKey::new("b", "p")));
        c.remove(&ObjectKey::new("x", "absent"));
        c.remove(&ObjectKey::new("b", "p"));
        assert!(c.is_empty());
    }
}
