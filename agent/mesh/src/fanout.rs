//! Local fan-out of the merged import: only gateways talk to peers; every other agent of the
//! cluster subscribes to one local gateway's merged import of every peer (`MeshImport.Watch`)
//! with the sync protocol of the link (versioned deltas, resume, a full snapshot ended by
//! Synced, nothing deleted before it), so a node can enforce policy on remote identities.
//!
//! # Who may talk to whom (fail closed)
//! The channel stays inside the cluster and carries nothing the gateway does not already hold
//! and enforce; it is authorised by addresses the cluster source (API server or manifests) vouches
//! for, and what it carries is checked again by the receiver:
//! - the gateway listens only on its Node's InternalIP, and serves only connections from the
//!   InternalIP of one of the cluster's Node objects ([`ImportServer::set_watchers`]); pods cannot
//!   send from a node address (their source addresses are spoof-checked on their veth);
//! - a node dials only the InternalIPs of Nodes labelled `mesh.weir.io/gateway=true`;
//! - every entry it receives is checked against its own MeshPeer objects, exactly as the gateway
//!   checked the peer ([`check_entry`]): a peer it has no MeshPeer for, an address outside that
//!   peer's `allowedPrefixes` (or inside ours or another peer's), a reserved identity, or the
//!   `weir.io/cluster` label refuse the whole delta (NACK, the session ends, retried with
//!   backoff), and what a node holds is filtered by its MeshPeers again whenever they change.
//!
//! So a source that is not a gateway has nothing to connect to, and even a process that took a
//! gateway's address could only label addresses of a configured peer's prefixes, which only
//! reach this node through a gateway anyway. The residual risk is the one of the design's c.8: a
//! host-network process on a node can forge node-level traffic, as it can without the mesh.
//!
//! # Which gateways are up (active/active)
//! A cluster may have several gateways; nodes route peers' prefixes over every one that is up
//! (an ECMP route). Besides the import session (with one gateway), a node keeps a *liveness*
//! watch ([`LIVENESS_METADATA`]) with every gateway, on an HTTP/2 connection with a short
//! keepalive ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]): the gateway answers it with one
//! frame once it is ready to carry traffic (a session with every peer, [`ImportServer::set_ready`])
//! and ends it when it no longer is. A gateway that dies closes the connection (or goes silent
//! and misses the keepalive), so it leaves the node's set of live gateways
//! ([`ImportWatcher::live_gateways`]) within a second, and comes back once it is ready again.
//!
//! # Restarts and staleness
//! The node persists what it holds (`<state dir>/mesh-import.json`) and restores it before its
//! datapath reconciles. It deletes nothing on its own: the gateway owns each peer's stale TTL and
//! the removal of a MeshPeer, and its merged import already reflects them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::mesh::v1::{
    self as pb, mesh_import_client::MeshImportClient, mesh_import_server, sync_frame::Kind,
};

use crate::{
    confine::{self, PeerBounds, Refusal, RefusalCounters},
    export::{Export, endpoint_name, identity_name},
    export_feed::ExportFeed,
    link::{ImportView, PROTOCOL_VERSION, delta_from_wire, frame_to_wire, random_u64},
    sync::{Exporter, Frame, ImportError, Importer, Limits},
};

/// The default port of `MeshImport` on a gateway's InternalIP.
pub const IMPORT_PORT: u16 = 4244;
/// The request metadata of a liveness watch: the gateway sends one frame once it is ready to
/// carry traffic and ends the stream when it no longer is.
pub const LIVENESS_METADATA: &str = "weir-liveness";
/// HTTP/2 PINGs from a node to its gateways this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);
/// ...and a gateway that leaves one unanswered this long is taken as gone.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(750);
const HISTORY_LIMIT: usize = 65_536;

/// `<peer>/<entry name>`: an entry of the merged import.
pub fn merged_name(peer: &str, name: &str) -> String {
    format!("{peer}/{name}")
}

