//! The tc messages the agent needs to put its programs on a pod's host veth: a clsact qdisc and
//! one cls_bpf filter (direct action) per direction, over a synchronous rtnetlink socket.
//!
//! Why clsact and not TCX links: every TCX attach (and every detach, and the removal of a device
//! that still has TCX links) waits for a normal RCU grace period while it holds RTNL
//! (`tcx_entry_sync`). Two per pod, serialised across the whole node with every other netlink
//! change, put every concurrent CNI ADD behind the others. A cls_bpf filter change waits for no
//! grace period. `cargo xtask bench cni` shows what this costs on a given machine.
//!
//! Synchronous on purpose: attaching runs on the caller's (blocking) thread with a socket of its
//! own, so concurrent ADDs do not queue behind one shared connection task.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};

use super::rtnl::Rtnl;

/// Our filters' priority on each hook. One filter per hook: a replace with the same priority and
/// handle swaps the program atomically (a restarted agent's fresh programs).
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: u32 = 1;
/// `ETH_P_ALL`, in network byte order as tc expects it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

/// A tc hook on an interface: ingress sees what the interface receives, egress what it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Hook::Ingress => TcHandle::MIN_INGRESS,
                Hook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// The tc requests, over a netlink route socket in the calling thread's network namespace.
pub struct Tc {
    rtnl: Rtnl,
}

impl Tc {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            rtnl: Rtnl::open()?,
        })
    }

    /// Adds a clsact qdisc to `ifindex`; one that is already there is fine.
    pub fn ensure_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        match self.rtnl.request(
            RouteNetlinkMessage::NewQueueDiscipline(clsact_message(ifindex)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Puts `program` (direct action) on `hook` of `ifindex`, replacing the program of our filter
    /// if there is one: the hook is never without a program in between.
    pub fn replace_filter(
        &mut self,
        ifindex: u32,
        hook: Hook,
        program: BorrowedFd<'_>,
        name: &str,
    ) -> io::Result<()> {
        let mut message = filter_message(ifindex, hook);
        message.attributes.push(TcAttribute::Kind("bpf".into()));
        message.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(program.as_raw_fd() as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_owned())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.rtnl
            .request(RouteNetlinkMessage::NewTrafficFilter(message), NLM_F_CREATE)
            .map(drop)
    }

    /// The ids of the BPF programs of the filters on `hook` of `ifindex` (empty when the
    /// interface has no clsact qdisc).
    pub fn filter_programs(&mut self, ifindex: u32, hook: Hook) -> io::Result<Vec<u32>> {
        let mut message = TcMessage::with_index(ifindex as i32);
        message.header.parent = hook.parent();
        let replies = match self
            .rtnl
            .request(RouteNetlinkMessage::GetTrafficFilter(message), NLM_F_DUMP)
        {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                return Ok(Vec::new());
            }
            other => other?,
        };
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .flat_map(|f| f.attributes)
            .filter_map(|a| match a {
                TcAttribute::Options(options) => Some(options),
                _ => None,
            })
            .flatten()
            .filter_map(|o| match o {
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(id),
                _ => None,
            })
            .collect())
    }

    /// Removes the clsact qdisc of `ifindex` and every filter on it. `false` if it had none.
    pub fn delete_clsact(&mut self, ifindex: u32) -> io::Result<bool> {
        match self.rtnl.request(
            RouteNetlinkMessage::DelQueueDiscipline(clsact_message(ifindex)),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The clsact qdisc of `ifindex` (to add or delete).
fn clsact_message(ifindex: u32) -> TcMessage {
    let mut message = TcMessage::with_index(ifindex as i32);
    message.header.parent = TcHandle::CLSACT;
    message.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    message.attributes.push(TcAttribute::Kind("clsact".into()));
    message
}

/// Our filter on `hook` of `ifindex`.
fn filter_message(ifindex: u32, hook: Hook) -> TcMessage {
    let mut message = TcMessage::with_index(ifindex as i32);
    message.header.parent = hook.parent();
    message.header.handle = TcHandle::from(FILTER_HANDLE);
    message.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(ETH_P_ALL_BE);
    message
}
