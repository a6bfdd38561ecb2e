//! Packet parsing: Ethernet, IPv4 (IHL honoured) or IPv6 (its extension header chain walked, up to
//! `MAX_IPV6_EXTENSION_HEADERS` headers), whether the packet is a fragment, and the first bytes of
//! the transport header, into the 16-byte-address 5-tuple of `CtKey`.
//!
//! The headers every packet has are read with `Packet::load_linear` (directly from the linear part
//! where it can), the rest with `Packet::load` (the helper); both fail when the packet is shorter
//! than the read: a truncated header is `Malformed`.

use weir_common::{
    Addr, ECHO_NONE, ECHO_REPLY, ECHO_REQUEST, MAX_IPV6_EXTENSION_HEADERS, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::{
    key::{DADDR_WORD, KeyBuf, SADDR_WORD},
    packet::Packet,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// IPv4 flags and fragment offset: more fragments, offset (8-byte units).
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;
/// IPv6 next header values of the extension headers walked.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// IPv6 Fragment header: its length, and in its offset field the offset (8-byte units, upper 13
/// bits) and the more-fragments flag (lowest bit).
const IPV6_FRAGMENT_HLEN: usize = 8;
const IPV6_FRAGMENT_OFFSET: u16 = 0xfff8;
const IPV6_FRAGMENT_MORE: u16 = 0x0001;
/// ICMP and ICMPv6 headers, including the echo id/sequence or the unused word of errors.
const ICMP_HLEN: usize = 8;
/// MLD's hop limit (RFC 2710, 3810).
const MLD_HOP_LIMIT: u8 = 1;

/// Why a packet could not be parsed.
pub enum ParseError {
    /// Truncated or inconsistent header.
    Malformed,
    /// An IPv6 extension header chain the parser does not walk (`REASON_IPV6_EXTENSIONS`).
    Extensions,
}

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

/// Whether the packet is a fragment of a larger datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram (IPv6 atomic fragments included: offset 0, no more fragments).
    Whole,
    /// The first fragment (offset 0, more to come): it carries the transport header.
    First,
    /// A later fragment: no transport header, ports 0; its protocol is the one of `frag_proto`.
    Later,
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
    pub fragment: Fragment,
    /// For fragments: the datagram's id and the protocol field that every fragment carries
    /// (`FragKey::id`, `FragKey::proto`).
    pub frag_id: u32,
    pub frag_proto: u8,
    /// Offset of the transport header (0 when the packet is not IP).
    pub l4_off: usize,
    /// IPv4: the header's TTL, protocol and checksum; IPv6: the hop limit, then zeros. What a
    /// router's hop rewrites (`redirect`), read here with the rest of the header.
    pub ttl_check: [u8; 4],
}

#[inline(always)]
fn load<T, C: Packet>(ctx: &C, off: usize) -> Result<T, ParseError> {
    ctx.load::<T>(off).ok_or(ParseError::Malformed)
}

/// A read of the headers every packet has: directly where it can (see `packet`).
#[inline(always)]
fn load_linear<T, C: Packet>(ctx: &C, off: usize) -> Result<T, ParseError> {
    ctx.load_linear::<T>(off).ok_or(ParseError::Malformed)
}

/// Loads 16 bytes straight into `dst` (no stack temporary), directly where it can.
#[inline(always)]
fn load_addr<C: Packet>(ctx: &C, off: usize, dst: &mut Addr) -> Result<(), ParseError> {
    if ctx.load_bytes_linear(off, dst.as_mut_ptr(), dst.len()) {
        Ok(())
    } else {
        Err(ParseError::Malformed)
    }
}

/// Fails unless the packet holds at least `len` (2 or more) bytes from `off`. It reads the last
/// two bytes, not the last one (see `Packet::load_linear`).
#[inline(always)]
fn require<C: Packet>(ctx: &C, off: usize, len: usize) -> Result<(), ParseError> {
    load_linear::<[u8; 2], C>(ctx, off + len - 2).map(|_| ())
}

#[inline(always)]
fn first_four<const N: usize>(h: [u8; N]) -> [u8; 4] {
    [h[0], h[1], h[2], h[3]]
}

/// Ports in network order (as they sit in memory in the packet).
#[inline(always)]
fn ports(b: [u8; 4]) -> (u16, u16) {
    (
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    )
}

/// Every next header value IANA lists as an IPv6 extension header, except ESP (whose content is
/// encrypted: it ends the chain like a transport protocol, with no ports).
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// The IPv6 extension header chain, walked.
struct Chain {
    /// The transport protocol (or, for a later fragment, the Fragment header's next header).
    proto: u8,
    /// Offset of the transport header.
    l4: usize,
    /// Extension headers in front of it.
    headers: u32,
    /// The first (and then only allowed) header is hop-by-hop.
    hop_by_hop: bool,
    fragment: Fragment,
    frag_id: u32,
    frag_proto: u8,
}

/// Walks the extension headers from `start`, where a header of type `next` begins (the fixed
/// header's next header). Hop-by-hop, routing, destination options and AH are skipped by their
/// length fields; a Fragment header says whether this is a fragment, and a later fragment ends the
/// walk (the rest of the chain is in the first fragment). A chain longer than
/// `MAX_IPV6_EXTENSION_HEADERS`, a header of a layout not walked, a second Fragment header or a
/// hop-by-hop header anywhere but first is `Extensions`: dropped, never guessed at.
#[inline(always)]
fn walk_ipv6_extensions<C: Packet>(ctx: &C, next: u8, start: usize) -> Result<Chain, ParseError> {
    let mut chain = Chain {
        proto: next,
        l4: start,
        headers: 0,
        hop_by_hop: false,
        fragment: Fragment::Whole,
        frag_id: 0,
        frag_proto: 0,
    };
    let mut fragment_header_seen = false;
    for i in 0..MAX_IPV6_EXTENSION_HEADERS {
        // Every walked header starts with its next header; all but the Fragment header then
        // give their length (in 8-byte units past the first 8, or for AH 4-byte units past the
        // first 8).
        let len = match chain.proto {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AH => {
                if chain.proto == IPV6_HOP_BY_HOP {
                    if i != 0 {
                        return Err(ParseError::Extensions);
                    }
                    chain.hop_by_hop = true;
                }
                let h: [u8; 2] = load(ctx, chain.l4)?;
                let len = if chain.proto == IPV6_AH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                };
                chain.proto = h[0];
                len
            }
            IPV6_FRAGMENT => {
                if fragment_header_seen {
                    return Err(ParseError::Extensions);
                }
                fragment_header_seen = true;
                let h: [u8; IPV6_FRAGMENT_HLEN] = load(ctx, chain.l4)?;
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                chain.proto = h[0];
                chain.frag_proto = h[0];
                chain.frag_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                chain.headers += 1;
                chain.l4 += IPV6_FRAGMENT_HLEN;
                if offset_flags & IPV6_FRAGMENT_OFFSET != 0 {
                    chain.fragment = Fragment::Later;
                    return Ok(chain);
                }
                if offset_flags & IPV6_FRAGMENT_MORE != 0 {
                    chain.fragment = Fragment::First;
                }
                continue;
            }
            other => {
                return if is_extension_header(other) {
                    Err(ParseError::Extensions)
                } else {
                    Ok(chain)
                };
            }
        };
        chain.headers += 1;
        chain.l4 += len;
    }
    if is_extension_header(chain.proto) {
        return Err(ParseError::Extensions);
    }
    Ok(chain)
}

