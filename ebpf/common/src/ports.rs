//! Port ranges as LPM prefixes: `[start, end]` split into the fewest aligned power-of-two blocks,
//! each one `(first port, prefix bits)` for the port field of a `PolicyKey`.

/// At most 30 blocks cover any range of 16-bit ports (2 per bit level, minus the ends).
pub const MAX_PORT_BLOCKS: usize = 32;

/// Splits `[start, end]` (inclusive) into aligned blocks. Returns the blocks in ascending order
/// and how many there are. An empty range (`start > end`) gives none.
pub fn port_range_blocks(start: u16, end: u16) -> ([(u16, u8); MAX_PORT_BLOCKS], usize) {
    let mut out = [(0u16, 0u8); MAX_PORT_BLOCKS];
    let mut n = 0;
    let mut lo = start as u32;
    let hi = end as u32;
    while lo <= hi && n < MAX_PORT_BLOCKS {
        // The largest block that starts at `lo` (aligned) and stays within `hi`.
        let mut size: u32 = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros() as u8;
        out[n] = (lo as u16, bits);
        n += 1;
        lo += size;
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(start: u16, end: u16) {
        let (blocks, n) = port_range_blocks(start, end);
        let mut covered = 0u32;
        for &(first, bits) in &blocks[..n] {
            let size = 1u32 << (16 - bits as u32);
            assert_eq!(
                first as u32 % size,
                0,
                "block {first}/{bits} is not aligned"
            );
            covered += size;
            assert!(first as u32 >= start as u32 && first as u32 + size - 1 <= end as u32);
        }
        assert_eq!(covered, end as u32 - start as u32 + 1);
    }

    #[test]
    fn ranges_are_covered_exactly() {
        for (s, e) in [
            (0, 65535),
            (80, 80),
            (1, 65535),
            (32000, 32768),
            (1024, 2047),
            (7, 9),
        ] {
            covers(s, e);
        }
        assert_eq!(port_range_blocks(80, 80).1, 1);
        assert_eq!(
            port_range_blocks(0, 65535),
            (
                {
                    let mut a = [(0, 0); MAX_PORT_BLOCKS];
                    a[0] = (0, 0);
                    a
                },
                1
            )
        );
    }
}
