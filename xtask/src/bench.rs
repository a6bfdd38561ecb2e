//! `cargo xtask bench [datapath|propagation|cni|traffic|idle|xdp|mesh|mesh-sync|all]`: builds the benchmark binary in release
//! and runs it. Each benchmark measures its own baseline in the same run and prints ratios.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Which benchmark: datapath (per-packet cost via BPF_PROG_TEST_RUN), propagation (policy
    /// change to maps), cni (ADD/DEL latency against the real agent), traffic (pod-to-pod latency and throughput vs iptables),
    /// idle (agent CPU and memory with 1,000 pods and 10,000 policies while nothing changes), xdp (drop rate of a flood of denied packets: XDP vs tc vs an iptables raw rule), mesh-sync (a label change in one cluster until enforced in another, and the first sync of 10,000 endpoints, through the real agents of a two-cluster mesh lab; not in all), or all.
    /// Or mesh (the mesh link against boringtun and a plain routed path; not part of all).
    #[arg(default_value = "all")]
    pub which: String,
    /// Rounds over the cases (mesh; each round takes about 2 minutes).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !setup::is_complete() {
        setup::run()?;
    }
    if matches!(options.which.as_str(), "traffic" | "xdp" | "all") {
        setup::ensure_iptables()?;
    }
    let mut env = vec![("WEIR_BIN_DIR".to_owned(), "target/release".to_owned())];
    if options.which == "mesh" {
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
        .arg(&options.which)
        .envs(env)
        .status()
        .context("running target/release/weir-bench")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}
