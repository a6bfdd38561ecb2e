//! The pod's wiring over rtnetlink: the veth pair, addresses, routes and neighbours, on the node
//! side (the plugin's own network namespace) and inside the pod's (from a thread that entered it).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlags, AddressScope},
    link::{
        AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
        LinkFlags, LinkMessage,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{PluginError, netlink_errno};

/// A link as CNI reports it.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub mtu: u32,
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A netlink connection in the calling thread's network namespace, driven by the current tokio
/// runtime.
pub fn connect() -> Result<Handle, PluginError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| PluginError::Io {
        what: "opening a netlink socket".into(),
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

fn link_from(msg: &LinkMessage) -> Link {
    let mut mac = [0u8; 6];
    let mut mtu = 0;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Address(a) if a.len() == 6 => mac.copy_from_slice(a),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    Link {
        index: msg.header.index,
        mac,
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu,
    }
}

/// The link called `name`, or `None` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, PluginError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(link_from(&msg))),
        Ok(None) => Ok(None),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(PluginError::netlink(format!("looking up link {name}"), e)),
    }
}

/// Every link's name (node side, for GC).
pub async fn link_names(handle: &Handle) -> Result<Vec<String>, PluginError> {
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|e| PluginError::netlink("listing links", e))?
    {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(n) = attr {
                names.push(n.clone());
            }
        }
    }
    Ok(names)
}

/// Deletes the link called `name`; `false` when there was none.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, PluginError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(PluginError::netlink(format!("deleting link {name}"), e)),
    }
}

/// Creates the veth pair: `host_ifname` (down) here, its peer `pod_ifname` directly inside the
/// pod's namespace (so it never collides with a node interface of the same name).
pub async fn create_veth(
    handle: &Handle,
    host_ifname: &str,
    pod_ifname: &str,
    pod_netns: &OwnedFd,
    mtu: u32,
) -> Result<Link, PluginError> {
    use std::os::fd::AsRawFd as _;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(pod_ifname.to_owned())
        .mtu(mtu)
        .setns_by_fd(pod_netns.as_fd().as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname.to_owned())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle.link().add(msg).execute().await.map_err(|e| {
        let hint = if netlink_errno(&e) == Some(libc::EEXIST) {
            format!(" ({host_ifname} on the node or {pod_ifname} in the pod already exists)")
        } else {
            String::new()
        };
        PluginError::netlink(
            format!("creating veth {host_ifname} with peer {pod_ifname} in the pod{hint}"),
            e,
        )
    })?;
    link_by_name(handle, host_ifname).await?.ok_or_else(|| {
        PluginError::CheckFailed(format!("veth {host_ifname} vanished after creation"))
    })
}

pub async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), PluginError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| PluginError::netlink(format!("setting {name} up"), e))
}

/// Sets one end of the pod's veth up with IPv6 address generation off, in the same request, so
/// it holds before the link has carrier. A routed veth with permanent neighbours needs no
/// link-local address, and without one neither end sends duplicate address detection probes or
/// router solicitations, nor the pod's end MLD reports, through the pod's policy, where they would
/// only be dropped and logged as drops. (The host end still reports joining all-routers when the
/// node forwards IPv6.) The addresses the plugin assigns are added explicitly. Where the kernel
/// has no IPv6 at all, a plain up.
pub async fn set_veth_up(handle: &Handle, index: u32, name: &str) -> Result<(), PluginError> {
    let mut msg = LinkUnspec::new_with_index(index).up().build();
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
        )]));
    match handle.link().set(msg).execute().await {
        Err(e) if netlink_errno(&e) == Some(libc::EAFNOSUPPORT) => {
            set_up(handle, index, name).await
        }
        done => done.map_err(|e| PluginError::netlink(format!("setting {name} up"), e)),
    }
}

/// Adds `addr/prefix` to the link; IPv6 without duplicate address detection (usable at once).
pub async fn add_address(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
    name: &str,
) -> Result<(), PluginError> {
    let mut req = handle.address().add(index, addr, prefix).replace();
    if addr.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(|e| PluginError::netlink(format!("adding {addr}/{prefix} to {name}"), e))
}

