//! Mesh labs: two or more clusters, each a lab of its own (nodes as namespaces, the real agents in
//! standalone mode, pods wired by the real weir-cni), whose gateway nodes are joined by a "WAN"
//! namespace and nothing else. Workers of different clusters have no route to each other: the
//! only way across is the gateways' mesh link (gRPC over mTLS on one TCP port).
//!
//! Layout of mesh lab `<name>`:
//! - cluster `<c>` is the lab `<name><c>` (its namespaces are `wl-<name><c>-*`); its first
//!   [`ClusterSpec::gateways`] nodes (`node1`, ...) are its gateways (Node label
//!   `mesh.weir.io/gateway=true`, active/active), the other nodes are workers;
//! - the WAN is the namespace `wl-<name>-wan`, a router with one veth per gateway (`wan0` on the
//!   gateway's side, 192.0.2.0/24 in /30s: documentation addresses, never routed off the machine);
//! - certificates are made at start: a mesh CA and one gateway certificate per cluster (its
//!   gateways share it), naming the cluster in its URI SAN; each cluster's manifests directory
//!   holds a Node per node and a MeshPeer per other cluster (every gateway's WAN address, the CA,
//!   its pod prefix, and the export selector `mesh.weir.io/export: "true"` on namespaces);
//! - /run/weir-lab/<name>/mesh.json records the clusters, so [`super::down`] of the mesh lab takes
//!   its clusters down too, from any process, also after a failure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use weir_mesh::certs::MeshCa;

use super::probe::{self, ProbeOptions};
use super::state::State;
use super::wan_capture::WanCapture;
use super::{Lab, LabSpec, Manifest, topology};
use crate::matrix::{Difference, Expectations, Matrix, Proto, Target};
use crate::netns;

/// The port gateways listen on for peers (the agent's default `--mesh-listen`).
pub const MESH_PORT: u16 = 4243;
/// The trust domain of the lab's certificates (`spiffe://<domain>/cluster/<name>`).
pub const TRUST_DOMAIN: &str = "lab.weir.test";
/// The namespace label the lab's MeshPeers export by.
pub const EXPORT_LABEL: &str = "mesh.weir.io/export";

/// One cluster of a mesh lab.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The cluster's name (a-z, 0-9): its certificate's name and what `weir.io/cluster` says.
    pub name: String,
    /// Nodes, the first `gateways` of which are gateways.
    pub nodes: usize,
    /// Gateway nodes (1 to 4, at most `nodes`): every one talks to every gateway of the other
    /// clusters, and workers spread flows over them.
    pub gateways: usize,
    pub manifests: Vec<Manifest>,
}

#[derive(Clone, Debug)]
pub struct MeshSpec {
    /// 1 to 10 characters, a-z and 0-9; with a cluster's name at most 12.
    pub name: String,
    pub clusters: Vec<ClusterSpec>,
    /// Ports every pod serves besides its containerPorts.
    pub extra_ports: Vec<u16>,
    /// Capture every frame on the WAN from before the first gateway connects (see
    /// [`MeshLab::take_capture`]).
    pub capture_wan: bool,
}

/// What a mesh lab made, in /run/weir-lab/<name>/mesh.json.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MeshState {
    pub name: String,
    pub wan_netns: String,
    pub clusters: Vec<ClusterRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    /// The cluster's lab.
    pub lab: String,
    /// The first gateway node (`gateway_nodes[0]`).
    pub gateway_node: String,
    /// The first gateway's address on the WAN (`wan_ips[0]`).
    pub wan_ip: String,
    /// Every gateway node, in order.
    #[serde(default)]
    pub gateway_nodes: Vec<String>,
    /// Every gateway's address on the WAN, in the order of `gateway_nodes`.
    #[serde(default)]
    pub wan_ips: Vec<String>,
    /// Every pod address of the cluster is in here (its MeshPeer's `allowedPrefixes` elsewhere).
    pub pod_prefix: String,
}

