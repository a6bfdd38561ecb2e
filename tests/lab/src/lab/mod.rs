//! A local lab of nodes and pods in network namespaces, on the real `weir-agent` and `weir-cni`.
//!
//! Each node is a network namespace running its own agent (standalone mode, reading the lab's
//! manifests directory); the nodes are joined by an underlay bridge in a namespace of its own and
//! route each other's pod CIDRs; nothing routes out of the machine. Each Pod gets a namespace wired
//! by `weir-cni` exactly as kubelet would (Pod object first, ADD, then `status.podIPs`), and runs
//! a TCP and a UDP server on each containerPort. Probes are real connections made from inside the
//! pods' namespaces.
//!
//! All names carry the lab's name (`wl-<lab>-...`), so labs run side by side. What a lab made is
//! recorded in /run/weir-lab/<lab>/state.json; [`down`] takes it all away from any process.

pub mod mesh;
pub mod probe;
pub mod servers;
pub mod shared;
pub mod state;
pub mod topology;
pub mod wan_capture;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::agent::{self, AgentArgs};
use crate::cni::Plugin;
use crate::{kubelet, netns, process};

pub use crate::{matrix, objects};
pub use matrix::{Difference, Expectations, Matrix, Proto, Target};
pub use objects::Object;
pub use probe::ProbeOptions;
use state::{PodState, State};

/// Where a lab's objects come from.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// A YAML/JSON file, or a directory of them.
    Path(PathBuf),
    /// YAML text (several documents allowed).
    Yaml(String),
}

impl Manifest {
    fn objects(&self) -> anyhow::Result<Vec<Object>> {
        match self {
            Manifest::Path(p) => objects::load(p),
            Manifest::Yaml(text) => objects::parse(text),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// 1 to 12 characters, a-z and 0-9.
    pub name: String,
    pub nodes: usize,
    pub manifests: Vec<Manifest>,
    /// Ports every pod serves besides its containerPorts (so a probe of an undeclared port tells
    /// a drop from a closed port).
    pub extra_ports: Vec<u16>,
    /// The binaries; found next to the running executable or in the workspace's target/debug
    /// when not given (or through WEIR_AGENT_BIN, WEIR_CNI_BIN, WEIR_LAB_SERVER_BIN).
    pub agent_bin: Option<PathBuf>,
    pub cni_bin: Option<PathBuf>,
    pub server_bin: Option<PathBuf>,
    /// The lab's address index (underlay 172.31.<index>.0/24, pods 10.<index>.<n>.0/24); from
    /// the name's hash when not given. A mesh lab gives its clusters distinct ones.
    pub index: Option<u8>,
    /// Flags every agent of the lab gets besides the lab's own (a mesh lab's certificates).
    pub agent_args: Vec<String>,
}

impl LabSpec {
    pub fn new(name: &str, nodes: usize) -> Self {
        LabSpec {
            name: name.to_string(),
            nodes,
            manifests: Vec::new(),
            extra_ports: Vec::new(),
            agent_bin: None,
            cni_bin: None,
            server_bin: None,
            index: None,
            agent_args: Vec::new(),
        }
    }

    pub fn manifest(mut self, m: Manifest) -> Self {
        self.manifests.push(m);
        self
    }
}

/// Which cells to probe.
#[derive(Clone, Debug, Default)]
pub struct ProbeSpec {
    /// Probe these (port, protocol) on every pod; `None`: each pod's declared containerPorts
    /// with their protocol.
    pub ports: Option<Vec<(u16, Proto)>>,
    /// More cells to probe (e.g. those an expectation names).
    pub extra: Vec<Target>,
    pub options: ProbeOptions,
    /// Timeout for cells expected to be denied (by [`Lab::probe_until`]'s expectations): a
    /// local connection that is allowed answers in well under a millisecond.
    pub denied_timeout: Option<Duration>,
    /// Cells expected to be allowed are probed again after a miss until they answer or this
    /// passes (see [`ProbeOptions::retry_within`]); cells expected to be denied, once.
    pub allowed_within: Option<Duration>,
}

/// A running lab. Dropping it takes it down, unless it was [`Lab::open`]ed or [`Lab::keep`]t.
pub struct Lab {
    state: State,
    owned: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = down(&self.state.name)
        {
            eprintln!("lab {}: taking it down: {e:#}", self.state.name);
        }
    }
}

pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 12
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        bail!("a lab name is 1 to 12 characters of a-z and 0-9, not {name:?}");
    }
    Ok(())
}

