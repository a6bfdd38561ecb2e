//! Generates the gRPC code from `weir/*.proto` with a vendored protoc, so no system protoc is needed.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("locating the vendored protoc")?;
    // SAFETY: build scripts are single-threaded; set before tonic-prost-build reads it.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(
            &["weir/agent/v1/agent.proto", "weir/agent/v1/inspect.proto"],
            &["."],
        )
        .context("compiling proto/weir/agent/v1/*.proto")?;
    tonic_prost_build::configure()
        .bytes(".weir.mesh.v1.PacketBatch.records")
        .compile_protos(&["weir/mesh/v1/mesh.proto"], &["."])
        .context("compiling proto/weir/mesh/v1/mesh.proto")?;
    Ok(())
}
