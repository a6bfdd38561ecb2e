//! What the uplink is, as far as the XDP filter's mode is concerned: whether it is a veth, and in
//! which mode an XDP program is attached to it now. One `RTM_GETLINK` over a synchronous rtnetlink
//! socket of the calling thread's network namespace.

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

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
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = LinkMessage::default();
    message.header.index = ifindex;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetLink(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut link = None;
    let mut receive = Vec::with_capacity(64 * 1024);
    loop {
        receive.clear();
        socket.recv(&mut receive, 0)?;
        let mut offset = 0;
        while offset < receive.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&receive[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = reply.header.length as usize;
            if length == 0 {
                break;
            }
            offset += length;
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    link = Some(describe(&m));
                }
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => {
                    return link.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no link in the reply")
                    });
                }
                _ => {}
            }
        }
    }
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
