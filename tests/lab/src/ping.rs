//! ICMP echo from inside a network namespace, as `ping` sends it (this machine has no `ping`
//! binary): a raw socket, one echo request through the kernel, and the matching echo reply
//! within a timeout.

use std::{
    io,
    mem::{size_of, zeroed},
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use crate::netns::{Netns, spawn_in};

/// Distinguishes the echo requests of one test process (the kernel hands every raw ICMP socket
/// a copy of every reply).
static NEXT_ID: AtomicU16 = AtomicU16::new(1);

/// Sends one echo request from `from` to `dst` (a link-local `dst` leaves through `ifname`) and
/// says whether its reply came back from `dst` within `timeout`.
pub fn ping(from: &Netns, dst: IpAddr, ifname: &str, timeout: Duration) -> bool {
    let ifname = ifname.to_owned();
    spawn_in(from.path(), move || echo(dst, &ifname, timeout))
        .join()
        .expect("ping thread panicked")
        .unwrap_or_else(|e| panic!("ping {dst}: {e}"))
}

/// Pings until a reply comes back or `deadline` passes; whether one did.
pub fn ping_until_answered(from: &Netns, dst: IpAddr, ifname: &str, deadline: Instant) -> bool {
    loop {
        if ping(from, dst, ifname, Duration::from_millis(500)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The Internet checksum (RFC 1071) of `bytes`: written into an ICMP message or an IPv4
/// header, and 0 over one whose checksum is right.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn os<T: Ord + Default>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn echo(dst: IpAddr, ifname: &str, timeout: Duration) -> io::Result<bool> {
    let v6 = dst.is_ipv6();
    let (domain, protocol) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_ICMP)
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let raw = os(unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
    let mut request = [0u8; 16];
    request[0] = if v6 { 128 } else { 8 };
    request[4..6].copy_from_slice(&id.to_be_bytes());
    request[6..8].copy_from_slice(&1u16.to_be_bytes());
    request[8..].copy_from_slice(b"weirping");
    if !v6 {
        // The kernel fills in the ICMPv6 checksum itself (it covers a pseudo-header).
        let sum = internet_checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match dst {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut addr).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut addr).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
            if a.is_unicast_link_local() {
                sin6.sin6_scope_id = nix::net::if_::if_nametoindex(ifname)
                    .map_err(|e| io::Error::other(format!("no interface {ifname}: {e}")))?;
            }
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: the buffer and the address are valid for the lengths given.
    os(unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    })?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let tv = libc::timeval {
            tv_sec: left.as_secs() as libc::time_t,
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO.
        os(unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut from: libc::sockaddr_storage = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                return Ok(false);
            }
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let packet = &buf[..n as usize];
        // An IPv4 raw socket delivers the IP header too; an IPv6 one only the ICMPv6 message.
        let (source, icmp) = if v6 {
            // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 socket.
            let sin6 = unsafe { &*(&raw const from).cast::<libc::sockaddr_in6>() };
            (IpAddr::from(sin6.sin6_addr.s6_addr), packet)
        } else {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let source = IpAddr::from([packet[12], packet[13], packet[14], packet[15]]);
            (source, &packet[ihl.min(packet.len())..])
        };
        let reply_type = if v6 { 129 } else { 0 };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && icmp[4..6] == id.to_be_bytes()
            && source == dst
        {
            return Ok(true);
        }
    }
}