impl MeshState {
    pub fn path_of(name: &str) -> PathBuf {
        State::dir_of(name).join("mesh.json")
    }

    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = Self::path_of(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no mesh lab named {name:?} ({path:?} is missing)"))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = Self::path_of(&self.name);
        std::fs::create_dir_all(State::dir_of(&self.name))?;
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {path:?}"))
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterRecord> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// Whether `name` is a mesh lab (rather than a single-cluster lab).
pub fn is_mesh(name: &str) -> bool {
    MeshState::path_of(name).exists()
}

/// Takes down the cluster labs a mesh lab `name` recorded (nothing if it is not a mesh lab). The
/// WAN namespace and the mesh's directory go with [`super::down`] of `name` itself.
pub fn down_clusters(name: &str) -> anyhow::Result<()> {
    let Ok(state) = MeshState::load(name) else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for cluster in &state.clusters {
        if let Err(e) = super::down(&cluster.lab) {
            errors.push(format!("cluster {}: {e:#}", cluster.name));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

/// A running mesh lab. Dropping it takes everything down unless it was [`MeshLab::open`]ed or
/// [`MeshLab::keep`]t.
pub struct MeshLab {
    state: MeshState,
    clusters: Vec<Lab>,
    capture: Option<WanCapture>,
    owned: bool,
    /// The mesh CA, for labs built by this process (it is never written to disk).
    ca: Option<MeshCa>,
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = super::down(&self.state.name)
        {
            eprintln!("mesh lab {}: taking it down: {e:#}", self.state.name);
        }
    }
}

fn validate(spec: &MeshSpec) -> anyhow::Result<()> {
    super::validate_name(&spec.name)?;
    if spec.clusters.len() < 2 || spec.clusters.len() > 8 {
        bail!("a mesh lab has 2 to 8 clusters");
    }
    for (i, c) in spec.clusters.iter().enumerate() {
        let lab = format!("{}{}", spec.name, c.name);
        if c.name.is_empty()
            || !c
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("a cluster name is a-z and 0-9, not {:?}", c.name);
        }
        super::validate_name(&lab).with_context(|| {
            format!(
                "cluster {:?} of mesh lab {:?}: the lab name plus the cluster name must fit in 12 characters",
                c.name, spec.name
            )
        })?;
        if c.nodes == 0 || c.nodes > 20 {
            bail!("cluster {}: 1 to 20 nodes", c.name);
        }
        if c.gateways == 0 || c.gateways > 4 || c.gateways > c.nodes {
            bail!(
                "cluster {}: 1 to 4 gateways, at most one per node ({} nodes)",
                c.name,
                c.nodes
            );
        }
        if spec.clusters[..i].iter().any(|o| o.name == c.name) {
            bail!("two clusters are named {:?}", c.name);
        }
    }
    Ok(())
}

impl MeshLab {
    /// Builds the mesh: certificates, the WAN, each cluster (nodes, agents, pods), then the
    /// MeshPeers; returns once every gateway holds every peer's complete first sync. A lab left
    /// over with the same name is taken down first; on error, everything built is taken down.
    pub fn up(spec: MeshSpec) -> anyhow::Result<MeshLab> {
        validate(&spec)?;
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root: it creates network namespaces and loads eBPF programs");
        }
        super::down(&spec.name).context("taking down a previous lab of the same name")?;
        let base = super::lab_index(&spec.name);
        let state = MeshState {
            name: spec.name.clone(),
            wan_netns: format!("wl-{}-wan", spec.name),
            clusters: spec
                .clusters
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    // Distinct address ranges per cluster: the prefixes must not overlap.
                    let index = cluster_index(base, i);
                    let gateway_nodes: Vec<String> =
                        (1..=c.gateways).map(topology::node_name).collect();
                    let wan_ips: Vec<String> = (0..c.gateways)
                        .map(|g| format!("192.0.2.{}", 4 * wan_slot(i, g) + 1))
                        .collect();
                    ClusterRecord {
                        name: c.name.clone(),
                        lab: format!("{}{}", spec.name, c.name),
                        gateway_node: gateway_nodes[0].clone(),
                        wan_ip: wan_ips[0].clone(),
                        gateway_nodes,
                        wan_ips,
                        pod_prefix: format!("10.{index}.0.0/16"),
                    }
                })
                .collect(),
        };
        state.save()?;
        // From here on, dropping `lab` takes down whatever was built.
        let mut lab = MeshLab {
            state,
            clusters: Vec::new(),
            capture: None,
            owned: true,
            ca: None,
        };
        lab.build(&spec).with_context(|| {
            format!(
                "building mesh lab {} (agent logs are kept in /tmp/weir-lab-logs/<cluster lab>/ when a cluster failed)",
                spec.name
            )
        })?;
        Ok(lab)
    }

