//! Drop rate of a flood of denied packets from another node, at a pod whose policy denies the
//! sender, and the CPU it costs: with `weir_xdp` on the node's uplink, with Weir's tc programs only
//! (the drop happens at `weir_to_pod`, after the node routed the packet), and with an iptables
//! `raw` PREROUTING drop rule. Two senders:
//!
//! - a UDP socket in the remote node (as the lab's traffic arrives): the sender's kernel builds
//!   the skb before the uplink sees it, so XDP can save only the node's routing and tc hook;
//! - XDP frames from the kernel's live-frames generator (`xdp_frames`), as from a NIC driver with
//!   native XDP: no skb exists until the node builds one, which `weir_xdp` avoids for what it
//!   drops.
//!
//! Per case: packets dropped per second, the CPU of the whole machine (every CPU, the sender
//! included, which does the same work in every case of one sender) and of softirq processing
//! (where the uplink's receive path runs) from /proc/stat, drops per CPU-second of each, and the
//! request/response rate and latency of an allowed UDP flow from the same node during the flood
//! against the same flow without a flood. The cases run in turn, several rounds over; each case
//! reports its round with the median drops per machine CPU-second.
//!
//! Topology: remote node ns ── veth (`uplink` on the node) ── node ns ── veth ── server pod ns.

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

/// Where the flood comes from.
#[derive(Clone, Copy, PartialEq)]
enum Sender {
    /// A UDP socket in the remote node: skbs built by the sender's kernel.
    Socket,
    /// The kernel's live-frames generator: XDP frames, no skb (`xdp_frames`).
    Frames,
}

/// What drops the flood.
#[derive(Clone, Copy, PartialEq)]
enum Filter {
    Xdp,
    TcOnly,
    IptablesRaw,
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// No flood, Weir with XDP on the uplink: the allowed flow's baseline.
    NoFlood,
    Flood(Sender, Filter),
}

impl Case {
    fn name(self) -> String {
        let (sender, filter) = match self {
            Case::NoFlood => return "no flood (weir, XDP)".to_owned(),
            Case::Flood(sender, filter) => (sender, filter),
        };
        let sender = match sender {
            Sender::Socket => "socket",
            Sender::Frames => "xdp frames",
        };
        let filter = match filter {
            Filter::Xdp => "weir, XDP on the uplink",
            Filter::TcOnly => "weir, tc only",
            Filter::IptablesRaw => "iptables raw DROP",
        };
        format!("{sender}: {filter}")
    }
}

