//! The datapath's policy lookup, run on the compiler's output instead of the kernel's maps.
//!
//! It mirrors `ebpf/programs/src/policy.rs` step by step, so that an answer computed here
//! (`weir explain`, the agent's live explain) is the answer the datapath enforces:
//! 1. the peer address resolves to a pod/node identity (`WEIR_IPCACHE`, longest match, world when
//!    unknown) and to a CIDR identity (`WEIR_CIDR_IDS`, longest match, if any);
//! 2. a subject not isolated in the direction passes (`not-isolated`);
//! 3. otherwise the policy trie is asked for the pod identity, then the CIDR identity, then
//!    `IDENTITY_ANY`; the first hit allows the packet and names its rule (`rule`). Within one
//!    peer the trie answers with its longest matching prefix: an entry naming a port block beats
//!    one for every port of the protocol, which beats one for every protocol;
//! 4. no hit: `policy-denied`.
//!
//! IPv4 addresses live in the kernel's 128-bit key space as `::ffff:a.b.c.d`; the longest match
//! here works in that same space, so an IPv6 prefix never matches an IPv4 address.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use weir_common::{DIR_EGRESS, IDENTITY_ANY, IDENTITY_WORLD};

use crate::output::{Compiled, RuleMatch};

/// Why one side decided as it did; the names are those of the datapath's verdict events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No policy isolates the subject in this direction.
    NotIsolated,
    /// A rule allowed it.
    Rule,
    /// The subject is isolated and no rule allowed it.
    PolicyDenied,
}

/// The identities a peer address resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIdentities {
    /// Pod or node identity (`WEIR_IPCACHE`), if the address is known.
    pub pod: Option<u32>,
    /// CIDR identity (`WEIR_CIDR_IDS`), if a policy prefix contains the address.
    pub cidr: Option<u32>,
}

impl PeerIdentities {
    /// The identity the datapath's events report: pod, else CIDR, else world.
    pub fn reported(&self) -> u32 {
        self.pod.or(self.cidr).unwrap_or(IDENTITY_WORLD)
    }
}

/// The decision of one side (the subject's egress or ingress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideVerdict {
    pub allowed: bool,
    pub reason: Reason,
    /// The allow entry that matched and its rule id (`Reason::Rule` only).
    pub rule: Option<(RuleMatch, u32)>,
    /// The peer, as events report it.
    pub peer: u32,
}

