//! The reconcile task: the one owner of the runtime's state (cluster state, local endpoints,
//! identities, the datapath writer). Everyone else — the cluster source, the mesh imports, the
//! CNI API, the Inspect API — sends it [`Command`]s and, where they wait, gets a oneshot reply.
//!
//! It runs on a thread of its own (compiling and writing maps is blocking work that must not
//! hold up the async workers serving the API) and merges bursts: every command that arrived
//! while the last compile ran is applied together, with one compile and one datapath write, and
//! each caller is answered only after that write. 16 concurrent CNI ADDs cost about two compiles
//! (the first ADD's, and one for the fifteen that queued meanwhile), not sixteen.
//!
//! The work of an event follows what it changes ([`weir_policy::incremental`]): a state that
//! differs from the one in force only in policies recomputes those policies and the subjects
//! they select, and writes those subjects; one that differs only in pods of other nodes whose
//! label sets other pods already carry (a Deployment scaling elsewhere) changes only ipcache
//! entries, and only those are computed and written. Everything else compiles the whole state.
//!
//! What it keeps from the runtime it replaced:
//! - fail closed: a compile or write failure leaves the previous enforcement in place, marks the
//!   runtime degraded and fails the ADDs of that round;
//! - nothing is written before the first cluster state (start-up adopts what is pinned);
//! - an ADD is answered only once its pod's maps are written; the endpoints file is saved after
//!   every change, in order, before anyone is answered.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc, RwLock, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::Ebpf;
use tokio::sync::{mpsc, oneshot, watch};
use weir_common::{
    CONFIG_EMIT_ALLOW_EVENTS, CONFIG_REDIRECT_LOCAL, CONFIG_REDIRECT_REMOTE,
    CONFIG_REVOKE_ESTABLISHED, EndpointInfo,
};
use weir_policy::{
    compile::CompileInput,
    identity::IdentityAllocator,
    incremental::Incremental,
    model::{ClusterState, ObjectKey, ObjectRef, StateDelta},
    output::{Compiled, Rejection},
};

use crate::{
    datapath::{
        desired::{desired_maps, desired_subjects},
        writer::{ApplyStats, DesiredMaps, WriteError, Writer},
    },
    endpoints::{EndpointError, LocalEndpoint},
    flows::Explainer,
    merged_state::ImportLayer,
    persist::{self, SnapshotLog},
    runtime::{Applied, Published, RuntimeConfig, RuntimeView},
};

/// Endpoints by (container id, interface name).
pub(crate) type EndpointId = (String, String);

/// A reply the caller waits for.
type Reply<T> = oneshot::Sender<T>;

