//! Drop rate of a flood of denied packets from another node, at a pod whose policy denies the
//! sender: with `weir_xdp` on the node's uplink, with Weir's tc programs only (the drop happens at
//! `weir_to_pod`, after the node routed the packet), and with an iptables `raw` PREROUTING drop
//! rule. Per case: packets dropped per second, the machine's CPU time per dropped packet (all
//! CPUs, sender included: its share is the same in every case), and the UDP round-trip latency
//! of an allowed flow from the same node during the flood.
//!
//! Topology: remote node ns ── veth (`uplink` on the node) ── node ns ── veth ── server pod ns.
//! The uplink is a veth, as in the lab: the sender's kernel built the skb already, so XDP saves
//! the node's routing and the tc hook, not the skb allocation a physical NIC's driver would.

use std::{
    fs::File,
    net::UdpSocket,
    os::fd::AsFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use nix::sched::{CloneFlags, setns};
use weir_agent::datapath::attach::{Programs, attach_endpoint, detach_endpoint};
use weir_common::{
    DIR_INGRESS, PROG_XDP, PROTO_UDP, REASON_POLICY_DENIED, REASON_XDP_POLICY_DENIED,
    SUBJECT_ISOLATED_INGRESS,
};

use super::stats::{Samples, us};
use crate::{
    cpu::CpuTime,
    netns::{Netns, spawn_in},
    testrun::{Datapath, Ports},
};

const FLOODER: &str = "10.78.0.2";
const ALLOWED: &str = "10.78.0.3";
const SERVER: &str = "10.78.2.2";
const ECHO_PORT: u16 = 7000;
const FLOOD_PORT: u16 = 7001;
const FLOODER_ID: u32 = 2000;
const ALLOWED_ID: u32 = 2001;
const SERVER_ID: u32 = 2002;

struct Topology {
    remote: Netns,
    node: Netns,
    server: Netns,
}

fn topology() -> Topology {
    let t = Topology {
        remote: Netns::new("xr"),
        node: Netns::new("xn"),
        server: Netns::new("xs"),
    };
    t.node.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &t.remote.name,
    ]);
    t.node.ip(&["addr", "add", "10.78.0.1/24", "dev", "uplink"]);
    t.node.ip(&["link", "set", "uplink", "up"]);
    t.remote.ip(&["addr", "add", "10.78.0.2/24", "dev", "eth0"]);
    t.remote.ip(&["addr", "add", "10.78.0.3/24", "dev", "eth0"]);
    t.remote.ip(&["link", "set", "eth0", "up"]);
    t.remote
        .ip(&["route", "add", "10.78.2.0/24", "via", "10.78.0.1"]);
    t.node.ip(&[
        "link",
        "add",
        "vs",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &t.server.name,
    ]);
    t.node.ip(&["addr", "add", "10.78.2.1/24", "dev", "vs"]);
    t.node.ip(&["link", "set", "vs", "up"]);
    t.server.ip(&["addr", "add", "10.78.2.2/24", "dev", "eth0"]);
    t.server.ip(&["link", "set", "eth0", "up"]);
    t.server
        .ip(&["route", "add", "default", "via", "10.78.2.1"]);
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

/// Weir's programs on the server's veth (and `weir_xdp` on the uplink), the server admitting
/// only the allowed peer; taken off on drop.
struct Weir {
    dp: Datapath,
    node_path: String,
}

impl Drop for Weir {
    fn drop(&mut self) {
        // The XDP link goes with the loaded object; tc filters stay unless taken off.
        let _ = spawn_in(self.node_path.clone(), || detach_endpoint("vs")).join();
    }
}

