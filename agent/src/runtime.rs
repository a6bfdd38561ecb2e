//! The agent's runtime: owns the cluster state, the local endpoints, the loaded programs and the
//! datapath writer, and keeps the maps equal to what the compiler says they should hold.
//!
//! Every change — a new cluster state from the source, an endpoint added or removed — goes
//! through `reconcile`: compile, diff, write. A cluster state equal to the one in force changes
//! nothing and compiles nothing. Start-up adopts what is pinned and changes nothing
//! until the first cluster state has been read, so a restarted agent never garbage-collects
//! enforcement it has not yet reconciled.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::Ebpf;
use tokio::sync::Notify;
use weir_common::{
    CONFIG_EMIT_ALLOW_EVENTS, CONFIG_REDIRECT_LOCAL, CONFIG_REDIRECT_REMOTE,
    CONFIG_REVOKE_ESTABLISHED, VerdictEvent,
};
use weir_policy::{
    compile::{CompileInput, compile},
    identity::IdentityAllocator,
    model::{ClusterState, ObjectKey},
    output::{Compiled, Rejection},
};

use crate::{
    datapath::{
        attach::{Programs, attach_endpoint, is_attached, retire_legacy_tcx_links},
        desired::desired_maps,
        maps::DatapathMaps,
        writer::{ApplyStats, DesiredMaps, Writer},
    },
    endpoints::{EndpointBackend, EndpointError, LocalEndpoint},
    flows::{Explainer, FlowLog},
    persist::{self, SnapshotLog},
};