/// What the reconcile task is asked to do.
pub(crate) enum Command {
    /// What changed in the source's cluster state, and the mesh imports' objects when they
    /// changed, with the source's fingerprint of the whole state. Answered with the applied
    /// generation once it is written (or once it is known to change nothing).
    ClusterState {
        delta: StateDelta,
        imports: Option<ClusterState>,
        fingerprint: String,
        done: Reply<Applied>,
    },
    /// Put the endpoint's enforcement in the maps (its veth already has the programs).
    Activate {
        endpoint: LocalEndpoint,
        done: Reply<Result<(), EndpointError>>,
    },
    /// Take the endpoint out of the maps (idempotent).
    Deactivate {
        id: EndpointId,
        done: Reply<Result<(), EndpointError>>,
    },
    /// Answered when the cluster state has the Pod (at once if it has it now). A caller that
    /// stops waiting drops the receiver; the task forgets it at the next state.
    WaitForPod { pod: ObjectKey, found: Reply<()> },
    /// The host veth of an endpoint whose addresses are in the maps, if it is one.
    Enforced {
        id: EndpointId,
        reply: Reply<Option<String>>,
    },
    /// Runs a read-only look at the state (the Inspect API copies what it needs).
    View(Box<dyn FnOnce(&RuntimeView<'_>) + Send>),
}

/// What the task shares with the runtime's handle without a round trip.
pub(crate) struct Shared {
    /// Explains verdict events; replaced after every compile.
    pub explainer: RwLock<Explainer>,
    /// Compiles since start.
    pub compiles: AtomicU64,
}

/// The state the task owns.
pub(crate) struct Reconciler {
    pub config: RuntimeConfig,
    /// Holds the loaded object (programs and the maps not taken by the writer).
    pub _ebpf: Ebpf,
    pub writer: Writer,
    /// The compiler's input: the cluster state (once read: the source's, with the mesh imports
    /// merged by `imports`) and the local endpoints' addresses.
    pub input: CompileInput,
    /// The mesh imports' objects and what they hide of the source's, for merging changes into
    /// `input.state`.
    pub imports: ImportLayer,
    /// Whether the source has delivered a cluster state yet.
    pub cluster_read: bool,
    pub endpoints: BTreeMap<EndpointId, LocalEndpoint>,
    /// Where `endpoints` is saved after every change.
    pub endpoints_log: SnapshotLog,
    pub identities: IdentityAllocator,
    /// What identities.json holds, so it is written only when identities change.
    pub saved_identities: IdentityAllocator,
    pub compiled: Compiled,
    /// Set when the last compile or apply failed: enforcement may lag the cluster.
    pub degraded: Option<String>,
    /// The cluster state in force (accepted) and the last one written to the datapath.
    pub accepted: Applied,
    pub applied: Applied,
    /// ADDs waiting for their Pod object.
    pub pod_waiters: Vec<(ObjectKey, Reply<()>)>,
    pub shared: Arc<Shared>,
    pub published: watch::Sender<Arc<Published>>,
    /// The rejected policies of the state in force, for whoever reports them (Kubernetes
    /// Events): validation runs once, in the compiler.
    pub rejections: watch::Sender<Arc<[Rejection]>>,
    /// The indexes of `compiled` for address-only pod events (`None`: none yet, or the last
    /// write failed; the next change compiles in full).
    pub incremental: Option<Incremental>,
    /// What the state accepted in this round changed, for [`Reconciler::reconcile`].
    pub changed: StateChange,
}

/// How the accepted cluster state differs from the one compiled before it.
#[derive(Debug, Default)]
pub(crate) enum StateChange {
    /// Nothing, or nothing since the last compile.
    #[default]
    None,
    /// Only these pods (added, modified or removed).
    Pods(Vec<ObjectKey>),
    /// Only these NetworkPolicies.
    Policies(Vec<ObjectKey>),
    /// Anything else (the first state, namespaces, nodes, several kinds at once).
    Everything,
}

impl StateChange {
    /// The change made by changing these objects.
    fn of(changed: &[ObjectRef]) -> Self {
        let mut pods = Vec::new();
        let mut policies = Vec::new();
        for what in changed {
            // Every kind named, so that a new kind of object cannot be missed here.
            match what {
                ObjectRef::Pod(key) => pods.push(key.clone()),
                ObjectRef::NetworkPolicy(key) => policies.push(key.clone()),
                ObjectRef::Namespace(_) | ObjectRef::Node(_) | ObjectRef::MeshPeer(_) => {
                    return Self::Everything;
                }
            }
        }
        pods.sort_unstable();
        pods.dedup();
        policies.sort_unstable();
        policies.dedup();
        match (pods.is_empty(), policies.is_empty()) {
            (true, true) => Self::None,
            (false, true) => Self::Pods(pods),
            (true, false) => Self::Policies(policies),
            (false, false) => Self::Everything,
        }
    }

    /// Two changes in a row, as one.
    fn then(self, next: Self) -> Self {
        match (self, next) {
            (Self::None, next) => next,
            (this, Self::None) => this,
            (Self::Pods(a), Self::Pods(b)) => Self::Pods(merged(a, b)),
            (Self::Policies(a), Self::Policies(b)) => Self::Policies(merged(a, b)),
            _ => Self::Everything,
        }
    }
}

fn merged(mut a: Vec<ObjectKey>, b: Vec<ObjectKey>) -> Vec<ObjectKey> {
    a.extend(b);
    a.sort_unstable();
    a.dedup();
    a
}

/// The commands taken together in one round.
#[derive(Default)]
struct Round {
    /// The source's changes (in order, as one), the newest imports and the newest fingerprint.
    state: Option<(StateDelta, Option<ClusterState>, String)>,
    state_done: Vec<Reply<Applied>>,
    activations: Vec<(LocalEndpoint, Reply<Result<(), EndpointError>>)>,
    deactivations: Vec<(EndpointId, Reply<Result<(), EndpointError>>)>,
    /// Answered after the round's write, from what it left.
    queries: Vec<Command>,
    /// Endpoints the round changes: a second change of one of them waits for the next round,
    /// so an ADD and a DEL of the same attachment keep their order.
    touched: BTreeSet<EndpointId>,
}

impl Round {
    /// Takes `command` into the round, or gives it back when it must wait for the next one.
    fn take(&mut self, command: Command) -> Option<Command> {
        match command {
            Command::ClusterState {
                delta,
                imports,
                fingerprint,
                done,
            } => {
                // Changes not yet applied add up; newer imports replace older ones.
                self.state = Some(match self.state.take() {
                    Some((mut pending, pending_imports, _)) => {
                        pending.then(delta);
                        (pending, imports.or(pending_imports), fingerprint)
                    }
                    None => (delta, imports, fingerprint),
                });
                self.state_done.push(done);
            }
            Command::Activate { endpoint, done } => {
                let id = (endpoint.container_id.clone(), endpoint.ifname.clone());
                if !self.touched.insert(id) {
                    return Some(Command::Activate { endpoint, done });
                }
                self.activations.push((endpoint, done));
            }
            Command::Deactivate { id, done } => {
                if !self.touched.insert(id.clone()) {
                    return Some(Command::Deactivate { id, done });
                }
                self.deactivations.push((id, done));
            }
            query => self.queries.push(query),
        }
        None
    }
}

impl Reconciler {
    /// Serves commands until every sender is gone.
    pub fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut held: Option<Command> = None;
        loop {
            let first = match held.take() {
                Some(command) => command,
                None => match commands.blocking_recv() {
                    Some(command) => command,
                    None => return,
                },
            };
            let mut round = Round::default();
            held = round.take(first);
            while held.is_none() {
                match commands.try_recv() {
                    Ok(command) => held = round.take(command),
                    Err(_) => break,
                }
            }
            self.run_round(round);
        }
    }

    fn run_round(&mut self, round: Round) {
        let Round {
            state,
            state_done,
            activations,
            deactivations,
            queries,
            touched: _,
        } = round;
        let state_changed = state
            .is_some_and(|(delta, imports, fingerprint)| self.accept(delta, imports, fingerprint));

        let mut endpoints_changed = false;
        // The pods whose endpoints this round wires or unwires.
        let mut wired = Vec::new();
        let mut activated = Vec::new();
        for (endpoint, done) in activations {
            if !self.cluster_read {
                let _ = done.send(Err(EndpointError::NotReady(
                    "the cluster state has not been read yet".to_owned(),
                )));
                continue;
            }
            self.endpoints.insert(
                (endpoint.container_id.clone(), endpoint.ifname.clone()),
                endpoint.clone(),
            );
            endpoints_changed = true;
            wired.push(endpoint.pod.clone());
            activated.push((endpoint, done));
        }
        let mut deactivated = Vec::new();
        for (id, done) in deactivations {
            match self.endpoints.remove(&id) {
                Some(endpoint) => {
                    endpoints_changed = true;
                    wired.push(endpoint.pod.clone());
                    deactivated.push((Some(endpoint), done));
                }
                None => deactivated.push((None, done)),
            }
        }

        if state_changed || endpoints_changed {
            wired.sort_unstable();
            wired.dedup();
            self.reconcile(&wired);
        }
        let saved = if endpoints_changed {
            self.save_endpoints().map_err(|e| e.to_string())
        } else {
            Ok(())
        };

        for (endpoint, done) in activated {
            let _ = done.send(self.activation_result(&endpoint, &saved));
        }
        for (endpoint, done) in deactivated {
            let result = match (&endpoint, &saved) {
                (Some(_), Err(e)) => Err(EndpointError::NotReady(e.clone())),
                _ => Ok(()),
            };
            if let (Some(endpoint), Ok(())) = (&endpoint, &result) {
                tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, "endpoint removed");
            }
            let _ = done.send(result);
        }
        for done in state_done {
            let _ = done.send(self.applied.clone());
        }
        if state_changed {
            self.wake_pod_waiters();
        }
        for query in queries {
            self.answer(query);
        }
        self.publish();
    }

