//! The datapath writer: diffs the desired map contents against what the maps hold and writes the
//! delta, in an order that never opens a gap a packet could see:
//!
//! 1. new ipcache and CIDR entries (new peers become known);
//! 2. per changed subject: its rules under a new version beside the old, then one update of the
//!    subject entry flips to the new version (a packet sees old or new rules, never a mix), then
//!    the old version's rules are deleted;
//! 3. endpoints (a new endpoint appears only once its subject's rules are live);
//! 4. removals (endpoints, subjects, ipcache/CIDR entries no longer wanted);
//! 5. the config generation is bumped, so conntrack entries get re-checked (revocation).
//!
//! At start-up the writer adopts what a previous agent left in the pinned maps, so the first
//! apply writes only differences and deletes leftovers only after the wanted state is in place.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{LpmTrie, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use weir_common::{
    Addr, AddrKey, Config, EndpointInfo, EndpointKey, IdentityValue, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, PolicyKey, PolicyValue, SubjectKey, SubjectPolicy,
};
use weir_policy::output::RuleMatch;

use super::{
    addr::{prefix_to_kernel, to_kernel},
    maps::DatapathMaps,
};

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    pub ipcache: BTreeMap<IpNet, u32>,
    pub cidr_identities: BTreeMap<IpNet, u32>,
    pub subjects: BTreeMap<u32, SubjectState>,
    /// `CONFIG_*` flags.
    pub config_flags: u32,
}

/// One subject's isolation flags and rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectState {
    /// `SUBJECT_ISOLATED_*`.
    pub flags: u32,
    pub rules: BTreeMap<RuleMatch, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "writing {what} to map {map}: {source} (a full map means the capacity in weir-common is too small for this cluster)"
    )]
    Map {
        map: &'static str,
        what: String,
        #[source]
        source: MapError,
    },
}

/// Counts of one apply, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
    pub subjects_changed: usize,
    pub generation: u32,
}

/// What the maps hold, as last written (or as adopted at start-up).
#[derive(Debug, Default)]
struct Applied {
    endpoints: BTreeMap<Addr, EndpointInfo>,
    ipcache: BTreeMap<(u32, Addr), u32>,
    cidr_identities: BTreeMap<(u32, Addr), u32>,
    /// Live version and state per subject.
    subjects: BTreeMap<u32, (u32, SubjectState)>,
    /// Policy keys that belong to no live (subject, version): leftovers to delete.
    stale_policy_keys: Vec<(u32, PolicyKey)>,
    config: Config,
}

pub struct Writer {
    maps: DatapathMaps,
    applied: Applied,
}

fn map_err(map: &'static str, what: impl std::fmt::Debug) -> impl FnOnce(MapError) -> WriteError {
    let what = format!("{what:?}");
    move |source| WriteError::Map { map, what, source }
}

/// The LPM key of one rule of a subject at a version.
pub fn policy_key(subject: u32, version: u32, rule: &RuleMatch) -> (u32, PolicyKey) {
    let (prefix, proto, port) = match (rule.proto, rule.port) {
        (None, _) => (POLICY_PREFIX_ANY_PROTO, 0, 0),
        (Some(proto), None) => (POLICY_PREFIX_ANY_PORT, proto, 0),
        (Some(proto), Some((first, bits))) => {
            (POLICY_PREFIX_ANY_PORT + u32::from(bits), proto, first)
        }
    };
    let key = PolicyKey {
        subject: subject.to_be(),
        version: version.to_be(),
        peer: rule.peer.to_be(),
        direction: rule.direction,
        proto,
        port: port.to_be(),
    };
    (prefix, key)
}

/// The rule a policy key holds (inverse of `policy_key`), with its subject and version.
fn rule_of_key(prefix: u32, key: &PolicyKey) -> (u32, u32, RuleMatch) {
    let proto = (prefix >= POLICY_PREFIX_ANY_PORT).then_some(key.proto);
    let port = (prefix > POLICY_PREFIX_ANY_PORT).then(|| {
        (
            u16::from_be(key.port),
            (prefix - POLICY_PREFIX_ANY_PORT) as u8,
        )
    });
    let rule = RuleMatch {
        direction: key.direction,
        peer: u32::from_be(key.peer),
        proto,
        port,
    };
    (u32::from_be(key.subject), u32::from_be(key.version), rule)
}

