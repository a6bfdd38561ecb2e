//! Scale: a real `weir-agent` in standalone mode on a node with 1,000 local pods (wired through
//! `weir-cni`), in a cluster of 10,000 pods on 10 nodes and 10,000 NetworkPolicies, all of them
//! objects in the agent's manifests directory. Measured over many rounds:
//! - one policy changed (its file rewritten) until the agent's maps are written;
//! - one pod added on another node (a new file) until this node's maps have it, with a label
//!   set that other pods already have and with a new one; and the same pod removed;
//! - the agent's RSS, and its CPU over an idle window.
//!
//! "Written" is read from the maps themselves: the config generation the writer bumps after
//! every write that changed something (`WEIR_CONFIG`, through its pin), polled without sleeping
//! more than a fraction of a millisecond; afterwards the agent's applied fingerprint (`weir
//! status`) must match the directory, so a round counts only the change it made.
//!
//! Same-run baselines: a file rewritten with the same objects (the source's own path: inotify,
//! read, compare; nothing to compile), timed until the agent reports its fingerprint; and, in
//! this process on the same objects, the work a full recompile does (compile, desired maps,
//! diff and write to an unpinned copy of the maps), with the compiler's phases. With
//! `WEIR_BENCH_BASELINE_AGENT=<path to another weir-agent build>` that build is measured the
//! same way after this one, and the ratios printed.
//!
//! Last, where the agent's heap goes at rest ([`super::heap`]): the agent's own structures built
//! in this process over the same directory, each with the bytes it holds (`weir-bench
//! scale-heap` prints only that, without an agent).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use serde_json::{Value, json};
use weir_agent::{
    datapath::{
        desired::{desired_maps, desired_subjects},
        loader,
        maps::DatapathMaps,
        writer::Writer,
    },
    flows::Explainer,
};
use weir_common::Config;
use weir_policy::{
    compile::{CompileInput, compile},
    identity::IdentityAllocator,
    incremental::Incremental,
    model::{ClusterState, Object, ObjectKey, parse_documents},
};

use super::{
    objects::{self, list},
    stats::{Samples, ms},
};
use crate::{
    agent::{Agent, AgentDirs, ClusterSource, bin},
    applied::{APPLY_TIMEOUT, wait_applied},
    cni::{Plugin, PodRef, first_address},
    cpu::CpuTime,
    netns::Netns,
};

const NODE: &str = "bench";
const PODS: usize = 10_000;
/// Replicas per deployment: pods of one deployment share their labels (one identity).
const REPLICAS: usize = 4;
const GROUPS: usize = PODS / REPLICAS;
const NAMESPACES: usize = 50;
/// Apps per namespace cycle: two deployments per app.
const APPS: usize = 1_250;
const TIERS: usize = 7;
const REMOTE_NODES: usize = 9;
const POLICIES: usize = 10_000;
/// Objects per manifest file for the bulk of pods and policies.
const PER_FILE: usize = 1_000;
/// Policies that rounds change, each in a file of its own.
const PROBES: usize = 50;
const LOCAL_CIDR: &str = "10.199.0.0/20";
/// Concurrent CNI ADDs while the local pods are wired.
const WIRING_THREADS: usize = 16;
const IDLE_WINDOW: Duration = Duration::from_secs(30);

/// Pod `i` runs on this node when `i % 10 == 0`: 1,000 local pods in 1,000 deployments.
fn is_local(i: usize) -> bool {
    i.is_multiple_of(10)
}

fn group_of(i: usize) -> usize {
    i / REPLICAS
}

fn group_is_local(g: usize) -> bool {
    (g * REPLICAS..(g + 1) * REPLICAS).any(is_local)
}

fn remote_node(i: usize) -> usize {
    1 + i % REMOTE_NODES
}

fn remote_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        200 + remote_node(i) as u8,
        (i / 250) as u8,
        (i % 250 + 2) as u8,
    )
}

fn labels_of_group(g: usize) -> Value {
    json!({"app": format!("a{}", g % APPS), "tier": format!("t{}", g % TIERS)})
}

fn namespace_of_group(g: usize) -> String {
    format!("ns{}", g % NAMESPACES)
}

