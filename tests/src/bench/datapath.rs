//! Per-packet program cost through `BPF_PROG_TEST_RUN` with many repeats: the same packets with
//! 10 and with 10,000 rules on the subject. The rules are written by the agent's own writer.
//! Besides a new and an established connection: a later fragment of an allowed datagram (the
//! fragment map, then conntrack) and an established IPv6 connection behind three extension headers.
//!
//! Then the cost of kernel-side debug logging (aya-log) at 10 rules: the object loaded with
//! logging off (as the agent loads it without `--bpf-log`) against the same object with logging
//! on, and, with `WEIR_BENCH_BASELINE_EBPF=<path to a weir-ebpf object built without aya-log>`,
//! against that build; the loads alternate over rounds and each case takes its median round.
//!
//! Last, the redirect path of `weir_from_pod` (`datapath_redirect`) and `weir_xdp`
//! (`datapath_xdp`).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use weir_agent::datapath::{
    loader,
    maps::DatapathMaps,
    object::EBPF_OBJECT,
    writer::{DesiredMaps, SubjectState, Writer},
};
use weir_common::{DIR_INGRESS, EndpointInfo, PROG_TO_POD, PROTO_TCP, SUBJECT_ISOLATED_INGRESS};
use weir_policy::output::RuleMatch;

use crate::packet::{ETH_P_IPV6, Ext, Fragmented, TCP_SYN, ethernet, ipv6_chain, tcp, tcp_header};

pub(super) const CLIENT: &str = "10.61.0.1";
pub(super) const SERVER: &str = "10.61.0.2";
const CLIENT_V6: &str = "fd00:61::1";
const SERVER_V6: &str = "fd00:61::2";
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 1001;
pub(super) const ALLOWED_PORT: u16 = 8080;
pub(super) const DENIED_PORT: u16 = 9090;
/// `skb->ifindex` under BPF_PROG_TEST_RUN (loopback).
const TEST_RUN_IFINDEX: u32 = 1;

/// Desired maps: the server isolated for ingress with `rules` rules, one of which allows the
/// client on ALLOWED_PORT; the others allow other identities.
pub(super) fn desired(rules: u32) -> DesiredMaps {
    let client: IpAddr = CLIENT.parse().expect("address");
    let server: IpAddr = SERVER.parse().expect("address");
    let client_v6: IpAddr = CLIENT_V6.parse().expect("address");
    let server_v6: IpAddr = SERVER_V6.parse().expect("address");
    let mut set = BTreeMap::new();
    for n in 0..rules.saturating_sub(1) {
        let rule = RuleMatch {
            direction: DIR_INGRESS,
            peer: 5000 + n,
            proto: Some(PROTO_TCP),
            port: Some((ALLOWED_PORT, 16)),
        };
        set.insert(rule, n + 2);
    }
    let allow = RuleMatch {
        direction: DIR_INGRESS,
        peer: CLIENT_ID,
        proto: Some(PROTO_TCP),
        port: Some((ALLOWED_PORT, 16)),
    };
    set.insert(allow, 1);
    let endpoint = EndpointInfo {
        ifindex: TEST_RUN_IFINDEX,
        identity: SERVER_ID,
        flags: 0,
        _pad: 0,
    };
    DesiredMaps {
        endpoints: BTreeMap::from([(server, endpoint), (server_v6, endpoint)]),
        ipcache: BTreeMap::from([(client.into(), CLIENT_ID), (client_v6.into(), CLIENT_ID)]),
        cidr_identities: BTreeMap::new(),
        subjects: BTreeMap::from([(
            SERVER_ID,
            SubjectState {
                flags: SUBJECT_ISOLATED_INGRESS,
                rules: set,
            },
        )]),
        config_flags: 0,
    }
}

/// tc verdicts.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Average ns per run of the to-pod program for `frame`, which must get the verdict `expect` (a
/// case that took another path would measure the wrong thing).
fn per_packet(
    program: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    expect: u32,
) -> anyhow::Result<Duration> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?;
    anyhow::ensure!(
        result.return_value == expect,
        "the benchmark packet got verdict {} instead of {expect}",
        result.return_value
    );
    Ok(result.duration)
}

/// Per-packet times of the cases at one rule count.
struct Costs {
    denied: Duration,
    established: Duration,
    later_fragment: Duration,
    ipv6_extensions: Duration,
}

/// The per-packet times at `rules` rules.
fn measure(rules: u32, repeat: u32) -> anyhow::Result<Costs> {
    measure_object(EBPF_OBJECT, false, rules, repeat)
}

