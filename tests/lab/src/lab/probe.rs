//! Real connections from inside pods: a thread per (source, target) enters the source pod's
//! namespace and connects to the target pod's address directly.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::matrix::{Matrix, Proto, Target};
use crate::netns;

/// A pod as a prober sees it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `namespace/name`
    pub pod: String,
    pub netns: String,
    pub ip: IpAddr,
}

#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// TCP connect and read timeout; UDP wait per attempt.
    pub timeout: Duration,
    pub udp_attempts: u32,
    /// Probe again after a miss until the cell answers or this passes (for a cell that must be
    /// allowed: one try can miss its timeout on a loaded machine); `None`: one try.
    pub retry_within: Option<Duration>,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_millis(1000),
            udp_attempts: 2,
            retry_within: None,
        }
    }
}

/// Probes every (source, target) pair but a pod with itself, all in parallel; `options` gives
/// each cell its timeouts (shorter for cells expected to be denied).
pub fn probe(
    sources: &[Endpoint],
    targets: &[(Target, IpAddr)],
    options: impl Fn(&str, &Target) -> ProbeOptions,
) -> Matrix {
    let mut handles = Vec::new();
    for source in sources {
        for (target, ip) in targets {
            if target.pod == source.pod {
                continue;
            }
            let options = options(&source.pod, target);
            let (source, target, ip) = (source.clone(), target.clone(), *ip);
            let handle = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let allowed = netns::enter(&source.netns).is_ok()
                        && probe_retrying(SocketAddr::new(ip, target.port), target.proto, options);
                    ((source.pod, target), allowed)
                })
                .expect("spawning a probe thread");
            handles.push(handle);
        }
    }
    let cells: BTreeMap<(String, Target), bool> =
        handles.into_iter().filter_map(|h| h.join().ok()).collect();
    Matrix {
        sources: sources.iter().map(|s| s.pod.clone()).collect(),
        targets: targets.iter().map(|(t, _)| t.clone()).collect(),
        cells,
    }
}

/// [`probe_one`], again after each miss for as long as `options.retry_within` allows.
fn probe_retrying(addr: SocketAddr, proto: Proto, options: ProbeOptions) -> bool {
    let deadline = options.retry_within.map(|within| Instant::now() + within);
    loop {
        if probe_one(addr, proto, options) {
            return true;
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One connection attempt, in the calling thread's namespace: TCP connect and read the server's
/// line; UDP send and wait for the answer.
pub fn probe_one(addr: SocketAddr, proto: Proto, options: ProbeOptions) -> bool {
    match proto {
        Proto::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, options.timeout) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(options.timeout));
            let mut buf = [0u8; 256];
            matches!(stream.read(&mut buf), Ok(n) if n > 0)
        }
        Proto::Udp => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("address")
            } else {
                "[::]:0".parse().expect("address")
            };
            let Ok(socket) = UdpSocket::bind(bind) else {
                return false;
            };
            if socket.connect(addr).is_err()
                || socket.set_read_timeout(Some(options.timeout)).is_err()
            {
                return false;
            }
            let mut buf = [0u8; 256];
            for _ in 0..options.udp_attempts.max(1) {
                if socket.send(b"probe").is_err() {
                    continue;
                }
                match socket.recv(&mut buf) {
                    Ok(n) if n > 0 => return true,
                    // An ICMP error (port unreachable) is an answer: denied, no retry.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return false,
                    _ => {}
                }
            }
            false
        }
    }
}