    fn build(&mut self, spec: &MeshSpec) -> anyhow::Result<()> {
        let dir = State::dir_of(&self.state.name);
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        let ca = MeshCa::new(&format!("weir lab {} mesh CA", self.state.name))?;
        build_wan_router(&self.state.wan_netns)?;
        if spec.capture_wan {
            self.capture = Some(WanCapture::start(&self.state.wan_netns)?);
        }
        let base = super::lab_index(&self.state.name);
        for (i, cluster) in spec.clusters.iter().enumerate() {
            let record = self.state.clusters[i].clone();
            let (cert, key) = ca
                .gateway(TRUST_DOMAIN, &cluster.name)?
                .write(&certs, &cluster.name)?;
            let mut lab_spec = LabSpec::new(&record.lab, cluster.nodes);
            lab_spec.index = Some(cluster_index(base, i));
            lab_spec.extra_ports = spec.extra_ports.clone();
            lab_spec.agent_args = vec![
                "--mesh-cert".into(),
                cert.display().to_string(),
                "--mesh-key".into(),
                key.display().to_string(),
            ];
            lab_spec.manifests = cluster.manifests.clone();
            lab_spec.manifests.push(Manifest::Yaml(node_objects(
                &lab_spec,
                cluster.nodes,
                cluster.gateways,
            )));
            let built = Lab::up(lab_spec).with_context(|| format!("cluster {}", cluster.name))?;
            built.keep();
            self.clusters.push(Lab::open(&record.lab)?);
            for g in 0..cluster.gateways {
                self.connect_to_wan(i, g)?;
            }
        }
        let ca_pem = ca.pem();
        self.ca = Some(ca);
        for i in 0..self.clusters.len() {
            let peers: String = self
                .state
                .clusters
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, peer)| mesh_peer_yaml(peer, &ca_pem))
                .collect();
            self.clusters[i].apply_yaml(&peers)?;
        }
        self.wait_synced(Duration::from_secs(60))
    }

    /// A veth from the WAN router to gateway `g` of cluster `i` (`wan0`), a /30 each, and the
    /// gateway's route to the WAN's other addresses through the router. Workers get nothing.
    fn connect_to_wan(&self, i: usize, g: usize) -> anyhow::Result<()> {
        let wan = &self.state.wan_netns;
        let record = &self.state.clusters[i];
        let gateway = self.clusters[i]
            .state()
            .node(&record.gateway_nodes[g])
            .context("the cluster has no such gateway node")?
            .netns
            .clone();
        let slot = wan_slot(i, g);
        let port = format!("c{}g{}", i + 1, g + 1);
        netns::ip_in(
            wan,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "wan0", "netns", &gateway,
            ],
        )?;
        // IPv4 only on the WAN: the capture then accounts for every frame (no IPv6 neighbour
        // discovery beside the link's TCP).
        netns::sysctl_in(&gateway, "net.ipv6.conf.wan0.disable_ipv6", "1")?;
        let router = format!("192.0.2.{}", 4 * slot + 2);
        netns::ip_in(wan, &["addr", "add", &format!("{router}/30"), "dev", &port])?;
        netns::ip_in(
            &gateway,
            &[
                "addr",
                "add",
                &format!("{}/30", record.wan_ips[g]),
                "dev",
                "wan0",
            ],
        )?;
        netns::ip_in(wan, &["link", "set", &port, "up"])?;
        netns::ip_in(&gateway, &["link", "set", "wan0", "up"])?;
        netns::ip_in(
            &gateway,
            &[
                "route",
                "add",
                "192.0.2.0/24",
                "via",
                &router,
                "dev",
                "wan0",
            ],
        )?;
        Ok(())
    }

    /// Rotates `cluster`'s certificate: a new key and certificate from the same CA written over
    /// the files its gateways read (key first: the agents reload when the certificate changes).
    /// Only for a lab this process built (the CA lives in memory).
    pub fn rotate_certificate(&self, cluster: &str) -> anyhow::Result<()> {
        let ca = self
            .ca
            .as_ref()
            .context("only the process that built the mesh lab holds its CA")?;
        let certs = State::dir_of(&self.state.name).join("certs");
        let staging = certs.join("rotated");
        std::fs::create_dir_all(&staging)?;
        let (cert, key) = ca
            .gateway(TRUST_DOMAIN, cluster)?
            .write(&staging, cluster)?;
        std::fs::copy(&key, certs.join(format!("{cluster}.key")))?;
        std::fs::copy(&cert, certs.join(format!("{cluster}.crt")))?;
        Ok(())
    }

    /// Sets the WAN link of `cluster`'s gateway `g` down or up (on the router's side): the
    /// gateway goes silent to its peers without knowing it.
    pub fn set_wan(&self, cluster: &str, g: usize, up: bool) -> anyhow::Result<()> {
        let i = self.cluster_position(cluster)?;
        let port = format!("c{}g{}", i + 1, g + 1);
        netns::ip_in(
            &self.state.wan_netns,
            &["link", "set", &port, if up { "up" } else { "down" }],
        )
    }

    /// Drops everything the WAN router forwards to or from `cluster`'s gateway `g`, or stops
    /// dropping it: the gateway's process runs and its links stay up, but it neither hears its
    /// peers nor is heard (a blackholed WAN, not a killed gateway or a link that went down).
    /// Routing does the dropping (a blackhole rule for what arrives on the gateway's port and a
    /// blackhole route to its address), so the lab needs nothing beyond iproute2.
    pub fn blackhole_wan(&self, cluster: &str, g: usize, on: bool) -> anyhow::Result<()> {
        let i = self.cluster_position(cluster)?;
        let port = format!("c{}g{}", i + 1, g + 1);
        let gateway = format!("{}/32", self.state.clusters[i].wan_ips[g]);
        let op = if on { "add" } else { "del" };
        let wan = &self.state.wan_netns;
        netns::ip_in(wan, &["rule", op, "iif", &port, "blackhole"])?;
        netns::ip_in(wan, &["route", op, "blackhole", &gateway])
    }

    /// Waits until every gateway has persisted every peer's import: the agent writes it only
    /// after the peer's "synced" marker, so the first sync is complete.
    fn wait_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for cluster in &self.state.clusters {
            for gateway in self.gateways_of(cluster) {
                for peer in &self.state.clusters {
                    if peer.name == cluster.name {
                        continue;
                    }
                    let path = self.gateway_import_path(&cluster.name, &gateway, &peer.name)?;
                    while !path.exists() {
                        if Instant::now() > deadline {
                            let lab = self.cluster(&cluster.name)?;
                            bail!(
                                "cluster {}'s gateway {gateway} has no complete import from {} after {timeout:?}; its log ends with:\n{}",
                                cluster.name,
                                peer.name,
                                lab.agent_log(&gateway, 30)
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }

    /// A cluster's gateway nodes (a record of before active/active names one).
    fn gateways_of(&self, cluster: &ClusterRecord) -> Vec<String> {
        if cluster.gateway_nodes.is_empty() {
            vec![cluster.gateway_node.clone()]
        } else {
            cluster.gateway_nodes.clone()
        }
    }

    /// The gateway nodes of `cluster`, in order.
    pub fn gateway_nodes(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        let record = self
            .state
            .cluster(cluster)
            .with_context(|| format!("no cluster {cluster}"))?;
        Ok(self.gateways_of(record))
    }

    /// A mesh lab that is running (made by another process); dropping it leaves it running.
    pub fn open(name: &str) -> anyhow::Result<MeshLab> {
        let state = MeshState::load(name)?;
        let clusters = state
            .clusters
            .iter()
            .map(|c| Lab::open(&c.lab))
            .collect::<anyhow::Result<_>>()?;
        Ok(MeshLab {
            state,
            clusters,
            capture: None,
            owned: false,
            ca: None,
        })
    }

    /// Leaves the lab running when this value is dropped (a running capture stops).
    pub fn keep(mut self) -> MeshState {
        self.owned = false;
        self.state.clone()
    }

    /// Takes the lab down now.
    pub fn down(mut self) -> anyhow::Result<()> {
        self.owned = false;
        self.capture = None;
        super::down(&self.state.name)
    }

    pub fn state(&self) -> &MeshState {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The WAN capture started by [`MeshSpec::capture_wan`] (once).
    pub fn take_capture(&mut self) -> Option<WanCapture> {
        self.capture.take()
    }

    pub fn cluster(&self, name: &str) -> anyhow::Result<&Lab> {
        let i = self.cluster_position(name)?;
        Ok(&self.clusters[i])
    }

    pub fn cluster_mut(&mut self, name: &str) -> anyhow::Result<&mut Lab> {
        let i = self.cluster_position(name)?;
        Ok(&mut self.clusters[i])
    }

    fn cluster_position(&self, name: &str) -> anyhow::Result<usize> {
        self.state
            .clusters
            .iter()
            .position(|c| c.name == name)
            .with_context(|| format!("mesh lab {} has no cluster {name:?}", self.state.name))
    }

    /// Where `cluster`'s (first) gateway persists what `peer` exports to it.
    pub fn import_path(&self, cluster: &str, peer: &str) -> anyhow::Result<PathBuf> {
        let record = self
            .state
            .cluster(cluster)
            .with_context(|| format!("no cluster {cluster}"))?;
        self.gateway_import_path(cluster, &record.gateway_node, peer)
    }

    /// Where gateway node `gateway` of `cluster` persists what `peer` exports to it.
    pub fn gateway_import_path(
        &self,
        cluster: &str,
        gateway: &str,
        peer: &str,
    ) -> anyhow::Result<PathBuf> {
        let lab = self.cluster(cluster)?;
        let node = lab
            .state()
            .node(gateway)
            .with_context(|| format!("no node {gateway} in cluster {cluster}"))?;
        Ok(node.state_dir.join("mesh").join(format!("{peer}.json")))
    }

    /// Every pod of every cluster as `cluster/namespace/name`, with its namespace and address.
    pub fn pods(&self) -> anyhow::Result<Vec<probe::Endpoint>> {
        let mut out = Vec::new();
        for (record, lab) in self.state.clusters.iter().zip(&self.clusters) {
            for (key, pod) in &lab.state().pods {
                out.push(probe::Endpoint {
                    pod: format!("{}/{key}", record.name),
                    netns: pod.netns.clone(),
                    ip: lab.pod_ip(key)?,
                });
            }
        }
        Ok(out)
    }

    /// Probes from every pod to every declared port of every pod of the *other* clusters (and to
    /// `extra` cells), with real connections, in parallel. Keys are `cluster/namespace/name`.
    pub fn probe(&self, extra: &[Target], expect: Option<&Expectations>) -> anyhow::Result<Matrix> {
        let pods = self.pods()?;
        let mut targets: Vec<(Target, IpAddr)> = Vec::new();
        for (record, lab) in self.state.clusters.iter().zip(&self.clusters) {
            for (key, pod) in &lab.state().pods {
                for &(port, proto) in &pod.ports {
                    targets.push((
                        Target::new(&format!("{}/{key}", record.name), port, proto),
                        lab.pod_ip(key)?,
                    ));
                }
            }
        }
        for t in extra {
            if !targets.iter().any(|(have, _)| have == t) {
                let ip = pods
                    .iter()
                    .find(|p| p.pod == t.pod)
                    .with_context(|| format!("no pod {}", t.pod))?
                    .ip;
                targets.push((t.clone(), ip));
            }
        }
        let cluster_of = |key: &str| key.split('/').next().unwrap_or_default().to_string();
        let mut handles = Vec::new();
        for source in &pods {
            for (target, ip) in &targets {
                if cluster_of(&target.pod) == cluster_of(&source.pod) {
                    continue;
                }
                let mut options = ProbeOptions::default();
                // A denied probe waits out its timeout; an allowed one across the link answers
                // in milliseconds.
                if expect.and_then(|e| e.get(&source.pod, target)) == Some(false) {
                    options.timeout = Duration::from_millis(400);
                }
                let (source, target, ip) = (source.clone(), target.clone(), *ip);
                handles.push(std::thread::Builder::new().stack_size(64 * 1024).spawn(
                    move || {
                        let allowed = netns::enter(&source.netns).is_ok()
                            && probe::probe_one(
                                SocketAddr::new(ip, target.port),
                                target.proto,
                                options,
                            );
                        ((source.pod, target), allowed)
                    },
                )?);
            }
        }
        let cells: BTreeMap<(String, Target), bool> =
            handles.into_iter().filter_map(|h| h.join().ok()).collect();
        let mut sources: Vec<String> = pods.iter().map(|p| p.pod.clone()).collect();
        sources.retain(|s| cells.keys().any(|(from, _)| from == s));
        let mut columns: Vec<Target> = targets.into_iter().map(|(t, _)| t).collect();
        columns.retain(|t| cells.keys().any(|(_, to)| to == t));
        Ok(Matrix {
            sources,
            targets: columns,
            cells,
        })
    }

    /// Probes until the matrix matches `expect` or `timeout` passes; the last matrix and its
    /// differences.
    pub fn probe_until(
        &self,
        expect: &Expectations,
        timeout: Duration,
    ) -> anyhow::Result<(Matrix, Vec<Difference>)> {
        let extra: Vec<Target> = expect.entries.keys().map(|(_, t)| t.clone()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let matrix = self.probe(&extra, Some(expect))?;
            let diffs = matrix.differences(expect);
            if diffs.is_empty() || Instant::now() > deadline {
                return Ok((matrix, diffs));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Why the agents dropped `from`'s traffic to `to` (keys `cluster/namespace/name`): the drop
    /// records of both clusters' nodes from `since` on, each naming where it was dropped, the
    /// peer's identity as the dropping node knows it (for a remote peer: its cluster, namespace
    /// and labels, with `weir.io/cluster`), the policies that isolated the pod, and the rule.
    pub fn explain_drop(
        &self,
        from: &str,
        to: &Target,
        since: std::time::SystemTime,
    ) -> anyhow::Result<Vec<String>> {
        let ip = |key: &str| -> anyhow::Result<String> {
            let (cluster, pod) = key.split_once('/').context("key without cluster")?;
            Ok(self.cluster(cluster)?.pod_ip(pod)?.to_string())
        };
        let (src, dst) = (ip(from)?, ip(&to.pod)?);
        let mut lines = Vec::new();
        for (record, lab) in self.state.clusters.iter().zip(&self.clusters) {
            let flows = lab.flows();
            for f in super::drops_between(&flows, &src, &dst, to, since) {
                let direction = f["direction"].as_str().unwrap_or("?");
                let line = format!(
                    "dropped at {}/{}'s {direction} on {}/{} ({}), peer {}: {}",
                    record.name,
                    f["endpoint"].as_str().unwrap_or("?"),
                    record.name,
                    f["node"].as_str().unwrap_or("?"),
                    f["reason"].as_str().unwrap_or("?"),
                    f["peer"].as_str().unwrap_or("?"),
                    super::why_isolated(f),
                );
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
        }
        Ok(lines)
    }
}

impl MeshLab {
    /// Sends `marker` from pod `from` to `to` (keys `cluster/namespace/name`) as the payload of a
    /// TCP connection or a UDP datagram, as an application would; waits for the server's answer
    /// so it is known to have crossed (false: no answer, e.g. denied).
    pub fn send_marker(&self, from: &str, to: &Target, marker: &[u8]) -> anyhow::Result<bool> {
        use std::io::{Read as _, Write as _};
        let pods = self.pods()?;
        let find = |key: &str| {
            pods.iter()
                .find(|p| p.pod == key)
                .cloned()
                .with_context(|| format!("no pod {key}"))
        };
        let (source, target) = (find(from)?, find(&to.pod)?);
        let addr = SocketAddr::new(target.ip, to.port);
        let (proto, marker) = (to.proto, marker.to_vec());
        netns::run_in(&source.netns, move || -> anyhow::Result<bool> {
            let timeout = Duration::from_secs(2);
            let mut answer = [0u8; 256];
            match proto {
                Proto::Tcp => {
                    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, timeout)
                    else {
                        return Ok(false);
                    };
                    stream.set_read_timeout(Some(timeout))?;
                    stream.write_all(&marker)?;
                    Ok(matches!(stream.read(&mut answer), Ok(n) if n > 0))
                }
                Proto::Udp => {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    socket.set_read_timeout(Some(timeout))?;
                    socket.send_to(&marker, addr)?;
                    Ok(matches!(socket.recv(&mut answer), Ok(n) if n > 0))
                }
            }
        })?
    }

    /// The namespace of pod `key` (`cluster/namespace/name`).
    pub fn pod_netns(&self, key: &str) -> anyhow::Result<String> {
        Ok(self
            .pods()?
            .into_iter()
            .find(|p| p.pod == key)
            .with_context(|| format!("no pod {key}"))?
            .netns)
    }
}

/// The WAN /30 of gateway `g` of cluster `i` (four per cluster: 8 clusters fill 192.0.2.0/24).
fn wan_slot(i: usize, g: usize) -> usize {
    4 * i + g
}

/// Cluster `i`'s address index: the mesh's own, then the next ones (wrapping inside the labs'
/// range 20..220), so the clusters' prefixes never overlap.
fn cluster_index(base: u8, i: usize) -> u8 {
    20 + ((usize::from(base) - 20 + i) % 200) as u8
}

/// The WAN router: a namespace that forwards IPv4 between the gateways' links and nothing else.
fn build_wan_router(wan: &str) -> anyhow::Result<()> {
    netns::add(wan)?;
    netns::sysctl_in(wan, "net.ipv6.conf.all.disable_ipv6", "1")?;
    netns::sysctl_in(wan, "net.ipv6.conf.default.disable_ipv6", "1")?;
    netns::sysctl_in(wan, "net.ipv4.ip_forward", "1")
}

/// The Node objects of a cluster: names, pod CIDRs and underlay addresses as the lab plans them,
/// the first `gateways` nodes labelled as mesh gateways.
fn node_objects(spec: &LabSpec, nodes: usize, gateways: usize) -> String {
    let plan = State {
        name: spec.name.clone(),
        index: spec.index.unwrap_or_default(),
        dir: State::dir_of(&spec.name),
        ..State::default()
    };
    topology::plan_nodes(&plan, nodes)
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let labels = if i < gateways {
                "{mesh.weir.io/gateway: 'true'}"
            } else {
                "{}"
            };
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {labels}}}\n\
                 spec: {{podCIDRs: ['{}']}}\nstatus: {{addresses: [{{type: InternalIP, address: '{}'}}]}}\n",
                n.name, n.pod_cidr, n.underlay_ip
            )
        })
        .collect()
}

/// The MeshPeer a cluster declares for `peer`: every gateway of it is an endpoint.
fn mesh_peer_yaml(peer: &ClusterRecord, ca_pem: &str) -> String {
    let ca = ca_pem.trim_end().replace('\n', "\n    ");
    let wan_ips = if peer.wan_ips.is_empty() {
        std::slice::from_ref(&peer.wan_ip)
    } else {
        &peer.wan_ips[..]
    };
    let endpoints: Vec<String> = wan_ips
        .iter()
        .map(|ip| format!("'{ip}:{MESH_PORT}'"))
        .collect();
    format!(
        "---\napiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {}}}\nspec:\n  \
         endpoints: [{}]\n  allowedPrefixes: ['{}']\n  \
         export: {{namespaceSelector: {{matchLabels: {{{EXPORT_LABEL}: 'true'}}}}}}\n  \
         staleTTL: 10m\n  caBundle: |\n    {ca}\n",
        peer.name,
        endpoints.join(", "),
        peer.pod_prefix
    )
}

/// `cargo xtask lab up --cluster A=PATH --cluster B=PATH`: builds the mesh and leaves it running.
pub fn up_from_cli(
    name: &str,
    clusters: &[String],
    nodes: usize,
    extra_ports: Vec<u16>,
) -> anyhow::Result<()> {
    let spec = MeshSpec {
        name: name.to_string(),
        clusters: clusters
            .iter()
            .map(|c| parse_cluster_arg(c, nodes))
            .collect::<anyhow::Result<_>>()?,
        extra_ports,
        capture_wan: false,
    };
    let lab = MeshLab::up(spec)?;
    let pods = lab.pods()?;
    let state = lab.keep();
    println!(
        "mesh lab {name}: {} clusters joined through the WAN namespace {}",
        state.clusters.len(),
        state.wan_netns
    );
    for c in &state.clusters {
        let lab = State::load(&c.lab)?;
        println!(
            "  cluster {} (lab {}, pods {}, gateway {} at {}:{MESH_PORT} on the WAN)",
            c.name, c.lab, c.pod_prefix, c.gateway_node, c.wan_ip
        );
        for node in &lab.nodes {
            println!(
                "    {} (netns {}, underlay {}, pods {}, log {})",
                node.name,
                node.netns,
                node.underlay_ip,
                node.pod_cidr,
                node.log.display()
            );
        }
    }
    for p in pods {
        println!("  {} at {} (netns {})", p.pod, p.ip, p.netns);
    }
    println!(
        "probe across clusters with `cargo xtask lab probe --name {name}`; change a cluster with \
         `cargo xtask lab apply --name <lab of the cluster> FILE`; take it all down with \
         `cargo xtask lab down --name {name}`"
    );
    Ok(())
}

/// `cargo xtask lab probe --name MESH`: the cross-cluster matrix.
pub fn probe_from_cli(name: &str, expect: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let lab = MeshLab::open(name)?;
    let expect = expect.map(Expectations::load).transpose()?;
    let extra: Vec<Target> = expect
        .iter()
        .flat_map(|e| e.entries.keys().map(|(_, t)| t.clone()))
        .collect();
    let matrix = lab.probe(&extra, expect.as_ref())?;
    crate::matrix::report(&matrix, expect.as_ref(), json)
}

/// Reads `--cluster NAME=PATH` arguments.
pub fn parse_cluster_arg(text: &str, nodes: usize) -> anyhow::Result<ClusterSpec> {
    let (name, path) = text
        .split_once('=')
        .with_context(|| format!("--cluster {text:?} is not NAME=MANIFESTS"))?;
    Ok(ClusterSpec {
        name: name.to_string(),
        nodes,
        gateways: 1,
        manifests: vec![Manifest::Path(Path::new(path).to_path_buf())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_get_distinct_address_ranges() {
        for base in 20..220u8 {
            let a = cluster_index(base, 0);
            let b = cluster_index(base, 1);
            assert_ne!(a, b);
            assert!((20..220).contains(&a) && (20..220).contains(&b));
        }
    }

    #[test]
    fn names_must_fit_the_lab_names() {
        let spec = |name: &str, clusters: &[&str]| MeshSpec {
            name: name.into(),
            clusters: clusters
                .iter()
                .map(|c| ClusterSpec {
                    name: (*c).into(),
                    nodes: 2,
                    gateways: 1,
                    manifests: Vec::new(),
                })
                .collect(),
            extra_ports: Vec::new(),
            capture_wan: false,
        };
        validate(&spec("mesh", &["west", "east"])).unwrap();
        assert!(validate(&spec("mesh", &["west"])).is_err(), "one cluster");
        assert!(validate(&spec("mesh", &["west", "west"])).is_err());
        assert!(validate(&spec("meshlabname", &["west", "east"])).is_err());
        assert!(validate(&spec("mesh", &["West", "east"])).is_err());
        let mut three = spec("mesh", &["west", "east"]);
        three.clusters[0].gateways = 3;
        assert!(validate(&three).is_err(), "more gateways than nodes");
        three.clusters[0].nodes = 3;
        validate(&three).unwrap();
    }

    #[test]
    fn peers_and_nodes_are_manifests_the_lab_reads() {
        let peer = ClusterRecord {
            name: "east".into(),
            lab: "mesheast".into(),
            gateway_node: "node1".into(),
            wan_ip: "192.0.2.17".into(),
            gateway_nodes: vec!["node1".into(), "node2".into()],
            wan_ips: vec!["192.0.2.17".into(), "192.0.2.21".into()],
            pod_prefix: "10.41.0.0/16".into(),
        };
        let yaml = mesh_peer_yaml(
            &peer,
            "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n",
        );
        let objects = crate::objects::parse(&yaml).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].kind(), "MeshPeer");
        assert!(
            yaml.contains("endpoints: ['192.0.2.17:4243', '192.0.2.21:4243']"),
            "{yaml}"
        );
        let mut spec = LabSpec::new("meshwest", 3);
        spec.index = Some(40);
        let nodes = crate::objects::parse(&node_objects(&spec, 3, 2)).unwrap();
        assert_eq!(nodes.len(), 3);
        assert!(nodes[0].labels().contains_key("mesh.weir.io/gateway"));
        assert!(nodes[1].labels().contains_key("mesh.weir.io/gateway"));
        assert!(nodes[2].labels().is_empty());
    }
}