/// Puts the pod's gateway on the host veth, so that the node itself answers it (ping, and
/// anything else the node serves there; the pod's egress policy still applies to it).
///
/// IPv4: `169.254.1.1/32` with scope host. Every host veth carries it (the kernel keeps the
/// local route while any of them does). Scope host keeps it out of source address selection:
/// traffic the node starts towards a pod (kubelet's probes) keeps the node's own address, which
/// policy knows as the host, and never comes from the gateway address. IPv6: `fe80::1/64`,
/// link-local to each veth.
pub async fn add_gateway_address(
    handle: &Handle,
    index: u32,
    gateway: IpAddr,
    name: &str,
) -> Result<(), PluginError> {
    let prefix = if gateway.is_ipv4() { 32 } else { 64 };
    let mut req = handle.address().add(index, gateway, prefix).replace();
    if gateway.is_ipv4() {
        req.message_mut().header.scope = AddressScope::Host;
    } else {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute().await.map_err(|e| {
        PluginError::netlink(
            format!("adding the gateway {gateway}/{prefix} to {name}"),
            e,
        )
    })
}

/// A permanent neighbour entry: `ip` is at `mac` on the link.
pub async fn add_neighbour(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    mac: &[u8; 6],
    name: &str,
) -> Result<(), PluginError> {
    handle
        .neighbours()
        .add(index, ip)
        .link_layer_address(mac)
        .replace()
        .execute()
        .await
        .map_err(|e| PluginError::netlink(format!("adding neighbour {ip} on {name}"), e))
}

/// A route to `dst/prefix` over the link (scope link), optionally via a gateway (on-link) and
/// with a metric (`None`: the kernel's default, 0 for IPv4 and 1024 for IPv6).
pub async fn add_route(
    handle: &Handle,
    index: u32,
    dst: IpAddr,
    prefix: u8,
    gateway: Option<IpAddr>,
    priority: Option<u32>,
    name: &str,
) -> Result<(), PluginError> {
    let mut msg = route_message(index, dst, prefix, gateway);
    if let Some(p) = priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            let metric = priority.map(|p| format!(" metric {p}")).unwrap_or_default();
            PluginError::netlink(
                format!("adding route {dst}/{prefix}{via} dev {name}{metric}"),
                e,
            )
        })
}

fn route_message(index: u32, dst: IpAddr, prefix: u8, gateway: Option<IpAddr>) -> RouteMessage {
    match (dst, gateway) {
        (IpAddr::V4(dst), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .output_interface(index);
            match gw {
                Some(IpAddr::V4(gw)) => b = b.gateway(gw).onlink(),
                _ => b = b.scope(RouteScope::Link),
            }
            b.build()
        }
        (IpAddr::V6(dst), gw) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst, prefix)
                .output_interface(index);
            if let Some(IpAddr::V6(gw)) = gw {
                b = b.gateway(gw);
            }
            b.build()
        }
    }
}

/// The addresses (with prefix) on a link.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, PluginError> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| PluginError::netlink("listing addresses", e))?
    {
        if msg.header.index != index {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Address(a) = attr {
                out.push((*a, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// One route as CHECK needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// The metric; `None` when the kernel reports none (IPv4 metric 0).
    pub priority: Option<u32>,
}

impl Route {
    /// The metric as the kernel orders routes by it.
    pub fn metric(&self) -> u32 {
        self.priority.unwrap_or(0)
    }
}

/// The main table's routes of one family.
pub async fn routes(handle: &Handle, v6: bool) -> Result<Vec<Route>, PluginError> {
    let query = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let mut stream = handle.route().get(query).execute();
    let mut out = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| PluginError::netlink("listing routes", e))?
    {
        let unspecified = if msg.header.address_family == AddressFamily::Inet6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let mut route = Route {
            dst: unspecified,
            prefix: msg.header.destination_prefix_length,
            gateway: None,
            oif: None,
            priority: None,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => {
                    if let Some(ip) = route_ip(a) {
                        route.dst = ip;
                    }
                }
                RouteAttribute::Gateway(a) => route.gateway = route_ip(a),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Priority(p) => route.priority = Some(*p),
                _ => {}
            }
        }
        out.push(route);
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A netlink connection inside the network namespace `netns`, driven by the current runtime
/// like [`connect`]'s. A socket belongs to the namespace its thread was in when it was created,
/// so the calling thread enters `netns` just to open it and then returns to its own namespace:
/// no thread of its own, no second runtime, and the pod's side is configured concurrently with
/// the node's on one thread.
pub fn connect_in(netns: BorrowedFd<'_>) -> Result<Handle, PluginError> {
    let io = |what: &str, source: std::io::Error| PluginError::Io {
        what: what.into(),
        source,
    };
    let own = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| io("opening this thread's network namespace", e))?;
    let enter = |ns: BorrowedFd<'_>, what: &str| {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| io(what, e.into()))
    };
    enter(netns, "entering the pod's network namespace")?;
    let opened = connect();
    // Back before anything else: the node's side must not be configured in the pod's namespace.
    enter(own.as_fd(), "returning to the node's network namespace")?;
    opened
}
