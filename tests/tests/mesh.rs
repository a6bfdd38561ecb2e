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
    agent::{Agent, AgentDirs, bin, health_get, metric},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
};

const PORT: u16 = 8080;
const WEST_PODS: &str = "10.160.0.0/16";
const EAST_PODS: &str = "10.161.0.0/16";

fn node(name: &str, cidr: &str, ip: &str, gateway: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{mesh.weir.io/gateway: '{gateway}'}}}}\n\
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

/// One ICMP echo request from `from` (weir-lab's ping); true if the matching reply comes back.
fn ping_ok(from: &Netns, to: IpAddr) -> bool {
    weir_tests::ping::ping(from, to, "eth0", Duration::from_millis(500))
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

/// One node of a cluster: its namespace, its agent's directories (the cluster's manifests
/// directory is shared by its nodes) and its CNI plugin.
struct Node {
    name: String,
    netns: Netns,
    dirs: AgentDirs,
    plugin: Plugin,
    args: Vec<String>,
}

impl Node {
    fn new(name: &str, netns: Netns, dirs: AgentDirs, args: Vec<String>) -> Self {
        let plugin = Plugin::new(&netns.name, &dirs.socket, &dirs.root.join("cni.log"));
        Self {
            name: name.to_owned(),
            netns,
            dirs,
            plugin,
            args,
        }
    }

    fn manifests(&self) -> &Path {
        &self.dirs.manifests
    }

    fn start(&self) -> Agent {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Agent::start(&self.netns, &self.name, &self.dirs, &args)
    }

    /// Wires pod `name` in `ns` with the real plugin and publishes its address, as kubelet does.
    fn add_pod(&self, name: &str, ns: &str, tag: &str) -> (Netns, IpAddr) {
        let file = self.manifests().join(format!("pod-{name}.yaml"));
        std::fs::write(&file, pod(name, ns, &self.name, None)).unwrap();
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
        std::fs::write(&file, pod(name, ns, &self.name, Some(ip))).unwrap();
        (pod_ns, ip)
    }
}

/// Two clusters joined only through a WAN router namespace: west's gateway node (WAN
/// 192.0.2.1) and east's (WAN 192.0.2.5), each with an agent holding a certificate of one mesh
/// CA and a MeshPeer for the other. With `east_worker`, east also has a worker node `wk` (pods
/// 10.161.2.0/24) on a LAN with its gateway (192.168.91.0/24; the gateway's InternalIP is its
/// LAN address then), which is not a gateway and has no certificate.
struct Lab {
    wan: Netns,
    ca: MeshCa,
    west: Node,
    east: Node,
    worker: Option<Node>,
}

fn lab(tag: &str, east_worker: bool) -> Lab {
    let wan = Netns::new(&format!("{tag}w"));
    let (gw_west, gw_east) = (
        Netns::new(&format!("{tag}gw")),
        Netns::new(&format!("{tag}ge")),
    );
    for (dev, node) in [("w0", &gw_west), ("e0", &gw_east)] {
        wan.ip(&[
            "link", "add", dev, "type", "veth", "peer", "name", "wan0", "netns", &node.name,
        ]);
    }
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
    let worker_ns = east_worker.then(|| {
        let wk = Netns::new(&format!("{tag}wk"));
        gw_east.ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "lan0", "netns", &wk.name,
        ]);
        gw_east.ip(&["addr", "add", "192.168.91.1/24", "dev", "lan0"]);
        wk.ip(&["addr", "add", "192.168.91.2/24", "dev", "lan0"]);
        gw_east.ip(&["link", "set", "lan0", "up"]);
        wk.ip(&["link", "set", "lan0", "up"]);
        wk
    });

    // Certificates: one mesh CA, a gateway certificate per cluster.
    let ca = MeshCa::new("weir mesh test CA").unwrap();
    let east_internal = if east_worker {
        "192.168.91.1"
    } else {
        "192.0.2.5"
    };
    let mut gateways = Vec::new();
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
            east_internal,
            "west",
            "192.0.2.1:4243",
            WEST_PODS,
        ),
    ] {
        let dirs = AgentDirs::new(&format!("{tag}-{name}"), "gw");
        let (cert, key) = ca
            .gateway("mesh.test", name)
            .unwrap()
            .write(&dirs.root, name)
            .unwrap();
        let m = &dirs.manifests;
        std::fs::write(m.join("node.yaml"), node("gw", cidr, ip, true)).unwrap();
        std::fs::write(
            m.join("peer.yaml"),
            mesh_peer(peer, peer_ep, &ca.pem(), peer_prefix),
        )
        .unwrap();
        let args = vec![
            "--mesh-cert".into(),
            cert.display().to_string(),
            "--mesh-key".into(),
            key.display().to_string(),
        ];
        gateways.push(Node::new("gw", node_ns, dirs, args));
    }
    let east = gateways.pop().unwrap();
    let west = gateways.pop().unwrap();
    let worker = worker_ns.map(|wk| {
        let dirs = AgentDirs::sharing_manifests(&format!("{tag}-east"), "wk", &east.dirs);
        std::fs::write(
            east.manifests().join("node-wk.yaml"),
            node("wk", "10.161.2.0/24", "192.168.91.2", false),
        )
        .unwrap();
        Node::new("wk", wk, dirs, Vec::new())
    });
    Lab {
        wan,
        ca,
        west,
        east,
        worker,
    }
}

