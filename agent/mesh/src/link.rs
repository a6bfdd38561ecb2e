//! One gateway's side of the mesh link: its peers, the Sync sessions that move [`Frame`]s
//! between our [`Exporter`] and their [`Importer`] (and back), and the Tunnel streams that carry
//! packets. Serves `MeshLink` to peers that dial us and dials the peers whose name sorts after
//! ours. A peer has several gateways (active/active): we keep one session with each of them
//! ([`Remote`]), each with its own import (the ids a gateway exports are its own) and its own
//! lanes, and hash flows over the ones that are up; a new session of the same remote gateway
//! replaces its old one.
//!
//! Everything a peer sends is checked by [`confine`](crate::confine) and refused whole, counted
//! by reason and logged; a refused delta is NACKed and ends the session (the dialer retries with
//! backoff). Imported state is persisted per peer in `<state dir>/mesh/<peer>.json` and restored
//! when the peer is configured again, so an agent restart drops nothing.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::mesh::v1::{self as pb, mesh_link_client::MeshLinkClient, mesh_link_server};

use crate::{
    codec::{self, Offload, RECORD_HEADER_LEN, encode_record_with, write_record_header},
    confine::{self, PeerBounds, Refusal, RefusalCounters},
    export::{Export, IdentityExport},
    export_feed::ExportFeed,
    lanes::Lane,
    sync::{Delta, Exporter, Frame, ImportError, Importer, Limits},
    transport::PeerCluster,
};

/// 2: records carry offload fields (TSO/USO super-packets), and a Tunnel names its lane.
/// 3: Sync sessions carry heartbeats, and a session that hears nothing for [`SILENCE_TIMEOUT`]
/// ends.
pub const PROTOCOL_VERSION: u32 = 3;
/// How often a Sync session sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A session ends when nothing came from the peer's gateway for this long: no frame on the
/// session and no batch on any lane of that gateway. Its gateway leaves the set that carries
/// traffic (and, if it was our last session with the peer, this gateway tells the nodes of its
/// cluster it is not ready), so a gateway that went silent without closing its connections (its
/// WAN blackholed) costs well under a second of packets. Every batch counts, so a lane busy with
/// bulk data, whose heartbeats may queue behind it, never looks silent.
pub const SILENCE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the lanes of a replaced session may go on reading what the peer had sent on them
/// before it switched to the new session's; the peer ends them itself well before that.
const REPLACED_LANES_DRAIN: Duration = Duration::from_secs(2);
/// Changes kept for resuming sessions by delta instead of snapshot.
const HISTORY_LIMIT: usize = 65_536;
/// Deltas a peer may send in one second by default; more is a flood (each delta costs a
/// rebuild of the peer's import view and a write of its persisted import).
pub const MAX_DELTAS_PER_SECOND: u32 = 1_000;
/// A batch is sent once it holds this much (or the TUN has nothing more to read).
pub const BATCH_BYTES: usize = 256 * 1024;
/// A batch built in place starts in a buffer of at least this much, which the batches after it
/// go on filling: records read back to back stay contiguous, so a batch is one slice of it.
pub const ARENA_BYTES: usize = 1 << 20;
/// Most lanes a peer may open to us (a Tunnel naming a higher lane is refused).
pub const MAX_LANES: usize = 16;
/// The request metadata naming a Tunnel's lane: a bulk lane's number (absent: lane 0), or
/// `latency` ([`Lane::LATENCY_NAME`]).
pub const LANE_METADATA: &str = "weir-lane";
/// The request metadata naming the dial (one per connection attempt of the dialer) a Sync or
/// Tunnel belongs to: what we send on every lane of a dial ends when the peer opens a session of
/// another dial.
pub const DIAL_METADATA: &str = "weir-dial";
/// The request metadata naming the dialing gateway (its node), stable across its restarts: the
/// receiving side keeps one [`Remote`] per name (absent: the connection's address).
pub const GATEWAY_METADATA: &str = "weir-gateway";
/// Most gateways of one peer we keep state for: a peer that names more (new names in
/// [`GATEWAY_METADATA`]) is refused rather than let grow our memory.
pub const MAX_GATEWAYS: usize = 16;

/// How a gateway carries packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPlane {
    /// Lanes per peer: each its own TCP+TLS+HTTP/2 connection (the first shares the Sync
    /// session's), flows hashed onto them so each flow keeps its order.
    pub lanes: usize,
    /// Batches queued per lane before further batches are dropped (and counted): a router's
    /// tail drop, so the inner TCP sees loss instead of a growing queue.
    pub queue: usize,
    /// Dial a latency lane besides the bulk lanes, to every gateway of a peer (on the Sync
    /// session's connection, so no bulk batch is ever queued ahead of its packets); flows that
    /// send little take it ([`crate::lanes`]). On in [`DataPlane::default`], which
    /// [`Link::new`] uses; gateways follow the agent's `--mesh-latency-lane`, off by default.
    pub latency_lane: bool,
}

impl Default for DataPlane {
    fn default() -> Self {
        Self {
            lanes: 1,
            queue: 8,
            latency_lane: true,
        }
    }
}

/// Where received, checked packets go (the gateway's TUN).
pub trait Deliver: Send + Sync {
    /// Hands one packet on with its offload fields; false when it was dropped (a full queue, or
    /// offload the receiver cannot take), which the link counts.
    fn deliver(&self, offload: &Offload, packet: Bytes) -> bool;
}

/// A queue of plain packets (tests, and receivers without offload): a packet that needs
/// segmentation or its checksum completed cannot be handed on as it is, so it is dropped.
impl Deliver for mpsc::Sender<Bytes> {
    fn deliver(&self, offload: &Offload, packet: Bytes) -> bool {
        if offload.is_gso() || offload.needs_csum() {
            return false;
        }
        self.try_send(packet).is_ok()
    }
}

/// What a MeshPeer says about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's cluster name, as in its certificate.
    pub name: String,
    /// Its gateways.
    pub endpoints: Vec<SocketAddr>,
    /// Its `allowedPrefixes`, with ours and other peers' (for the confinement checks).
    pub bounds: PeerBounds,
    /// How long imported state is kept while no session is up.
    pub stale_ttl: Duration,
}

/// What we hold of one peer's exports, indexed for the datapath and the compiler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportView {
    pub cluster: String,
    pub identities: BTreeMap<u32, IdentityExport>,
    /// Exported address → identity id.
    pub endpoints: HashMap<IpAddr, u32>,
}

impl ImportView {
    fn build(cluster: &str, entries: &BTreeMap<String, Export>) -> Self {
        let mut view = ImportView {
            cluster: cluster.to_owned(),
            ..Self::default()
        };
        for e in entries.values() {
            match e {
                Export::Identity(i) => {
                    view.identities.insert(i.id, i.clone());
                }
                Export::Endpoint(ep) => {
                    view.endpoints.insert(ep.addr, ep.identity);
                }
            }
        }
        view
    }
}