    /// Takes a change of the source's cluster state (and of the imports); returns whether the
    /// state in force changed (a relist, or a rewritten file with the same objects, compiles
    /// nothing).
    fn accept(
        &mut self,
        delta: StateDelta,
        imports: Option<ClusterState>,
        fingerprint: String,
    ) -> bool {
        let first = !self.cluster_read;
        let mut changed = self.imports.apply_source(&mut self.input.state, delta);
        if let Some(imports) = imports {
            changed.extend(self.imports.set_imports(&mut self.input.state, imports));
        }
        let change = if first {
            StateChange::Everything
        } else {
            StateChange::of(&changed)
        };
        if matches!(change, StateChange::None) {
            tracing::debug!("cluster state unchanged; nothing to compile");
            if self.accepted.fingerprint != fingerprint {
                // The same objects from other bytes (a comment, a reordered file): what is in
                // force is also what the source now describes.
                let in_force = self.applied == self.accepted;
                self.accepted.fingerprint = fingerprint;
                if in_force {
                    self.applied = self.accepted.clone();
                    self.log_applied();
                }
            }
            return false;
        }
        self.changed = std::mem::take(&mut self.changed).then(change);
        self.cluster_read = true;
        self.accepted = Applied {
            generation: self.accepted.generation + 1,
            fingerprint,
        };
        if first {
            tracing::info!(node = %self.config.node_name, "cluster state read; ready");
        }
        true
    }

