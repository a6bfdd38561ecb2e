//! The agent's runtime: the handle through which everything reaches the cluster state, the local
//! endpoints, the loaded programs and the datapath writer. They are owned by the reconcile task
//! ([`crate::reconcile`]), which keeps the maps equal to what the compiler says they should hold;
//! this handle sends it commands and reads what it publishes.
//!
//! A cluster state equal to the one in force changes nothing and compiles nothing. Start-up
//! adopts what is pinned and changes nothing until the first cluster state has been read, so a
//! restarted agent never garbage-collects enforcement it has not yet reconciled.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::Ebpf;
use tokio::sync::{mpsc, oneshot, watch};
use weir_common::VerdictEvent;
use weir_policy::{
    compile::CompileInput,
    identity::IdentityAllocator,
    model::{ClusterState, ObjectKey, StateDelta},
    output::{Compiled, Rejection},
};

use crate::{
    datapath::{
        attach::{Programs, attach_endpoint, is_attached, retire_legacy_tcx_links},
        conntrack_upgrade, loader,
        maps::DatapathMaps,
        writer::Writer,
    },
    endpoints::{EndpointBackend, EndpointError, LocalEndpoint},
    flows::{Explainer, FlowLog},
    persist::{self, SnapshotLog},
    reconcile::{Command, Reconciler, Shared, identities_file},
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
    #[error("starting the reconcile thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Which cluster state is enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Counts the cluster states accepted from the source (each differs from the one before);
    /// 0 before the first.
    pub generation: u64,
    /// The source's fingerprint of that state (standalone: of the manifests directory's files,
    /// see [`crate::source::manifests::fingerprint`]); empty where the source gives none.
    pub fingerprint: String,
}

/// What the reconcile task publishes after every round, for readers that must not wait for it
/// (health probes, `/metrics`, CNI STATUS).
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub cluster_read: bool,
    /// Why the last compile or apply failed, if it did.
    pub degraded: Option<String>,
    pub endpoints: u64,
    /// Endpoints whose addresses the compiler placed (the rest: their Pod is not on this node).
    pub endpoints_enforced: u64,
    /// `(map name, entries, capacity)`.
    pub map_usage: Vec<(&'static str, u64, u64)>,
    /// NetworkPolicies rejected (in whole or in part) in the state in force.
    pub rejected_policies: u64,
}

/// The runtime's handle: commands to the reconcile task, and what it publishes.
pub struct Runtime {
    config: RuntimeConfig,
    /// The loaded programs' fds: ADDs attach them in parallel, outside the reconcile task.
    programs: Arc<Programs>,
    commands: mpsc::UnboundedSender<Command>,
    published: watch::Receiver<Arc<Published>>,
    shared: Arc<Shared>,
    flow_log: FlowLog,
}

/// The reconcile task is gone (it panicked): nothing can change enforcement any more.
#[derive(Debug, thiserror::Error)]
#[error("the agent's reconcile task stopped; restart the agent")]
pub struct Stopped;

impl Runtime {
    /// The registered endpoints, saved on every ADD and DEL (a `SnapshotLog`).
    fn endpoints_file(config: &RuntimeConfig) -> PathBuf {
        config.state_dir.join("endpoints.jsonl")
    }

    /// Where versions before the snapshot log kept them (moved into the log at start-up).
    fn legacy_endpoints_file(config: &RuntimeConfig) -> PathBuf {
        config.state_dir.join("endpoints.json")
    }

    /// Where earlier Weir versions pinned the TCX links of pods' veths (retired at start-up).
    fn legacy_links_dir(&self) -> PathBuf {
        self.config.bpffs_dir.join("links")
    }