/// Counters of the data plane of one peer.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Dropped because the queue towards the peer was full.
    pub tx_queue_full: AtomicU64,
    /// Checked packets the TUN did not take.
    pub rx_dropped: AtomicU64,
    /// Sessions ended because the peer's gateway went silent ([`SILENCE_TIMEOUT`]).
    pub silent_sessions: AtomicU64,
}

/// One lane's queue of batches towards the peer; whichever Tunnel stream serves the lane
/// drains it.
struct LaneQueue {
    tx: mpsc::Sender<Bytes>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
}

impl LaneQueue {
    fn new(depth: usize) -> Self {
        let (tx, rx) = mpsc::channel(depth.max(1));
        Self {
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }
}

/// One configured peer (a cluster), with one [`Remote`] per gateway of it we have a session with.
pub struct Peer {
    spec: RwLock<PeerSpec>,
    exporter: Mutex<Exporter<Export>>,
    export_version: watch::Sender<u64>,
    pub refusals: RefusalCounters,
    pub tunnel: TunnelCounters,
    /// By remote gateway: the endpoint we dial, or the name the dialer gave
    /// ([`GATEWAY_METADATA`]); `""` holds the import restored from the state directory until a
    /// live gateway's import is synced.
    remotes: RwLock<BTreeMap<String, Arc<Remote>>>,
    data_plane: DataPlane,
}

/// One gateway of a peer: its sessions, what it exported to us (its ids are its own, so packets
/// it sends are checked against its import only) and the lanes towards it.
pub struct Remote {
    key: String,
    importer: Mutex<Importer<Export>>,
    view: RwLock<Arc<ImportView>>,
    /// Bumped by every new session; older sessions of this gateway end when they see it change.
    session: watch::Sender<u64>,
    lanes: Vec<LaneQueue>,
    latency: LaneQueue,
    /// Tunnels serving this gateway's latency lane now (ours or its dial): while none is, its
    /// flows take their bulk lanes (a peer that does not open it loses nothing).
    latency_tunnels: Arc<AtomicUsize>,
    /// Sessions past their Hellos now (two while a new one replaces an old one).
    sessions_up: AtomicU64,
    /// When we last heard from the gateway (any Sync frame, any batch), in ms since `epoch`.
    heard_ms: AtomicU64,
    epoch: std::time::Instant,
    /// The dial of the latest session the gateway opened to us: Tunnels of other dials (every
    /// lane's connection) end when it changes, so an old connection's streams never keep taking
    /// packets from the queues.
    server_dial: watch::Sender<Option<DialKey>>,
}

impl Remote {
    fn new(key: &str, cluster: &str, importer: Importer<Export>, data_plane: DataPlane) -> Self {
        let view = ImportView::build(cluster, importer.entries());
        Self {
            key: key.to_owned(),
            importer: Mutex::new(importer),
            view: RwLock::new(Arc::new(view)),
            session: watch::Sender::new(0),
            lanes: (0..data_plane.lanes)
                .map(|_| LaneQueue::new(data_plane.queue))
                .collect(),
            latency: LaneQueue::new(data_plane.queue),
            latency_tunnels: Arc::default(),
            sessions_up: AtomicU64::new(0),
            heard_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            server_dial: watch::Sender::new(None),
        }
    }

    /// Notes that something came from the gateway now.
    fn heard(&self) {
        self.heard_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since anything came from the gateway.
    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(heard)
    }

    /// The endpoint we dial, or the name the gateway gave when it dialled us.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn is_up(&self) -> bool {
        self.sessions_up.load(Ordering::Relaxed) > 0
    }

    pub fn is_synced(&self) -> bool {
        self.importer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_synced()
    }

    /// Whether a Tunnel serves the latency lane (else latency flows take their bulk lanes).
    pub fn latency_lane_up(&self) -> bool {
        self.latency_tunnels.load(Ordering::Relaxed) > 0
    }

    fn queue(&self, lane: Lane) -> &LaneQueue {
        match lane {
            Lane::Latency => &self.latency,
            Lane::Bulk(n) => &self.lanes[n % self.lanes.len()],
        }
    }

