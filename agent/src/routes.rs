//! Native routing between nodes: for every other Node object with an `InternalIP` and pod CIDRs,
//! a route to each of its pod CIDRs via that address (same family), as Calico's BGP-less mode
//! and Cilium's auto-direct-node-routes do on a flat L2 or routed underlay. Pod addresses stay
//! the source addresses across nodes, so the receiving node knows the sender's identity from its
//! ipcache.
//!
//! The agent's routes carry their own protocol number, so it finds (and removes) exactly its own
//! after a restart and never touches routes it did not make. The mesh's routes to peer clusters
//! (on nodes that are not gateways) carry another one ([`MESH_ROUTE_PROTOCOL`]) and may have
//! several next hops: an ECMP route over the cluster's live gateways, hashed by L4
//! ([`hash_multipath_by_l4`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteNextHop, RouteProtocol,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use weir_policy::model::ClusterState;

/// `rtm_protocol` of Weir's routes ('W').
pub const ROUTE_PROTOCOL: u8 = 0x57;
/// `rtm_protocol` of Weir's routes to mesh peers' prefixes via the cluster's gateways ('X').
pub const MESH_ROUTE_PROTOCOL: u8 = 0x58;

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("setting {path}: {source} (multipath routes would hash by addresses only)")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Pod CIDR → the node address to route it through, for every node but `node_name`.
pub fn desired_routes(state: &ClusterState, node_name: &str) -> BTreeMap<IpNet, IpAddr> {
    let mut routes = BTreeMap::new();
    for (name, node) in &state.nodes {
        if name == node_name {
            continue;
        }
        let addresses: Vec<IpAddr> = node
            .status
            .addresses
            .iter()
            .filter(|a| a.kind == "InternalIP")
            .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .collect();
        let cidrs = if node.spec.pod_cidrs.is_empty() {
            node.spec.pod_cidr.iter().cloned().collect()
        } else {
            node.spec.pod_cidrs.clone()
        };
        for cidr in cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()) {
            let via = addresses
                .iter()
                .find(|a| a.is_ipv4() == matches!(cidr, IpNet::V4(_)));
            if let Some(via) = via {
                routes.insert(cidr.trunc(), *via);
            }
        }
    }
    routes
}

/// A netlink handle in the calling thread's network namespace (the node's).
pub(crate) fn connect() -> Result<Handle, RoutesError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutesError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Makes the kernel hash multipath routes by L4 (addresses, protocol and ports) in this
/// network namespace, so the flows of one pod pair spread over the next hops while each flow
/// keeps one.
pub fn hash_multipath_by_l4() -> Result<(), RoutesError> {
    for path in [
        "/proc/sys/net/ipv4/fib_multipath_hash_policy",
        "/proc/sys/net/ipv6/fib_multipath_hash_policy",
    ] {
        std::fs::write(path, "1").map_err(|source| RoutesError::Sysctl { path, source })?;
    }
    Ok(())
}

/// The routes the agent keeps in the node's main table (of one protocol number).
pub struct NodeRoutes {
    handle: Handle,
    protocol: u8,
    installed: BTreeMap<IpNet, Vec<IpAddr>>,
}

