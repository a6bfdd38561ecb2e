//! The mesh link under failure, end to end: two clusters (west, east), each a gateway node with
//! the real agent in standalone mode and a pod wired by the real weir-cni, joined only through a
//! WAN namespace. A 1 kHz UDP probe stream and one long TCP transfer run from west's pod to
//! east's across the link while, in turn:
//! - both gateways' certificates rotate (new keys, same CA): no probe gap beyond a second;
//! - the WAN link goes down for 10 s and comes back: probes resume by themselves;
//! - east's gateway agent is SIGKILLed and started again: probes resume.
//!
//! Throughout, the TCP connection survives (every byte sent arrives, in order, on the same
//! connection), and at the end no TUN device is left in a node whose agent is gone.
//!
//! Active/active: a mesh lab (weir-lab) of two clusters with two gateways and a worker each,
//! the probe stream and the transfer between the workers' pods; each of the four gateways is
//! SIGKILLed in turn while the other of its cluster lives, then started again. The longest probe
//! gap over each kill and return is at most a second (the bound), the workers' ECMP
//! route loses the dead gateway and gets it back, the connection survives, and nothing of the
//! lab is left behind. Root only; never skipped.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
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
use weir_mesh::certs::MeshCa;
use weir_tests::mesh_objects::{mesh_peer_yaml, namespace_yaml, node_yaml, pod_yaml};
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
    tcp,
};

const WEST_PODS: &str = "10.162.0.0/16";
const EAST_PODS: &str = "10.163.0.0/16";
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

struct Cluster {
    name: &'static str,
    node: Netns,
    dirs: AgentDirs,
    plugin: Plugin,
    args: Vec<String>,
}

impl Cluster {
    fn start(&self) -> Agent {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Agent::start(&self.node, "gw", &self.dirs, &args)
    }

    fn add_pod(&self, name: &str, ns: &str, tag: &str) -> (Netns, IpAddr) {
        let file = self.dirs.manifests.join(format!("pod-{name}.yaml"));
        std::fs::write(&file, pod_yaml(name, ns, None)).unwrap();
        let pod_ns = Netns::new(tag);
        let (out, _) = self.plugin.ok(
            "ADD",
            &PodRef {
                container_id: &format!("ctr-{name}"),
                namespace: ns,
                name,
                netns: &pod_ns.name,
            },
        );
        let ip = first_address(&out);
        std::fs::write(&file, pod_yaml(name, ns, Some(ip))).unwrap();
        (pod_ns, ip)
    }

