//! Native routing between nodes: each agent routes the other nodes' pod CIDRs (from their Node
//! objects) via their InternalIP, pods on different nodes talk over it, the receiving node
//! enforces by the sender's identity, and a Node that goes away takes its route with it.
//! Root only; never skipped.

use std::{
    io::Write,
    net::{IpAddr, TcpListener},
    thread,
    time::{Duration, Instant},
};

use weir_tests::tcp::{PORT, connects};
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
};

fn node(name: &str, cidr: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDRs: ['{cidr}']}}\n\
         status: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
    )
}

fn pod(name: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: {PORT}}}]}}]}}\n"
    )
}

fn with_ip(pod_yaml: &str, ip: IpAddr) -> String {
    format!("{pod_yaml}status: {{podIPs: [{{ip: '{ip}'}}]}}\n")
}

fn routes(netns: &Netns) -> String {
    netns.ip(&["route", "show", "proto", "87"])
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 3 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agents_route_pod_cidrs_between_nodes_and_enforce_by_identity() {
    cross_node(
        "rt",
        &[],
        "10.151.2.0/24 via 192.168.77.2",
        "10.151.1.0/24 via 192.168.77.1",
    );
}

#[test]
fn the_vxlan_overlay_carries_pods_between_nodes_and_keeps_identity() {
    cross_node(
        "vx",
        &["--overlay", "vxlan"],
        "10.151.2.0/24 via 10.151.2.0 dev weir-vxlan",
        "10.151.1.0/24 via 10.151.1.0 dev weir-vxlan",
    );
}

/// Two node namespaces on one underlay link, an agent each (with `args`), pods wired by the
/// plugin on both, traffic and a policy across them. `route1`/`route2`: what each node's route
/// to the other's pod CIDR must look like.
fn cross_node(tag: &str, args: &[&str], route1: &str, route2: &str) {
    let (n1, n2) = (
        Netns::new(&format!("{tag}1")),
        Netns::new(&format!("{tag}2")),
    );
    // The underlay: one veth between the two node namespaces.
    n1.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &n2.name,
    ]);
    n1.ip(&["addr", "add", "192.168.77.1/24", "dev", "eth0"]);
    n2.ip(&["addr", "add", "192.168.77.2/24", "dev", "eth0"]);
    n1.ip(&["link", "set", "eth0", "up"]);
    n2.ip(&["link", "set", "eth0", "up"]);

    let d1 = AgentDirs::new(tag, "n1");
    let d2 = AgentDirs::sharing_manifests(tag, "n2", &d1);
    let m = &d1.manifests; // one shared directory, as one API server
    let nodes = [
        ("n1.yaml", node("n1", "10.151.1.0/24", "192.168.77.1")),
        ("n2.yaml", node("n2", "10.151.2.0/24", "192.168.77.2")),
    ];
    for (file, yaml) in &nodes {
        std::fs::write(m.join(file), yaml).unwrap();
    }
    let pods = [
        ("client", "n1", "client"),
        ("intruder", "n1", "intruder"),
        ("server", "n2", "server"),
    ];
    for (name, node, app) in pods {
        std::fs::write(m.join(format!("{name}.yaml")), pod(name, node, app)).unwrap();
    }
    let a1 = Agent::start(&n1, "n1", &d1, args);
    let a2 = Agent::start(&n2, "n2", &d2, args);
    assert!(routes(&n1).contains(route1), "n1 routes: {}", routes(&n1));
    assert!(routes(&n2).contains(route2), "n2 routes: {}", routes(&n2));

    let p1 = Plugin::new(&n1.name, &d1.socket, &d1.root.join("cni.log"));
    let p2 = Plugin::new(&n2.name, &d2.socket, &d2.root.join("cni.log"));
    let mut ips = Vec::new();
    let netns: Vec<Netns> = pods
        .iter()
        .map(|(name, _, _)| Netns::new(&format!("{tag}{}", &name[..3])))
        .collect();
    for ((name, node, app), ns) in pods.iter().zip(&netns) {
        let plugin = if *node == "n1" { &p1 } else { &p2 };
        let id = format!("ctr-{name}");
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &id,
                namespace: "default",
                name,
                netns: &ns.name,
            },
        );
        let ip = first_address(&out);
        // As kubelet does: publish the address so the other node learns it.
        std::fs::write(
            m.join(format!("{name}.yaml")),
            with_ip(&pod(name, node, app), ip),
        )
        .unwrap();
        ips.push(ip);
    }
    let server_ip = ips[2];
    spawn_in(netns[2].path(), move || {
        let listener = TcpListener::bind((server_ip, PORT)).unwrap();
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hi");
        }
    });
    eventually("client reaches the server on the other node", || {
        connects(&netns[0], server_ip)
    });
    assert!(
        connects(&netns[1], server_ip),
        "no policy yet: the intruder reaches it too"
    );

    // The server's node enforces ingress by the sender's identity (from the client's pod IP).
    std::fs::write(
        m.join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\n\
         spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n",
    )
    .unwrap();
    eventually("the intruder is denied across nodes", || {
        !connects(&netns[1], server_ip)
    });
    assert!(
        connects(&netns[0], server_ip),
        "the client is still allowed across nodes"
    );

    // With the overlay, the traffic really went through the tunnel.
    if args.contains(&"vxlan") {
        let stats = n1.ip(&["-s", "link", "show", "weir-vxlan"]);
        // The line after "TX:" holds bytes, packets, ...
        let tx_packets: u64 = stats
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("TX:"))
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        assert!(tx_packets > 0, "nothing went through the tunnel:\n{stats}");
    }
    // A Node that goes away takes its route with it.
    std::fs::remove_file(m.join("n2.yaml")).unwrap();
    eventually("n2's route is removed", || {
        !routes(&n1).contains("10.151.2.0/24")
    });
    // Each pod's host veth carries Weir's two programs as clsact filters.
    let n2_veths: Vec<String> = n2
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split('@').next().map(str::to_owned))
        .filter(|name| weir_proto::naming::is_host_veth_name(name))
        .collect();
    assert!(!n2_veths.is_empty(), "no Weir host veth on n2");
    for veth in &n2_veths {
        for (hook, program) in [("ingress", "from_pod"), ("egress", "to_pod")] {
            let filters = n2.tc_filters(veth, hook);
            assert!(
                filters.contains(program) && filters.contains("direct-action"),
                "{veth} has no {program} filter at tc {hook}:\n{filters}"
            );
        }
    }
    // Removing Weir from a node takes its programs, routes and overlay device too.
    drop((a1, a2));
    let out = n2
        .command(weir_tests::agent::bin("weir-agent").to_str().unwrap())
        .args(["uninstall", "--node-name", "n2", "--bpffs-dir"])
        .arg(&d2.bpffs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(routes(&n2).trim(), "", "uninstall left routes behind");
    for veth in &n2_veths {
        for hook in ["ingress", "egress"] {
            let filters = n2.tc_filters(veth, hook);
            assert!(
                filters.trim().is_empty(),
                "uninstall left filters on {veth} at tc {hook}:\n{filters}"
            );
        }
    }
    assert!(
        !n2.ip(&["link"]).contains("weir-vxlan"),
        "uninstall left the overlay device"
    );
}
