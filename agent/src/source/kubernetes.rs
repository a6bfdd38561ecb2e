//! Kubernetes mode's source: kube-rs watchers and reflector stores for Pods, Namespaces,
//! NetworkPolicies and Nodes. After every change (debounced) the whole [`ClusterState`] is built
//! from the stores and sent on, the same shape as standalone mode's manifests directory.
//!
//! - Objects are converted by serializing the k8s-openapi object to JSON and reading it with
//!   [`parse_documents`], the standalone parser, so validation and defaulting are identical.
//!   An object is converted again only when its resourceVersion changes, and a state is built
//!   and sent only when a converted object changed, came or went: relists, resumed watches and
//!   bookmarks of unchanged objects cost a lookup per object and compile nothing.
//! - Nothing is sent until every kind has been listed completely once: a partial first state
//!   (Pods without their policies) would briefly enforce less than the cluster says.
//! - The watcher relists on `410 Gone` and the reflector swaps in the relisted objects, so what
//!   disappeared while the watch was gone is deleted. Lost connections are retried with backoff
//!   while the last state stays enforced.
//! - Pods in phase Succeeded or Failed are left out: kubelet has released their addresses.
//! - Rejected policies become a core/v1 Event on the NetworkPolicy (reason `PolicyRejected`). The
//!   rejections come from the compiler (over a watch channel from the runtime), so a policy is
//!   validated once per cluster state. The Event's name is derived from the policy's uid, the field and the reason,
//!   so every agent of the cluster writes the same Event: the first creates it, the others (and
//!   restarts) only bump its `lastTimestamp`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{Stream, StreamExt as _, stream::select_all};
use k8s_openapi::{
    api::{
        core::v1::{
            Container, Event, EventSource, Namespace as KNamespace, Node as KNode, ObjectReference,
            Pod as KPod, PodSpec as KPodSpec, PodStatus as KPodStatus,
        },
        networking::v1::NetworkPolicy as KNetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta as KObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef as StoreRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, watch};
use weir_policy::{
    model::{ClusterState, Object, ObjectKey, parse_documents},
    output::Rejection,
};

use super::{SourceStats, meshpeer_crd::KMeshPeer};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error(
        "no Kubernetes client configuration: {source}; run inside a Pod with a service account, \
         or set KUBECONFIG"
    )]
    Config {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("building the Kubernetes client: {source}")]
    Client {
        #[source]
        source: kube::Error,
    },
}

/// A client from the in-cluster service account, or KUBECONFIG / `~/.kube/config`.
pub async fn client() -> Result<Client, KubeSourceError> {
    let config = kube::Config::infer()
        .await
        .map_err(|source| KubeSourceError::Config { source })?;
    Client::try_from(config).map_err(|source| KubeSourceError::Client { source })
}

/// How the source behaves.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    /// This node's name (reporting instance of Events).
    pub node_name: String,
    /// How long a burst of changes may settle before the state is rebuilt.
    pub debounce: Duration,
    /// Write a Kubernetes Event for every rejected policy.
    pub policy_events: bool,
}

impl KubeSourceConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            debounce: Duration::from_millis(10),
            policy_events: true,
        }
    }
}

/// The kinds watched. MeshPeer is the CRD of manifests/05-crd-meshpeer.yaml; like every kind,
/// nothing is applied until it is listed (a node's restored mesh import is filtered by its
/// MeshPeers, so a state without them would drop it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
    MeshPeer,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Node,
        Kind::MeshPeer,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pods",
            Kind::Namespace => "Namespaces",
            Kind::NetworkPolicy => "NetworkPolicies",
            Kind::Node => "Nodes",
            Kind::MeshPeer => "MeshPeers",
        }
    }
}

/// What one watcher reported, stripped of the object (the reflector has stored it).
enum Report {
    /// A change that completes a consistent view: an apply, a delete, the end of a (re)list.
    Changed {
        relisted: bool,
    },
    /// A (re)list in progress: wait for its end before building a state.
    Listing,
    Failed(watcher::Error),
}

type Reports = Pin<Box<dyn Stream<Item = (Kind, Report)> + Send>>;

