//! Conntrack keys on the stack, zeroed and filled with word stores.
//!
//! bpf-linker has LLVM expand `memcpy` inline but leaves every `memset` (zeroing a key, the
//! zero prefix of an IPv4-mapped address, padding) as a call to a byte-at-a-time loop. On the
//! per-packet path that costs hundreds of instructions, so keys live in an 8-byte aligned buffer
//! that is zeroed with volatile word stores (which LLVM does not merge back into a `memset`),
//! and fields are then written individually.

use core::{
    mem::MaybeUninit,
    ptr::{addr_of_mut, write_volatile},
};

use weir_common::{CtKey, PROTO_ICMP, PROTO_ICMPV6};

/// Words of a `CtKey` (40 bytes).
const KEY_WORDS: usize = size_of::<CtKey>() / 8;
const _: () = assert!(size_of::<CtKey>() == KEY_WORDS * 8);
/// Word offsets of `saddr` and `daddr` inside `CtKey` (`repr(C)`: 0 and 16 bytes).
pub const SADDR_WORD: usize = 0;
pub const DADDR_WORD: usize = 2;

/// A `CtKey`, 8-byte aligned.
#[repr(C, align(8))]
pub struct KeyBuf {
    pub key: CtKey,
}
const _: () = assert!(size_of::<KeyBuf>() == size_of::<CtKey>());

impl KeyBuf {
    /// Zeroes `slot` (padding included) in place and returns it as a key buffer. In place, not
    /// by value: a returned copy is one more `memset` or `memcpy`.
    #[inline(always)]
    pub fn zeroed_in(slot: &mut MaybeUninit<KeyBuf>) -> &mut KeyBuf {
        let words = slot.as_mut_ptr().cast::<u64>();
        for i in 0..KEY_WORDS {
            // SAFETY: `KeyBuf` is 8-byte aligned and KEY_WORDS * 8 bytes long.
            unsafe { write_volatile(words.add(i), 0) };
        }
        // SAFETY: every byte was written; every bit pattern is a valid `KeyBuf`.
        unsafe { slot.assume_init_mut() }
    }

    /// Writes the IPv4-mapped form of `octets` into the address at word offset `word`
    /// (`SADDR_WORD` or `DADDR_WORD`).
    #[inline(always)]
    pub fn set_ipv4(&mut self, word: usize, octets: [u8; 4]) {
        let words = addr_of_mut!(*self).cast::<u64>();
        let low =
            u64::from_ne_bytes([0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]);
        if word == SADDR_WORD || word == DADDR_WORD {
            // SAFETY: both addresses are 16 bytes at 8-byte aligned offsets inside `self`.
            unsafe {
                write_volatile(words.add(word), 0);
                write_volatile(words.add(word + 1), low);
            }
        }
    }

    /// Writes into `slot` the same connection as `k` seen from the other end. ICMP echo keeps
    /// its ports (id, 0) so request and reply share one entry.
    #[inline(always)]
    pub fn reverse_in<'a>(slot: &'a mut MaybeUninit<KeyBuf>, k: &CtKey) -> &'a mut KeyBuf {
        let buf = Self::zeroed_in(slot);
        buf.key.saddr = k.daddr;
        buf.key.daddr = k.saddr;
        if k.proto == PROTO_ICMP || k.proto == PROTO_ICMPV6 {
            buf.key.sport = k.sport;
            buf.key.dport = k.dport;
        } else {
            buf.key.sport = k.dport;
            buf.key.dport = k.sport;
        }
        buf.key.proto = k.proto;
        buf
    }
}
