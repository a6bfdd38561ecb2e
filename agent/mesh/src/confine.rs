//! The checks that confine a peer to what its certificate and its MeshPeer allow, as pure
//! functions, and the counters of what they refused, by reason.
//!
//! A peer with a valid certificate is still only trusted with: addresses inside its MeshPeer's
//! `allowedPrefixes` and outside ours and every other peer's; identity ids outside the reserved
//! range; label sets without the receiver-owned `weir.io/cluster` label; and packets whose source
//! address it exported with exactly the identity the record carries, addressed to one of our
//! pod prefixes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU64, Ordering},
};

use ipnet::IpNet;
use weir_common::{IDENTITY_FIRST_POD, IDENTITY_LOCAL_MASK};

use crate::export::{Export, endpoint_name, identity_name};

/// The label the receiver puts on imported namespaces and pods; a peer may not send it.
pub const CLUSTER_LABEL: &str = "weir.io/cluster";

/// Why something a peer sent was refused. Also the index of its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// A session whose Hello names another cluster than the peer's certificate.
    Impersonation,
    /// An endpoint address outside the peer's allowed prefixes.
    AddressOutsidePrefixes,
    /// An endpoint address inside our own pod prefixes.
    AddressOurs,
    /// An endpoint address inside another peer's prefixes.
    AddressThirdCluster,
    /// An identity id in the reserved range (host, world, remote node...) or above 24 bits.
    ReservedIdentity,
    /// A label set carrying `weir.io/cluster`.
    ClusterLabel,
    /// An entry whose name does not match its body, or an invalid namespace name.
    MalformedEntry,
    /// A delta beyond the limits (entries held, entries per delta).
    Limit,
    /// A delta out of order (version gap, wrong incarnation).
    OutOfOrder,
    /// A packet record that could not be decoded, or a payload that is not an IP packet.
    MalformedPacket,
    /// A packet from an address the peer has not exported.
    UnexportedSource,
    /// A packet whose record identity is not the one exported for its source address.
    IdentityMismatch,
    /// A packet to anything but one of our pod prefixes (nodes, host network, third clusters).
    DestinationNotLocalPod,
    /// A gateway's merged import naming a peer this node has no valid MeshPeer for.
    UnknownPeer,
}

impl Refusal {
    pub const ALL: [Refusal; 14] = [
        Refusal::Impersonation,
        Refusal::AddressOutsidePrefixes,
        Refusal::AddressOurs,
        Refusal::AddressThirdCluster,
        Refusal::ReservedIdentity,
        Refusal::ClusterLabel,
        Refusal::MalformedEntry,
        Refusal::Limit,
        Refusal::OutOfOrder,
        Refusal::MalformedPacket,
        Refusal::UnexportedSource,
        Refusal::IdentityMismatch,
        Refusal::DestinationNotLocalPod,
        Refusal::UnknownPeer,
    ];

