//! Pod-to-pod traffic through a node namespace: UDP request/response latency and TCP throughput
//! with no enforcement, with Weir at 0, 1,000 and 10,000 rules through the node's stack, with
//! Weir at 0 and 10,000 rules delivering through `bpf_redirect_peer` (the agent's default), and
//! with the same rules as iptables. A rule is one (peer, port) allowance in a policy that selects the measured pods; all
//! but the allowances for the measured traffic name other peers. These cases write Weir's maps
//! directly.
//!
//! Beside them, the same traffic through the real agent (`traffic_agent`): 1 and 10,000
//! NetworkPolicies selecting the server, with and without `--redirect-local-pods`, against the
//! same veths with Weir uninstalled.
//!
//! Topology: client pod ns ── veth ── node ns ── veth ── server pod ns, routed, all inside
//! namespaces this benchmark creates and deletes. Weir's programs go onto the node's veths the
//! way the agent attaches them (tc clsact, `datapath::attach`). The cases run in turn, several
//! rounds over, so a slow spell of the machine spreads over all of them instead of landing on
//! one; each case's latency pools its rounds' round trips, its throughput is the median round,
//! and its throughput ratio the median of its rounds' ratios to the baseline's run of the same
//! round (a slow spell moves both). Beside throughput, the whole machine's CPU time per byte of
//! the TCP run, compared the same way: where the sockets' copies bound a single stream, a cheaper
//! path shows there and not in throughput.
//!
//! Each case is measured once the machine is quiet again after setting it up. Its UDP round
//! trips run with the CPUs held at polling idle, its TCP run with them free to halt (see
//! `cpu_wakeup`: a polling vCPU beside a single stream made its rounds swing by ±20 %).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use aya::Ebpf;
use nix::sched::{CloneFlags, setns};
use weir_agent::datapath::{
    attach::{Programs, attach_endpoint, detach_endpoint},
    loader,
    maps::DatapathMaps,
    writer::{DesiredMaps, SubjectState, Writer},
};
use weir_common::{
    CONFIG_REDIRECT_LOCAL, DIR_EGRESS, DIR_INGRESS, EndpointInfo, PROTO_TCP, PROTO_UDP,
    SUBJECT_ISOLATED_EGRESS, SUBJECT_ISOLATED_INGRESS,
};
use weir_policy::output::RuleMatch;

use super::{
    cpu_wakeup::IdleStates,
    stats::{Samples, us},
    traffic_agent::AgentNode,
};
use crate::{
    cpu::CpuTime,
    netns::{Netns, spawn_in},
};

const CLIENT: &str = "10.77.1.2";
const SERVER: &str = "10.77.2.2";
pub(super) const UDP_PORT: u16 = 7000;
pub(super) const TCP_PORT: u16 = 7001;
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 1001;

struct Topology {
    client: Netns,
    node: Netns,
    server: Netns,
}

fn topology() -> Topology {
    let t = Topology {
        client: Netns::new("bc"),
        node: Netns::new("bn"),
        server: Netns::new("bs"),
    };
    for (pod, veth, node_addr, pod_addr) in [
        (&t.client, "vc", "10.77.1.1/24", "10.77.1.2/24"),
        (&t.server, "vs", "10.77.2.1/24", "10.77.2.2/24"),
    ] {
        t.node.ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ]);
        t.node.ip(&["addr", "add", node_addr, "dev", veth]);
        t.node.ip(&["link", "set", veth, "up"]);
        pod.ip(&["addr", "add", pod_addr, "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        let gw = node_addr.split('/').next().unwrap_or_default();
        pod.ip(&["route", "add", "default", "via", gw]);
    }
    crate::netns::run(
        "ip",
        &[
            "netns",
            "exec",
            &t.node.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    t
}

/// Runs `f` on a new thread inside `netns`.
fn in_netns<T: Send + 'static>(
    netns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    spawn_in(netns.path(), f)
}

/// UDP echo and TCP sink servers in the server pod; run until the process ends.
fn start_servers(server: &Netns, ip: IpAddr) -> mpsc::Receiver<(u64, Duration)> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (bytes_tx, bytes_rx) = mpsc::channel();
    in_netns(server, move || {
        let udp = UdpSocket::bind((ip, UDP_PORT)).expect("binding UDP");
        let tcp = TcpListener::bind((ip, TCP_PORT)).expect("binding TCP");
        let _ = ready_tx.send(());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        });
        for stream in tcp.incoming().flatten() {
            let tx = bytes_tx.clone();
            thread::spawn(move || {
                let mut stream = stream;
                let mut buf = vec![0u8; 1 << 18];
                let mut total = 0u64;
                let mut first: Option<Instant> = None;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    first.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
                let _ = tx.send((total, first.map_or(Duration::ZERO, |f| f.elapsed())));
            });
        }
    });
    ready_rx.recv().expect("servers did not start");
    bytes_rx
}

