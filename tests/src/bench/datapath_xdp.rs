//! Per-packet cost of `weir_xdp` through `BPF_PROG_TEST_RUN`, with 10 and 10,000 rules on the
//! destination pod (written by the agent's writer, as `datapath`'s cases): a flood of one denied
//! kind (the same new connection the pod's ingress policy denies, packet after packet), an
//! allowed new connection (the filter passes it and leaves it to `weir_to_pod`, so each run makes
//! every lookup again) and a new connection to a local pod that no policy isolates, both before
//! the flood and the allowed one again while a denial is remembered under the current generation
//! (it then also looks for a remembered denial of its own kind).
//!
//! With `WEIR_BENCH_PREVIOUS_EBPF=<path to another weir-ebpf object>` the same packets run
//! through that object too, the loads alternating over rounds, for a same-run comparison of a
//! change; each case takes its median round.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use weir_agent::datapath::{loader, maps::DatapathMaps, object::EBPF_OBJECT, writer::Writer};
use weir_common::{EndpointInfo, PROG_XDP, REASON_XDP_POLICY_DENIED};

use super::datapath::{ALLOWED_PORT, CLIENT, DENIED_PORT, SERVER, desired};
use crate::packet::{TCP_SYN, tcp};

/// A local pod no policy selects.
const OPEN_POD: &str = "10.61.0.3";
const OPEN_POD_ID: u32 = 1002;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ROUNDS: usize = 5;

/// Per-packet times of one object at one rule count.
#[derive(Clone, Copy)]
struct Costs {
    denied_flood: Duration,
    allowed_new: Duration,
    not_isolated: Duration,
    allowed_new_during_flood: Duration,
}

/// Average ns per run of `weir_xdp` for `frame`, which must get the verdict `expect`.
fn per_packet(program: &Xdp, frame: &[u8], repeat: u32, expect: u32) -> anyhow::Result<Duration> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?;
    anyhow::ensure!(
        result.return_value == expect,
        "the benchmark packet got XDP verdict {} instead of {expect}",
        result.return_value
    );
    Ok(result.duration)
}

fn measure(object: &[u8], rules: u32, repeat: u32) -> anyhow::Result<Costs> {
    let mut ebpf = loader::load_object(object, None, false)?;
    let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    let mut maps = desired(rules);
    let open: IpAddr = OPEN_POD.parse()?;
    maps.endpoints.insert(
        open,
        EndpointInfo {
            identity: OPEN_POD_ID,
            ..Default::default()
        },
    );
    writer.apply(&maps)?;
    let program: &Xdp = ebpf
        .program(PROG_XDP)
        .ok_or_else(|| anyhow::anyhow!("no {PROG_XDP}"))?
        .try_into()?;
    let client: IpAddr = CLIENT.parse()?;
    let server: IpAddr = SERVER.parse()?;
    let denied = tcp(client, 40000, server, DENIED_PORT, TCP_SYN);
    let allowed = tcp(client, 40001, server, ALLOWED_PORT, TCP_SYN);
    let to_open_pod = tcp(client, 40002, open, DENIED_PORT, TCP_SYN);
    let allowed_new = per_packet(program, &allowed, repeat, XDP_PASS)?;
    let not_isolated = per_packet(program, &to_open_pod, repeat, XDP_PASS)?;
    let denied_flood = per_packet(program, &denied, repeat, XDP_DROP)?;
    let costs = Costs {
        denied_flood,
        allowed_new,
        not_isolated,
        allowed_new_during_flood: per_packet(program, &allowed, repeat, XDP_PASS)?,
    };
    // Every run of the denied packet was dropped by the policy, not by anything else.
    let dropped = writer.counters()[REASON_XDP_POLICY_DENIED as usize];
    anyhow::ensure!(
        dropped == u64::from(repeat),
        "{dropped} policy drops counted for {repeat} denied packets"
    );
    Ok(costs)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// This build's and (if given) the previous build's median costs at `rules` rules.
fn compare(
    previous: Option<&[u8]>,
    rules: u32,
    repeat: u32,
) -> anyhow::Result<(Costs, Option<Costs>)> {
    let mut current = Vec::new();
    let mut before = Vec::new();
    for _ in 0..ROUNDS {
        current.push(measure(EBPF_OBJECT, rules, repeat)?);
        if let Some(object) = previous {
            before.push(measure(object, rules, repeat)?);
        }
    }
    let medians = |rounds: &[Costs]| Costs {
        denied_flood: median(rounds.iter().map(|c| c.denied_flood).collect()),
        allowed_new: median(rounds.iter().map(|c| c.allowed_new).collect()),
        not_isolated: median(rounds.iter().map(|c| c.not_isolated).collect()),
        allowed_new_during_flood: median(
            rounds.iter().map(|c| c.allowed_new_during_flood).collect(),
        ),
    };
    Ok((
        medians(&current),
        (!before.is_empty()).then(|| medians(&before)),
    ))
}

pub fn run(repeat: u32) -> anyhow::Result<()> {
    let previous = match std::env::var_os("WEIR_BENCH_PREVIOUS_EBPF") {
        Some(path) => Some(
            std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.to_string_lossy()))?,
        ),
        None => None,
    };
    println!(
        "per-packet cost of weir_xdp via BPF_PROG_TEST_RUN, {repeat} repeats per case, median of {ROUNDS} rounds{}",
        if previous.is_some() {
            " (loads alternating with WEIR_BENCH_PREVIOUS_EBPF)"
        } else {
            ""
        }
    );
    println!(
        "  {:<44} {:>6} {:>11} {:>11} {:>8}",
        "case", "rules", "this build", "previous", "ratio"
    );
    for rules in [10, 10_000] {
        let (current, before) = compare(previous.as_deref(), rules, repeat)?;
        let row = |name: &str, f: fn(&Costs) -> Duration| {
            let now = f(&current);
            let (then, ratio) = match before.as_ref().map(f) {
                Some(b) => (
                    format!("{} ns", b.as_nanos()),
                    format!("{:.2}x", now.as_secs_f64() / b.as_secs_f64().max(1e-12)),
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            println!(
                "  {name:<44} {rules:>6} {:>8} ns {then:>11} {ratio:>8}",
                now.as_nanos()
            );
        };
        row("flood of one denied kind (dropped)", |c| c.denied_flood);
        row("allowed new connection (passed)", |c| c.allowed_new);
        row("new connection, pod not isolated (passed)", |c| {
            c.not_isolated
        });
        row("allowed new connection during the flood", |c| {
            c.allowed_new_during_flood
        });
    }
    Ok(())
}
