//! The mesh gateway's TUN device (`weir-mesh`): the kernel routes packets for peer clusters'
//! prefixes into it and the gateway reads them; packets received from peers are written into it
//! and the kernel routes them on to local pods. Non-blocking reads and writes through tokio's
//! `AsyncFd`.
//!
//! With offload (the default), the device is opened with `IFF_VNET_HDR` and told by
//! `TUNSETOFFLOAD` that we take TSO (v4, v6, ECN), USO (v4, v6) and partial checksums, so the
//! kernel hands over a pod's TSO burst as one super-packet of up to 64 KiB behind a
//! `virtio_net_hdr`, instead of segmenting it into MTU-sized packets first; writes carry the
//! header the same way and the kernel segments only where a device on the path needs it.
//!
//! With more than one queue (`IFF_MULTI_QUEUE`), the device has one descriptor per queue and
//! the gateway one reader per queue: the kernel puts each flow on one queue (by its hash, so a
//! flow's packets stay in order), so several flows can be read on several cores at once.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use bytes::BytesMut;
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::io::unix::AsyncFd;

use crate::routes::ROUTE_PROTOCOL;

/// The device's name.
pub const TUN_DEVICE: &str = "weir-mesh";
/// Larger than the virtio header and any IP packet or super-packet the device can carry.
pub const TUN_READ_BUF: usize = 128 * 1024;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Most queues the device may have (the kernel allows 256; one reader each is plenty).
pub const MAX_TUN_QUEUES: usize = 16;

/// Attaches `fd` (an open /dev/net/tun) to the device [`TUN_DEVICE`] as one more of its queues
/// with `multi_queue`, creating the device with the first.
fn attach(fd: &OwnedFd, offload: bool, multi_queue: bool) -> Result<(), TunError> {
    // SAFETY: ifreq is plain data; zero is a valid value for every field.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(TUN_DEVICE.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TUN
        | IFF_NO_PI
        | if offload { IFF_VNET_HDR } else { 0 }
        | if multi_queue { IFF_MULTI_QUEUE } else { 0 };
    // SAFETY: TUNSETIFF reads an ifreq we own for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &ifr) } < 0 {
        return Err(TunError::Open(io::Error::last_os_error()));
    }
    Ok(())
}

/// An open TUN device.
pub struct Tun {
    /// One descriptor per queue; packets are written through the first.
    queues: Vec<AsyncFd<OwnedFd>>,
    index: u32,
    handle: Handle,
    offload: bool,
}