#[test]
fn pods_of_two_clusters_talk_through_the_mesh_link_and_policy_selects_by_cluster() {
    let lab = lab("m", false);
    let (wan, west, east) = (&lab.wan, &lab.west, &lab.east);
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
    let _ = &lab.ca;
}

/// A `MeshImport.Watch` from inside `from` to `gateway`: the gRPC status code it gets (Ok when
/// the gateway starts serving it).
fn watch_import_from(from: &Netns, gateway: SocketAddr) -> tonic::Code {
    use weir_proto::mesh::v1::{self as pb, mesh_import_client::MeshImportClient};
    spawn_in(from.path(), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut client = match MeshImportClient::connect(format!("http://{gateway}")).await
                {
                    Ok(c) => c,
                    Err(_) => return tonic::Code::Unavailable,
                };
                let hello = pb::SyncFrame {
                    kind: Some(pb::sync_frame::Kind::Hello(pb::Hello {
                        protocol_version: weir_mesh::link::PROTOCOL_VERSION,
                        ..Default::default()
                    })),
                };
                match client.watch(futures::stream::iter([hello])).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(status) => status.code(),
                }
            })
    })
    .join()
    .unwrap()
}

#[test]
fn a_worker_node_enforces_remote_identities_it_watches_on_its_gateway() {
    let lab = lab("mk", true);
    let (west, east) = (&lab.west, &lab.east);
    let worker = lab.worker.as_ref().unwrap();
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
    let worker_agent = worker.start();

    let (client, client_ip) = west.add_pod("client", "shop", "mkcl");
    let (intruder, _) = west.add_pod("intruder", "dev", "mkin");
    // The server runs on the worker, which has no mesh certificate and no route to west but
    // through its gateway.
    let (server, server_ip) = worker.add_pod("server", "pay", "mksv");
    serve(&server);
    serve(&client);
    let routes = worker.netns.ip(&["route", "show", WEST_PODS]);
    assert!(
        routes.contains("via 192.168.91.1"),
        "the worker routes west's pods to its gateway: {routes}"
    );

    let wait = Duration::from_secs(30);
    eventually("TCP west → east's worker", wait, || {
        tcp_ok(&client, server_ip)
    });
    eventually("TCP east's worker → west", wait, || {
        tcp_ok(&server, client_ip)
    });
    eventually("ICMP west → east's worker", wait, || {
        ping_ok(&client, server_ip)
    });

    // The policy is enforced at the worker's pod, by the identities the worker watches on its
    // gateway: one remote team in, the other cluster's other team out.
    std::fs::write(
        east.manifests().join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: pay}\n\
         spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{namespaceSelector: {matchLabels: {weir.io/cluster: west, team: shop}}}]}]}\n",
    )
    .unwrap();
    eventually("client in, intruder out, at the worker", wait, || {
        tcp_ok(&client, server_ip) && !tcp_ok(&intruder, server_ip)
    });
    assert!(
        worker_agent
            .log_text()
            .contains("the mesh import from the gateway is synced"),
        "{}",
        worker_agent.log_text()
    );
    let flows = std::fs::read_to_string(worker.dirs.state.join("flows.jsonl")).unwrap_or_default();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("west/dev") && l.contains("weir.io/cluster")),
        "the worker explains the drop with the remote identity:\n{flows}"
    );

    // /metrics and `weir status` show the peer on both nodes of east: the gateway's session,
    // the worker's watch, both synced, west's two pods imported.
    for (node, role) in [(east, "gateway"), (worker, "node")] {
        let (_, metrics) = health_get(&node.netns, 9876, "/metrics");
        for (sample, value) in [
            ("weir_mesh_peer_connected{peer=\"west\"}", 1),
            ("weir_mesh_peer_synced{peer=\"west\"}", 1),
            ("weir_mesh_imported_endpoints{peer=\"west\"}", 2),
        ] {
            assert_eq!(
                metric(&metrics, sample),
                Some(value),
                "{role}: {sample}\n{metrics}"
            );
        }
        let status = std::process::Command::new(bin("weir"))
            .arg("--socket")
            .arg(&node.dirs.socket)
            .arg("status")
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&status.stdout).into_owned();
        assert!(status.contains(&format!("mesh peers ({role})")), "{status}");
        let row = status
            .lines()
            .find(|l| l.trim_start().starts_with("west "))
            .unwrap_or_else(|| panic!("no row for west:\n{status}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[1..6],
            ["yes", "yes", "2", "2", "-"],
            "{role}: {status}"
        );
    }

    // Fail closed: only the cluster's Nodes may watch the gateway's import; a pod may not.
    let gateway_import = SocketAddr::from(([192, 168, 91, 1], 4244));
    assert_eq!(
        watch_import_from(&server, gateway_import),
        tonic::Code::PermissionDenied
    );

    // The worker killed and restarted: it restores what it held before it enforces.
    assert!(worker.dirs.state.join("mesh-import.json").exists());
    worker_agent.stop(nix::sys::signal::Signal::SIGKILL);
    let worker_agent = worker.start();
    assert!(
        worker_agent
            .log_text()
            .contains("restored the mesh import from the gateway"),
        "{}",
        worker_agent.log_text()
    );
    eventually("the client crosses again after the restart", wait, || {
        tcp_ok(&client, server_ip)
    });
    assert!(
        !tcp_ok(&intruder, server_ip),
        "the intruder is still denied"
    );

    // West's MeshPeer removed from east (its manifest deleted): its routes (into the gateway's
    // TUN, and the worker's via the gateway), its import on both nodes (at once: removal is the
    // operator's word, the stale TTL is for a peer that is configured but unreachable), its
    // persisted import and its session go.
    std::fs::remove_file(east.manifests().join("peer.yaml")).unwrap();
    eventually("west is gone from east's gateway and worker", wait, || {
        let (_, gw_metrics) = health_get(&east.netns, 9876, "/metrics");
        let (_, wk_metrics) = health_get(&worker.netns, 9876, "/metrics");
        east.netns
            .ip(&["route", "show", WEST_PODS])
            .trim()
            .is_empty()
            && worker
                .netns
                .ip(&["route", "show", WEST_PODS])
                .trim()
                .is_empty()
            && !gw_metrics.contains("peer=\"west\"")
            && !wk_metrics.contains("peer=\"west\"")
            && !east.dirs.state.join("mesh/west.json").exists()
    });
    eventually("west sees its session with east down", wait, || {
        let (_, metrics) = health_get(&west.netns, 9876, "/metrics");
        metric(&metrics, "weir_mesh_peer_connected{peer=\"east\"}") == Some(0)
    });
    assert!(!tcp_ok(&client, server_ip), "nothing crosses any more");
    drop((west_agent, east_agent, worker_agent));
    drop((client, intruder, server));
}

