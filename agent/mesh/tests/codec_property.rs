//! Property test of the packet-batch decoder: on any bytes it never panics, every record it
//! returns lies inside the batch, and whatever it does not decode it rejects with a reason.
//! Well-formed batches round-trip exactly.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use weir_mesh::codec::{
    MAX_PACKET_LEN, MIN_PACKET_LEN, RECORD_HEADER_LEN, decode_records, encode_record,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_and_are_accounted_for(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let batch = Bytes::from(data);
        let (records, err) = decode_records(&batch);
        let consumed: usize = records.iter().map(|r| RECORD_HEADER_LEN + r.packet.len()).sum();
        match err {
            None => prop_assert_eq!(consumed, batch.len()),
            Some(e) => {
                prop_assert!(consumed < batch.len(), "an error with nothing left: {e}");
                prop_assert!(!e.reason().is_empty());
            }
        }
        for r in &records {
            prop_assert!((MIN_PACKET_LEN..=MAX_PACKET_LEN).contains(&r.packet.len()));
        }
    }

    #[test]
    fn well_formed_batches_round_trip(packets in prop::collection::vec(
        (any::<u32>(), prop::collection::vec(any::<u8>(), MIN_PACKET_LEN..200)), 0..16)) {
        let mut b = BytesMut::new();
        for (id, p) in &packets {
            encode_record(&mut b, *id, p);
        }
        let batch = b.freeze();
        let (records, err) = decode_records(&batch);
        prop_assert_eq!(err, None);
        prop_assert_eq!(records.len(), packets.len());
        for (r, (id, p)) in records.iter().zip(&packets) {
            prop_assert_eq!(r.src_identity, *id);
            prop_assert_eq!(&r.packet[..], &p[..]);
        }
    }

    /// Cutting or corrupting a well-formed batch keeps the whole records before the damage.
    #[test]
    fn damage_keeps_the_records_before_it(
        packets in prop::collection::vec(prop::collection::vec(any::<u8>(), MIN_PACKET_LEN..100), 1..8),
        cut in any::<prop::sample::Index>(),
        corrupt_len in any::<u32>(),
    ) {
        let mut b = BytesMut::new();
        let mut starts = Vec::new();
        for p in &packets {
            starts.push(b.len());
            encode_record(&mut b, 300, p);
        }
        let full = b.clone().freeze();
        let at = cut.index(full.len());
        let (records, err) = decode_records(&full.slice(..at));
        let whole = starts.iter().zip(&packets).filter(|(s, p)| *s + RECORD_HEADER_LEN + p.len() <= at).count();
        prop_assert_eq!(records.len(), whole);
        prop_assert_eq!(err.is_some(), at != 0 && !starts.contains(&at) && at != full.len());

        // A corrupted length in the last record.
        let last = *starts.last().unwrap();
        b[last..last + 4].copy_from_slice(&corrupt_len.to_be_bytes());
        let (records, _) = decode_records(&b.freeze());
        prop_assert!(records.len() >= packets.len() - 1);
    }
}
