//! Drop rate of a flood of denied packets from another node, at a pod whose policy denies the
//! sender, and the CPU it costs: with `weir_xdp` on the node's uplink, with Weir's tc programs only
//! (the drop happens at `weir_to_pod`, after the node routed the packet), and with an iptables
//! `raw` PREROUTING drop rule. Two senders:
//!
//! - a UDP socket in the remote node (as the lab's traffic arrives): the sender's kernel builds
//!   the skb before the uplink sees it, so XDP can save only the node's routing and tc hook;
//! - the same socket's packets redirected by XDP inside the remote node (`xdp_frames`), so they
//!   reach the node's uplink as XDP frames, as from a NIC driver with native XDP: no skb exists
//!   on the node until it builds one, which `weir_xdp` avoids for what it drops.
//!
//! A third filter, `XDP_DROP` of everything on the uplink, is the floor: the sender's cost and the
//! least possible receive work. Each case's CPU per dropped packet above the floor is the node's
//! share, and the XDP filter's goal is about that share. (With the socket sender the floor also
//! pays for the veth turning each skb into an XDP buffer, which the tc-only path without an XDP
//! program does not: there the node's share of tc is understated.)
//!
//! Per case: packets dropped per second, the CPU the flood cost (the flooder thread, whose sends
//! run the uplink's receive path in their context when they re-enable bottom halves, plus the
//! ksoftirqd threads, where the rest of it is deferred; the sender's own share is the same in
//! every case of one sender, so the machine's other load does not count), drops per CPU-second,
//! and the request/response rate and latency of an allowed UDP flow from the same node during the
//! flood against the same flow without a flood. The cases run in turn, several rounds over; each case
//! reports its round with the median drops per machine CPU-second. With
//! `WEIR_BENCH_PREVIOUS_EBPF=<path to another weir-ebpf object>` that object's `weir_xdp` floods
//! too, right after this build's in every round, for a same-run comparison of a change.
//!
//! Topology: remote node ns ── veth (`uplink` on the node) ── node ns ── veth ── server pod ns.

