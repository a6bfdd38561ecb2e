//! The records inside a `PacketBatch`, back to back (big endian):
//!
//! ```text
//! u32 len | u32 src_identity | u8 flags | u8 gso_type | u16 hdr_len | u16 gso_size
//!         | u16 csum_start | u16 csum_offset | payload[len]
//! ```
//!
//! Each payload is one IP packet, or one TSO/USO super-packet of up to 64 KiB whose offload
//! fields (those of the kernel's `virtio_net_hdr`) travel with it, so a pod's TSO burst crosses as
//! one record and the receiving gateway hands it to its TUN as one GSO packet. Decoding slices
//! the batch's `Bytes` (no copy) and stops at the first bad record with a reason; records before
//! it are still delivered, since they were whole and are checked one by one afterwards anyway
//! ([`Offload::check`] for the offload fields, `confine::check_packet` for the addresses).

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before each record's payload.
pub const RECORD_HEADER_LEN: usize = 18;
/// Largest payload: an IPv4 or IPv6 packet without jumbogram options is at most 65,535 bytes
/// (plus the IPv6 header, which is not counted in its payload length). A TSO super-packet is
/// one such packet too.
pub const MAX_PACKET_LEN: usize = 65_535 + 40;
/// Smallest payload: an IPv4 header.
pub const MIN_PACKET_LEN: usize = 20;
/// The `virtio_net_hdr` a TUN opened with `IFF_VNET_HDR` puts before each packet.
pub const VNET_HDR_LEN: usize = 10;

/// `virtio_net_hdr.flags`: the checksum from `csum_start` is still to be computed.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the checksum was already verified.
pub const VNET_F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Where the checksum field lies in a TCP and in a UDP header.
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// The offload fields of a packet: what a TUN with `IFF_VNET_HDR` reads before it and takes
/// before a write. All zero for a plain packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a record's offload fields do not fit its packet. Such a record is refused like a
/// malformed packet: a peer must not make our kernel segment or checksum something other than
/// the packet it claims to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("unknown offload flags {0:#x}")]
    Flags(u8),
    #[error("unknown GSO type {0:#x}")]
    GsoType(u8),
    #[error("the IP header does not fit the packet or its length field")]
    IpHeader,
    #[error("GSO type {gso_type:#x} does not fit IP version {version} protocol {protocol}")]
    GsoProtocol {
        gso_type: u8,
        version: u8,
        protocol: u8,
    },
    #[error("a GSO packet must be whole (not an IP fragment) and need its checksum")]
    GsoShape,
    #[error("GSO segment size 0")]
    GsoSize,
    #[error("checksum at {csum_start}+{csum_offset} is not the packet's TCP or UDP checksum")]
    Checksum { csum_start: u16, csum_offset: u16 },
    #[error("header length {hdr_len} is beyond the packet's {len} bytes")]
    HdrLen { hdr_len: u16, len: usize },
}

impl OffloadError {
    /// A stable name for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            OffloadError::Flags(_) => "offload_flags",
            OffloadError::GsoType(_) => "gso_type",
            OffloadError::IpHeader => "ip_header",
            OffloadError::GsoProtocol { .. } => "gso_protocol",
            OffloadError::GsoShape => "gso_shape",
            OffloadError::GsoSize => "gso_size",
            OffloadError::Checksum { .. } => "checksum_offset",
            OffloadError::HdrLen { .. } => "hdr_len",
        }
    }
}

