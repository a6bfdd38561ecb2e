//! VXLAN overlay, for underlays that cannot route pod addresses: pod packets to another node go
//! through a VXLAN device (VNI 87, UDP 4789) to that node's InternalIP. Pod addresses stay the
//! inner source addresses, so the receiving node still knows the sender's identity from its
//! ipcache. IPv4 only.
//!
//! Everything is derived from Node objects, with no side channel: each node's tunnel endpoint
//! (VTEP) is its pod CIDR's network address (IPAM never hands it out) on a MAC derived from
//! that address, so every node can compute every other node's neighbour and FDB entries.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt as _;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::{
    neighbour::{NeighbourFlags, NeighbourState},
    route::RouteProtocol,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::routes::{ROUTE_PROTOCOL, RoutesError, connect};

pub const VXLAN_DEVICE: &str = "weir-vxlan";
pub const VXLAN_VNI: u32 = 87;
pub const VXLAN_PORT: u16 = 4789;
/// Room for the outer IPv4, UDP and VXLAN headers on a 1500-byte underlay.
pub const VXLAN_MTU: u32 = 1450;

/// A node's VTEP address: its pod CIDR's network address.
pub fn vtep_addr(cidr: Ipv4Net) -> Ipv4Addr {
    cidr.network()
}

/// A node's VTEP MAC, derived from its VTEP address (locally administered).
pub fn vtep_mac(cidr: Ipv4Net) -> [u8; 6] {
    let o = vtep_addr(cidr).octets();
    [0x02, 0x57, o[0], o[1], o[2], o[3]]
}

fn netlink_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutesError {
    let what = what.into();
    move |source| RoutesError::Netlink { what, source }
}

/// The overlay device and the peers it reaches.
pub struct Overlay {
    handle: Handle,
    index: u32,
    installed: BTreeMap<Ipv4Net, Ipv4Addr>,
}

impl Overlay {
    /// Creates (or adopts) the VXLAN device in the calling thread's network namespace, bound
    /// to `underlay` (this node's InternalIP), with this node's VTEP address and MAC.
    pub async fn open(underlay: Ipv4Addr, own_cidr: Ipv4Net) -> Result<Self, RoutesError> {
        let handle = connect()?;
        let index = match device_index(&handle).await {
            Some(index) => index,
            None => {
                let msg = LinkVxlan::new(VXLAN_DEVICE, VXLAN_VNI)
                    .port(VXLAN_PORT)
                    .local(underlay)
                    .learning(false)
                    .build();
                handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(netlink_err(format!("creating {VXLAN_DEVICE}")))?;
                device_index(&handle).await.unwrap_or_default()
            }
        };
        let set = LinkUnspec::new_with_index(index)
            .address(vtep_mac(own_cidr).to_vec())
            .mtu(VXLAN_MTU)
            .up()
            .build();
        handle
            .link()
            .set(set)
            .execute()
            .await
            .map_err(netlink_err(format!("configuring {VXLAN_DEVICE}")))?;
        let vtep = IpAddr::V4(vtep_addr(own_cidr));
        if let Err(e) = handle.address().add(index, vtep, 32).execute().await {
            // Already there after a restart is fine.
            if !e.to_string().contains("File exists") {
                return Err(netlink_err(format!("addressing {VXLAN_DEVICE}"))(e));
            }
        }
        tracing::info!(device = VXLAN_DEVICE, %underlay, vtep = %vtep, "VXLAN overlay up");
        Ok(Self {
            handle,
            index,
            installed: BTreeMap::new(),
        })
    }

    /// Makes the overlay reach exactly `desired` (remote pod CIDR → remote InternalIP).
    pub async fn sync(&mut self, desired: &BTreeMap<IpNet, IpAddr>) {
        let desired: BTreeMap<Ipv4Net, Ipv4Addr> = desired
            .iter()
            .filter_map(|(cidr, via)| match (cidr, via) {
                (IpNet::V4(c), IpAddr::V4(v)) => Some((*c, *v)),
                _ => None,
            })
            .collect();
        for (cidr, underlay) in &desired {
            if self.installed.get(cidr) == Some(underlay) {
                continue;
            }
            match self.add_peer(*cidr, *underlay).await {
                Ok(()) => {
                    tracing::info!(%cidr, %underlay, "overlay route to another node's pods");
                    self.installed.insert(*cidr, *underlay);
                }
                Err(e) => {
                    tracing::error!(%cidr, %underlay, error = %e, "cannot reach another node's pods through the overlay")
                }
            }
        }
        let stale: Vec<Ipv4Net> = self
            .installed
            .keys()
            .filter(|c| !desired.contains_key(c))
            .copied()
            .collect();
        for cidr in stale {
            match self.handle.route().del(self.route(cidr)).execute().await {
                Ok(()) => {
                    tracing::info!(%cidr, "removed the overlay route of a node that is gone");
                    self.installed.remove(&cidr);
                }
                Err(e) => tracing::warn!(%cidr, error = %e, "cannot remove a stale overlay route"),
            }
        }
    }

    /// The route to a remote pod CIDR: via the remote VTEP, on the VXLAN device.
    fn route(&self, cidr: Ipv4Net) -> netlink_packet_route::route::RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cidr.network(), cidr.prefix_len())
            .gateway(vtep_addr(cidr))
            .output_interface(self.index)
            .onlink()
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .build()
    }

    /// Neighbour (remote VTEP address → its MAC), FDB (MAC → remote underlay address) and the
    /// route (remote pod CIDR via the remote VTEP, on the VXLAN device).
    async fn add_peer(&self, cidr: Ipv4Net, underlay: Ipv4Addr) -> Result<(), RoutesError> {
        let (vtep, mac) = (vtep_addr(cidr), vtep_mac(cidr));
        self.handle
            .neighbours()
            .add(self.index, IpAddr::V4(vtep))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink_err(format!("neighbour {vtep}")))?;
        self.handle
            .neighbours()
            .add_bridge(self.index, &mac)
            .destination(IpAddr::V4(underlay))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink_err(format!("forwarding entry for {underlay}")))?;
        self.handle
            .route()
            .add(self.route(cidr))
            .replace()
            .execute()
            .await
            .map_err(netlink_err(format!("route to {cidr}")))
    }
}

/// The VXLAN device's ifindex, if it exists.
async fn device_index(handle: &Handle) -> Option<u32> {
    let mut links = handle
        .link()
        .get()
        .match_name(VXLAN_DEVICE.to_owned())
        .execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index)
}

/// Deletes the VXLAN device, if there is one (removing Weir from a node); its routes, neighbour
/// and forwarding entries go with it.
pub async fn remove_device() -> Result<(), RoutesError> {
    let handle = connect()?;
    if let Some(index) = device_index(&handle).await {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(netlink_err(format!("deleting {VXLAN_DEVICE}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vteps_are_derived_from_the_pod_cidr() {
        let cidr: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(vtep_addr(cidr), Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(vtep_mac(cidr), [0x02, 0x57, 10, 244, 3, 0]);
    }
}