/// The per-packet times at `rules` rules of `object`, loaded with kernel logging `bpf_log`.
fn measure_object(object: &[u8], bpf_log: bool, rules: u32, repeat: u32) -> anyhow::Result<Costs> {
    let mut ebpf = loader::load_object(object, None, bpf_log)?;
    let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    writer.apply(&desired(rules))?;
    let program: &SchedClassifier = ebpf
        .program(PROG_TO_POD)
        .ok_or_else(|| anyhow::anyhow!("no {PROG_TO_POD}"))?
        .try_into()?;
    let client: IpAddr = CLIENT.parse()?;
    let server: IpAddr = SERVER.parse()?;
    // Every lookup a new connection can make, ending in a drop.
    let denied = tcp(client, 40000, server, DENIED_PORT, TCP_SYN);
    // The first run creates the conntrack entry; the rest hit it.
    let established = tcp(client, 40001, server, ALLOWED_PORT, TCP_SYN);
    // A datagram in fragments of 24 bytes: the first one runs once (conntrack entry and
    // fragment record), then a later one is repeated.
    let mut segment = tcp_header(40002, ALLOWED_PORT, TCP_SYN);
    segment.extend_from_slice(&[0; 40]);
    let fragments = Fragmented::new(client, server, PROTO_TCP, 0x4242).frames(&segment, 24);
    per_packet(program, &fragments[0], 1, TC_ACT_OK)?;
    // Hop-by-hop, routing and destination options in front of TCP; established after the
    // first run.
    let (client_v6, server_v6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (CLIENT_V6.parse()?, SERVER_V6.parse()?);
    let behind_extensions = ethernet(
        ETH_P_IPV6,
        &ipv6_chain(
            client_v6.octets(),
            server_v6.octets(),
            &[Ext::HopByHop, Ext::Routing, Ext::DestOpts],
            PROTO_TCP,
            &tcp_header(40003, ALLOWED_PORT, TCP_SYN),
        ),
    );
    Ok(Costs {
        denied: per_packet(program, &denied, repeat, TC_ACT_SHOT)?,
        established: per_packet(program, &established, repeat, TC_ACT_OK)?,
        later_fragment: per_packet(program, &fragments[1], repeat, TC_ACT_OK)?,
        ipv6_extensions: per_packet(program, &behind_extensions, repeat, TC_ACT_OK)?,
    })
}

pub fn run(repeat: u32) -> anyhow::Result<()> {
    println!("per-packet cost of weir_to_pod via BPF_PROG_TEST_RUN, {repeat} repeats per case");
    let few = measure(10, repeat)?;
    let many = measure(10_000, repeat)?;
    let row = |name: &str, a: Duration, b: Duration| {
        println!(
            "  {name:<52} {:>8} ns  {:>8} ns  ratio {:.3}",
            a.as_nanos(),
            b.as_nanos(),
            b.as_secs_f64() / a.as_secs_f64().max(1e-12)
        );
    };
    println!("  {:<52} {:>11} {:>11}", "case", "10 rules", "10,000 rules");
    row(
        "new connection, full policy lookup (denied)",
        few.denied,
        many.denied,
    );
    row(
        "established connection (conntrack hit)",
        few.established,
        many.established,
    );
    row(
        "later fragment of an allowed datagram",
        few.later_fragment,
        many.later_fragment,
    );
    row(
        "established IPv6 behind 3 extension headers",
        few.ipv6_extensions,
        many.ipv6_extensions,
    );
    println!("  goal: ratio <= 1.10");
    logging_cost(repeat)?;
    super::datapath_redirect::run()?;
    super::datapath_xdp::run(repeat)
}

const LOG_ROUNDS: usize = 5;

/// The median of each case over rounds.
fn median_costs(rounds: &[Costs]) -> Costs {
    fn median(values: &mut [Duration]) -> Duration {
        values.sort();
        values[values.len() / 2]
    }
    let pick = |f: fn(&Costs) -> Duration| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    Costs {
        denied: pick(|c| c.denied),
        established: pick(|c| c.established),
        later_fragment: pick(|c| c.later_fragment),
        ipv6_extensions: pick(|c| c.ipv6_extensions),
    }
}

/// Kernel-side logging: off against on and (if given) against a build without aya-log.
fn logging_cost(repeat: u32) -> anyhow::Result<()> {
    let baseline = match std::env::var_os("WEIR_BENCH_BASELINE_EBPF") {
        Some(path) => Some(
            std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("reading WEIR_BENCH_BASELINE_EBPF {path:?}: {e}"))?,
        ),
        None => None,
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut without = Vec::new();
    for _ in 0..LOG_ROUNDS {
        off.push(measure_object(EBPF_OBJECT, false, 10, repeat)?);
        if let Some(object) = &baseline {
            without.push(measure_object(object, false, 10, repeat)?);
        }
        on.push(measure_object(EBPF_OBJECT, true, 10, repeat)?);
    }
    let off = median_costs(&off);
    let on = median_costs(&on);
    let without = (!without.is_empty()).then(|| median_costs(&without));
    println!(
        "kernel debug logging (aya-log), weir_to_pod at 10 rules, median of {LOG_ROUNDS} alternating loads:"
    );
    println!(
        "  {:<52} {:>11} {:>11} {:>11}",
        "case",
        "log off",
        "log on",
        if without.is_some() {
            "no aya-log"
        } else {
            "(no base)"
        }
    );
    let row = |name: &str, f: fn(&Costs) -> Duration| {
        let base = without.as_ref().map(f);
        println!(
            "  {name:<52} {:>8} ns {:>8} ns {:>8}    off/on {:.3}{}",
            f(&off).as_nanos(),
            f(&on).as_nanos(),
            base.map_or("-".to_owned(), |b| format!("{} ns", b.as_nanos())),
            f(&off).as_secs_f64() / f(&on).as_secs_f64().max(1e-12),
            base.map_or(String::new(), |b| format!(
                "  off/no aya-log {:.3}",
                f(&off).as_secs_f64() / b.as_secs_f64().max(1e-12)
            )),
        );
    };
    row("new connection, full policy lookup (denied, logged)", |c| {
        c.denied
    });
    row("established connection (conntrack hit, not logged)", |c| {
        c.established
    });
    row("later fragment of an allowed datagram", |c| {
        c.later_fragment
    });
    row("established IPv6 behind 3 extension headers", |c| {
        c.ipv6_extensions
    });
    println!(
        "  goal: log off within TestRun noise of a build without aya-log (off/no aya-log ~1.0). With logging on, the denied case writes a record per packet until aya-log's 128 KiB ring buffer is full (nothing reads it here), then only tries."
    );
    if without.is_none() {
        println!(
            "  (set WEIR_BENCH_BASELINE_EBPF to a weir-ebpf object built without aya-log for the last column)"
        );
    }
    Ok(())
}
