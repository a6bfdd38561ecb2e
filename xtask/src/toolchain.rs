//! The pinned toolchain triple for the kernel programs (see ../shared/TOOLCHAIN.md): the nightly
//! that builds them, bpf-linker, and the LLVM bpf-linker is built against (the nightly's LLVM).

/// The nightly toolchain aya-build runs (`rustup run nightly`).
pub const NIGHTLY: &str = "nightly";
/// bpf-linker, built against `LLVM_MAJOR`.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major of the nightly; bpf-linker must link the same one.
pub const LLVM_MAJOR: u32 = 22;
/// Debian packages bpf-linker's build needs.
pub const LLVM_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Where Debian puts LLVM 22.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
