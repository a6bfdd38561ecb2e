//! CNI ADD and DEL latency against the real agent (enforcement in the datapath when ADD returns),
//! one at a time and 16 at once, as kubelet would run the plugin: directly, in the node's network
//! namespace (the forking thread is inside it, so the plugin inherits it).

use std::{sync::Arc, time::Duration};

use super::stats::{Samples, ms};
use crate::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef},
    cpu::CpuTime,
    netns::Netns,
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

fn pod_ref<'a>(container_id: &'a str, name: &'a str, netns: &'a str) -> PodRef<'a> {
    PodRef {
        container_id,
        namespace: "cb",
        name,
        netns,
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
    let agent = Agent::start(&node, NODE, &dirs, &["--pod-cidr", "10.230.0.0/24"]);
    let pods: Vec<Netns> = (0..PODS).map(|i| Netns::new(&format!("cb{i}"))).collect();
    let plugin = Arc::new(Plugin::new(
        &node.name,
        &dirs.socket,
        &dirs.root.join("cni.log"),
    ));
    let names: Vec<(String, String)> = (0..PODS)
        .map(|i| (format!("bench-{i}"), format!("p{i}")))
        .collect();
    let timed = |verb: &str, i: usize, pod: &Netns| {
        let (id, name) = &names[i];
        plugin.ok(verb, &pod_ref(id, name, &pod.name)).1
    };
    println!(
        "CNI latency against the real agent, {PODS} pods, {rounds} rounds (process spawn included):"
    );
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, pod) in pods.iter().enumerate() {
            add.push(timed("ADD", i, pod));
            del.push(timed("DEL", i, pod));
        }
    }
    report("one at a time", add, del);
    // CPU per verb: the plugin processes, the agent, and the whole machine (kernel threads and
    // interrupts included, e.g. the work a veth's deletion defers).
    let agent_pid = agent.child.id();
    let mut took = [Vec::new(), Vec::new()];
    let mut used = [[CpuTime::default(); 3]; 2];
    let mut wall = [Duration::ZERO; 2];
    for _ in 0..rounds {
        for (v, verb) in ["ADD", "DEL"].into_iter().enumerate() {
            let before = [
                CpuTime::children(),
                CpuTime::of_process(agent_pid),
                CpuTime::machine(),
            ];
            let started = std::time::Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| {
                        let timed = &timed;
                        s.spawn(move || timed(verb, i, pod))
                    })
                    .collect();
                took[v].extend(handles.into_iter().map(|h| h.join().expect("join")));
            });
            wall[v] += started.elapsed();
            let after = [
                CpuTime::children(),
                CpuTime::of_process(agent_pid),
                CpuTime::machine(),
            ];
            for k in 0..3 {
                used[v][k] = used[v][k].plus(after[k].since(before[k]));
            }
        }
    }
    let [add, del] = took;
    report("16 at once", add, del);
    // On 2 cores, 16 concurrent ADDs cannot finish sooner than their CPU time allows.
    let calls = (rounds * PODS) as u32;
    let per_call = |used: CpuTime| {
        format!(
            "{} user + {} system",
            ms(used.user / calls),
            ms(used.system / calls)
        )
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (v, verb) in ["ADD", "DEL"].into_iter().enumerate() {
        let [plugin, agent, machine] = used[v];
        println!(
            "  CPU per {verb} (16 at once): plugin process {}; agent {}; whole machine {} ({:.0} % of {cores} cores)",
            per_call(plugin),
            per_call(agent),
            per_call(machine),
            machine.total().as_secs_f64() / (cores as f64 * wall[v].as_secs_f64()) * 100.0
        );
    }
    // The logs outlive the run's directories, for a closer look at where the time went (the
    // plugin's lines carry its phase times).
    for (log, kept) in [
        (agent.log.clone(), "target/cni-bench-agent.log"),
        (dirs.root.join("cni.log"), "target/cni-bench-plugin.log"),
    ] {
        if std::fs::copy(&log, kept).is_ok() {
            println!("  kept: {kept}");
        }
    }
    println!("  goal: ADD p99 <= 30 ms at 16 concurrent");
    Ok(())
}