/// The measured pair: the client pod and its address, the server's address and byte counts.
struct Pair<'a> {
    client: &'a Netns,
    client_ip: IpAddr,
    server_ip: IpAddr,
    results: &'a mpsc::Receiver<(u64, Duration)>,
}

/// `iterations` UDP round-trip times, after 1,000 to warm up.
fn udp_latency(pair: &Pair<'_>, iterations: usize) -> Vec<Duration> {
    let (client, server) = (pair.client_ip, pair.server_ip);
    in_netns(pair.client, move || {
        let sock = UdpSocket::bind((client, 0)).expect("binding the client");
        sock.connect((server, UDP_PORT)).expect("connecting");
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let msg = [7u8; 64];
        let mut buf = [0u8; 128];
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..iterations + 1000 {
            let started = Instant::now();
            sock.send(&msg).expect("sending");
            sock.recv(&mut buf)
                .expect("no UDP reply: the path is blocked");
            if i >= 1000 {
                samples.push(started.elapsed());
            }
        }
        samples
    })
    .join()
    .expect("latency client panicked")
}

/// Busy time of the whole machine, as a share of all its CPUs, below which it counts as quiet.
const QUIET_SHARE: f64 = 0.03;
/// The window that share is measured over.
const QUIET_WINDOW: Duration = Duration::from_millis(300);
/// How long a case waits for a quiet machine before it is measured anyway.
const QUIET_WITHIN: Duration = Duration::from_secs(15);

/// Waits until the machine is quiet: what setting a case up left running (the kernel freeing a
/// replaced agent's maps and programs, the agent's last writes) would otherwise land on that
/// case's measurement and not on its baseline's. How long it waited, or `None` if it never
/// became quiet within `QUIET_WITHIN`.
fn settle() -> Option<Duration> {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    while started.elapsed() < QUIET_WITHIN {
        let before = CpuTime::machine();
        thread::sleep(QUIET_WINDOW);
        let busy = CpuTime::machine().since(before).total();
        if busy.as_secs_f64() <= QUIET_SHARE * cpus * QUIET_WINDOW.as_secs_f64() {
            return Some(started.elapsed());
        }
    }
    None
}

/// One TCP run: its throughput, and the whole machine's CPU time per gigabyte it moved (both
/// ends, the path between them and whatever else ran; on an otherwise idle machine, the cost of
/// the path, which throughput alone hides where the sockets' copies bound it).
struct TcpRun {
    gbit: f64,
    cpu_ms_per_gbyte: f64,
}

fn tcp_throughput(pair: &Pair<'_>, secs: u64) -> TcpRun {
    let server: SocketAddr = (pair.server_ip, TCP_PORT).into();
    let busy_before = CpuTime::machine();
    in_netns(pair.client, move || {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(2))
            .expect("TCP connect failed: the path is blocked");
        let buf = vec![1u8; 1 << 17];
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            stream.write_all(&buf).expect("writing");
        }
        drop(stream);
    })
    .join()
    .expect("throughput client panicked");
    let (bytes, elapsed) = pair
        .results
        .recv_timeout(Duration::from_secs(10))
        .expect("server count");
    let busy = CpuTime::machine().since(busy_before).total();
    TcpRun {
        gbit: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        cpu_ms_per_gbyte: busy.as_secs_f64() * 1e3 / (bytes.max(1) as f64 / 1e9),
    }
}

/// The per-round ratios of `case`'s values to `base`'s (the same round's), sorted.
struct PairedRatios(Vec<f64>);

impl PairedRatios {
    fn new(case: &[f64], base: &[f64]) -> Self {
        let mut ratios: Vec<f64> = case.iter().zip(base).map(|(c, b)| c / b).collect();
        ratios.sort_by(f64::total_cmp);
        Self(ratios)
    }