impl Writer {
    /// Adopts whatever the (possibly pinned, possibly inherited) maps hold.
    pub fn adopt(maps: DatapathMaps) -> Result<Self, WriteError> {
        let mut applied = Applied::default();
        for entry in maps.endpoints.iter() {
            let (k, v) = entry.map_err(map_err("WEIR_ENDPOINTS", "iterating"))?;
            applied.endpoints.insert(k.addr, v);
        }
        for entry in maps.ipcache.iter() {
            let (k, v) = entry.map_err(map_err("WEIR_IPCACHE", "iterating"))?;
            applied
                .ipcache
                .insert((k.prefix_len(), k.data().addr), v.identity);
        }
        for entry in maps.cidr_identities.iter() {
            let (k, v) = entry.map_err(map_err("WEIR_CIDR_IDS", "iterating"))?;
            applied
                .cidr_identities
                .insert((k.prefix_len(), k.data().addr), v.identity);
        }
        let mut versions = BTreeMap::new();
        for entry in maps.subjects.iter() {
            let (k, v) = entry.map_err(map_err("WEIR_SUBJECTS", "iterating"))?;
            versions.insert(k.identity, v);
            applied.subjects.insert(
                k.identity,
                (
                    v.version,
                    SubjectState {
                        flags: v.flags,
                        rules: BTreeMap::new(),
                    },
                ),
            );
        }
        for entry in maps.policy.iter() {
            let (k, v) = entry.map_err(map_err("WEIR_POLICY", "iterating"))?;
            let (prefix, key) = (k.prefix_len(), k.data());
            let (subject, version, rule) = rule_of_key(prefix, &key);
            match applied.subjects.get_mut(&subject) {
                Some((live, state)) if *live == version => {
                    state.rules.insert(rule, v.rule);
                }
                _ => {
                    applied.stale_policy_keys.push((prefix, key));
                }
            }
        }
        applied.config = maps.config.get(&0, 0).unwrap_or_default();
        Ok(Self { maps, applied })
    }

    /// The version of `subject`'s rules in the maps (what its drop events carry), 0 when it has
    /// none there.
    pub fn subject_version(&self, subject: u32) -> u32 {
        self.applied.subjects.get(&subject).map_or(0, |(v, _)| *v)
    }

    /// The config generation last written.
    pub fn generation(&self) -> u32 {
        self.applied.config.generation
    }

    /// Entries of each map the writer owns, against its capacity: `(map name, entries,
    /// capacity)`, from what was last written (no map walk).
    pub fn usage(&self) -> Vec<(&'static str, u64, u64)> {
        let n = |len: usize| u64::try_from(len).unwrap_or(u64::MAX);
        let policy_entries: usize = self
            .applied
            .subjects
            .values()
            .map(|(_, s)| s.rules.len())
            .sum::<usize>()
            + self.applied.stale_policy_keys.len();
        vec![
            (
                weir_common::MAP_ENDPOINTS,
                n(self.applied.endpoints.len()),
                u64::from(weir_common::MAX_ENDPOINTS),
            ),
            (
                weir_common::MAP_IPCACHE,
                n(self.applied.ipcache.len()),
                u64::from(weir_common::MAX_IPCACHE),
            ),
            (
                weir_common::MAP_CIDR_IDENTITIES,
                n(self.applied.cidr_identities.len()),
                u64::from(weir_common::MAX_CIDR_IDENTITIES),
            ),
            (
                weir_common::MAP_SUBJECTS,
                n(self.applied.subjects.len()),
                u64::from(weir_common::MAX_SUBJECTS),
            ),
            (
                weir_common::MAP_POLICY,
                n(policy_entries),
                u64::from(weir_common::MAX_POLICY_ENTRIES),
            ),
        ]
    }

