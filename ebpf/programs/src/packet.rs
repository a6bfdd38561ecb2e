//! Reading packet bytes the same way from both program types, so one parser serves the tc
//! classifiers (`bpf_skb_load_bytes`) and the XDP program (`bpf_xdp_load_bytes`). Both helpers
//! fail when the packet is shorter than the read.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// A packet the parser can read bytes from.
pub trait Packet {
    /// Copies `len` bytes at `off` into `dst`; false when the packet is too short.
    fn load_bytes(&self, off: usize, dst: *mut u8, len: usize) -> bool;

    /// Reads a `T` at `off`.
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        if self.load_bytes(off, out.as_mut_ptr().cast(), size_of::<T>()) {
            // SAFETY: every byte was written by the helper; `T` is a plain integer array.
            Some(unsafe { out.assume_init() })
        } else {
            None
        }
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn load_bytes(&self, off: usize, dst: *mut u8, len: usize) -> bool {
        // SAFETY: `dst` is `len` writable bytes; the helper checks the packet bounds.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), off as u32, dst.cast(), len as u32) == 0 }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn load_bytes(&self, off: usize, dst: *mut u8, len: usize) -> bool {
        // SAFETY: as above.
        unsafe { bpf_xdp_load_bytes(self.ctx.cast(), off as u32, dst.cast(), len as u32) == 0 }
    }
}
