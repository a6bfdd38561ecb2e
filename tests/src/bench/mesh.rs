//! The mesh link's data plane against userspace WireGuard (boringtun) and a plain routed path,
//! on one two-cluster topology: a gateway node per cluster (the real agent in standalone mode,
//! a pod wired by the real weir-cni on each), joined by a WAN router namespace.
//!
//! ```text
//!  client pod ── gw west ── wan ── gw east ── server pod
//! ```
//!
//! Cases, in turn, several rounds over (a slow spell of the machine spreads over all of them):
//! - **plain**: the gateways route the other cluster's pod prefix through the WAN, no tunnel
//!   (the ceiling);
//! - **boringtun**: boringtun-cli on both gateways, the pod prefixes routed into it (the anchor);
//! - **mesh** in steps: the agents restarted with the data-plane flags of the step.
//!
//! Each case measures single-stream and 4-stream TCP (iperf3), UDP request/response
//! (sockperf, 2,000 requests a second, full round trips), the same while a bulk TCP flow runs, and the CPU of
//! both gateways (the agents, or the boringtun processes) per Gbit/s of single-stream TCP. The
//! more specific /24 routes of the plain and boringtun cases win over the agents' /16 routes
//! into the mesh TUN while they exist, so the agents keep running through those cases.
//!
//! `WEIR_BENCH_MESH_HOLD=<case number>` sets up one case and keeps it up for profiling by hand
//! (see [`hold_case`]); `WEIR_BENCH_MESH_CASES=<numbers>` runs only those cases besides boringtun
//! and the defaults (see [`selected`]).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    agent::Agent,
    cpu::CpuTime,
    mesh_pair::{
        EAST_NODE_PODS, EAST_PODS, MeshPair, Node, PairOptions, WEST_NODE_PODS, WEST_PODS,
        namespace_yaml,
    },
    netns::Netns,
    tcp,
};

const IPERF_PORT: &str = "5201";
const SOCKPERF_PORT: &str = "11111";
const WG_PORT: u16 = 51820;

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub tcp: Duration,
    pub rr: Duration,
}

/// A step of the mesh link: the agent flags that turn its features on.
#[derive(Clone, Copy, Debug)]
pub struct MeshStep {
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// The steps, one thing added at a time, up to the agent's defaults (the step without flags),
/// then trials of the defaults with one knob changed. The
/// steps before "+short slice" keep the kernel's default scheduler slice, so that step shows what
/// the slice changes.
pub const MESH_STEPS: &[MeshStep] = &[
    MeshStep {
        name: "mesh 1 packet/message",
        args: &[
            "--mesh-lanes",
            "1",
            "--mesh-offload",
            "false",
            "--mesh-batching",
            "false",
            "--mesh-latency-lane",
            "false",
            "--sched-slice-us",
            "0",
        ],
    },
    MeshStep {
        name: "mesh +batching",
        args: &[
            "--mesh-lanes",
            "1",
            "--mesh-offload",
            "false",
            "--mesh-latency-lane",
            "false",
            "--sched-slice-us",
            "0",
        ],
    },
    MeshStep {
        name: "mesh +offload",
        args: &[
            "--mesh-lanes",
            "1",
            "--mesh-latency-lane",
            "false",
            "--sched-slice-us",
            "0",
        ],
    },
    MeshStep {
        name: "mesh +lanes",
        args: &["--mesh-latency-lane", "false", "--sched-slice-us", "0"],
    },
    MeshStep {
        name: "mesh +short slice",
        args: &["--mesh-latency-lane", "false"],
    },
    MeshStep {
        name: "mesh +latency lane (default)",
        args: &[],
    },
    // Not a step: the defaults with one knob changed, to decide whether it should be the default.
    // HTTP/2's own frame size, the default before 1 MiB frames.
    MeshStep {
        name: "defaults, 16 KiB h2 frames",
        args: &["--mesh-h2-frame-bytes", "16384"],
    },
    // The gateway on the agent's shared runtime (`--mesh-own-thread false`), against the
    // default `auto`, which takes a thread of its own on a node with at most 2 CPUs (no wake-ups
    // of other runtime workers on a packet's path, one core for all of the gateway's lanes) and
    // the shared runtime on larger ones.
    MeshStep {
        name: "defaults, shared runtime",
        args: &["--mesh-own-thread", "false"],
    },
    // The XDP filter on the gateways' WAN veth in native mode (the default before `--xdp-mode
    // auto` chose generic on a veth): the WAN router's side of the veth loses TSO.
    MeshStep {
        name: "defaults, native XDP",
        args: &["--xdp-mode", "native"],
    },
    // A TUN of two queues, each read by a reader of its own (`--mesh-tun-queues`): the kernel
    // puts each flow on one queue, so tcp4's flows can be read on two cores.
    MeshStep {
        name: "defaults, 2 TUN queues",
        args: &["--mesh-tun-queues", "2"],
    },
];

#[derive(Clone, Copy, Debug)]
enum Case {
    Plain,
    Boringtun,
    Mesh(MeshStep),
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Plain => "plain routed veth".into(),
            Case::Boringtun => "boringtun".into(),
            Case::Mesh(step) => step.name.into(),
        }
    }
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let child = ns
        .command(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program} in {}", ns.name))?;
    Ok(Proc(child))
}

