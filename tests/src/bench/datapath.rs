//! Per-packet program cost through `BPF_PROG_TEST_RUN` with many repeats: the same packets with
//! 10 and with 10,000 rules on the subject. The rules are written by the agent's own writer.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use weir_agent::datapath::{
    loader,
    maps::DatapathMaps,
    writer::{DesiredMaps, SubjectState, Writer},
};
use weir_common::{DIR_INGRESS, EndpointInfo, PROG_TO_POD, PROTO_TCP, SUBJECT_ISOLATED_INGRESS};
use weir_policy::output::RuleMatch;

use crate::packet::{TCP_SYN, tcp};

const CLIENT: &str = "10.61.0.1";
const SERVER: &str = "10.61.0.2";
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 1001;
const ALLOWED_PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
/// `skb->ifindex` under BPF_PROG_TEST_RUN (loopback).
const TEST_RUN_IFINDEX: u32 = 1;

/// Desired maps: the server isolated for ingress with `rules` rules, one of which allows the
/// client on ALLOWED_PORT; the others allow other identities.
fn desired(rules: u32) -> DesiredMaps {
    let client: IpAddr = CLIENT.parse().expect("address");
    let server: IpAddr = SERVER.parse().expect("address");
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
    DesiredMaps {
        endpoints: BTreeMap::from([(
            server,
            EndpointInfo {
                ifindex: TEST_RUN_IFINDEX,
                identity: SERVER_ID,
                flags: 0,
                _pad: 0,
            },
        )]),
        ipcache: BTreeMap::from([(client.into(), CLIENT_ID)]),
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

/// Average ns per run of the to-pod program for `frame`.
fn per_packet(program: &SchedClassifier, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?;
    Ok(result.duration)
}

/// (denied new connection, established connection) per-packet times at `rules` rules.
fn measure(rules: u32, repeat: u32) -> anyhow::Result<(Duration, Duration)> {
    let mut ebpf = loader::load(None)?;
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
    let denied_cost = per_packet(program, &denied, repeat)?;
    let established_cost = per_packet(program, &established, repeat)?;
    Ok((denied_cost, established_cost))
}

pub fn run(repeat: u32) -> anyhow::Result<()> {
    println!("per-packet cost of weir_to_pod via BPF_PROG_TEST_RUN, {repeat} repeats per case");
    let (denied_10, est_10) = measure(10, repeat)?;
    let (denied_10k, est_10k) = measure(10_000, repeat)?;
    let row = |name: &str, a: Duration, b: Duration| {
        println!(
            "  {name:<44} {:>8} ns  {:>8} ns  ratio {:.3}",
            a.as_nanos(),
            b.as_nanos(),
            b.as_secs_f64() / a.as_secs_f64().max(1e-12)
        );
    };
    println!("  {:<44} {:>11} {:>11}", "case", "10 rules", "10,000 rules");
    row(
        "new connection, full policy lookup (denied)",
        denied_10,
        denied_10k,
    );
    row("established connection (conntrack hit)", est_10, est_10k);
    println!("  goal: ratio <= 1.10");
    Ok(())
}