    /// Interpolated between the two nearest rounds, so that 3 rounds still have a middle half.
    fn quantile(&self, q: f64) -> f64 {
        let at = (self.0.len() - 1) as f64 * q;
        let (below, above) = (self.0[at.floor() as usize], self.0[at.ceil() as usize]);
        below + (above - below) * at.fract()
    }
}

impl std::fmt::Display for PairedRatios {
    /// The median, the middle half and the whole range: a single stream's rounds swing, and the
    /// middle half says whether a median above 1 is more than one lucky round.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}x (middle half {:.2}-{:.2}x, rounds {:.2}-{:.2}x)",
            self.quantile(0.5),
            self.quantile(0.25),
            self.quantile(0.75),
            self.quantile(0.0),
            self.quantile(1.0),
        )
    }
}

/// The node's veths, which carry Weir's programs during its cases.
const NODE_VETHS: [&str; 2] = ["vc", "vs"];

/// Weir's programs on the node's veths, with `rules` rules on each side; taken off again on drop.
struct Weir {
    _ebpf: Ebpf,
    node_path: String,
}

impl Drop for Weir {
    fn drop(&mut self) {
        // The kernel keeps tc filters (and their programs) after the loader is gone: without
        // this, the next cases would still run Weir's programs.
        let detached = spawn_in(self.node_path.clone(), || {
            NODE_VETHS.map(|veth| detach_endpoint(veth).map(|_| ()))
        })
        .join();
        if !matches!(detached, Ok(results) if results.iter().all(Result::is_ok)) {
            eprintln!("warning: could not take Weir's programs off the benchmark's veths");
        }
    }
}

fn rules_for(direction: u8, measured_peer: u32, rules: u32) -> BTreeMap<RuleMatch, u32> {
    let mut set = BTreeMap::new();
    for n in 0..rules.saturating_sub(2) {
        let rule = RuleMatch {
            direction,
            peer: 5000 + n,
            proto: Some(PROTO_TCP),
            port: Some((TCP_PORT, 16)),
        };
        set.insert(rule, n + 3);
    }
    for (id, proto, port) in [(1, PROTO_UDP, UDP_PORT), (2, PROTO_TCP, TCP_PORT)] {
        let rule = RuleMatch {
            direction,
            peer: measured_peer,
            proto: Some(proto),
            port: Some((port, 16)),
        };
        set.insert(rule, id);
    }
    set
}