const ECHO_PORT: u16 = 8081;

/// TCP and UDP echo servers on ECHO_PORT in the pod (a TCP connection echoes until closed).
fn serve_echo(pod: &Netns) {
    spawn_in(pod.path(), || {
        let s = UdpSocket::bind(("0.0.0.0", ECHO_PORT)).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    spawn_in(pod.path(), || {
        let listener = TcpListener::bind(("0.0.0.0", ECHO_PORT)).unwrap();
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One round trip on an established connection (it may take TCP's retransmissions).
fn echoes(conn: &mut TcpStream, what: &[u8]) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; what.len()];
    conn.write_all(what).is_ok() && conn.read_exact(&mut buf).is_ok() && buf == what
}

/// Numbered UDP probes from `from` to the echo port of `to`, about one every 10 ms until `stop`:
/// (sent, answered). A late answer counts (the drain after `stop` waits for stragglers); only
/// a probe that never comes back is lost.
fn probe_udp(
    from: &Netns,
    to: IpAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<(u64, u64)> {
    spawn_in(from.path(), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut answered = std::collections::BTreeSet::new();
        let mut sent = 0u64;
        let receive = |answered: &mut std::collections::BTreeSet<u64>| {
            let mut buf = [0u8; 8];
            match s.recv_from(&mut buf) {
                Ok((8, _)) => {
                    answered.insert(u64::from_be_bytes(buf));
                    true
                }
                _ => false,
            }
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            s.send_to(&sent.to_be_bytes(), (to, ECHO_PORT)).unwrap();
            sent += 1;
            receive(&mut answered);
            thread::sleep(Duration::from_millis(10));
        }
        let drain = Instant::now() + Duration::from_secs(5);
        while (answered.len() as u64) < sent && Instant::now() < drain {
            receive(&mut answered);
        }
        (sent, answered.len() as u64)
    })
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

#[test]
fn a_certificate_rotation_keeps_flows_and_a_rotation_to_another_ca_or_cluster_is_refused() {
    let mut lab = lab("mr", false);
    // East rotates from the mesh CA to a second one. West trusts both for east while the
    // rotation runs; east's certificates must chain to one of them (--mesh-ca).
    let ca2 = MeshCa::new("weir mesh test CA 2").unwrap();
    let rogue = MeshCa::new("rogue CA").unwrap();
    let both = format!("{}{}", lab.ca.pem(), ca2.pem());
    std::fs::write(
        lab.west.manifests().join("peer.yaml"),
        mesh_peer("east", "192.0.2.5:4243", &both, EAST_PODS),
    )
    .unwrap();
    let east_ca = lab.east.dirs.root.join("mesh-ca.pem");
    std::fs::write(&east_ca, &both).unwrap();
    lab.east
        .args
        .extend(["--mesh-ca".into(), east_ca.display().to_string()]);
    let (west, east) = (&lab.west, &lab.east);
    std::fs::write(west.manifests().join("ns.yaml"), namespace("shop", "shop")).unwrap();
    std::fs::write(east.manifests().join("ns.yaml"), namespace("pay", "pay")).unwrap();
    let west_agent = west.start();
    let east_agent = east.start();
    let (client, _) = west.add_pod("client", "shop", "mrcl");
    let (server, server_ip) = east.add_pod("server", "pay", "mrsv");
    serve(&server);
    serve_echo(&server);
    let wait = Duration::from_secs(30);
    eventually("TCP west → east", wait, || tcp_ok(&client, server_ip));

    // A connection that lives across the rotation, and probes all along.
    let mut conn = spawn_in(client.path(), move || {
        TcpStream::connect_timeout(&(server_ip, ECHO_PORT).into(), Duration::from_secs(5)).unwrap()
    })
    .join()
    .unwrap();
    assert!(echoes(&mut conn, b"before"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = probe_udp(&client, server_ip, std::sync::Arc::clone(&stop));
    let sessions_before = count(&west_agent.log_text(), "mesh session up");

    // Rotate east's certificate (same files) to one from the second CA: east re-dials west
    // with it and the new session replaces the old one.
    ca2.gateway("mesh.test", "east")
        .unwrap()
        .write(&east.dirs.root, "east")
        .unwrap();
    eventually("east re-dials with the rotated certificate", wait, || {
        let log = east_agent.log_text();
        log.contains("mesh certificate reloaded")
            && log.contains("re-dialling the peers we dial")
            && count(&west_agent.log_text(), "mesh session up") > sessions_before
    });
    assert!(
        echoes(&mut conn, b"after the rotation"),
        "the connection survives"
    );

    // Rotations that must not happen: a certificate of a CA east does not chain to, and one
    // naming another cluster. Each is refused loudly; the rotated one stays in use.
    for (cert, why) in [
        (
            rogue.gateway("mesh.test", "east").unwrap(),
            "does not chain",
        ),
        (
            ca2.gateway("mesh.test", "west").unwrap(),
            "names cluster west",
        ),
    ] {
        let refused = count(
            &east_agent.log_text(),
            "refused the rotated mesh certificate",
        );
        cert.write(&east.dirs.root, "east").unwrap();
        eventually(&format!("a rotation that {why} is refused"), wait, || {
            let log = east_agent.log_text();
            count(&log, "refused the rotated mesh certificate") > refused && log.contains(why)
        });
    }
    assert!(
        echoes(&mut conn, b"after the refusals"),
        "west:\n{}\neast:\n{}",
        west_agent.log_text(),
        east_agent.log_text()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, answered) = probes.join().unwrap();
    println!("UDP probes across the rotation: {answered} of {sent} answered");
    assert!(
        sent - answered <= 1,
        "make before break: {answered} of {sent} probes answered"
    );

    // West now trusts only the second CA for east, and a fresh session (west restarted) comes
    // up: east presents the certificate of its good rotation, not a refused one.
    std::fs::write(
        west.manifests().join("peer.yaml"),
        mesh_peer("east", "192.0.2.5:4243", &ca2.pem(), EAST_PODS),
    )
    .unwrap();
    west_agent.stop(nix::sys::signal::Signal::SIGTERM);
    let west_agent = west.start();
    eventually(
        "a new session with east's rotated certificate",
        wait,
        || tcp_ok(&client, server_ip),
    );
    assert!(
        !west_agent.log_text().contains("mesh handshake refused"),
        "{}",
        west_agent.log_text()
    );
    drop((west_agent, east_agent, conn));
    drop((client, server));
}
