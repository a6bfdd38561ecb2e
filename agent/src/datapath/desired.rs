//! From the compiler's output to the maps' desired contents: the one place that turns policy
//! terms (isolation, rules, local addresses) into kernel terms (flags, endpoint entries).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use weir_common::{EndpointInfo, SUBJECT_ISOLATED_EGRESS, SUBJECT_ISOLATED_INGRESS};
use weir_policy::output::{Compiled, SubjectRules};

use super::writer::{DesiredMaps, SubjectState};

/// `ifindex_of` gives the host-side veth of a local address (None: not wired, left out).
pub fn desired_maps(
    compiled: &Compiled,
    ifindex_of: impl Fn(&IpAddr) -> Option<u32>,
    config_flags: u32,
) -> DesiredMaps {
    let endpoints = compiled
        .local_addresses
        .iter()
        .filter_map(|(addr, (_, identity))| {
            let ifindex = ifindex_of(addr)?;
            Some((
                *addr,
                EndpointInfo {
                    ifindex,
                    identity: *identity,
                    flags: 0,
                    _pad: 0,
                },
            ))
        })
        .collect();
    let subjects = compiled
        .subjects
        .iter()
        .map(|(&id, rules)| (id, subject_state(rules)))
        .collect::<BTreeMap<_, _>>();
    DesiredMaps {
        endpoints,
        ipcache: compiled.ipcache.clone(),
        cidr_identities: compiled.cidr_identities.clone(),
        subjects,
        config_flags,
    }
}

/// The entries and rules of `subjects` as compiled, for a write of just those (a policy change
/// compiled in place); a subject no longer compiled is left out.
pub fn desired_subjects(
    compiled: &Compiled,
    subjects: &BTreeSet<u32>,
) -> BTreeMap<u32, SubjectState> {
    subjects
        .iter()
        .filter_map(|s| Some((*s, subject_state(compiled.subjects.get(s)?))))
        .collect()
}

/// One subject's entry and rules in kernel terms.
pub fn subject_state(rules: &SubjectRules) -> SubjectState {
    let mut flags = 0;
    if rules.isolated_ingress {
        flags |= SUBJECT_ISOLATED_INGRESS;
    }
    if rules.isolated_egress {
        flags |= SUBJECT_ISOLATED_EGRESS;
    }
    SubjectState {
        flags,
        rules: rules.rules.clone(),
    }
}