    fn has_tun(&self) -> bool {
        self.node
            .command("ip")
            .args(["link", "show", "weir-mesh"])
            .output()
            .is_ok_and(|o| o.status.success())
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

#[test]
fn a_probe_stream_and_a_tcp_connection_survive_rotation_a_wan_outage_and_a_killed_gateway() {
    let wan = Netns::new("fw");
    let (gw_west, gw_east) = (Netns::new("fgw"), Netns::new("fge"));
    for (dev, gw, wan_addr, gw_addr, other) in [
        (
            "w0",
            &gw_west,
            "192.0.2.2/30",
            "192.0.2.1/30",
            "192.0.2.4/30",
        ),
        (
            "e0",
            &gw_east,
            "192.0.2.6/30",
            "192.0.2.5/30",
            "192.0.2.0/30",
        ),
    ] {
        wan.ip(&[
            "link", "add", dev, "type", "veth", "peer", "name", "wan0", "netns", &gw.name,
        ]);
        wan.ip(&["addr", "add", wan_addr, "dev", dev]);
        wan.ip(&["link", "set", dev, "up"]);
        gw.ip(&["addr", "add", gw_addr, "dev", "wan0"]);
        gw.ip(&["link", "set", "wan0", "up"]);
        let via = wan_addr.split('/').next().unwrap();
        gw.ip(&["route", "add", other, "via", via]);
    }
    wan.command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap();

    let ca = MeshCa::new("weir mesh failover CA").unwrap();
    let mut clusters = Vec::new();
    for (name, node_ns, cidr, ip, peer, peer_ep, peer_prefix) in [
        (
            "west",
            gw_west,
            "10.162.1.0/24",
            "192.0.2.1",
            "east",
            "192.0.2.5:4243",
            EAST_PODS,
        ),
        (
            "east",
            gw_east,
            "10.163.1.0/24",
            "192.0.2.5",
            "west",
            "192.0.2.1:4243",
            WEST_PODS,
        ),
    ] {
        let dirs = AgentDirs::new(&format!("mesh-failover-{name}"), "gw");
        let (cert, key) = ca
            .gateway("mesh.test", name)
            .unwrap()
            .write(&dirs.root, name)
            .unwrap();
        let m = &dirs.manifests;
        std::fs::write(m.join("node.yaml"), node_yaml(cidr, ip)).unwrap();
        std::fs::write(
            m.join("peer.yaml"),
            mesh_peer_yaml(peer, peer_ep, &ca.pem(), peer_prefix),
        )
        .unwrap();
        let plugin = Plugin::new(&node_ns.name, &dirs.socket, &dirs.root.join("cni.log"));
        clusters.push(Cluster {
            name,
            node: node_ns,
            plugin,
            args: vec![
                "--mesh-cert".into(),
                cert.display().to_string(),
                "--mesh-key".into(),
                key.display().to_string(),
            ],
            dirs,
        });
    }
    let (west, east) = (&clusters[0], &clusters[1]);
    std::fs::write(west.dirs.manifests.join("ns.yaml"), namespace_yaml("shop")).unwrap();
    std::fs::write(east.dirs.manifests.join("ns.yaml"), namespace_yaml("pay")).unwrap();
    let west_agent = west.start();
    let mut east_agent = east.start();
    let (client, _) = west.add_pod("client", "shop", "fcl");
    let (server, server_ip) = east.add_pod("server", "pay", "fsv");
    tcp::serve(&server, server_ip);
    let wait = Duration::from_secs(60);
    eventually("TCP west → east", wait, || {
        tcp::connects(&client, server_ip)
    });

    let probe = Probe::start(&client.path(), &server.path(), server_ip);
    eventually("probes answered", wait, || probe.replies() > 100);
    let transfer = Transfer::start(&client.path(), &server.path(), server_ip);
    eventually("the transfer runs", wait, || {
        transfer.sent.load(Ordering::Relaxed) > 1 << 20
    });

    // Certificates rotate: new keys from the same CA, written over the files both agents read.
    let rotated_at = Instant::now();
    for (c, agent) in [(west, &west_agent), (east, &east_agent)] {
        let dir = c.dirs.root.join("rotated");
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = ca
            .gateway("mesh.test", c.name)
            .unwrap()
            .write(&dir, c.name)
            .unwrap();
        // Key first, certificate last: the agent reloads when the certificate changes.
        std::fs::copy(&key, Path::new(&c.args[3])).unwrap();
        std::fs::copy(&cert, Path::new(&c.args[1])).unwrap();
        eventually(&format!("{} reloads its certificate", c.name), wait, || {
            agent.log_text().contains("mesh certificate reloaded")
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
    wan.ip(&["link", "set", "w0", "down"]);
    thread::sleep(Duration::from_secs(10));
    let back = Instant::now();
    wan.ip(&["link", "set", "w0", "up"]);
    eventually("probes resume after the WAN is back", wait, || {
        probe.resumed_after(back)
    });

    // East's gateway agent killed: the TUN goes with the process; its successor restores the
    // import and carries the same connection on.
    east_agent.stop(nix::sys::signal::Signal::SIGKILL);
    assert!(!east.has_tun(), "the killed agent's TUN device is gone");
    let restarted = Instant::now();
    east_agent = east.start();
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
    drop((west_agent, east_agent));
    eventually("no TUN left behind", wait, || {
        !west.has_tun() && !east.has_tun()
    });
    drop((client, server));
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

/// Cluster `name` of the active/active lab: two gateways (node1, node2) and a worker (node3)
/// with pod `pod` in the exported namespace `app`.
fn active_active_cluster(name: &str, pod: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        nodes: 3,
        gateways: 2,
        manifests: vec![Manifest::Yaml(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{mesh.weir.io/export: 'true'}}}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: app, labels: {{app: {pod}}}}}\n\
             spec: {{nodeName: node3}}\n"
        ))],
    }
}