impl Offload {
    /// A plain packet: no segmentation, checksum complete.
    pub const NONE: Offload = Offload {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// From the `virtio_net_hdr` a TUN read put first (native byte order, as the kernel uses
    /// for a TUN without `TUNSETVNETLE`/`BE`).
    pub fn from_vnet(hdr: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_ne_bytes([hdr[i], hdr[i + 1]]);
        Self {
            flags: hdr[0],
            gso_type: hdr[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// The `virtio_net_hdr` to write before the packet.
    pub fn to_vnet(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }

    /// Whether the kernel is to segment the packet.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// Whether the packet's checksum is still to be computed.
    pub fn needs_csum(&self) -> bool {
        self.flags & VNET_F_NEEDS_CSUM != 0
    }

    /// Checks that these fields describe `packet` (one IP packet, whose own length fields must
    /// match): a known GSO type for the packet's protocol, segments that fit, and a checksum
    /// offset that is the TCP or UDP checksum right after the IP header. A plain packet (all
    /// zero) passes as it did before offload.
    pub fn check(&self, packet: &[u8]) -> Result<(), OffloadError> {
        if self.flags & !(VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) != 0 {
            return Err(OffloadError::Flags(self.flags));
        }
        let base = self.gso_type & !GSO_ECN;
        let ecn = self.gso_type & GSO_ECN != 0;
        if !matches!(base, GSO_NONE | GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4)
            || (ecn && !matches!(base, GSO_TCPV4 | GSO_TCPV6))
        {
            return Err(OffloadError::GsoType(self.gso_type));
        }
        if *self == Offload::NONE {
            return Ok(());
        }
        let ip = IpShape::parse(packet).ok_or(OffloadError::IpHeader)?;
        if usize::from(self.hdr_len) > packet.len() {
            return Err(OffloadError::HdrLen {
                hdr_len: self.hdr_len,
                len: packet.len(),
            });
        }
        let want_csum = match ip.protocol {
            PROTO_TCP => Some(TCP_CSUM_OFFSET),
            PROTO_UDP => Some(UDP_CSUM_OFFSET),
            _ => None,
        };
        if self.needs_csum() {
            let fits =
                usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 <= packet.len();
            if !fits
                || usize::from(self.csum_start) != ip.l4_offset
                || Some(self.csum_offset) != want_csum
            {
                return Err(OffloadError::Checksum {
                    csum_start: self.csum_start,
                    csum_offset: self.csum_offset,
                });
            }
        }
        if base == GSO_NONE {
            return Ok(());
        }
        let fits_protocol = match base {
            GSO_TCPV4 => ip.version == 4 && ip.protocol == PROTO_TCP,
            GSO_TCPV6 => ip.version == 6 && ip.protocol == PROTO_TCP,
            _ => ip.protocol == PROTO_UDP,
        };
        if !fits_protocol {
            return Err(OffloadError::GsoProtocol {
                gso_type: self.gso_type,
                version: ip.version,
                protocol: ip.protocol,
            });
        }
        if ip.fragment || !self.needs_csum() {
            return Err(OffloadError::GsoShape);
        }
        // The kernel takes a "GSO" packet no longer than one segment as a plain one.
        if self.gso_size == 0 {
            return Err(OffloadError::GsoSize);
        }
        Ok(())
    }
}

/// What the offload checks need of an IP header.
struct IpShape {
    version: u8,
    protocol: u8,
    l4_offset: usize,
    fragment: bool,
}

impl IpShape {
    /// The header of an IPv4 packet whose total length is the packet's, or of an IPv6 packet
    /// whose payload length is the rest of it (extension headers are not followed: their
    /// protocol is not TCP or UDP, so an offload of them is refused).
    fn parse(p: &[u8]) -> Option<Self> {
        match p.first()? >> 4 {
            4 => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if ihl < 20 || p.len() < ihl {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                if total != p.len() {
                    return None;
                }
                let frag = u16::from_be_bytes([p[6], p[7]]);
                Some(Self {
                    version: 4,
                    protocol: p[9],
                    l4_offset: ihl,
                    fragment: frag & 0x3fff != 0,
                })
            }
            6 => {
                if p.len() < 40 {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
                if payload + 40 != p.len() {
                    return None;
                }
                Some(Self {
                    version: 6,
                    protocol: p[6],
                    l4_offset: 40,
                    fragment: false,
                })
            }
            _ => None,
        }
    }
}

/// One packet, the identity its sender claims for it, and its offload fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub src_identity: u32,
    pub offload: Offload,
    pub packet: Bytes,
}

/// Why a batch stopped decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record at offset {offset}: {remaining} bytes left, fewer than a record header")]
    TruncatedHeader { offset: usize, remaining: usize },
    #[error("record at offset {offset}: length {len} but only {remaining} bytes follow")]
    TruncatedPayload {
        offset: usize,
        len: usize,
        remaining: usize,
    },
    #[error(
        "record at offset {offset}: length {len} is below the {MIN_PACKET_LEN} of an IP header"
    )]
    TooShort { offset: usize, len: usize },
    #[error(
        "record at offset {offset}: length {len} is above the {MAX_PACKET_LEN} of an IP packet"
    )]
    TooLong { offset: usize, len: usize },
}

