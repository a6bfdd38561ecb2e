//! Per-packet cost of `weir_from_pod` delivering an established connection to a local pod
//! (`bpf_redirect_peer`), through `BPF_PROG_TEST_RUN`, at 10,000 rules on the destination: the
//! source's egress check, the destination's inline ingress check on the same conntrack entry,
//! the next hop's MACs and the TTL rewrite.
//!
//! The program runs in a namespace of its own that holds the destination's host veth, its route
//! and its permanent neighbour entry, as the CNI plugin leaves them (the FIB lookup needs them).
//! Each run rewrites the packet in place and decrements its TTL, so a test run repeats the
//! packet at most `REPEAT` times from TTL 255 (the shortcut stops at TTL 1); the case takes the
//! median over many such runs.
//!
//! With `WEIR_BENCH_PREVIOUS_EBPF=<path to another weir-ebpf object>` the same packets run through
//! that object too, alternating with the current one, for a same-run comparison of a change.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use weir_agent::datapath::{
    loader,
    maps::DatapathMaps,
    object::EBPF_OBJECT,
    writer::{DesiredMaps, SubjectState, Writer},
};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, DIR_INGRESS, EndpointInfo, PROG_FROM_POD, PROTO_TCP,
    SUBJECT_ISOLATED_INGRESS,
};
use weir_policy::output::RuleMatch;

use crate::{
    netns::{Netns, run as run_cmd, spawn_in},
    packet::{TCP_SYN, tcp, with_ipv4_checksum},
};

const CLIENT: &str = "10.62.0.1";
const SERVER: &str = "10.62.0.2";
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 1001;
const PORT: u16 = 8080;
const RULES: u32 = 10_000;
/// `skb->ifindex` under BPF_PROG_TEST_RUN (the namespace's loopback): the client's "veth".
const TEST_RUN_IFINDEX: u32 = 1;
/// `bpf_redirect_peer`'s verdict.
const TC_ACT_REDIRECT: u32 = 7;
/// TCP ACK.
const TCP_ACK: u8 = 0x10;
/// Runs per test run: the packet starts at TTL 255 and the shortcut needs TTL > 1.
const REPEAT: u32 = 200;
/// Test runs per object and round.
const RUNS: usize = 2_000;
const ROUNDS: usize = 5;

/// The server on `server_ifindex`, isolated for ingress with `RULES` rules (one admits the
/// client on `PORT`); the client on the test-run interface; redirection on.
fn desired(server_ifindex: u32) -> DesiredMaps {
    let client: IpAddr = CLIENT.parse().expect("address");
    let server: IpAddr = SERVER.parse().expect("address");
    let mut rules = BTreeMap::new();
    for n in 0..RULES - 1 {
        let rule = RuleMatch {
            direction: DIR_INGRESS,
            peer: 5000 + n,
            proto: Some(PROTO_TCP),
            port: Some((PORT, 16)),
        };
        rules.insert(rule, n + 2);
    }
    let allow = RuleMatch {
        direction: DIR_INGRESS,
        peer: CLIENT_ID,
        proto: Some(PROTO_TCP),
        port: Some((PORT, 16)),
    };
    rules.insert(allow, 1);
    let endpoint = |ifindex, identity| EndpointInfo {
        ifindex,
        identity,
        flags: 0,
        _pad: 0,
    };
    DesiredMaps {
        endpoints: BTreeMap::from([
            (client, endpoint(TEST_RUN_IFINDEX, CLIENT_ID)),
            (server, endpoint(server_ifindex, SERVER_ID)),
        ]),
        ipcache: BTreeMap::from([(client.into(), CLIENT_ID), (server.into(), SERVER_ID)]),
        cidr_identities: BTreeMap::new(),
        subjects: BTreeMap::from([(
            SERVER_ID,
            SubjectState {
                flags: SUBJECT_ISOLATED_INGRESS,
                rules,
            },
        )]),
        config_flags: CONFIG_REDIRECT_LOCAL,
    }
}

/// `object` loaded with the maps of `desired`, the connection opened; the program and its maps.
struct Loaded {
    ebpf: aya::Ebpf,
    established: Vec<u8>,
}

