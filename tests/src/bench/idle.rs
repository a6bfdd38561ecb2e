//! Idle cost: the CPU and memory of a real `weir-agent` that holds 1,000 pods and 10,000
//! NetworkPolicies while nothing changes, in standalone mode (a manifests directory, the policies
//! in one `kind: List` file) and in Kubernetes mode (the test API server). The baseline, in the
//! same run and over the same window, is the same agent holding the same pods and 1 policy; with
//! `WEIR_BENCH_BASELINE_AGENT=<path to another weir-agent build>` that build runs the 10,000
//! policy cases too.
//!
//! Every agent is its own node namespace with a few local pods wired through `weir-cni`; all of
//! them are measured at once, over the same window, after they have settled.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::objects::{self, list};
use crate::{
    agent::{Agent, AgentDirs, ClusterSource, bin, health_get, metric},
    cni::{Plugin, PodRef},
    cpu::CpuTime,
    kube_server::KubeServer,
    netns::{Netns, spawn_in},
};

const NODE: &str = "bench";
const PODS: usize = 1_000;
const LOCAL_PODS: usize = 3;
const NAMESPACES: usize = 10;
const REMOTE_NODES: usize = 9;
const POLICIES: usize = 10_000;
/// The agent's default health address, inside each node's namespace.
const HEALTH_PORT: u16 = 9876;
/// Agents just started or just given pods are still compiling; the window starts after this.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Standalone,
    Kubernetes,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Kubernetes => "kubernetes",
        }
    }
}

/// Namespaces, Nodes and Pods: the first `LOCAL_PODS` pods on this node (addresses from its
/// IPAM at ADD), the others spread over other nodes with their `status.podIPs`.
fn cluster() -> Vec<Value> {
    let mut objects: Vec<Value> = objects::namespaces(NAMESPACES).collect();
    for k in 0..=REMOTE_NODES {
        let cidr = format!("10.230.{k}.0/24");
        objects.push(objects::node(&objects::node_name(NODE, k), &cidr, None));
    }
    for i in 0..PODS {
        let local = i < LOCAL_PODS;
        let node = 1 + i % REMOTE_NODES;
        let labels = json!({"app": format!("a{}", i % 100), "tier": format!("t{}", i % 20)});
        let (node_name, ip) = if local {
            (NODE.to_owned(), None)
        } else {
            let ip = format!("10.230.{node}.{}", (i / REMOTE_NODES) % 250 + 2);
            (format!("n{node}"), Some(ip))
        };
        let namespace = format!("ns{}", i % NAMESPACES);
        objects.push(objects::pod(
            &format!("p{i}"),
            &namespace,
            labels,
            &node_name,
            ip,
        ));
    }
    objects
}

/// Policy `j`: selects one app in one namespace, admits a tier of the same namespace on a port,
/// a team of namespaces on the named port and, every tenth, an ipBlock with an except; egress
/// to another app on a port range.
fn policy(j: usize) -> Value {
    let mut ingress = vec![
        json!({"from": [{"podSelector": {"matchLabels": {"tier": format!("t{}", (j + 1) % 20)}}}],
            "ports": [{"port": 8000 + j % 100}]}),
        json!({"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 3)}}}],
            "ports": [{"port": "http"}]}),
    ];
    ingress.extend(objects::every_tenth_ip_block(j));
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("pol{j}"), "namespace": format!("ns{}", j % NAMESPACES)},
        "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", j % 100)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": format!("a{}", (j + 7) % 100)}}}],
                "ports": [{"port": 5432, "endPort": 5440}]}]}})
}

/// One agent under measurement, with what it needs; dropped in field order (the agent first,
/// its pins last).
struct Case {
    label: String,
    mode: Mode,
    agent: Agent,
    _pods: Vec<Netns>,
    server: Option<KubeServer>,
    node: Netns,
    _dirs: AgentDirs,
    ready_after: Duration,
}

