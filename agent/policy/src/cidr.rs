//! CIDR identities: ipBlocks (with their excepts) as prefixes in an LPM trie.
//!
//! Every ipBlock `cidr` and every `except` of every valid policy is a prefix. A prefix `P` gets
//! the label set `L(P)` = the ipBlocks `B` with `B.cidr ⊇ P` and no except of `B` ⊇ `P`, and one
//! CIDR identity per distinct label set (`IDENTITY_WORLD` for the empty set, which still gets
//! an entry so that a longer empty prefix shadows a shorter one that has labels).
//!
//! Why the longest match is exact: the inserted prefixes that contain an address `a` form a
//! chain (two prefixes that share an address are nested). Let `P` be the longest of them. For
//! any ipBlock `B`: if `a ∈ B.cidr`, then `B.cidr` is in the chain, so `B.cidr ⊇ P`; if
//! `a ∉ B.cidr`, then `B.cidr ⊉ P` because `a ∈ P`. Likewise an except `e` of `B` contains `P`
//! iff it contains `a`. So `B ∈ L(P)` iff `a ∈ B.cidr` and `a` is in none of `B`'s excepts, i.e.
//! iff `a` is in `B`. If no inserted prefix contains `a`, `a` is in no ipBlock at all.
//!
//! Named ports with ipBlocks: an egress rule with a named port and an ipBlock peer allows an
//! address only if it is a pod whose named port resolves to the packet's port. For that, every
//! pod address inside such a block whose pod has one of the rules' port names gets its own
//! exact prefix (/32, /128), labelled like any prefix (the blocks containing it, computed the
//! same way, so the argument above holds: the exact prefix is the longest match of exactly its
//! address and carries every block that contains the address) plus the pod's named ports
//! ([`CidrLabels::pod_ports`]). Rules with that block compile for these identities to the ports
//! the names resolve to; numeric rules see the same blocks as before. The prefixes follow the
//! pods: they are recomputed on every compile from the ipcache.
//!
//! Families: the kernel keeps IPv4 as `::ffff:a.b.c.d`, so an IPv6 prefix shorter than /96
//! that covers `::ffff:0:0/96` would also be the longest match of IPv4 addresses no IPv4
//! prefix covers. Whenever such a prefix exists, `0.0.0.0/0` is inserted too (with its own,
//! IPv4-only label set), so IPv4 lookups always end on an IPv4 prefix. IPv6 ipBlocks inside
//! `::ffff:0:0/96` are rejected at validation.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weir_common::IDENTITY_WORLD;

use crate::{
    identity::{AllocError, CidrLabels, IdentityAllocator, NamedPort},
    validate::IpBlockLabel,
};

/// The CIDR identities of a set of ipBlocks.
#[derive(Clone, Debug, Default)]
pub struct CidrIdentities {
    /// Every prefix → its identity (`IDENTITY_WORLD` when its label set is empty).
    pub prefixes: BTreeMap<IpNet, u32>,
    /// Every ipBlock → the CIDR identities whose label set contains it.
    pub by_block: HashMap<Arc<IpBlockLabel>, Vec<u32>>,
    /// Identity → its label set.
    pub labels: BTreeMap<u32, CidrLabels>,
}

fn mapped_cover() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96).unwrap_or_default()
}