/// What the runtime is configured with.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub node_name: String,
    /// Cluster id (top 8 bits of identities); 0 until the mesh link assigns ids.
    pub cluster_id: u8,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    /// Cut established connections that a policy change no longer allows.
    pub revoke_established: bool,
    /// Emit an event for every new allowed connection too.
    pub emit_allow_events: bool,
    /// Deliver pod-to-pod traffic of this node with `bpf_redirect_peer`.
    pub redirect_local_pods: bool,
    /// Hand traffic to other nodes' pods to the next hop with `bpf_redirect_neigh`.
    pub redirect_remote_pods: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Maps(#[from] crate::datapath::maps::MapsError),
    #[error("adopting the pinned maps: {0}")]
    Adopt(#[from] crate::datapath::writer::WriteError),
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    #[error(transparent)]
    Attach(#[from] crate::datapath::attach::AttachError),
}

/// Endpoints by (container id, interface name).
type EndpointId = (String, String);

struct Inner {
    /// Holds the loaded object (programs and the maps not taken by the writer).
    _ebpf: Ebpf,
    writer: Writer,
    /// The compiler's input: the cluster state (once read) and the local endpoints' addresses.
    input: CompileInput,
    /// Whether the source has delivered a cluster state yet.
    cluster_read: bool,
    endpoints: BTreeMap<EndpointId, LocalEndpoint>,
    /// Where `endpoints` is saved on every change (under this lock, so in order).
    endpoints_log: SnapshotLog,
    identities: IdentityAllocator,
    /// What identities.json holds, so it is written only when identities change.
    saved_identities: IdentityAllocator,
    compiled: Compiled,
    /// Set when the last apply failed: enforcement may lag the cluster.
    degraded: Option<String>,
}

pub struct Runtime {
    config: RuntimeConfig,
    /// The loaded programs' fds: attaching needs no lock.
    programs: Programs,
    inner: Mutex<Inner>,
    /// Woken whenever the cluster state changes (for ADDs waiting for their Pod).
    cluster_changed: Notify,
    explainer: RwLock<Explainer>,
    flow_log: FlowLog,
    /// Compiles since start (the health endpoint's `weir_policy_compiles_total`).
    compiles: AtomicU64,
}

impl Runtime {
    /// The registered endpoints, saved on every ADD and DEL (a `SnapshotLog`).
    fn endpoints_file(config: &RuntimeConfig) -> PathBuf {
        config.state_dir.join("endpoints.jsonl")
    }

    /// Where versions before the snapshot log kept them (moved into the log at start-up).
    fn legacy_endpoints_file(config: &RuntimeConfig) -> PathBuf {
        config.state_dir.join("endpoints.json")
    }

    fn identities_file(config: &RuntimeConfig) -> PathBuf {
        config.state_dir.join("identities.json")
    }

    /// Where earlier Weir versions pinned the TCX links of pods' veths (retired at start-up).
    fn legacy_links_dir(&self) -> PathBuf {
        self.config.bpffs_dir.join("links")
    }

    /// Adopts the pinned maps, restores the endpoints a previous agent registered and swaps the
    /// loaded programs into their pinned links. Writes no map until the first cluster state.
    pub fn start(config: RuntimeConfig, mut ebpf: Ebpf) -> Result<Arc<Self>, RuntimeError> {
        let maps = DatapathMaps::take(&mut ebpf)?;
        let programs = Programs::from_ebpf(&ebpf)?;
        let writer = Writer::adopt(maps)?;
        let identities: IdentityAllocator =
            persist::read_json(&Self::identities_file(&config))?.unwrap_or_default();
        let (endpoints_log, saved) = SnapshotLog::open::<Vec<LocalEndpoint>>(
            &Self::endpoints_file(&config),
            &Self::legacy_endpoints_file(&config),
        )?;
        let runtime = Arc::new(Self {
            flow_log: FlowLog::new(&config.state_dir),
            programs,
            inner: Mutex::new(Inner {
                _ebpf: ebpf,
                writer,
                input: CompileInput {
                    state: ClusterState::default(),
                    node_name: config.node_name.clone(),
                    cluster_id: u32::from(config.cluster_id),
                    local_endpoints: BTreeMap::new(),
                },
                cluster_read: false,
                endpoints: BTreeMap::new(),
                endpoints_log,
                saved_identities: identities.clone(),
                identities,
                compiled: Compiled::default(),
                degraded: None,
            }),
            cluster_changed: Notify::new(),
            explainer: RwLock::new(Explainer::default()),
            compiles: AtomicU64::new(0),
            config,
        });
        {
            let mut inner = runtime.lock();
            for endpoint in saved.unwrap_or_default() {
                if nix::net::if_::if_nametoindex(endpoint.host_ifname.as_str()).is_err() {
                    tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname,
                        "endpoint's veth is gone (deleted while the agent was down); forgetting it");
                    continue;
                }
                match attach_endpoint(&runtime.programs, &endpoint.host_ifname) {
                    Ok(()) => {
                        tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, "adopted endpoint")
                    }
                    Err(e) => {
                        tracing::error!(pod = %endpoint.pod, error = %e, "could not re-attach to an adopted endpoint; its old programs stay attached")
                    }
                }
                inner.endpoints.insert(
                    (endpoint.container_id.clone(), endpoint.ifname.clone()),
                    endpoint,
                );
            }
            Self::save_endpoints(&mut inner)?;
        }
        retire_legacy_tcx_links(&runtime.programs, &runtime.legacy_links_dir());
        Ok(runtime)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-written in a way a retry
        // would not fix, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The local endpoints (for start-up reconciliation of IPAM).
    pub fn endpoints(&self) -> Vec<LocalEndpoint> {
        self.lock().endpoints.values().cloned().collect()
    }

    /// Whether the last apply failed ("degraded") and why.
    pub fn degraded(&self) -> Option<String> {
        self.lock().degraded.clone()
    }

    /// Policy compiles since start.
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    /// A new cluster state from the source. Returns whether it was applied: a state equal to
    /// the one in force (a relist, a rewritten file with the same objects) is not compiled again.
    pub fn set_cluster_state(&self, state: ClusterState) -> bool {
        let mut inner = self.lock();
        let first = !inner.cluster_read;
        if !first && inner.input.state == state {
            tracing::debug!("cluster state unchanged; nothing to compile");
            return false;
        }
        inner.input.state = state;
        inner.cluster_read = true;
        self.reconcile(&mut inner);
        if first {
            tracing::info!(node = %self.config.node_name, "cluster state read; ready");
        }
        drop(inner);
        self.cluster_changed.notify_waiters();
        true
    }

    /// Compile and write. Failures leave the previous enforcement in place and are reported.
    fn reconcile(&self, inner: &mut Inner) {
        if !inner.cluster_read {
            return;
        }
        let started = Instant::now();
        let mut local: BTreeMap<ObjectKey, Vec<std::net::IpAddr>> = BTreeMap::new();
        for e in inner.endpoints.values() {
            local
                .entry(e.pod.clone())
                .or_default()
                .extend(e.addresses.iter().copied());
        }
        inner.input.local_endpoints = local;
        let Inner {
            input, identities, ..
        } = &mut *inner;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let compiled = match compile(input, identities) {
            Ok(compiled) => compiled,
            Err(e) => {
                tracing::error!(error = %e, "compiling policy failed; previous enforcement stays in place");
                inner.degraded = Some(e.to_string());
                return;
            }
        };
        let compile_time = started.elapsed();
        crate::metrics::metrics()
            .compile_seconds
            .observe(compile_time.as_secs_f64());
        log_new_rejections(&inner.compiled.rejections, &compiled.rejections);
        let desired = self.desired_maps(inner, &compiled);
        match inner.writer.apply(&desired) {
            Ok(stats) => {
                log_apply(&stats, compile_time, started.elapsed());
                inner.degraded = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the datapath; previous enforcement stays in place");
                inner.degraded = Some(e.to_string());
            }
        }
        if inner.identities != inner.saved_identities {
            match persist::write_json(&Self::identities_file(&self.config), &inner.identities) {
                Ok(()) => inner.saved_identities = inner.identities.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not save identities; a restart may renumber them")
                }
            }
        }
        *self.explainer.write().unwrap_or_else(|p| p.into_inner()) =
            Explainer::from_compiled(&compiled);
        inner.compiled = compiled;
    }

    fn desired_maps(&self, inner: &Inner, compiled: &Compiled) -> DesiredMaps {
        // The ifindex of every local address's veth, looked up once per endpoint.
        let mut ifindexes = BTreeMap::new();
        for endpoint in inner.endpoints.values() {
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(endpoint.host_ifname.as_str()) {
                for addr in &endpoint.addresses {
                    ifindexes.insert(*addr, ifindex);
                }
            }
        }
        let mut config_flags = 0;
        if self.config.revoke_established {
            config_flags |= CONFIG_REVOKE_ESTABLISHED;
        }
        if self.config.emit_allow_events {
            config_flags |= CONFIG_EMIT_ALLOW_EVENTS;
        }
        if self.config.redirect_local_pods {
            config_flags |= CONFIG_REDIRECT_LOCAL;
        }
        if self.config.redirect_remote_pods {
            config_flags |= CONFIG_REDIRECT_REMOTE;
        }
        desired_maps(compiled, |addr| ifindexes.get(addr).copied(), config_flags)
    }

    /// Saves the endpoints; called with the lock held, so saves happen in the order of the
    /// changes and an older snapshot never overwrites a newer one.
    fn save_endpoints(inner: &mut Inner) -> Result<(), persist::PersistError> {
        let endpoints: Vec<&LocalEndpoint> = inner.endpoints.values().collect();
        inner.endpoints_log.save(&endpoints)
    }

    /// Read-only access to what the runtime holds, for the Inspect API. Holds the runtime's
    /// lock while `f` runs: copy what is needed and return.
    pub fn view<T>(&self, f: impl FnOnce(&RuntimeView<'_>) -> T) -> T {
        let inner = self.lock();
        let view = RuntimeView {
            node_name: &self.config.node_name,
            cluster_read: inner.cluster_read,
            degraded: inner.degraded.as_deref(),
            input: &inner.input,
            identities: &inner.identities,
            endpoints: inner.endpoints.values().collect(),
            compiled: &inner.compiled,
            generation: inner.writer.generation(),
            map_usage: inner.writer.usage(),
            counters: inner.writer.counters(),
        };
        f(&view)
    }

    /// What `/metrics` reads from the datapath: map usage (conntrack included), the kernel's
    /// counters, and endpoints by state.
    pub fn datapath_snapshot(&self) -> crate::health::DatapathSnapshot {
        let conntrack = self.count_conntrack();
        let inner = self.lock();
        let mut maps = inner.writer.usage();
        if let Some(n) = conntrack {
            maps.push((
                weir_common::MAP_CONNTRACK,
                n,
                u64::from(weir_common::MAX_CONNTRACK),
            ));
        }
        let enforced = inner
            .endpoints
            .values()
            .filter(|e| {
                e.addresses
                    .iter()
                    .all(|a| inner.compiled.local_addresses.contains_key(a))
            })
            .count() as u64;
        crate::health::DatapathSnapshot {
            maps,
            conntrack_entries: conntrack,
            counters: inner.writer.counters(),
            endpoints_enforced: enforced,
            endpoints_unplaced: inner.endpoints.len() as u64 - enforced,
        }
    }

    /// Connections in the pinned conntrack table. Walking it costs one syscall per entry, so it
    /// goes through the map's pin, outside the runtime lock: a scrape never holds up CNI ADDs.
    fn count_conntrack(&self) -> Option<u64> {
        let pin = self
            .config
            .bpffs_dir
            .join("maps")
            .join(weir_common::MAP_CONNTRACK);
        let map = aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(pin).ok()?);
        let ct = aya::maps::HashMap::<_, weir_common::CtKey, weir_common::CtValue>::try_from(&map)
            .ok()?;
        Some(ct.keys().filter(Result::is_ok).count() as u64)
    }

    /// The flow log (`flows.jsonl`) and its live subscribers.
    pub fn flow_log(&self) -> &FlowLog {
        &self.flow_log
    }

    /// Handles one verdict event from the kernel.
    pub fn record_event(&self, event: &VerdictEvent) {
        let record = self
            .explainer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .explain(event);
        crate::metrics::metrics().record_verdict(
            &record.verdict,
            &record.reason,
            &record.direction,
        );
        if record.verdict == "drop" {
            tracing::info!(target: "weir::flows", "{}", record.describe());
        } else {
            tracing::debug!(target: "weir::flows", "{}", record.describe());
        }
        self.flow_log.append(&record);
    }
}