/// Weir at `rules` rules; `redirect`: pod-to-pod through `bpf_redirect_peer` (the agent's
/// default) instead of the node's stack.
fn weir(node: &Netns, rules: u32, redirect: bool) -> anyhow::Result<Weir> {
    let node_path = node.path();
    let handle = thread::spawn(move || -> anyhow::Result<Weir> {
        setns(File::open(&node_path)?.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let mut ebpf = loader::load(None)?;
        let programs = Programs::from_ebpf(&ebpf)?;
        let mut ifindex = BTreeMap::new();
        for ifname in NODE_VETHS {
            ifindex.insert(ifname, nix::net::if_::if_nametoindex(ifname)?);
            attach_endpoint(&programs, ifname)?;
        }
        let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
        let client: IpAddr = CLIENT.parse()?;
        let server: IpAddr = SERVER.parse()?;
        let endpoint = |ifindex: u32, identity: u32| EndpointInfo {
            ifindex,
            identity,
            flags: 0,
            _pad: 0,
        };
        let mut subjects = BTreeMap::new();
        if rules > 0 {
            subjects.insert(
                SERVER_ID,
                SubjectState {
                    flags: SUBJECT_ISOLATED_INGRESS,
                    rules: rules_for(DIR_INGRESS, CLIENT_ID, rules),
                },
            );
            subjects.insert(
                CLIENT_ID,
                SubjectState {
                    flags: SUBJECT_ISOLATED_EGRESS,
                    rules: rules_for(DIR_EGRESS, SERVER_ID, rules),
                },
            );
        }
        writer.apply(&DesiredMaps {
            endpoints: BTreeMap::from([
                (client, endpoint(ifindex["vc"], CLIENT_ID)),
                (server, endpoint(ifindex["vs"], SERVER_ID)),
            ]),
            ipcache: BTreeMap::from([(client.into(), CLIENT_ID), (server.into(), SERVER_ID)]),
            cidr_identities: BTreeMap::new(),
            subjects,
            config_flags: if redirect { CONFIG_REDIRECT_LOCAL } else { 0 },
        })?;
        Ok(Weir {
            _ebpf: ebpf,
            node_path,
        })
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("attaching panicked"))?
}

fn iptables_restore(node: &Netns, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "iptables-restore failed");
    Ok(())
}

/// The same rules as iptables in the node's FORWARD chain, the measured allowances last.
fn iptables(node: &Netns, rules: u32) -> anyhow::Result<()> {
    let mut r =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    let _ = writeln!(r, "-A FORWARD -s {SERVER}/32 -d {CLIENT}/32 -j ACCEPT");
    for n in 0..rules.saturating_sub(2) {
        let _ = writeln!(
            r,
            "-A FORWARD -s 10.88.{}.{}/32 -d {SERVER}/32 -p tcp --dport {TCP_PORT} -j ACCEPT",
            n / 250,
            n % 250 + 1
        );
    }
    let _ = writeln!(
        r,
        "-A FORWARD -s {CLIENT}/32 -d {SERVER}/32 -p udp --dport {UDP_PORT} -j ACCEPT"
    );
    let _ = writeln!(
        r,
        "-A FORWARD -s {CLIENT}/32 -d {SERVER}/32 -p tcp --dport {TCP_PORT} -j ACCEPT"
    );
    r.push_str("COMMIT\n");
    iptables_restore(node, &r)
}

fn iptables_flush(node: &Netns) -> anyhow::Result<()> {
    iptables_restore(
        node,
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    )
}

/// Rounds over the cases; `WEIR_TRAFFIC_ROUNDS` overrides it.
const ROUNDS: usize = 3;

/// Seconds of each TCP run; `WEIR_TRAFFIC_TCP_SECS` overrides it.
const TCP_SECS: u64 = 5;

/// How long each case's TCP stream runs: longer runs average out more of a single stream's
/// swings, at the cost of a longer benchmark.
pub fn tcp_secs() -> u64 {
    positive_from_env("WEIR_TRAFFIC_TCP_SECS").unwrap_or(TCP_SECS)
}

/// The positive whole number in the environment variable `name`, if it holds one.
fn positive_from_env<T: std::str::FromStr + PartialOrd + Default>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > T::default())
}

/// The rounds and the cases to run: every case, or with `WEIR_TRAFFIC_CASES=agent` only the real
/// agent's (and their baseline), which is what a change of the datapath is judged by.
fn selection() -> (usize, Vec<Case>) {
    let rounds = positive_from_env("WEIR_TRAFFIC_ROUNDS").unwrap_or(ROUNDS);
    let agent_only = std::env::var("WEIR_TRAFFIC_CASES").is_ok_and(|v| v == "agent");
    let cases = CASES
        .into_iter()
        .filter(|c| !agent_only || c.baseline() == Case::AgentUninstalled)
        .collect();
    (rounds, cases)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    NoEnforcement,
    Weir(u32),
    WeirRedirect(u32),
    Iptables(u32),
    /// The agent's node with Weir uninstalled: the baseline of the `Agent` cases.
    AgentUninstalled,
    /// The real agent with this many NetworkPolicies, with or without `--redirect-local-pods`.
    Agent {
        policies: usize,
        redirect: bool,
    },
}

const CASES: [Case; 13] = [
    Case::NoEnforcement,
    Case::Weir(0),
    Case::Weir(1_000),
    Case::Weir(10_000),
    Case::WeirRedirect(0),
    Case::WeirRedirect(10_000),
    Case::Iptables(1_000),
    Case::Iptables(10_000),
    Case::AgentUninstalled,
    Case::Agent {
        policies: 1,
        redirect: false,
    },
    Case::Agent {
        policies: 1,
        redirect: true,
    },
    Case::Agent {
        policies: 10_000,
        redirect: false,
    },
    Case::Agent {
        policies: 10_000,
        redirect: true,
    },
];

