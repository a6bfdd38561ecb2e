//! Pod-to-pod delivery on one node through `bpf_redirect_peer`, through the standalone contract:
//! the real agent with a NetworkPolicy that admits TCP 8080 to b from a only, pods wired by the
//! real `weir-cni`, dual-stack. a reaches b over both families with the shortcut taken (the
//! pinned path counters say so), c is dropped by b's ingress, checked inline and explained as
//! b's drop in flows.jsonl; with `--redirect-local-pods false` the same traffic takes the stack.
//! Root only; never skipped.

use std::{io::Write, net::TcpListener, path::Path, time::Duration};

use aya::maps::{Map, MapData, PerCpuArray};
use weir_common::{COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, MAP_COUNTERS};
use weir_tests::tcp::{PORT, connects, eventually_connects};
use weir_tests::{
    agent::{Agent, AgentDirs, flows},
    cni::{Plugin, PodRef, addresses},
    netns::{Netns, spawn_in},
    wait::eventually,
};

const NODE: &str = "n1";
const PATIENCE: Duration = Duration::from_secs(10);

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: rd}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: rd, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: rd, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: rd, labels: {app: c}}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: rd}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;

/// The path counters in the agent's pinned counters map: (redirected, stack).
fn paths(bpffs: &Path) -> (u64, u64) {
    let data = MapData::from_pin(bpffs.join("maps").join(MAP_COUNTERS)).expect("pinned counters");
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
    let sum = |slot: u32| -> u64 { counters.get(&slot, 0).expect("slot").iter().sum() };
    (sum(COUNTER_PATH_REDIRECT_PEER), sum(COUNTER_PATH_STACK))
}

#[test]
fn local_pods_are_reached_through_redirect_peer_with_the_destinations_policy_enforced() {
    let node = Netns::new("rdn");
    let dirs = AgentDirs::new("rd", NODE);
    std::fs::write(dirs.manifests.join("rd.yaml"), MANIFESTS).unwrap();
    let args = ["--pod-cidr", "10.213.1.0/24,fd00:213:1::/64"];
    let agent = Agent::start(&node, NODE, &dirs, &args);
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let pods: Vec<(&str, Netns)> = ["a", "b", "c"]
        .into_iter()
        .map(|name| (name, Netns::new(&format!("rd{name}"))))
        .collect();
    let mut ips = Vec::new();
    for (name, netns) in &pods {
        let id = format!("ctr-rd-{name}");
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &id,
                namespace: "rd",
                name,
                netns: &netns.name,
            },
        );
        let addrs = addresses(&out).unwrap();
        assert_eq!(addrs.len(), 2, "dual-stack pod {name}: {out}");
        ips.push(addrs);
    }
    let (a, b, c) = (&pods[0].1, &pods[1].1, &pods[2].1);
    for &ip in &ips[1] {
        spawn_in(b.path(), move || {
            let listener = TcpListener::bind((ip, PORT)).unwrap();
            for mut s in listener.incoming().flatten() {
                let _ = s.write_all(b"hi");
            }
        });
    }

    for (family, index) in [("IPv4", 0), ("IPv6", 1)] {
        let b_ip = ips[1][index];
        let before = paths(&dirs.bpffs);
        assert!(eventually_connects(a, b_ip), "a reaches b over {family}");
        let after = paths(&dirs.bpffs);
        assert!(
            after.0 > before.0,
            "{family}: no packet took the redirect: {before:?} -> {after:?}\n{}",
            agent.log_text()
        );
        let c_ip = ips[2][index].to_string();
        // Each try is a denial check of its own and a new drop to explain, so the explanation
        // does not rest on the event of one SYN.
        eventually(
            &format!("c's drop over {family} is explained"),
            PATIENCE,
            || {
                assert!(!connects(c, b_ip), "{family}: c reached b");
                flows(&dirs.state).iter().any(|f| {
                    f["src"] == c_ip.as_str()
                        && f["reason"] == "policy-denied"
                        && f["direction"] == "ingress"
                        && f["endpoint"] == "rd/b"
                        && f["policies"] == serde_json::json!(["rd/b-from-a"])
                })
            },
        );
    }

    // Turned off: the same traffic goes through the node's stack (and b's own hook).
    drop(agent);
    let mut off_args = args.to_vec();
    off_args.extend(["--redirect-local-pods", "false"]);
    let agent = Agent::start(&node, NODE, &dirs, &off_args);
    let b_ip = ips[1][0];
    // The restarted agent writes the config when it has read the cluster: wait for the stack.
    eventually("allowed traffic takes the stack", PATIENCE, || {
        let before = paths(&dirs.bpffs);
        connects(a, b_ip) && {
            let after = paths(&dirs.bpffs);
            after.0 == before.0 && after.1 > before.1
        }
    });
    assert!(!connects(c, b_ip), "c reached b without the shortcut");
    drop(agent);
}