impl CodecError {
    /// A stable name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::TruncatedHeader { .. } => "truncated_header",
            CodecError::TruncatedPayload { .. } => "truncated_payload",
            CodecError::TooShort { .. } => "record_too_short",
            CodecError::TooLong { .. } => "record_too_long",
        }
    }
}

/// Appends one plain record (no offload) to a batch being built.
pub fn encode_record(out: &mut BytesMut, src_identity: u32, packet: &[u8]) {
    encode_record_with(out, src_identity, &Offload::NONE, packet);
}

/// Appends one record with its offload fields to a batch being built.
pub fn encode_record_with(out: &mut BytesMut, src_identity: u32, offload: &Offload, packet: &[u8]) {
    out.reserve(RECORD_HEADER_LEN + packet.len());
    let mut header = [0u8; RECORD_HEADER_LEN];
    write_record_header(&mut header, packet.len(), src_identity, offload);
    out.put_slice(&header);
    out.put_slice(packet);
}

/// Where a TUN read with `IFF_VNET_HDR` puts its `virtio_net_hdr` in a record built in place:
/// the header's offload fields are the virtio header's fields in the same order, so reading
/// the TUN at this offset of a record leaves only their byte order to fix, and the packet lands
/// where the record's payload goes (no copy).
pub const VNET_HDR_OFFSET: usize = RECORD_HEADER_LEN - VNET_HDR_LEN;

/// Writes a record's header (the first [`RECORD_HEADER_LEN`] bytes of `header`) for a payload
/// of `len` bytes: a record is built in place by reading the packet right behind its header.
pub fn write_record_header(header: &mut [u8], len: usize, src_identity: u32, offload: &Offload) {
    let header = &mut header[..RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&(len as u32).to_be_bytes());
    header[4..8].copy_from_slice(&src_identity.to_be_bytes());
    header[8] = offload.flags;
    header[9] = offload.gso_type;
    header[10..12].copy_from_slice(&offload.hdr_len.to_be_bytes());
    header[12..14].copy_from_slice(&offload.gso_size.to_be_bytes());
    header[14..16].copy_from_slice(&offload.csum_start.to_be_bytes());
    header[16..18].copy_from_slice(&offload.csum_offset.to_be_bytes());
}