use std::{
    fs::File,
    net::UdpSocket,
    os::fd::{AsFd, AsRawFd},
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

use super::{
    stats::{Samples, us},
    xdp_frames::{GEN_DEVICE, RedirectHop, XdpLink},
};
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

/// Weir with `weir_xdp` on the uplink if `xdp`, from the kernel object `previous` if given (else
/// this build's).
fn weir(node: &Netns, xdp: bool, previous: Option<&'static [u8]>) -> anyhow::Result<Weir> {
    let node_path = node.path();
    thread::spawn(move || -> anyhow::Result<Weir> {
        setns(File::open(&node_path)?.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let mut dp = match previous {
            Some(object) => Datapath::from_object(object)?,
            None => Datapath::new(),
        };
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

/// Floods the server from the flooder's address for `secs`, out of `device` if given (else as
/// routed); returns the packets sent.
/// The calling thread's CPU time (user and system; system includes the softirq work the kernel
/// does in its context when it re-enables bottom halves after a send).
fn thread_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u
    };
    let t =
        |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU time of the ksoftirqd threads so far: the softirq work deferred out of the senders'
/// context.
fn ksoftirqd_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .map(|pid| CpuTime::of_process(pid).total())
        .sum()
}

fn flood(
    remote: &Netns,
    device: Option<&'static str>,
    secs: u64,
) -> thread::JoinHandle<(u64, Duration)> {
    spawn_in(remote.path(), move || {
        let sock = UdpSocket::bind((FLOODER, 0)).expect("binding the flooder");
        if let Some(device) = device {
            // SAFETY: the option value is `device`'s bytes, of the length passed.
            let ret = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    device.as_ptr().cast(),
                    device.len() as libc::socklen_t,
                )
            };
            assert_eq!(ret, 0, "binding the flooder to {device}");
        }
        sock.connect((SERVER, FLOOD_PORT)).expect("connecting");
        let msg = [0u8; 64];
        let cpu_before = thread_cpu();
        let until = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        while Instant::now() < until {
            for _ in 0..256 {
                if sock.send(&msg).is_ok() {
                    sent += 1;
                }
            }
        }
        (sent, thread_cpu().saturating_sub(cpu_before))
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
    /// The same socket through an XDP redirect in the remote node: the uplink receives XDP
    /// frames, no skb (`xdp_frames`).
    Frames,
}

/// What drops the flood.
#[derive(Clone, Copy, PartialEq)]
enum Filter {
    /// `XDP_DROP` of everything on the uplink (two instructions): the floor, what the sender and
    /// the least possible receive work cost, subtracted from the others to get the node's share.
    Floor,
    Xdp,
    /// `weir_xdp` of the object in `WEIR_BENCH_PREVIOUS_EBPF`: a same-run comparison of a change.
    XdpPrevious,
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
            Filter::XdpPrevious => "previous build's XDP",
            Filter::TcOnly => "weir, tc only",
            Filter::IptablesRaw => "iptables raw DROP",
            Filter::Floor => "XDP_DROP all (floor)",
        };
        format!("{sender}: {filter}")
    }
}

/// The MAC address of `dev` in `netns`, as `ip` prints it.
fn mac(netns: &Netns, dev: &str) -> anyhow::Result<String> {
    let out = netns.ip(&["-o", "link", "show", "dev", dev]);
    out.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no MAC address for {dev}: {out}"))
}

struct Measured {
    sent: u64,
    dropped: u64,
    elapsed: Duration,
    /// The flooder thread's CPU (sending, and the receive path the kernel runs in its context).
    sender: Duration,
    /// The ksoftirqd threads' CPU (the receive path deferred out of the senders' context).
    ksoftirqd: Duration,
    allowed: Vec<Duration>,
}

impl Measured {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
    fn drop_rate(&self) -> f64 {
        self.dropped as f64 / self.secs()
    }
    /// The CPU the flood cost: its sender and ksoftirqd.
    fn cpu(&self) -> Duration {
        self.sender + self.ksoftirqd
    }
    fn per_cpu_second(&self) -> f64 {
        self.dropped as f64 / self.cpu().as_secs_f64().max(1e-3)
    }
    /// CPU per dropped packet, in ns.
    fn cpu_ns(&self) -> f64 {
        self.cpu().as_nanos() as f64 / self.dropped.max(1) as f64
    }
    fn allowed_rate(&self) -> f64 {
        self.allowed.len() as f64 / self.secs()
    }
}

fn measure(
    t: &Topology,
    case: Case,
    secs: u64,
    previous: Option<&'static [u8]>,
) -> anyhow::Result<Measured> {
    // Frames reach the uplink only while it runs NAPI, i.e. has an XDP program.
    let pass = match case {
        Case::Flood(Sender::Frames, Filter::TcOnly | Filter::IptablesRaw) => {
            Some(XdpLink::pass(&t.node, "uplink")?)
        }
        Case::Flood(_, Filter::Floor) => Some(XdpLink::drop_all(&t.node, "uplink")?),
        _ => None,
    };
    let weir = match case {
        Case::NoFlood | Case::Flood(_, Filter::Xdp) => Some(weir(&t.node, true, None)?),
        Case::Flood(_, Filter::XdpPrevious) => Some(weir(&t.node, true, previous)?),
        Case::Flood(_, Filter::TcOnly) => Some(weir(&t.node, false, None)?),
        Case::Flood(_, Filter::IptablesRaw) => {
            iptables_raw(&t.node, "-A")?;
            None
        }
        Case::Flood(_, Filter::Floor) => None,
    };
    let dropped = |w: &Option<Weir>| match (case, w) {
        // Counted below: everything sent.
        (Case::NoFlood | Case::Flood(_, Filter::Floor), _) => 0,
        (Case::Flood(_, Filter::Xdp | Filter::XdpPrevious), Some(w)) => {
            w.dp.counter(REASON_XDP_POLICY_DENIED)
        }
        (Case::Flood(_, Filter::TcOnly), Some(w)) => w.dp.counter(REASON_POLICY_DENIED),
        _ => iptables_raw_dropped(&t.node),
    };
    let before = dropped(&weir);
    let (ksoftirqd_before, started) = (ksoftirqd_cpu(), Instant::now());
    let flooder = match case {
        Case::NoFlood => None,
        Case::Flood(Sender::Socket, _) => Some(flood(&t.remote, None, secs)),
        Case::Flood(Sender::Frames, _) => Some(flood(&t.remote, Some(GEN_DEVICE), secs)),
    };
    let allowed = allowed_rr(&t.remote, secs);
    let (sent, sender) = match flooder {
        Some(f) => f.join().expect("flooder panicked"),
        None => (0, Duration::ZERO),
    };
    let allowed = allowed.join().expect("allowed client panicked");
    let (elapsed, ksoftirqd) = (
        started.elapsed(),
        ksoftirqd_cpu().saturating_sub(ksoftirqd_before),
    );
    let dropped = match case {
        Case::Flood(_, Filter::Floor) => sent,
        _ => dropped(&weir) - before,
    };
    drop(weir);
    drop(pass);
    if matches!(case, Case::Flood(_, Filter::IptablesRaw)) {
        iptables_raw(&t.node, "-D")?;
    }
    Ok(Measured {
        sent,
        dropped,
        elapsed,
        sender,
        ksoftirqd,
        allowed,
    })
}

const ROUNDS: usize = 3;
const CASES: [Case; 9] = [
    Case::NoFlood,
    Case::Flood(Sender::Socket, Filter::Floor),
    Case::Flood(Sender::Socket, Filter::TcOnly),
    Case::Flood(Sender::Socket, Filter::Xdp),
    Case::Flood(Sender::Socket, Filter::IptablesRaw),
    Case::Flood(Sender::Frames, Filter::Floor),
    Case::Flood(Sender::Frames, Filter::TcOnly),
    Case::Flood(Sender::Frames, Filter::Xdp),
    Case::Flood(Sender::Frames, Filter::IptablesRaw),
];

pub fn run(secs: u64) -> anyhow::Result<()> {
    // Leaked: loaded again in every round of its cases, and the process ends with the bench.
    let previous: Option<&'static [u8]> = match std::env::var_os("WEIR_BENCH_PREVIOUS_EBPF") {
        Some(path) => {
            Some(Vec::leak(std::fs::read(&path).map_err(|e| {
                anyhow::anyhow!("reading {}: {e}", path.to_string_lossy())
            })?))
        }
        None => None,
    };
    let mut cases = CASES.to_vec();
    if previous.is_some() {
        for sender in [Sender::Socket, Sender::Frames] {
            let xdp = cases
                .iter()
                .position(|c| *c == Case::Flood(sender, Filter::Xdp))
                .expect("an XDP case per sender");
            cases.insert(xdp + 1, Case::Flood(sender, Filter::XdpPrevious));
        }
    }
    let t = topology();
    start_echo(&t.server);
    let _hop = RedirectHop::new(&t.remote, &mac(&t.node, "uplink")?, "10.78.2.0/24")?;
    println!(
        "a flood of denied UDP packets from another node at a pod ({ROUNDS} rounds over the cases, {secs} s each), with an allowed UDP request/response flow from the same node; CPU: the flooder thread (its sends and the receive path run in its context) and ksoftirqd (the receive path deferred), from the kernel's per-thread accounting:"
    );
    let mut results: Vec<Vec<Measured>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            results[i].push(measure(&t, *case, secs, previous)?);
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
    for (case, mut rounds) in cases.iter().zip(results) {
        let mut allowed_rates: Vec<f64> = rounds.iter().map(Measured::allowed_rate).collect();
        allowed_rates.sort_by(f64::total_cmp);
        let allowed = Samples::new(rounds.iter().flat_map(|m| m.allowed.clone()).collect());
        rounds.sort_by(|a, b| a.per_cpu_second().total_cmp(&b.per_cpu_second()));
        let m = rounds.swap_remove(rounds.len() / 2);
        let row = Row {
            case: *case,
            allowed_rate: allowed_rates[allowed_rates.len() / 2],
            allowed_p50: allowed.percentile(50.0),
            m,
        };
        let m = &row.m;
        println!(
            "  {:<34} dropped {:>7.0} pps of {:>7.0} sent   CPU: sender {:>4.2} + ksoftirqd {:>4.2} cores   drops per CPU-second {:>7.0}   allowed {:>6.0} rr/s p50 {:>8} p99 {:>8}",
            case.name(),
            m.drop_rate(),
            m.sent as f64 / m.secs(),
            m.sender.as_secs_f64() / m.secs(),
            m.ksoftirqd.as_secs_f64() / m.secs(),
            m.per_cpu_second(),
            row.allowed_rate,
            us(row.allowed_p50),
            us(allowed.percentile(99.0)),
        );
        rows.push(row);
    }
    let quiet = &rows[0];
    println!(
        "ratios against weir, tc only, with the same sender; the node's share is the CPU per dropped packet above the floor's (goal: XDP drops >= 3x per CPU-second, allowed traffic unaffected); the allowed flow against no flood:"
    );
    let row = |case: Case| rows.iter().find(|r| r.case == case);
    for sender in [Sender::Socket, Sender::Frames] {
        let (Some(tc), Some(floor)) = (
            row(Case::Flood(sender, Filter::TcOnly)),
            row(Case::Flood(sender, Filter::Floor)),
        ) else {
            continue;
        };
        let node_ns = |r: &Row| (r.m.cpu_ns() - floor.m.cpu_ns()).max(1.0);
        println!(
            "  {:<34} CPU per dropped packet {:>5.0} ns (floor {:.0} ns, the node's share {:.0} ns)   allowed rr/s {:.2}x",
            tc.case.name(),
            tc.m.cpu_ns(),
            floor.m.cpu_ns(),
            node_ns(tc),
            tc.allowed_rate / quiet.allowed_rate
        );
        for filter in [Filter::Xdp, Filter::XdpPrevious, Filter::IptablesRaw] {
            let Some(r) = row(Case::Flood(sender, filter)) else {
                continue;
            };
            println!(
                "  {:<34} CPU per dropped packet {:>5.0} ns (the node's share {:.0} ns)   drops per CPU-second {:.2}x, per node CPU-second {:.2}x   drop rate {:.2}x   allowed rr/s {:.2}x, p50 {:.2}x",
                r.case.name(),
                r.m.cpu_ns(),
                node_ns(r),
                r.m.per_cpu_second() / tc.m.per_cpu_second(),
                node_ns(tc) / node_ns(r),
                r.m.drop_rate() / tc.m.drop_rate(),
                r.allowed_rate / quiet.allowed_rate,
                r.allowed_p50.as_secs_f64() / quiet.allowed_p50.as_secs_f64(),
            );
        }
    }
    Ok(())
}