impl Loaded {
    fn new(object: &[u8], server_ifindex: u32) -> anyhow::Result<Self> {
        let mut ebpf = loader::load_object(object, None, false)?;
        let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
        writer.apply(&desired(server_ifindex))?;
        let (client, server): (IpAddr, IpAddr) = (CLIENT.parse()?, SERVER.parse()?);
        let this = Self {
            ebpf,
            established: ttl_255(tcp(client, 40000, server, PORT, TCP_ACK)),
        };
        let opened = this.run_once(&ttl_255(tcp(client, 40000, server, PORT, TCP_SYN)), 1)?;
        anyhow::ensure!(
            opened == TC_ACT_REDIRECT,
            "the connection's first packet got verdict {opened}, not the redirect"
        );
        Ok(this)
    }

    fn program(&self) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(PROG_FROM_POD)
            .ok_or_else(|| anyhow::anyhow!("no {PROG_FROM_POD}"))?
            .try_into()?)
    }

    fn run_once(&self, frame: &[u8], repeat: u32) -> anyhow::Result<u32> {
        Ok(self
            .program()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::new()
            })?
            .return_value)
    }

    /// The median per-packet time of the established packet over `RUNS` test runs.
    fn established_cost(&self) -> anyhow::Result<Duration> {
        let program = self.program()?;
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let result = program.test_run(TestRunOptions {
                data_in: Some(&self.established),
                repeat: REPEAT,
                ..TestRunOptions::new()
            })?;
            anyhow::ensure!(
                result.return_value == TC_ACT_REDIRECT,
                "the established packet got verdict {} instead of the redirect",
                result.return_value
            );
            times.push(result.duration);
        }
        times.sort();
        Ok(times[times.len() / 2])
    }
}

/// The frame with TTL 255 (and its checksum), so that `REPEAT` runs stay on the shortcut.
fn ttl_255(mut frame: Vec<u8>) -> Vec<u8> {
    frame[14 + 8] = 255;
    with_ipv4_checksum(frame)
}

/// The median per-packet cost per round of the current object and, if given, the previous one.
fn measure(previous: Option<Vec<u8>>) -> anyhow::Result<(Duration, Option<Duration>)> {
    let server_ifindex = nix::net::if_::if_nametoindex("vb")?;
    let current = Loaded::new(EBPF_OBJECT, server_ifindex)?;
    let previous = previous
        .map(|object| Loaded::new(&object, server_ifindex))
        .transpose()?;
    let mut rounds = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        rounds.0.push(current.established_cost()?);
        if let Some(previous) = &previous {
            rounds.1.push(previous.established_cost()?);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied()
    };
    Ok((median(rounds.0).unwrap_or_default(), median(rounds.1)))
}

pub fn run() -> anyhow::Result<()> {
    let previous = match std::env::var_os("WEIR_BENCH_PREVIOUS_EBPF") {
        Some(path) => Some(
            std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.to_string_lossy()))?,
        ),
        None => None,
    };
    let ns = Netns::new("bdr");
    ns.ip(&["link", "add", "vb", "type", "veth", "peer", "name", "vbp"]);
    ns.ip(&["link", "set", "vb", "up"]);
    ns.ip(&["link", "set", "vbp", "up"]);
    ns.ip(&["route", "add", &format!("{SERVER}/32"), "dev", "vb"]);
    ns.ip(&[
        "neigh",
        "add",
        SERVER,
        "lladdr",
        "02:00:00:00:00:0b",
        "dev",
        "vb",
        "nud",
        "permanent",
    ]);
    run_cmd(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    let (current, previous) = spawn_in(ns.path(), move || measure(previous))
        .join()
        .map_err(|_| anyhow::anyhow!("the redirect bench panicked"))??;
    println!(
        "per-packet cost of weir_from_pod delivering an established connection to a local pod (bpf_redirect_peer, {RULES} rules on the destination; median of {ROUNDS} rounds of {RUNS} test runs of {REPEAT} packets):"
    );
    println!("  this build     {:>6} ns", current.as_nanos());
    if let Some(previous) = previous {
        println!(
            "  previous build {:>6} ns   (this build / previous: {:.2}x)",
            previous.as_nanos(),
            current.as_secs_f64() / previous.as_secs_f64().max(1e-12)
        );
    }
    Ok(())
}