/// Computes the prefixes, label sets and identities of `blocks`, and of the exact pod prefixes
/// `pod_prefixes` (address prefix → the pod's named ports that rules use).
pub fn cidr_identities(
    blocks: &BTreeSet<Arc<IpBlockLabel>>,
    pod_prefixes: &BTreeMap<IpNet, BTreeSet<NamedPort>>,
    alloc: &mut IdentityAllocator,
) -> Result<CidrIdentities, AllocError> {
    let mut by_cidr: HashMap<IpNet, Vec<&Arc<IpBlockLabel>>> = HashMap::new();
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for b in blocks {
        by_cidr.entry(b.cidr).or_default().push(b);
        prefixes.insert(b.cidr);
        prefixes.extend(b.except.iter().copied());
    }
    prefixes.extend(pod_prefixes.keys().copied());
    let cover = mapped_cover();
    if prefixes
        .iter()
        .any(|p| matches!(p, IpNet::V6(v6) if v6.contains(&cover)))
    {
        prefixes.insert(IpNet::V4(
            Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_default(),
        ));
    }

    let mut sets: BTreeMap<IpNet, BTreeSet<&Arc<IpBlockLabel>>> = BTreeMap::new();
    for &p in &prefixes {
        let mut set = BTreeSet::new();
        for len in 0..=p.prefix_len() {
            let Ok(sup) = IpNet::new(p.addr(), len).map(|n| n.trunc()) else {
                continue;
            };
            for b in by_cidr.get(&sup).into_iter().flatten() {
                if !b.except.iter().any(|e| e.contains(&p)) {
                    set.insert(*b);
                }
            }
        }
        sets.insert(p, set);
    }

    let label_set = |p: &IpNet, set: &BTreeSet<&Arc<IpBlockLabel>>| CidrLabels {
        blocks: set.iter().map(|b| (***b).clone()).collect(),
        pod_ports: pod_prefixes.get(p).cloned().unwrap_or_default(),
    };
    // Allocate in sorted label-set order so that a fresh allocator is deterministic.
    let distinct: BTreeSet<CidrLabels> = sets
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(p, s)| label_set(p, s))
        .collect();
    let mut ids: BTreeMap<CidrLabels, u32> = BTreeMap::new();
    for labels in distinct {
        let id = alloc.cidr(&labels)?;
        ids.insert(labels, id);
    }

    let mut out = CidrIdentities::default();
    let mut by_block: HashMap<Arc<IpBlockLabel>, BTreeSet<u32>> = HashMap::new();
    for (p, set) in sets {
        // A prefix in no block: also a pod prefix cannot be (pod prefixes are only made for
        // addresses inside a block), so its pod ports never matter.
        if set.is_empty() {
            out.prefixes.insert(p, IDENTITY_WORLD);
            continue;
        }
        let labels = label_set(&p, &set);
        let id = ids.get(&labels).copied().unwrap_or(IDENTITY_WORLD);
        out.prefixes.insert(p, id);
        for b in set {
            by_block.entry(Arc::clone(b)).or_default().insert(id);
        }
        out.labels.insert(id, labels);
    }
    out.by_block = by_block
        .into_iter()
        .map(|(b, ids)| (b, ids.into_iter().collect()))
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(cidr: &str, except: &[&str]) -> Arc<IpBlockLabel> {
        Arc::new(IpBlockLabel {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn label_sets_follow_containment_and_excepts() {
        let a = block("10.0.0.0/8", &["10.1.0.0/16"]);
        let b = block("10.1.0.0/16", &[]);
        let blocks = BTreeSet::from([Arc::clone(&a), Arc::clone(&b)]);
        let c = cidr_identities(&blocks, &BTreeMap::new(), &mut IdentityAllocator::new()).unwrap();
        let id = |p: &str| c.prefixes[&p.parse::<IpNet>().unwrap()];
        // 10/8 has {a}; 10.1/16 has {b} only (a excepts it).
        assert_ne!(id("10.0.0.0/8"), id("10.1.0.0/16"));
        assert_eq!(
            c.labels[&id("10.0.0.0/8")],
            CidrLabels::blocks(BTreeSet::from([(*a).clone()]))
        );
        assert_eq!(
            c.labels[&id("10.1.0.0/16")],
            CidrLabels::blocks(BTreeSet::from([(*b).clone()]))
        );
        assert_eq!(c.by_block[&a], vec![id("10.0.0.0/8")]);
        assert_eq!(c.prefixes.len(), 2);
    }

    #[test]
    fn empty_label_sets_are_world_and_v6_covers_get_a_v4_root() {
        let a = block("::/0", &["fd00::/8"]);
        let blocks = BTreeSet::from([Arc::clone(&a)]);
        let c = cidr_identities(&blocks, &BTreeMap::new(), &mut IdentityAllocator::new()).unwrap();
        assert_eq!(c.prefixes[&"fd00::/8".parse().unwrap()], IDENTITY_WORLD);
        assert_eq!(c.prefixes[&"0.0.0.0/0".parse().unwrap()], IDENTITY_WORLD);
        assert!(c.prefixes[&"::/0".parse().unwrap()] >= weir_common::IDENTITY_FIRST_CIDR);
    }

    #[test]
    fn pod_prefixes_carry_every_block_of_their_address_and_their_ports() {
        let a = block("10.0.0.0/8", &["10.1.0.0/16"]);
        let b = block("10.0.0.0/24", &[]);
        let blocks = BTreeSet::from([Arc::clone(&a), Arc::clone(&b)]);
        let http = NamedPort {
            name: "http".into(),
            proto: 6,
            port: 80,
        };
        let pods = BTreeMap::from([
            (
                "10.0.0.5/32".parse().unwrap(),
                BTreeSet::from([http.clone()]),
            ),
            (
                "10.2.0.5/32".parse().unwrap(),
                BTreeSet::from([http.clone()]),
            ),
        ]);
        let c = cidr_identities(&blocks, &pods, &mut IdentityAllocator::new()).unwrap();
        let id = |p: &str| c.prefixes[&p.parse::<IpNet>().unwrap()];
        let in_both = &c.labels[&id("10.0.0.5/32")];
        assert_eq!(in_both.blocks, BTreeSet::from([(*a).clone(), (*b).clone()]));
        assert_eq!(in_both.pod_ports, BTreeSet::from([http]));
        assert_eq!(
            c.labels[&id("10.2.0.5/32")].blocks,
            BTreeSet::from([(*a).clone()])
        );
        // The pod prefixes are distinct from their covering prefixes, and reached from the block.
        assert_ne!(id("10.0.0.5/32"), id("10.0.0.0/24"));
        assert!(c.by_block[&a].contains(&id("10.0.0.5/32")));
        assert!(c.by_block[&b].contains(&id("10.0.0.5/32")));
        assert!(!c.by_block[&b].contains(&id("10.2.0.5/32")));
    }
}