fn pod(i: usize) -> Value {
    let g = group_of(i);
    let (node, ip) = if is_local(i) {
        (NODE.to_owned(), None)
    } else {
        (
            format!("n{}", remote_node(i)),
            Some(remote_address(i).to_string()),
        )
    };
    objects::pod(
        &format!("p{i}"),
        &namespace_of_group(g),
        labels_of_group(g),
        &node,
        ip,
    )
}

fn namespaces_and_nodes() -> Vec<Value> {
    let mut objects: Vec<Value> = objects::namespaces(NAMESPACES).collect();
    for k in 0..=REMOTE_NODES {
        let cidr = if k == 0 {
            LOCAL_CIDR.to_owned()
        } else {
            format!("10.{}.0.0/16", 200 + k)
        };
        let internal_ip = format!("192.168.50.{}", 10 + k);
        objects.push(objects::node(
            &objects::node_name(NODE, k),
            &cidr,
            Some(&internal_ip),
        ));
    }
    objects
}

/// Policy `j` in ns{j%50}: selects the two deployments of app a{j%1250}; admits a tier of its
/// namespace on one port, one app of a team of namespaces on the named port, and every tenth an
/// ipBlock with an except; egress to a tier of its namespace on a port range. `port_shift`
/// moves the first port (what a round changes).
fn policy(j: usize, port_shift: usize) -> Value {
    let mut ingress = vec![
        json!({"from": [{"podSelector": {"matchLabels": {"tier": format!("t{}", j % TIERS)}}}],
            "ports": [{"port": 8000 + (j + port_shift) % 100}]}),
        json!({"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 3)}},
                "podSelector": {"matchLabels": {"app": format!("a{}", (j + 11) % APPS)}}}],
            "ports": [{"port": "http"}]}),
    ];
    ingress.extend(objects::every_tenth_ip_block(j));
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("pol{j}"), "namespace": format!("ns{}", j % NAMESPACES)},
        "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", j % APPS)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": format!("t{}", (j + 3) % TIERS)}}}],
                "ports": [{"port": 5432, "endPort": 5440}]}]}})
}

/// Round `r`'s extra pod on another node: a replica of an existing remote pod's deployment
/// (same namespace, labels and ports: its identity exists) at an address of its own, or with a
/// label of its own too (`fresh`: a new identity).
fn extra_pod(r: usize, fresh: bool) -> (ObjectKey, Value) {
    let like = (10 * r + 1) % PODS;
    let mut object = pod(like);
    let ip = remote_address(PODS + 1 + r * 10).to_string();
    object["metadata"]["name"] = json!(format!("extra{r}"));
    object["status"]["podIP"] = json!(ip);
    object["status"]["podIPs"] = json!([{ "ip": ip }]);
    if fresh {
        object["metadata"]["labels"]["version"] = json!(format!("v{r}"));
    }
    let key = ObjectKey::new(namespace_of_group(group_of(like)), format!("extra{r}"));
    (key, object)
}

/// Policies whose change reaches this node's maps: they select a deployment with a local pod.
fn probe_policies() -> Vec<usize> {
    (0..POLICIES)
        .filter(|j| group_is_local(j % APPS) || group_is_local(j % APPS + APPS))
        .step_by(POLICIES / PROBES / 2)
        .take(PROBES)
        .collect()
}

/// Writes a file whole, through a dotfile renamed into place, as `kubectl`-driven tooling and
/// editors do: the agent never reads half a file.
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("manifest");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The manifests directory's files: name → contents.
fn manifest_files(probes: &[usize]) -> Vec<(String, String)> {
    let mut files = vec![("cluster.json".to_owned(), list(namespaces_and_nodes()))];
    for chunk in 0..PODS / PER_FILE {
        let pods = (chunk * PER_FILE..(chunk + 1) * PER_FILE)
            .map(pod)
            .collect();
        files.push((format!("pods-{chunk:02}.json"), list(pods)));
    }
    for chunk in 0..POLICIES / PER_FILE {
        let policies = (chunk * PER_FILE..(chunk + 1) * PER_FILE)
            .filter(|j| !probes.contains(j))
            .map(|j| policy(j, 0))
            .collect();
        files.push((format!("policies-{chunk:02}.json"), list(policies)));
    }
    for &j in probes {
        files.push((probe_file(j), policy(j, 0).to_string()));
    }
    files
}