    fn view(&self) -> Arc<ImportView> {
        Arc::clone(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Ends every session and lane of this gateway.
    fn cut_off(&self) {
        self.session.send_modify(|s| *s += 1);
        self.server_dial.send_replace(None);
    }
}

/// Rendezvous hashing: the weight of `flow` on gateway `key`. A flow goes to the live gateway of
/// the highest weight, so when one gateway leaves only its own flows move.
fn rendezvous(flow: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ flow.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (h >> 29)
}

impl Peer {
    fn remote(&self, key: &str) -> Option<Arc<Remote>> {
        self.remotes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// The remote gateway `key`, added if new; none once the peer has [`MAX_GATEWAYS`] others.
    fn remote_or_insert(&self, key: &str) -> Option<Arc<Remote>> {
        if let Some(r) = self.remote(key) {
            return Some(r);
        }
        let name = self.name();
        let mut remotes = self.remotes.write().unwrap_or_else(|p| p.into_inner());
        if !remotes.contains_key(key) && remotes.len() >= MAX_GATEWAYS {
            return None;
        }
        Some(Arc::clone(remotes.entry(key.to_owned()).or_insert_with(
            || Arc::new(Remote::new(key, &name, Importer::new(), self.data_plane)),
        )))
    }

    /// [`Peer::remote_or_insert`] for a request of the peer: refused (and counted as `limit`)
    /// beyond [`MAX_GATEWAYS`].
    fn remote_for_request(&self, key: &str) -> Result<Arc<Remote>, Status> {
        self.remote_or_insert(key).ok_or_else(|| {
            self.refusals.count(Refusal::Limit);
            Status::resource_exhausted(format!(
                "more than {MAX_GATEWAYS} gateways of cluster {}",
                self.name()
            ))
        })
    }

    /// Every remote gateway we know, by key.
    pub fn remotes(&self) -> Vec<Arc<Remote>> {
        self.remotes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The gateway whose import stands for the peer: one with a session and a synced import,
    /// else one with a synced import, else any that holds something (the restored one).
    fn primary(&self) -> Option<Arc<Remote>> {
        let remotes = self.remotes();
        let rank = |r: &Remote| {
            let synced = r.is_synced();
            (r.is_up() && synced, synced, !r.view().endpoints.is_empty())
        };
        let best = remotes.iter().map(|r| rank(r)).max()?;
        remotes.into_iter().find(|r| rank(r) == best)
    }

    /// The gateway that carries `flow` now: among those with a session (preferring those whose
    /// import is synced, so what we send is checked against a complete import), the one of the
    /// highest rendezvous weight; a gateway that leaves moves only its own flows.
    fn carrier(&self, flow: u64) -> Option<Arc<Remote>> {
        let remotes = self.remotes();
        let pick = |f: &dyn Fn(&Remote) -> bool| {
            remotes
                .iter()
                .filter(|r| f(r))
                .max_by_key(|r| rendezvous(flow, &r.key))
                .cloned()
        };
        pick(&|r| r.is_up() && r.is_synced() && !r.key.is_empty())
            .or_else(|| pick(&|r| r.is_up()))
            .or_else(|| pick(&|r| !r.key.is_empty()))
    }

    pub fn name(&self) -> String {
        self.spec
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .name
            .clone()
    }

    /// What the peer exports, as its primary gateway's import says.
    pub fn view(&self) -> Arc<ImportView> {
        match self.primary() {
            Some(r) => r.view(),
            None => Arc::new(ImportView {
                cluster: self.name(),
                ..ImportView::default()
            }),
        }
    }

    /// Whether a session with one of the peer's gateways is up (Hellos exchanged, not ended).
    pub fn is_connected(&self) -> bool {
        self.remotes().iter().any(|r| r.is_up())
    }

    /// How many of the peer's gateways we have a session with.
    pub fn gateways_up(&self) -> usize {
        self.remotes().iter().filter(|r| r.is_up()).count()
    }

    pub fn is_synced(&self) -> bool {
        self.primary().is_some_and(|r| r.is_synced())
    }

    /// Whether a Tunnel serves the latency lane of one of the peer's gateways (each gateway's
    /// latency flows take their bulk lanes while none of its own does).
    pub fn latency_lane_up(&self) -> bool {
        self.remotes().iter().any(|r| r.latency_lane_up())
    }

    /// What we export to this peer now.
    pub fn exported(&self) -> BTreeMap<String, Export> {
        self.exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries()
            .clone()
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the peer sent no Hello first")]
    NoHello,
    #[error("the peer's Hello names cluster {claimed}, but its certificate names {certified}")]
    NameMismatch { claimed: String, certified: String },
    #[error("protocol version {0} is not supported (we speak {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("refused the peer's {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("the peer refused our {0}")]
    Nacked(String),
    #[error("stream: {0}")]
    Stream(#[from] Status),
    #[error("the stream ended")]
    Ended,
    #[error("replaced by a newer session of the same peer")]
    Replaced,
    #[error("nothing from the peer's gateway for {0:?}")]
    Silent(Duration),
}

/// A gateway's mesh link.
pub struct Link {
    local_cluster: String,
    limits: Limits,
    state_dir: Option<PathBuf>,
    incarnation: u64,
    peers: RwLock<BTreeMap<String, Arc<Peer>>>,
    /// Bumped whenever any peer's import view changes.
    imports: watch::Sender<u64>,
    /// Our pod prefixes: the only destinations received packets are delivered to.
    local_pod_prefixes: RwLock<Vec<IpNet>>,
    /// Where received, checked packets go (the TUN).
    deliver: Box<dyn Deliver>,
    data_plane: DataPlane,
    /// Deltas a peer may send per second before its session is refused (NACK, closed).
    max_deltas_per_second: AtomicU64,
    /// This gateway's name towards the peers it dials ([`GATEWAY_METADATA`]).
    gateway_name: RwLock<String>,
}

/// A random u64 from the kernel (incarnations and session ids need no more).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    u64::from_le_bytes(b) ^ t
}

impl Link {
    /// A link for `local_cluster` (the name in our certificate). Received packets that pass
    /// the checks are sent to `deliver`.
    pub fn new(
        local_cluster: impl Into<String>,
        limits: Limits,
        state_dir: Option<PathBuf>,
        deliver: impl Deliver + 'static,
    ) -> Arc<Self> {
        Self::with_data_plane(
            local_cluster,
            limits,
            state_dir,
            deliver,
            DataPlane::default(),
        )
    }

    /// [`Link::new`] with lanes and queues set.
    pub fn with_data_plane(
        local_cluster: impl Into<String>,
        limits: Limits,
        state_dir: Option<PathBuf>,
        deliver: impl Deliver + 'static,
        data_plane: DataPlane,
    ) -> Arc<Self> {
        let data_plane = DataPlane {
            lanes: data_plane.lanes.clamp(1, MAX_LANES),
            queue: data_plane.queue.max(1),
            latency_lane: data_plane.latency_lane,
        };
        Arc::new(Self {
            local_cluster: local_cluster.into(),
            limits,
            state_dir,
            incarnation: random_u64(),
            peers: RwLock::new(BTreeMap::new()),
            imports: watch::Sender::new(0),
            local_pod_prefixes: RwLock::new(Vec::new()),
            deliver: Box::new(deliver),
            data_plane,
            max_deltas_per_second: AtomicU64::new(u64::from(MAX_DELTAS_PER_SECOND)),
            gateway_name: RwLock::new(format!("{:016x}", random_u64())),
        })
    }

    /// Names this gateway to the peers it dials (its node name: stable across restarts, so a
    /// restarted gateway's session replaces its previous one on the peer's side).
    pub fn set_gateway_name(&self, name: &str) {
        *self.gateway_name.write().unwrap_or_else(|p| p.into_inner()) = name.to_owned();
    }

    fn gateway_name(&self) -> String {
        self.gateway_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn data_plane(&self) -> DataPlane {
        self.data_plane
    }

    /// Deltas a peer may send per second (default [`MAX_DELTAS_PER_SECOND`]); beyond it the
    /// delta is refused (`limit`), NACKed and the session closed.
    pub fn set_max_deltas_per_second(&self, n: u32) {
        self.max_deltas_per_second
            .store(u64::from(n.max(1)), Ordering::Relaxed);
    }

    pub fn local_cluster(&self) -> &str {
        &self.local_cluster
    }

    /// Notified whenever an import view changes.
    pub fn subscribe_imports(&self) -> watch::Receiver<u64> {
        self.imports.subscribe()
    }

    pub fn peer(&self, name: &str) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn peer_spec(&self, name: &str) -> Option<PeerSpec> {
        self.peer(name)
            .map(|p| p.spec.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every peer's import view.
    pub fn imports(&self) -> Vec<Arc<ImportView>> {
        self.peers().iter().map(|p| p.view()).collect()
    }

    pub fn set_local_pod_prefixes(&self, prefixes: Vec<IpNet>) {
        *self
            .local_pod_prefixes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = prefixes;
    }

    fn state_path(&self, peer: &str) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("mesh").join(format!("{peer}.json")))
    }

    /// Configures the peers (the MeshPeer objects). New peers start with the import persisted
    /// for them, if any; removed peers are forgotten with their import (and its file). Returns
    /// the peers that are new.
    pub fn set_peers(&self, specs: Vec<PeerSpec>) -> Vec<Arc<Peer>> {
        let mut added = Vec::new();
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeMap<String, PeerSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        let before = peers.len();
        peers.retain(|name, peer| {
            let keep = wanted.contains_key(name);
            if !keep {
                // Cut off at once: its session ends, its Tunnels on our side end, and what it
                // exported no longer admits a packet (an established connection it keeps
                // open gets everything refused).
                let remotes =
                    std::mem::take(&mut *peer.remotes.write().unwrap_or_else(|p| p.into_inner()));
                for remote in remotes.values() {
                    remote.cut_off();
                }
                if let Some(path) = self.state_path(name) {
                    let _ = std::fs::remove_file(path);
                }
            }
            keep
        });
        for (name, spec) in wanted {
            if let Some(peer) = peers.get(&name) {
                *peer.spec.write().unwrap_or_else(|p| p.into_inner()) = spec;
                continue;
            }
            let importer = self.restore(&name);
            let mut remotes = BTreeMap::new();
            if !importer.entries().is_empty() {
                remotes.insert(
                    String::new(),
                    Arc::new(Remote::new("", &name, importer, self.data_plane)),
                );
            }
            let peer = Arc::new(Peer {
                spec: RwLock::new(spec),
                exporter: Mutex::new(Exporter::new(self.incarnation, HISTORY_LIMIT)),
                export_version: watch::Sender::new(0),
                refusals: RefusalCounters::default(),
                tunnel: TunnelCounters::default(),
                remotes: RwLock::new(remotes),
                data_plane: self.data_plane,
            });
            peers.insert(name, Arc::clone(&peer));
            added.push(peer);
        }
        let removed = before + added.len() != peers.len();
        drop(peers);
        if removed || !added.is_empty() {
            self.imports.send_modify(|v| *v += 1);
        }
        added
    }

    fn restore(&self, peer: &str) -> Importer<Export> {
        let Some(path) = self.state_path(peer) else {
            return Importer::new();
        };
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(importer) => {
                    tracing::info!(peer, path = %path.display(), "restored the import of a mesh peer");
                    importer
                }
                Err(e) => {
                    tracing::warn!(peer, path = %path.display(), error = %e, "unreadable mesh import; starting empty");
                    Importer::new()
                }
            },
            Err(_) => Importer::new(),
        }
    }

    fn persist(&self, peer: &str, importer: &Importer<Export>) {
        let Some(path) = self.state_path(peer) else {
            return;
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(importer)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(peer, path = %path.display(), error = %e, "could not persist the mesh import");
        }
    }

    /// Sets what we export to `peer`. Sessions send the change at once.
    pub fn set_exports(&self, peer: &str, entries: BTreeMap<String, Export>) {
        let Some(p) = self.peer(peer) else { return };
        let version = {
            let mut exporter = p.exporter.lock().unwrap_or_else(|e| e.into_inner());
            exporter.replace_all(entries);
            exporter.version()
        };
        p.export_version.send_replace(version);
    }

    /// Runs one Sync session with gateway `remote` of `peer` over `inbound`/`outbound` until
    /// it ends.
    pub async fn session(
        self: &Arc<Self>,
        peer: Arc<Peer>,
        remote: Arc<Remote>,
        certified: &str,
        mut inbound: Pin<Box<dyn Stream<Item = Result<pb::SyncFrame, Status>> + Send>>,
        outbound: mpsc::Sender<pb::SyncFrame>,
    ) -> Result<(), SessionError> {
        let session_id = format!("{:016x}", random_u64());
        let mut replaced = remote.session.subscribe();
        remote.session.send_modify(|s| *s += 1);
        replaced.mark_unchanged();
        let resume = remote
            .importer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume();
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_name: self.local_cluster.clone(),
            session_id: session_id.clone(),
            resume: resume.map(|r| pb::Resume {
                incarnation: r.incarnation,
                version: r.version,
            }),
            limits: Some(pb::Limits {
                max_entries: self.limits.max_entries as u32,
                max_delta_entries: self.limits.max_delta_entries as u32,
            }),
        };
        send(&outbound, pb::sync_frame::Kind::Hello(hello)).await?;
        let theirs = match inbound.next().await {
            Some(Ok(pb::SyncFrame {
                kind: Some(pb::sync_frame::Kind::Hello(h)),
            })) => h,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SessionError::Ended),
            Some(Ok(_)) => return Err(SessionError::NoHello),
        };
        if theirs.cluster_name != certified {
            peer.refusals.count(Refusal::Impersonation);
            tracing::warn!(peer = certified, claimed = %theirs.cluster_name, "refused a mesh session whose Hello names another cluster");
            return Err(SessionError::NameMismatch {
                claimed: theirs.cluster_name,
                certified: certified.to_owned(),
            });
        }
        if theirs.protocol_version != PROTOCOL_VERSION {
            return Err(SessionError::Version(theirs.protocol_version));
        }
        tracing::info!(peer = certified, gateway = %remote.key, session = %session_id, peer_session = %theirs.session_id, "mesh session up");
        remote.heard();
        let _up = SessionUp::new(&remote, &self.imports);
        let (mut feed, frames) =
            ExportFeed::open(&peer.exporter, &peer.export_version, &theirs, &self.limits);
        for f in frames {
            send(&outbound, frame_to_wire(&f)).await?;
        }
        // Deltas received in the current one-second window.
        let mut window = (tokio::time::Instant::now(), 0u64);
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = tokio::time::Instant::now();
        let result = loop {
            tokio::select! {
                // A frame that is ready wins over the heartbeat's check.
                biased;
                frame = inbound.next() => {
                    let frame = match frame {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => break Err(e.into()),
                        None => break Err(SessionError::Ended),
                    };
                    remote.heard();
                    if let Some(pb::sync_frame::Kind::Delta(d)) = &frame.kind {
                        if window.0.elapsed() >= Duration::from_secs(1) {
                            window = (tokio::time::Instant::now(), 0);
                        }
                        window.1 += 1;
                        let max = self.max_deltas_per_second.load(Ordering::Relaxed);
                        if window.1 > max {
                            let text = format!("more than {max} deltas in one second");
                            break self
                                .refuse(&peer, certified, Refusal::Limit, text, d.incarnation, d.version, &outbound)
                                .await;
                        }
                    }
                    if let Err(e) = self.receive(&peer, &remote, certified, frame, &outbound).await {
                        break Err(e);
                    }
                }
                changed = feed.changed() => {
                    if changed.is_err() {
                        break Err(SessionError::Ended);
                    }
                    let mut failed = None;
                    for f in feed.next_frames(&peer.exporter) {
                        if let Err(e) = send(&outbound, frame_to_wire(&f)).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
                _ = replaced.changed() => break Err(SessionError::Replaced),
                _ = heartbeat.tick() => {
                    // A tick this late means this task did not run (a stalled process or
                    // machine): frames may be waiting unread, so that time is not the peer's
                    // silence.
                    if last_tick.elapsed() > 2 * HEARTBEAT_INTERVAL {
                        remote.heard();
                    }
                    last_tick = tokio::time::Instant::now();
                    let silent = remote.silent_for();
                    if silent >= SILENCE_TIMEOUT {
                        peer.tunnel.silent_sessions.fetch_add(1, Ordering::Relaxed);
                        break Err(SessionError::Silent(silent));
                    }
                    // A full queue means frames are on their way anyway.
                    let _ = outbound.try_send(pb::SyncFrame {
                        kind: Some(pb::sync_frame::Kind::Heartbeat(pb::Heartbeat {})),
                    });
                }
            }
        };
        remote
            .importer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disconnected();
        self.expire_later(&peer, &remote);
        result
    }

    /// Applies one frame from the peer; answers deltas with an Ack, or a NACK before failing.
    async fn receive(
        &self,
        peer: &Arc<Peer>,
        remote: &Remote,
        certified: &str,
        frame: pb::SyncFrame,
        outbound: &mpsc::Sender<pb::SyncFrame>,
    ) -> Result<(), SessionError> {
        use pb::sync_frame::Kind;
        let frame = match frame.kind {
            Some(Kind::Heartbeat(_)) => return Ok(()),
            Some(Kind::Ack(ack)) => {
                if ack.error.is_empty() {
                    return Ok(());
                }
                tracing::warn!(peer = certified, error = %ack.error, "the peer refused our exports");
                return Err(SessionError::Nacked(ack.error));
            }
            Some(Kind::Hello(_)) | None => {
                return self
                    .refuse(
                        peer,
                        certified,
                        Refusal::OutOfOrder,
                        "a second Hello or an empty frame".into(),
                        0,
                        0,
                        outbound,
                    )
                    .await;
            }
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
                    return self
                        .refuse(
                            peer,
                            certified,
                            Refusal::MalformedEntry,
                            reason,
                            d.incarnation,
                            d.version,
                            outbound,
                        )
                        .await;
                }
            },
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
        let bounds = peer
            .spec
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .bounds
            .clone();
        let outcome = {
            let mut importer = remote.importer.lock().unwrap_or_else(|p| p.into_inner());
            let applied = importer.apply(&frame, &self.limits, |name, export| {
                confine::check_export(name, export, &bounds)
            });
            match applied {
                Ok(applied) => {
                    let in_snapshot = importer.resume().is_none();
                    if !applied.changed.is_empty() || applied.synced {
                        if !applied.changed.is_empty() {
                            *remote.view.write().unwrap_or_else(|p| p.into_inner()) =
                                Arc::new(ImportView::build(certified, importer.entries()));
                        }
                        if !in_snapshot {
                            self.persist(certified, &importer);
                        }
                    }
                    // A synced live gateway stands for the peer from now on: the restored
                    // import has done its job.
                    if applied.synced && !remote.key.is_empty() {
                        peer.remotes
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove("");
                    }
                    Ok(!applied.changed.is_empty() || applied.synced)
                }
                Err(e) => Err(e),
            }
        };
        match outcome {
            Ok(changed) => {
                if changed {
                    self.imports.send_modify(|v| *v += 1);
                }
                if !matches!(frame, Frame::Snapshot { .. }) {
                    send(
                        outbound,
                        Kind::Ack(pb::Ack {
                            incarnation,
                            version,
                            error: String::new(),
                        }),
                    )
                    .await?;
                }
                Ok(())
            }
            Err(e) => {
                let reason = match &e {
                    ImportError::Refused { reason, .. } => *reason,
                    ImportError::DeltaTooLarge { .. } | ImportError::TooManyEntries { .. } => {
                        Refusal::Limit
                    }
                    ImportError::Duplicate { .. } => Refusal::MalformedEntry,
                    _ => Refusal::OutOfOrder,
                };
                self.refuse(
                    peer,
                    certified,
                    reason,
                    e.to_string(),
                    incarnation,
                    version,
                    outbound,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn refuse(
        &self,
        peer: &Peer,
        certified: &str,
        reason: Refusal,
        text: String,
        incarnation: u64,
        version: u64,
        outbound: &mpsc::Sender<pb::SyncFrame>,
    ) -> Result<(), SessionError> {
        peer.refusals.count(reason);
        tracing::warn!(peer = certified, %reason, error = %text, "refused a delta from a mesh peer; closing the session");
        let _ = send(
            outbound,
            pb::sync_frame::Kind::Ack(pb::Ack {
                incarnation,
                version,
                error: format!("{reason}: {text}"),
            }),
        )
        .await;
        Err(SessionError::Refused {
            what: "delta".into(),
            reason: format!("{reason}: {text}"),
        })
    }

    /// Forgets gateway `remote` if no session of it has come back after the peer's stale TTL;
    /// once no gateway of the peer is left with a session, the peer's import is deleted.
    fn expire_later(self: &Arc<Self>, peer: &Arc<Peer>, remote: &Arc<Remote>) {
        let ttl = peer
            .spec
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .stale_ttl;
        let mut sessions = remote.session.subscribe();
        sessions.mark_unchanged();
        let link = Arc::clone(self);
        let (peer, remote) = (Arc::clone(peer), Arc::clone(remote));
        tokio::spawn(async move {
            if tokio::time::timeout(ttl, sessions.changed()).await.is_ok() || remote.is_up() {
                return;
            }
            let name = peer.name();
            peer.remotes
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&remote.key);
            if peer.is_connected() {
                tracing::info!(peer = %name, gateway = %remote.key, ttl = ?ttl, "no session with a gateway of the peer within the stale TTL; it is forgotten");
                link.imports.send_modify(|v| *v += 1);
                return;
            }
            let stale =
                std::mem::take(&mut *peer.remotes.write().unwrap_or_else(|p| p.into_inner()));
            let cleared = {
                let mut importer = remote.importer.lock().unwrap_or_else(|p| p.into_inner());
                let cleared = importer.clear().len()
                    + stale
                        .values()
                        .map(|r| {
                            r.importer
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entries()
                                .len()
                        })
                        .sum::<usize>();
                link.persist(&name, &importer);
                cleared
            };
            tracing::warn!(peer = %name, entries = cleared, ttl = ?ttl, "no session within the stale TTL; the peer's import is deleted");
            link.imports.send_modify(|v| *v += 1);
        });
    }

    /// Checks the records of a batch received from gateway `remote` of `peer` (against what
    /// that gateway exported) and delivers the good packets.
    pub fn receive_batch(&self, peer: &Peer, remote: &Remote, batch: &Bytes) {
        remote.heard();
        let (records, error) = codec::decode_records(batch);
        let view = remote.view();
        let local = self
            .local_pod_prefixes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for r in records {
            // A super-packet is checked like a single packet (its IP header is every segment's)
            // and its offload fields must describe it.
            if let Err(e) = r.offload.check(&r.packet) {
                peer.refusals.count(Refusal::MalformedPacket);
                tracing::debug!(peer = %view.cluster, reason = e.reason(), error = %e, "refused a packet from a mesh peer");
                continue;
            }
            match confine::check_packet(&r.packet, r.src_identity, &view.endpoints, &local) {
                Ok(()) => {
                    peer.tunnel.rx_packets.fetch_add(1, Ordering::Relaxed);
                    if !self.deliver.deliver(&r.offload, r.packet) {
                        peer.tunnel.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(reason) => {
                    peer.refusals.count(reason);
                    tracing::debug!(peer = %view.cluster, %reason, "refused a packet from a mesh peer");
                }
            }
        }
        if let Some(e) = error {
            peer.refusals.count(Refusal::MalformedPacket);
            tracing::debug!(peer = %view.cluster, reason = e.reason(), "a packet batch from a mesh peer was cut short");
        }
    }

    /// The peer whose allowed prefixes hold `dst`.
    pub fn peer_for(&self, dst: &IpAddr) -> Option<Arc<Peer>> {
        self.peers().into_iter().find(|p| {
            p.spec
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .bounds
                .allowed
                .iter()
                .any(|n| n.contains(dst))
        })
    }

    /// Queues a batch towards `peer` on its first lane; a full queue drops it (counted).
    pub fn send_batch(&self, peer: &Peer, batch: Bytes, packets: u64) {
        self.send_batch_on(peer, 0, batch, packets);
    }

    /// Queues a batch towards `peer` on bulk lane `lane` (modulo the lanes) of the gateway that
    /// carries flow `lane`; a full queue drops it (counted), never buffers more.
    pub fn send_batch_on(&self, peer: &Peer, lane: usize, batch: Bytes, packets: u64) {
        self.send_flow_batch(peer, lane as u64, batch, packets);
    }

    /// Queues a batch towards `peer` on `lane` of the gateway that carries flow 0 (a bulk
    /// lane's number, modulo the lanes, names the flow); a full queue drops it (counted).
    pub fn send_batch_to(&self, peer: &Peer, lane: Lane, batch: Bytes, packets: u64) {
        let flow = match lane {
            Lane::Latency => 0,
            Lane::Bulk(n) => n as u64,
        };
        self.send_flow_batch_on(peer, flow, lane, batch, packets);
    }

    /// Queues a batch of flow hash `flow`'s packets towards `peer` on its bulk lane: to the live
    /// gateway that carries the flow ([`rendezvous`]), on lane `flow` modulo the lanes. A full
    /// queue, or no gateway at all, drops it (counted); never buffers more.
    pub fn send_flow_batch(&self, peer: &Peer, flow: u64, batch: Bytes, packets: u64) {
        self.send_flow_batch_on(peer, flow, Lane::Bulk(flow as usize), batch, packets);
    }

    /// Queues a batch of flow hash `flow`'s packets towards `peer`: to the live gateway that
    /// carries the flow ([`rendezvous`]; the gateway is chosen first, the lane second), on
    /// `lane` of that gateway. The latency lane is taken only while a Tunnel of that gateway
    /// serves it, else the batch takes bulk lane `flow` (modulo the lanes), the flow's own, so
    /// a peer gateway that does not open it loses nothing. A full queue, or no gateway at
    /// all, drops it (counted); never buffers more.
    pub fn send_flow_batch_on(
        &self,
        peer: &Peer,
        flow: u64,
        lane: Lane,
        batch: Bytes,
        packets: u64,
    ) {
        let Some(remote) = peer.carrier(flow) else {
            peer.tunnel
                .tx_queue_full
                .fetch_add(packets, Ordering::Relaxed);
            return;
        };
        let lane = match lane {
            Lane::Latency if !remote.latency_lane_up() => {
                Lane::Bulk((flow % remote.lanes.len() as u64) as usize)
            }
            lane => lane,
        };
        match remote.queue(lane).tx.try_send(batch) {
            Ok(()) => {
                peer.tunnel.tx_packets.fetch_add(packets, Ordering::Relaxed);
            }
            Err(_) => {
                peer.tunnel
                    .tx_queue_full
                    .fetch_add(packets, Ordering::Relaxed);
            }
        }
    }

    /// The stream of batches queued towards gateway `remote` on `lane`, for the Tunnel serving
    /// it.
    fn outgoing(remote: &Remote, lane: Lane) -> impl Stream<Item = Bytes> + Send + 'static {
        let rx = Arc::clone(&remote.queue(lane).rx);
        futures::stream::unfold(rx, |rx| async move {
            let next = rx.lock().await.recv().await;
            next.map(|b| (b, rx))
        })
    }

    /// Dials every gateway of `peer` (its endpoints) and keeps a Sync session and the Tunnels
    /// with each up, with backoff between attempts; follows changes of the endpoints. Returns
    /// when the peer is removed or every gateway's session was replaced by a newer dial's.
    pub async fn dial(self: Arc<Self>, peer: Arc<Peer>, config: Arc<rustls::ClientConfig>) {
        let mut dialers: BTreeMap<SocketAddr, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            if self
                .peer(&peer.name())
                .is_none_or(|p| !Arc::ptr_eq(&p, &peer))
            {
                break; // the peer was removed
            }
            let endpoints: Vec<SocketAddr> = peer
                .spec
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .endpoints
                .clone();
            dialers.retain(|addr, task| {
                let keep = endpoints.contains(addr);
                if !keep {
                    task.abort();
                    if let Some(remote) = peer
                        .remotes
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&addr.to_string())
                    {
                        remote.cut_off();
                    }
                }
                keep
            });
            // A finished dialer stays in the map: its gateway's session was replaced by a newer
            // dial's, which carries on.
            for addr in endpoints {
                dialers.entry(addr).or_insert_with(|| {
                    tokio::spawn(Arc::clone(&self).dial_gateway(
                        Arc::clone(&peer),
                        addr,
                        Arc::clone(&config),
                    ))
                });
            }
            if !dialers.is_empty() && dialers.values().all(|t| t.is_finished()) {
                return; // every gateway's session was replaced by a newer dial's
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for task in dialers.values() {
            task.abort();
        }
    }

    /// Dials gateway `addr` of `peer` and keeps its Sync session and Tunnels up, with backoff
    /// between attempts; returns once a newer dial's session replaced this one's.
    async fn dial_gateway(
        self: Arc<Self>,
        peer: Arc<Peer>,
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let key = addr.to_string();
        loop {
            let name = peer.name();
            if self.peer(&name).is_none_or(|p| !Arc::ptr_eq(&p, &peer)) {
                return; // the peer was removed
            }
            let Some(remote) = peer.remote_or_insert(&key) else {
                tracing::error!(peer = %name, %addr, "more than {MAX_GATEWAYS} gateways listed for the mesh peer; not dialled");
                return;
            };
            let channel = crate::transport::channel(addr, Arc::clone(&config));
            let mut client = MeshLinkClient::new(channel);
            let (tx, rx) = mpsc::channel(64);
            let started = tokio::time::Instant::now();
            let dial = random_u64();
            let gateway = self.gateway_name();
            let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            dial_metadata(&mut request, dial, &gateway);
            match client.sync(request).await {
                Err(e) => {
                    tracing::debug!(peer = %name, %addr, error = %e, "mesh peer not reachable");
                }
                Ok(response) => {
                    let inbound = response.into_inner();
                    // Ends our side of every lane's Tunnel when this attempt ends: hyper keeps
                    // polling a request body after its response is dropped, and an old
                    // connection's body would go on taking packets from the queues.
                    let (attempt, attempt_ended) = watch::channel(());
                    // The latency lane shares the Sync session's connection (neither carries
                    // bulk batches; without a latency lane, bulk lane 0 does); every other lane
                    // dials its own, with this dial's certificate (a re-dial after a rotation
                    // re-dials them all). Each gateway of the peer gets its own set. Aborted
                    // with this dial's future too (a removed peer, a replaced dialer), so no
                    // lane outlives its session and keeps an old connection open.
                    let latency = self.data_plane.latency_lane;
                    let mut lanes: Vec<_> = (0..self.data_plane.lanes)
                        .map(Lane::Bulk)
                        .chain(latency.then_some(Lane::Latency))
                        .map(|lane| {
                            let shares_sync = match lane {
                                Lane::Latency => true,
                                Lane::Bulk(n) => n == 0 && !latency,
                            };
                            let client = if shares_sync {
                                client.clone()
                            } else {
                                MeshLinkClient::new(crate::transport::channel(
                                    addr,
                                    Arc::clone(&config),
                                ))
                            };
                            AbortOnDrop(tokio::spawn(Arc::clone(&self).lane(
                                Arc::clone(&peer),
                                Arc::clone(&remote),
                                client,
                                lane,
                                (dial, gateway.clone()),
                                attempt_ended.clone(),
                            )))
                        })
                        .collect();
                    let result = self
                        .session(
                            Arc::clone(&peer),
                            Arc::clone(&remote),
                            &name,
                            Box::pin(inbound),
                            tx,
                        )
                        .await;
                    drop(attempt);
                    if matches!(result, Err(SessionError::Replaced)) {
                        // Make before break: what the peer sent on these lanes before it
                        // switched to the new session's is still on its way; each lane ends
                        // once the peer ends its side.
                        let finished =
                            futures::future::join_all(lanes.iter_mut().map(|l| &mut l.0));
                        let _ = tokio::time::timeout(REPLACED_LANES_DRAIN, finished).await;
                    }
                    drop(lanes);
                    match result {
                        // A newer session took over (a re-dial after a certificate rotation, or
                        // the peer removed): its dialer carries on, this one stops.
                        Err(SessionError::Replaced) => return,
                        Err(e) => {
                            tracing::warn!(peer = %name, %addr, error = %e, "mesh session ended")
                        }
                        Ok(()) => {}
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One lane's Tunnel from the dialing side, redialled while the session lasts; once it has
    /// ended, reads what the peer still sends and returns when the peer ends its side.
    async fn lane(
        self: Arc<Self>,
        peer: Arc<Peer>,
        remote: Arc<Remote>,
        mut client: MeshLinkClient<tonic::transport::Channel>,
        lane: Lane,
        (dial, gateway): (u64, String),
        attempt: watch::Receiver<()>,
    ) {
        let lane_name = match lane {
            Lane::Latency => Lane::LATENCY_NAME.to_owned(),
            Lane::Bulk(n) => n.to_string(),
        };
        // No new Tunnel once the session ended (the accepting side would take it for a live one).
        while attempt.has_changed().is_ok() {
            let mut ended = attempt.clone();
            let out = Self::outgoing(&remote, lane)
                .take_until(async move { while ended.changed().await.is_ok() {} })
                .map(|records| pb::PacketBatch { seq: 0, records });
            let mut request = Request::new(out);
            request.metadata_mut().insert(
                LANE_METADATA,
                lane_name.parse().expect("a lane name is valid metadata"),
            );
            dial_metadata(&mut request, dial, &gateway);
            match client.tunnel(request).await {
                Ok(resp) => {
                    let _serving = (lane == Lane::Latency).then(|| LatencyTunnel::new(&remote));
                    let mut inbound = resp.into_inner();
                    while let Some(Ok(batch)) = inbound.next().await {
                        self.receive_batch(&peer, &remote, &batch.records);
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.name(), lane = %lane_name, error = %e, "mesh lane not up");
                }
            }
            if attempt.has_changed().is_err() {
                return; // the session ended: no pause before returning
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The gRPC service peers dial.
    pub fn service(self: &Arc<Self>) -> mesh_link_server::MeshLinkServer<Service> {
        mesh_link_server::MeshLinkServer::new(Service {
            link: Arc::clone(self),
        })
        .max_decoding_message_size(8 << 20)
    }
}

/// Counts a session as up while it lives; the peer's import view may change with it (which of
/// its gateways stands for it).
struct SessionUp(Arc<Remote>, watch::Sender<u64>);

impl SessionUp {
    fn new(remote: &Arc<Remote>, imports: &watch::Sender<u64>) -> Self {
        remote.sessions_up.fetch_add(1, Ordering::Relaxed);
        imports.send_modify(|v| *v += 1);
        Self(Arc::clone(remote), imports.clone())
    }
}

impl Drop for SessionUp {
    fn drop(&mut self) {
        self.0.sessions_up.fetch_sub(1, Ordering::Relaxed);
        self.1.send_modify(|v| *v += 1);
    }
}

/// Counts a Tunnel as serving the latency lane while it lives.
struct LatencyTunnel(Arc<AtomicUsize>);

impl LatencyTunnel {
    fn new(remote: &Remote) -> Self {
        remote.latency_tunnels.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(&remote.latency_tunnels))
    }
}

impl Drop for LatencyTunnel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Names the dial and the dialing gateway on a Sync or Tunnel request.
fn dial_metadata<T>(request: &mut Request<T>, dial: u64, gateway: &str) {
    request.metadata_mut().insert(
        DIAL_METADATA,
        dial.to_string()
            .parse()
            .expect("a number is valid metadata"),
    );
    if let Ok(value) = gateway.parse() {
        request.metadata_mut().insert(GATEWAY_METADATA, value);
    }
}

/// Which gateway of the peer a Sync or Tunnel request comes from: the name it gave, or (a
/// dialer that gives none) its connection's address.
fn remote_key<T>(req: &Request<T>, remote: SocketAddr) -> String {
    req.metadata()
        .get(GATEWAY_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(|| remote.ip().to_string(), |v| format!("gw/{v}"))
}

/// Which dial of the peer a Sync or Tunnel request belongs to: the dialer's `weir-dial`
/// number, or (a dialer that sends none) the connection's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DialKey {
    Dial(u64),
    Connection(SocketAddr),
}

impl DialKey {
    fn of<T>(req: &Request<T>, remote: SocketAddr) -> Self {
        req.metadata()
            .get(DIAL_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map_or(Self::Connection(remote), Self::Dial)
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send(
    out: &mpsc::Sender<pb::SyncFrame>,
    kind: pb::sync_frame::Kind,
) -> Result<(), SessionError> {
    out.send(pb::SyncFrame { kind: Some(kind) })
        .await
        .map_err(|_| SessionError::Ended)
}

pub(crate) fn frame_to_wire(f: &Frame<Export>) -> pb::sync_frame::Kind {
    use pb::sync_frame::Kind;
    match f {
        Frame::Snapshot {
            incarnation,
            version,
        } => Kind::Snapshot(pb::Snapshot {
            incarnation: *incarnation,
            version: *version,
        }),
        Frame::Synced {
            incarnation,
            version,
        } => Kind::Synced(pb::Synced {
            incarnation: *incarnation,
            version: *version,
        }),
        Frame::Delta(d) => Kind::Delta(pb::Delta {
            incarnation: d.incarnation,
            base_version: d.base_version,
            version: d.version,
            upsert: d.upsert.iter().map(|(n, e)| e.to_wire(n)).collect(),
            remove: d.remove.clone(),
        }),
    }
}

pub(crate) fn delta_from_wire(d: &pb::Delta) -> Result<Delta<Export>, String> {
    let upsert = d
        .upsert
        .iter()
        .map(|r| Export::try_from(r).map(|e| (r.name.clone(), e)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(Delta {
        incarnation: d.incarnation,
        base_version: d.base_version,
        version: d.version,
        upsert,
        remove: d.remove.clone(),
    })
}

/// Builds one batch of records; callers flush it when the source has nothing more.
///
/// A record can be built in place: the reader reads the packet into [`BatchBuilder::spare`]
/// behind room for its header, then [`seal`](BatchBuilder::seal)s it (or
/// [`discard`](BatchBuilder::discard)s it). Records read back to back lie back to back in one
/// buffer, which becomes the message body without being copied again.
#[derive(Default)]
pub struct BatchBuilder {
    /// The sealed records, then possibly one being read, then spare capacity.
    buf: BytesMut,
    packets: u64,
}

impl BatchBuilder {
    /// Appends a copy of `packet` as a record.
    pub fn push(&mut self, identity: u32, offload: &Offload, packet: &[u8]) {
        encode_record_with(&mut self.buf, identity, offload, packet);
        self.packets += 1;
    }

    /// Where the next record starts.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The bytes so far (sealed records and the one being read).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer to append the next record to, with at least `room` bytes of spare capacity.
    /// A new batch starts with room for a whole batch and one more read, so it never moves
    /// while it is filled.
    pub fn spare(&mut self, room: usize) -> &mut BytesMut {
        let spare = self.buf.capacity() - self.buf.len();
        if self.buf.is_empty() && spare < BATCH_BYTES + room {
            self.buf = BytesMut::with_capacity(ARENA_BYTES.max(BATCH_BYTES + room));
        } else if spare < room {
            self.buf.reserve(room);
        }
        &mut self.buf
    }

    /// Makes the bytes from `start` (header room, then a packet) a record of `identity` with
    /// `offload`.
    pub fn seal(&mut self, start: usize, identity: u32, offload: &Offload) {
        let len = self.buf.len() - start - RECORD_HEADER_LEN;
        write_record_header(&mut self.buf[start..], len, identity, offload);
        self.packets += 1;
    }

    /// Drops the bytes from `start` (a record read in place that is not sent, or not here).
    pub fn discard(&mut self, start: usize) {
        self.buf.truncate(start);
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// The batch so far and its packet count; the builder starts over.
    pub fn take(&mut self) -> (Bytes, u64) {
        let packets = std::mem::take(&mut self.packets);
        (self.buf.split().freeze(), packets)
    }
}

/// The `MeshLink` gRPC service.
pub struct Service {
    link: Arc<Link>,
}

impl Service {
    fn authenticated<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(String, SocketAddr, Arc<Peer>), Status> {
        let connection = req
            .extensions()
            .get::<PeerCluster>()
            .ok_or_else(|| Status::unauthenticated("no authenticated peer"))?;
        let certified = connection.name.clone();
        let peer = self
            .link
            .peer(&certified)
            .ok_or_else(|| Status::permission_denied(format!("no MeshPeer named {certified}")))?;
        Ok((certified, connection.remote, peer))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl mesh_link_server::MeshLink for Service {
    type SyncStream = BoxStream<pb::SyncFrame>;
    type TunnelStream = BoxStream<pb::PacketBatch>;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SyncFrame>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (certified, addr, peer) = self.authenticated(&req)?;
        let remote = peer.remote_for_request(&remote_key(&req, addr))?;
        remote
            .server_dial
            .send_replace(Some(DialKey::of(&req, addr)));
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let link = Arc::clone(&self.link);
        tokio::spawn(async move {
            match link
                .session(peer, remote, &certified, Box::pin(inbound), tx)
                .await
            {
                Err(SessionError::Replaced) | Ok(()) => {}
                Err(e) => tracing::warn!(peer = %certified, error = %e, "mesh session ended"),
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        )))
    }

    async fn tunnel(
        &self,
        req: Request<Streaming<pb::PacketBatch>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let (_, addr, peer) = self.authenticated(&req)?;
        let remote = peer.remote_for_request(&remote_key(&req, addr))?;
        let lane = match req.metadata().get(LANE_METADATA).map(|v| v.to_str()) {
            None => Lane::Bulk(0),
            Some(Ok(Lane::LATENCY_NAME)) => Lane::Latency,
            Some(v) => Lane::Bulk(
                v.ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|&l| l < MAX_LANES)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{LANE_METADATA} must be a lane number below {MAX_LANES} or {}",
                            Lane::LATENCY_NAME
                        ))
                    })?,
            ),
        };
        let dial = DialKey::of(&req, addr);
        fn superseded(now: Option<DialKey>, dial: DialKey) -> bool {
            now != Some(dial)
        }
        fn cut_off(now: Option<DialKey>, _: DialKey) -> bool {
            now.is_none()
        }
        // What we send ends when the gateway opens a session of another dial (it re-dialled):
        // the batches still queued go out on the new dial's Tunnels. What it sends is read until
        // it ends this Tunnel itself, which it does once its new session is up; reading on
        // until then loses nothing it sent before it switched (make before break). Both end at
        // once when the peer is removed (cut off).
        let ends_when = |remote: &Remote, ends: fn(Option<DialKey>, DialKey) -> bool| {
            let mut sessions = remote.server_dial.subscribe();
            sessions.mark_unchanged();
            async move {
                while sessions.changed().await.is_ok() {
                    if ends(*sessions.borrow(), dial) {
                        return;
                    }
                }
            }
        };
        let mut inbound = Box::pin(req.into_inner().take_until(ends_when(&remote, cut_off)));
        let link = Arc::clone(&self.link);
        let (receiving, from) = (Arc::clone(&peer), Arc::clone(&remote));
        tokio::spawn(async move {
            while let Some(Ok(batch)) = inbound.next().await {
                link.receive_batch(&receiving, &from, &batch.records);
            }
        });
        let serving = (lane == Lane::Latency).then(|| LatencyTunnel::new(&remote));
        let out = Link::outgoing(&remote, lane)
            .take_until(ends_when(&remote, superseded))
            .map(move |records| {
                // Held as long as the stream is (the closure lives in it).
                let _ = &serving;
                Ok(pb::PacketBatch { seq: 0, records })
            });
        Ok(Response::new(Box::pin(out)))
    }
}
