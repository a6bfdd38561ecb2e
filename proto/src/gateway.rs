//! The pod's gateway addresses, one definition for both sides: the CNI plugin routes the pod
//! through them and puts them on the host veth (so the node answers them, ping included), the
//! agent hands them out with each address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IPv4 gateway: link-local, so it never collides with a pod or node address. The pod
/// reaches it through a permanent neighbour entry (the host veth's MAC), without ARP.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The IPv6 gateway, link-local on every host veth.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The gateway of a pod address's family.
pub fn pod_gateway(address: &IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => POD_GATEWAY_V4.into(),
        IpAddr::V6(_) => POD_GATEWAY_V6.into(),
    }
}
