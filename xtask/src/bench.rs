//! `cargo xtask bench [datapath|propagation|cni|traffic|idle|xdp|mesh|mesh-sync|all]`: builds the benchmark binary in release
//! and runs it. Each benchmark measures its own baseline in the same run and prints ratios.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Which benchmark.
    #[arg(value_enum, default_value_t = Benchmark::All)]
    pub which: Benchmark,
    /// Rounds over the cases (mesh; each round takes about 2 minutes).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Benchmark {
    /// Per-packet cost via BPF_PROG_TEST_RUN.
    Datapath,
    /// Policy change to maps.
    Propagation,
    /// ADD/DEL latency against the real agent.
    Cni,
    /// Pod-to-pod latency and throughput vs iptables.
    Traffic,
    /// Agent CPU and memory with 1,000 pods and 10,000 policies while nothing changes.
    Idle,
    /// One node with 1,000 local pods in a cluster of 10,000 pods and 10,000 policies: policy
    /// and remote pod changes until the maps are written, RSS and idle CPU (not in `all`).
    Scale,
    /// Only the scale bench's in-process cases (the compile path per event, no agent; not in
    /// `all`).
    ScaleInProcess,
    /// Only the scale bench's heap attribution: the bytes each of the agent's structures holds
    /// at rest, built in the bench process (not in `all`).
    ScaleHeap,
    /// Drop rate of a flood of denied packets: XDP vs tc vs an iptables raw rule.
    Xdp,
    /// A label change in one cluster until enforced in another, and the first sync of 10,000
    /// endpoints, through the real agents of a two-cluster mesh lab (not in `all`).
    MeshSync,
    /// The mesh link against boringtun and a plain routed path (not in `all`).
    Mesh,
    All,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !setup::is_complete() {
        setup::run()?;
    }
    if matches!(
        options.which,
        Benchmark::Traffic | Benchmark::Xdp | Benchmark::All
    ) {
        setup::ensure_iptables()?;
    }
    let mut env = vec![("WEIR_BIN_DIR".to_owned(), "target/release".to_owned())];
    if options.which == Benchmark::Mesh {
        setup::ensure_mesh_bench_packages()?;
        let boringtun = setup::ensure_boringtun()?;
        env.push(("WEIR_BORINGTUN".into(), boringtun.display().to_string()));
        env.push(("WEIR_BENCH_ROUNDS".into(), options.rounds.to_string()));
    }
    build::cargo(
        &[
            "build",
            "--release",
            "--package",
            "weir-tests",
            "--bin",
            "weir-bench",
        ],
        &[],
        "building the benchmarks",
    )?;
    build::binaries(true)?;
    // The CNI and idle benchmarks drive the release weir-agent and (static) weir-cni. The idle
    // benchmark also runs WEIR_BENCH_BASELINE_AGENT (another weir-agent build) when it is set.
    let status = Command::new("target/release/weir-bench")
        .arg(
            clap::ValueEnum::to_possible_value(&options.which)
                .expect("every benchmark has a name")
                .get_name(),
        )
        .envs(env)
        .status()
        .context("running target/release/weir-bench")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}