    /// A stable name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Impersonation => "impersonation",
            Refusal::AddressOutsidePrefixes => "address_outside_prefixes",
            Refusal::AddressOurs => "address_ours",
            Refusal::AddressThirdCluster => "address_third_cluster",
            Refusal::ReservedIdentity => "reserved_identity",
            Refusal::ClusterLabel => "cluster_label",
            Refusal::MalformedEntry => "malformed_entry",
            Refusal::Limit => "limit",
            Refusal::OutOfOrder => "out_of_order",
            Refusal::MalformedPacket => "malformed_packet",
            Refusal::UnexportedSource => "unexported_source",
            Refusal::IdentityMismatch => "identity_mismatch",
            Refusal::DestinationNotLocalPod => "destination_not_local_pod",
            Refusal::UnknownPeer => "unknown_peer",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Refusals counted by reason (one set per peer).
#[derive(Debug, Default)]
pub struct RefusalCounters {
    counts: [AtomicU64; Refusal::ALL.len()],
}

impl RefusalCounters {
    pub fn count(&self, r: Refusal) {
        self.counts[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: Refusal) -> u64 {
        self.counts[r as usize].load(Ordering::Relaxed)
    }

    /// Every reason with a non-zero count.
    pub fn snapshot(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL
            .iter()
            .map(|&r| (r, self.get(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// What a peer may claim, from its MeshPeer and ours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerBounds {
    /// The peer's `allowedPrefixes`.
    pub allowed: Vec<IpNet>,
    /// Our own pod prefixes.
    pub ours: Vec<IpNet>,
    /// Every other peer's `allowedPrefixes`.
    pub third: Vec<IpNet>,
}

fn overlaps_addr(nets: &[IpNet], addr: &IpAddr) -> bool {
    nets.iter().any(|n| n.contains(addr))
}

/// Checks one exported entry before it may be imported.
pub fn check_export(name: &str, export: &Export, bounds: &PeerBounds) -> Result<(), Refusal> {
    match export {
        Export::Identity(i) => {
            if name != identity_name(i.id) || !valid_namespace(&i.namespace) {
                return Err(Refusal::MalformedEntry);
            }
            check_identity_id(i.id)?;
            if i.pod_labels.contains_key(CLUSTER_LABEL)
                || i.namespace_labels.contains_key(CLUSTER_LABEL)
            {
                return Err(Refusal::ClusterLabel);
            }
            Ok(())
        }
        Export::Endpoint(e) => {
            if name != endpoint_name(&e.addr) {
                return Err(Refusal::MalformedEntry);
            }
            check_identity_id(e.identity)?;
            check_address(&e.addr, bounds)
        }
    }
}

/// An identity id a peer may use: not reserved, and within 24 bits (the top 8 are our slot).
pub fn check_identity_id(id: u32) -> Result<(), Refusal> {
    if !(IDENTITY_FIRST_POD..=IDENTITY_LOCAL_MASK).contains(&id) {
        return Err(Refusal::ReservedIdentity);
    }
    Ok(())
}

/// An address a peer may claim: ours and third clusters' are refused first (even if the
/// peer's `allowedPrefixes` were misconfigured to overlap them), then it must be allowed.
pub fn check_address(addr: &IpAddr, bounds: &PeerBounds) -> Result<(), Refusal> {
    let addr = addr.to_canonical();
    if overlaps_addr(&bounds.ours, &addr) {
        return Err(Refusal::AddressOurs);
    }
    if overlaps_addr(&bounds.third, &addr) {
        return Err(Refusal::AddressThirdCluster);
    }
    if !overlaps_addr(&bounds.allowed, &addr) {
        return Err(Refusal::AddressOutsidePrefixes);
    }
    Ok(())
}

/// A Kubernetes namespace name (RFC 1123 label).
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-')
}

/// Source and destination of an IP packet.
pub fn packet_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 && (packet[0] & 0x0f) >= 5 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((
                IpAddr::from(Ipv6Addr::from(src)).to_canonical(),
                IpAddr::from(Ipv6Addr::from(dst)).to_canonical(),
            ))
        }
        _ => None,
    }
}

/// Checks one received packet: its source must be exported by the peer with exactly
/// `record_identity`, its destination must be one of our pod prefixes. `exported` maps the
/// peer's exported addresses to their identity ids (this session's).
pub fn check_packet(
    packet: &[u8],
    record_identity: u32,
    exported: &HashMap<IpAddr, u32>,
    local_pod_prefixes: &[IpNet],
) -> Result<(), Refusal> {
    let (src, dst) = packet_addresses(packet).ok_or(Refusal::MalformedPacket)?;
    match exported.get(&src) {
        None => return Err(Refusal::UnexportedSource),
        Some(&id) if id != record_identity => return Err(Refusal::IdentityMismatch),
        Some(_) => {}
    }
    if !overlaps_addr(local_pod_prefixes, &dst) {
        return Err(Refusal::DestinationNotLocalPod);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::export::{EndpointExport, IdentityExport};

    fn bounds() -> PeerBounds {
        PeerBounds {
            allowed: vec!["10.245.0.0/16".parse().unwrap()],
            ours: vec!["10.244.0.0/16".parse().unwrap()],
            third: vec!["10.246.0.0/16".parse().unwrap()],
        }
    }

    fn ep(addr: &str, identity: u32) -> (String, Export) {
        let addr: IpAddr = addr.parse().unwrap();
        (
            endpoint_name(&addr),
            Export::Endpoint(EndpointExport { addr, identity }),
        )
    }

    fn id(id: u32, labels: &[(&str, &str)], ns_labels: &[(&str, &str)]) -> (String, Export) {
        let m = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
            l.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        (
            identity_name(id),
            Export::Identity(IdentityExport {
                id,
                namespace: "pay".into(),
                pod_labels: m(labels),
                namespace_labels: m(ns_labels),
            }),
        )
    }

    fn check((name, e): (String, Export)) -> Result<(), Refusal> {
        check_export(&name, &e, &bounds())
    }

    #[test]
    fn endpoints_are_confined_to_the_peers_prefixes() {
        assert_eq!(check(ep("10.245.1.5", 300)), Ok(()));
        assert_eq!(check(ep("10.244.1.5", 300)), Err(Refusal::AddressOurs));
        assert_eq!(
            check(ep("10.246.1.5", 300)),
            Err(Refusal::AddressThirdCluster)
        );
        assert_eq!(
            check(ep("192.0.2.1", 300)),
            Err(Refusal::AddressOutsidePrefixes)
        );
        assert_eq!(
            check(ep("::ffff:10.244.1.5", 300)),
            Err(Refusal::AddressOurs),
            "the IPv4-mapped form of our address is ours too"
        );
        // Misconfigured allowedPrefixes that cover ours still do not let the peer claim ours.
        let mut wide = bounds();
        wide.allowed = vec!["10.0.0.0/8".parse().unwrap()];
        let (n, e) = ep("10.244.1.5", 300);
        assert_eq!(check_export(&n, &e, &wide), Err(Refusal::AddressOurs));
    }

    #[test]
    fn reserved_identities_and_the_cluster_label_are_refused() {
        assert_eq!(check(ep("10.245.1.5", 1)), Err(Refusal::ReservedIdentity));
        assert_eq!(check(ep("10.245.1.5", 0)), Err(Refusal::ReservedIdentity));
        assert_eq!(
            check(ep("10.245.1.5", 1 << 24)),
            Err(Refusal::ReservedIdentity)
        );
        assert_eq!(check(id(2, &[], &[])), Err(Refusal::ReservedIdentity));
        assert_eq!(check(id(300, &[("app", "web")], &[])), Ok(()));
        assert_eq!(
            check(id(300, &[(CLUSTER_LABEL, "west")], &[])),
            Err(Refusal::ClusterLabel)
        );
        assert_eq!(
            check(id(300, &[], &[(CLUSTER_LABEL, "west")])),
            Err(Refusal::ClusterLabel)
        );
    }

    #[test]
    fn names_must_match_bodies() {
        let (_, e) = ep("10.245.1.5", 300);
        assert_eq!(
            check(("ep/10.245.1.6".into(), e)),
            Err(Refusal::MalformedEntry)
        );
        let (_, e) = id(300, &[], &[]);
        assert_eq!(check(("id/301".into(), e)), Err(Refusal::MalformedEntry));
    }

    fn v4_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn packets_must_come_from_an_exported_address_with_its_identity() {
        let exported = HashMap::from([("10.245.1.5".parse().unwrap(), 300u32)]);
        let local: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let p = v4_packet([10, 245, 1, 5], [10, 244, 0, 9]);
        assert_eq!(check_packet(&p, 300, &exported, &local), Ok(()));
        assert_eq!(
            check_packet(&p, 301, &exported, &local),
            Err(Refusal::IdentityMismatch)
        );
        let p = v4_packet([10, 245, 1, 6], [10, 244, 0, 9]);
        assert_eq!(
            check_packet(&p, 300, &exported, &local),
            Err(Refusal::UnexportedSource)
        );
        let p = v4_packet([10, 245, 1, 5], [192, 168, 1, 1]);
        assert_eq!(
            check_packet(&p, 300, &exported, &local),
            Err(Refusal::DestinationNotLocalPod)
        );
        assert_eq!(
            check_packet(&[0x45; 10], 300, &exported, &local),
            Err(Refusal::MalformedPacket)
        );
    }
}
