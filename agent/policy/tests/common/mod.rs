//! Test helpers: building objects, and the reference lookup that evaluates compiled maps the way
//! the datapath does.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use ipnet::IpNet;
use weir_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_WORLD};
use weir_policy::{
    CompileInput, IdentityAllocator,
    model::{ClusterState, Object, ObjectKey, parse_documents},
    output::Compiled,
};

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

/// The reference lookup: what the datapath decides for `subject_addr` (a local endpoint)
/// talking to `peer_addr` in `direction` (`DIR_EGRESS`: subject sends; `DIR_INGRESS`: subject
/// receives), for `proto` and destination port `port`. `None` if the subject address is not a
/// local endpoint.
pub fn datapath_allows(
    c: &Compiled,
    direction: u8,
    subject_addr: IpAddr,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> Option<bool> {
    let (_, subject) = c.local_addresses.get(&subject_addr)?;
    let Some(rules) = c.subjects.get(subject) else {
        return Some(false);
    };
    let isolated = if direction == DIR_EGRESS {
        rules.isolated_egress
    } else {
        assert_eq!(direction, DIR_INGRESS);
        rules.isolated_ingress
    };
    if !isolated {
        return Some(true);
    }
    let peer_pod = lpm(&c.ipcache, peer_addr).unwrap_or(IDENTITY_WORLD);
    let peer_cidr = lpm(&c.cidr_identities, peer_addr).unwrap_or(IDENTITY_WORLD);
    let allowed = [peer_pod, peer_cidr, IDENTITY_ANY].iter().any(|&peer| {
        rules.rules.keys().any(|m| {
            m.direction == direction
                && m.peer == peer
                && m.proto.is_none_or(|p| p == proto)
                && m.port.is_none_or(|(first, bits)| {
                    let size = 1u32 << (16 - u32::from(bits));
                    u32::from(port) >= u32::from(first) && u32::from(port) < u32::from(first) + size
                })
        })
    });
    Some(allowed)
}

/// Cluster state from YAML text (panics on parse errors: test input).
pub fn state_from_yaml(text: &str) -> ClusterState {
    let mut state = ClusterState::default();
    for o in parse_documents(text, "test.yaml") {
        state.apply(o.expect("test YAML parses"));
    }
    state
}

/// Compiles `state` for node `n1` with the given local endpoints.
pub fn compile_local(state: &ClusterState, local: &[(&str, &str, &[&str])]) -> Compiled {
    let local_endpoints = local
        .iter()
        .map(|(ns, name, addrs)| {
            (
                ObjectKey::new(*ns, *name),
                addrs.iter().map(|a| a.parse().expect("address")).collect(),
            )
        })
        .collect();
    let input = CompileInput {
        state: state.clone(),
        node_name: "n1".into(),
        cluster_id: 0,
        local_endpoints,
    };
    weir_policy::compile(&input, &mut IdentityAllocator::new()).expect("compiles")
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("address")
}

pub fn object(yaml: &str) -> Object {
    parse_documents(yaml, "t")
        .into_iter()
        .next()
        .expect("one doc")
        .expect("parses")
}