fn watch<K>(api: Api<K>, kind: Kind, strip: fn(&mut K)) -> (Store<K>, Reports)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .map(move |event| {
            let report = match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Report::Listing,
                Ok(watcher::Event::InitDone) => Report::Changed { relisted: true },
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    Report::Changed { relisted: false }
                }
                Err(e) => Report::Failed(e),
            };
            (kind, report)
        });
    (reader, Box::pin(stream))
}

fn strip_meta(meta: &mut KObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
}

/// Keeps what the compiler reads: labels, node, host network, named ports, addresses, phase.
fn strip_pod(pod: &mut KPod) {
    strip_meta(&mut pod.metadata);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(KPodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            ..KPodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(KPodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..KPodStatus::default()
        });
    }
}

fn strip_namespace(ns: &mut KNamespace) {
    strip_meta(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

fn strip_policy(policy: &mut KNetworkPolicy) {
    strip_meta(&mut policy.metadata);
}

fn strip_mesh_peer(peer: &mut KMeshPeer) {
    strip_meta(&mut peer.metadata);
}

/// Keeps the pod CIDRs and addresses (for routes); drops images, conditions, node info.
fn strip_node(node: &mut KNode) {
    strip_meta(&mut node.metadata);
    if let Some(spec) = node.spec.as_mut() {
        spec.taints = None;
        spec.config_source = None;
    }
    if let Some(status) = node.status.take() {
        node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses,
            ..Default::default()
        });
    }
}

/// Kind, namespace (empty for cluster-scoped objects) and name.
type CacheKey = (Kind, String, String);

/// Converted objects, reused while their resourceVersion holds.
#[derive(Default)]
struct Converter {
    /// The resourceVersion converted and the result (`None`: rejected, logged once).
    cache: HashMap<CacheKey, (Option<String>, Option<Object>)>,
    /// Objects present in the refresh in progress.
    seen: HashSet<CacheKey>,
    /// Whether the refresh in progress changed a converted object, added or removed one.
    changed: bool,
}

impl Converter {
    /// Converts the objects whose resourceVersion is new; an unchanged object costs a lookup.
    fn refresh<K>(&mut self, kind: Kind, objects: &[Arc<K>])
    where
        K: Resource + Serialize,
    {
        for object in objects {
            let key = (
                kind,
                object.namespace().unwrap_or_default(),
                object.name_any(),
            );
            let rv = object.resource_version();
            match self.cache.get_mut(&key) {
                Some((cached_rv, _)) if rv.is_some() && *cached_rv == rv => {}
                Some(cached) => {
                    let converted = convert(kind, &key.1, &key.2, object.as_ref());
                    // A new resourceVersion with the same converted object (an annotation, a
                    // status condition) changes nothing the compiler reads.
                    self.changed |= cached.1 != converted;
                    *cached = (rv, converted);
                }
                None => {
                    let converted = convert(kind, &key.1, &key.2, object.as_ref());
                    self.changed |= converted.is_some();
                    self.cache.insert(key.clone(), (rv, converted));
                }
            }
            self.seen.insert(key);
        }
    }

    /// Forgets objects that were not in this refresh; returns whether anything changed since
    /// the last refresh.
    fn finish(&mut self) -> bool {
        let seen = std::mem::take(&mut self.seen);
        let mut removed_objects = false;
        self.cache.retain(|key, (_, converted)| {
            let keep = seen.contains(key);
            removed_objects |= !keep && converted.is_some();
            keep
        });
        std::mem::take(&mut self.changed) || removed_objects
    }

    /// The state the converted objects make.
    fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for object in self.cache.values().filter_map(|(_, o)| o.as_ref()) {
            state.apply(object.clone());
        }
        state
    }
}