fn probe_file(j: usize) -> String {
    format!("policy-pol{j}.json")
}

/// The same objects as the agent reads them, for the in-process baseline.
fn cluster_state(files: &[(String, String)]) -> anyhow::Result<ClusterState> {
    let mut state = ClusterState::default();
    for (name, text) in files {
        for object in parse_documents(text, name) {
            state.apply(object.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
    }
    Ok(state)
}

/// Reads the writer's config generation through the pin.
struct GenerationProbe(Array<MapData, Config>);

impl GenerationProbe {
    fn open(bpffs: &Path) -> anyhow::Result<Self> {
        let pin = bpffs.join("maps").join(weir_common::MAP_CONFIG);
        let data = MapData::from_pin(&pin)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", pin.display()))?;
        Ok(Self(Array::try_from(Map::Array(data))?))
    }

    fn get(&self) -> u32 {
        self.0.get(&0, 0).map(|c| c.generation).unwrap_or(0)
    }

    /// Waits until the generation moves past `from`; returns when it was seen.
    fn wait_past(&self, from: u32, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.get() != from {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the maps were not written within {timeout:?}"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// The agent under measurement, its pods and directories; dropped in field order (the agent
/// first, its pins last).
struct Node {
    agent: Agent,
    _pods: Vec<Netns>,
    _node: Netns,
    dirs: AgentDirs,
    local: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

impl Node {
    /// Starts the agent on the cluster without its policies, wires the local pods, then writes
    /// the policies: every ADD compiles the whole cluster, and the setup would otherwise pay a
    /// compile of 10,000 policies per batch of ADDs. What is measured afterwards is the same.
    fn start(
        program: &Path,
        files: &[(String, String)],
    ) -> anyhow::Result<(Self, Duration, Duration)> {
        let node = Netns::new("scale");
        let dirs = AgentDirs::new("scale", NODE);
        let is_policy = |name: &str| name.starts_with("polic");
        for (name, text) in files.iter().filter(|(n, _)| !is_policy(n)) {
            std::fs::write(dirs.manifests.join(name), text)?;
        }
        let started = Instant::now();
        let agent = Agent::start_with(
            program,
            ClusterSource::Manifests,
            &node,
            NODE,
            &dirs,
            &["--pod-cidr", LOCAL_CIDR],
        );
        let ready = started.elapsed();
        let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
        let locals: Vec<usize> = (0..PODS).filter(|&i| is_local(i)).collect();
        let pods: Vec<Netns> = locals
            .iter()
            .map(|i| Netns::new(&format!("s{i}")))
            .collect();
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        let results: Vec<(ObjectKey, IpAddr)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..WIRING_THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut wired = Vec::new();
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&i) = locals.get(k) else { break };
                            let namespace = namespace_of_group(group_of(i));
                            let (name, id) = (format!("p{i}"), format!("scale-{i}"));
                            let (out, _) = plugin.ok(
                                "ADD",
                                &PodRef {
                                    container_id: &id,
                                    namespace: &namespace,
                                    name: &name,
                                    netns: &pods[k].name,
                                },
                            );
                            wired.push((ObjectKey::new(namespace, name), first_address(&out)));
                        }
                        wired
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a wiring thread panicked"))
                .collect()
        });
        for (name, text) in files.iter().filter(|(n, _)| is_policy(n)) {
            write_atomic(&dirs.manifests.join(name), text)?;
        }
        wait_applied(&dirs.socket, &dirs.manifests, APPLY_TIMEOUT);
        let wired = started.elapsed();
        let local = results.into_iter().map(|(k, a)| (k, vec![a])).collect();
        Ok((
            Self {
                agent,
                _pods: pods,
                _node: node,
                dirs,
                local,
            },
            ready,
            wired,
        ))
    }
}

/// One measured change: write, wait for the maps, then check the agent applied exactly it.
fn timed_change(
    node: &Node,
    probe: &GenerationProbe,
    change: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let before = probe.get();
    let started = Instant::now();
    change()?;
    let written = probe.wait_past(before, APPLY_TIMEOUT)?;
    wait_applied(&node.dirs.socket, &node.dirs.manifests, APPLY_TIMEOUT);
    Ok(written - started)
}

/// A file rewritten with the same objects (a space more): the source reads and compares it and
/// compiles nothing; timed until the agent reports the new fingerprint.
fn timed_noop(node: &Node, file: &Path) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(file)?;
    let changed = if text.ends_with(' ') {
        text.trim_end().to_owned()
    } else {
        format!("{text} ")
    };
    let started = Instant::now();
    write_atomic(file, &changed)?;
    wait_applied(&node.dirs.socket, &node.dirs.manifests, APPLY_TIMEOUT);
    Ok(started.elapsed())
}

fn show(name: &str, samples: &Samples, goal: &str) {
    println!(
        "  {name:<58} p50 {:>9}  p99 {:>9}  {goal}",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0))
    );
}