    fn log_applied(&self) {
        tracing::info!(
            fingerprint = %self.applied.fingerprint,
            "applied generation {}",
            self.applied.generation
        );
    }

    fn activation_result(
        &self,
        endpoint: &LocalEndpoint,
        saved: &Result<(), String>,
    ) -> Result<(), EndpointError> {
        let datapath_err = |reason: String| EndpointError::Datapath {
            pod: endpoint.pod.clone(),
            host_ifname: endpoint.host_ifname.clone(),
            reason,
        };
        if let Some(reason) = &self.degraded {
            return Err(datapath_err(reason.clone()));
        }
        if !self.placed(endpoint) {
            return Err(datapath_err(
                "the compiler did not place the pod's addresses (is the Pod object's spec.nodeName this node?)".to_owned(),
            ));
        }
        saved.clone().map_err(datapath_err)?;
        tracing::info!(pod = %endpoint.pod, veth = %endpoint.host_ifname, addresses = ?endpoint.addresses, "endpoint enforced");
        Ok(())
    }

    /// Whether every address of the endpoint is in the maps as a local pod's.
    fn placed(&self, endpoint: &LocalEndpoint) -> bool {
        endpoint
            .addresses
            .iter()
            .all(|a| self.compiled.local_addresses.contains_key(a))
    }

    fn wake_pod_waiters(&mut self) {
        let pods = &self.input.state.pods;
        let waiters = std::mem::take(&mut self.pod_waiters);
        for (pod, found) in waiters {
            if pods.contains_key(&pod) {
                let _ = found.send(());
            } else if !found.is_closed() {
                self.pod_waiters.push((pod, found));
            }
        }
    }