/// A lab name of this process: `tag` (1 to 5 characters of a-z and 0-9) and the pid, so that
/// two test runs at once (two checkouts, two suites) never take each other's lab down. Tests
/// name their labs with it; `cargo xtask lab up --name` is for people.
pub fn process_name(tag: &str) -> String {
    let name = format!("{tag}{}", std::process::id());
    if let Err(e) = validate_name(&name) {
        panic!("lab tag {tag:?}: {e:#}");
    }
    name
}

impl Lab {
    /// Builds the lab: underlay, nodes, agents, pods, servers. A lab left over with the same
    /// name is taken down first. On error, what was built is taken down.
    pub fn up(spec: LabSpec) -> anyhow::Result<Lab> {
        validate_name(&spec.name)?;
        if spec.nodes == 0 || spec.nodes > 50 {
            bail!("a lab has 1 to 50 nodes");
        }
        require_root()?;
        down(&spec.name).context("taking down a previous lab of the same name")?;
        let mut objects = Vec::new();
        for m in &spec.manifests {
            objects.extend(m.objects()?);
        }
        let dir = State::dir_of(&spec.name);
        let mut state = State {
            name: spec.name.clone(),
            index: spec.index.unwrap_or_else(|| lab_index(&spec.name)),
            underlay_netns: topology::underlay_netns(&spec.name),
            agent_bin: find_bin("weir-agent", "WEIR_AGENT_BIN", spec.agent_bin.as_deref())?,
            cni_bin: find_bin("weir-cni", "WEIR_CNI_BIN", spec.cni_bin.as_deref())?,
            server_bin: find_bin("xtask", "WEIR_LAB_SERVER_BIN", spec.server_bin.as_deref())?,
            extra_ports: spec.extra_ports.clone(),
            agent_args: spec.agent_args.clone(),
            dir,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
        };
        state.nodes = topology::plan_nodes(&state, spec.nodes);
        std::fs::create_dir_all(state.manifests_dir())?;
        for node in &state.nodes {
            std::fs::create_dir_all(&node.state_dir)?;
        }
        state.save()?;
        // From here on, a failure takes down what was built.
        let mut lab = Lab { state, owned: true };
        match lab.build(objects) {
            Ok(()) => Ok(lab),
            Err(e) => {
                let saved = save_logs(&lab.state);
                Err(e.context(format!(
                    "building lab {} (its logs are kept in {})",
                    lab.state.name,
                    saved.display()
                )))
            }
        }
    }

    fn build(&mut self, objects: Vec<Object>) -> anyhow::Result<()> {
        let lab = self;
        ensure_bpffs()?;
        topology::build(&lab.state)?;
        let (pods, others): (Vec<Object>, Vec<Object>) =
            objects.into_iter().partition(|o| o.kind() == "Pod");
        for object in &others {
            objects::write(&lab.state.manifests_dir(), object)?;
        }
        lab.start_agents()?;
        for (i, pod) in pods.into_iter().enumerate() {
            let node = match pod.node_name() {
                Some(n) => n,
                None => lab.state.nodes[i % lab.state.nodes.len()].name.clone(),
            };
            lab.add_pod(pod, &node)?;
        }
        Ok(())
    }

    /// A lab that is running (made by another process); dropping it leaves it running.
    pub fn open(name: &str) -> anyhow::Result<Lab> {
        validate_name(name)?;
        Ok(Lab {
            state: State::load(name)?,
            owned: false,
        })
    }

