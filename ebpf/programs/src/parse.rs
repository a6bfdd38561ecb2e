//! Packet parsing: Ethernet, IPv4 (IHL honoured) or IPv6 (fixed header; extension headers are
//! not walked, except a hop-by-hop header in front of MLD), and the first bytes of the transport
//! header, into the 16-byte-address 5-tuple of `CtKey`.
//!
//! All reads go through `bpf_skb_load_bytes`, which fails when the packet is shorter than the
//! read: a truncated header is `Malformed`.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use weir_common::{Addr, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::key::{DADDR_WORD, KeyBuf, SADDR_WORD};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// IPv6 next header: hop-by-hop options.
const IPV6_HOP_BY_HOP: u8 = 0;
/// ICMP and ICMPv6 headers, including the echo id/sequence or the unused word of errors.
const ICMP_HLEN: usize = 8;

/// The packet could not be parsed (truncated or inconsistent header).
pub struct Malformed;

/// What kind of packet the parser found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): allowed without a policy check.
    NotIp,
    /// ICMPv6 the link itself needs: neighbour discovery, router solicitation/advertisement
    /// (types 133-137) and multicast listener discovery (130-132, 143). All are link-scoped
    /// (hop limit 255 or 1), so letting them through opens no path to another pod.
    LinkLocal,
    /// An ordinary IP packet.
    Normal,
    /// An ICMP/ICMPv6 error that quotes the packet it is about at `Parsed::inner_off`.
    IcmpError,
}

/// Result of parsing the IP layer and up.
pub struct Parsed {
    pub class: Class,
    /// Offset of the quoted IP header when `class == IcmpError`.
    pub inner_off: usize,
    /// Whether the packet is IPv6 (the quoted header of an error has the same family).
    pub v6: bool,
    /// `ECHO_*`: an echo request travels in its connection's original direction, a reply in
    /// the reply direction (their tuples share the id, so only the type tells them apart).
    pub echo: u8,
}

/// `Parsed::echo`.
pub const ECHO_NONE: u8 = 0;
pub const ECHO_REQUEST: u8 = 1;
pub const ECHO_REPLY: u8 = 2;

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, Malformed> {
    ctx.load::<T>(off).map_err(|_| Malformed)
}

/// Loads 16 bytes straight into `dst` (no stack temporary).
#[inline(always)]
fn load_addr(ctx: &TcContext, off: usize, dst: &mut Addr) -> Result<(), Malformed> {
    // SAFETY: `dst` is 16 writable bytes; the helper checks the packet bounds.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    if ret == 0 { Ok(()) } else { Err(Malformed) }
}

/// Fails unless the packet holds at least `len` bytes from `off`.
#[inline(always)]
fn require(ctx: &TcContext, off: usize, len: usize) -> Result<(), Malformed> {
    load::<u8>(ctx, off + len - 1).map(|_| ())
}

/// Ports in network order (as they sit in memory in the packet).
#[inline(always)]
fn ports(b: [u8; 4]) -> (u16, u16) {
    (
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    )
}

/// Whether the IPv6 packet at `off`, whose first extension header at `l4` is hop-by-hop, is an
/// MLD message: every MLD message carries its router alert in a hop-by-hop header and has hop
/// limit 1 (RFC 2710, 3810). The one extension header looked past: MLD is link-scoped like
/// neighbour discovery, which needs none.
#[inline(always)]
fn is_mld_behind_hop_by_hop(ctx: &TcContext, off: usize, l4: usize) -> Result<bool, Malformed> {
    let hop_limit: u8 = load(ctx, off + 7)?;
    // Next header, then the header's length in 8-byte units, not counting the first 8.
    let hbh: [u8; 2] = load(ctx, l4)?;
    if hbh[0] != PROTO_ICMPV6 || hop_limit != 1 {
        return Ok(false);
    }
    let icmp_type: u8 = load(ctx, l4 + (hbh[1] as usize + 1) * 8)?;
    Ok(matches!(icmp_type, 130..=132 | 143))
}

