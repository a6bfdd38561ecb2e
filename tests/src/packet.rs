//! Packet builders for datapath tests: Ethernet frames carrying IPv4 or IPv6 with TCP, UDP,
//! ICMP or ICMPv6, built byte by byte. Checksums are left zero: tc programs run through
//! `BPF_PROG_TEST_RUN` never see them verified.
//!
//! Frames start at the Ethernet header, as a tc classifier sees them.

use std::net::IpAddr;

use weir_common::{Addr, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_HLEN: usize = 14;

/// Host-side veth MAC and pod MAC used in every frame (the programs do not look at them).
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// ICMP (v4) types.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv6 types.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;

/// The 16-byte form the maps use (IPv4 mapped into `::ffff:0:0/96`).
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header (no options) followed by `payload`. `frag_offset` is in 8-byte units.
pub fn ipv4_with_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag_offset: u16,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_fragment(src, dst, proto, 0x1234, frag_offset, false, payload)
}

/// An IPv4 header (no options) with identification `id`, fragment offset `frag_offset` (8-byte
/// units) and the more-fragments flag `more`, followed by `payload`.
pub fn ipv4_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    frag_offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = Vec::with_capacity(total as usize);
    p.push(0x45); // version 4, IHL 5
    p.push(0); // DSCP/ECN
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    let more_fragments = if more { 0x2000 } else { 0 };
    p.extend_from_slice(&((frag_offset & 0x1fff) | more_fragments).to_be_bytes());
    p.push(64); // TTL
    p.push(proto);
    p.extend_from_slice(&[0, 0]); // checksum
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 header followed by `payload`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class, flow label
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next_header);
    p.push(64); // hop limit
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 extension header, for `ipv6_chain`.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options: 8 bytes of padding (PadN).
    HopByHop,
    /// A segment routing header (type 4) with one segment and none left: 24 bytes.
    Routing,
    /// Destination options: 16 bytes of padding (PadN), so its length field is not 0.
    DestOpts,
    /// A Fragment header: offset in 8-byte units, more-fragments flag, identification.
    Fragment { offset: u16, more: bool, id: u32 },
    /// An authentication header with a 12-byte ICV: 24 bytes, length in 4-byte units.
    Ah,
    /// Any other next header value, with 8 bytes of content (mobility 135, HIP 139, ...).
    Other(u8),
}

impl Ext {
    /// Its next header value.
    pub fn next_header(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::Ah => 51,
            Ext::DestOpts => 60,
            Ext::Other(n) => n,
        }
    }

    /// The header's bytes, announcing `next` as the header after it.
    pub fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop => vec![next, 0, 1, 4, 0, 0, 0, 0],
            Ext::DestOpts => {
                let mut h = vec![next, 1, 1, 12];
                h.extend_from_slice(&[0; 12]);
                h
            }
            Ext::Routing => {
                let mut h = vec![next, 2, 4, 0, 0, 0, 0, 0];
                h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                h
            }
            Ext::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
            Ext::Ah => {
                let mut h = vec![next, 4, 0, 0];
                h.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
                h.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                h.extend_from_slice(&[0; 12]); // ICV
                h
            }
            Ext::Other(_) => vec![next, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

/// An IPv6 packet with the extension headers `exts` (in order) in front of `payload` of protocol
/// `proto` (for a later fragment: whatever the Fragment header says comes next).
pub fn ipv6_chain(
    src: [u8; 16],
    dst: [u8; 16],
    exts: &[Ext],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.next_header());
        body.extend_from_slice(&ext.bytes(next));
    }
    body.extend_from_slice(payload);
    let first = exts.first().map_or(proto, |e| e.next_header());
    ipv6(src, dst, first, &body)
}