impl Tun {
    /// Creates `weir-mesh` in this network namespace (it goes away with the process) with
    /// `queues` queues (1 to [`MAX_TUN_QUEUES`]) and sets it up; with `offload`, every read and
    /// write carries a `virtio_net_hdr` and super-packets.
    pub async fn open(offload: bool, queues: usize) -> Result<Self, TunError> {
        if !(1..=MAX_TUN_QUEUES).contains(&queues) {
            return Err(TunError::Queues(queues));
        }
        let queues = (0..queues)
            .map(|_| open_queue(offload, queues > 1))
            .collect::<Result<Vec<_>, _>>()?;
        if offload {
            // A setting of the device, not of a queue: once, through any of them.
            set_offload(queues[0].get_ref())?;
        }
        let (connection, handle, _) = rtnetlink::new_connection().map_err(TunError::Open)?;
        tokio::spawn(connection);
        let index = handle
            .link()
            .get()
            .match_name(TUN_DEVICE.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|e| TunError::Netlink(format!("finding {TUN_DEVICE}: {e}")))?
            .map(|l| l.header.index)
            .ok_or_else(|| TunError::Netlink(format!("{TUN_DEVICE} was not created")))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| TunError::Netlink(format!("setting {TUN_DEVICE} up: {e}")))?;
        Ok(Self {
            queues,
            index,
            handle,
            offload,
        })
    }

    /// How many queues the device has (one reader each).
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether reads and writes carry a `virtio_net_hdr`.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Routes `prefix` into the device (replacing any route to it).
    pub async fn route(&self, prefix: IpNet) -> Result<(), TunError> {
        self.handle
            .route()
            .add(self.route_message(prefix))
            .replace()
            .execute()
            .await
            .map_err(|e| TunError::Netlink(format!("routing {prefix} into {TUN_DEVICE}: {e}")))
    }

    /// Removes the route of `prefix` into the device (a MeshPeer removed).
    pub async fn unroute(&self, prefix: IpNet) -> Result<(), TunError> {
        self.handle
            .route()
            .del(self.route_message(prefix))
            .execute()
            .await
            .map_err(|e| {
                TunError::Netlink(format!(
                    "removing the route of {prefix} into {TUN_DEVICE}: {e}"
                ))
            })
    }

    fn route_message(&self, prefix: IpNet) -> netlink_packet_route::route::RouteMessage {
        let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        match prefix {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.index)
                .protocol(protocol)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.index)
                .protocol(protocol)
                .build(),
        }
    }

    /// Reads one packet from `queue` (behind its virtio header with offload) onto the end of
    /// `buf`, after `headroom` zero bytes, waiting for it; `buf` must have room for the headroom
    /// and [`TUN_READ_BUF`] more. The batcher reads straight into the batch it builds this way.
    pub async fn recv_into(
        &self,
        queue: usize,
        buf: &mut BytesMut,
        headroom: usize,
    ) -> io::Result<usize> {
        loop {
            let mut guard = self.queues[queue].readable().await?;
            match guard.try_io(|fd| read_into(fd.get_ref(), buf, headroom)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// [`Tun::recv_into`] if a packet is waiting (`WouldBlock` otherwise).
    pub fn try_recv_into(
        &self,
        queue: usize,
        buf: &mut BytesMut,
        headroom: usize,
    ) -> io::Result<usize> {
        read_into(self.queues[queue].get_ref(), buf, headroom)
    }

    /// Writes one packet now, behind `vnet_hdr` when the device has offload (a TUN write does
    /// not wait: the kernel takes the packet or drops it).
    pub fn try_send(&self, vnet_hdr: &[u8], packet: &[u8]) -> io::Result<()> {
        let fd = self.queues[0].get_ref().as_raw_fd();
        let n = if self.offload {
            let iov = [
                libc::iovec {
                    iov_base: vnet_hdr.as_ptr() as *mut _,
                    iov_len: vnet_hdr.len(),
                },
                libc::iovec {
                    iov_base: packet.as_ptr() as *mut _,
                    iov_len: packet.len(),
                },
            ];
            // SAFETY: both iovecs point into slices valid for reads for the call.
            unsafe { libc::writev(fd, iov.as_ptr(), 2) }
        } else {
            // SAFETY: packet is valid for reads of packet.len() bytes.
            unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens /dev/net/tun as one queue of [`TUN_DEVICE`] (the first creates the device), with
/// virtio headers when `offload`, registered with the runtime.
fn open_queue(offload: bool, multi_queue: bool) -> Result<AsyncFd<OwnedFd>, TunError> {
    // SAFETY: a plain open(2) of a device node; the result is checked.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(TunError::Open(io::Error::last_os_error()));
    }
    // SAFETY: raw is a valid, owned descriptor from open(2).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Its own function: the ifreq (not `Send`) must not live across an await of the caller, so
    // the gateway's start can run on its own thread (`crate::mesh_thread`).
    attach(&fd, offload, multi_queue)?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for the
    // AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| TunError::Open(io::Error::other(e.to_string())))
}

/// Tells the device that we take TSO (v4, v6, ECN), USO (v4, v6) and partial checksums.
fn set_offload(fd: &OwnedFd) -> Result<(), TunError> {
    let features = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6;
    // SAFETY: TUNSETOFFLOAD takes the feature bits by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, features) } < 0 {
        return Err(TunError::Offload(io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads one packet into `buf`'s spare capacity after `headroom` zero bytes; on success `buf`
/// grows by the headroom and the bytes read, on failure it is unchanged.
fn read_into(fd: &OwnedFd, buf: &mut BytesMut, headroom: usize) -> io::Result<usize> {
    buf.reserve(headroom + TUN_READ_BUF);
    let spare = buf.spare_capacity_mut();
    for b in &mut spare[..headroom] {
        b.write(0);
    }
    let room = &mut spare[headroom..headroom + TUN_READ_BUF];
    // SAFETY: room is valid for writes of room.len() bytes (uninitialised memory is fine for
    // read(2) to write into).
    let n = unsafe { libc::read(fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the headroom was written above and read(2) initialised the n bytes after it.
    unsafe { buf.set_len(buf.len() + headroom + n as usize) };
    Ok(n as usize)
}

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("opening the TUN device {TUN_DEVICE} (needs CAP_NET_ADMIN and /dev/net/tun): {0}")]
    Open(#[source] io::Error),
    #[error(
        "turning on TSO/USO offload on the TUN device {TUN_DEVICE} (TUNSETOFFLOAD; USO needs Linux 6.2; or run with --mesh-offload false): {0}"
    )]
    Offload(#[source] io::Error),
    #[error("--mesh-tun-queues {0}: the TUN device takes 1 to {MAX_TUN_QUEUES} queues")]
    Queues(usize),
    #[error("{0}")]
    Netlink(String),
}