fn message(protocol: u8, cidr: IpNet, via: &[IpAddr]) -> RouteMessage {
    let protocol = RouteProtocol::from(protocol);
    let hop = |gw: RouteAddress| {
        let mut hop = RouteNextHop::default();
        hop.attributes = vec![RouteAttribute::Gateway(gw)];
        hop
    };
    match cidr {
        IpNet::V4(net) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .protocol(protocol);
            let gws: Vec<Ipv4Addr> = via
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            match gws.as_slice() {
                [] => {}
                [gw] => b = b.gateway(*gw),
                many => b = b.multipath(many.iter().map(|g| hop(RouteAddress::Inet(*g))).collect()),
            }
            b.build()
        }
        IpNet::V6(net) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .protocol(protocol);
            let gws: Vec<Ipv6Addr> = via
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                })
                .collect();
            match gws.as_slice() {
                [] => {}
                [gw] => b = b.gateway(*gw),
                many => {
                    b = b.multipath(many.iter().map(|g| hop(RouteAddress::Inet6(*g))).collect())
                }
            }
            b.build()
        }
    }
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl NodeRoutes {
    /// Connects to netlink in the calling thread's network namespace (the node's) and adopts
    /// the routes a previous agent installed.
    pub async fn open() -> Result<Self, RoutesError> {
        Self::open_with(ROUTE_PROTOCOL).await
    }

    /// [`NodeRoutes::open`] for the routes of protocol number `protocol`.
    pub async fn open_with(protocol: u8) -> Result<Self, RoutesError> {
        let handle = connect()?;
        let mut installed = BTreeMap::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = handle.route().get(query).execute();
            while let Some(route) =
                routes
                    .try_next()
                    .await
                    .map_err(|source| RoutesError::Netlink {
                        what: "listing routes".into(),
                        source,
                    })?
            {
                if route.header.protocol != RouteProtocol::from(protocol) {
                    continue;
                }
                let (mut dst, mut gws) = (None, Vec::new());
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Destination(a) => dst = address(a),
                        RouteAttribute::Gateway(a) => gws.extend(address(a)),
                        RouteAttribute::MultiPath(hops) => {
                            for hop in hops {
                                for a in &hop.attributes {
                                    if let RouteAttribute::Gateway(a) = a {
                                        gws.extend(address(a));
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                gws.sort();
                if let Some(dst) = dst
                    && !gws.is_empty()
                    && let Ok(net) = IpNet::new(dst, route.header.destination_prefix_length)
                {
                    installed.insert(net, gws);
                }
            }
        }
        Ok(Self {
            handle,
            protocol,
            installed,
        })
    }

    /// Makes the agent's routes exactly `desired`. A route that cannot be added (its gateway is
    /// not reachable from this node, say) is logged and retried on the next change.
    pub async fn sync(&mut self, desired: &BTreeMap<IpNet, IpAddr>) {
        let desired = desired.iter().map(|(c, v)| (*c, vec![*v])).collect();
        self.sync_multipath(&desired).await;
    }

    /// [`NodeRoutes::sync`] with several next hops per prefix (an ECMP route; sorted, so an
    /// unchanged set is not replaced). A prefix with no next hop has no route.
    pub async fn sync_multipath(&mut self, desired: &BTreeMap<IpNet, Vec<IpAddr>>) {
        for (cidr, via) in desired {
            let mut via = via.clone();
            via.sort();
            via.dedup();
            if via.is_empty() || self.installed.get(cidr) == Some(&via) {
                continue;
            }
            match self
                .handle
                .route()
                .add(message(self.protocol, *cidr, &via))
                .replace()
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(%cidr, ?via, "route to pods elsewhere");
                    self.installed.insert(*cidr, via);
                }
                Err(e) => {
                    tracing::error!(%cidr, ?via, error = %e, "cannot route a pod CIDR; is its next hop (a Node's InternalIP) reachable from this node?")
                }
            }
        }
        let stale: Vec<(IpNet, Vec<IpAddr>)> = self
            .installed
            .iter()
            .filter(|(cidr, _)| desired.get(cidr).is_none_or(|v| v.is_empty()))
            .map(|(c, v)| (*c, v.clone()))
            .collect();
        for (cidr, via) in stale {
            match self
                .handle
                .route()
                .del(message(self.protocol, cidr, &via))
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(%cidr, ?via, "removed a route that is no longer wanted");
                    self.installed.remove(&cidr);
                }
                Err(e) => tracing::warn!(%cidr, error = %e, "cannot remove a stale route"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_policy::model::parse_documents;

    use super::*;

    #[test]
    fn other_nodes_pod_cidrs_route_via_their_internal_ip() {
        let yaml = "\
apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.1.0.0/24]}\n\
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n---\n\
apiVersion: v1\nkind: Node\nmetadata: {name: n2}\nspec: {podCIDRs: [10.2.0.0/24, 'fd00:2::/64']}\n\
status: {addresses: [{type: Hostname, address: n2}, {type: InternalIP, address: 192.168.0.2}, {type: InternalIP, address: 'fd00::2'}]}\n---\n\
apiVersion: v1\nkind: Node\nmetadata: {name: n3}\nspec: {podCIDR: 10.3.0.0/24}\n\
status: {addresses: [{type: InternalIP, address: 'fd00::3'}]}\n";
        let mut state = ClusterState::default();
        for object in parse_documents(yaml, "test") {
            state.apply(object.unwrap());
        }
        let routes = desired_routes(&state, "n1");
        let want: BTreeMap<IpNet, IpAddr> =
            [("10.2.0.0/24", "192.168.0.2"), ("fd00:2::/64", "fd00::2")]
                .into_iter()
                .map(|(c, v)| (c.parse().unwrap(), v.parse().unwrap()))
                .collect();
        // n3 has no IPv4 address for its IPv4 pod CIDR: no route rather than a wrong one.
        assert_eq!(routes, want);
    }
}