/// One object through the standalone parser (JSON is YAML).
fn convert<K: Serialize>(kind: Kind, namespace: &str, name: &str, object: &K) -> Option<Object> {
    let origin = if namespace.is_empty() {
        format!("the API server's {} {name}", kind.name())
    } else {
        format!("the API server's {} {namespace}/{name}", kind.name())
    };
    let json = match serde_json::to_string(object) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(object = %origin, error = %e, "cannot serialize an object from the API server; it is ignored");
            return None;
        }
    };
    let mut out = None;
    for document in parse_documents(&json, &origin) {
        match document {
            Ok(object) => out = Some(object),
            Err(e) => {
                tracing::error!(error = %e, "rejected an object from the API server; everything else is still applied");
            }
        }
    }
    out
}

fn terminated(pod: &KPod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
}

/// The reflector stores, read together to build a state.
struct Stores {
    pods: Store<KPod>,
    namespaces: Store<KNamespace>,
    policies: Store<KNetworkPolicy>,
    nodes: Store<KNode>,
    mesh_peers: Store<KMeshPeer>,
}

impl Stores {
    /// Brings the converter up to date with the stores; returns whether the state changed.
    fn refresh(&self, converter: &mut Converter) -> bool {
        let pods: Vec<Arc<KPod>> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| !terminated(p))
            .collect();
        converter.refresh(Kind::Pod, &pods);
        converter.refresh(Kind::Namespace, &self.namespaces.state());
        converter.refresh(Kind::NetworkPolicy, &self.policies.state());
        converter.refresh(Kind::Node, &self.nodes.state());
        converter.refresh(Kind::MeshPeer, &self.mesh_peers.state());
        converter.finish()
    }
}

/// Watches the cluster and sends every new complete state on `states`. Runs until the receiver
/// is gone; watch failures are logged, counted in `stats` and retried with backoff. (The
/// receiver records the states themselves in `stats`.) With `config.policy_events`, the
/// rejected policies the compiler reports on `rejections` become Events.
pub async fn run(
    client: Client,
    config: KubeSourceConfig,
    states: mpsc::Sender<ClusterState>,
    rejections: watch::Receiver<Arc<[Rejection]>>,
    stats: Arc<SourceStats>,
) {
    let (pods, pod_reports) = watch(Api::<KPod>::all(client.clone()), Kind::Pod, strip_pod);
    let (namespaces, ns_reports) = watch(
        Api::<KNamespace>::all(client.clone()),
        Kind::Namespace,
        strip_namespace,
    );
    let (policies, np_reports) = watch(
        Api::<KNetworkPolicy>::all(client.clone()),
        Kind::NetworkPolicy,
        strip_policy,
    );
    let (nodes, node_reports) = watch(Api::<KNode>::all(client.clone()), Kind::Node, strip_node);
    let (mesh_peers, mesh_peer_reports) = watch(
        Api::<KMeshPeer>::all(client.clone()),
        Kind::MeshPeer,
        strip_mesh_peer,
    );
    let stores = Stores {
        pods,
        namespaces,
        policies,
        nodes,
        mesh_peers,
    };
    let mut reports = select_all([
        pod_reports,
        ns_reports,
        np_reports,
        node_reports,
        mesh_peer_reports,
    ]);

    if config.policy_events {
        let events = EventWriter::spawn(client.clone(), config.node_name.clone(), stats.clone());
        tokio::spawn(events.follow(rejections, stores.policies.clone()));
    }
    let mut listed = [false; Kind::ALL.len()];
    let mut failing = [false; Kind::ALL.len()];
    let mut pending: Option<tokio::time::Instant> = None;
    let mut converter = Converter::default();
    let mut sent_once = false;
    // A watch that comes back quietly (nothing changed) reports nothing, so while a kind is
    // failing a cheap list (limit 1) probes whether the API server answers for it again.
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(Kind, bool)>();
    let mut probe_tick = tokio::time::interval(Duration::from_secs(1));
    probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let debounce_at = pending.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            |since| since + config.debounce,
        );
        let wake = tokio::select! {
            report = reports.next() => match report {
                Some(report) => Wake::Report(report),
                None => return,
            },
            () = tokio::time::sleep_until(debounce_at), if pending.is_some() => Wake::Debounce,
            _ = probe_tick.tick(), if failing.iter().any(|f| *f) => Wake::Probe,
            Some((kind, ok)) = probe_rx.recv() => Wake::Reachable(kind, ok),
        };
        match wake {
            Wake::Debounce => {
                pending = None;
                if !listed.iter().all(|l| *l) {
                    continue;
                }
                // A relist, a resumed watch or an object rewritten with what it had: nothing
                // to hand on, and no state is even built.
                if !stores.refresh(&mut converter) && sent_once {
                    continue;
                }
                let state = converter.state();
                sent_once = true;
                if states.send(state).await.is_err() {
                    return;
                }
            }
            Wake::Probe => {
                for kind in Kind::ALL.into_iter().filter(|k| failing[k.index()]) {
                    let client = client.clone();
                    let probe_tx = probe_tx.clone();
                    tokio::spawn(async move {
                        let _ = probe_tx.send((kind, reachable(client, kind).await));
                    });
                }
            }
            Wake::Reachable(kind, ok) => {
                if ok && failing[kind.index()] {
                    failing[kind.index()] = false;
                    tracing::info!(kind = kind.name(), "the API server answers again");
                }
            }
            Wake::Report((kind, report)) => {
                handle_report(
                    kind,
                    report,
                    &mut listed,
                    &mut failing,
                    &mut pending,
                    &stats,
                );
            }
        }
        stats
            .connected
            .store(failing.iter().all(|f| !f), Ordering::Relaxed);
    }
}