    /// Leaves the lab running when this value is dropped.
    pub fn keep(mut self) -> State {
        self.owned = false;
        self.state.clone()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Takes the lab down now.
    pub fn down(mut self) -> anyhow::Result<()> {
        self.owned = false;
        down(&self.state.name)
    }

    fn start_agents(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for name in &names {
            self.spawn_agent(name)?;
        }
        for name in &names {
            self.wait_agent_ready(name)?;
        }
        Ok(())
    }

    /// SIGKILLs a node's agent (as a crash or an OOM kill would) and waits until it is gone.
    /// Its pinned programs and maps stay: enforcement goes on without it.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let record = self
            .state
            .node(node)
            .with_context(|| format!("no node {node} in lab {}", self.state.name))?;
        let Some(pid) = record.agent_pid else {
            bail!("the agent of {node} is not running");
        };
        kill_if_ours(pid, &self.state.name, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while process::alive(pid) {
            if Instant::now() > deadline {
                bail!("the agent of {node} (pid {pid}) survived SIGKILL for 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(record) = self.state.nodes.iter_mut().find(|n| n.name == node) {
            record.agent_pid = None;
        }
        self.state.save()
    }

    /// Starts a node's agent again (after [`Lab::kill_agent`]) and waits until it is ready.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.spawn_agent(node)?;
        self.wait_agent_ready(node)
    }

    /// Starts one node's agent in its namespace, detached (it outlives this process); its log
    /// is appended to.
    fn spawn_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let manifests = self.state.manifests_dir();
        let agent_bin = self.state.agent_bin.clone();
        let agent_args = self.state.agent_args.clone();
        let node = self
            .state
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        if let Some(parent) = node.socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut extra = vec!["--pod-cidr", node.pod_cidr.as_str()];
        extra.extend(agent_args.iter().map(String::as_str));
        let args = AgentArgs {
            node: &node.name,
            source: agent::Source::Manifests(&manifests),
            state: &node.state_dir,
            socket: &node.socket,
            bpffs: &node.bpffs_dir,
            extra: &extra,
        };
        let mut cmd = args.command(&agent_bin, &node.netns);
        cmd.stdout(log.try_clone()?).stderr(log);
        process::detach(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent of {}", node.name))?;
        node.agent_pid = Some(child.id());
        std::mem::forget(child);
        self.state.save()
    }

    fn wait_agent_ready(&self, name: &str) -> anyhow::Result<()> {
        let node = self
            .state
            .node(name)
            .with_context(|| format!("no node {name}"))?;
        let pid = node.agent_pid;
        agent::wait_ready(&node.socket, agent::READY_TIMEOUT, || {
            (!pid.is_some_and(process::alive)).then(|| "its process is gone".to_owned())
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "the agent of {} {e}; its log {:?} ends with:\n{}",
                node.name,
                node.log,
                process::tail(&node.log, 30)
            )
        })
    }

    /// The plugin as the kubelet of `node` runs it.
    fn plugin(&self, node: &str) -> anyhow::Result<Plugin> {
        let node = self
            .state
            .node(node)
            .with_context(|| format!("no node {node} in lab {}", self.state.name))?;
        Ok(plugin(&self.state, node))
    }

    fn add_pod(&mut self, mut pod: Object, node: &str) -> anyhow::Result<()> {
        let key = pod.key();
        let namespace = pod.namespace().unwrap_or_default().to_owned();
        let name = pod.name().to_owned();
        if self.state.node(node).is_none() {
            bail!("pod {key} asks for node {node:?}, which this lab does not have");
        }
        if self.state.pods.contains_key(&key) {
            bail!("pod {key} exists already");
        }
        pod.set_node_name(node);
        let netns_name = topology::pod_netns(&self.state.name, &namespace, &name);
        netns::add(&netns_name)?;
        let declared = pod.pod_ports();
        let mut record = PodState {
            namespace: namespace.clone(),
            name: name.clone(),
            node: node.to_string(),
            netns: netns_name.clone(),
            container_id: format!("wl-{}-{namespace}.{name}", self.state.name),
            ips: Vec::new(),
            ports: declared.iter().map(|p| (p.port, p.proto)).collect(),
            server_pid: None,
        };
        self.state.pods.insert(key.clone(), record.clone());
        self.state.save()?;
        let plugin = self.plugin(node)?;
        let ips = kubelet::start_pod(
            &plugin,
            &self.state.manifests_dir(),
            &mut pod,
            &record.container_id,
            &netns_name,
        )
        .with_context(|| format!("starting pod {key} on {node}"))?;
        record.ips = ips.iter().map(IpAddr::to_string).collect();
        let mut ports: Vec<u16> = declared.iter().map(|p| p.port).collect();
        ports.extend(&self.state.extra_ports);
        ports.sort_unstable();
        ports.dedup();
        if !ports.is_empty() {
            let log = self
                .state
                .dir
                .join(format!("server-{namespace}.{name}.log"));
            record.server_pid = Some(servers::spawn(
                &self.state.server_bin,
                &netns_name,
                &self.state.name,
                &key,
                &ports,
                &log,
            )?);
        }
        self.state.pods.insert(key, record);
        self.state.save()?;
        Ok(())
    }

    fn remove_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(pod) = self.state.pods.get(key).cloned() else {
            return Ok(());
        };
        if let Some(pid) = pod.server_pid {
            kill_if_ours(pid, &self.state.name, libc::SIGKILL);
        }
        let plugin = self.plugin(&pod.node)?;
        if let Err(e) = kubelet::stop_pod(&plugin, &self.state.manifests_dir(), &pod.cni_ref()) {
            eprintln!("lab: {e:#}");
        }
        netns::delete(&pod.netns);
        self.state.pods.remove(key);
        self.state.save()
    }