/// One datagram to be sent in fragments.
#[derive(Clone, Copy, Debug)]
pub struct Fragmented<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// IPv4: the header's identification (low 16 bits); IPv6: the Fragment header's.
    pub id: u32,
    /// IPv6: extension headers in front of the Fragment header (in every fragment).
    pub unfragmentable: &'a [Ext],
    /// IPv6: extension headers behind it (part of the datagram: in the first fragment only).
    pub fragmentable: &'a [Ext],
}

impl<'a> Fragmented<'a> {
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, id: u32) -> Self {
        Self {
            src,
            dst,
            proto,
            id,
            unfragmentable: &[],
            fragmentable: &[],
        }
    }

    /// The fragments, in Ethernet frames, in order: the datagram (fragmentable extension
    /// headers, then `transport`: the transport header and its payload) cut into pieces of
    /// `piece` bytes (a multiple of 8).
    pub fn frames(&self, transport: &[u8], piece: usize) -> Vec<Vec<u8>> {
        assert!(
            piece.is_multiple_of(8),
            "fragments are cut at multiples of 8 bytes"
        );
        let mut whole = Vec::new();
        for (i, ext) in self.fragmentable.iter().enumerate() {
            let next = self
                .fragmentable
                .get(i + 1)
                .map_or(self.proto, |e| e.next_header());
            whole.extend_from_slice(&ext.bytes(next));
        }
        whole.extend_from_slice(transport);
        // What the Fragment header (IPv6) announces: the first header of the datagram.
        let after_fragment = self
            .fragmentable
            .first()
            .map_or(self.proto, |e| e.next_header());
        whole
            .chunks(piece)
            .enumerate()
            .map(|(n, chunk)| {
                let offset = (n * piece / 8) as u16;
                let more = (n + 1) * piece < whole.len();
                match (self.src, self.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(
                        ETH_P_IP,
                        &ipv4_fragment(
                            s.octets(),
                            d.octets(),
                            self.proto,
                            self.id as u16,
                            offset,
                            more,
                            chunk,
                        ),
                    ),
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        let mut exts = self.unfragmentable.to_vec();
                        exts.push(Ext::Fragment {
                            offset,
                            more,
                            id: self.id,
                        });
                        ethernet(
                            ETH_P_IPV6,
                            &ipv6_chain(s.octets(), d.octets(), &exts, after_fragment, chunk),
                        )
                    }
                    (s, d) => panic!("mixed address families: {s} -> {d}"),
                }
            })
            .collect()
    }
}

/// An MLDv2 listener report as the kernel sends it: hop limit 1, a hop-by-hop header carrying
/// the router alert option, then ICMPv6 type 143, in an Ethernet frame.
pub fn mld_report(src: [u8; 16]) -> Vec<u8> {
    let dst: [u8; 16] = "ff02::16".parse::<std::net::Ipv6Addr>().unwrap().octets();
    // Next header ICMPv6, length 0 (8 bytes): router alert (type 5, 2 bytes, MLD), PadN of 2.
    let mut payload = vec![PROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0];
    payload.extend_from_slice(&icmp_message(143, 0, &[0; 4]));
    let mut packet = ipv6(src, dst, 0, &payload);
    packet[7] = 1; // hop limit
    ethernet(ETH_P_IPV6, &packet)
}

/// An IP packet (no Ethernet header) of either family; `src` and `dst` must be of one family.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ipv4_with_fragment(s.octets(), d.octets(), proto, 0, payload)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s.octets(), d.octets(), proto, payload),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// An Ethernet frame carrying an IP packet.
pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let ethertype = if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    ethernet(ethertype, &ip(src, dst, proto, payload))
}

/// A 20-byte TCP header.
pub fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // sequence
    h.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
    h.push(5 << 4); // data offset
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h
}

/// An 8-byte UDP header followed by `payload`.
pub fn udp_datagram(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An ICMP or ICMPv6 message: type, code, zero checksum, then `rest` (the 4-byte word and body).
pub fn icmp_message(ty: u8, code: u8, rest: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(rest);
    m
}

/// An echo request or reply body: id, sequence, a little payload.
fn echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = Vec::with_capacity(12);
    rest.extend_from_slice(&id.to_be_bytes());
    rest.extend_from_slice(&seq.to_be_bytes());
    rest.extend_from_slice(b"weir");
    icmp_message(ty, 0, &rest)
}