    /// Adopts the pinned maps, restores the endpoints a previous agent registered, swaps the
    /// loaded programs into their pinned links and starts the reconcile task. Writes no map
    /// until the first cluster state. The rejected policies of every compiled state are sent
    /// on `rejections`.
    pub fn start(
        config: RuntimeConfig,
        mut ebpf: Ebpf,
        rejections: watch::Sender<Arc<[Rejection]>>,
    ) -> Result<Arc<Self>, RuntimeError> {
        let maps = DatapathMaps::take(&mut ebpf)?;
        let programs = Programs::from_ebpf(&ebpf)?;
        let writer = Writer::adopt(maps)?;
        let identities: IdentityAllocator =
            persist::read_json(&identities_file(&config))?.unwrap_or_default();
        let (endpoints_log, saved) = SnapshotLog::open::<Vec<LocalEndpoint>>(
            &Self::endpoints_file(&config),
            &Self::legacy_endpoints_file(&config),
        )?;
        let mut endpoints = BTreeMap::new();
        for endpoint in saved.unwrap_or_default() {
            if nix::net::if_::if_nametoindex(endpoint.host_ifname.as_str()).is_err() {
                tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname,
                    "endpoint's veth is gone (deleted while the agent was down); forgetting it");
                continue;
            }
            match attach_endpoint(&programs, &endpoint.host_ifname) {
                Ok(()) => {
                    tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, "adopted endpoint")
                }
                Err(e) => {
                    tracing::error!(pod = %endpoint.pod, error = %e, "could not re-attach to an adopted endpoint; its old programs stay attached")
                }
            }
            endpoints.insert(
                (endpoint.container_id.clone(), endpoint.ifname.clone()),
                endpoint,
            );
        }
        // The earlier programs are detached now: what they added to an earlier conntrack
        // table since the load moves over, and the table goes.
        if let Err(e) = conntrack_upgrade::finish(&loader::pin_dir(&config.bpffs_dir)) {
            tracing::error!(error = %e, "could not retire the earlier conntrack table; the next start tries again");
        }
        let shared = Arc::new(Shared {
            explainer: RwLock::new(Explainer::default()),
            compiles: AtomicU64::new(0),
        });
        let (published_tx, published) = watch::channel(Arc::new(Published::default()));
        let mut reconciler = Reconciler {
            _ebpf: ebpf,
            writer,
            input: CompileInput {
                state: ClusterState::default(),
                node_name: config.node_name.clone(),
                cluster_id: u32::from(config.cluster_id),
                local_endpoints: BTreeMap::new(),
            },
            imports: Default::default(),
            cluster_read: false,
            endpoints,
            endpoints_log,
            saved_identities: identities.clone(),
            identities,
            compiled: Compiled::default(),
            degraded: None,
            accepted: Applied::default(),
            applied: Applied::default(),
            pod_waiters: Vec::new(),
            shared: shared.clone(),
            published: published_tx,
            rejections,
            config: config.clone(),
            incremental: None,
            changed: Default::default(),
        };
        reconciler.save_endpoints()?;
        reconciler.publish();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("weir-reconcile".to_owned())
            .spawn(move || reconciler.run(commands_rx))
            .map_err(RuntimeError::Thread)?;
        let runtime = Arc::new(Self {
            flow_log: FlowLog::new(&config.state_dir),
            programs: Arc::new(programs),
            commands,
            published,
            shared,
            config,
        });
        retire_legacy_tcx_links(&runtime.programs, &runtime.legacy_links_dir());
        Ok(runtime)
    }

    /// Sends a command and waits for its reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// What the reconcile task published last.
    pub fn published(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// Whether the last apply failed ("degraded") and why.
    pub fn degraded(&self) -> Option<String> {
        self.published().degraded.clone()
    }

    /// Policy compiles since start.
    pub fn compiles(&self) -> u64 {
        self.shared.compiles.load(Ordering::Relaxed)
    }

    /// A change of the source's cluster state (the first one: every object, as a delta from an
    /// empty state), with the source's fingerprint of the whole state, and the mesh imports'
    /// objects when they changed ([`crate::mesh::Mesh::imported`]). Returns once it is enforced
    /// (or known to change nothing: an empty delta, from a relist or a rewritten file with the
    /// same objects, compiles nothing), with what is applied.
    pub async fn update_cluster_state(
        &self,
        delta: StateDelta,
        imports: Option<ClusterState>,
        fingerprint: String,
    ) -> Result<Applied, Stopped> {
        self.ask(|done| Command::ClusterState {
            delta,
            imports,
            fingerprint,
            done,
        })
        .await
    }

    /// A read-only look at what the runtime holds, for the Inspect API. `f` runs on the
    /// reconcile task between two rounds: copy what is needed and return.
    pub async fn view<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RuntimeView<'_>) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        self.ask(|reply| {
            Command::View(Box::new(move |view: &RuntimeView<'_>| {
                let _ = reply.send(f(view));
            }))
        })
        .await
    }

    /// What `/metrics` reads from the datapath: map usage (conntrack included), the kernel's
    /// counters, and endpoints by state. The kernel's maps are read through their pins, so a
    /// scrape never waits for a compile nor holds one up.
    pub fn datapath_snapshot(&self) -> crate::health::DatapathSnapshot {
        let conntrack = self.count_conntrack();
        let published = self.published();
        let mut maps = published.map_usage.clone();
        if let Some(n) = conntrack {
            maps.push((
                weir_common::MAP_CONNTRACK,
                n,
                u64::from(weir_common::MAX_CONNTRACK),
            ));
        }
        crate::health::DatapathSnapshot {
            maps,
            conntrack_entries: conntrack,
            counters: self.read_counters(),
            endpoints_enforced: published.endpoints_enforced,
            endpoints_unplaced: published.endpoints - published.endpoints_enforced,
        }
    }

    fn map_pin(&self, name: &str) -> PathBuf {
        loader::pin_dir(&self.config.bpffs_dir).join(name)
    }

    /// Connections in the pinned conntrack table (one syscall per entry).
    fn count_conntrack(&self) -> Option<u64> {
        let pin = self.map_pin(weir_common::MAP_CONNTRACK);
        let map = aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(pin).ok()?);
        let ct = aya::maps::HashMap::<_, weir_common::CtKey, weir_common::CtValue>::try_from(&map)
            .ok()?;
        Some(ct.keys().filter(Result::is_ok).count() as u64)
    }

    /// The kernel's counters (`WEIR_COUNTERS`) summed over CPUs; empty when the pin cannot be
    /// read.
    fn read_counters(&self) -> Vec<u64> {
        let pin = self.map_pin(weir_common::MAP_COUNTERS);
        let Ok(data) = aya::maps::MapData::from_pin(pin) else {
            return Vec::new();
        };
        let map = aya::maps::Map::PerCpuArray(data);
        let Ok(counters) = aya::maps::PerCpuArray::<_, u64>::try_from(&map) else {
            return Vec::new();
        };
        (0..weir_common::REASON_COUNT)
            .map(|slot| {
                counters
                    .get(&slot, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The flow log (`flows.jsonl`) and its live subscribers.
    pub fn flow_log(&self) -> &FlowLog {
        &self.flow_log
    }

    /// Handles one verdict event from the kernel.
    pub fn record_event(&self, event: &VerdictEvent) {
        let record = self
            .shared
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
    /// The config generation last written to the datapath (bumped by every write).
    pub generation: u32,
    /// The cluster state last written.
    pub applied: &'a Applied,
    /// `(map name, entries, capacity)`.
    pub map_usage: Vec<(&'static str, u64, u64)>,
    /// `WEIR_COUNTERS` summed over CPUs.
    pub counters: Vec<u64>,
}

#[tonic::async_trait]
impl EndpointBackend for Runtime {
    fn readiness(&self) -> Result<(), String> {
        if !self.published.borrow().cluster_read {
            return Err("the cluster state has not been read yet".to_owned());
        }
        Ok(())
    }

    async fn wait_for_pod(&self, pod: &ObjectKey, timeout: Duration) -> Result<(), EndpointError> {
        let unknown = || EndpointError::PodUnknown {
            pod: pod.clone(),
            waited: timeout,
        };
        let found = self.ask(|found| Command::WaitForPod {
            pod: pod.clone(),
            found,
        });
        match tokio::time::timeout(timeout, found).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Stopped)) => Err(EndpointError::NotReady(Stopped.to_string())),
            Err(_) => Err(unknown()),
        }
    }

    async fn activate(&self, endpoint: LocalEndpoint) -> Result<(), EndpointError> {
        self.readiness().map_err(EndpointError::NotReady)?;
        // Outside the reconcile task, on the blocking pool (netlink and bpf syscalls):
        // concurrent ADDs attach in parallel.
        let programs = self.programs.clone();
        let host_ifname = endpoint.host_ifname.clone();
        let attached =
            tokio::task::spawn_blocking(move || attach_endpoint(&programs, &host_ifname))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        attached.map_err(|reason| EndpointError::Datapath {
            pod: endpoint.pod.clone(),
            host_ifname: endpoint.host_ifname.clone(),
            reason,
        })?;
        self.ask(|done| Command::Activate { endpoint, done })
            .await
            .map_err(|e| EndpointError::NotReady(e.to_string()))?
    }

    async fn deactivate(&self, container_id: &str, ifname: &str) -> Result<(), EndpointError> {
        // Out of the maps: its packets now drop as unknown. The programs stay on the veth until
        // the veth goes (DEL deletes it), so it never carries traffic unchecked.
        let id = (container_id.to_owned(), ifname.to_owned());
        self.ask(|done| Command::Deactivate { id, done })
            .await
            .map_err(|e| EndpointError::NotReady(e.to_string()))?
    }

    async fn is_enforced(&self, container_id: &str, ifname: &str) -> bool {
        let id = (container_id.to_owned(), ifname.to_owned());
        let Ok(Some(host_ifname)) = self.ask(|reply| Command::Enforced { id, reply }).await else {
            return false;
        };
        // Asking the kernel needs no round trip.
        is_attached(&self.programs, &host_ifname)
    }
}