fn parsed(object: &Value) -> anyhow::Result<Object> {
    parse_documents(&object.to_string(), "bench")
        .into_iter()
        .next()
        .expect("one document")
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What one event cost in this process, through the incremental compiler and the writer's
/// partial writes (to unpinned maps).
struct InProcess {
    /// One policy changed: the compile in place, the explainer for its output, the write.
    policy: Samples,
    /// Of which the explainer's update (the reconcile task patches it before the write).
    explainer: Samples,
    /// One remote pod added with an existing label set: the ipcache patch and its write.
    pod: Samples,
}

/// What the in-process cases start from: the cluster as the agent would read it, a fresh
/// identity allocator, and a writer over unpinned maps of a newly loaded object.
fn in_process_node(
    files: &[(String, String)],
    local: &BTreeMap<ObjectKey, Vec<IpAddr>>,
) -> anyhow::Result<(CompileInput, IdentityAllocator, Writer)> {
    let input = CompileInput {
        state: cluster_state(files)?,
        node_name: NODE.to_owned(),
        cluster_id: 0,
        local_endpoints: local.clone(),
    };
    let mut ebpf = loader::load(None)?;
    let writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    Ok((input, IdentityAllocator::default(), writer))
}

/// The same events in this process: what the agent's reconcile task does per event, without
/// the manifests directory in front of it.
fn in_process_incremental(
    files: &[(String, String)],
    local: &BTreeMap<ObjectKey, Vec<IpAddr>>,
    probes: &[usize],
    rounds: usize,
) -> anyhow::Result<InProcess> {
    let (mut input, mut ids, mut writer) = in_process_node(files, local)?;
    let (mut compiled, mut incremental) = Incremental::compile(&input, &mut ids)?;
    writer.apply(&desired_maps(&compiled, |_| Some(1), 0))?;
    let mut explainer = Explainer::default().rebuilt(&compiled);
    explainer.versions_written(None, |subject| writer.subject_version(subject));
    let (mut policies, mut explainers, mut pods) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let j = probes[r % probes.len()];
        let object = parsed(&policy(j, 1 + r / probes.len()))?;
        let started = Instant::now();
        let key = ObjectKey::new(format!("ns{}", j % NAMESPACES), format!("pol{j}"));
        input.state.apply(object);
        let subjects = incremental
            .policies_changed(&input, &[key], &mut ids, &mut compiled)
            .ok_or_else(|| anyhow::anyhow!("a port change compiles in place"))?;
        let explaining = Instant::now();
        explainer.policies_changed(&compiled, &subjects);
        let mut explained = explaining.elapsed();
        writer.apply_subjects(&desired_subjects(&compiled, &subjects))?;
        let versions = Instant::now();
        explainer.versions_written(Some(&subjects), |subject| writer.subject_version(subject));
        explained += versions.elapsed();
        explainers.push(explained);
        policies.push(started.elapsed());

        let (key, object) = extra_pod(r, false);
        let object = parsed(&object)?;
        let started = Instant::now();
        input.state.apply(object);
        let changes = incremental
            .pods_changed(&input, std::slice::from_ref(&key), &ids, &mut compiled)
            .ok_or_else(|| anyhow::anyhow!("a pod with known labels is address-only"))?;
        writer.apply_ipcache(&changes)?;
        pods.push(started.elapsed());
        input.state.pods.remove(&key);
        let changes = incremental
            .pods_changed(&input, &[key], &ids, &mut compiled)
            .ok_or_else(|| anyhow::anyhow!("removing it is address-only too"))?;
        writer.apply_ipcache(&changes)?;
    }
    Ok(InProcess {
        policy: Samples::new(policies),
        explainer: Samples::new(explainers),
        pod: Samples::new(pods),
    })
}

