//! The mesh link end to end: two clusters (west, east), each a gateway node with the real agent
//! in standalone mode and pods wired by the real weir-cni, joined only through a WAN namespace
//! (no route between the clusters' pod networks except through the gateways' mTLS link).
//!
//! Checked: TCP, UDP and ICMP pod to pod in both directions across the link; a cross-cluster
//! allow/deny table by `weir.io/cluster` and namespace labels, enforced by the receiving node;
//! and that a gateway agent killed with SIGKILL restores its import from its state directory.
//! Root only; never skipped.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use weir_mesh::certs::MeshCa;
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
};

const PORT: u16 = 8080;
const WEST_PODS: &str = "10.160.0.0/16";
const EAST_PODS: &str = "10.161.0.0/16";

fn node(name: &str, cidr: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{mesh.weir.io/gateway: 'true'}}}}\n\
         spec: {{podCIDRs: ['{cidr}']}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
    )
}

fn namespace(name: &str, team: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}, mesh.weir.io/export: 'true'}}}}\n"
    )
}

fn pod(name: &str, ns: &str, node: &str, ip: Option<IpAddr>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {node}}}\n"
    );
    if let Some(ip) = ip {
        y.push_str(&format!("status: {{podIPs: [{{ip: '{ip}'}}]}}\n"));
    }
    y
}

fn mesh_peer(name: &str, endpoint: &str, ca: &str, prefix: &str) -> String {
    let ca = ca.replace('\n', "\n    ");
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec:\n  endpoints: ['{endpoint}']\n  \
         allowedPrefixes: ['{prefix}']\n  export: {{namespaceSelector: {{matchLabels: {{mesh.weir.io/export: 'true'}}}}}}\n  \
         staleTTL: 10m\n  caBundle: |\n    {ca}\n"
    )
}

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

fn tcp_ok(from: &Netns, to: IpAddr) -> bool {
    spawn_in(from.path(), move || {
        let Ok(mut s) =
            TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), Duration::from_millis(500))
        else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).is_ok() && &buf == b"hi"
    })
    .join()
    .unwrap()
}

fn udp_ok(from: &Netns, to: IpAddr) -> bool {
    spawn_in(from.path(), move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(b"ping", (to, PORT)).unwrap();
        let mut buf = [0u8; 4];
        matches!(s.recv_from(&mut buf), Ok((4, _))) && &buf == b"pong"
    })
    .join()
    .unwrap()
}

/// One ICMP echo request from a raw socket in `from`; true if the matching reply comes back.
fn ping_ok(from: &Netns, to: IpAddr) -> bool {
    let IpAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    spawn_in(from.path(), move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 500_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
            let id: u16 = std::process::id() as u16;
            let mut echo = [
                8u8,
                0,
                0,
                0,
                (id >> 8) as u8,
                id as u8,
                0,
                1,
                b'w',
                b'e',
                b'i',
                b'r',
            ];
            let sum = checksum(&echo);
            echo[2..4].copy_from_slice(&sum.to_be_bytes());
            let dst = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(to.octets()),
                },
                sin_zero: [0; 8],
            };
            libc::sendto(
                fd,
                echo.as_ptr().cast(),
                echo.len(),
                0,
                (&raw const dst).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            let mut buf = [0u8; 256];
            let mut ok = false;
            for _ in 0..8 {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n < 28 {
                    break;
                }
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let icmp = &buf[ihl..n as usize];
                if buf[12..16] == to.octets() && icmp[0] == 0 && icmp[4..6] == echo[4..6] {
                    ok = true;
                    break;
                }
            }
            libc::close(fd);
            ok
        }
    })
    .join()
    .unwrap()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP and UDP servers on PORT in the pod.
fn serve(pod: &Netns) {
    spawn_in(pod.path(), || {
        let listener = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hi");
        }
    });
    spawn_in(pod.path(), || {
        let s = UdpSocket::bind(("0.0.0.0", PORT)).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(b"pong", from);
        }
    });
}

struct Cluster {
    node: Netns,
    dirs: AgentDirs,
    plugin: Plugin,
    args: Vec<String>,
}

impl Cluster {
    fn manifests(&self) -> &Path {
        &self.dirs.manifests
    }