    /// Applies the objects of a file or directory: new Pods are wired (and get servers), other
    /// objects are written for the agents to pick up. A Pod that exists is updated in place
    /// (its labels), keeping its node and address.
    pub fn apply(&mut self, path: &Path) -> anyhow::Result<()> {
        self.apply_objects(objects::load(path)?)
    }

    pub fn apply_yaml(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.apply_objects(objects::parse(yaml)?)
    }

    fn apply_objects(&mut self, list: Vec<Object>) -> anyhow::Result<()> {
        let dir = self.state.manifests_dir();
        for object in list {
            if object.kind() == "Pod" {
                if self.state.pods.contains_key(&object.key()) {
                    self.set_labels("Pod", object.namespace(), object.name(), &object.labels())?;
                } else {
                    let node = match object.node_name() {
                        Some(n) => n,
                        None => {
                            let i = self.state.pods.len() % self.state.nodes.len();
                            self.state.nodes[i].name.clone()
                        }
                    };
                    self.add_pod(object, &node)?;
                }
            } else {
                objects::write(&dir, &object)?;
            }
        }
        Ok(())
    }

    /// Deletes the objects a file names (Pods are torn down: DEL, server, namespace).
    pub fn delete(&mut self, path: &Path) -> anyhow::Result<()> {
        self.delete_objects(objects::load(path)?)
    }

    pub fn delete_yaml(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.delete_objects(objects::parse(yaml)?)
    }

    fn delete_objects(&mut self, list: Vec<Object>) -> anyhow::Result<()> {
        for object in list {
            if object.kind() == "Pod" {
                self.remove_pod(&object.key())?;
            } else {
                let _ = std::fs::remove_file(self.state.manifests_dir().join(object.file_name()));
            }
        }
        Ok(())
    }