impl Case {
    fn start(
        tag: &str,
        label: String,
        mode: Mode,
        policies: usize,
        program: &Path,
    ) -> anyhow::Result<Self> {
        let node = Netns::new(tag);
        let dirs = AgentDirs::new(tag, NODE);
        let policy_objects: Vec<Value> = (0..policies).map(policy).collect();
        let started = Instant::now();
        let kubeconfig = dirs.root.join("kubeconfig");
        let server = match mode {
            Mode::Standalone => {
                std::fs::write(dirs.manifests.join("cluster.json"), list(cluster()))?;
                std::fs::write(dirs.manifests.join("policies.json"), list(policy_objects))?;
                None
            }
            Mode::Kubernetes => {
                let listener = spawn_in(node.path(), || TcpListener::bind("127.0.0.1:0"))
                    .join()
                    .expect("binding in the node's namespace")?;
                let server = KubeServer::start_on(listener);
                for object in cluster().into_iter().chain(policy_objects) {
                    server.apply_value(object);
                }
                std::fs::write(&kubeconfig, server.kubeconfig())?;
                Some(server)
            }
        };
        let source = match mode {
            Mode::Standalone => ClusterSource::Manifests,
            Mode::Kubernetes => ClusterSource::Kubernetes {
                kubeconfig: &kubeconfig,
            },
        };
        let agent = Agent::start_with(
            program,
            source,
            &node,
            NODE,
            &dirs,
            &["--pod-cidr", "10.230.0.0/24"],
        );
        let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
        let mut pods = Vec::new();
        for i in 0..LOCAL_PODS {
            let pod = Netns::new(&format!("{tag}p{i}"));
            let (id, name, namespace) = (
                format!("{tag}-{i}"),
                format!("p{i}"),
                format!("ns{}", i % NAMESPACES),
            );
            plugin.ok(
                "ADD",
                &PodRef {
                    container_id: &id,
                    namespace: &namespace,
                    name: &name,
                    netns: &pod.name,
                },
            );
            pods.push(pod);
        }
        Ok(Self {
            label,
            mode,
            agent,
            _pods: pods,
            server,
            node,
            _dirs: dirs,
            ready_after: started.elapsed(),
        })
    }

    fn metrics(&self) -> String {
        health_get(&self.node, HEALTH_PORT, "/metrics").1
    }
}

/// What one agent did during the window.
struct Measured {
    cpu: CpuTime,
    rss_mib: f64,
    /// Counter increases during the window: states handed on, compiles, files parsed (`None`:
    /// the build does not export the counter).
    counters: [Option<u64>; 3],
}

const COUNTERS: [&str; 3] = [
    "weir_cluster_state_updates_total",
    "weir_policy_compiles_total",
    "weir_manifest_files_parsed_total",
];

fn counters(metrics: &str) -> [Option<u64>; 3] {
    COUNTERS.map(|name| metric(metrics, name))
}

fn percent_of_core(cpu: CpuTime, window: Duration) -> f64 {
    cpu.total().as_secs_f64() / window.as_secs_f64() * 100.0
}

