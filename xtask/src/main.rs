//! `cargo xtask <command>`: everything beyond a plain `cargo build`.

mod bench;
mod build;
mod demo;
mod demo_mesh;
mod kind;
mod lab;
mod setup;
mod test;
mod test_binaries;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Weir's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, and install where missing, what building the kernel programs needs.
    Setup,
    /// The shipped binaries: weir-agent, and weir-cni as a static executable (target/<profile>).
    Build(build::Options),
    /// The whole test suite: formatting, clippy, unit tests, and the root-only kernel tests.
    Test(test::Options),
    /// A lab of nodes and pods in network namespaces, on the real agent and CNI plugin.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The Brown Bear demo: a two-node lab, its reachability before and after policies; `demo
    /// mesh`: the same across two clusters joined by the mesh link.
    Demo(demo::Options),
    /// Benchmarks: per-packet cost, propagation, pod-to-pod traffic against iptables.
    Bench(bench::Options),
    /// Weir on a kind cluster with the Brown Bear probes (needs Docker, kind and kubectl; never
    /// run on the development machines, which have no Docker engine).
    Kind(kind::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build(options) => build::run(&options),
        Command::Test(options) => test::run(&options),
        Command::Lab(command) => lab::run(command),
        Command::Demo(options) => demo::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Kind(options) => kind::run(&options),
    }
}
