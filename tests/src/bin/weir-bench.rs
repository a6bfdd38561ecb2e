//! `weir-bench <datapath|propagation|cni|traffic|idle|xdp|scale|scale-in-process|scale-heap|mesh|mesh-sync|all>`: Weir's benchmarks (see `cargo xtask bench`).

use weir_tests::bench;

/// Counts live bytes for the heap attribution of `scale` (an atomic add per allocation).
#[global_allocator]
static ALLOCATOR: bench::heap::CountingAllocator<std::alloc::System> =
    bench::heap::CountingAllocator(std::alloc::System);

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_owned());
    let all = which == "all";
    // Latency percentiles would otherwise depend on whether a vCPU happened to be halted.
    let mut idle_states = bench::cpu_wakeup::IdleStates::hold_polling_from_now();
    let mut ran = false;
    if all || which == "datapath" {
        bench::datapath::run(1_000_000)?;
        ran = true;
    }
    if which == "datapath-redirect" {
        // Also part of "datapath": only the redirect path's per-packet cost.
        bench::datapath_redirect::run()?;
        ran = true;
    }
    if which == "datapath-xdp" {
        // Also part of "datapath": only weir_xdp's per-packet cost.
        bench::datapath_xdp::run(1_000_000)?;
        ran = true;
    }
    if all || which == "propagation" {
        bench::propagation::run(200)?;
        ran = true;
    }
    if all || which == "cni" {
        bench::cni::run(8)?;
        ran = true;
    }
    if all || which == "traffic" {
        // Releases the hold for its TCP runs and takes it again.
        bench::traffic::run(20_000, bench::traffic::tcp_secs(), &mut idle_states)?;
        ran = true;
    }
    if which == "scale" {
        // Not in "all": it wires 1,000 pods and runs for several minutes.
        bench::scale::run(scale_rounds())?;
        ran = true;
    }
    if which == "scale-in-process" {
        // Only the scale bench's in-process cases (no agent, no pods): the compile path.
        bench::scale::run_in_process(scale_rounds())?;
        ran = true;
    }
    if which == "scale-heap" {
        // The heap attribution alone (also printed by "scale").
        bench::scale::heap()?;
        ran = true;
    }
    if all || which == "idle" {
        bench::idle::run(std::time::Duration::from_secs(30))?;
        ran = true;
    }
    if all || which == "xdp" {
        bench::xdp::run(3)?;
        ran = true;
    }
    if which == "mesh" {
        // Not in "all": it needs iperf3, sockperf, wireguard-tools and boringtun-cli, which
        // `cargo xtask bench mesh` installs.
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        bench::mesh::run(
            env("WEIR_BENCH_ROUNDS", 3) as usize,
            bench::mesh::Durations {
                tcp: std::time::Duration::from_secs(env("WEIR_BENCH_TCP_SECS", 5)),
                rr: std::time::Duration::from_secs(env("WEIR_BENCH_RR_SECS", 3)),
            },
        )?;
        ran = true;
    }
    // Not part of "all": it builds a two-cluster mesh lab of its own.
    if which == "mesh-sync" {
        bench::mesh_sync::run(20)?;
        ran = true;
    }
    anyhow::ensure!(
        ran,
        "unknown benchmark {which:?}: choose datapath, propagation, cni, traffic, idle, xdp, scale, scale-in-process, scale-heap, mesh, mesh-sync or all"
    );
    Ok(())
}

/// `WEIR_SCALE_ROUNDS`, 100 by default.
fn scale_rounds() -> usize {
    std::env::var("WEIR_SCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}
