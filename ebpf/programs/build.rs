//! Rebuild the kernel programs when bpf-linker changes (it is a linker, invisible to cargo).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup`, which installs bpf-linker 0.13.0 built against LLVM 22",
    );
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().unwrap_or_default()
    );
}