/// Parses the whole packet from the Ethernet header into `key` (the packet's own tuple), which
/// must be zeroed.
#[inline(always)]
pub fn parse(ctx: &TcContext, key: &mut KeyBuf) -> Result<Parsed, Malformed> {
    let eth_type: [u8; 2] = load(ctx, 12)?;
    match u16::from_be_bytes(eth_type) {
        ETH_P_IP => parse_ip(ctx, ETH_HLEN, false, false, key),
        ETH_P_IPV6 => parse_ip(ctx, ETH_HLEN, true, false, key),
        _ => Ok(Parsed {
            class: Class::NotIp,
            inner_off: 0,
            v6: false,
            echo: ECHO_NONE,
        }),
    }
}

/// Parses the IP header at `off` and the transport header after it into `key`, which must be
/// zeroed (fields the packet does not have, such as ports, stay 0).
///
/// `inner`: this is the packet quoted by an ICMP error, of which only the IP header and the
/// first 8 bytes of the transport header are guaranteed; no further error or link-local
/// classification happens there.
#[inline(always)]
pub fn parse_ip(
    ctx: &TcContext,
    off: usize,
    v6: bool,
    inner: bool,
    buf: &mut KeyBuf,
) -> Result<Parsed, Malformed> {
    let proto: u8;
    let l4: usize;
    let mut first_fragment = true;
    if v6 {
        let vtc: u8 = load(ctx, off)?;
        if vtc >> 4 != 6 {
            return Err(Malformed);
        }
        require(ctx, off, IPV6_HLEN)?;
        proto = load(ctx, off + 6)?;
        load_addr(ctx, off + 8, &mut buf.key.saddr)?;
        load_addr(ctx, off + 24, &mut buf.key.daddr)?;
        l4 = off + IPV6_HLEN;
    } else {
        let hdr: [u8; IPV4_MIN_HLEN] = load(ctx, off)?;
        if hdr[0] >> 4 != 4 {
            return Err(Malformed);
        }
        let ihl = ((hdr[0] & 0x0f) as usize) * 4;
        if ihl < IPV4_MIN_HLEN {
            return Err(Malformed);
        }
        require(ctx, off, ihl)?;
        proto = hdr[9];
        first_fragment = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff == 0;
        buf.set_ipv4(SADDR_WORD, [hdr[12], hdr[13], hdr[14], hdr[15]]);
        buf.set_ipv4(DADDR_WORD, [hdr[16], hdr[17], hdr[18], hdr[19]]);
        l4 = off + ihl;
    }
    let key = &mut buf.key;
    key.proto = proto;
    let mut parsed = Parsed {
        class: Class::Normal,
        inner_off: 0,
        v6,
        echo: ECHO_NONE,
    };
    if !first_fragment {
        // No transport header in this fragment: ports 0.
        return Ok(parsed);
    }
    if v6 && !inner && proto == IPV6_HOP_BY_HOP && is_mld_behind_hop_by_hop(ctx, off, l4)? {
        parsed.class = Class::LinkLocal;
        return Ok(parsed);
    }
    let is_icmp = (proto == PROTO_ICMP && !v6) || (proto == PROTO_ICMPV6 && v6);
    if is_icmp {
        let h: [u8; ICMP_HLEN] = load(ctx, l4)?;
        let ty = h[0];
        let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
        let error = if v6 {
            (1..=4).contains(&ty)
        } else {
            ty == 3 || ty == 11 || ty == 12
        };
        if ty == request || ty == reply {
            // Echo id as the source port, destination port 0: request and reply share an entry.
            key.sport = u16::from_ne_bytes([h[4], h[5]]);
            parsed.echo = if ty == request {
                ECHO_REQUEST
            } else {
                ECHO_REPLY
            };
        } else if !inner && v6 && matches!(ty, 130..=132 | 133..=137 | 143) {
            parsed.class = Class::LinkLocal;
        } else if !inner && error {
            parsed.class = Class::IcmpError;
            parsed.inner_off = l4 + ICMP_HLEN;
        }
        return Ok(parsed);
    }
    let l4_len = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return Ok(parsed),
    };
    // A quoted packet carries only the first 8 bytes of its transport header.
    if !inner {
        require(ctx, l4, l4_len)?;
    }
    let (sport, dport) = ports(load(ctx, l4)?);
    key.sport = sport;
    key.dport = dport;
    Ok(parsed)
}
