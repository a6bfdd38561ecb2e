//! Test helpers: building objects, and the reference lookup that evaluates compiled maps the way
//! the datapath does.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv6Addr};

use weir_common::{DIR_EGRESS, DIR_INGRESS};
use weir_policy::{
    CompileInput, IdentityAllocator,
    model::{ClusterState, Object, ObjectKey, parse_documents},
    output::Compiled,
};

/// The reference lookup: what the datapath decides for `subject_addr` (a local endpoint)
/// talking to `peer_addr` in `direction` (`DIR_EGRESS`: subject sends; `DIR_INGRESS`: subject
/// receives), for `proto` and destination port `port`. `None` if the subject address is not a
/// local endpoint. It is `weir_policy::verdict::evaluate`, the lookup `weir explain` answers
/// with, so the tests against the spec cover that too.
pub fn datapath_allows(
    c: &Compiled,
    direction: u8,
    subject_addr: IpAddr,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> Option<bool> {
    assert!(direction == DIR_EGRESS || direction == DIR_INGRESS);
    let (_, subject) = c.local_addresses.get(&subject_addr)?;
    Some(weir_policy::verdict::evaluate(c, *subject, direction, peer_addr, proto, port).allowed)
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