/// The merged import of every peer, as one set of entries named `<peer>/<entry name>`.
pub fn merged_entries(views: &[Arc<ImportView>]) -> BTreeMap<String, Export> {
    let mut out = BTreeMap::new();
    for view in views {
        for identity in view.identities.values() {
            out.insert(
                merged_name(&view.cluster, &identity_name(identity.id)),
                Export::Identity(identity.clone()),
            );
        }
        for (addr, id) in &view.endpoints {
            out.insert(
                merged_name(&view.cluster, &endpoint_name(addr)),
                Export::Endpoint(crate::export::EndpointExport {
                    addr: *addr,
                    identity: *id,
                }),
            );
        }
    }
    out
}

/// Checks one entry of a gateway's merged import against this node's MeshPeers: the peer it
/// names must be one of them, and the entry must pass the checks the gateway applied to it.
pub fn check_entry(
    name: &str,
    export: &Export,
    peers: &BTreeMap<String, PeerBounds>,
) -> Result<(), Refusal> {
    let Some((peer, inner)) = name.split_once('/') else {
        return Err(Refusal::MalformedEntry);
    };
    let bounds = peers.get(peer).ok_or(Refusal::UnknownPeer)?;
    confine::check_export(inner, export, bounds)
}

/// Per peer, the import views of the entries that pass [`check_entry`] now.
pub fn views_of(
    entries: &BTreeMap<String, Export>,
    peers: &BTreeMap<String, PeerBounds>,
) -> Vec<Arc<ImportView>> {
    let mut views: BTreeMap<&str, ImportView> = BTreeMap::new();
    for (name, export) in entries {
        if check_entry(name, export, peers).is_err() {
            continue;
        }
        let Some((peer, _)) = name.split_once('/') else {
            continue;
        };
        let view = views.entry(peer).or_insert_with(|| ImportView {
            cluster: peer.to_owned(),
            ..ImportView::default()
        });
        match export {
            Export::Identity(i) => {
                view.identities.insert(i.id, i.clone());
            }
            Export::Endpoint(e) => {
                view.endpoints.insert(e.addr, e.identity);
            }
        }
    }
    views.into_values().map(Arc::new).collect()
}

/// The gateway's side: its merged import, served to the cluster's nodes.
pub struct ImportServer {
    exporter: Mutex<Exporter<Export>>,
    version: watch::Sender<u64>,
    /// The InternalIPs of the cluster's Nodes: the only sources served.
    watchers: RwLock<BTreeSet<IpAddr>>,
    limits: Limits,
    /// Whether this gateway can carry traffic (what liveness watches report).
    ready: watch::Sender<bool>,
}