/// What the runtime holds, borrowed for [`Runtime::view`].
pub struct RuntimeView<'a> {
    pub node_name: &'a str,
    pub cluster_read: bool,
    /// Why the last compile or apply failed, if it did.
    pub degraded: Option<&'a str>,
    /// The compiler's input: cluster state and local endpoints' addresses.
    pub input: &'a CompileInput,
    pub identities: &'a IdentityAllocator,
    pub endpoints: Vec<&'a LocalEndpoint>,
    /// What is enforced.
    pub compiled: &'a Compiled,
    pub generation: u32,
    /// `(map name, entries, capacity)`.
    pub map_usage: Vec<(&'static str, u64, u64)>,
    /// `WEIR_COUNTERS` summed over CPUs.
    pub counters: Vec<u64>,
}

fn log_new_rejections(old: &[Rejection], new: &[Rejection]) {
    for r in new.iter().filter(|r| !old.contains(r)) {
        tracing::error!(policy = %r.policy, field = %r.field, "rejected NetworkPolicy: {}; it allows nothing, the pods it selects stay isolated in its directions, every other policy is still enforced", r.reason);
    }
}

fn log_apply(stats: &ApplyStats, compile: Duration, total: Duration) {
    if stats.writes + stats.deletes > 0 {
        tracing::info!(
            writes = stats.writes,
            deletes = stats.deletes,
            subjects_changed = stats.subjects_changed,
            generation = stats.generation,
            compile_ms = compile.as_secs_f64() * 1e3,
            total_ms = total.as_secs_f64() * 1e3,
            "datapath updated"
        );
    }
}

