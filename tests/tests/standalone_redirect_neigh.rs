//! Pod traffic to another node through `bpf_redirect_neigh`, through the standalone contract: two
//! node namespaces on one underlay link, the real agent on each (native routing, then the VXLAN
//! overlay), pods wired by the real `weir-cni`, and policy on both sides: the client's egress
//! admits only the server, the server's ingress admits only the client. The allowed connection
//! leaves the client's node by the shortcut (its pinned path counters say so); the intruder is
//! dropped by the server's node and the drop explained there; the client's egress drop of the
//! other pod is explained on its own node. With `--redirect-remote-pods false` the same traffic
//! takes the stack. Root only; never skipped.

use std::{
    net::IpAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use serde_json::Value;
use weir_common::{COUNTER_PATH_REDIRECT_NEIGH, COUNTER_PATH_STACK, MAP_COUNTERS};
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::Netns,
    tcp::{connects, serve},
};

const PATIENCE: Duration = Duration::from_secs(10);

fn node(name: &str, cidr: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDRs: ['{cidr}']}}\n\
         status: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
    )
}

fn pod(name: &str, node: &str, ip: Option<IpAddr>) -> String {
    let status = ip.map_or(String::new(), |ip| {
        format!("status: {{podIPs: [{{ip: '{ip}'}}]}}\n")
    });
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n{status}"
    )
}

/// The client may only talk to the server; the server only hears the client.
const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-server, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]
";

/// The path counters in an agent's pinned counters map: (neighbour redirect, stack).
fn paths(bpffs: &Path) -> (u64, u64) {
    let data = MapData::from_pin(bpffs.join("maps").join(MAP_COUNTERS)).expect("pinned counters");
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
    let sum = |slot: u32| -> u64 { counters.get(&slot, 0).expect("slot").iter().sum() };
    (sum(COUNTER_PATH_REDIRECT_NEIGH), sum(COUNTER_PATH_STACK))
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn flows(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(state.join("flows.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether `state`'s flow log explains a drop of `src`'s traffic by `endpoint`'s `direction`
/// policy, for one of `reasons`.
fn explained(state: &Path, src: IpAddr, direction: &str, endpoint: &str, reasons: &[&str]) -> bool {
    let src = src.to_string();
    flows(state).iter().any(|f| {
        f["src"] == src.as_str()
            && reasons.iter().any(|r| f["reason"] == *r)
            && f["direction"] == direction
            && f["endpoint"] == endpoint
    })
}

#[test]
fn other_nodes_pods_are_reached_through_redirect_neigh_with_policy_on_both_sides() {
    across_nodes("rn", &[]);
}

#[test]
fn the_neighbour_shortcut_feeds_the_vxlan_overlay_too() {
    across_nodes("rv", &["--overlay", "vxlan"]);
}

fn across_nodes(tag: &str, args: &[&str]) {
    let (n1, n2) = (
        Netns::new(&format!("{tag}1")),
        Netns::new(&format!("{tag}2")),
    );
    n1.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &n2.name,
    ]);
    n1.ip(&["addr", "add", "192.168.78.1/24", "dev", "eth0"]);
    n2.ip(&["addr", "add", "192.168.78.2/24", "dev", "eth0"]);
    n1.ip(&["link", "set", "eth0", "up"]);
    n2.ip(&["link", "set", "eth0", "up"]);

    let d1 = AgentDirs::new(tag, "n1");
    let d2 = AgentDirs::sharing_manifests(tag, "n2", &d1);
    let m = d1.manifests.clone();
    std::fs::write(
        m.join("n1.yaml"),
        node("n1", "10.152.1.0/24", "192.168.78.1"),
    )
    .unwrap();
    std::fs::write(
        m.join("n2.yaml"),
        node("n2", "10.152.2.0/24", "192.168.78.2"),
    )
    .unwrap();
    let pods = [
        ("client", "n1"),
        ("intruder", "n1"),
        ("server", "n2"),
        ("other", "n2"),
    ];
    for (name, node_name) in pods {
        std::fs::write(m.join(format!("{name}.yaml")), pod(name, node_name, None)).unwrap();
    }
    std::fs::write(m.join("policies.yaml"), POLICIES).unwrap();
    let mut agent1 = Agent::start(&n1, "n1", &d1, args);
    let _agent2 = Agent::start(&n2, "n2", &d2, args);

    let p1 = Plugin::new(&n1.name, &d1.socket, &d1.root.join("cni.log"));
    let p2 = Plugin::new(&n2.name, &d2.socket, &d2.root.join("cni.log"));
    let netns: Vec<Netns> = pods
        .iter()
        .map(|(name, _)| Netns::new(&format!("{tag}{}", &name[..3])))
        .collect();
    let mut ips = Vec::new();
    for ((name, node_name), ns) in pods.iter().zip(&netns) {
        let plugin = if *node_name == "n1" { &p1 } else { &p2 };
        let id = format!("ctr-{tag}-{name}");
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
            pod(name, node_name, Some(ip)),
        )
        .unwrap();
        ips.push(ip);
    }
    let (client, intruder, server, other) = (&netns[0], &netns[1], &netns[2], &netns[3]);
    let (client_ip, intruder_ip, server_ip, other_ip) = (ips[0], ips[1], ips[2], ips[3]);
    serve(server, server_ip);
    serve(other, other_ip);

    let before = paths(&d1.bpffs);
    eventually("the client reaches the server on the other node", || {
        connects(client, server_ip)
    });
    let after = paths(&d1.bpffs);
    assert!(
        after.0 > before.0,
        "no packet took bpf_redirect_neigh: {before:?} -> {after:?}\n{}",
        agent1.log_text()
    );
    // The server's node checks its ingress: the intruder is dropped there, and explained.
    assert!(
        !connects(intruder, server_ip),
        "the intruder reached the server"
    );
    eventually(
        "the intruder's drop is explained on the server's node",
        || {
            // The server node's XDP filter on its uplink drops the SYN first (over the overlay,
            // the pod packet inside the tunnel packet); `weir_to_pod` would drop it next.
            explained(
                &d2.state,
                intruder_ip,
                "ingress",
                "default/server",
                &["xdp-policy-denied", "policy-denied"],
            )
        },
    );
    // The client's node checks its egress before any shortcut.
    assert!(
        !connects(client, other_ip),
        "the client reached another pod"
    );
    eventually("the client's egress drop is explained on its node", || {
        explained(
            &d1.state,
            client_ip,
            "egress",
            "default/client",
            &["policy-denied"],
        )
    });

    // Turned off: the same traffic takes the stack.
    agent1.child.kill().unwrap();
    agent1.child.wait().unwrap();
    let mut off = args.to_vec();
    off.extend(["--redirect-remote-pods", "false"]);
    agent1 = Agent::start(&n1, "n1", &d1, &off);
    eventually("the client's traffic takes the stack", || {
        let before = paths(&d1.bpffs);
        connects(client, server_ip) && {
            let after = paths(&d1.bpffs);
            after.0 == before.0 && after.1 > before.1
        }
    });
    assert!(
        !connects(intruder, server_ip),
        "the intruder reached the server without the shortcut"
    );
    drop(agent1);
}