impl ImportServer {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            exporter: Mutex::new(Exporter::new(random_u64(), HISTORY_LIMIT)),
            version: watch::Sender::new(0),
            watchers: RwLock::new(BTreeSet::new()),
            limits,
            ready: watch::Sender::new(false),
        })
    }

    /// Whether this gateway can carry traffic now (a session with every peer): liveness watches
    /// get their frame once it is, and end when it no longer is.
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    /// Serves one liveness watch: one frame once ready, the end of the stream once not.
    async fn serve_liveness(
        self: Arc<Self>,
        mut inbound: Streaming<pb::SyncFrame>,
        out: mpsc::Sender<Result<pb::SyncFrame, Status>>,
    ) {
        let mut ready = self.ready.subscribe();
        let up = async {
            ready.wait_for(|r| *r).await.map_err(|_| ())?;
            let (incarnation, version) = {
                let exporter = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
                (exporter.incarnation(), exporter.version())
            };
            out.send(Ok(pb::SyncFrame {
                kind: Some(Kind::Synced(pb::Synced {
                    incarnation,
                    version,
                })),
            }))
            .await
            .map_err(|_| ())?;
            ready.wait_for(|r| !*r).await.map_err(|_| ())?;
            Ok::<(), ()>(())
        };
        // The watcher going away (its stream ends) ends this too.
        let gone = async { while let Some(Ok(_)) = inbound.next().await {} };
        tokio::select! {
            _ = up => {}
            () = gone => {}
        }
    }

    /// Makes the served import equal to `views`; watchers get the difference at once.
    pub fn publish(&self, views: &[Arc<ImportView>]) {
        let version = {
            let mut exporter = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
            exporter.replace_all(merged_entries(views));
            exporter.version()
        };
        self.version.send_replace(version);
    }

    /// The addresses allowed to watch (the cluster's Nodes' InternalIPs).
    pub fn set_watchers(&self, addrs: BTreeSet<IpAddr>) {
        *self.watchers.write().unwrap_or_else(|p| p.into_inner()) =
            addrs.into_iter().map(|a| a.to_canonical()).collect();
    }

    fn allowed(&self, addr: &IpAddr) -> bool {
        self.watchers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&addr.to_canonical())
    }

    pub fn service(self: &Arc<Self>) -> mesh_import_server::MeshImportServer<ImportService> {
        mesh_import_server::MeshImportServer::new(ImportService {
            server: Arc::clone(self),
        })
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20)
    }

    /// Serves one watcher until it goes away or refuses a frame.
    async fn serve(
        self: Arc<Self>,
        watcher: SocketAddr,
        mut inbound: Streaming<pb::SyncFrame>,
        out: mpsc::Sender<Result<pb::SyncFrame, Status>>,
    ) -> Result<(), String> {
        let hello = match inbound.next().await {
            Some(Ok(pb::SyncFrame {
                kind: Some(Kind::Hello(h)),
            })) => h,
            _ => return Err("the watcher sent no Hello first".into()),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} is not supported",
                hello.protocol_version
            ));
        }
        let (mut feed, frames) =
            ExportFeed::open(&self.exporter, &self.version, &hello, &self.limits);
        tracing::info!(%watcher, node = %hello.cluster_name, "a node watches the mesh import");
        let send = |f: &Frame<Export>| {
            out.send(Ok(pb::SyncFrame {
                kind: Some(frame_to_wire(f)),
            }))
        };
        for f in &frames {
            send(f).await.map_err(|_| "the watcher went away")?;
        }
        loop {
            tokio::select! {
                frame = inbound.next() => match frame {
                    Some(Ok(pb::SyncFrame { kind: Some(Kind::Ack(ack)) })) => {
                        if !ack.error.is_empty() {
                            return Err(format!("the node refused the import: {}", ack.error));
                        }
                    }
                    Some(Ok(_)) => return Err("the watcher sent something other than an Ack".into()),
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Ok(()),
                },
                changed = feed.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    for f in &feed.next_frames(&self.exporter) {
                        send(f).await.map_err(|_| "the watcher went away")?;
                    }
                }
            }
        }
    }
}

