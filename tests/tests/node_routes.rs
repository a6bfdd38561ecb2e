//! Native routing between nodes: each agent routes the other nodes' pod CIDRs (from their Node
//! objects) via their InternalIP, pods on different nodes talk over it, the receiving node
//! enforces by the sender's identity, and a Node that goes away takes its route with it.
//! Root only; never skipped.

use std::{net::IpAddr, time::Duration};

use weir_tests::tcp::{connects, eventually_connects, serve};
use weir_tests::{agent::Agent, netns::Netns, nodes::TwoNodes, wait::eventually};

fn routes(netns: &Netns) -> String {
    netns.ip(&["route", "show", "proto", "87"])
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
    let two = TwoNodes::new(tag, "192.168.77", "10.151");
    let (n1, n2, d2, m) = (&two.n1, &two.n2, &two.d2, two.manifests());
    let pods = [
        ("client", "n1", "client"),
        ("intruder", "n1", "intruder"),
        ("server", "n2", "server"),
    ];
    two.declare_pods(&pods);
    let a1 = Agent::start(n1, "n1", &two.d1, args);
    let a2 = Agent::start(n2, "n2", d2, args);
    assert!(routes(n1).contains(route1), "n1 routes: {}", routes(n1));
    assert!(routes(n2).contains(route2), "n2 routes: {}", routes(n2));

    // As kubelet does: the address is published so the other node learns it.
    let started = two.start_pods(&pods);
    let netns: Vec<&Netns> = started.iter().map(|p| &p.netns).collect();
    let ips: Vec<IpAddr> = started.iter().map(|p| p.ip).collect();
    let server_ip = ips[2];
    serve(netns[2], server_ip);
    assert!(
        eventually_connects(netns[0], server_ip),
        "client reaches the server on the other node"
    );
    assert!(
        eventually_connects(netns[1], server_ip),
        "no policy yet: the intruder reaches it too"
    );

    // The server's node enforces ingress by the sender's identity (from the client's pod IP).
    std::fs::write(
        m.join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\n\
         spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n",
    )
    .unwrap();
    eventually(
        "the intruder is denied across nodes",
        Duration::from_secs(3),
        || !connects(netns[1], server_ip),
    );
    assert!(
        eventually_connects(netns[0], server_ip),
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
    std::fs::remove_file(two.node_file("n2")).unwrap();
    eventually("n2's route is removed", Duration::from_secs(3), || {
        !routes(n1).contains("10.151.2.0/24")
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
    assert_eq!(routes(n2).trim(), "", "uninstall left routes behind");
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
