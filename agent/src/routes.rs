//! Native routing between nodes: for every other Node object with an `InternalIP` and pod CIDRs,
//! a route to each of its pod CIDRs via that address (same family), as Calico's BGP-less mode
//! and Cilium's auto-direct-node-routes do on a flat L2 or routed underlay. Pod addresses stay
//! the source addresses across nodes, so the receiving node knows the sender's identity from its
//! ipcache.
//!
//! The agent's routes carry their own protocol number, so it finds (and removes) exactly its own
//! after a restart and never touches routes it did not make.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use weir_policy::model::ClusterState;

/// `rtm_protocol` of Weir's routes ('W').
pub const ROUTE_PROTOCOL: u8 = 0x57;

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
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

/// The routes the agent keeps in the node's main table.
pub struct NodeRoutes {
    handle: Handle,
    installed: BTreeMap<IpNet, IpAddr>,
}

fn message(cidr: IpNet, via: Option<IpAddr>) -> RouteMessage {
    let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    match (cidr, via) {
        (IpNet::V4(net), via) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .protocol(protocol);
            if let Some(IpAddr::V4(gw)) = via {
                b = b.gateway(gw);
            }
            b.build()
        }
        (IpNet::V6(net), via) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .protocol(protocol);
            if let Some(IpAddr::V6(gw)) = via {
                b = b.gateway(gw);
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
                if route.header.protocol != RouteProtocol::from(ROUTE_PROTOCOL) {
                    continue;
                }
                let (mut dst, mut gw) = (None, None);
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Destination(a) => dst = address(a),
                        RouteAttribute::Gateway(a) => gw = address(a),
                        _ => {}
                    }
                }
                if let (Some(dst), Some(gw)) = (dst, gw)
                    && let Ok(net) = IpNet::new(dst, route.header.destination_prefix_length)
                {
                    installed.insert(net, gw);
                }
            }
        }
        Ok(Self { handle, installed })
    }

    /// Makes the agent's routes exactly `desired`. A route that cannot be added (its gateway is
    /// not reachable from this node, say) is logged and retried on the next change.
    pub async fn sync(&mut self, desired: &BTreeMap<IpNet, IpAddr>) {
        for (cidr, via) in desired {
            if self.installed.get(cidr) == Some(via) {
                continue;
            }
            match self
                .handle
                .route()
                .add(message(*cidr, Some(*via)))
                .replace()
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(%cidr, %via, "route to another node's pods");
                    self.installed.insert(*cidr, *via);
                }
                Err(e) => {
                    tracing::error!(%cidr, %via, error = %e, "cannot route another node's pod CIDR; is its InternalIP reachable from this node?")
                }
            }
        }
        let stale: Vec<(IpNet, IpAddr)> = self
            .installed
            .iter()
            .filter(|(cidr, _)| !desired.contains_key(cidr))
            .map(|(c, v)| (*c, *v))
            .collect();
        for (cidr, via) in stale {
            match self
                .handle
                .route()
                .del(message(cidr, Some(via)))
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(%cidr, %via, "removed the route of a node that is gone");
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