impl Case {
    fn name(self) -> String {
        match self {
            Case::NoEnforcement => "no enforcement".to_owned(),
            Case::Weir(rules) => format!("weir, {rules} rules"),
            Case::WeirRedirect(rules) => format!("weir+redirect, {rules} rules"),
            Case::Iptables(rules) => format!("iptables, {rules} rules"),
            Case::AgentUninstalled => "agent node, weir uninstalled".to_owned(),
            Case::Agent { policies, redirect } => format!(
                "agent, {policies} polic{}{}",
                if policies == 1 { "y" } else { "ies" },
                if redirect { ", redirect" } else { ", stack" }
            ),
        }
    }

    /// The case this one's ratios are against: the same veths without enforcement.
    fn baseline(self) -> Case {
        match self {
            Case::AgentUninstalled | Case::Agent { .. } => Case::AgentUninstalled,
            _ => Case::NoEnforcement,
        }
    }

    fn is_baseline(self) -> bool {
        matches!(self, Case::NoEnforcement | Case::AgentUninstalled)
    }
}

/// Measures every selected case. `idle_states` is held at polling for the UDP round trips and
/// released for the TCP runs (see `cpu_wakeup`), and held again for the last pass.
pub fn run(iterations: usize, secs: u64, idle_states: &mut IdleStates) -> anyhow::Result<()> {
    anyhow::ensure!(
        Command::new("iptables-restore")
            .arg("--version")
            .output()
            .is_ok(),
        "iptables-restore is not installed (the iptables baseline needs it): apt-get install iptables"
    );
    let (rounds, cases) = selection();
    let index = |case: Case| cases.iter().position(|c| *c == case).unwrap_or(0);
    let t = topology();
    let results = start_servers(&t.server, SERVER.parse()?);
    let map_pair = Pair {
        client: &t.client,
        client_ip: CLIENT.parse()?,
        server_ip: SERVER.parse()?,
        results: &results,
    };
    let mut agent_node = AgentNode::start()?;
    let agent_results = start_servers(&agent_node.server, agent_node.server_ip);
    println!(
        "pod-to-pod through a node namespace ({rounds} rounds over the cases; per case and round {iterations} UDP round trips, {secs} s TCP):"
    );
    let mut latency: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut throughput: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut tcp_cpu: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut settle_waits: Vec<Option<Duration>> = Vec::new();
    for _ in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            // Held for the case's measurement: Weir's programs come off when it drops.
            let weir_attached = match case {
                Case::NoEnforcement | Case::AgentUninstalled | Case::Agent { .. } => None,
                Case::Weir(rules) => Some(weir(&t.node, *rules, false)?),
                Case::WeirRedirect(rules) => Some(weir(&t.node, *rules, true)?),
                Case::Iptables(rules) => {
                    iptables(&t.node, *rules)?;
                    None
                }
            };
            match case {
                Case::AgentUninstalled => agent_node.uninstall()?,
                Case::Agent { policies, redirect } => agent_node.enforce(*policies, *redirect)?,
                _ => {}
            }
            let agent_pair = Pair {
                client: &agent_node.client,
                client_ip: agent_node.client_ip,
                server_ip: agent_node.server_ip,
                results: &agent_results,
            };
            let pair = match case.baseline() {
                Case::AgentUninstalled => &agent_pair,
                _ => &map_pair,
            };
            settle_waits.push(settle());
            idle_states.hold_polling();
            latency[i].extend(udp_latency(pair, iterations));
            idle_states.release();
            let tcp = tcp_throughput(pair, secs);
            throughput[i].push(tcp.gbit);
            tcp_cpu[i].push(tcp.cpu_ms_per_gbyte);
            drop(weir_attached);
            if matches!(case, Case::Iptables(_)) {
                iptables_flush(&t.node)?;
            }
        }
    }
    // Where the time goes: a separate pass at 10,000 policies with the redirect, with the
    // kernel's run-time statistics of Weir's programs on (they add two clock reads per run, so
    // not during the measured rounds).
    agent_node.enforce(10_000, true)?;
    idle_states.hold_polling();
    let stats = super::traffic_bpf_stats::Stats::enable()?;
    let before = super::traffic_bpf_stats::weir_programs(&agent_node.node);
    let stats_pair = Pair {
        client: &agent_node.client,
        client_ip: agent_node.client_ip,
        server_ip: agent_node.server_ip,
        results: &agent_results,
    };
    let stats_samples = Samples::new(udp_latency(&stats_pair, iterations));
    let spent = super::traffic_bpf_stats::weir_programs(&agent_node.node).since(before);
    drop(stats);
    drop(agent_node);
    let by_round = throughput.clone();
    let rows: Vec<(Case, Samples, f64)> = cases
        .iter()
        .zip(latency)
        .zip(throughput)
        .map(|((case, lat), mut gbit)| {
            gbit.sort_by(f64::total_cmp);
            (*case, Samples::new(lat), gbit[gbit.len() / 2])
        })
        .collect();
    for (i, (case, lat, gbit)) in rows.iter().enumerate() {
        let mut cpu = tcp_cpu[i].clone();
        cpu.sort_by(f64::total_cmp);
        println!(
            "  {:<30} udp rr p50 {:>9} mean {:>9} p99 {:>9}   tcp {:>6.2} Gbit/s, machine CPU {:>4.0} ms/GB",
            case.name(),
            us(lat.percentile(50.0)),
            us(lat.mean()),
            us(lat.percentile(99.0)),
            gbit,
            cpu[cpu.len() / 2],
        );
    }
    let mut waits: Vec<Duration> = settle_waits.iter().flatten().copied().collect();
    waits.sort();
    println!(
        "  (each case waited for a quiet machine before it was measured: median {} ms, longest {} ms; {} of {} never became quiet within {} s and were measured anyway)",
        waits.get(waits.len() / 2).map_or(0, Duration::as_millis),
        waits.last().map_or(0, Duration::as_millis),
        settle_waits.len() - waits.len(),
        settle_waits.len(),
        QUIET_WITHIN.as_secs(),
    );
    println!(
        "ratios against the same veths without enforcement (the map-writing cases: no enforcement; the agent's: weir uninstalled). Goals at 10,000 rules/policies through the stack: latency <= 1.10x, throughput >= 0.90x; with the redirect: latency p50 <= 1.0x, throughput >= 1.0x:"
    );
    for (i, (case, lat, _)) in rows
        .iter()
        .enumerate()
        .filter(|(_, (c, _, _))| !c.is_baseline())
    {
        let base = index(case.baseline());
        let (_, base_lat, _) = &rows[base];
        println!(
            "  {:<30} latency p50 {:.2}x  mean {:.2}x   throughput {}   CPU per byte {}",
            case.name(),
            lat.percentile(50.0).as_secs_f64() / base_lat.percentile(50.0).as_secs_f64(),
            lat.mean().as_secs_f64() / base_lat.mean().as_secs_f64(),
            PairedRatios::new(&by_round[i], &by_round[base]),
            PairedRatios::new(&tcp_cpu[i], &tcp_cpu[base]),
        );
    }
    // Every round trip of `udp_latency` plus its 1,000 warm-up ones.
    let round_trips = (iterations + 1000) as f64;
    let (_, uninstalled, _) = &rows[index(Case::AgentUninstalled)];
    let (_, redirect, _) = &rows[index(Case::Agent {
        policies: 10_000,
        redirect: true,
    })];
    let delta_ns = (redirect.percentile(50.0).as_secs_f64()
        - uninstalled.percentile(50.0).as_secs_f64())
        * 1e9;
    // The p50 difference less what Weir's programs cost: what the redirect itself does to a
    // round trip against the stack's routing, forwarding and second backlog pass.
    let stack_skipped_ns = delta_ns - spent.ns as f64 / round_trips;
    println!(
        "where the time goes (agent, 10,000 policies, redirect; a separate pass with the kernel's BPF run-time statistics on, udp rr p50 {}): Weir's tc programs ran {:.2} times per round trip, {:.0} ns per run, {:.0} ns per round trip; the measured rounds' p50 differs from weir uninstalled by {:+.0} ns, so delivering without the node's stack (redirect_peer instead of routing, forwarding and a second backlog pass) {} {:.0} ns per round trip against it",
        us(stats_samples.percentile(50.0)),
        spent.runs as f64 / round_trips,
        spent.ns as f64 / (spent.runs.max(1)) as f64,
        spent.ns as f64 / round_trips,
        delta_ns,
        if stack_skipped_ns <= 0.0 {
            "saves"
        } else {
            "costs"
        },
        stack_skipped_ns.abs(),
    );
    Ok(())
}
