//! A drop is explained by the policies in force when it happened. The moment a policy change
//! starts dropping a flow is the moment an operator looks at `weir flows`: the first drops must
//! already name the new policy, not the state before it. Root only; never skipped.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use weir_tests::applied::{APPLY_TIMEOUT, wait_applied};
use weir_tests::tcp::{PORT, eventually_connects, serve};
use weir_tests::{
    agent::{Agent, AgentDirs, flows},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
    wait::eventually,
};

const NODE: &str = "n1";
const UNRELATED_POLICIES: usize = 1000;

fn pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {NODE}, containers: [{{name: c}}]}}\n"
    )
}

/// Sends UDP datagrams from `from` to `to` every 200 µs until `stop` is set, so that whatever
/// policy change starts dropping them is caught in its first moments.
fn udp_stream(from: &Netns, to: IpAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    spawn_in(from.path(), move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            if socket.send_to(b"probe", SocketAddr::new(to, PORT)).is_ok() {
                sent += 1;
            }
            thread::sleep(Duration::from_micros(200));
        }
        sent
    })
}

#[test]
fn drops_right_after_a_policy_change_name_the_new_policy() {
    let node = Netns::new("dx");
    let dirs = AgentDirs::new("dx", NODE);
    for name in ["client", "server"] {
        std::fs::write(dirs.manifests.join(format!("{name}.yaml")), pod(name)).unwrap();
    }
    // Unrelated policies make the explainer's rebuild take a while, as in a real cluster.
    let unrelated: String = (0..UNRELATED_POLICIES)
        .map(|i| {
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: other-{i}, namespace: default}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: other-{i}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: peer-{i}}}}}}}]}}]}}\n"
            )
        })
        .collect();
    std::fs::write(dirs.manifests.join("unrelated.yaml"), unrelated).unwrap();
    let agent = Agent::start(&node, NODE, &dirs, &["--pod-cidr", "10.213.1.0/24"]);
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let wire = |name: &str| {
        let netns = Netns::new(&format!("dx{}", &name[..3]));
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &format!("ctr-{name}"),
                namespace: "default",
                name,
                netns: &netns.name,
            },
        );
        let ip = first_address(&out);
        (netns, ip)
    };
    let (client, client_ip) = wire("client");
    let (server, server_ip) = wire("server");
    serve(&server, server_ip);
    assert!(
        eventually_connects(&client, server_ip),
        "no policy: the client reaches the server"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let stream = udp_stream(&client, server_ip, stop.clone());
    std::fs::write(
        dirs.manifests.join("deny.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-server, namespace: default}\n\
         spec: {podSelector: {matchLabels: {app: server}}, policyTypes: [Ingress]}\n",
    )
    .unwrap();
    wait_applied(&dirs.socket, &dirs.manifests, APPLY_TIMEOUT);
    let client_ip = client_ip.to_string();
    let denied = |f: &serde_json::Value| {
        f["verdict"] == "drop" && f["src"] == client_ip.as_str() && f["proto"] == "UDP"
    };
    eventually(
        "the client's datagrams are dropped and reported",
        Duration::from_secs(10),
        || flows(&dirs.state).iter().any(denied),
    );
    stop.store(true, Ordering::Relaxed);
    assert!(stream.join().unwrap() > 0, "the stream sent nothing");

    let drops: Vec<_> = flows(&dirs.state).into_iter().filter(denied).collect();
    let first = &drops[0];
    assert_eq!(first["endpoint"], "default/server", "{first}");
    // Revoked if the stream's first datagram beat the policy (its flow is then established).
    assert!(
        first["reason"] == "revoked" || first["reason"] == "policy-denied",
        "{first}"
    );
    for drop in &drops {
        assert_eq!(
            drop["policies"],
            serde_json::json!(["default/deny-server"]),
            "a drop explained by the state before the change ({} drops reported); agent log:\n{}",
            drops.len(),
            agent.log_text()
        );
    }
}