/// Parses the whole packet from the Ethernet header into `key` (the packet's own tuple), which
/// must be zeroed.
#[inline(always)]
pub fn parse<C: Packet>(ctx: &C, key: &mut KeyBuf) -> Result<Parsed, ParseError> {
    parse_at(ctx, 0, key)
}

/// Parses an Ethernet frame that starts at `base` (0 for the packet itself, further in for the
/// frame a tunnel carries) into `key`, which must be zeroed.
#[inline(always)]
pub fn parse_at<C: Packet>(ctx: &C, base: usize, key: &mut KeyBuf) -> Result<Parsed, ParseError> {
    let eth_type: [u8; 2] = load_linear(ctx, base + 12)?;
    match u16::from_be_bytes(eth_type) {
        ETH_P_IP => parse_ip(ctx, base + ETH_HLEN, false, false, key),
        ETH_P_IPV6 => parse_ip(ctx, base + ETH_HLEN, true, false, key),
        _ => Ok(Parsed {
            class: Class::NotIp,
            inner_off: 0,
            v6: false,
            echo: ECHO_NONE,
            fragment: Fragment::Whole,
            frag_id: 0,
            frag_proto: 0,
            l4_off: 0,
            ttl_check: [0; 4],
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
pub fn parse_ip<C: Packet>(
    ctx: &C,
    off: usize,
    v6: bool,
    inner: bool,
    buf: &mut KeyBuf,
) -> Result<Parsed, ParseError> {
    let proto: u8;
    let l4: usize;
    let mut parsed = Parsed {
        class: Class::Normal,
        inner_off: 0,
        v6,
        echo: ECHO_NONE,
        fragment: Fragment::Whole,
        frag_id: 0,
        frag_proto: 0,
        l4_off: 0,
        ttl_check: [0; 4],
    };
    // Which ICMPv6 types may count as link-local: neighbour discovery and MLD behind no
    // extension header; behind exactly a hop-by-hop header with hop limit 1 only MLD, which
    // always carries its router alert there (RFC 2710, 3810); behind anything else, none.
    let mut link_local_types = (true, true);
    if v6 {
        // Version, traffic class, flow label, payload length, next header, hop limit.
        let fixed: [u8; 8] = load_linear(ctx, off)?;
        if fixed[0] >> 4 != 6 {
            return Err(ParseError::Malformed);
        }
        require(ctx, off, IPV6_HLEN)?;
        let nh_hl = [fixed[6], fixed[7]];
        parsed.ttl_check = [nh_hl[1], 0, 0, 0];
        load_addr(ctx, off + 8, &mut buf.key.saddr)?;
        load_addr(ctx, off + 24, &mut buf.key.daddr)?;
        let chain = walk_ipv6_extensions(ctx, nh_hl[0], off + IPV6_HLEN)?;
        proto = chain.proto;
        l4 = chain.l4;
        parsed.fragment = chain.fragment;
        parsed.frag_id = chain.frag_id;
        parsed.frag_proto = chain.frag_proto;
        if chain.headers == 1 && chain.hop_by_hop && nh_hl[1] == MLD_HOP_LIMIT {
            link_local_types = (false, true);
        } else if chain.headers != 0 {
            link_local_types = (false, false);
        }
    } else {
        let hdr: [u8; IPV4_MIN_HLEN] = load_linear(ctx, off)?;
        if hdr[0] >> 4 != 4 {
            return Err(ParseError::Malformed);
        }
        let ihl = ((hdr[0] & 0x0f) as usize) * 4;
        if ihl < IPV4_MIN_HLEN {
            return Err(ParseError::Malformed);
        }
        if ihl > IPV4_MIN_HLEN {
            require(ctx, off, ihl)?;
        }
        proto = hdr[9];
        parsed.ttl_check = [hdr[8], hdr[9], hdr[10], hdr[11]];
        let flags_offset = u16::from_be_bytes([hdr[6], hdr[7]]);
        if flags_offset & IPV4_OFFSET != 0 {
            parsed.fragment = Fragment::Later;
        } else if flags_offset & IPV4_MF != 0 {
            parsed.fragment = Fragment::First;
        }
        parsed.frag_id = u32::from_ne_bytes([hdr[4], hdr[5], 0, 0]);
        parsed.frag_proto = proto;
        buf.set_ipv4(SADDR_WORD, [hdr[12], hdr[13], hdr[14], hdr[15]]);
        buf.set_ipv4(DADDR_WORD, [hdr[16], hdr[17], hdr[18], hdr[19]]);
        l4 = off + ihl;
    }
    let key = &mut buf.key;
    key.proto = proto;
    parsed.l4_off = l4;
    if parsed.fragment == Fragment::Later {
        // No transport header in this fragment: ports 0 (the datapath takes them from the
        // first fragment).
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
        let (neighbour_discovery, mld) = link_local_types;
        let link_local = (neighbour_discovery && matches!(ty, 133..=137))
            || (mld && matches!(ty, 130..=132 | 143));
        if ty == request || ty == reply {
            // Echo id as the source port, destination port 0: request and reply share an entry.
            key.sport = u16::from_ne_bytes([h[4], h[5]]);
            parsed.echo = if ty == request {
                ECHO_REQUEST
            } else {
                ECHO_REPLY
            };
        } else if !inner && v6 && link_local {
            parsed.class = Class::LinkLocal;
        } else if !inner && error {
            parsed.class = Class::IcmpError;
            parsed.inner_off = l4 + ICMP_HLEN;
        }
        return Ok(parsed);
    }
    if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return Ok(parsed);
    }
    // The whole fixed transport header must be there. A quoted packet carries only the first 8
    // bytes of its transport header. UDP's header is read whole (one read checks it and takes the
    // ports); the longer ones are checked by their last byte, to keep the stack short.
    let first_word: [u8; 4] = match proto {
        _ if inner => load(ctx, l4)?,
        PROTO_UDP => first_four(load_linear::<[u8; 8], C>(ctx, l4)?),
        PROTO_TCP => {
            require(ctx, l4, 20)?;
            load_linear(ctx, l4)?
        }
        _ => {
            require(ctx, l4, 12)?;
            load(ctx, l4)?
        }
    };
    let (sport, dport) = ports(first_word);
    key.sport = sport;
    key.dport = dport;
    Ok(parsed)
}
