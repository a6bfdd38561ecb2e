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
    thread,
    time::{Duration, Instant},
};

use weir_mesh::certs::MeshCa;
use weir_tests::{
    agent::{bin, health_get, metric},
    mesh_pair::{
        EAST_ENDPOINT, EAST_PODS, MeshPair, PairOptions, WEST_PODS, mesh_peer_yaml, namespace_yaml,
    },
    netns::{Netns, spawn_in},
    tcp,
    wait::eventually,
};

/// A UDP probe from `from` to the server [`serve`] starts: one try (allowed paths are polled
/// with `eventually`).
fn udp_ok(from: &Netns, to: IpAddr) -> bool {
    spawn_in(from.path(), move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(b"ping", (to, tcp::PORT)).unwrap();
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

/// The TCP probe's server and a UDP one on the same port, in the pod with address `ip`.
fn serve(pod: &Netns, ip: IpAddr) {
    tcp::serve(pod, ip);
    spawn_in(pod.path(), move || {
        let s = UdpSocket::bind((ip, tcp::PORT)).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(b"pong", from);
        }
    });
}

/// The pair of clusters of these tests, named by `tag`.
/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

fn lab(tag: &str, east_worker: bool) -> MeshPair {
    MeshPair::new(&PairOptions {
        tag,
        domain: "mesh.test",
        east_worker,
    })
}

#[test]
fn pods_of_two_clusters_talk_through_the_mesh_link_and_policy_selects_by_cluster() {
    let lab = lab("m", false);
    let (wan, west, east) = (&lab.wan, &lab.west, &lab.east);
    std::fs::write(
        west.manifests().join("ns.yaml"),
        format!("{}---\n{}", namespace_yaml("shop"), namespace_yaml("dev")),
    )
    .unwrap();
    std::fs::write(east.manifests().join("ns.yaml"), namespace_yaml("pay")).unwrap();

    // West runs its gateway on a thread of its own, east on the agent's shared runtime with a
    // TUN of two queues, each read by a reader of its own: both carry every check below, across
    // the link between them. (The default, `auto`, picks one of the two by the node's CPUs.)
    let west_agent = west.start_with(&["--mesh-own-thread", "true"]);
    let east_args = ["--mesh-own-thread", "false", "--mesh-tun-queues", "2"];
    let east_agent = east.start_with(&east_args);
    assert!(
        west_agent.log_text().contains("mesh gateway up"),
        "{}",
        west_agent.log_text()
    );
    assert!(
        thread_names(west_agent.pid()).contains(&"weir-mesh".to_owned()),
        "west: --mesh-own-thread true, yet no weir-mesh thread: {:?}",
        thread_names(west_agent.pid())
    );
    assert!(
        !thread_names(east_agent.pid()).contains(&"weir-mesh".to_owned()),
        "east: --mesh-own-thread false, yet a weir-mesh thread: {:?}",
        thread_names(east_agent.pid())
    );
    let tun_queues = |netns: &Netns| {
        let link = netns.ip(&["-d", "link", "show", "weir-mesh"]);
        if link.contains("multi_queue numqueues 2 ") {
            2
        } else if link.contains("multi_queue") {
            panic!("an unexpected number of queues: {link}")
        } else {
            1
        }
    };
    assert_eq!(tun_queues(&west.netns), 1, "west's TUN has one queue");
    assert_eq!(tun_queues(&east.netns), 2, "east's TUN has two queues");

    let (client, client_ip) = west.add_pod("client", "shop", "mcl");
    let (intruder, intruder_ip) = west.add_pod("intruder", "dev", "min");
    let (server, server_ip) = east.add_pod("server", "pay", "msv");
    serve(&server, server_ip);
    serve(&client, client_ip);
    let _ = intruder_ip;

    // No policy: everything crosses, both ways, TCP, UDP and ICMP.
    let wait = Duration::from_secs(30);
    eventually("TCP west → east", wait, || {
        tcp::connects(&client, server_ip)
    });
    eventually("TCP east → west", wait, || {
        tcp::connects(&server, client_ip)
    });
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
                tcp::connects(&client, server_ip) == client_allowed
                    && tcp::connects(&intruder, server_ip) == intruder_allowed
            },
        );
    }

    std::fs::write(east.manifests().join("policy.yaml"), policy(table[1].1)).unwrap();
    eventually("back to one remote team", wait, || {
        tcp::connects(&client, server_ip) && !tcp::connects(&intruder, server_ip)
    });

    // The WAN down for 10 s (the scenario's length, not a wait for state): nothing imported is
    // deleted meanwhile, and traffic resumes by itself once it is back.
    wan.ip(&["link", "set", "w0", "down"]);
    thread::sleep(Duration::from_secs(10));
    assert!(!tcp::connects(&client, server_ip), "the WAN is down");
    let import = std::fs::read_to_string(east.dirs.state.join("mesh/west.json")).unwrap();
    assert!(
        import.contains(&client_ip.to_string()),
        "west's client is still imported while the link is down"
    );
    wan.ip(&["link", "set", "w0", "up"]);
    eventually("traffic resumes after the link is back", wait, || {
        tcp::connects(&client, server_ip) && tcp::connects(&server, client_ip)
    });
    assert!(
        !tcp::connects(&intruder, server_ip),
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
        east.start_with(&east_args)
    };
    assert!(
        east_agent
            .log_text()
            .contains("restored the import of a mesh peer"),
        "{}",
        east_agent.log_text()
    );
    eventually("the client crosses again after the restart", wait, || {
        tcp::connects(&client, server_ip)
    });
    assert!(
        !tcp::connects(&intruder, server_ip),
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
        format!("{}---\n{}", namespace_yaml("shop"), namespace_yaml("dev")),
    )
    .unwrap();
    std::fs::write(east.manifests().join("ns.yaml"), namespace_yaml("pay")).unwrap();
    let west_agent = west.start();
    let east_agent = east.start();
    let worker_agent = worker.start();

    let (client, client_ip) = west.add_pod("client", "shop", "mkcl");
    let (intruder, _) = west.add_pod("intruder", "dev", "mkin");
    // The server runs on the worker, which has no mesh certificate and no route to west but
    // through its gateway.
    let (server, server_ip) = worker.add_pod("server", "pay", "mksv");
    serve(&server, server_ip);
    serve(&client, client_ip);
    let routes = worker.netns.ip(&["route", "show", WEST_PODS]);
    assert!(
        routes.contains("via 192.168.91.1"),
        "the worker routes west's pods to its gateway: {routes}"
    );

    let wait = Duration::from_secs(30);
    eventually("TCP west → east's worker", wait, || {
        tcp::connects(&client, server_ip)
    });
    eventually("TCP east's worker → west", wait, || {
        tcp::connects(&server, client_ip)
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
        tcp::connects(&client, server_ip) && !tcp::connects(&intruder, server_ip)
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
        tcp::connects(&client, server_ip)
    });
    assert!(
        !tcp::connects(&intruder, server_ip),
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
    assert!(
        !tcp::connects(&client, server_ip),
        "nothing crosses any more"
    );
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
        mesh_peer_yaml("east", EAST_ENDPOINT, &both, EAST_PODS),
    )
    .unwrap();
    let east_ca = lab.east.dirs.root.join("mesh-ca.pem");
    std::fs::write(&east_ca, &both).unwrap();
    lab.east
        .args
        .extend(["--mesh-ca".into(), east_ca.display().to_string()]);
    let (west, east) = (&lab.west, &lab.east);
    std::fs::write(west.manifests().join("ns.yaml"), namespace_yaml("shop")).unwrap();
    std::fs::write(east.manifests().join("ns.yaml"), namespace_yaml("pay")).unwrap();
    let west_agent = west.start();
    let east_agent = east.start();
    let (client, _) = west.add_pod("client", "shop", "mrcl");
    let (server, server_ip) = east.add_pod("server", "pay", "mrsv");
    serve(&server, server_ip);
    serve_echo(&server);
    let wait = Duration::from_secs(30);
    eventually("TCP west → east", wait, || {
        tcp::connects(&client, server_ip)
    });

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
        "make before break: {answered} of {sent} probes answered\nwest:\n{}\neast:\n{}",
        west_agent.log_text(),
        east_agent.log_text()
    );

    // West now trusts only the second CA for east, and a fresh session (west restarted) comes
    // up: east presents the certificate of its good rotation, not a refused one.
    std::fs::write(
        west.manifests().join("peer.yaml"),
        mesh_peer_yaml("east", EAST_ENDPOINT, &ca2.pem(), EAST_PODS),
    )
    .unwrap();
    west_agent.stop(nix::sys::signal::Signal::SIGTERM);
    let west_agent = west.start();
    eventually(
        "a new session with east's rotated certificate",
        wait,
        || tcp::connects(&client, server_ip),
    );
    assert!(
        !west_agent.log_text().contains("mesh handshake refused"),
        "{}",
        west_agent.log_text()
    );
    drop((west_agent, east_agent, conn));
    drop((client, server));
}