/// The work one event cost before incremental compiles, in this process: a full compile of the
/// whole state, the desired maps and the write of the difference (to unpinned maps).
fn in_process_baseline(
    files: &[(String, String)],
    local: &BTreeMap<ObjectKey, Vec<IpAddr>>,
    rounds: usize,
) -> anyhow::Result<Samples> {
    let (mut input, mut ids, mut writer) = in_process_node(files, local)?;
    let started = Instant::now();
    let compiled = compile(&input, &mut ids)?;
    let compile_time = started.elapsed();
    let desired = desired_maps(&compiled, |_| Some(1), 0);
    let desired_time = started.elapsed() - compile_time;
    let stats = writer.apply(&desired)?;
    println!(
        "  in this process, the same objects: first compile {}, desired maps {}, first write {} ({} entries)",
        ms(compile_time),
        ms(desired_time),
        ms(started.elapsed() - compile_time - desired_time),
        stats.writes
    );
    let mut samples = Vec::new();
    let (mut c_sum, mut d_sum, mut w_sum) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for r in 0..rounds {
        let (key, object) = extra_pod(r, false);
        let parsed = parsed(&object)?;
        let started = Instant::now();
        input.state.apply(parsed);
        let compiled = compile(&input, &mut ids)?;
        let t1 = started.elapsed();
        let desired = desired_maps(&compiled, |_| Some(1), 0);
        let t2 = started.elapsed();
        writer.apply(&desired)?;
        let t3 = started.elapsed();
        input.state.pods.remove(&key);
        (c_sum, d_sum, w_sum) = (c_sum + t1, d_sum + t2 - t1, w_sum + t3 - t2);
        samples.push(t3);
    }
    let n = rounds.max(1) as u32;
    println!(
        "  full recompile per event (a remote pod added, {rounds} rounds): compile {} + desired maps {} + diff/write {} (means)",
        ms(c_sum / n),
        ms(d_sum / n),
        ms(w_sum / n)
    );
    Ok(Samples::new(samples))
}

/// The local pods' addresses as the IPAM hands them out (the pod CIDR's hosts in order), for
/// measurements without the agent.
fn synthetic_local() -> BTreeMap<ObjectKey, Vec<IpAddr>> {
    let base = u32::from(Ipv4Addr::new(10, 199, 0, 2));
    (0..PODS)
        .filter(|&i| is_local(i))
        .enumerate()
        .map(|(k, i)| {
            let key = ObjectKey::new(namespace_of_group(group_of(i)), format!("p{i}"));
            (key, vec![IpAddr::V4(Ipv4Addr::from(base + k as u32))])
        })
        .collect()
}

/// The in-process cases: the full recompile per event (the baseline, returned) and the
/// incremental path, printed against it.
fn in_process(
    files: &[(String, String)],
    local: &BTreeMap<ObjectKey, Vec<IpAddr>>,
    probes: &[usize],
    rounds: usize,
) -> anyhow::Result<(Samples, InProcess)> {
    let baseline = in_process_baseline(files, local, rounds.min(20))?;
    let incremental = in_process_incremental(files, local, probes, rounds)?;
    let full = baseline.percentile(50.0).as_secs_f64().max(1e-6);
    let InProcess {
        policy,
        explainer,
        pod,
    } = &incremental;
    println!(
        "  in this process, incremental compile + partial write: one policy changed p50 {} p99 {} ({:.3}x the full recompile; the explainer's update p50 {} p99 {} of it), one remote pod added p50 {} p99 {} ({:.3}x)",
        ms(policy.percentile(50.0)),
        ms(policy.percentile(99.0)),
        policy.percentile(50.0).as_secs_f64() / full,
        ms(explainer.percentile(50.0)),
        ms(explainer.percentile(99.0)),
        ms(pod.percentile(50.0)),
        ms(pod.percentile(99.0)),
        pod.percentile(50.0).as_secs_f64() / full,
    );
    Ok((baseline, incremental))
}