fn weir(node: &Netns, xdp: bool) -> anyhow::Result<Weir> {
    let node_path = node.path();
    thread::spawn(move || -> anyhow::Result<Weir> {
        setns(File::open(&node_path)?.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let mut dp = Datapath::new();
        let ifindex = nix::net::if_::if_nametoindex("vs")?;
        dp.endpoint(SERVER, ifindex, SERVER_ID);
        dp.ipcache(SERVER, 32, SERVER_ID);
        dp.ipcache(FLOODER, 32, FLOODER_ID);
        dp.ipcache(ALLOWED, 32, ALLOWED_ID);
        dp.subject(SERVER_ID, 1, SUBJECT_ISOLATED_INGRESS);
        dp.allow(
            SERVER_ID,
            1,
            DIR_INGRESS,
            ALLOWED_ID,
            Some(PROTO_UDP),
            Ports::One(ECHO_PORT),
            1,
        );
        attach_endpoint(&Programs::from_ebpf(&dp.ebpf)?, "vs")?;
        if xdp {
            let program: &mut Xdp = dp
                .ebpf
                .program_mut(PROG_XDP)
                .ok_or_else(|| anyhow::anyhow!("no {PROG_XDP}"))?
                .try_into()?;
            program.attach("uplink", XdpMode::Driver)?;
        }
        Ok(Weir { dp, node_path })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("attaching panicked"))?
}

fn iptables_raw(node: &Netns, op: &str) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables", "-t", "raw", op])
        .args(["PREROUTING", "-s", FLOODER, "-j", "DROP"])
        .status()?;
    anyhow::ensure!(status.success(), "iptables -t raw {op} failed");
    Ok(())
}

/// Packets the iptables raw rule dropped so far.
fn iptables_raw_dropped(node: &Netns) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables", "-t", "raw"])
        .args(["-L", "PREROUTING", "-v", "-x", "-n"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .find(|l| l.contains("DROP") && l.contains(FLOODER))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// UDP echo in the server pod; runs until the process ends.
fn start_echo(server: &Netns) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(server.path(), move || {
        let udp = UdpSocket::bind((SERVER, ECHO_PORT)).expect("binding UDP");
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    ready_rx.recv().expect("echo server did not start");
}

/// Floods the server from the flooder's address for `secs`; returns the packets sent.
fn flood(remote: &Netns, secs: u64) -> thread::JoinHandle<u64> {
    spawn_in(remote.path(), move || {
        let sock = UdpSocket::bind((FLOODER, 0)).expect("binding the flooder");
        sock.connect((SERVER, FLOOD_PORT)).expect("connecting");
        let msg = [0u8; 64];
        let until = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        while Instant::now() < until {
            for _ in 0..256 {
                if sock.send(&msg).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
}

/// Round trips of the allowed flow for `secs` (those without a reply within 200 ms are left out).
fn allowed_rr(remote: &Netns, secs: u64) -> thread::JoinHandle<Vec<Duration>> {
    spawn_in(remote.path(), move || {
        let sock = UdpSocket::bind((ALLOWED, 0)).expect("binding the allowed client");
        sock.connect((SERVER, ECHO_PORT)).expect("connecting");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let (msg, mut buf) = ([7u8; 64], [0u8; 128]);
        let until = Instant::now() + Duration::from_secs(secs);
        let mut samples = Vec::new();
        while Instant::now() < until {
            let started = Instant::now();
            if sock.send(&msg).is_ok() && sock.recv(&mut buf).is_ok() {
                samples.push(started.elapsed());
            }
        }
        samples
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Xdp,
    TcOnly,
    IptablesRaw,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Xdp => "weir, XDP on the uplink",
            Case::TcOnly => "weir, tc only",
            Case::IptablesRaw => "iptables raw DROP",
        }
    }
}

struct Measured {
    sent: u64,
    dropped: u64,
    elapsed: Duration,
    cpu: Duration,
    allowed: Vec<Duration>,
}

fn measure(t: &Topology, case: Case, secs: u64) -> anyhow::Result<Measured> {
    let weir = match case {
        Case::Xdp => Some(weir(&t.node, true)?),
        Case::TcOnly => Some(weir(&t.node, false)?),
        Case::IptablesRaw => {
            iptables_raw(&t.node, "-A")?;
            None
        }
    };
    let dropped = |w: &Option<Weir>| match (case, w) {
        (Case::Xdp, Some(w)) => w.dp.counter(REASON_XDP_POLICY_DENIED),
        (Case::TcOnly, Some(w)) => w.dp.counter(REASON_POLICY_DENIED),
        _ => iptables_raw_dropped(&t.node),
    };
    let before = dropped(&weir);
    let (cpu_before, started) = (CpuTime::machine(), Instant::now());
    let flooder = flood(&t.remote, secs);
    let allowed = allowed_rr(&t.remote, secs);
    let sent = flooder.join().expect("flooder panicked");
    let allowed = allowed.join().expect("allowed client panicked");
    let (elapsed, cpu) = (
        started.elapsed(),
        CpuTime::machine().since(cpu_before).total(),
    );
    let dropped = dropped(&weir) - before;
    drop(weir);
    if case == Case::IptablesRaw {
        iptables_raw(&t.node, "-D")?;
    }
    Ok(Measured {
        sent,
        dropped,
        elapsed,
        cpu,
        allowed,
    })
}

const ROUNDS: usize = 3;
const CASES: [Case; 3] = [Case::TcOnly, Case::Xdp, Case::IptablesRaw];

pub fn run(secs: u64) -> anyhow::Result<()> {
    let t = topology();
    start_echo(&t.server);
    println!(
        "a flood of denied UDP packets from another node at a pod ({ROUNDS} rounds over the cases, {secs} s each), with an allowed UDP request/response flow from the same node:"
    );
    let mut results: Vec<Vec<Measured>> = CASES.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (i, case) in CASES.iter().enumerate() {
            results[i].push(measure(&t, *case, secs)?);
        }
    }
    // Per case: the round with the median drop rate, and the allowed flow's pooled samples.
    let mut rows = Vec::new();
    for (case, mut rounds) in CASES.iter().zip(results) {
        let rate = |m: &Measured| m.dropped as f64 / m.elapsed.as_secs_f64();
        rounds.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        let allowed = Samples::new(rounds.iter().flat_map(|m| m.allowed.clone()).collect());
        let m = &rounds[rounds.len() / 2];
        let cpu_ns = m.cpu.as_nanos() as f64 / m.dropped.max(1) as f64;
        println!(
            "  {:<26} dropped {:>9.0} pps of {:>9.0} sent   machine CPU {:>6.0} ns per dropped packet   allowed rr p50 {:>9} p99 {:>9}",
            case.name(),
            rate(m),
            m.sent as f64 / m.elapsed.as_secs_f64(),
            cpu_ns,
            us(allowed.percentile(50.0)),
            us(allowed.percentile(99.0)),
        );
        rows.push((case.name(), rate(m), cpu_ns, allowed.percentile(50.0)));
    }
    let (_, base_rate, base_cpu, base_p50) = rows[0];
    println!("ratios against weir, tc only (goal: XDP drop rate >= 3x at equal CPU):");
    for (name, rate, cpu, p50) in &rows[1..] {
        println!(
            "  {name:<26} drop rate {:.2}x   CPU per dropped packet {:.2}x   allowed rr p50 {:.2}x",
            rate / base_rate,
            cpu / base_cpu,
            p50.as_secs_f64() / base_p50.as_secs_f64()
        );
    }
    Ok(())
}