/// The `MeshImport` gRPC service.
pub struct ImportService {
    server: Arc<ImportServer>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl mesh_import_server::MeshImport for ImportService {
    type WatchStream = BoxStream<pb::SyncFrame>;

    async fn watch(
        &self,
        req: Request<Streaming<pb::SyncFrame>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let remote = req
            .remote_addr()
            .ok_or_else(|| Status::unauthenticated("no peer address"))?;
        if !self.server.allowed(&remote.ip()) {
            tracing::warn!(%remote, "refused a mesh import watch: not the InternalIP of a Node");
            return Err(Status::permission_denied(format!(
                "{} is not the InternalIP of a Node of this cluster",
                remote.ip()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let server = Arc::clone(&self.server);
        let liveness = req.metadata().contains_key(LIVENESS_METADATA);
        let inbound = req.into_inner();
        tokio::spawn(async move {
            if liveness {
                server.serve_liveness(inbound, tx).await;
            } else if let Err(e) = server.serve(remote, inbound, tx).await {
                tracing::warn!(watcher = %remote, error = %e, "mesh import watch ended");
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Why a watch session ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("connecting to the gateway: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Stream(#[from] Status),
    #[error("the gateway ended the stream")]
    Ended,
    #[error("refused the gateway's import: {0}")]
    Refused(String),
    #[error("the gateways changed")]
    GatewaysChanged,
}

/// What a node (not a gateway) knows of the mesh: the merged import it holds, the MeshPeers it
/// checks it against, and the session with a gateway.
pub struct ImportWatcher {
    node: String,
    importer: Mutex<Importer<Export>>,
    path: Option<PathBuf>,
    peers: RwLock<BTreeMap<String, PeerBounds>>,
    changed: watch::Sender<u64>,
    limits: Limits,
    connected: AtomicBool,
    /// Refusals by the peer the entry named (`-` for a peer this node does not know).
    refusals: Mutex<HashMap<String, Arc<RefusalCounters>>>,
    /// The gateways whose liveness watch reported them ready, by MeshImport address.
    live: watch::Sender<BTreeSet<SocketAddr>>,
}

impl ImportWatcher {
    /// A watcher holding what was persisted at `path`, if anything.
    pub fn restore(node: impl Into<String>, path: Option<PathBuf>, limits: Limits) -> Arc<Self> {
        let importer = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Importer<Export>>(&bytes) {
                    Ok(i) => {
                        tracing::info!(path = %p.display(), entries = i.entries().len(), "restored the mesh import from the gateway");
                        i
                    }
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "unreadable mesh import; starting empty");
                        Importer::new()
                    }
                },
                Err(_) => Importer::new(),
            },
            None => Importer::new(),
        };
        Arc::new(Self {
            node: node.into(),
            importer: Mutex::new(importer),
            path,
            peers: RwLock::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
            limits,
            connected: AtomicBool::new(false),
            refusals: Mutex::new(HashMap::new()),
            live: watch::Sender::new(BTreeSet::new()),
        })
    }

    /// The gateways that are up and ready to carry traffic (by MeshImport address), as their
    /// liveness watches say; notified on every change.
    pub fn live_gateways(&self) -> watch::Receiver<BTreeSet<SocketAddr>> {
        self.live.subscribe()
    }

    fn set_live(&self, gateway: SocketAddr, live: bool) {
        self.live.send_if_modified(|set| {
            if live {
                set.insert(gateway)
            } else {
                set.remove(&gateway)
            }
        });
    }

    /// Keeps a liveness watch on every gateway of the list (see the module's doc), following
    /// changes of the list.
    pub async fn watch_liveness(self: Arc<Self>, mut gateways: watch::Receiver<Vec<SocketAddr>>) {
        let mut tasks: BTreeMap<SocketAddr, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            let list = gateways.borrow_and_update().clone();
            tasks.retain(|addr, task| {
                let keep = list.contains(addr);
                if !keep {
                    task.abort();
                    self.set_live(*addr, false);
                }
                keep
            });
            for addr in list {
                tasks
                    .entry(addr)
                    .or_insert_with(|| tokio::spawn(Arc::clone(&self).liveness(addr)));
            }
            if gateways.changed().await.is_err() {
                break;
            }
        }
        for (addr, task) in tasks {
            task.abort();
            self.set_live(addr, false);
        }
    }

    /// One gateway's liveness watch, re-opened whenever it ends.
    async fn liveness(self: Arc<Self>, addr: SocketAddr) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI authority")
            .connect_timeout(KEEPALIVE_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        loop {
            let mut client = MeshImportClient::new(channel.clone());
            // Our side of the stream stays open (a pending sender) while we watch.
            let (tx, rx) = mpsc::channel(1);
            let _ = tx
                .send(pb::SyncFrame {
                    kind: Some(Kind::Hello(pb::Hello {
                        protocol_version: PROTOCOL_VERSION,
                        cluster_name: self.node.clone(),
                        ..Default::default()
                    })),
                })
                .await;
            let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request
                .metadata_mut()
                .insert(LIVENESS_METADATA, "1".parse().expect("valid metadata"));
            if let Ok(response) = client.watch(request).await {
                let mut inbound = response.into_inner();
                if let Some(Ok(_)) = inbound.next().await {
                    tracing::info!(gateway = %addr, "a mesh gateway is up");
                    self.set_live(addr, true);
                    while let Some(Ok(_)) = inbound.next().await {}
                    tracing::warn!(gateway = %addr, "a mesh gateway is down or not ready; traffic moves to the others");
                }
            }
            self.set_live(addr, false);
            drop(tx);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// This node's valid MeshPeers; what it holds is filtered by them from now on.
    pub fn set_peers(&self, peers: BTreeMap<String, PeerBounds>) {
        let mut current = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if *current != peers {
            *current = peers;
            drop(current);
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Notified whenever the import views may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Per configured peer, what this node holds of it.
    pub fn views(&self) -> Vec<Arc<ImportView>> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner()).clone();
        let importer = self.importer.lock().unwrap_or_else(|p| p.into_inner());
        views_of(importer.entries(), &peers)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The MeshPeers this node checks the import against.
    pub fn peer_names(&self) -> Vec<String> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn is_synced(&self) -> bool {
        self.importer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_synced()
    }

    /// Refusals by peer name.
    pub fn refusals(&self) -> Vec<(String, Arc<RefusalCounters>)> {
        let mut out: Vec<_> = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn count(&self, name: &str, reason: Refusal) {
        let known = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let peer = name
            .split_once('/')
            .map(|(p, _)| p)
            .filter(|p| known.contains_key(*p))
            .unwrap_or("-")
            .to_owned();
        drop(known);
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .count(reason);
    }

    fn persist(&self, importer: &Importer<Export>) {
        let Some(path) = &self.path else { return };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(importer)?)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "could not persist the mesh import");
        }
    }

    /// Keeps a session with one of `gateways` (their MeshImport addresses) up, in order, with
    /// backoff between rounds; follows changes of the list.
    pub async fn run(self: Arc<Self>, mut gateways: watch::Receiver<Vec<SocketAddr>>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let list = gateways.borrow_and_update().clone();
            if list.is_empty() {
                if gateways.changed().await.is_err() {
                    return;
                }
                continue;
            }
            for addr in list {
                let started = tokio::time::Instant::now();
                let result = self.session(addr, &mut gateways).await;
                self.connected.store(false, Ordering::Relaxed);
                self.importer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .disconnected();
                match result {
                    Err(WatchError::GatewaysChanged) => break,
                    Err(e) => {
                        tracing::warn!(gateway = %addr, error = %e, "mesh import watch ended")
                    }
                    Ok(()) => {}
                }
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = gateways.changed() => if changed.is_err() { return },
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(
        &self,
        addr: SocketAddr,
        gateways: &mut watch::Receiver<Vec<SocketAddr>>,
    ) -> Result<(), WatchError> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI authority")
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        let mut client = MeshImportClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20);
        let (tx, rx) = mpsc::channel(64);
        let resume = self
            .importer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume();
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_name: self.node.clone(),
            session_id: format!("{:016x}", random_u64()),
            resume: resume.map(|r| pb::Resume {
                incarnation: r.incarnation,
                version: r.version,
            }),
            limits: Some(pb::Limits {
                max_entries: self.limits.max_entries as u32,
                max_delta_entries: self.limits.max_delta_entries as u32,
            }),
        };
        let _ = tx
            .send(pb::SyncFrame {
                kind: Some(Kind::Hello(hello)),
            })
            .await;
        let mut inbound = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(gateway = %addr, "watching the mesh import of a gateway");
        gateways.mark_unchanged();
        loop {
            let frame = tokio::select! {
                frame = inbound.next() => frame,
                changed = gateways.changed() => {
                    if changed.is_err() || !gateways.borrow().contains(&addr) {
                        return Err(WatchError::GatewaysChanged);
                    }
                    continue;
                }
            };
            let frame = match frame {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(WatchError::Ended),
            };
            self.receive(frame, &tx).await?;
        }
    }

    /// Applies one frame of the gateway's, whole or not at all; Acks, or NACKs and fails.
    async fn receive(
        &self,
        frame: pb::SyncFrame,
        tx: &mpsc::Sender<pb::SyncFrame>,
    ) -> Result<(), WatchError> {
        let frame = match frame.kind {
            Some(Kind::Snapshot(s)) => Frame::Snapshot {
                incarnation: s.incarnation,
                version: s.version,
            },
            Some(Kind::Synced(s)) => Frame::Synced {
                incarnation: s.incarnation,
                version: s.version,
            },
            Some(Kind::Delta(d)) => match delta_from_wire(&d) {
                Ok(delta) => Frame::Delta(delta),
                Err(reason) => {
                    self.count("", Refusal::MalformedEntry);
                    return self.nack(tx, d.incarnation, d.version, reason).await;
                }
            },
            _ => {
                self.count("", Refusal::OutOfOrder);
                return self
                    .nack(tx, 0, 0, "expected a Snapshot, Delta or Synced".into())
                    .await;
            }
        };
        let (incarnation, version) = match &frame {
            Frame::Snapshot {
                incarnation,
                version,
            }
            | Frame::Synced {
                incarnation,
                version,
            } => (*incarnation, *version),
            Frame::Delta(d) => (d.incarnation, d.version),
        };
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner()).clone();
        let applied = {
            let mut importer = self.importer.lock().unwrap_or_else(|p| p.into_inner());
            let applied = importer.apply(&frame, &self.limits, |name, export| {
                check_entry(name, export, &peers)
            });
            if let Ok(a) = &applied
                && (!a.changed.is_empty() || a.synced)
                && importer.resume().is_some()
            {
                self.persist(&importer);
            }
            applied
        };
        match applied {
            Ok(applied) => {
                if !applied.changed.is_empty() || applied.synced {
                    self.changed.send_modify(|v| *v += 1);
                }
                if applied.synced {
                    tracing::info!(
                        entries = self
                            .importer
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entries()
                            .len(),
                        "the mesh import from the gateway is synced"
                    );
                }
                if !matches!(frame, Frame::Snapshot { .. }) {
                    let _ = tx
                        .send(pb::SyncFrame {
                            kind: Some(Kind::Ack(pb::Ack {
                                incarnation,
                                version,
                                error: String::new(),
                            })),
                        })
                        .await;
                }
                Ok(())
            }
            Err(e) => {
                let (name, reason) = match &e {
                    ImportError::Refused { name, reason } => (name.as_str(), *reason),
                    ImportError::DeltaTooLarge { .. } | ImportError::TooManyEntries { .. } => {
                        ("", Refusal::Limit)
                    }
                    ImportError::Duplicate { .. } => ("", Refusal::MalformedEntry),
                    _ => ("", Refusal::OutOfOrder),
                };
                self.count(name, reason);
                tracing::error!(%reason, error = %e, "refused the gateway's mesh import; nothing of it applied");
                self.nack(tx, incarnation, version, format!("{reason}: {e}"))
                    .await
            }
        }
    }

    async fn nack(
        &self,
        tx: &mpsc::Sender<pb::SyncFrame>,
        incarnation: u64,
        version: u64,
        error: String,
    ) -> Result<(), WatchError> {
        let _ = tx
            .send(pb::SyncFrame {
                kind: Some(Kind::Ack(pb::Ack {
                    incarnation,
                    version,
                    error: error.clone(),
                })),
            })
            .await;
        Err(WatchError::Refused(error))
    }
}
