//! CNI ADD and DEL latency against the real agent (enforcement in the datapath when ADD returns),
//! one at a time and 16 at once, as kubelet would run the plugin: directly, in the node's network
//! namespace (the forking thread is inside it, so the plugin inherits it).

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use super::stats::{Samples, ms};
use crate::{
    agent::{Agent, AgentDirs, bin},
    netns::{Netns, spawn_in},
};

const NODE: &str = "bench";

fn pods_yaml(n: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: cb\n");
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: cb\n  labels:\n    app: a{}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n",
            i % 4
        ));
    }
    // A policy, so ADD has real rules to put in place.
    y.push_str("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: cb\nspec:\n  podSelector:\n    matchLabels:\n      app: a1\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: a0\n    ports:\n    - port: 80\n");
    y
}

struct Plugin {
    node_netns: String,
    config: String,
}

impl Plugin {
    /// Runs one verb for pod `i` (in netns `pod_netns`); returns how long it took.
    fn run(&self, verb: &str, i: usize, pod_netns: &str) -> Duration {
        let (node, config, pod_netns) = (
            format!("/run/netns/{}", self.node_netns),
            self.config.clone(),
            format!("/run/netns/{pod_netns}"),
        );
        let verb = verb.to_owned();
        spawn_in(node, move || {
            let started = Instant::now();
            let mut child = Command::new(bin("weir-cni"))
                .env("CNI_COMMAND", &verb)
                .env("CNI_CONTAINERID", format!("bench-{i}"))
                .env("CNI_NETNS", &pod_netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/opt/cni/bin")
                .env(
                    "CNI_ARGS",
                    format!("K8S_POD_NAMESPACE=cb;K8S_POD_NAME=p{i}"),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning weir-cni");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(config.as_bytes())
                .expect("writing the config");
            let out = child.wait_with_output().expect("waiting for weir-cni");
            assert!(
                out.status.success(),
                "weir-cni {verb} of pod {i} failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            started.elapsed()
        })
        .join()
        .expect("plugin thread panicked")
    }
}

fn report(what: &str, add: Vec<Duration>, del: Vec<Duration>) {
    let (add, del) = (Samples::new(add), Samples::new(del));
    println!(
        "  {what:<16} ADD p50 {:>9} p99 {:>9}   DEL p50 {:>9} p99 {:>9}",
        ms(add.percentile(50.0)),
        ms(add.percentile(99.0)),
        ms(del.percentile(50.0)),
        ms(del.percentile(99.0))
    );
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    const PODS: usize = 16;
    let node = Netns::new("cbn");
    let dirs = AgentDirs::new("cnibench", NODE);
    std::fs::write(dirs.manifests.join("pods.yaml"), pods_yaml(PODS))?;
    let _agent = Agent::start(&node, NODE, &dirs, &["--pod-cidr", "10.230.0.0/24"]);
    let pods: Vec<Netns> = (0..PODS).map(|i| Netns::new(&format!("cb{i}"))).collect();
    let plugin = Arc::new(Plugin {
        node_netns: node.name.clone(),
        config: format!(
            r#"{{"cniVersion":"1.1.0","name":"weir","type":"weir-cni","agentSocket":"{}","logFile":"{}"}}"#,
            dirs.socket.display(),
            dirs.root.join("cni.log").display()
        ),
    });
    println!(
        "CNI latency against the real agent, {PODS} pods, {rounds} rounds (process spawn included):"
    );
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, pod) in pods.iter().enumerate() {
            add.push(plugin.run("ADD", i, &pod.name));
            del.push(plugin.run("DEL", i, &pod.name));
        }
    }
    report("one at a time", add, del);
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for verb in ["ADD", "DEL"] {
            let took: Vec<Duration> = std::thread::scope(|s| {
                let handles: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| {
                        let plugin = plugin.clone();
                        s.spawn(move || plugin.run(verb, i, &pod.name))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("join"))
                    .collect()
            });
            if verb == "ADD" {
                add.extend(took)
            } else {
                del.extend(took)
            }
        }
    }
    report("16 at once", add, del);
    println!("  goal: ADD p99 <= 30 ms at 16 concurrent");
    Ok(())
}