/// Softirq time of the whole machine so far (/proc/stat, all CPUs), where the uplink's receive
/// path runs: in the sender's context when it enables bottom halves, or in ksoftirqd.
fn softirq_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// The MAC address of `dev` in `netns`.
fn mac(netns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = netns.ip(&["-o", "link", "show", "dev", dev]);
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no MAC address for {dev}: {out}"))?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// The flood's frame as the remote node would send it to the node: to the uplink's MAC, from
/// the flooder to the server's flood port, 64 bytes, with a valid IPv4 checksum (the node's stack
/// checks it before it routes).
fn flood_frame(t: &Topology) -> anyhow::Result<Vec<u8>> {
    let mut frame = crate::packet::with_ipv4_checksum(crate::packet::frame(
        FLOODER.parse()?,
        SERVER.parse()?,
        PROTO_UDP,
        &crate::packet::udp_datagram(40000, FLOOD_PORT, &[0; 22]),
    ));
    frame[..6].copy_from_slice(&mac(&t.node, "uplink")?);
    frame[6..12].copy_from_slice(&mac(&t.remote, "eth0")?);
    Ok(frame)
}

/// Floods the server with XDP frames from the remote node for `secs`; returns the frames sent.
fn flood_frames(t: &Topology, frame: Vec<u8>, secs: u64) -> thread::JoinHandle<u64> {
    spawn_in(t.remote.path(), move || {
        let ifindex = nix::net::if_::if_nametoindex("eth0").expect("the remote's eth0");
        super::xdp_frames::generate(ifindex, &frame, secs).expect("the XDP frame generator")
    })
}

struct Measured {
    sent: u64,
    dropped: u64,
    elapsed: Duration,
    /// Busy CPU of the whole machine.
    cpu: Duration,
    softirq: Duration,
    allowed: Vec<Duration>,
}

impl Measured {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
    fn drop_rate(&self) -> f64 {
        self.dropped as f64 / self.secs()
    }
    fn per_cpu_second(&self, cpu: Duration) -> f64 {
        self.dropped as f64 / cpu.as_secs_f64().max(1e-3)
    }
    fn allowed_rate(&self) -> f64 {
        self.allowed.len() as f64 / self.secs()
    }
}

fn measure(t: &Topology, case: Case, frame: &[u8], secs: u64) -> anyhow::Result<Measured> {
    // Frames reach the uplink only while it runs NAPI, i.e. has an XDP program.
    let pass = match case {
        Case::Flood(Sender::Frames, Filter::TcOnly | Filter::IptablesRaw) => {
            Some(super::xdp_frames::PassProgram::attach(&t.node, "uplink")?)
        }
        _ => None,
    };
    let weir = match case {
        Case::NoFlood | Case::Flood(_, Filter::Xdp) => Some(weir(&t.node, true)?),
        Case::Flood(_, Filter::TcOnly) => Some(weir(&t.node, false)?),
        Case::Flood(_, Filter::IptablesRaw) => {
            iptables_raw(&t.node, "-A")?;
            None
        }
    };
    let dropped = |w: &Option<Weir>| match (case, w) {
        (Case::NoFlood, _) => 0,
        (Case::Flood(_, Filter::Xdp), Some(w)) => w.dp.counter(REASON_XDP_POLICY_DENIED),
        (Case::Flood(_, Filter::TcOnly), Some(w)) => w.dp.counter(REASON_POLICY_DENIED),
        _ => iptables_raw_dropped(&t.node),
    };
    let before = dropped(&weir);
    let (cpu_before, softirq_before, started) =
        (CpuTime::machine(), softirq_time(), Instant::now());
    let flooder = match case {
        Case::NoFlood => None,
        Case::Flood(Sender::Socket, _) => Some(flood(&t.remote, secs)),
        Case::Flood(Sender::Frames, _) => Some(flood_frames(t, frame.to_vec(), secs)),
    };
    let allowed = allowed_rr(&t.remote, secs);
    let sent = match flooder {
        Some(f) => f.join().expect("flooder panicked"),
        None => 0,
    };
    let allowed = allowed.join().expect("allowed client panicked");
    let (elapsed, cpu, softirq) = (
        started.elapsed(),
        CpuTime::machine().since(cpu_before).total(),
        softirq_time().saturating_sub(softirq_before),
    );
    let dropped = dropped(&weir) - before;
    drop(weir);
    drop(pass);
    if matches!(case, Case::Flood(_, Filter::IptablesRaw)) {
        iptables_raw(&t.node, "-D")?;
    }
    Ok(Measured {
        sent,
        dropped,
        elapsed,
        cpu,
        softirq,
        allowed,
    })
}

const ROUNDS: usize = 3;
const CASES: [Case; 7] = [
    Case::NoFlood,
    Case::Flood(Sender::Socket, Filter::TcOnly),
    Case::Flood(Sender::Socket, Filter::Xdp),
    Case::Flood(Sender::Socket, Filter::IptablesRaw),
    Case::Flood(Sender::Frames, Filter::TcOnly),
    Case::Flood(Sender::Frames, Filter::Xdp),
    Case::Flood(Sender::Frames, Filter::IptablesRaw),
];

pub fn run(secs: u64) -> anyhow::Result<()> {
    let t = topology();
    start_echo(&t.server);
    let frame = flood_frame(&t)?;
    println!(
        "a flood of denied UDP packets from another node at a pod ({ROUNDS} rounds over the cases, {secs} s each), with an allowed UDP request/response flow from the same node; CPU from /proc/stat (all CPUs; softirq: the receive path):"
    );
    let mut results: Vec<Vec<Measured>> = CASES.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (i, case) in CASES.iter().enumerate() {
            results[i].push(measure(&t, *case, &frame, secs)?);
        }
    }
    // Per case: the round with the median drops per machine CPU-second, and the allowed flow's
    // pooled samples and median rate.
    struct Row {
        case: Case,
        m: Measured,
        allowed_rate: f64,
        allowed_p50: Duration,
    }
    let mut rows = Vec::new();
    for (case, mut rounds) in CASES.iter().zip(results) {
        let mut allowed_rates: Vec<f64> = rounds.iter().map(Measured::allowed_rate).collect();
        allowed_rates.sort_by(f64::total_cmp);
        let allowed = Samples::new(rounds.iter().flat_map(|m| m.allowed.clone()).collect());
        rounds.sort_by(|a, b| a.per_cpu_second(a.cpu).total_cmp(&b.per_cpu_second(b.cpu)));
        let m = rounds.swap_remove(rounds.len() / 2);
        let row = Row {
            case: *case,
            allowed_rate: allowed_rates[allowed_rates.len() / 2],
            allowed_p50: allowed.percentile(50.0),
            m,
        };
        let m = &row.m;
        println!(
            "  {:<34} dropped {:>9.0} pps of {:>9.0} sent   CPU {:>4.2} cores (softirq {:>4.2})   drops per CPU-second {:>9.0} (per softirq CPU-second {:>9.0})   allowed {:>6.0} rr/s p50 {:>9} p99 {:>9}",
            case.name(),
            m.drop_rate(),
            m.sent as f64 / m.secs(),
            m.cpu.as_secs_f64() / m.secs(),
            m.softirq.as_secs_f64() / m.secs(),
            m.per_cpu_second(m.cpu),
            m.per_cpu_second(m.softirq),
            row.allowed_rate,
            us(row.allowed_p50),
            us(allowed.percentile(99.0)),
        );
        rows.push(row);
    }
    let quiet = &rows[0];
    println!(
        "ratios against weir, tc only, with the same sender (goal: XDP drops >= 3x per CPU-second, allowed traffic unaffected); allowed flow against no flood:"
    );
    for sender in [Sender::Socket, Sender::Frames] {
        let Some(tc) = rows
            .iter()
            .find(|r| r.case == Case::Flood(sender, Filter::TcOnly))
        else {
            continue;
        };
        println!(
            "  {:<34} allowed rr/s {:.2}x",
            tc.case.name(),
            tc.allowed_rate / quiet.allowed_rate
        );
        for filter in [Filter::Xdp, Filter::IptablesRaw] {
            let Some(r) = rows.iter().find(|r| r.case == Case::Flood(sender, filter)) else {
                continue;
            };
            println!(
                "  {:<34} drops per CPU-second {:.2}x (per softirq CPU-second {:.2}x)   drop rate {:.2}x   allowed rr/s {:.2}x, p50 {:.2}x",
                r.case.name(),
                r.m.per_cpu_second(r.m.cpu) / tc.m.per_cpu_second(tc.m.cpu),
                r.m.per_cpu_second(r.m.softirq) / tc.m.per_cpu_second(tc.m.softirq),
                r.m.drop_rate() / tc.m.drop_rate(),
                r.allowed_rate / quiet.allowed_rate,
                r.allowed_p50.as_secs_f64() / quiet.allowed_p50.as_secs_f64(),
            );
        }
    }
    Ok(())
}
