//! The mesh link under failure, end to end, on weir-lab's mesh lab: two clusters (west, east),
//! nodes with the real agents in standalone mode and pods wired by the real weir-cni, joined only
//! through a WAN namespace between their gateways. A 1 kHz UDP probe stream and one long TCP
//! transfer run from west's pod to east's across the link.
//!
//! One gateway node per cluster, with the pod on it, while, in turn:
//! - both gateways' certificates rotate (new keys, same CA): no probe gap beyond a second;
//! - the WAN link goes down for 10 s and comes back: probes resume by themselves;
//! - east's gateway agent is SIGKILLed and started again: probes resume.
//!
//! Throughout, the TCP connection survives (every byte sent arrives, in order, on the same
//! connection), a killed agent's TUN device goes with it, and nothing of the lab is left behind.
//!
//! Active/active: a mesh lab (weir-lab) of two clusters with two gateways and a worker each,
//! the probe stream and the transfer between the workers' pods; each of the four gateways is
//! SIGKILLed in turn while the other of its cluster lives, then started again. The longest probe
//! gap over each kill and return is at most a second (the bound), the workers' ECMP
//! route loses the dead gateway and gets it back, the connection survives, and nothing of the
//! lab is left behind. Then the same with each gateway blackholed in turn instead of killed
//! (the WAN router drops all its traffic; its agent and links stay up): it leaves both clusters'
//! sets within the silence timeout. Root only; never skipped.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use weir_lab::lab::{
    self, Manifest,
    mesh::{ClusterSpec, MeshLab, MeshSpec},
    state::State,
};
use weir_lab::netns::spawn_in;

const PROBE_PORT: u16 = 9000;
const BULK_PORT: u16 = 9001;

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Probes from the client pod at 1 kHz to an echo in the server pod; records when each echo
/// comes back.
struct Probe {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Probe {
    /// `client` and `server` are the pods' namespace paths.
    fn start(client: &str, server: &str, server_ip: IpAddr) -> Self {
        let (listening, bound) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let echo_stop = Arc::clone(&stop);
        let echo = spawn_in(server, move || {
            let s = UdpSocket::bind((server_ip, PROBE_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = listening.send(());
            let mut buf = [0u8; 64];
            while !echo_stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        bound.recv().unwrap();
        let replies = Arc::new(Mutex::new(Vec::new()));
        let socket = Arc::new(
            spawn_in(client, || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                s
            })
            .join()
            .unwrap(),
        );
        let (send_stop, send_socket) = (Arc::clone(&stop), Arc::clone(&socket));
        let sender = thread::spawn(move || {
            let target = SocketAddr::from((server_ip, PROBE_PORT));
            let mut next = Instant::now();
            let mut seq = 0u64;
            while !send_stop.load(Ordering::Relaxed) {
                let _ = send_socket.send_to(&seq.to_be_bytes(), target);
                seq += 1;
                next += Duration::from_millis(1);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
            }
        });
        let (recv_stop, recv_replies) = (Arc::clone(&stop), Arc::clone(&replies));
        let receiver = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !recv_stop.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    recv_replies.lock().unwrap().push(Instant::now());
                }
            }
        });
        Self {
            stop,
            replies,
            threads: vec![echo, sender, receiver],
        }
    }

