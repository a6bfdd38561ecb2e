//! What the uplink is, as far as the XDP filter's mode is concerned: whether it is a veth, and in
//! which mode an XDP program is attached to it now. One `RTM_GETLINK` over a synchronous rtnetlink
//! socket of the calling thread's network namespace (`rtnl`).

use std::io;

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};

use super::rtnl::Rtnl;

/// The XDP mode a program runs in on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// In the driver (`XDP_ATTACHED_DRV`).
    Native,
    /// In the core receive path, on an skb (`XDP_ATTACHED_SKB`).
    Generic,
    /// Offloaded to the NIC, or several programs: not Weir's doing.
    Other,
}

/// What the agent needs to know about the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UplinkLink {
    pub is_veth: bool,
    /// The mode of the XDP program on it, if any.
    pub xdp: Option<AttachedMode>,
}

/// Reads `ifindex`'s kind and XDP attachment.
pub fn query(ifindex: u32) -> io::Result<UplinkLink> {
    let mut message = LinkMessage::default();
    message.header.index = ifindex;
    Rtnl::open()?
        .request(RouteNetlinkMessage::GetLink(message), 0)?
        .iter()
        .find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(m) => Some(describe(m)),
            _ => None,
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no link in the reply"))
}

fn describe(message: &LinkMessage) -> UplinkLink {
    let mut link = UplinkLink {
        is_veth: false,
        xdp: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                link.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    if let LinkXdp::Attached(attached) = x {
                        link.xdp = match attached {
                            XdpAttached::None => None,
                            XdpAttached::Driver => Some(AttachedMode::Native),
                            XdpAttached::SocketBuffer => Some(AttachedMode::Generic),
                            _ => Some(AttachedMode::Other),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link
}