/// Decodes a batch: the whole records in order, and the error that stopped decoding, if any.
pub fn decode_records(batch: &Bytes) -> (Vec<Record>, Option<CodecError>) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < batch.len() {
        let remaining = batch.len() - offset;
        if remaining < RECORD_HEADER_LEN {
            return (
                records,
                Some(CodecError::TruncatedHeader { offset, remaining }),
            );
        }
        let header = &batch[offset..offset + RECORD_HEADER_LEN];
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let src_identity = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let u16_at = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let offload = Offload {
            flags: header[8],
            gso_type: header[9],
            hdr_len: u16_at(10),
            gso_size: u16_at(12),
            csum_start: u16_at(14),
            csum_offset: u16_at(16),
        };
        if len < MIN_PACKET_LEN {
            return (records, Some(CodecError::TooShort { offset, len }));
        }
        if len > MAX_PACKET_LEN {
            return (records, Some(CodecError::TooLong { offset, len }));
        }
        let start = offset + RECORD_HEADER_LEN;
        let remaining = batch.len() - start;
        if len > remaining {
            return (
                records,
                Some(CodecError::TruncatedPayload {
                    offset,
                    len,
                    remaining,
                }),
            );
        }
        records.push(Record {
            src_identity,
            offload,
            packet: batch.slice(start..start + len),
        });
        offset = start + len;
    }
    (records, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_each_rejection() {
        let mut b = BytesMut::new();
        encode_record(&mut b, 300, &[0x45; 20]);
        encode_record(&mut b, 301, &[0x60; 60]);
        let batch = b.freeze();
        let (r, e) = decode_records(&batch);
        assert_eq!(e, None);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].src_identity, r[0].packet.len()), (300, 20));
        assert_eq!((r[1].src_identity, r[1].packet.len()), (301, 60));

        let cut = batch.slice(..batch.len() - 1);
        let (r, e) = decode_records(&cut);
        assert_eq!(r.len(), 1);
        assert_eq!(e.map(|e| e.reason()), Some("truncated_payload"));

        let (_, e) = decode_records(&Bytes::from_static(&[0, 0, 0]));
        assert_eq!(e.map(|e| e.reason()), Some("truncated_header"));
        let header = |len: u32| {
            let mut h = BytesMut::new();
            h.put_u32(len);
            h.put_u32(300);
            h.put_slice(&[0; RECORD_HEADER_LEN - 8]);
            h.freeze()
        };
        let (_, e) = decode_records(&header(19));
        assert_eq!(e.map(|e| e.reason()), Some("record_too_short"));
        let (_, e) = decode_records(&header(u32::MAX));
        assert_eq!(e.map(|e| e.reason()), Some("record_too_long"));
    }

    /// An IPv4 TCP packet of `len` bytes (20-byte IP and TCP headers).
    fn tcp4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[9] = PROTO_TCP;
        p
    }

    fn tcp6(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p
    }

    const TSO4: Offload = Offload {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 52,
        gso_size: 1448,
        csum_start: 20,
        csum_offset: 16,
    };

    #[test]
    fn super_packets_round_trip_with_their_offload_fields() {
        let packet = tcp4(65_000);
        let mut b = BytesMut::new();
        encode_record_with(&mut b, 7, &TSO4, &packet);
        encode_record(&mut b, 8, &tcp4(60));
        let (r, e) = decode_records(&b.freeze());
        assert_eq!(e, None);
        assert_eq!(
            (r[0].src_identity, r[0].offload, r[0].packet.len()),
            (7, TSO4, 65_000)
        );
        assert_eq!(r[1].offload, Offload::NONE);
        assert_eq!(Offload::from_vnet(&TSO4.to_vnet()), TSO4);
        assert_eq!(TSO4.check(&r[0].packet), Ok(()));
        assert_eq!(Offload::NONE.check(&r[1].packet), Ok(()));
    }

    #[test]
    fn a_record_built_in_place_behind_a_virtio_header_decodes_like_an_encoded_one() {
        let packet = tcp4(9_000);
        let mut encoded = BytesMut::new();
        encode_record_with(&mut encoded, 7, &TSO4, &packet);
        // What a TUN read at VNET_HDR_OFFSET leaves: the virtio header, then the packet.
        let mut in_place = vec![0u8; VNET_HDR_OFFSET];
        in_place.extend_from_slice(&TSO4.to_vnet());
        in_place.extend_from_slice(&packet);
        let vnet: [u8; VNET_HDR_LEN] = in_place[VNET_HDR_OFFSET..RECORD_HEADER_LEN]
            .try_into()
            .unwrap();
        let offload = Offload::from_vnet(&vnet);
        write_record_header(&mut in_place, packet.len(), 7, &offload);
        assert_eq!(in_place, &encoded[..]);
    }

    #[test]
    fn offload_fields_must_fit_the_packet() {
        let p = tcp4(30_000);
        let reason = |o: Offload, p: &[u8]| o.check(p).err().map(|e| e.reason());
        let tso6 = Offload {
            gso_type: GSO_TCPV6,
            csum_start: 40,
            ..TSO4
        };
        assert_eq!(tso6.check(&tcp6(30_000)), Ok(()));
        assert_eq!(
            reason(
                Offload {
                    gso_type: GSO_TCPV4 | GSO_ECN,
                    ..TSO4
                },
                &p
            ),
            None
        );
        // TSO of IPv4 on an IPv6 packet, and of TCP on UDP.
        assert_eq!(
            reason(
                Offload {
                    csum_start: 40,
                    ..TSO4
                },
                &tcp6(30_000)
            ),
            Some("gso_protocol")
        );
        assert_eq!(reason(tso6, &p), Some("checksum_offset"));
        let mut udp = tcp4(30_000);
        udp[9] = PROTO_UDP;
        assert_eq!(reason(TSO4, &udp), Some("checksum_offset"));
        let uso_on_tcp = Offload {
            gso_type: GSO_UDP_L4,
            csum_offset: 6,
            ..TSO4
        };
        assert_eq!(reason(uso_on_tcp, &p), Some("checksum_offset"));
        let uso = Offload {
            gso_type: GSO_UDP_L4,
            csum_offset: 6,
            ..TSO4
        };
        assert_eq!(reason(uso, &udp), None);
        // Unknown flags and types, UFO, ECN on UDP.
        assert_eq!(
            reason(Offload { flags: 4, ..TSO4 }, &p),
            Some("offload_flags")
        );
        assert_eq!(
            reason(
                Offload {
                    gso_type: 3,
                    ..TSO4
                },
                &p
            ),
            Some("gso_type")
        );
        assert_eq!(
            reason(
                Offload {
                    gso_type: GSO_UDP_L4 | GSO_ECN,
                    ..uso
                },
                &udp
            ),
            Some("gso_type")
        );
        // The IP length fields must be the record's.
        assert_eq!(reason(TSO4, &p[..29_000]), Some("ip_header"));
        // A fragment, a GSO packet without NEEDS_CSUM, a zero segment size.
        let mut frag = p.clone();
        frag[6] = 0x20;
        assert_eq!(reason(TSO4, &frag), Some("gso_shape"));
        assert_eq!(reason(Offload { flags: 0, ..TSO4 }, &p), Some("gso_shape"));
        assert_eq!(
            reason(
                Offload {
                    gso_size: 0,
                    ..TSO4
                },
                &p
            ),
            Some("gso_size")
        );
        // A checksum outside the packet or elsewhere than the L4 checksum.
        assert_eq!(
            reason(
                Offload {
                    csum_start: 60_000,
                    ..TSO4
                },
                &p
            ),
            Some("checksum_offset")
        );
        assert_eq!(
            reason(
                Offload {
                    csum_offset: 10,
                    ..TSO4
                },
                &p
            ),
            Some("checksum_offset")
        );
        assert_eq!(
            reason(
                Offload {
                    hdr_len: 40_000,
                    ..TSO4
                },
                &p
            ),
            Some("hdr_len")
        );
        // Checksum offload without GSO is checked the same way.
        let csum_only = Offload {
            gso_type: GSO_NONE,
            gso_size: 0,
            ..TSO4
        };
        assert_eq!(reason(csum_only, &tcp4(1500)), None);
        assert_eq!(
            reason(
                Offload {
                    csum_start: 0,
                    ..csum_only
                },
                &tcp4(1500)
            ),
            Some("checksum_offset")
        );
    }
}
