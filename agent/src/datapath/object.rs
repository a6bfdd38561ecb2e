//! The kernel programs, built by `build.rs` from `ebpf/programs` and embedded in the binary.

/// The compiled `weir-ebpf` ELF object.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));
