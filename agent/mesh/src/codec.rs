//! The records inside a `PacketBatch`: back-to-back `u32 len | u32 src_identity | payload[len]`
//! (big endian), each payload one IP packet. Decoding slices the batch's `Bytes` (no copy) and
//! stops at the first bad record with a reason; records before it are still delivered, since
//! they were whole and are checked one by one afterwards anyway.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before each record's payload.
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest payload: an IPv4 or IPv6 packet without jumbogram options is at most 65,535 bytes
/// (plus the IPv6 header, which is not counted in its payload length).
pub const MAX_PACKET_LEN: usize = 65_535 + 40;
/// Smallest payload: an IPv4 header.
pub const MIN_PACKET_LEN: usize = 20;

/// One packet and the identity its sender claims for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub src_identity: u32,
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

/// Appends one record to a batch being built.
pub fn encode_record(out: &mut BytesMut, src_identity: u32, packet: &[u8]) {
    out.reserve(RECORD_HEADER_LEN + packet.len());
    out.put_u32(packet.len() as u32);
    out.put_u32(src_identity);
    out.put_slice(packet);
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
        let (_, e) = decode_records(&Bytes::from_static(&[0, 0, 0, 0, 0, 0, 1, 44]));
        assert_eq!(e.map(|e| e.reason()), Some("record_too_short"));
        let (_, e) = decode_records(&Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0, 0, 1, 44]));
        assert_eq!(e.map(|e| e.reason()), Some("record_too_long"));
    }
}