    /// Deletes every object of a kind (e.g. all NetworkPolicies, to reset between test cases).
    pub fn delete_kind(&mut self, kind: &str) -> anyhow::Result<usize> {
        let prefix = format!("{}_", kind.to_lowercase());
        let mut n = 0;
        for entry in std::fs::read_dir(self.state.manifests_dir())? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Replaces the labels of a Pod or Namespace (the agents follow the change).
    pub fn set_labels(
        &mut self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let dir = self.state.manifests_dir();
        let mut object = objects::read(&dir, kind, namespace, name)?;
        object.set_labels(labels);
        objects::write(&dir, &object)
    }

    /// The labels an object has now in the manifests directory.
    pub fn labels(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(objects::read(&self.state.manifests_dir(), kind, namespace, name)?.labels())
    }

    /// The first address of a pod (`ns/name`).
    pub fn pod_ip(&self, pod: &str) -> anyhow::Result<IpAddr> {
        let record = self
            .state
            .pods
            .get(pod)
            .with_context(|| format!("no pod {pod} in lab {}", self.state.name))?;
        Ok(record.ips.first().context("pod without address")?.parse()?)
    }

    /// A CIDR covering every pod address of the lab (the nodes' pod CIDRs are
    /// 10.<index>.<node>.0/24), for an ipBlock that takes in all its pods.
    pub fn pods_supernet(&self) -> String {
        format!("10.{}.0.0/16", self.state.index)
    }

    pub fn pods(&self) -> Vec<String> {
        self.state.pods.keys().cloned().collect()
    }

    /// Probes from every pod to the cells `spec` names, in parallel, with real connections.
    pub fn probe(&self, spec: &ProbeSpec) -> anyhow::Result<Matrix> {
        self.probe_expecting(spec, None)
    }

    fn probe_expecting(
        &self,
        spec: &ProbeSpec,
        expect: Option<&Expectations>,
    ) -> anyhow::Result<Matrix> {
        let mut sources = Vec::new();
        let mut targets: Vec<(Target, IpAddr)> = Vec::new();
        for (key, pod) in &self.state.pods {
            let ip: IpAddr = self.pod_ip(key)?;
            sources.push(probe::Endpoint {
                pod: key.clone(),
                netns: pod.netns.clone(),
                ip,
            });
            let ports = spec.ports.clone().unwrap_or_else(|| pod.ports.clone());
            for (port, proto) in ports {
                targets.push((Target::new(key, port, proto), ip));
            }
        }
        for t in &spec.extra {
            if !targets.iter().any(|(have, _)| have == t) {
                targets.push((t.clone(), self.pod_ip(&t.pod)?));
            }
        }
        let options = |from: &str, to: &Target| {
            let mut o = spec.options;
            match expect.and_then(|e| e.get(from, to)) {
                Some(false) => o.timeout = spec.denied_timeout.unwrap_or(o.timeout),
                Some(true) => o.retry_within = spec.allowed_within,
                None => {}
            }
            o
        };
        Ok(probe::probe(&sources, &targets, options))
    }

    /// Probes once, with the short timeout for the cells `expect` denies; returns the matrix and
    /// its differences from `expect`.
    pub fn probe_once(
        &self,
        spec: &ProbeSpec,
        expect: &Expectations,
    ) -> anyhow::Result<(Matrix, Vec<Difference>)> {
        let matrix = self.probe_expecting(spec, Some(expect))?;
        let diffs = matrix.differences(expect);
        Ok((matrix, diffs))
    }

    /// Probes until the matrix matches `expect` or `timeout` passes (policy changes take effect
    /// within a second); returns the last matrix and its differences.
    pub fn probe_until(
        &self,
        spec: &ProbeSpec,
        expect: &Expectations,
        timeout: Duration,
    ) -> anyhow::Result<(Matrix, Vec<Difference>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let matrix = self.probe_expecting(spec, Some(expect))?;
            let diffs = matrix.differences(expect);
            if diffs.is_empty() || Instant::now() > deadline {
                return Ok((matrix, diffs));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The verdict records of every node's agent (`flows.jsonl`), oldest first per node.
    pub fn flows(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        for node in &self.state.nodes {
            for mut v in agent::flows(&node.state_dir) {
                v["node"] = serde_json::Value::String(node.name.clone());
                all.push(v);
            }
        }
        all
    }

    /// Why the agents dropped `from`'s traffic to `to`, one line per distinct drop record in
    /// the nodes' flows.jsonl: where it was dropped, which policies isolated the pod, and which
    /// rule (none, for a policy denial) would have allowed it. Only records from `since` on
    /// (the agents keep appending; older records may describe older policies).
    pub fn explain_drop(
        &self,
        from: &str,
        to: &Target,
        since: std::time::SystemTime,
    ) -> Vec<String> {
        let ip = |pod: &str| {
            self.state
                .pods
                .get(pod)
                .and_then(|p| p.ips.first().cloned())
        };
        let (Some(src), Some(dst)) = (ip(from), ip(&to.pod)) else {
            return Vec::new();
        };
        let mut lines: Vec<String> = Vec::new();
        let flows = self.flows();
        for f in drops_between(&flows, &src, &dst, to, since) {
            let direction = f["direction"].as_str().unwrap_or("?");
            let line = format!(
                "dropped at {}'s {direction} on {} ({}): {}",
                f["endpoint"].as_str().unwrap_or("?"),
                f["node"].as_str().unwrap_or("?"),
                f["reason"].as_str().unwrap_or("?"),
                why_isolated(f),
            );
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        lines
    }

    /// The tail of a node's agent log (for error messages).
    pub fn agent_log(&self, node: &str, lines: usize) -> String {
        self.state
            .node(node)
            .map(|n| process::tail(&n.log, lines))
            .unwrap_or_default()
    }
}

/// The plugin as the kubelet of `node` runs it: its log in the lab's directory.
fn plugin(state: &State, node: &state::NodeState) -> Plugin {
    Plugin::of(
        &state.cni_bin,
        &node.netns,
        &node.socket,
        &state.dir.join(format!("{}-cni.log", node.name)),
    )
}

/// Takes down the lab `name`, whatever state it is in: servers and agents (only processes this
/// lab started, found by pid and checked by command line), CNI DEL of its pods, the agents'
/// pins, every `wl-<name>-*` namespace, its state directory. Idempotent.
pub fn down(name: &str) -> anyhow::Result<()> {
    validate_name(name)?;
    // A mesh lab's clusters are labs of their own.
    mesh::down_clusters(name)?;
    let state = State::load(name).ok();
    let marker_server = server_marker(name);
    let marker_agent = agent_marker(name);
    // Servers first: they are ours alone.
    let mut pids: Vec<u32> = state
        .iter()
        .flat_map(|s| s.pods.values().filter_map(|p| p.server_pid))
        .collect();
    pids.extend(process::find(&marker_server));
    for pid in pids {
        kill_if_ours(pid, name, libc::SIGKILL);
    }
    if let Some(state) = &state {
        // Release the pods while the agents still run (DEL also succeeds without them).
        for pod in state.pods.values() {
            if let Some(node) = state.node(&pod.node)
                && node.agent_pid.is_some_and(process::alive)
                && netns::exists(&node.netns)
            {
                let _ = plugin(state, node).try_run_on("DEL", &pod.cni_ref(), "eth0", None);
            }
        }
    }
    let mut agents: Vec<u32> = state
        .iter()
        .flat_map(|s| s.nodes.iter().filter_map(|n| n.agent_pid))
        .collect();
    agents.extend(process::find(&marker_agent));
    agents.sort_unstable();
    agents.dedup();
    for &pid in &agents {
        kill_if_ours(pid, name, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while agents.iter().any(|&p| process::alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in &agents {
        kill_if_ours(pid, name, libc::SIGKILL);
    }
    if let Some(state) = &state {
        for node in &state.nodes {
            if state.agent_bin.exists() {
                let mut cmd = if netns::exists(&node.netns) {
                    netns::command_in(&node.netns, &state.agent_bin)
                } else {
                    Command::new(&state.agent_bin)
                };
                let _ = cmd
                    .arg("uninstall")
                    .arg("--node-name")
                    .arg(&node.name)
                    .arg("--bpffs-dir")
                    .arg(&node.bpffs_dir)
                    .arg("--state-dir")
                    .arg(&node.state_dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    remove_pins(name);
    for ns in netns::list(&format!("wl-{name}-")) {
        netns::delete(&ns);
    }
    let dir = State::dir_of(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {dir:?}"))?;
    }
    let left = netns::list(&format!("wl-{name}-"));
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    Ok(())
}

/// Takes down every lab that has state, and namespaces named like a lab's.
pub fn down_all() -> anyhow::Result<Vec<String>> {
    let mut names = State::all_names();
    for ns in netns::list("wl-") {
        if let Some(lab) = ns.strip_prefix("wl-").and_then(|r| r.split('-').next())
            && validate_name(lab).is_ok()
            && !names.iter().any(|n| n == lab)
        {
            names.push(lab.to_string());
        }
    }
    let mut errors = Vec::new();
    for name in &names {
        if let Err(e) = down(name) {
            errors.push(format!("{name}: {e:#}"));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(names)
}

/// The bpffs pin directories of a lab's nodes (`/sys/fs/bpf/weir/<lab>-<node>`).
pub fn pin_dirs(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir("/sys/fs/bpf/weir")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_pins(name: &str) {
    for dir in pin_dirs(name) {
        if is_mountpoint(&dir) {
            let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let p = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

/// Mounts bpffs at /sys/fs/bpf when it is not (the agents pin under it).
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _ = f.next();
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")
}

/// A lab's address index from its name (labs live in disjoint namespaces, so equal indexes only
/// make addresses look alike, they do not collide).
pub(crate) fn lab_index(name: &str) -> u8 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    20 + (h % 200) as u8
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root: it creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

pub use crate::process::find_bin;

/// Signals `pid` only if its command line shows it belongs to lab `name`.
fn kill_if_ours(pid: u32, name: &str, signal: i32) {
    process::signal_if(pid, &[&server_marker(name), &agent_marker(name)], signal);
}

/// What only the servers of lab `name` have on their command line.
fn server_marker(name: &str) -> String {
    format!("--lab {name} ")
}

/// What only the agents of lab `name` have on their command line.
fn agent_marker(name: &str) -> String {
    format!("--manifests {}/manifests ", State::dir_of(name).display())
}

/// Copies a lab's logs to /tmp/weir-lab-logs/<lab>/ (the lab directory goes away with the lab).
fn save_logs(state: &State) -> PathBuf {
    let to = Path::new("/tmp/weir-lab-logs").join(&state.name);
    let _ = std::fs::remove_dir_all(&to);
    let _ = std::fs::create_dir_all(&to);
    let mut files: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&state.dir) {
        files.extend(dir.filter_map(Result::ok).map(|e| e.path()));
    }
    for node in &state.nodes {
        files.push(node.log.clone());
        files.push(node.state_dir.join("flows.jsonl"));
    }
    for file in files {
        if file
            .extension()
            .is_some_and(|e| e == "log" || e == "jsonl" || e == "json")
            && let Some(name) = file.file_name()
        {
            let prefix = file
                .parent()
                .and_then(|p| p.file_name())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = std::fs::copy(
                &file,
                to.join(format!("{prefix}-{}", name.to_string_lossy())),
            );
        }
    }
    to
}

/// The drop records among `flows` (flows.jsonl records) of traffic from `src` to `dst` on `to`'s
/// port and protocol, written from `since` on (older ones may describe older policies).
pub(crate) fn drops_between<'a>(
    flows: &'a [serde_json::Value],
    src: &str,
    dst: &str,
    to: &Target,
    since: std::time::SystemTime,
) -> impl Iterator<Item = &'a serde_json::Value> {
    let since_ms = since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (src, dst, proto) = (src.to_owned(), dst.to_owned(), to.proto.to_string());
    let port = u64::from(to.port);
    flows.iter().filter(move |f| {
        f["verdict"] == "drop"
            && f["time_ms"].as_u64().is_none_or(|t| t >= since_ms)
            && f["src"].as_str() == Some(src.as_str())
            && f["dst"].as_str() == Some(dst.as_str())
            && f["dport"].as_u64() == Some(port)
            && f["proto"].as_str() == Some(proto.as_str())
    })
}

/// What a drop record says isolated the pod, and which rule (none, for a policy denial) would
/// have allowed the traffic: "isolated by <policies>; <rule>".
pub(crate) fn why_isolated(f: &serde_json::Value) -> String {
    let direction = f["direction"].as_str().unwrap_or("?");
    let policies: Vec<&str> = f["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    format!(
        "isolated by {}; {}",
        if policies.is_empty() {
            "no policy".to_string()
        } else {
            policies.join(", ")
        },
        match f["rule"].as_str() {
            Some(rule) => format!("rule {rule}"),
            None => format!("no {direction} rule of these policies allows it"),
        }
    )
}