fn icmp_proto(v4: bool) -> u8 {
    if v4 { PROTO_ICMP } else { PROTO_ICMPV6 }
}

/// A TCP segment in an Ethernet frame.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    frame(src, dst, PROTO_TCP, &tcp_header(sport, dport, flags))
}

/// A UDP datagram in an Ethernet frame.
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    frame(src, dst, PROTO_UDP, &udp_datagram(sport, dport, b"weir"))
}

/// An echo request (ICMP or ICMPv6 by address family) in an Ethernet frame.
pub fn ping(src: IpAddr, dst: IpAddr, id: u16) -> Vec<u8> {
    let ty = if src.is_ipv4() {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    frame(src, dst, icmp_proto(src.is_ipv4()), &echo(ty, id, 1))
}

/// An echo reply (ICMP or ICMPv6 by address family) in an Ethernet frame.
pub fn pong(src: IpAddr, dst: IpAddr, id: u16) -> Vec<u8> {
    let ty = if src.is_ipv4() {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    frame(src, dst, icmp_proto(src.is_ipv4()), &echo(ty, id, 1))
}

/// An ICMP or ICMPv6 error from `src` to `dst` quoting `quoted` (an IP packet, usually the
/// start of one the error is about: its IP header and at least 8 bytes more).
pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut rest = vec![0, 0, 0, 0]; // unused (or next-hop MTU)
    rest.extend_from_slice(quoted);
    frame(
        src,
        dst,
        icmp_proto(src.is_ipv4()),
        &icmp_message(ty, code, &rest),
    )
}

/// An ICMPv6 neighbour solicitation for `target`, from a link-local address.
pub fn neighbour_solicitation(src: IpAddr, target: [u8; 16]) -> Vec<u8> {
    let mut rest = vec![0, 0, 0, 0]; // reserved
    rest.extend_from_slice(&target);
    let mut dst = [0u8; 16];
    dst[..13].copy_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]);
    dst[13..].copy_from_slice(&target[13..]);
    frame(
        src,
        IpAddr::from(dst),
        PROTO_ICMPV6,
        &icmp_message(ICMPV6_NEIGHBOR_SOLICIT, 0, &rest),
    )
}

/// An ARP request (who-has `target` tell `sender`).
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&1u16.to_be_bytes()); // request
    a.extend_from_slice(&SRC_MAC);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    ethernet(ETH_P_ARP, &a)
}

/// Whether the IPv4 header `header` carries a right checksum.
pub fn ipv4_checksum_ok(header: &[u8]) -> bool {
    crate::ping::internet_checksum(header) == 0
}

/// `frame` (Ethernet + IPv4) with its IPv4 header checksum filled in (the builders leave it 0).
pub fn with_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ip = &mut frame[14..34];
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = crate::ping::internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_frame_layout() {
        let f = tcp(
            "10.0.0.1".parse().unwrap(),
            1234,
            "10.0.0.2".parse().unwrap(),
            80,
            TCP_SYN,
        );
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(f[14 + 9], PROTO_TCP);
        assert_eq!(&f[14 + 12..14 + 16], &[10, 0, 0, 1]);
        assert_eq!(&f[34..36], &1234u16.to_be_bytes());
        assert_eq!(&f[36..38], &80u16.to_be_bytes());
    }

    #[test]
    fn ipv6_frame_layout() {
        let f = udp(
            "fd00::1".parse().unwrap(),
            53,
            "fd00::2".parse().unwrap(),
            5353,
        );
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(f[14 + 6], PROTO_UDP);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 12);
        assert_eq!(f.len(), 14 + 40 + 12);
    }
}