#[test]
fn with_two_gateways_per_cluster_killing_any_one_loses_at_most_a_second() {
    let name = format!("a{}", std::process::id());
    let mut mesh = MeshLab::up(MeshSpec {
        name: name.clone(),
        clusters: vec![
            active_active_cluster("west", "client"),
            active_active_cluster("east", "server"),
        ],
        extra_ports: Vec::new(),
        capture_wan: false,
    })
    .expect("the active/active mesh lab comes up");
    let wait = Duration::from_secs(60);
    let prefix = |c: &str| mesh.state().cluster(c).unwrap().pod_prefix.clone();
    let (west_prefix, east_prefix) = (prefix("west"), prefix("east"));
    let node_netns = |mesh: &MeshLab, c: &str, node: &str| {
        mesh.cluster(c)
            .unwrap()
            .state()
            .node(node)
            .unwrap()
            .netns
            .clone()
    };
    let gateway_ips = |mesh: &MeshLab, c: &str| {
        let lab = mesh.cluster(c).unwrap();
        let mut ips: Vec<String> = mesh
            .gateway_nodes(c)
            .unwrap()
            .iter()
            .map(|n| lab.state().node(n).unwrap().underlay_ip.clone())
            .collect();
        ips.sort();
        ips
    };
    // Each worker routes the other cluster's pods over both of its gateways, and each gateway
    // has a session with both gateways of the other cluster.
    let all_up = |mesh: &MeshLab| {
        [
            ("west", &east_prefix, "east"),
            ("east", &west_prefix, "west"),
        ]
        .iter()
        .all(|(c, other_prefix, other)| {
            next_hops(&node_netns(mesh, c, "node3"), other_prefix) == gateway_ips(mesh, c)
                && mesh.gateway_nodes(c).unwrap().iter().all(|g| {
                    sample(
                        &lab_metrics(&node_netns(mesh, c, g)),
                        &format!("weir_mesh_gateways_up{{peer=\"{other}\"}}"),
                    ) == Some(2)
                })
        })
    };
    eventually(
        "every gateway up, on the workers' ECMP routes",
        wait,
        || all_up(&mesh),
    );

    let client_ns = weir_lab::netns::path(&mesh.pod_netns("west/app/client").unwrap())
        .display()
        .to_string();
    let server_ns = weir_lab::netns::path(&mesh.pod_netns("east/app/server").unwrap())
        .display()
        .to_string();
    let server_ip = mesh.cluster("east").unwrap().pod_ip("app/server").unwrap();
    let probe = Probe::start(&client_ns, &server_ns, server_ip);
    eventually("probes answered across the mesh", wait, || {
        probe.replies() > 500
    });
    let transfer = Transfer::start(&client_ns, &server_ns, server_ip);
    eventually("the transfer runs", wait, || {
        transfer.sent.load(Ordering::Relaxed) > 1 << 20
    });

    let mut gaps = Vec::new();
    for (cluster, worker_route) in [("west", &east_prefix), ("east", &west_prefix)] {
        let worker = node_netns(&mesh, cluster, "node3");
        for gateway in mesh.gateway_nodes(cluster).unwrap() {
            let gateway_ip = mesh
                .cluster(cluster)
                .unwrap()
                .state()
                .node(&gateway)
                .unwrap()
                .underlay_ip
                .clone();
            let killed = Instant::now();
            mesh.cluster_mut(cluster)
                .unwrap()
                .kill_agent(&gateway)
                .unwrap();
            eventually(
                &format!("{cluster}'s worker drops {gateway} from its route"),
                wait,
                || !next_hops(&worker, worker_route).contains(&gateway_ip),
            );
            let replies = probe.replies();
            eventually("probes go on through the other gateway", wait, || {
                probe.replies() > replies + 1000
            });
            mesh.cluster_mut(cluster)
                .unwrap()
                .start_agent(&gateway)
                .unwrap();
            eventually(
                &format!("{cluster}'s {gateway} is back everywhere"),
                wait,
                || all_up(&mesh),
            );
            let replies = probe.replies();
            eventually("probes go on after the return", wait, || {
                probe.replies() > replies + 1000
            });
            let gap = probe.longest_gap_since(killed);
            println!("{cluster}/{gateway} killed and back: longest probe gap {gap:?}");
            gaps.push((format!("{cluster}/{gateway}"), gap));
        }
    }
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
    for (gateway, gap) in &gaps {
        assert!(
            *gap <= Duration::from_secs(1),
            "killing gateway {gateway} stopped the probes for {gap:?} (all gaps: {gaps:?})"
        );
    }

    // Nothing left behind: the lab's namespaces, pins, state and agent processes.
    let pids: Vec<u32> = ["west", "east"]
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
        .collect();
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