    /// The datapath's counters (`WEIR_COUNTERS`, indexed by `REASON_*` and
    /// `COUNTER_EVENTS_LOST`), summed over CPUs; zeros where a slot cannot be read.
    pub fn counters(&self) -> Vec<u64> {
        (0..weir_common::REASON_COUNT)
            .map(|slot| {
                self.maps
                    .counters
                    .get(&slot, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Writes the difference between what the maps hold and `desired`.
    pub fn apply(&mut self, desired: &DesiredMaps) -> Result<ApplyStats, WriteError> {
        let mut stats = ApplyStats::default();
        let ipcache = kernel_prefixes(&desired.ipcache);
        let cidrs = kernel_prefixes(&desired.cidr_identities);

        // 1. New and changed peers.
        let (maps, applied) = (&mut self.maps, &mut self.applied);
        write_prefixes(
            &mut maps.ipcache,
            "WEIR_IPCACHE",
            &mut applied.ipcache,
            &ipcache,
            &mut stats,
        )?;
        write_prefixes(
            &mut maps.cidr_identities,
            "WEIR_CIDR_IDS",
            &mut applied.cidr_identities,
            &cidrs,
            &mut stats,
        )?;

        // 2. Subjects whose rules or isolation changed: new version beside the old, flip, delete.
        for (&subject, state) in &desired.subjects {
            self.write_subject(subject, state, &mut stats)?;
        }

        // 3. Endpoints, once their subjects are live.
        for (&addr, info) in &desired.endpoints {
            self.write_endpoint(to_kernel(addr), info, &mut stats)?;
        }

        // 4. Removals: endpoints first, so nothing points at what goes next.
        let wanted: BTreeSet<Addr> = desired.endpoints.keys().map(|a| to_kernel(*a)).collect();
        let gone: Vec<Addr> = self
            .applied
            .endpoints
            .keys()
            .filter(|a| !wanted.contains(*a))
            .copied()
            .collect();
        for addr in gone {
            self.remove_endpoint(addr, &mut stats);
        }
        let gone: Vec<u32> = self
            .applied
            .subjects
            .keys()
            .filter(|s| !desired.subjects.contains_key(s))
            .copied()
            .collect();
        for subject in gone {
            let _ = self.maps.subjects.remove(&SubjectKey { identity: subject });
            if let Some((version, old)) = self.applied.subjects.remove(&subject) {
                self.delete_rules(subject, version, &old.rules, &mut stats);
            }
            stats.deletes += 1;
        }
        for (len, key) in std::mem::take(&mut self.applied.stale_policy_keys) {
            let _ = self.maps.policy.remove(&Key::new(len, key));
            stats.deletes += 1;
        }
        let (maps, applied) = (&mut self.maps, &mut self.applied);
        delete_prefixes(
            &mut maps.ipcache,
            &mut applied.ipcache,
            &ipcache,
            &mut stats,
        );
        delete_prefixes(
            &mut maps.cidr_identities,
            &mut applied.cidr_identities,
            &cidrs,
            &mut stats,
        );

        // 5. Tell conntrack that policy moved.
        self.bump_generation(&mut stats, desired.config_flags)?;
        Ok(stats)
    }

    /// Writes only these ipcache changes (prefix → new identity, `None`: delete), for an event
    /// that changes nothing else (see `weir_policy::incremental`): new and changed entries
    /// first, removals after, then the config generation, in the order of [`Writer::apply`].
    pub fn apply_ipcache(
        &mut self,
        changes: &BTreeMap<IpNet, Option<u32>>,
    ) -> Result<ApplyStats, WriteError> {
        let mut stats = self.write_ipcache(changes)?;
        self.bump_generation(&mut stats, self.applied.config.flags)?;
        Ok(stats)
    }

    /// [`Writer::apply_ipcache`] without the config generation.
    fn write_ipcache(
        &mut self,
        changes: &BTreeMap<IpNet, Option<u32>>,
    ) -> Result<ApplyStats, WriteError> {
        let mut stats = ApplyStats::default();
        let kernel: Vec<((u32, Addr), Option<u32>)> = changes
            .iter()
            .map(|(net, id)| (prefix_to_kernel(*net), *id))
            .collect();
        let (maps, applied) = (&mut self.maps, &mut self.applied);
        for &((len, addr), identity) in &kernel {
            let Some(identity) = identity else { continue };
            if applied.ipcache.get(&(len, addr)) != Some(&identity) {
                let value = IdentityValue { identity, _pad: 0 };
                maps.ipcache
                    .insert(&Key::new(len, AddrKey { addr }), value, 0)
                    .map_err(map_err("WEIR_IPCACHE", (len, addr)))?;
                applied.ipcache.insert((len, addr), identity);
                stats.writes += 1;
            }
        }
        for &((len, addr), identity) in &kernel {
            if identity.is_none() && applied.ipcache.remove(&(len, addr)).is_some() {
                let _ = maps.ipcache.remove(&Key::new(len, AddrKey { addr }));
                stats.deletes += 1;
            }
        }
        Ok(stats)
    }

    /// Writes one local endpoint's entry unless it is in the map already.
    fn write_endpoint(
        &mut self,
        addr: Addr,
        info: &EndpointInfo,
        stats: &mut ApplyStats,
    ) -> Result<(), WriteError> {
        if self.applied.endpoints.get(&addr) != Some(info) {
            self.maps
                .endpoints
                .insert(EndpointKey { addr }, info, 0)
                .map_err(map_err("WEIR_ENDPOINTS", addr))?;
            self.applied.endpoints.insert(addr, *info);
            stats.writes += 1;
        }
        Ok(())
    }

    /// Deletes one local endpoint's entry if it was written.
    fn remove_endpoint(&mut self, addr: Addr, stats: &mut ApplyStats) {
        if self.applied.endpoints.remove(&addr).is_some() {
            // A failed delete of an entry that is already gone is fine.
            let _ = self.maps.endpoints.remove(&EndpointKey { addr });
            stats.deletes += 1;
        }
    }

    /// Writes only these local endpoint changes (address → its entry, `None`: delete) and the
    /// ipcache changes that go with them, for endpoints wired or unwired in place (see
    /// `weir_policy::incremental`), in the order of [`Writer::apply`]: new peers, then new
    /// endpoints (their subjects are live already), then removals, endpoints first, then the
    /// config generation.
    pub fn apply_endpoints(
        &mut self,
        ipcache: &BTreeMap<IpNet, Option<u32>>,
        endpoints: &BTreeMap<IpAddr, Option<EndpointInfo>>,
    ) -> Result<ApplyStats, WriteError> {
        let mut stats = ApplyStats::default();
        type Changes = BTreeMap<IpNet, Option<u32>>;
        let (added, removed): (Changes, Changes) = ipcache
            .iter()
            .map(|(prefix, id)| (*prefix, *id))
            .partition(|(_, id)| id.is_some());
        let added = self.write_ipcache(&added)?;
        for (&addr, info) in endpoints {
            if let Some(info) = info {
                self.write_endpoint(to_kernel(addr), info, &mut stats)?;
            }
        }
        for (&addr, info) in endpoints {
            if info.is_none() {
                self.remove_endpoint(to_kernel(addr), &mut stats);
            }
        }
        let removed = self.write_ipcache(&removed)?;
        stats.writes += added.writes + removed.writes;
        stats.deletes += added.deletes + removed.deletes;
        self.bump_generation(&mut stats, self.applied.config.flags)?;
        Ok(stats)
    }

    /// Writes only these subjects (each already in the maps or new; none goes), for a change
    /// of policies recomputed in place: step 2 of [`Writer::apply`] for them, then the config
    /// generation.
    pub fn apply_subjects(
        &mut self,
        subjects: &BTreeMap<u32, SubjectState>,
    ) -> Result<ApplyStats, WriteError> {
        let mut stats = ApplyStats::default();
        for (&subject, state) in subjects {
            self.write_subject(subject, state, &mut stats)?;
        }
        self.bump_generation(&mut stats, self.applied.config.flags)?;
        Ok(stats)
    }

    /// Step 2 for one subject: if its rules or isolation changed, its rules under a new version
    /// beside the old, the flip, the old version's rules deleted.
    fn write_subject(
        &mut self,
        subject: u32,
        state: &SubjectState,
        stats: &mut ApplyStats,
    ) -> Result<(), WriteError> {
        let previous = self.applied.subjects.get(&subject);
        if previous.is_some_and(|(_, applied)| applied == state) {
            return Ok(());
        }
        let version = previous.map_or(1, |(v, _)| v.wrapping_add(1).max(1));
        self.write_rules(subject, version, state, stats)?;
        self.maps
            .subjects
            .insert(
                SubjectKey { identity: subject },
                SubjectPolicy {
                    version,
                    flags: state.flags,
                },
                0,
            )
            .map_err(map_err("WEIR_SUBJECTS", subject))?;
        stats.writes += 1;
        stats.subjects_changed += 1;
        if let Some((old_version, old)) = self
            .applied
            .subjects
            .insert(subject, (version, state.clone()))
        {
            self.delete_rules(subject, old_version, &old.rules, stats);
        }
        Ok(())
    }

    /// Step 5: a new config generation when anything changed (and the flags).
    fn bump_generation(&mut self, stats: &mut ApplyStats, flags: u32) -> Result<(), WriteError> {
        let changed = stats.writes + stats.deletes > 0;
        let config = Config {
            generation: if changed {
                self.applied.config.generation.wrapping_add(1)
            } else {
                self.applied.config.generation
            },
            flags,
        };
        if config != self.applied.config {
            self.maps
                .config
                .set(0, config, 0)
                .map_err(map_err("WEIR_CONFIG", config))?;
            self.applied.config = config;
        }
        stats.generation = config.generation;
        Ok(())
    }

    fn write_rules(
        &mut self,
        subject: u32,
        version: u32,
        state: &SubjectState,
        stats: &mut ApplyStats,
    ) -> Result<(), WriteError> {
        for (n, (rule, &id)) in state.rules.iter().enumerate() {
            let (len, key) = policy_key(subject, version, rule);
            let value = PolicyValue { rule: id, _pad: 0 };
            if let Err(source) = self.maps.policy.insert(&Key::new(len, key), value, 0) {
                // Undo the half-written version; the live one is untouched.
                for rule in state.rules.keys().take(n) {
                    let (len, key) = policy_key(subject, version, rule);
                    let _ = self.maps.policy.remove(&Key::new(len, key));
                }
                return Err(WriteError::Map {
                    map: "WEIR_POLICY",
                    what: format!("subject {subject} version {version} rule {rule:?}"),
                    source,
                });
            }
            stats.writes += 1;
        }
        Ok(())
    }

    fn delete_rules(
        &mut self,
        subject: u32,
        version: u32,
        rules: &BTreeMap<RuleMatch, u32>,
        stats: &mut ApplyStats,
    ) {
        for rule in rules.keys() {
            let (len, key) = policy_key(subject, version, rule);
            let _ = self.maps.policy.remove(&Key::new(len, key));
            stats.deletes += 1;
        }
    }
}

/// An address-prefix trie (ipcache, CIDR identities) and what it holds.
type PrefixMap = LpmTrie<MapData, AddrKey, IdentityValue>;

/// Writes the prefixes whose identity is new or changed.
fn write_prefixes(
    map: &mut PrefixMap,
    name: &'static str,
    applied: &mut BTreeMap<(u32, Addr), u32>,
    desired: &BTreeMap<(u32, Addr), u32>,
    stats: &mut ApplyStats,
) -> Result<(), WriteError> {
    for (&(len, addr), &identity) in desired {
        if applied.get(&(len, addr)) != Some(&identity) {
            let value = IdentityValue { identity, _pad: 0 };
            map.insert(&Key::new(len, AddrKey { addr }), value, 0)
                .map_err(map_err(name, (len, addr)))?;
            applied.insert((len, addr), identity);
            stats.writes += 1;
        }
    }
    Ok(())
}

/// Deletes the prefixes no longer desired (already-gone entries are fine).
fn delete_prefixes(
    map: &mut PrefixMap,
    applied: &mut BTreeMap<(u32, Addr), u32>,
    desired: &BTreeMap<(u32, Addr), u32>,
    stats: &mut ApplyStats,
) {
    applied.retain(|&(len, addr), _| {
        if desired.contains_key(&(len, addr)) {
            return true;
        }
        let _ = map.remove(&Key::new(len, AddrKey { addr }));
        stats.deletes += 1;
        false
    });
}

fn kernel_prefixes(prefixes: &BTreeMap<IpNet, u32>) -> BTreeMap<(u32, Addr), u32> {
    prefixes
        .iter()
        .map(|(net, id)| (prefix_to_kernel(*net), *id))
        .collect()
}

#[cfg(test)]
mod tests {
    use weir_common::{DIR_INGRESS, PROTO_TCP};

    use super::*;

    #[test]
    fn policy_keys_round_trip() {
        for rule in [
            RuleMatch {
                direction: DIR_INGRESS,
                peer: 300,
                proto: None,
                port: None,
            },
            RuleMatch {
                direction: DIR_INGRESS,
                peer: 0,
                proto: Some(PROTO_TCP),
                port: None,
            },
            RuleMatch {
                direction: DIR_INGRESS,
                peer: 7,
                proto: Some(PROTO_TCP),
                port: Some((8080, 16)),
            },
            RuleMatch {
                direction: DIR_INGRESS,
                peer: 7,
                proto: Some(PROTO_TCP),
                port: Some((1024, 6)),
            },
        ] {
            let (len, key) = policy_key(300, 4, &rule);
            assert_eq!(rule_of_key(len, &key), (300, 4, rule));
        }
    }
}