fn output(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = ns
        .command(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} in {}", ns.name))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed in {}: {}{}",
            args.join(" "),
            ns.name,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// boringtun-cli: `WEIR_BORINGTUN` (where `cargo xtask bench mesh` installed it), else the PATH.
fn boringtun_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("WEIR_BORINGTUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("boringtun-cli"));
    anyhow::ensure!(
        Command::new(&bin).arg("--version").output().is_ok(),
        "boringtun-cli is missing ({}): `cargo xtask bench mesh` installs it",
        bin.display()
    );
    Ok(bin)
}

/// One cluster: its gateway node and the agent running there.
/// (Fields drop in order: the agent stops before its node's namespace goes.)
struct Cluster {
    agent: Option<Agent>,
    /// The data-plane flags the running agent was started with.
    running: Option<&'static [&'static str]>,
    gateway: Node,
}

impl Cluster {
    fn ensure_agent(&mut self, step_args: &'static [&'static str]) {
        if self.running == Some(step_args) && self.agent.is_some() {
            return;
        }
        if let Some(agent) = self.agent.take() {
            agent.stop(nix::sys::signal::Signal::SIGTERM);
        }
        self.agent = Some(self.gateway.start_with(step_args));
        self.running = Some(step_args);
    }

    fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Agent::pid)
    }
}

/// boringtun on both gateways, peered over the WAN; stopped on drop.
struct Boringtun {
    procs: Vec<Proc>,
    /// The device on the west and on the east gateway. The UAPI socket is
    /// /var/run/wireguard/<name>.sock, shared by every namespace, so each name is unique on the
    /// machine.
    ifnames: [String; 2],
}