    fn start(&self) -> Agent {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Agent::start(&self.node, "gw", &self.dirs, &args)
    }

    /// Wires pod `name` in `ns` with the real plugin and publishes its address, as kubelet does.
    fn add_pod(&self, name: &str, ns: &str, tag: &str) -> (Netns, IpAddr) {
        let file = self.manifests().join(format!("pod-{name}.yaml"));
        std::fs::write(&file, pod(name, ns, "gw", None)).unwrap();
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
        std::fs::write(&file, pod(name, ns, "gw", Some(ip))).unwrap();
        (pod_ns, ip)
    }
}

#[test]
fn pods_of_two_clusters_talk_through_the_mesh_link_and_policy_selects_by_cluster() {
    // The WAN: a router namespace between the two gateway nodes.
    let wan = Netns::new("mw");
    let (gw_west, gw_east) = (Netns::new("mgw"), Netns::new("mge"));
    wan.ip(&[
        "link",
        "add",
        "w0",
        "type",
        "veth",
        "peer",
        "name",
        "wan0",
        "netns",
        &gw_west.name,
    ]);
    wan.ip(&[
        "link",
        "add",
        "e0",
        "type",
        "veth",
        "peer",
        "name",
        "wan0",
        "netns",
        &gw_east.name,
    ]);
    wan.ip(&["addr", "add", "192.0.2.2/30", "dev", "w0"]);
    wan.ip(&["addr", "add", "192.0.2.6/30", "dev", "e0"]);
    gw_west.ip(&["addr", "add", "192.0.2.1/30", "dev", "wan0"]);
    gw_east.ip(&["addr", "add", "192.0.2.5/30", "dev", "wan0"]);
    for (ns, dev) in [
        (&wan, "w0"),
        (&wan, "e0"),
        (&gw_west, "wan0"),
        (&gw_east, "wan0"),
    ] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    wan.command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap();
    gw_west.ip(&["route", "add", "192.0.2.4/30", "via", "192.0.2.2"]);
    gw_east.ip(&["route", "add", "192.0.2.0/30", "via", "192.0.2.6"]);

    // Certificates: one mesh CA, a gateway certificate per cluster.
    let ca = MeshCa::new("weir mesh test CA").unwrap();
    let mut clusters = Vec::new();
    for (name, node_ns, cidr, ip, peer, peer_ep, peer_prefix) in [
        (
            "west",
            gw_west,
            "10.160.1.0/24",
            "192.0.2.1",
            "east",
            "192.0.2.5:4243",
            EAST_PODS,
        ),
        (
            "east",
            gw_east,
            "10.161.1.0/24",
            "192.0.2.5",
            "west",
            "192.0.2.1:4243",
            WEST_PODS,
        ),
    ] {
        let dirs = AgentDirs::new(&format!("mesh-{name}"), "gw");
        let (cert, key) = ca
            .gateway("mesh.test", name)
            .unwrap()
            .write(&dirs.root, name)
            .unwrap();
        let m = &dirs.manifests;
        std::fs::write(m.join("node.yaml"), node("gw", cidr, ip)).unwrap();
        std::fs::write(
            m.join("peer.yaml"),
            mesh_peer(peer, peer_ep, &ca.pem(), peer_prefix),
        )
        .unwrap();
        let plugin = Plugin::new(&node_ns.name, &dirs.socket, &dirs.root.join("cni.log"));
        clusters.push(Cluster {
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
    std::fs::write(
        west.manifests().join("ns.yaml"),
        format!(
            "{}---\n{}",
            namespace("shop", "shop"),
            namespace("dev", "dev")
        ),
    )
    .unwrap();
    std::fs::write(east.manifests().join("ns.yaml"), namespace("pay", "pay")).unwrap();

    let west_agent = west.start();
    let east_agent = east.start();
    assert!(
        west_agent.log_text().contains("mesh gateway up"),
        "{}",
        west_agent.log_text()
    );

    let (client, client_ip) = west.add_pod("client", "shop", "mcl");
    let (intruder, intruder_ip) = west.add_pod("intruder", "dev", "min");
    let (server, server_ip) = east.add_pod("server", "pay", "msv");
    serve(&server);
    serve(&client);
    let _ = intruder_ip;

    // No policy: everything crosses, both ways, TCP, UDP and ICMP.
    let wait = Duration::from_secs(30);
    eventually("TCP west → east", wait, || tcp_ok(&client, server_ip));
    eventually("TCP east → west", wait, || tcp_ok(&server, client_ip));
    eventually("UDP west → east", wait, || udp_ok(&client, server_ip));
    eventually("UDP east → west", wait, || udp_ok(&server, client_ip));
    eventually("ICMP west → east", wait, || ping_ok(&client, server_ip));
    eventually("ICMP east → west", wait, || ping_ok(&server, client_ip));

    // The cross-cluster table, enforced on east's node by west's exported identities.
    let policy = |from: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: pay}}\n\
             spec: {{podSelector: {{matchLabels: {{app: server}}}}, ingress: [{{from: [{from}]}}]}}\n"
        )
    };
    let table: [(&str, &str, bool, bool); 4] = [
        // A selector that does not mention weir.io/cluster matches only the local cluster.
        (
            "all local namespaces",
            "{namespaceSelector: {}}",
            false,
            false,
        ),
        (
            "one remote team",
            "{namespaceSelector: {matchLabels: {weir.io/cluster: west, team: shop}}}",
            true,
            false,
        ),
        (
            "every peer",
            "{namespaceSelector: {matchExpressions: [{key: weir.io/cluster, operator: Exists}]}}",
            true,
            true,
        ),
        (
            "another cluster's team",
            "{namespaceSelector: {matchLabels: {weir.io/cluster: north, team: shop}}}",
            false,
            false,
        ),
    ];
    for (what, from, client_allowed, intruder_allowed) in table {
        std::fs::write(east.manifests().join("policy.yaml"), policy(from)).unwrap();
        eventually(
            &format!("{what}: client {client_allowed}, intruder {intruder_allowed}"),
            wait,
            || {
                tcp_ok(&client, server_ip) == client_allowed
                    && tcp_ok(&intruder, server_ip) == intruder_allowed
            },
        );
    }

    std::fs::write(east.manifests().join("policy.yaml"), policy(table[1].1)).unwrap();
    eventually("back to one remote team", wait, || {
        tcp_ok(&client, server_ip) && !tcp_ok(&intruder, server_ip)
    });

    // The WAN down for 10 s (the scenario's length, not a wait for state): nothing imported is
    // deleted meanwhile, and traffic resumes by itself once it is back.
    wan.ip(&["link", "set", "w0", "down"]);
    thread::sleep(Duration::from_secs(10));
    assert!(!tcp_ok(&client, server_ip), "the WAN is down");
    let import = std::fs::read_to_string(east.dirs.state.join("mesh/west.json")).unwrap();
    assert!(
        import.contains(&client_ip.to_string()),
        "west's client is still imported while the link is down"
    );
    wan.ip(&["link", "set", "w0", "up"]);
    eventually("traffic resumes after the link is back", wait, || {
        tcp_ok(&client, server_ip) && tcp_ok(&server, client_ip)
    });
    assert!(
        !tcp_ok(&intruder, server_ip),
        "the intruder is still denied"
    );

    // A gateway agent killed with SIGKILL: its successor restores the import before it
    // enforces, so the allowed client is allowed again without waiting for west.
    let east_agent = {
        assert!(
            east.dirs.state.join("mesh/west.json").exists(),
            "east persisted west's import"
        );
        east_agent.stop(nix::sys::signal::Signal::SIGKILL);
        east.start()
    };
    assert!(
        east_agent
            .log_text()
            .contains("restored the import of a mesh peer"),
        "{}",
        east_agent.log_text()
    );
    eventually("the client crosses again after the restart", wait, || {
        tcp_ok(&client, server_ip)
    });
    assert!(
        !tcp_ok(&intruder, server_ip),
        "the intruder is still denied"
    );

    // The drop of the intruder is explained with the remote cluster and its labels.
    let flows = std::fs::read_to_string(east.dirs.state.join("flows.jsonl")).unwrap_or_default();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("west/dev") && l.contains("weir.io/cluster")),
        "no flow record names the remote identity:\n{flows}"
    );
    drop((west_agent, east_agent));
    drop((client, intruder, server));
}
