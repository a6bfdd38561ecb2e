//! Reading packet bytes the same way from both program types, so one parser serves the tc
//! classifiers and the XDP program.
//!
//! The headers every packet has (Ethernet, the fixed IP header, the ports) are read with
//! `load_linear`: a direct packet access (a copy from `data + off`, after a bounds check against
//! `data_end` the verifier follows) when the bytes are in the packet's linear part, as the headers
//! of pod traffic nearly always are; otherwise, like every other read (`load`), through the helper
//! (`bpf_skb_load_bytes` at tc, `bpf_xdp_load_bytes` at XDP), which also reads paged data and the
//! fragments of a multi-buffer XDP frame. Both fail when the packet is shorter than the read, so a
//! read gives the same bytes or the same failure either way; the direct one saves a helper call
//! (and its `memcpy`). The rarer reads (extension headers, ICMP, quoted packets) stay with the
//! helper alone: each direct read is a branch the verifier walks both ways, and on every path.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// The furthest offset read directly: a bound the verifier needs on a variable offset into the
/// packet. Headers further in (a long IPv6 extension chain) are read through the helper.
const MAX_DIRECT_OFFSET: usize = 512;

/// A packet the parser can read bytes from.
pub trait Packet {
    /// The linear part of the packet: `data` and `data_end`.
    fn linear(&self) -> (usize, usize);

    /// Copies `len` bytes at `off` into `dst` through the helper; false when the packet is too
    /// short.
    fn load_bytes_helper(&self, off: usize, dst: *mut u8, len: usize) -> bool;

    /// Copies `len` bytes at `off` into `dst`, directly if they are in the linear part; false
    /// when the packet is too short.
    #[inline(always)]
    fn load_bytes_linear(&self, off: usize, dst: *mut u8, len: usize) -> bool {
        let (data, data_end) = self.linear();
        if off <= MAX_DIRECT_OFFSET && data + off + len <= data_end {
            // SAFETY: `len` bytes from `data + off` are inside the linear part (checked just
            // above, and by the verifier); `dst` is `len` writable bytes that do not overlap the
            // packet.
            unsafe { core::ptr::copy_nonoverlapping((data + off) as *const u8, dst, len) };
            return true;
        }
        self.load_bytes_helper(off, dst, len)
    }

    /// Reads a `T` at `off` through the helper.
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        if self.load_bytes_helper(off, out.as_mut_ptr().cast(), size_of::<T>()) {
            // SAFETY: every byte was written; `T` is a plain integer array.
            Some(unsafe { out.assume_init() })
        } else {
            None
        }
    }

    /// Reads a `T` at `off`, directly if it is in the linear part. `T` is 2 bytes or more: for a
    /// one-byte read LLVM turns the bounds check `data + off + 1 <= data_end` into
    /// `data + off < data_end`, from which the verifier derives no readable range.
    #[inline(always)]
    fn load_linear<T>(&self, off: usize) -> Option<T> {
        const { assert!(size_of::<T>() >= 2) };
        let mut out = MaybeUninit::<T>::uninit();
        if self.load_bytes_linear(off, out.as_mut_ptr().cast(), size_of::<T>()) {
            // SAFETY: every byte was written; `T` is a plain integer array.
            Some(unsafe { out.assume_init() })
        } else {
            None
        }
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn load_bytes_helper(&self, off: usize, dst: *mut u8, len: usize) -> bool {
        // SAFETY: `dst` is `len` writable bytes; the helper checks the packet bounds.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), off as u32, dst.cast(), len as u32) == 0 }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn load_bytes_helper(&self, off: usize, dst: *mut u8, len: usize) -> bool {
        // SAFETY: as above.
        unsafe { bpf_xdp_load_bytes(self.ctx.cast(), off as u32, dst.cast(), len as u32) == 0 }
    }
}