    fn answer(&mut self, query: Command) {
        match query {
            Command::WaitForPod { pod, found } => {
                if self.input.state.pods.contains_key(&pod) {
                    let _ = found.send(());
                } else {
                    self.pod_waiters.push((pod, found));
                }
            }
            Command::Enforced { id, reply } => {
                let host = self
                    .endpoints
                    .get(&id)
                    .filter(|e| self.placed(e))
                    .map(|e| e.host_ifname.clone());
                let _ = reply.send(host);
            }
            Command::View(look) => {
                let view = RuntimeView {
                    node_name: &self.config.node_name,
                    cluster_read: self.cluster_read,
                    degraded: self.degraded.as_deref(),
                    input: &self.input,
                    identities: &self.identities,
                    endpoints: self.endpoints.values().collect(),
                    compiled: &self.compiled,
                    generation: self.writer.generation(),
                    applied: &self.applied,
                    map_usage: self.writer.usage(),
                    counters: self.writer.counters(),
                };
                look(&view);
            }
            Command::ClusterState { .. }
            | Command::Activate { .. }
            | Command::Deactivate { .. } => {
                unreachable!("changes are taken into the round, not answered as queries")
            }
        }
    }

    /// What readers that must not wait see: health probes, `/metrics`, CNI STATUS.
    pub fn publish(&self) {
        let enforced = self.endpoints.values().filter(|e| self.placed(e)).count() as u64;
        let rejected: BTreeSet<&ObjectKey> =
            self.compiled.rejections.iter().map(|r| &r.policy).collect();
        let published = Published {
            cluster_read: self.cluster_read,
            degraded: self.degraded.clone(),
            endpoints: self.endpoints.len() as u64,
            endpoints_enforced: enforced,
            map_usage: self.writer.usage(),
            rejected_policies: rejected.len() as u64,
        };
        self.published.send_replace(Arc::new(published));
    }

    /// Compile and write (`wired`: the pods whose local endpoints changed). Failures leave the
    /// previous enforcement in place and are reported.
    fn reconcile(&mut self, wired: &[ObjectKey]) {
        if !self.cluster_read {
            return;
        }
        let started = Instant::now();
        let change = std::mem::take(&mut self.changed);
        if self.degraded.is_none() {
            // One kind of change at a time is compiled in place.
            let done = match (&change, wired.is_empty()) {
                (StateChange::Pods(pods), true) => self.update_addresses(pods, started),
                (StateChange::Policies(policies), true) => self.update_policies(policies, started),
                (StateChange::None, false) => self.update_endpoints(wired, started),
                _ => false,
            };
            if done {
                return;
            }
        }
        let mut local: BTreeMap<ObjectKey, Vec<IpAddr>> = BTreeMap::new();
        for e in self.endpoints.values() {
            local
                .entry(e.pod.clone())
                .or_default()
                .extend(e.addresses.iter().copied());
        }
        self.input.local_endpoints = local;
        self.shared.compiles.fetch_add(1, Ordering::Relaxed);
        let compiled = match Incremental::compile(&self.input, &mut self.identities) {
            Ok((compiled, incremental)) => {
                self.incremental = Some(incremental);
                compiled
            }
            Err(e) => {
                tracing::error!(error = %e, "compiling policy failed; previous enforcement stays in place");
                self.degraded = Some(e.to_string());
                self.incremental = None;
                return;
            }
        };
        let compile_time = started.elapsed();
        crate::metrics::metrics()
            .compile_seconds
            .observe(compile_time.as_secs_f64());
        let desired = self.desired_maps(&compiled);
        let next = self
            .shared
            .explainer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .rebuilt(&compiled);
        let explainer_before = self.explain_with(next);
        let written = self.writer.apply(&desired);
        if self.written(written, compile_time, started) {
            self.explainer()
                .versions_written(None, |subject| self.writer.subject_version(subject));
        } else {
            self.explain_with(explainer_before);
        }
        let previous = std::mem::replace(&mut self.compiled, compiled);
        self.compiled_changed(&previous.rejections);
    }

    /// Puts `explainer` in force and returns the one it replaces. Called before a write, never
    /// after: once the write publishes the state applied, a drop it causes (an observer may be
    /// waiting for exactly that drop) must already be explained by the policies now in force.
    /// A drop reported during the write, or read after it, is explained by the policies of the
    /// version of its subject's rules it was decided under (see `Explainer::versions_written`).
    fn explain_with(&self, explainer: Explainer) -> Explainer {
        std::mem::replace(&mut *self.explainer(), explainer)
    }