#[tonic::async_trait]
impl EndpointBackend for Runtime {
    fn readiness(&self) -> Result<(), String> {
        let inner = self.lock();
        if !inner.cluster_read {
            return Err("the cluster state has not been read yet".to_owned());
        }
        Ok(())
    }

    async fn wait_for_pod(&self, pod: &ObjectKey, timeout: Duration) -> Result<(), EndpointError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.cluster_changed.notified();
            if self.lock().input.state.pods.contains_key(pod) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(EndpointError::PodUnknown {
                    pod: pod.clone(),
                    waited: timeout,
                });
            }
        }
    }

    async fn activate(&self, endpoint: LocalEndpoint) -> Result<(), EndpointError> {
        let datapath_err = |reason: String| EndpointError::Datapath {
            pod: endpoint.pod.clone(),
            host_ifname: endpoint.host_ifname.clone(),
            reason,
        };
        if !self.lock().cluster_read {
            return Err(EndpointError::NotReady(
                "the cluster state has not been read yet".to_owned(),
            ));
        }
        // Outside the lock: concurrent ADDs attach in parallel.
        attach_endpoint(&self.programs, &endpoint.host_ifname)
            .map_err(|e| datapath_err(e.to_string()))?;
        {
            let mut inner = self.lock();
            inner.endpoints.insert(
                (endpoint.container_id.clone(), endpoint.ifname.clone()),
                endpoint.clone(),
            );
            self.reconcile(&mut inner);
            if let Some(reason) = inner.degraded.clone() {
                return Err(datapath_err(reason));
            }
            let enforced = endpoint
                .addresses
                .iter()
                .all(|a| inner.compiled.local_addresses.contains_key(a));
            if !enforced {
                return Err(datapath_err(
                    "the compiler did not place the pod's addresses (is the Pod object's spec.nodeName this node?)".to_owned(),
                ));
            }
            Self::save_endpoints(&mut inner).map_err(|e| datapath_err(e.to_string()))?;
        }
        tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, addresses = ?endpoint.addresses, "endpoint enforced");
        Ok(())
    }

    async fn deactivate(&self, container_id: &str, ifname: &str) -> Result<(), EndpointError> {
        // Out of the maps: its packets now drop as unknown. The programs stay on the veth until
        // the veth goes (DEL deletes it), so it never carries traffic unchecked.
        let endpoint = {
            let mut inner = self.lock();
            let Some(endpoint) = inner
                .endpoints
                .remove(&(container_id.to_owned(), ifname.to_owned()))
            else {
                return Ok(());
            };
            self.reconcile(&mut inner);
            Self::save_endpoints(&mut inner).map_err(|e| EndpointError::NotReady(e.to_string()))?;
            endpoint
        };
        tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, "endpoint removed");
        Ok(())
    }

    fn is_enforced(&self, container_id: &str, ifname: &str) -> bool {
        let host_ifname = {
            let inner = self.lock();
            let Some(endpoint) = inner
                .endpoints
                .get(&(container_id.to_owned(), ifname.to_owned()))
            else {
                return false;
            };
            if !endpoint
                .addresses
                .iter()
                .all(|a| inner.compiled.local_addresses.contains_key(a))
            {
                return false;
            }
            endpoint.host_ifname.clone()
        };
        // Asking the kernel needs no lock.
        is_attached(&self.programs, &host_ifname)
    }
}
