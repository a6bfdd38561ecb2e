//! Builds the kernel programs (`ebpf/programs`, crate `weir-ebpf`) with the nightly toolchain and
//! bpf-linker into OUT_DIR, where `datapath::object` embeds them.
use anyhow::{Context as _, anyhow};
use cargo_metadata::{MetadataCommand, Package};

fn main() -> anyhow::Result<()> {
    let metadata = MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata (to find the weir-ebpf package)")?;
    let ebpf: &Package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "weir-ebpf")
        .ok_or_else(|| anyhow!("weir-ebpf (ebpf/programs) is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("weir-ebpf's manifest has no parent directory"))?;
    let package = aya_build::Package {
        name: "weir-ebpf",
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the kernel programs failed; if the nightly toolchain, its rust-src or bpf-linker \
         is missing, run `cargo xtask setup`",
    )
}