    /// The explainer the event reader uses, to change it.
    fn explainer(&self) -> RwLockWriteGuard<'_, Explainer> {
        self.shared
            .explainer
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// After a compile (full or in place) into `self.compiled`: saves identities if they
    /// changed, and hands the new output to whoever reports rejections.
    fn compiled_changed(&mut self, previous_rejections: &[Rejection]) {
        let compiled = &self.compiled;
        if self.identities != self.saved_identities {
            match persist::write_json(&identities_file(&self.config), &self.identities) {
                Ok(()) => self.saved_identities = self.identities.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not save identities; a restart may renumber them")
                }
            }
        }
        if compiled.rejections != previous_rejections {
            log_new_rejections(previous_rejections, &compiled.rejections);
            self.rejections
                .send_replace(compiled.rejections.clone().into());
        }
    }

    /// A change of policies alone, recomputed in place (see [`weir_policy::incremental`]) and
    /// written subject by subject. Returns false, having changed nothing, when it needs a full
    /// compile.
    fn update_policies(&mut self, policies: &[ObjectKey], started: Instant) -> bool {
        let Some(incremental) = &mut self.incremental else {
            return false;
        };
        let previous_rejections = self.compiled.rejections.clone();
        // Refused, it changes nothing; taken, it patches both as a full compile would.
        let Some(subjects) = incremental.policies_changed(
            &self.input,
            policies,
            &mut self.identities,
            &mut self.compiled,
        ) else {
            return false;
        };
        let compile_time = self.compiled_in_place(started);
        // Before the write, as for a full compile (see `explain_with`), and patched rather than
        // rebuilt. Should the write fail, it describes what `compiled` now holds and was not
        // written; the agent is degraded then, and the next change compiles and explains in
        // full.
        self.explainer().policies_changed(&self.compiled, &subjects);
        let written = self
            .writer
            .apply_subjects(&desired_subjects(&self.compiled, &subjects));
        if self.written(written, compile_time, started) {
            self.explainer()
                .versions_written(Some(&subjects), |subject| {
                    self.writer.subject_version(subject)
                });
        }
        self.compiled_changed(&previous_rejections);
        true
    }

    /// Counts a compile done in place and records its time (since `started`), which it returns.
    fn compiled_in_place(&self, started: Instant) -> Duration {
        self.shared.compiles.fetch_add(1, Ordering::Relaxed);
        let compile_time = started.elapsed();
        crate::metrics::metrics()
            .compile_seconds
            .observe(compile_time.as_secs_f64());
        compile_time
    }

    /// An address-only pod event (see [`weir_policy::incremental`]): patches the ipcache and
    /// writes just that. Returns false, having changed nothing, when the event needs a compile.
    fn update_addresses(&mut self, pods: &[ObjectKey], started: Instant) -> bool {
        let Some(incremental) = &mut self.incremental else {
            return false;
        };
        let Some(changes) =
            incremental.pods_changed(&self.input, pods, &self.identities, &mut self.compiled)
        else {
            return false;
        };
        let compile_time = self.compiled_in_place(started);
        let written = self.writer.apply_ipcache(&changes);
        self.written(written, compile_time, started);
        true
    }

    /// Local endpoints wired or unwired (CNI ADD and DEL) for pods whose Pod names this node
    /// (see [`weir_policy::incremental`]): their addresses patched in the ipcache and the local
    /// addresses, and just those entries written. Returns false, having changed nothing the
    /// full compile does not redo, when the change needs a full compile.
    fn update_endpoints(&mut self, wired: &[ObjectKey], started: Instant) -> bool {
        let Some(incremental) = &mut self.incremental else {
            return false;
        };
        // The compiler's input for those pods, as a full compile builds it (which rebuilds it
        // whole when this refuses).
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for pod in wired {
            let addresses: Vec<IpAddr> = self
                .endpoints
                .values()
                .filter(|e| e.pod == *pod)
                .flat_map(|e| e.addresses.iter().copied())
                .collect();
            touched.extend(addresses.iter().copied());
            let previous = if addresses.is_empty() {
                self.input.local_endpoints.remove(pod)
            } else {
                self.input.local_endpoints.insert(pod.clone(), addresses)
            };
            touched.extend(previous.into_iter().flatten());
        }
        let Some(changes) = incremental.endpoints_changed(&self.input, wired, &mut self.compiled)
        else {
            return false;
        };
        let compile_time = self.compiled_in_place(started);
        // Every address the pods held or hold: a pod wired again at the same address has a
        // new veth.
        let ifindexes = self.endpoint_ifindexes(|addr| touched.contains(addr));
        let endpoints = touched
            .iter()
            .map(|addr| {
                let entry = self.compiled.local_addresses.get(addr).and_then(|(_, id)| {
                    Some(EndpointInfo {
                        ifindex: *ifindexes.get(addr)?,
                        identity: *id,
                        flags: 0,
                        _pad: 0,
                    })
                });
                (*addr, entry)
            })
            .collect();
        // The explainer knows a new endpoint before its first packet can pass.
        self.explainer().endpoints_changed(&changes.local_addresses);
        tracing::info!(
            pods = wired.len(),
            ipcache = changes.ipcache.len(),
            addresses = changes.local_addresses.len(),
            "local endpoints compiled in place"
        );
        let written = self.writer.apply_endpoints(&changes.ipcache, &endpoints);
        self.written(written, compile_time, started);
        true
    }

    /// The ifindex of the host veth of every local address `wanted` picks (one lookup per
    /// endpoint; an endpoint whose veth is gone has none).
    fn endpoint_ifindexes(&self, wanted: impl Fn(&IpAddr) -> bool) -> BTreeMap<IpAddr, u32> {
        let mut ifindexes = BTreeMap::new();
        for endpoint in self.endpoints.values() {
            if !endpoint.addresses.iter().any(&wanted) {
                continue;
            }
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(endpoint.host_ifname.as_str()) {
                for addr in endpoint.addresses.iter().filter(|a| wanted(a)) {
                    ifindexes.insert(*addr, ifindex);
                }
            }
        }
        ifindexes
    }

    /// After a write of the datapath (whole, or the part a change compiled in place touched):
    /// written, the agent is healthy and the state applied; not written, the previous
    /// enforcement stays and the agent is degraded, and since `compiled` then holds what was not
    /// written, the next change compiles in full and writes the whole difference. Returns
    /// whether it was written.
    fn written(
        &mut self,
        written: Result<ApplyStats, WriteError>,
        compile_time: Duration,
        started: Instant,
    ) -> bool {
        match written {
            Ok(stats) => {
                log_apply(&stats, compile_time, started.elapsed());
                self.degraded = None;
                self.mark_applied();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the datapath; previous enforcement stays in place");
                self.degraded = Some(e.to_string());
                self.incremental = None;
                false
            }
        }
    }

    fn mark_applied(&mut self) {
        if self.applied != self.accepted {
            self.applied = self.accepted.clone();
            self.log_applied();
        }
    }

    fn desired_maps(&self, compiled: &Compiled) -> DesiredMaps {
        // The ifindex of every local address's veth, looked up once per endpoint.
        let ifindexes = self.endpoint_ifindexes(|_| true);
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

    /// Saves the endpoints. Only this task saves, so saves happen in the order of the changes
    /// and an older snapshot never overwrites a newer one.
    pub fn save_endpoints(&mut self) -> Result<(), persist::PersistError> {
        let endpoints: Vec<&LocalEndpoint> = self.endpoints.values().collect();
        self.endpoints_log.save(&endpoints)
    }
}