pub fn run(window: Duration) -> anyhow::Result<()> {
    // The test API servers run on this runtime; it outlives the cases (declared first).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let weir = bin("weir-agent");
    let other: Option<PathBuf> = std::env::var_os("WEIR_BENCH_BASELINE_AGENT").map(Into::into);
    let mut plan: Vec<(String, Mode, usize, PathBuf)> = Vec::new();
    for mode in [Mode::Standalone, Mode::Kubernetes] {
        plan.push((format!("{}, 1 policy", mode.name()), mode, 1, weir.clone()));
        plan.push((
            format!("{}, 10,000 policies", mode.name()),
            mode,
            POLICIES,
            weir.clone(),
        ));
        if let Some(other) = &other {
            plan.push((
                format!("{}, 10,000 policies, baseline build", mode.name()),
                mode,
                POLICIES,
                other.clone(),
            ));
        }
    }
    println!(
        "idle agents: 1,000 pods ({LOCAL_PODS} local, wired through weir-cni), {NAMESPACES} namespaces; \
         each agent in its own node namespace, all measured over the same {} s window",
        window.as_secs()
    );
    if let Some(other) = &other {
        println!("  baseline build: {}", other.display());
    }
    let mut cases = Vec::new();
    for (i, (label, mode, policies, program)) in plan.into_iter().enumerate() {
        let case = Case::start(&format!("idle{i}"), label, mode, policies, &program)?;
        println!(
            "  started {:<44} ready with its pods after {:.1} s",
            case.label,
            case.ready_after.as_secs_f64()
        );
        cases.push(case);
    }
    std::thread::sleep(SETTLE);
    let before: Vec<(CpuTime, [Option<u64>; 3])> = cases
        .iter()
        .map(|c| {
            (
                CpuTime::of_process(c.agent.child.id()),
                counters(&c.metrics()),
            )
        })
        .collect();
    let started = Instant::now();
    // A quiet API server still sends bookmarks and ends watches now and then; halfway through
    // the window, every Kubernetes-mode agent gets both.
    std::thread::sleep(window / 2);
    for server in cases.iter().filter_map(|c| c.server.as_ref()) {
        server.bookmark();
        server.end_watches();
    }
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let elapsed = started.elapsed();
    let measured: Vec<Measured> = cases
        .iter()
        .zip(&before)
        .map(|(case, (cpu, counted))| {
            let now = counters(&case.metrics());
            let mut delta = [None; 3];
            for k in 0..3 {
                delta[k] = now[k].zip(counted[k]).map(|(a, b)| a.saturating_sub(b));
            }
            Measured {
                cpu: CpuTime::of_process(case.agent.child.id()).since(*cpu),
                rss_mib: case.agent.rss_mib(),
                counters: delta,
            }
        })
        .collect();

    let show = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    println!(
        "  {:<44} {:>9} {:>13} {:>9}   during the window: states / compiles / files parsed",
        "", "CPU", "of one core", "RSS"
    );
    for (case, m) in cases.iter().zip(&measured) {
        println!(
            "  {:<44} {:>7.2} s {:>11.2} % {:>5.1} MiB   {} / {} / {}",
            case.label,
            m.cpu.total().as_secs_f64(),
            percent_of_core(m.cpu, elapsed),
            m.rss_mib,
            show(m.counters[0]),
            show(m.counters[1]),
            // Kubernetes mode parses no files.
            show(m.counters[2].filter(|_| case.mode == Mode::Standalone)),
        );
    }
    // Each 10,000-policy case against the 1-policy case of its mode.
    for (case, m) in cases.iter().zip(&measured) {
        if !case.label.contains("10,000") {
            continue;
        }
        let mode = case.label.split(',').next().unwrap_or_default();
        let Some(base) = cases
            .iter()
            .zip(&measured)
            .find(|(c, _)| c.label == format!("{mode}, 1 policy"))
            .map(|(_, m)| m)
        else {
            continue;
        };
        // CPU time comes in clock ticks (10 ms); a ratio of a few ticks says nothing.
        let ratio = if base.cpu.total() < Duration::from_millis(100) {
            format!(
                "CPU ratio not meaningful (the 1-policy agent used {:.2} s)",
                base.cpu.total().as_secs_f64()
            )
        } else {
            format!(
                "{:.2}x the CPU of the 1-policy agent",
                m.cpu.total().as_secs_f64() / base.cpu.total().as_secs_f64()
            )
        };
        println!(
            "  {} vs 1 policy: {:+.2} % of one core, {ratio}; RSS {:.2}x ({:+.1} MiB)",
            case.label,
            percent_of_core(m.cpu, elapsed) - percent_of_core(base.cpu, elapsed),
            m.rss_mib / base.rss_mib.max(f64::MIN_POSITIVE),
            m.rss_mib - base.rss_mib
        );
    }
    println!("  goal: <= 1 % of one core with 10,000 policies, in both modes");
    drop(cases);
    Ok(())
}