/// Only the in-process cases, on the same objects with the local pods' addresses assigned
/// here: the compile path per event without an agent, for profiling it.
pub fn run_in_process(rounds: usize) -> anyhow::Result<()> {
    let probes = probe_policies();
    let files = manifest_files(&probes);
    println!("scale (in process only): {POLICIES} policies, {PODS} pods, {rounds} rounds");
    in_process(&files, &synthetic_local(), &probes, rounds)?;
    Ok(())
}

/// Where the agent's heap goes with this cluster (see [`super::heap`]), without an agent: the
/// scale bench's manifests directory read by the agent's own source, compiler and writer.
pub fn heap() -> anyhow::Result<()> {
    let files = manifest_files(&probe_policies());
    let dir = std::env::temp_dir().join(format!("weir-scale-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in &files {
        std::fs::write(dir.join(name), text)?;
    }
    drop(files);
    let result = super::heap::attribute(&dir, NODE, &synthetic_local());
    std::fs::remove_dir_all(&dir)?;
    result
}

/// What one agent build measured.
struct Measured {
    ready: Duration,
    wired: Duration,
    rss_after_start: f64,
    noop: Samples,
    policy_changes: Samples,
    existing_add: Samples,
    existing_del: Samples,
    new_add: Samples,
    new_del: Samples,
    rss: f64,
    idle_percent: f64,
    local: BTreeMap<ObjectKey, Vec<IpAddr>>,
}

/// Starts `program` on the cluster and measures it over `rounds` of each change, its RSS
/// after them and its CPU over an idle window.
fn measure(
    program: &Path,
    files: &[(String, String)],
    probes: &[usize],
    rounds: usize,
) -> anyhow::Result<Measured> {
    let (node, ready, wired) = Node::start(program, files)?;
    let rss_after_start = node.agent.rss_mib();
    let probe = GenerationProbe::open(&node.dirs.bpffs)?;
    wait_applied(&node.dirs.socket, &node.dirs.manifests, APPLY_TIMEOUT);

    // Baseline: a file rewritten with the same objects.
    let mut noop = Vec::new();
    for r in 0..rounds {
        let file = node
            .dirs
            .manifests
            .join(probe_file(probes[r % probes.len()]));
        noop.push(timed_noop(&node, &file)?);
    }
    // One policy changed: its port moves.
    let mut policy_changes = Vec::new();
    for r in 0..rounds {
        let j = probes[r % probes.len()];
        let shift = 1 + r / probes.len();
        let file = node.dirs.manifests.join(probe_file(j));
        policy_changes.push(timed_change(&node, &probe, || {
            write_atomic(&file, &policy(j, shift).to_string())
        })?);
    }
    // A pod added on another node, with the labels of an existing deployment (its identity
    // exists) and with labels of its own (a new identity), then removed.
    let mut existing_add = Vec::new();
    let mut existing_del = Vec::new();
    let mut new_add = Vec::new();
    let mut new_del = Vec::new();
    for r in 0..rounds {
        for fresh in [false, true] {
            let (_, object) = extra_pod(r, fresh);
            let file = node
                .dirs
                .manifests
                .join(format!("pod-extra{r}-{fresh}.json"));
            let add = timed_change(&node, &probe, || write_atomic(&file, &object.to_string()))?;
            let del = timed_change(&node, &probe, || Ok(std::fs::remove_file(&file)?))?;
            if fresh {
                new_add.push(add);
                new_del.push(del);
            } else {
                existing_add.push(add);
                existing_del.push(del);
            }
        }
    }
    let rss = node.agent.rss_mib();

    // Idle: nothing changes.
    std::thread::sleep(Duration::from_secs(2));
    let cpu_before = CpuTime::of_process(node.agent.pid());
    let started = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let idle = CpuTime::of_process(node.agent.pid()).since(cpu_before);
    let idle_percent = idle.total().as_secs_f64() / started.elapsed().as_secs_f64() * 100.0;
    Ok(Measured {
        ready,
        wired,
        rss_after_start,
        noop: Samples::new(noop),
        policy_changes: Samples::new(policy_changes),
        existing_add: Samples::new(existing_add),
        existing_del: Samples::new(existing_del),
        new_add: Samples::new(new_add),
        new_del: Samples::new(new_del),
        rss,
        idle_percent,
        local: node.local.clone(),
    })
}

impl Measured {
    fn print(&self) {
        println!(
            "  agent ready after {:.1} s; 1,000 pods wired and the policies applied after {:.1} s more; RSS {:.1} MiB",
            self.ready.as_secs_f64(),
            self.wired.as_secs_f64(),
            self.rss_after_start
        );
        println!(
            "  from the file written to the maps written (WEIR_CONFIG generation through its pin):"
        );
        show(
            "baseline: a file rewritten, same objects (until applied)",
            &self.noop,
            "",
        );
        show(
            "one policy changed",
            &self.policy_changes,
            "(goal p99 <= 50 ms)",
        );
        show(
            "one remote pod added, existing label set",
            &self.existing_add,
            "(goal p99 <= 20 ms)",
        );
        show(
            "one remote pod removed, existing label set",
            &self.existing_del,
            "",
        );
        show("one remote pod added, new label set", &self.new_add, "");
        show("one remote pod removed, new label set", &self.new_del, "");
        let floor = self.noop.percentile(50.0).as_secs_f64().max(1e-6);
        println!(
            "  p50 over the same-objects baseline: policy {:.2}x, remote pod (existing labels) {:.2}x, (new labels) {:.2}x",
            self.policy_changes.percentile(50.0).as_secs_f64() / floor,
            self.existing_add.percentile(50.0).as_secs_f64() / floor,
            self.new_add.percentile(50.0).as_secs_f64() / floor,
        );
        println!(
            "  agent RSS {:.1} MiB (goal <= 200 MiB); idle CPU {:.2} % of one core over {} s (goal <= 1 %)",
            self.rss,
            self.idle_percent,
            IDLE_WINDOW.as_secs()
        );
    }
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    let probes = probe_policies();
    anyhow::ensure!(!probes.is_empty(), "no policy selects a local pod");
    let files = manifest_files(&probes);
    println!(
        "scale: one node with {} local pods (wired through weir-cni) in a cluster of {PODS} pods \
         ({GROUPS} deployments, {} nodes) and {POLICIES} policies, standalone mode, {rounds} rounds",
        (0..PODS).filter(|&i| is_local(i)).count(),
        REMOTE_NODES + 1
    );
    let measured = measure(&bin("weir-agent"), &files, &probes, rounds)?;
    measured.print();
    // Another build (WEIR_BENCH_BASELINE_AGENT), measured the same way after this one.
    if let Some(other) = std::env::var_os("WEIR_BENCH_BASELINE_AGENT").map(PathBuf::from) {
        println!("  baseline build {}:", other.display());
        let baseline = measure(&other, &files, &probes, rounds)?;
        baseline.print();
        println!(
            "  this build over the baseline build: RSS {:.2}x, policy p99 {:.2}x, remote pod p99 {:.2}x",
            measured.rss / baseline.rss.max(1e-6),
            measured.policy_changes.percentile(99.0).as_secs_f64()
                / baseline
                    .policy_changes
                    .percentile(99.0)
                    .as_secs_f64()
                    .max(1e-9),
            measured.existing_add.percentile(99.0).as_secs_f64()
                / baseline
                    .existing_add
                    .percentile(99.0)
                    .as_secs_f64()
                    .max(1e-9),
        );
    }
    let Measured {
        policy_changes,
        existing_add,
        rss,
        idle_percent,
        local,
        ..
    } = measured;

    let (baseline, _) = in_process(&files, &local, &probes, rounds)?;
    let full = baseline.percentile(50.0).as_secs_f64().max(1e-6);
    println!(
        "  through the agent against the full recompile per event (p50 {}): policy {:.3}x, remote pod (existing labels) {:.3}x",
        ms(baseline.percentile(50.0)),
        policy_changes.percentile(50.0).as_secs_f64() / full,
        existing_add.percentile(50.0).as_secs_f64() / full
    );
    println!(
        "scale: policy_p99 {:.2} ms, remote_pod_p99 {:.2} ms, rss {:.1} MiB, idle_cpu {:.2} %",
        policy_changes.percentile(99.0).as_secs_f64() * 1e3,
        existing_add.percentile(99.0).as_secs_f64() * 1e3,
        rss,
        idle_percent
    );
    heap()
}
