//! The mesh gateway's TUN device (`weir-mesh`): the kernel routes packets for peer clusters'
//! prefixes into it and the gateway reads them; packets received from peers are written into it
//! and the kernel routes them on to local pods. Plain non-blocking reads and writes through
//! tokio's `AsyncFd` (no offload yet: one IP packet per read).

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::io::unix::AsyncFd;

use crate::routes::ROUTE_PROTOCOL;

/// The device's name.
pub const TUN_DEVICE: &str = "weir-mesh";
/// Larger than any IP packet the device can carry (no offload: one packet per read).
pub const TUN_READ_BUF: usize = 65_536;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An open TUN device.
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    index: u32,
    handle: Handle,
}

impl Tun {
    /// Creates `weir-mesh` in this network namespace (it goes away with the process) and sets it
    /// up.
    pub async fn open() -> Result<Self, TunError> {
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
        // SAFETY: ifreq is plain data; zero is a valid value for every field.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(TUN_DEVICE.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads an ifreq we own for the duration of the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &ifr) } < 0 {
            return Err(TunError::Open(io::Error::last_os_error()));
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
        // the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| TunError::Open(io::Error::other(e.to_string())))?;
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
        Ok(Self { fd, index, handle })
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

    /// Reads one packet, waiting for it.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read(fd.get_ref(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one packet if one is waiting (`WouldBlock` otherwise): the batcher flushes when
    /// the device has nothing more.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        read(self.fd.get_ref(), buf)
    }

    /// Writes one packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| write(fd.get_ref(), packet)) {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn write(fd: &OwnedFd, packet: &[u8]) -> io::Result<usize> {
    // SAFETY: packet is valid for reads of packet.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("opening the TUN device {TUN_DEVICE} (needs CAP_NET_ADMIN and /dev/net/tun): {0}")]
    Open(#[source] io::Error),
    #[error("{0}")]
    Netlink(String),
}