/// What woke the source's loop.
enum Wake {
    Report((Kind, Report)),
    Debounce,
    Probe,
    Reachable(Kind, bool),
}

fn handle_report(
    kind: Kind,
    report: Report,
    listed: &mut [bool; Kind::ALL.len()],
    failing: &mut [bool; Kind::ALL.len()],
    pending: &mut Option<tokio::time::Instant>,
    stats: &SourceStats,
) {
    let i = kind.index();
    match report {
        Report::Changed { relisted } => {
            if failing[i] {
                failing[i] = false;
                tracing::info!(kind = kind.name(), "watch re-established");
            }
            if relisted && listed[i] {
                tracing::info!(
                    kind = kind.name(),
                    "relisted; objects that disappeared meanwhile are removed"
                );
            }
            if relisted && !listed[i] {
                listed[i] = true;
                tracing::info!(kind = kind.name(), "initial list complete");
            }
            pending.get_or_insert_with(tokio::time::Instant::now);
        }
        Report::Listing => {}
        Report::Failed(e) => {
            stats.watch_errors.fetch_add(1, Ordering::Relaxed);
            let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
            if gone {
                stats.relists.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    kind = kind.name(),
                    "the API server no longer has our resourceVersion (410 Gone); relisting"
                );
            } else if !failing[i] {
                failing[i] = true;
                if listed.iter().all(|l| *l) {
                    tracing::warn!(kind = kind.name(), error = %e, "lost the watch; the last state stays enforced while retrying with backoff");
                } else {
                    tracing::warn!(kind = kind.name(), error = %e, "cannot list yet; nothing is applied until every kind is listed, retrying with backoff");
                }
            } else {
                tracing::debug!(kind = kind.name(), error = %e, "still failing");
            }
        }
    }
}

/// Whether the API server lists `kind` for us (one object at most).
async fn reachable(client: Client, kind: Kind) -> bool {
    let params = ListParams::default().limit(1);
    match kind {
        Kind::Pod => Api::<KPod>::all(client).list(&params).await.is_ok(),
        Kind::Namespace => Api::<KNamespace>::all(client).list(&params).await.is_ok(),
        Kind::NetworkPolicy => Api::<KNetworkPolicy>::all(client)
            .list(&params)
            .await
            .is_ok(),
        Kind::Node => Api::<KNode>::all(client).list(&params).await.is_ok(),
        Kind::MeshPeer => Api::<KMeshPeer>::all(client).list(&params).await.is_ok(),
    }
}

/// A rejection to publish, with what the Event needs from the policy object.
struct Publish {
    rejection: Rejection,
    uid: Option<String>,
    resource_version: Option<String>,
}

/// How often writing one Event is tried (2 s, 4 s, 8 s, 16 s apart).
const EVENT_TRIES: u32 = 5;