/// Where the identity allocator is saved.
pub(crate) fn identities_file(config: &RuntimeConfig) -> std::path::PathBuf {
    config.state_dir.join("identities.json")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(container_id: &str) -> LocalEndpoint {
        LocalEndpoint {
            container_id: container_id.to_owned(),
            ifname: "eth0".to_owned(),
            pod: ObjectKey::new("ns", container_id),
            host_ifname: format!("veth-{container_id}"),
            addresses: Vec::new(),
        }
    }

    fn activate(container_id: &str) -> Command {
        Command::Activate {
            endpoint: endpoint(container_id),
            done: oneshot::channel().0,
        }
    }

    fn deactivate(container_id: &str) -> Command {
        Command::Deactivate {
            id: (container_id.to_owned(), "eth0".to_owned()),
            done: oneshot::channel().0,
        }
    }

    fn state(fingerprint: &str) -> Command {
        Command::ClusterState {
            delta: StateDelta::default(),
            imports: None,
            fingerprint: fingerprint.to_owned(),
            done: oneshot::channel().0,
        }
    }

    fn with_objects(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        for object in weir_policy::model::parse_documents(yaml, "test") {
            state.apply(object.expect("valid"));
        }
        state
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns}\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: ns}\nspec: {podSelector: {}}\n";
    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns}\n";

    impl StateChange {
        /// What `new` changes from `old`.
        fn between(old: &ClusterState, new: &ClusterState) -> Self {
            let changed: Vec<ObjectRef> = StateDelta::between(old, new)
                .iter()
                .map(|(what, _)| what.clone())
                .collect();
            Self::of(&changed)
        }
    }

    #[test]
    fn a_state_change_names_the_pods_or_policies_it_changed() {
        let empty = ClusterState::default();
        let pod = with_objects(POD);
        let policy = with_objects(POLICY);
        let key = |name: &str| ObjectKey::new("ns", name);
        assert!(matches!(
            StateChange::between(&empty, &empty),
            StateChange::None
        ));
        assert!(
            matches!(StateChange::between(&empty, &pod), StateChange::Pods(k) if k == [key("p")])
        );
        assert!(
            matches!(StateChange::between(&pod, &empty), StateChange::Pods(k) if k == [key("p")])
        );
        assert!(
            matches!(StateChange::between(&empty, &policy), StateChange::Policies(k) if k == [key("np")])
        );
        let both = with_objects(&format!("{POD}---\n{POLICY}"));
        assert!(matches!(
            StateChange::between(&empty, &both),
            StateChange::Everything
        ));
        let namespace = with_objects(NAMESPACE);
        assert!(matches!(
            StateChange::between(&empty, &namespace),
            StateChange::Everything
        ));
        // Changes in a row add up; kinds mixed compile in full.
        let pods =
            StateChange::Pods(vec![key("a")]).then(StateChange::Pods(vec![key("b"), key("a")]));
        assert!(matches!(pods, StateChange::Pods(k) if k == [key("a"), key("b")]));
        let mixed = StateChange::Pods(vec![key("a")]).then(StateChange::Policies(vec![key("np")]));
        assert!(matches!(mixed, StateChange::Everything));
        assert!(matches!(
            StateChange::None.then(StateChange::Policies(vec![])),
            StateChange::Policies(_)
        ));
    }

    #[test]
    fn a_burst_is_one_round_and_the_newest_state_wins() {
        let mut round = Round::default();
        for i in 0..16 {
            assert!(round.take(activate(&format!("c{i}"))).is_none());
        }
        assert!(round.take(state("old")).is_none());
        assert!(round.take(deactivate("gone")).is_none());
        assert!(round.take(state("new")).is_none());
        assert_eq!(round.activations.len(), 16);
        assert_eq!(round.deactivations.len(), 1);
        assert_eq!(
            round.state.as_ref().map(|(_, _, f)| f.as_str()),
            Some("new")
        );
        assert_eq!(round.state_done.len(), 2, "both senders are answered");
    }

    #[test]
    fn a_second_change_of_one_endpoint_waits_for_the_next_round() {
        let mut round = Round::default();
        assert!(round.take(activate("c1")).is_none());
        assert!(round.take(activate("c2")).is_none());
        let held = round
            .take(deactivate("c1"))
            .expect("DEL after ADD of c1 is held back");
        assert!(matches!(held, Command::Deactivate { .. }));
        let mut next = Round::default();
        assert!(next.take(held).is_none());
        assert!(
            next.take(activate("c1")).is_some(),
            "and so is the ADD after it"
        );
    }
}