/// The 128-bit kernel form of an address: IPv4 mapped into `::ffff:0:0/96`.
pub fn kernel_addr(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The kernel form of a prefix: `(address bits, prefix length)`.
pub fn kernel_prefix(p: &IpNet) -> (u128, u32) {
    match p {
        IpNet::V4(v4) => (
            u128::from(v4.network().to_ipv6_mapped()),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (u128::from(v6.network()), u32::from(v6.prefix_len())),
    }
}

/// Longest-prefix match over `map` as the kernel's LPM trie does it (one 128-bit key space).
pub fn lpm(map: &BTreeMap<IpNet, u32>, addr: IpAddr) -> Option<u32> {
    let a = kernel_addr(addr);
    let mut best: Option<(u32, u32)> = None;
    for (p, id) in map {
        let (net, len) = kernel_prefix(p);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        if a & mask == net & mask && best.is_none_or(|(l, _)| len > l) {
            best = Some((len, *id));
        }
    }
    best.map(|(_, id)| id)
}

/// What `addr` resolves to in the compiled ipcache and CIDR identities.
pub fn resolve_peer(c: &Compiled, addr: IpAddr) -> PeerIdentities {
    PeerIdentities {
        pod: lpm(&c.ipcache, addr),
        cidr: lpm(&c.cidr_identities, addr),
    }
}

/// Whether `m` covers `proto`/`port`, and if so its prefix length in the policy trie's terms
/// (longer is more specific).
fn match_length(m: &RuleMatch, proto: u8, port: u16) -> Option<u32> {
    match (m.proto, m.port) {
        (None, _) => Some(0),
        (Some(p), _) if p != proto => None,
        (Some(_), None) => Some(1),
        (Some(_), Some((first, bits))) => {
            let size = 1u32 << (16 - u32::from(bits));
            let inside =
                u32::from(port) >= u32::from(first) && u32::from(port) < u32::from(first) + size;
            inside.then(|| 2 + u32::from(bits))
        }
    }
}

/// Evaluates subject identity `subject`'s policy in `direction` (`DIR_EGRESS`: the subject
/// sends; `DIR_INGRESS`: it receives) for a connection with `peer_addr`, IP protocol `proto` and
/// destination port `port` (0 for ICMP).
pub fn evaluate(
    c: &Compiled,
    subject: u32,
    direction: u8,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> SideVerdict {
    let peer = resolve_peer(c, peer_addr);
    let mut verdict = SideVerdict {
        allowed: true,
        reason: Reason::NotIsolated,
        rule: None,
        peer: peer.reported(),
    };
    // A subject without a `WEIR_SUBJECTS` entry is not isolated.
    let Some(rules) = c.subjects.get(&subject) else {
        return verdict;
    };
    let isolated = if direction == DIR_EGRESS {
        rules.isolated_egress
    } else {
        rules.isolated_ingress
    };
    if !isolated {
        return verdict;
    }
    let candidates = [
        Some(peer.pod.unwrap_or(IDENTITY_WORLD)),
        peer.cidr,
        Some(IDENTITY_ANY),
    ];
    for candidate in candidates.into_iter().flatten() {
        let first = RuleMatch {
            direction,
            peer: candidate,
            proto: None,
            port: None,
        };
        let hit = rules
            .rules
            .range(first..)
            .take_while(|(m, _)| m.direction == direction && m.peer == candidate)
            .filter_map(|(m, id)| match_length(m, proto, port).map(|len| (len, *m, *id)))
            .max_by_key(|(len, ..)| *len);
        if let Some((_, m, id)) = hit {
            verdict.reason = Reason::Rule;
            verdict.rule = Some((m, id));
            return verdict;
        }
    }
    verdict.allowed = false;
    verdict.reason = Reason::PolicyDenied;
    verdict
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use weir_common::{DIR_INGRESS, PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::output::SubjectRules;

    const SUBJECT: u32 = 300;
    const PEER: u32 = 301;

    fn compiled(rules: &[(RuleMatch, u32)]) -> Compiled {
        let mut c = Compiled::default();
        c.ipcache.insert("10.0.0.2/32".parse().unwrap(), PEER);
        c.cidr_identities
            .insert("10.0.0.0/8".parse().unwrap(), 0x0080_0000);
        c.subjects.insert(
            SUBJECT,
            SubjectRules {
                isolated_ingress: true,
                isolated_egress: false,
                rules: rules.iter().copied().collect(),
                selected_by_ingress: BTreeSet::new(),
                selected_by_egress: BTreeSet::new(),
            },
        );
        c
    }

    fn m(peer: u32, proto: Option<u8>, port: Option<(u16, u8)>) -> RuleMatch {
        RuleMatch {
            direction: DIR_INGRESS,
            peer,
            proto,
            port,
        }
    }

    #[test]
    fn not_isolated_passes_without_a_rule() {
        let c = compiled(&[]);
        let v = evaluate(&c, SUBJECT, DIR_EGRESS, "10.0.0.2".parse().unwrap(), 6, 80);
        assert_eq!((v.allowed, v.reason), (true, Reason::NotIsolated));
        assert_eq!(v.peer, PEER);
    }

    #[test]
    fn the_most_specific_entry_of_a_peer_names_the_rule() {
        let c = compiled(&[
            (m(PEER, None, None), 1),
            (m(PEER, Some(PROTO_TCP), None), 2),
            (m(PEER, Some(PROTO_TCP), Some((80, 16))), 3),
        ]);
        let at = |proto, port| {
            evaluate(
                &c,
                SUBJECT,
                DIR_INGRESS,
                "10.0.0.2".parse().unwrap(),
                proto,
                port,
            )
        };
        assert_eq!(at(PROTO_TCP, 80).rule.map(|r| r.1), Some(3));
        assert_eq!(at(PROTO_TCP, 81).rule.map(|r| r.1), Some(2));
        assert_eq!(at(PROTO_UDP, 80).rule.map(|r| r.1), Some(1));
    }

    #[test]
    fn pod_identity_is_asked_before_cidr_and_any() {
        let c = compiled(&[
            (m(IDENTITY_ANY, Some(PROTO_TCP), Some((80, 16))), 7),
            (m(0x0080_0000, Some(PROTO_TCP), None), 8),
        ]);
        let v = evaluate(
            &c,
            SUBJECT,
            DIR_INGRESS,
            "10.0.0.2".parse().unwrap(),
            PROTO_TCP,
            80,
        );
        assert_eq!(
            v.rule.map(|r| r.1),
            Some(8),
            "the CIDR identity comes before any"
        );
        let v = evaluate(
            &c,
            SUBJECT,
            DIR_INGRESS,
            "192.0.2.1".parse().unwrap(),
            PROTO_TCP,
            80,
        );
        assert_eq!(v.rule.map(|r| r.1), Some(7));
        assert_eq!(v.peer, IDENTITY_WORLD);
        let v = evaluate(
            &c,
            SUBJECT,
            DIR_INGRESS,
            "192.0.2.1".parse().unwrap(),
            PROTO_TCP,
            81,
        );
        assert_eq!(
            (v.allowed, v.reason, v.rule),
            (false, Reason::PolicyDenied, None)
        );
    }
}
