//! CNI ADD and DEL latency against the real agent (enforcement in the datapath when ADD returns),
//! one at a time and 16 at once, as kubelet would run the plugin: directly, in the node's network
//! namespace (the forking thread is inside it, so the plugin inherits it).
//!
//! With `WEIR_BENCH_BASELINE_AGENT=<path to another weir-agent build>` the same measurements run
//! against that build too, right after, each next to its own floor.

use std::{path::Path, sync::Arc, time::Duration};

use super::stats::{Samples, ms};
use crate::{
    agent::{Agent, AgentDirs, ClusterSource, bin},
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

/// Runs `f` for every pod at the same time (a thread each); returns what each returned.
fn at_once<T: Send>(pods: &[Netns], f: impl Fn(usize, &Netns) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let f = &f;
                s.spawn(move || f(i, pod))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a benchmark thread panicked"))
            .collect()
    })
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    measure(&bin("weir-agent"), "this build", rounds)?;
    if let Some(baseline) = std::env::var_os("WEIR_BENCH_BASELINE_AGENT") {
        measure(Path::new(&baseline), "WEIR_BENCH_BASELINE_AGENT", rounds)?;
    }
    Ok(())
}

fn measure(agent_bin: &Path, which: &str, rounds: usize) -> anyhow::Result<()> {
    const PODS: usize = 16;
    let node = Netns::new("cbn");
    let dirs = AgentDirs::new("cnibench", NODE);
    std::fs::write(dirs.manifests.join("pods.yaml"), pods_yaml(PODS))?;
    let agent = Agent::start_with(
        agent_bin,
        ClusterSource::Manifests,
        &node,
        NODE,
        &dirs,
        &["--pod-cidr", "10.230.0.0/24"],
    );
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
        "CNI latency against the real agent ({which}: {}), {PODS} pods, {rounds} rounds (process spawn included):",
        agent_bin.display()
    );
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, pod) in pods.iter().enumerate() {
            add.push(timed("ADD", i, pod));
            del.push(timed("DEL", i, pod));
        }
    }
    report("one at a time", add, del);
    // The floor under 16 concurrent ADDs on this machine, measured in the same run: 16 processes
    // at once that each only create a veth pair with its peer in a pod's namespace (`ip link
    // add`, one netlink request), then delete it, so no ADD can beat the first line.
    let (mut floor_add, mut floor_del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (verb, floor) in [("add", &mut floor_add), ("del", &mut floor_del)] {
            floor.extend(at_once(&pods, |i, pod| {
                let veth = format!("flr{i}");
                // In the node's namespace, as the plugin's veths are (and gone with it).
                let mut ip = std::process::Command::new("ip");
                ip.args(["-n", &node.name]);
                match verb {
                    "add" => ip
                        .args(["link", "add", &veth, "type", "veth", "peer", "name"])
                        .args(["eth0", "netns", &pod.name]),
                    _ => ip.args(["link", "del", &veth]),
                };
                let started = std::time::Instant::now();
                let status = ip.status().expect("running ip");
                assert!(status.success(), "ip link {verb} {veth} failed");
                started.elapsed()
            }));
        }
    }
    report("floor (ip link)", floor_add.clone(), floor_del);
    let claim_p99 = pool_claims(&node, &pods, rounds);
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
            took[v].extend(at_once(&pods, |i, pod| timed(verb, i, pod)));
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
    let (floor_p99, add_p99) = (
        Samples::new(floor_add).percentile(99.0),
        Samples::new(add.clone()).percentile(99.0),
    );
    report("16 at once", add, del);
    println!(
        "  ADD p99 at 16 at once is {:.2}x the floor's p99 (16 processes at once creating only a veth pair)",
        add_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );
    println!(
        "  a pool's claim alone (no agent, no addresses) is {:.2}x the floor's p99",
        claim_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );
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

/// What a pool of pre-made veths (programs attached beforehand) would pay to hand one out, 16 at
/// once, in the same run as the floor: the pair is made beforehand in the node's namespace (not
/// timed); a claim moves its peer into the pod's namespace as eth0 and renames the host end, in
/// one `ip` process, as a claim must (the pod's namespace exists only once the runtime asks for
/// the ADD). Returns the p99.
fn pool_claims(node: &Netns, pods: &[Netns], rounds: usize) -> Duration {
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(["-n", &node.name])
            .args(args)
            .status()
            .expect("running ip");
        assert!(status.success(), "ip {args:?} failed");
    };
    let mut claims = Vec::new();
    for _ in 0..rounds {
        for i in 0..pods.len() {
            let (host, peer) = (format!("pool{i}"), format!("poolp{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        }
        claims.extend(at_once(pods, |i, pod| {
            let started = std::time::Instant::now();
            let mut batch = std::process::Command::new("ip")
                .args(["-n", &node.name, "-batch", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("running ip");
            let commands = format!(
                "link set poolp{i} netns {} name eth0\nlink set pool{i} name claimed{i}\n",
                pod.name
            );
            let mut stdin = batch.stdin.take().expect("piped stdin");
            std::io::Write::write_all(&mut stdin, commands.as_bytes()).expect("writing to ip");
            drop(stdin);
            let status = batch.wait().expect("running ip");
            let took = started.elapsed();
            assert!(status.success(), "claiming pool{i} failed");
            took
        }));
        for i in 0..pods.len() {
            ip(&["link", "del", &format!("claimed{i}")]);
        }
    }
    let samples = Samples::new(claims);
    println!(
        "  {:<16} ADD p50 {:>9} p99 {:>9}   (a pre-made pair's peer moved into the pod, host end renamed)",
        "pool claim (ip)",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0)),
    );
    samples.percentile(99.0)
}