    fn replies(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    /// The longest time without a reply since `from` (until the last reply).
    fn longest_gap_since(&self, from: Instant) -> Duration {
        let replies = self.replies.lock().unwrap();
        let mut last = from;
        let mut longest = Duration::ZERO;
        for &r in replies.iter().filter(|&&r| r >= from) {
            longest = longest.max(r - last);
            last = r;
        }
        longest
    }

    /// Waits until replies arrive again (newer than `after`).
    fn resumed_after(&self, after: Instant) -> bool {
        self.replies
            .lock()
            .unwrap()
            .last()
            .is_some_and(|&r| r > after + Duration::from_millis(50))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection from the client pod to the server pod carrying a counted byte stream at
/// a modest rate (it must not starve the probes on two cores); the server checks the bytes
/// arrive in order.
struct Transfer {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<thread::JoinHandle<std::io::Result<u64>>>,
    receiver: Option<thread::JoinHandle<std::io::Result<u64>>>,
}

impl Transfer {
    /// `client` and `server` are the pods' namespace paths.
    fn start(client: &str, server: &str, server_ip: IpAddr) -> Self {
        let (listening, bound) = std::sync::mpsc::channel();
        let receiver = spawn_in(server, move || -> std::io::Result<u64> {
            let listener = TcpListener::bind((server_ip, BULK_PORT))?;
            let _ = listening.send(());
            let (mut s, _) = listener.accept()?;
            // A connection that stalls this long is taken as lost (and fails the test).
            s.set_read_timeout(Some(Duration::from_secs(90)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != ((total + i as u64) % 251) as u8 {
                        return Err(std::io::Error::other("bytes out of order"));
                    }
                }
                total += n as u64;
            }
        });
        bound.recv().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (send_stop, send_count) = (Arc::clone(&stop), Arc::clone(&sent));
        let sender = spawn_in(client, move || -> std::io::Result<u64> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((server_ip, BULK_PORT)),
                Duration::from_secs(5),
            )?;
            s.set_write_timeout(Some(Duration::from_secs(90)))?;
            let mut total = 0u64;
            let mut chunk = vec![0u8; 16 * 1024];
            while !send_stop.load(Ordering::Relaxed) {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = ((total + i as u64) % 251) as u8;
                }
                s.write_all(&chunk)?;
                total += chunk.len() as u64;
                send_count.store(total, Ordering::Relaxed);
                // About 1.6 MB/s.
                thread::sleep(Duration::from_millis(10));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(total)
        });
        Self {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Ends the transfer: the bytes sent and received on the one connection.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.take().unwrap().join().unwrap();
        let received = self.receiver.take().unwrap().join().unwrap();
        match (sent, received) {
            (Ok(s), Ok(r)) => (s, r),
            (s, r) => panic!("the TCP connection did not survive: sender {s:?}, receiver {r:?}"),
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The text of the log of `node`'s agent in `cluster` of the mesh lab.
fn agent_log(mesh: &MeshLab, cluster: &str, node: &str) -> String {
    let log = mesh
        .cluster(cluster)
        .unwrap()
        .state()
        .node(node)
        .unwrap()
        .log
        .clone();
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The namespace of `node` of `cluster` in the mesh lab.
fn node_netns(mesh: &MeshLab, cluster: &str, node: &str) -> String {
    mesh.cluster(cluster)
        .unwrap()
        .state()
        .node(node)
        .unwrap()
        .netns
        .clone()
}

/// Whether the mesh TUN device exists in a lab node.
fn has_tun(node_netns: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", node_netns, "link", "show", "weir-mesh"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The pods' namespaces as paths, and the server's address.
fn pods(mesh: &MeshLab, client: &str, server: &str) -> (String, String, IpAddr) {
    let path = |key: &str| {
        weir_lab::netns::path(&mesh.pod_netns(key).unwrap())
            .display()
            .to_string()
    };
    let (cluster, pod) = server.split_once('/').unwrap();
    let server_ip = mesh.cluster(cluster).unwrap().pod_ip(pod).unwrap();
    (path(client), path(server), server_ip)
}

/// The agent pids of every node of the mesh lab's clusters.
fn agent_pids(mesh: &MeshLab, clusters: &[&str]) -> Vec<u32> {
    clusters
        .iter()
        .flat_map(|c| {
            mesh.cluster(c)
                .unwrap()
                .state()
                .nodes
                .iter()
                .filter_map(|n| n.agent_pid)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Takes the mesh lab down and checks that nothing of it is left: namespaces, pins, state,
/// agent processes.
fn down_leaving_nothing(mesh: MeshLab) {
    let name = mesh.name().to_owned();
    let pids = agent_pids(&mesh, &["west", "east"]);
    mesh.down().unwrap();
    for l in [name.clone(), format!("{name}west"), format!("{name}east")] {
        assert_eq!(
            weir_lab::netns::list(&format!("wl-{l}-")),
            Vec::<String>::new(),
            "namespaces of {l} left behind"
        );
        assert!(
            lab::pin_dirs(&l).is_empty(),
            "bpffs pins of {l} left behind"
        );
        assert!(!State::dir_of(&l).exists(), "state of {l} left behind");
    }
    for pid in pids {
        assert!(!weir_lab::process::alive(pid), "agent {pid} left running");
    }
}

/// Cluster `name` of a mesh lab: `gateways` gateway nodes (node1, ...) and, after them, one
/// worker, node `pod_node`, with pod `pod` in the exported namespace `app`.
fn mesh_cluster(name: &str, nodes: usize, gateways: usize, pod: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        nodes,
        gateways,
        manifests: vec![Manifest::Yaml(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{mesh.weir.io/export: 'true'}}}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: app, labels: {{app: {pod}}}}}\n\
             spec: {{nodeName: node{nodes}}}\n"
        ))],
    }
}

#[test]
fn a_probe_stream_and_a_tcp_connection_survive_rotation_a_wan_outage_and_a_killed_gateway() {
    // One node per cluster, its gateway, with the pod on it.
    let mut mesh = MeshLab::up(MeshSpec {
        name: format!("f{}", std::process::id()),
        clusters: vec![
            mesh_cluster("west", 1, 1, "client"),
            mesh_cluster("east", 1, 1, "server"),
        ],
        extra_ports: Vec::new(),
        capture_wan: false,
    })
    .expect("the mesh lab comes up");
    let wait = Duration::from_secs(60);
    let (client, server, server_ip) = pods(&mesh, "west/app/client", "east/app/server");
    let probe = Probe::start(&client, &server, server_ip);
    eventually("probes answered across the mesh", wait, || {
        probe.replies() > 100
    });
    let transfer = Transfer::start(&client, &server, server_ip);
    eventually("the transfer runs", wait, || {
        transfer.sent.load(Ordering::Relaxed) > 1 << 20
    });

    // Certificates rotate: new keys from the same CA, written over the files both agents read.
    let rotated_at = Instant::now();
    for c in ["west", "east"] {
        mesh.rotate_certificate(c).unwrap();
        eventually(&format!("{c} reloads its certificate"), wait, || {
            agent_log(&mesh, c, "node1").contains("mesh certificate reloaded")
        });
    }
    // Some probes after the reload, then the longest gap over the whole rotation.
    let reloaded = probe.replies();
    eventually("probes go on after the rotation", wait, || {
        probe.replies() > reloaded + 500
    });
    let gap = probe.longest_gap_since(rotated_at);
    assert!(
        gap <= Duration::from_secs(1),
        "the certificate rotation stopped the probes for {gap:?}"
    );

    // The WAN down for 10 s (the scenario's length, not a wait for state), then back.
    mesh.set_wan("west", 0, false).unwrap();
    thread::sleep(Duration::from_secs(10));
    let back = Instant::now();
    mesh.set_wan("west", 0, true).unwrap();
    eventually("probes resume after the WAN is back", wait, || {
        probe.resumed_after(back)
    });

    // East's gateway agent killed: the TUN goes with the process; its successor restores the
    // import and carries the same connection on.
    let east_gateway = node_netns(&mesh, "east", "node1");
    mesh.cluster_mut("east")
        .unwrap()
        .kill_agent("node1")
        .unwrap();
    eventually("the killed agent's TUN device goes with it", wait, || {
        !has_tun(&east_gateway)
    });
    let restarted = Instant::now();
    mesh.cluster_mut("east")
        .unwrap()
        .start_agent("node1")
        .unwrap();
    eventually("probes resume after the gateway restarted", wait, || {
        probe.resumed_after(restarted)
    });

    let before = transfer.sent.load(Ordering::Relaxed);
    eventually("the transfer moves again", wait, || {
        transfer.sent.load(Ordering::Relaxed) > before + (1 << 20)
    });
    let (sent, received) = transfer.finish();
    assert_eq!(
        sent, received,
        "every byte sent on the connection arrived, in order"
    );
    drop(probe);
    down_leaving_nothing(mesh);
}

/// `GET /metrics` of the agent of a lab node (its health endpoint in its namespace).
fn lab_metrics(node_netns: &str) -> String {
    weir_lab::netns::run_in(node_netns, || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", 9876)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
    .unwrap_or_default()
}

fn sample(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (n, v) = line.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

/// The next hops of `node_netns`'s route to `prefix` (one for a plain route, several for ECMP).
fn next_hops(node_netns: &str, prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", node_netns, "route", "show", prefix])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut hops: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_owned())
        .collect();
    hops.sort();
    hops
}

/// The active/active mesh lab: two clusters with two gateways (node1, node2) and a worker
/// (node3) each, the client pod on west's worker and the server pod on east's.
fn active_active_lab(name: String) -> MeshLab {
    MeshLab::up(MeshSpec {
        name,
        clusters: vec![
            mesh_cluster("west", 3, 2, "client"),
            mesh_cluster("east", 3, 2, "server"),
        ],
        extra_ports: Vec::new(),
        capture_wan: false,
    })
    .expect("the active/active mesh lab comes up")
}

/// The pod prefix of `cluster`.
fn pod_prefix(mesh: &MeshLab, cluster: &str) -> String {
    mesh.state().cluster(cluster).unwrap().pod_prefix.clone()
}

/// The underlay address of `cluster`'s node `node`.
fn underlay_ip(mesh: &MeshLab, cluster: &str, node: &str) -> String {
    mesh.cluster(cluster)
        .unwrap()
        .state()
        .node(node)
        .unwrap()
        .underlay_ip
        .clone()
}

/// The underlay addresses of `cluster`'s gateways, sorted.
fn gateway_ips(mesh: &MeshLab, cluster: &str) -> Vec<String> {
    let mut ips: Vec<String> = mesh
        .gateway_nodes(cluster)
        .unwrap()
        .iter()
        .map(|n| underlay_ip(mesh, cluster, n))
        .collect();
    ips.sort();
    ips
}

/// A metric of the agent on every gateway of `cluster`, about peer `other`.
fn gateway_samples(mesh: &MeshLab, cluster: &str, metric: &str, other: &str) -> Vec<Option<u64>> {
    mesh.gateway_nodes(cluster)
        .unwrap()
        .iter()
        .map(|g| {
            sample(
                &lab_metrics(&node_netns(mesh, cluster, g)),
                &format!("{metric}{{peer=\"{other}\"}}"),
            )
        })
        .collect()
}

/// Each worker routes the other cluster's pods over both of its gateways, and each gateway has
/// a session with both gateways of the other cluster.
fn all_up(mesh: &MeshLab) -> bool {
    [("west", "east"), ("east", "west")]
        .iter()
        .all(|&(c, other)| {
            next_hops(&node_netns(mesh, c, "node3"), &pod_prefix(mesh, other))
                == gateway_ips(mesh, c)
                && gateway_samples(mesh, c, "weir_mesh_gateways_up", other)
                    .iter()
                    .all(|n| *n == Some(2))
        })
}

/// The two-gateway lab with every gateway up, and a probe stream and a TCP transfer from
/// west's client to east's server running across it; with the wait for each step.
fn active_active_lab_with_traffic(tag: &str) -> (MeshLab, Probe, Transfer, Duration) {
    let mesh = active_active_lab(format!("{tag}{}", std::process::id()));
    let wait = Duration::from_secs(60);
    eventually(
        "every gateway up, on the workers' ECMP routes",
        wait,
        || all_up(&mesh),
    );
    let (client_ns, server_ns, server_ip) = pods(&mesh, "west/app/client", "east/app/server");
    let probe = Probe::start(&client_ns, &server_ns, server_ip);
    eventually("probes answered across the mesh", wait, || {
        probe.replies() > 500
    });
    let transfer = Transfer::start(&client_ns, &server_ns, server_ip);
    eventually("the transfer runs", wait, || {
        transfer.sent.load(Ordering::Relaxed) > 1 << 20
    });
    (mesh, probe, transfer, wait)
}

/// Waits until the probe stream has 1,000 more replies than now (a second of it), `how`.
fn probes_go_on(probe: &Probe, how: &str, wait: Duration) {
    let replies = probe.replies();
    eventually(&format!("probes go on {how}"), wait, || {
        probe.replies() > replies + 1000
    });
}

/// After `cluster`'s `gateway` was `what` (since `since`) and let back: waits until it is up
/// everywhere and the probes go on, and returns the longest probe gap since then.
fn came_back(
    mesh: &MeshLab,
    probe: &Probe,
    (cluster, gateway): (&str, &str),
    since: Instant,
    what: &str,
    wait: Duration,
) -> (String, Duration) {
    eventually(
        &format!("{cluster}'s {gateway} is back everywhere"),
        wait,
        || all_up(mesh),
    );
    probes_go_on(probe, "after the return", wait);
    let gap = probe.longest_gap_since(since);
    println!("{cluster}/{gateway} {what} and back: longest probe gap {gap:?}");
    (format!("{cluster}/{gateway}"), gap)
}

/// After each gateway in turn was `what` and came back: the transfer still moves and lost
/// nothing, no probe gap exceeded a second, and the lab goes down leaving nothing behind.
fn survived_each_gateway(
    mesh: MeshLab,
    transfer: Transfer,
    probe: Probe,
    gaps: &[(String, Duration)],
    what: &str,
    wait: Duration,
) {
    let before = transfer.sent.load(Ordering::Relaxed);
    eventually("the transfer still moves", wait, || {
        transfer.sent.load(Ordering::Relaxed) > before + (1 << 20)
    });
    let (sent, received) = transfer.finish();
    assert_eq!(
        sent, received,
        "every byte sent on the connection arrived, in order"
    );
    drop(probe);
    for (gateway, gap) in gaps {
        assert!(
            *gap <= Duration::from_secs(1),
            "gateway {gateway} {what}: the probes stopped for {gap:?} (all gaps: {gaps:?})"
        );
    }
    down_leaving_nothing(mesh);
}

#[test]
fn with_two_gateways_per_cluster_killing_any_one_loses_at_most_a_second() {
    let (mut mesh, probe, transfer, wait) = active_active_lab_with_traffic("a");

    let mut gaps = Vec::new();
    for (cluster, other) in [("west", "east"), ("east", "west")] {
        let worker = node_netns(&mesh, cluster, "node3");
        let worker_route = pod_prefix(&mesh, other);
        for gateway in mesh.gateway_nodes(cluster).unwrap() {
            let gateway_ip = underlay_ip(&mesh, cluster, &gateway);
            let killed = Instant::now();
            mesh.cluster_mut(cluster)
                .unwrap()
                .kill_agent(&gateway)
                .unwrap();
            eventually(
                &format!("{cluster}'s worker drops {gateway} from its route"),
                wait,
                || !next_hops(&worker, &worker_route).contains(&gateway_ip),
            );
            probes_go_on(&probe, "through the other gateway", wait);
            mesh.cluster_mut(cluster)
                .unwrap()
                .start_agent(&gateway)
                .unwrap();
            gaps.push(came_back(
                &mesh,
                &probe,
                (cluster, &gateway),
                killed,
                "killed",
                wait,
            ));
        }
    }
    survived_each_gateway(mesh, transfer, probe, &gaps, "killed", wait);
}

/// A gateway that goes silent without dying: the WAN router drops everything to and from it,
/// its agent runs and its links stay up, so no connection of it closes. The other cluster's
/// gateways hear nothing from it (no heartbeat, no batch) and end their sessions with it, and
/// it hears nothing from them, ends its own and tells its cluster's workers it is not ready:
/// both directions leave it within the silence timeout, well within the second the issue
/// allows. Each of the four gateways in turn, then its WAN comes back.
#[test]
fn with_two_gateways_per_cluster_a_silent_one_loses_at_most_a_second() {
    let (mesh, probe, transfer, wait) = active_active_lab_with_traffic("s");

    let mut gaps = Vec::new();
    for (cluster, other) in [("west", "east"), ("east", "west")] {
        let worker = node_netns(&mesh, cluster, "node3");
        let worker_route = pod_prefix(&mesh, other);
        for (g, gateway) in mesh.gateway_nodes(cluster).unwrap().into_iter().enumerate() {
            let gateway_ip = underlay_ip(&mesh, cluster, &gateway);
            let silent_sessions = || -> u64 {
                gateway_samples(&mesh, other, "weir_mesh_silent_sessions_total", cluster)
                    .iter()
                    .map(|n| n.unwrap_or(0))
                    .sum()
            };
            let silent_before = silent_sessions();
            let blackholed = Instant::now();
            mesh.blackhole_wan(cluster, g, true).unwrap();
            eventually(
                &format!("{cluster}'s worker drops the silent {gateway} from its route"),
                wait,
                || !next_hops(&worker, &worker_route).contains(&gateway_ip),
            );
            eventually(
                &format!("{other}'s gateways drop the silent {cluster}/{gateway}"),
                wait,
                || {
                    gateway_samples(&mesh, other, "weir_mesh_gateways_up", cluster)
                        .iter()
                        .all(|n| *n == Some(1))
                },
            );
            let silent_after = silent_sessions();
            assert!(
                silent_after >= silent_before + 2,
                "both of {other}'s gateways ended their session with {cluster}/{gateway} for its silence ({silent_before} -> {silent_after})"
            );
            probes_go_on(&probe, "through the other gateway", wait);
            mesh.blackhole_wan(cluster, g, false).unwrap();
            gaps.push(came_back(
                &mesh,
                &probe,
                (cluster, &gateway),
                blackholed,
                "silent",
                wait,
            ));
        }
    }
    survived_each_gateway(mesh, transfer, probe, &gaps, "silent", wait);
}