impl Boringtun {
    fn start(bin: &Path, west: &Netns, east: &Netns, work: &Path) -> anyhow::Result<Self> {
        let key = |name: &str| -> anyhow::Result<(PathBuf, String)> {
            let private = run_local("wg", &["genkey"], None)?;
            // Not <cluster>.key: that is the cluster's mesh key in the same directory.
            let path = work.join(format!("wg-{name}.key"));
            std::fs::write(&path, &private)?;
            let public = run_local("wg", &["pubkey"], Some(&private))?;
            Ok((path, public.trim().to_owned()))
        };
        let (west_key, west_pub) = key("west")?;
        let (east_key, east_pub) = key("east")?;
        let pid = std::process::id();
        let mut this = Self {
            procs: Vec::new(),
            ifnames: [format!("wgbw{pid}"), format!("wgbe{pid}")],
        };
        let sides = [
            (west, &west_key, &east_pub, "192.0.2.5", EAST_PODS),
            (east, &east_key, &west_pub, "192.0.2.1", WEST_PODS),
        ];
        for ((ns, own_key, peer_pub, peer_addr, allowed), ifname) in
            sides.into_iter().zip(this.ifnames.clone())
        {
            let child = ns
                .command(bin.to_str().expect("utf-8 path"))
                .args(["-f", "--disable-drop-privileges", "-l"])
                .arg(work.join(format!("{ifname}.log")))
                .arg(&ifname)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting boringtun-cli")?;
            this.procs.push(Proc(child));
            let socket = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline {
                    bail!("boringtun-cli did not open {}", socket.display());
                }
                thread::sleep(Duration::from_millis(20));
            }
            let port = WG_PORT.to_string();
            let endpoint = format!("{peer_addr}:{WG_PORT}");
            output(
                ns,
                "wg",
                &[
                    "set",
                    &ifname,
                    "private-key",
                    own_key.to_str().expect("utf-8 path"),
                    "listen-port",
                    &port,
                    "peer",
                    peer_pub,
                    "allowed-ips",
                    allowed,
                    "endpoint",
                    &endpoint,
                ],
            )?;
            // wg-quick's MTU: the WAN's 1500 less WireGuard's 80 bytes of overhead; pods learn
            // it by path MTU discovery, as they would in a real deployment.
            output(ns, "ip", &["link", "set", &ifname, "mtu", "1420", "up"])?;
        }
        Ok(this)
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

impl Drop for Boringtun {
    fn drop(&mut self) {
        self.procs.clear();
        for ifname in &self.ifnames {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        }
    }
}

fn run_local(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (apt-get install wireguard-tools)"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "{program} {} failed", args.join(" "));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything the bench created; all of it goes away on drop.
/// (Fields drop in order: the servers, the pods, the agents, then the WAN.)
struct Lab {
    _servers: Vec<Proc>,
    client: Netns,
    _server: Netns,
    server_ip: IpAddr,
    clusters: Vec<Cluster>,
    _wan: Netns,
}

fn lab() -> anyhow::Result<Lab> {
    let MeshPair {
        wan, west, east, ..
    } = MeshPair::new(&PairOptions {
        tag: "bm",
        domain: "mesh.bench",
        east_worker: false,
    });
    // The WAN knows the pod prefixes only for the plain case; the gateways route into it only
    // while that case runs.
    wan.ip(&["route", "add", WEST_NODE_PODS, "via", "192.0.2.1"]);
    wan.ip(&["route", "add", EAST_NODE_PODS, "via", "192.0.2.5"]);
    std::fs::write(west.manifests().join("ns.yaml"), namespace_yaml("shop"))?;
    std::fs::write(east.manifests().join("ns.yaml"), namespace_yaml("pay"))?;
    let mut clusters: Vec<Cluster> = [west, east]
        .into_iter()
        .map(|gateway| Cluster {
            agent: None,
            running: None,
            gateway,
        })
        .collect();
    let first = MESH_STEPS[0].args;
    for c in &mut clusters {
        c.ensure_agent(first);
    }
    let (client, _) = clusters[0].gateway.add_pod("client", "shop", "bmcl");
    let (server, server_ip) = clusters[1].gateway.add_pod("server", "pay", "bmsv");
    tcp::serve(&server, server_ip);
    let ip = server_ip.to_string();
    let servers = vec![
        spawn(&server, "iperf3", &["-s", "-B", &ip, "-p", IPERF_PORT])?,
        spawn(&server, "sockperf", &["sr", "-i", &ip, "-p", SOCKPERF_PORT])?,
    ];
    Ok(Lab {
        _servers: servers,
        client,
        _server: server,
        server_ip,
        clusters,
        _wan: wan,
    })
}

/// Waits until a TCP probe crosses from the client to the server.
fn wait_path(lab: &Lab, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tcp::connects(&lab.client, lab.server_ip) {
        if Instant::now() > deadline {
            bail!("{what}: no TCP path from the client pod to the server pod within 60 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Routes the two nodes' pod prefixes through `how` on both gateways (more specific than the
/// agents' routes into the mesh TUN), or removes those routes.
fn gateway_routes(lab: &Lab, how: Option<RouteVia<'_>>) -> anyhow::Result<()> {
    for (side, gw, remote, wan_hop) in [
        (
            0,
            &lab.clusters[0].gateway.netns,
            EAST_NODE_PODS,
            "192.0.2.2",
        ),
        (
            1,
            &lab.clusters[1].gateway.netns,
            WEST_NODE_PODS,
            "192.0.2.6",
        ),
    ] {
        match how {
            None => {
                let _ = output(gw, "ip", &["route", "del", remote]);
            }
            Some(RouteVia::Wan) => {
                output(gw, "ip", &["route", "replace", remote, "via", wan_hop])?;
            }
            Some(RouteVia::Devices(devs)) => {
                output(gw, "ip", &["route", "replace", remote, "dev", &devs[side]])?;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum RouteVia<'a> {
    Wan,
    /// The device on the west and on the east gateway.
    Devices(&'a [String; 2]),
}

/// Gbit/s of an iperf3 run from the client pod (`streams` parallel streams), as received.
fn iperf3(lab: &Lab, streams: u32, secs: f64) -> anyhow::Result<f64> {
    let run = || -> anyhow::Result<serde_json::Value> {
        let out = output(
            &lab.client,
            "iperf3",
            &[
                "-c",
                &lab.server_ip.to_string(),
                "-p",
                IPERF_PORT,
                "-t",
                &format!("{secs:.0}"),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        );
        // iperf3 reports errors (a busy server) in its JSON, with a failing exit status.
        let out = match out {
            Ok(o) => o,
            Err(e) => e.to_string(),
        };
        let start = out.find('{').unwrap_or(0);
        serde_json::from_str(&out[start..]).with_context(|| format!("iperf3's JSON: {out}"))
    };
    // The server may still be closing the previous case's bulk test (its client has exited, the
    // server's end of the control connection not yet): wait for it, within a bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    let json = loop {
        let json = run()?;
        let busy = json["error"]
            .as_str()
            .is_some_and(|e| e.contains("server is busy"));
        if !busy || Instant::now() > deadline {
            break json;
        }
        thread::sleep(Duration::from_millis(250));
    };
    let out = json.to_string();
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no end.sum_received in iperf3's output: {out}"))
}

/// Round-trip percentiles (p50, p99) in µs of sockperf request/response from the client pod
/// (2,000 requests a second, each answered).
fn sockperf(lab: &Lab, secs: f64) -> anyhow::Result<(f64, f64)> {
    let out = output(
        &lab.client,
        "sockperf",
        &[
            "ul",
            "-i",
            &lab.server_ip.to_string(),
            "-p",
            SOCKPERF_PORT,
            "-t",
            &format!("{secs:.0}"),
            "-m",
            "64",
            // Under-load mode at a fixed rate with a reply to every message: a lost message does
            // not stall the measurement (ping-pong waits for each reply, forever).
            "--mps",
            "2000",
            "--reply-every",
            "1",
            "--full-rtt",
        ],
    )?;
    let percentile = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (percentile("50.000"), percentile("99.000")) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("no percentiles in sockperf's output:\n{out}"),
    }
}

/// RR p99 in µs while a single-stream bulk flow runs.
fn rr_under_load(lab: &Lab, secs: f64) -> anyhow::Result<f64> {
    let bulk = spawn(
        &lab.client,
        "iperf3",
        &[
            "-c",
            &lab.server_ip.to_string(),
            "-p",
            IPERF_PORT,
            "-t",
            &format!("{:.0}", secs + 3.0),
        ],
    )?;
    // Let the bulk flow reach its rate before the requests start (a measurement offset).
    thread::sleep(Duration::from_secs(1));
    let result = sockperf(lab, secs);
    let mut bulk = bulk;
    let _ = bulk.0.wait();
    result.map(|(_, p99)| p99)
}

#[derive(Default)]
struct Measured {
    tcp1: Vec<f64>,
    tcp4: Vec<f64>,
    rr_p50: Vec<f64>,
    rr_p99: Vec<f64>,
    loaded_p99: Vec<f64>,
    /// Gateway cores per Gbit/s during the single-stream run.
    cpu_per_gbit: Vec<f64>,
    /// The share of that CPU spent in the kernel (syscalls, TCP, TUN).
    cpu_system_share: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn measure(lab: &Lab, pids: &[u32], d: Durations, into: &mut Measured) -> anyhow::Result<()> {
    let cpu = || {
        pids.iter().fold(CpuTime::default(), |acc, &p| {
            acc.plus(CpuTime::of_process(p))
        })
    };
    let (before, started) = (cpu(), Instant::now());
    let tcp1 = iperf3(lab, 1, d.tcp.as_secs_f64())?;
    let used = cpu().since(before);
    let wall = started.elapsed().as_secs_f64();
    into.tcp1.push(tcp1);
    let total = used.total().as_secs_f64();
    if !pids.is_empty() && tcp1 > 0.0 && total > 0.0 {
        into.cpu_per_gbit.push(total / wall / tcp1);
        into.cpu_system_share
            .push(used.system.as_secs_f64() / total);
    }
    into.tcp4.push(iperf3(lab, 4, d.tcp.as_secs_f64())?);
    // A round without latency samples (sockperf saw none) is left out of the medians, said.
    match sockperf(lab, d.rr.as_secs_f64()) {
        Ok((p50, p99)) => {
            into.rr_p50.push(p50);
            into.rr_p99.push(p99);
        }
        Err(e) => eprintln!("  warning: idle request/response not measured: {e:#}"),
    }
    match rr_under_load(lab, d.rr.as_secs_f64()) {
        Ok(p99) => into.loaded_p99.push(p99),
        Err(e) => eprintln!("  warning: request/response under load not measured: {e:#}"),
    }
    Ok(())
}

pub fn run(rounds: usize, d: Durations) -> anyhow::Result<()> {
    for tool in ["iperf3", "sockperf", "wg"] {
        anyhow::ensure!(
            Command::new(tool).arg("--version").output().is_ok()
                || Command::new(tool).arg("--help").output().is_ok(),
            "{tool} is missing: `cargo xtask setup` installs it (iperf3, sockperf, wireguard-tools)"
        );
    }
    let boringtun = boringtun_bin()?;
    let mut lab = lab()?;
    wait_path(&lab, "the mesh link")?;
    let work = lab.clusters[0].gateway.dirs.root.clone();
    let wg = Boringtun::start(
        &boringtun,
        &lab.clusters[0].gateway.netns,
        &lab.clusters[1].gateway.netns,
        &work,
    )?;
    let mut cases = vec![Case::Plain, Case::Boringtun];
    cases.extend(MESH_STEPS.iter().copied().map(Case::Mesh));
    if let Ok(hold) = std::env::var("WEIR_BENCH_MESH_HOLD") {
        return hold_case(&mut lab, &wg, &cases, &hold);
    }
    let cases = selected(cases)?;
    println!(
        "mesh link: pod → gateway → WAN → gateway → pod ({rounds} rounds over the cases; per case and round: iperf3 {:?} with 1 and 4 streams, sockperf request/response {:?} idle and under a bulk flow)",
        d.tcp, d.rr
    );
    let mut results: Vec<Measured> = cases.iter().map(|_| Measured::default()).collect();
    for round in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            // The agents keep running through plain and boringtun, and their XDP filter on the
            // gateways' WAN veth is on those paths too: the agents with the defaults, so the
            // anchors do not depend on which step ran last.
            if matches!(case, Case::Plain | Case::Boringtun) {
                for c in &mut lab.clusters {
                    c.ensure_agent(&[]);
                }
            }
            let pids: Vec<u32> = match case {
                Case::Plain => {
                    gateway_routes(&lab, Some(RouteVia::Wan))?;
                    Vec::new()
                }
                Case::Boringtun => {
                    gateway_routes(&lab, Some(RouteVia::Devices(&wg.ifnames)))?;
                    wg.pids()
                }
                Case::Mesh(step) => {
                    gateway_routes(&lab, None)?;
                    for c in &mut lab.clusters {
                        c.ensure_agent(step.args);
                    }
                    lab.clusters.iter().filter_map(Cluster::agent_pid).collect()
                }
            };
            wait_path(&lab, &case.name())?;
            measure(&lab, &pids, d, &mut results[i])
                .with_context(|| format!("round {round}, case {}", case.name()))?;
            // Each round's values too: the medians hide how far a busy machine spreads them.
            eprintln!(
                "  round {} {:<28} tcp1 {:.2} Gbit/s, rr p50 {:.1} µs",
                round + 1,
                case.name(),
                results[i].tcp1.last().copied().unwrap_or_default(),
                results[i].rr_p50.last().copied().unwrap_or_default()
            );
        }
    }
    gateway_routes(&lab, None)?;
    drop(wg);
    report(&cases, &results);
    drop(lab);
    Ok(())
}

/// The cases `WEIR_BENCH_MESH_CASES` names (case numbers, comma-separated, as for
/// `WEIR_BENCH_MESH_HOLD`; boringtun and the defaults always run, for the ratios), else all:
/// shorter runs while trying one change.
fn selected(cases: Vec<Case>) -> anyhow::Result<Vec<Case>> {
    let Ok(list) = std::env::var("WEIR_BENCH_MESH_CASES") else {
        return Ok(cases);
    };
    let defaults = cases
        .iter()
        .position(|c| matches!(c, Case::Mesh(step) if step.args.is_empty()))
        .expect("a mesh step with the defaults");
    let mut wanted = std::collections::BTreeSet::from([1, defaults]);
    for n in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let i = n
            .parse::<usize>()
            .ok()
            .filter(|&i| i < cases.len())
            .with_context(|| {
                format!(
                    "WEIR_BENCH_MESH_CASES: {n} is not a case number below {}",
                    cases.len()
                )
            })?;
        wanted.insert(i);
    }
    Ok(cases
        .into_iter()
        .enumerate()
        .filter(|(i, _)| wanted.contains(i))
        .map(|(_, c)| c)
        .collect())
}

/// Sets up case number `which` (0 plain, 1 boringtun, then the mesh steps) and keeps it up,
/// printing the namespaces and processes, until a line arrives on stdin: for profiling one
/// case by hand (strace, perf, sockperf ping-pong) on the bench's own topology.
fn hold_case(lab: &mut Lab, wg: &Boringtun, cases: &[Case], which: &str) -> anyhow::Result<()> {
    let case = which
        .parse::<usize>()
        .ok()
        .and_then(|i| cases.get(i).copied())
        .with_context(|| {
            format!(
                "WEIR_BENCH_MESH_HOLD={which}: a case number below {}",
                cases.len()
            )
        })?;
    let pids: Vec<u32> = match case {
        Case::Plain => {
            gateway_routes(lab, Some(RouteVia::Wan))?;
            Vec::new()
        }
        Case::Boringtun => {
            gateway_routes(lab, Some(RouteVia::Devices(&wg.ifnames)))?;
            wg.pids()
        }
        Case::Mesh(step) => {
            for c in &mut lab.clusters {
                c.ensure_agent(step.args);
            }
            lab.clusters.iter().filter_map(Cluster::agent_pid).collect()
        }
    };
    wait_path(lab, &case.name())?;
    println!(
        "holding {}: client pod netns {}, server {} (iperf3 :{IPERF_PORT}, sockperf :{SOCKPERF_PORT}), gateways {} {}, processes {pids:?}; press Enter to end",
        case.name(),
        lab.client.name,
        lab.server_ip,
        lab.clusters[0].gateway.netns.name,
        lab.clusters[1].gateway.netns.name,
    );
    // Each further non-empty line is a shell command run in the client pod from here, so the
    // load generator shares the agents' scheduling group as in the bench's own measurements.
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 && !line.trim().is_empty() {
        let out = lab
            .client
            .command("sh")
            .args(["-c", line.trim()])
            .output()?;
        print!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("-- done: {}", line.trim());
        line.clear();
    }
    gateway_routes(lab, None)?;
    Ok(())
}

fn report(cases: &[Case], results: &[Measured]) {
    println!(
        "  {:<28} {:>10} {:>10} {:>10} {:>10} {:>14} {:>12} {:>8}",
        "case",
        "tcp1 Gb/s",
        "tcp4 Gb/s",
        "rr p50 µs",
        "rr p99 µs",
        "bulk rr p99 µs",
        "cores/Gbit",
        "kernel"
    );
    for (case, m) in cases.iter().zip(results) {
        let (cpu, kernel) = if m.cpu_per_gbit.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.2}", median(&m.cpu_per_gbit)),
                format!("{:.0} %", 100.0 * median(&m.cpu_system_share)),
            )
        };
        println!(
            "  {:<28} {:>10.2} {:>10.2} {:>10.1} {:>10.1} {:>14.1} {:>12} {:>8}",
            case.name(),
            median(&m.tcp1),
            median(&m.tcp4),
            median(&m.rr_p50),
            median(&m.rr_p99),
            median(&m.loaded_p99),
            cpu,
            kernel
        );
    }
    let anchor = cases
        .iter()
        .zip(results)
        .find(|(c, _)| matches!(c, Case::Boringtun))
        .map(|(_, m)| m)
        .expect("the boringtun case always runs");
    println!(
        "ratios against boringtun (must: tcp1 >= 3x, rr p50 <= 1.5x; goal: tcp1 >= 6x, rr p50 <= 1.2x; bulk rr p99 <= 2 ms):"
    );
    for (case, m) in cases
        .iter()
        .zip(results)
        .filter(|(c, _)| matches!(c, Case::Mesh(_)))
    {
        println!(
            "  {:<28} tcp1 {:.2}x  tcp4 {:.2}x  rr p50 {:.2}x  rr p99 {:.2}x",
            case.name(),
            median(&m.tcp1) / median(&anchor.tcp1),
            median(&m.tcp4) / median(&anchor.tcp4),
            median(&m.rr_p50) / median(&anchor.rr_p50),
            median(&m.rr_p99) / median(&anchor.rr_p99),
        );
    }
    let last = cases
        .iter()
        .zip(results)
        .find(|(c, _)| matches!(c, Case::Mesh(step) if step.args.is_empty()))
        .map(|(_, m)| m)
        .expect("a mesh step with the defaults");
    println!(
        "mesh: tcp1 {:.2}x boringtun, rr_p50 {:.2}x boringtun",
        median(&last.tcp1) / median(&anchor.tcp1),
        median(&last.rr_p50) / median(&anchor.rr_p50)
    );
}