/// Writes Events from a task of its own, so a slow or absent API server never delays the state.
struct EventWriter {
    tx: mpsc::UnboundedSender<Publish>,
}

impl EventWriter {
    fn spawn(client: Client, node_name: String, stats: Arc<SourceStats>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Publish>();
        tokio::spawn(async move {
            while let Some(publish) = rx.recv().await {
                // A few tries over about a minute (the API server may be restarting), then give
                // up: the rejection is in the log and the metrics either way.
                let mut delay = Duration::from_secs(2);
                for attempt in 1..=EVENT_TRIES {
                    match write_event(&client, &node_name, &publish).await {
                        Ok(()) => {
                            stats.events_written.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) if attempt == EVENT_TRIES => {
                            tracing::warn!(policy = %publish.rejection.policy, error = %e,
                                "could not write the Event for a rejected policy (the rejection is logged above)");
                        }
                        Err(e) => {
                            tracing::debug!(policy = %publish.rejection.policy, error = %e, "writing the Event failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queues an Event for every new rejection the compiler reports, until the runtime is gone.
    async fn follow(
        self,
        mut rejections: watch::Receiver<Arc<[Rejection]>>,
        policies: Store<KNetworkPolicy>,
    ) {
        let mut reported = BTreeSet::new();
        loop {
            let current: BTreeSet<Rejection> =
                rejections.borrow_and_update().iter().cloned().collect();
            self.report_new(&current, &policies, &reported);
            reported = current;
            if rejections.changed().await.is_err() {
                return;
            }
        }
    }

    /// Queues an Event for every rejection not in `previous`.
    fn report_new(
        &self,
        current: &BTreeSet<Rejection>,
        policies: &Store<KNetworkPolicy>,
        previous: &BTreeSet<Rejection>,
    ) {
        for rejection in current.difference(previous) {
            let object = policies
                .get(&StoreRef::new(&rejection.policy.name).within(&rejection.policy.namespace));
            let _ = self.tx.send(Publish {
                rejection: rejection.clone(),
                uid: object.as_ref().and_then(|o| o.metadata.uid.clone()),
                resource_version: object
                    .as_ref()
                    .and_then(|o| o.metadata.resource_version.clone()),
            });
        }
    }
}

/// The Event's name: the policy's name (cut to fit) and a hash of what was rejected.
pub fn event_name(policy: &ObjectKey, uid: Option<&str>, field: &str, reason: &str) -> String {
    // Each part NUL-terminated, so that moving text between parts changes the hash. The name
    // must be the same on every node, hence a hash stable across builds and versions.
    let parts = [
        policy.namespace.as_str(),
        policy.name.as_str(),
        uid.unwrap_or(""),
        field,
        reason,
    ];
    let hash = weir_proto::naming::fnv1a64(parts.iter().flat_map(|part| part.bytes().chain([0])));
    let mut name: String = policy.name.chars().take(200).collect();
    name = name.trim_end_matches(['.', '-']).to_owned();
    format!("{name}.weir-{hash:016x}")
}

async fn write_event(
    client: &Client,
    node_name: &str,
    publish: &Publish,
) -> Result<(), kube::Error> {
    let r = &publish.rejection;
    let name = event_name(&r.policy, publish.uid.as_deref(), &r.field, &r.reason);
    let now = Time(Timestamp::now());
    let api: Api<Event> = Api::namespaced(client.clone(), &r.policy.namespace);
    let event = Event {
        metadata: KObjectMeta {
            name: Some(name.clone()),
            namespace: Some(r.policy.namespace.clone()),
            ..KObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("networking.k8s.io/v1".to_owned()),
            kind: Some("NetworkPolicy".to_owned()),
            name: Some(r.policy.name.clone()),
            namespace: Some(r.policy.namespace.clone()),
            uid: publish.uid.clone(),
            resource_version: publish.resource_version.clone(),
            field_path: None,
        },
        reason: Some("PolicyRejected".to_owned()),
        message: Some(format!(
            "{}: {}; Weir enforces none of this policy's rules: the pods it selects stay isolated in its directions, with nothing allowed by it (every other policy is still enforced)",
            r.field, r.reason
        )),
        type_: Some("Warning".to_owned()),
        source: Some(EventSource {
            component: Some("weir-agent".to_owned()),
            host: Some(node_name.to_owned()),
        }),
        reporting_component: Some("weir-agent".to_owned()),
        reporting_instance: Some(node_name.to_owned()),
        action: Some("Compile".to_owned()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now.clone()),
        count: Some(1),
        ..Event::default()
    };
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => {
            tracing::info!(policy = %r.policy, event = %name, "wrote Event PolicyRejected");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // Another node (or this agent before a restart) wrote it: mark it as seen again.
            let patch = serde_json::json!({ "lastTimestamp": now });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_stable_and_valid() {
        let key = ObjectKey::new("default", "deny-all");
        let a = event_name(&key, Some("u1"), "spec.ingress[0]", "bad");
        assert_eq!(a, event_name(&key, Some("u1"), "spec.ingress[0]", "bad"));
        assert_ne!(a, event_name(&key, Some("u2"), "spec.ingress[0]", "bad"));
        // Pinned: every node, of every version, must name the Event alike.
        assert_eq!(a, "deny-all.weir-fd715ffa1a2a79ed");
        let long = ObjectKey::new("default", "x".repeat(253));
        assert!(event_name(&long, None, "f", "r").len() <= 253);
    }

    #[test]
    fn conversion_defaults_like_the_manifests_parser() {
        let policy: KNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}
        }))
        .unwrap();
        let Some(Object::NetworkPolicy(p)) = convert(Kind::NetworkPolicy, "a", "p", &policy) else {
            panic!("not converted")
        };
        assert_eq!(
            p.spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned()][..])
        );
        let ns: KNamespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}
        }))
        .unwrap();
        let Some(Object::Namespace(n)) = convert(Kind::Namespace, "", "a", &ns) else {
            panic!("not converted")
        };
        assert_eq!(n.metadata.labels["kubernetes.io/metadata.name"], "a");
    }

    #[test]
    fn stripping_keeps_what_the_compiler_reads() {
        let mut pod: KPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "a", "labels": {"app": "x"},
                "annotations": {"big": "y"}, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "env": [{"name": "A", "value": "B"}],
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        strip_pod(&mut pod);
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        let Some(Object::Pod(p)) = convert(Kind::Pod, "a", "p", &pod) else {
            panic!("not converted")
        };
        assert_eq!(p.metadata.labels["app"], "x");
        assert_eq!(p.spec.node_name.as_deref(), Some("n1"));
        assert_eq!(p.spec.containers[0].ports[0].name.as_deref(), Some("http"));
        assert_eq!(p.status.pod_ips.len(), 1);
    }

    fn namespace(rv: &str, labels: serde_json::Value) -> Arc<KNamespace> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "a", "resourceVersion": rv, "labels": labels}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn the_converter_reports_only_changes_the_compiler_sees() {
        let mut converter = Converter::default();
        let refresh = |converter: &mut Converter, objects: &[Arc<KNamespace>]| {
            converter.refresh(Kind::Namespace, objects);
            converter.finish()
        };
        let first = [namespace("1", serde_json::json!({"team": "x"}))];
        assert!(refresh(&mut converter, &first), "new object");
        assert_eq!(converter.state().namespaces.len(), 1);
        // A relist or a resumed watch: the same objects at the same resourceVersions.
        assert!(!refresh(&mut converter, &first));
        // A new resourceVersion that changes nothing the compiler reads.
        let same = [namespace("2", serde_json::json!({"team": "x"}))];
        assert!(!refresh(&mut converter, &same));
        // A label change is a change, and so is a deletion.
        let relabelled = [namespace("3", serde_json::json!({"team": "y"}))];
        assert!(refresh(&mut converter, &relabelled));
        assert_eq!(
            converter.state().namespaces["a"].metadata.labels["team"],
            "y"
        );
        assert!(refresh(&mut converter, &[]));
        assert!(converter.state().namespaces.is_empty());
        assert!(!refresh(&mut converter, &[]));
    }
}
