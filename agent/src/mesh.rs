//! The mesh gateway role of the agent: on a node labelled `mesh.weir.io/gateway=true` (with
//! `--mesh-cert`/`--mesh-key`), the agent serves the mesh link over mTLS, dials the MeshPeers
//! whose name sorts after our cluster's, exports what each MeshPeer's export selector chooses,
//! carries packets between its TUN device and the peers, and feeds what peers export to the
//! policy compiler as namespaces `<peer>/<namespace>` and pods labelled `weir.io/cluster: <peer>`.
//! Other nodes route peers' prefixes over the cluster's live gateway nodes (an ECMP route hashed
//! by L4, see [`ecmp_routes`]; with the VXLAN overlay, one gateway: [`gateway_routes`]) and watch
//! a gateway's merged import over `MeshImport` (see [`weir_mesh::fanout`]) to enforce policy on
//! remote identities at their own pods ([`Mesh`] is either role).
//!
//! Active/active: a cluster may label several Nodes as gateways. Each dials (or is dialled by)
//! every gateway of every peer (a MeshPeer lists all of them in `endpoints`); gateways keep no
//! per-flow state, so any of them carries any flow, and a gateway that dies leaves the nodes'
//! ECMP routes (liveness watches, [`weir_mesh::fanout`]) and the peers' gateways' choice
//! ([`weir_mesh::link`]) within a second.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::Args;
use ipnet::IpNet;
use tokio::sync::watch;
use weir_mesh::{
    confine::PeerBounds,
    export::{EndpointExport, Export, IdentityExport, endpoint_name, identity_name},
    fanout::{IMPORT_PORT, ImportServer, ImportWatcher},
    link::{ImportView, Link, PeerSpec},
    sync::Limits,
    tls::{self, ReloadingIdentity, TrustStore},
    transport,
};
use weir_policy::{
    model::{
        CLUSTER_LABEL, ClusterState, GATEWAY_NODE_LABEL, Namespace, ObjectKey, ObjectMeta, Pod,
        PodIp, PodStatus, ValidMeshPeer,
    },
    selector::Selector,
};

use crate::{
    mesh_forward::{DataPlaneArgs, Forwarder, TunDeliver},
    mesh_thread::MeshThread,
    mesh_tun::{Tun, TunError},
    routes::{MESH_ROUTE_PROTOCOL, NodeRoutes, RoutesError, hash_multipath_by_l4},
};

/// Flags of the gateway role.
#[derive(Args, Debug, Clone)]
pub struct MeshArgs {
    /// Mesh gateways: this cluster's certificate (PEM, with its chain), naming the cluster in a
    /// URI SAN `spiffe://<trust domain>/cluster/<name>`. Re-read when the file changes.
    #[arg(long, env = "WEIR_MESH_CERT")]
    pub mesh_cert: Option<PathBuf>,
    /// Mesh gateways: the certificate's private key (PEM).
    #[arg(long, env = "WEIR_MESH_KEY")]
    pub mesh_key: Option<PathBuf>,
    /// Mesh gateways: the CA bundle (PEM) this cluster's certificate must chain to, at start
    /// and after every rotation; a rotated certificate from another CA is refused and the
    /// previous one stays in use. Without it only the cluster name is checked on rotation.
    #[arg(long, env = "WEIR_MESH_CA")]
    pub mesh_ca: Option<PathBuf>,
    /// Mesh gateways: where peers' gateways connect (TLS 1.3 only; there is no plaintext port).
    #[arg(long, env = "WEIR_MESH_LISTEN", default_value = "0.0.0.0:4243")]
    pub mesh_listen: SocketAddr,
    #[command(flatten)]
    pub data_plane: DataPlaneArgs,
    /// The port of a gateway's merged import for the other nodes of its cluster (`MeshImport`,
    /// served on the gateway Node's InternalIP to the cluster's Nodes' InternalIPs only); other
    /// nodes dial it on their gateways' InternalIP.
    #[arg(long, env = "WEIR_MESH_IMPORT_PORT", default_value_t = IMPORT_PORT)]
    pub mesh_import_port: u16,
}

/// Why the gateway role could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(
        "Node {node} is a mesh gateway ({GATEWAY_NODE_LABEL}=true) but --mesh-cert and --mesh-key (WEIR_MESH_CERT, WEIR_MESH_KEY) are not both set"
    )]
    NoCertificate { node: String },
    #[error("mesh certificate: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("mesh certificate: {0}")]
    Name(#[source] rustls::Error),
    #[error("listening for mesh peers on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("routes to mesh peers via the gateways: {0}")]
    Routes(#[from] RoutesError),
    #[error(
        "serving the mesh import to the cluster's nodes on {addr}: {source} (the gateway serves it on its Node's InternalIP; check status.addresses)"
    )]
    ImportListen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the mesh gateway's own thread: {0} (or run with --mesh-own-thread false)")]
    Thread(#[source] io::Error),
    #[error("the mesh gateway's start failed on its own thread: {0}")]
    ThreadStart(String),
}

/// Whether the Node object `node` is labelled as a mesh gateway.
pub fn is_gateway(state: &ClusterState, node: &str) -> bool {
    state
        .nodes
        .get(node)
        .and_then(|n| n.metadata.labels.get(GATEWAY_NODE_LABEL))
        .is_some_and(|v| v == "true")
}

/// The MeshPeers that validate; the others are logged with what to fix.
fn valid_peers(state: &ClusterState) -> Vec<ValidMeshPeer> {
    state
        .mesh_peers
        .values()
        .filter_map(|p| match p.validate() {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, "MeshPeer ignored: no session, no import, no route");
                None
            }
        })
        .collect()
}

/// This cluster's pod prefixes: every Node's pod CIDRs.
fn cluster_prefixes(state: &ClusterState) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for node in state.nodes.values() {
        let cidrs = if node.spec.pod_cidrs.is_empty() {
            node.spec.pod_cidr.iter().cloned().collect()
        } else {
            node.spec.pod_cidrs.clone()
        };
        out.extend(
            cidrs
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc())),
        );
    }
    out.into_iter().collect()
}

/// A Node's InternalIPs.
fn internal_ips(state: &ClusterState, node: &str) -> Vec<IpAddr> {
    state
        .nodes
        .get(node)
        .into_iter()
        .flat_map(|n| n.status.addresses.iter())
        .filter(|a| a.kind == "InternalIP")
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
        .collect()
}

/// What each valid MeshPeer may claim: its prefixes, with ours and the other peers' (the
/// confinement checks of the gateway and of the nodes watching its import).
fn peer_bounds(peers: &[ValidMeshPeer], ours: &[IpNet]) -> BTreeMap<String, PeerBounds> {
    peers
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                PeerBounds {
                    allowed: p.allowed_prefixes.clone(),
                    ours: ours.to_vec(),
                    third: peers
                        .iter()
                        .filter(|o| o.name != p.name)
                        .flat_map(|o| o.allowed_prefixes.iter().copied())
                        .collect(),
                },
            )
        })
        .collect()
}

/// Where a node that is not a gateway watches the merged import: every gateway Node's
/// InternalIP at `port`, by node name; none while no MeshPeer is valid.
pub fn gateway_import_addrs(state: &ClusterState, node: &str, port: u16) -> Vec<SocketAddr> {
    if is_gateway(state, node) || valid_peers(state).is_empty() {
        return Vec::new();
    }
    state
        .nodes
        .keys()
        .filter(|name| is_gateway(state, name))
        .flat_map(|name| internal_ips(state, name))
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// The InternalIPs of the cluster's gateway Nodes.
fn gateway_ips(state: &ClusterState) -> Vec<IpAddr> {
    state
        .nodes
        .keys()
        .filter(|name| is_gateway(state, name))
        .flat_map(|name| internal_ips(state, name))
        .collect()
}

/// ECMP routes of a node that is not a gateway: every MeshPeer's allowed prefixes via every
/// gateway whose import address is in `live` (same family); via all of them while none is live
/// (at start, or when every gateway is down: the route stays, as for any node that is down).
/// Empty on gateways (they route into the TUN).
pub fn ecmp_routes(
    state: &ClusterState,
    node: &str,
    live: &BTreeSet<IpAddr>,
) -> BTreeMap<IpNet, Vec<IpAddr>> {
    let mut routes = BTreeMap::new();
    if is_gateway(state, node) {
        return routes;
    }
    let gateways = gateway_ips(state);
    for peer in valid_peers(state) {
        for prefix in peer.allowed_prefixes {
            let family: Vec<IpAddr> = gateways
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == matches!(prefix, IpNet::V4(_)))
                .collect();
            let up: Vec<IpAddr> = family
                .iter()
                .copied()
                .filter(|a| live.contains(a))
                .collect();
            routes.insert(prefix, if up.is_empty() { family } else { up });
        }
    }
    routes
}

/// Routes of a node that is not a gateway when peers' prefixes go through the VXLAN overlay
/// (one next hop each): every MeshPeer's allowed prefixes via the first gateway node's
/// InternalIP of the same family. Empty on gateways (they route into the TUN).
pub fn gateway_routes(state: &ClusterState, node: &str) -> BTreeMap<IpNet, IpAddr> {
    let mut routes = BTreeMap::new();
    if is_gateway(state, node) {
        return routes;
    }
    let gateways: Vec<IpAddr> = state
        .nodes
        .iter()
        .filter(|(name, _)| is_gateway(state, name))
        .flat_map(|(_, n)| n.status.addresses.iter())
        .filter(|a| a.kind == "InternalIP")
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
        .collect();
    for peer in valid_peers(state) {
        for prefix in peer.allowed_prefixes {
            if let Some(via) = gateways
                .iter()
                .find(|a| a.is_ipv4() == matches!(prefix, IpNet::V4(_)))
            {
                routes.insert(prefix, *via);
            }
        }
    }
    routes
}

/// The cluster state with every peer's import added: namespaces `<peer>/<namespace>` and one
/// pod per exported address, both labelled `weir.io/cluster: <peer>` (set here, by the
/// receiver; the link refused any such label from the peer).
pub fn merge_imports(state: &ClusterState, imports: &[Arc<ImportView>]) -> ClusterState {
    let mut out = state.clone();
    for view in imports {
        let ns_key = |ns: &str| format!("{}/{ns}", view.cluster);
        for identity in view.identities.values() {
            let name = ns_key(&identity.namespace);
            out.namespaces.entry(name.clone()).or_insert_with(|| {
                let mut labels = identity.namespace_labels.clone();
                labels.insert(CLUSTER_LABEL.to_owned(), view.cluster.clone());
                Namespace {
                    metadata: ObjectMeta {
                        name,
                        namespace: None,
                        labels,
                    },
                    rejected: None,
                }
                .into()
            });
        }
        for (addr, id) in &view.endpoints {
            // An endpoint whose identity is not (yet) exported has no labels to enforce by.
            let Some(identity) = view.identities.get(id) else {
                continue;
            };
            let namespace = ns_key(&identity.namespace);
            let mut labels = identity.pod_labels.clone();
            labels.insert(CLUSTER_LABEL.to_owned(), view.cluster.clone());
            let name = addr.to_string();
            out.pods.insert(
                ObjectKey::new(namespace.clone(), name.clone()),
                Pod {
                    metadata: ObjectMeta {
                        name,
                        namespace: Some(namespace),
                        labels,
                    },
                    spec: Default::default(),
                    status: PodStatus {
                        pod_ips: vec![PodIp {
                            ip: addr.to_string(),
                        }],
                        phase: Some("Running".into()),
                    },
                }
                .into(),
            );
        }
    }
    out
}

/// An exported label set: namespace, pod labels, namespace labels.
type LabelSetKey = (String, BTreeMap<String, String>, BTreeMap<String, String>);

/// Session-scoped ids of the label sets we export, stable while the agent runs.
#[derive(Default)]
struct ExportIds {
    ids: BTreeMap<LabelSetKey, u32>,
    next: u32,
}

impl ExportIds {
    fn id(&mut self, key: LabelSetKey) -> u32 {
        let next = &mut self.next;
        *self.ids.entry(key).or_insert_with(|| {
            *next += 1;
            weir_common::IDENTITY_FIRST_POD + *next - 1
        })
    }
}

/// What we export to a peer whose export selector is `selector`: the identities and pod
/// addresses of local pods in matching namespaces (addresses from `status.podIPs`).
fn exports_for(
    state: &ClusterState,
    selector: &Selector,
    ids: &mut ExportIds,
) -> BTreeMap<String, Export> {
    let mut entries = BTreeMap::new();
    for (key, pod) in &state.pods {
        if pod.spec.host_network || pod.status.terminated() {
            continue;
        }
        let mut ns_labels = state.namespace_labels(&key.namespace);
        // Imported namespaces are never re-exported (no transit).
        if ns_labels.contains_key(CLUSTER_LABEL) && key.namespace.contains('/') {
            continue;
        }
        if !selector.matches(&ns_labels) {
            continue;
        }
        // The receiver owns this label; sending it would get the whole delta refused.
        ns_labels.remove(CLUSTER_LABEL);
        let mut pod_labels = pod.metadata.labels.clone();
        pod_labels.remove(CLUSTER_LABEL);
        let id = ids.id((key.namespace.clone(), pod_labels.clone(), ns_labels.clone()));
        entries.insert(
            identity_name(id),
            Export::Identity(IdentityExport {
                id,
                namespace: key.namespace.clone(),
                pod_labels,
                namespace_labels: ns_labels,
            }),
        );
        for ip in &pod.status.pod_ips {
            if let Ok(addr) = ip.ip.trim().parse::<IpAddr>() {
                let addr = addr.to_canonical();
                entries.insert(
                    endpoint_name(&addr),
                    Export::Endpoint(EndpointExport { addr, identity: id }),
                );
            }
        }
    }
    entries
}

/// The mesh role of this node's agent.
pub enum Mesh {
    /// A gateway: talks to peers, serves its merged import to the cluster's nodes.
    Gateway(Arc<Gateway>),
    /// Any other node: watches a gateway's merged import.
    Node(MeshNode),
}

/// A node that is not a gateway: the import it watches and the gateways it may watch.
pub struct MeshNode {
    node: String,
    port: u16,
    watcher: Arc<ImportWatcher>,
    gateways: watch::Sender<Vec<SocketAddr>>,
    /// The state the ECMP routes follow (with the gateways' liveness), when this node keeps them.
    routed_state: Option<watch::Sender<Arc<ClusterState>>>,
}

/// What [`ecmp_routes`] reads of the cluster: its Nodes and MeshPeers (a copy of those follows
/// every change of them; a copy of the whole cluster per change of anything would cost what the
/// cluster's size does).
fn routing_objects(state: &ClusterState) -> ClusterState {
    ClusterState {
        nodes: state.nodes.clone(),
        mesh_peers: state.mesh_peers.clone(),
        ..ClusterState::default()
    }
}

/// Keeps the node's ECMP routes to peers' prefixes over the live gateways, following the state
/// (MeshPeers, gateway Nodes) and the gateways' liveness.
async fn keep_ecmp_routes(
    node: String,
    mut routes: NodeRoutes,
    mut state: watch::Receiver<Arc<ClusterState>>,
    mut live: watch::Receiver<BTreeSet<SocketAddr>>,
) {
    loop {
        let current = Arc::clone(&state.borrow_and_update());
        let up: BTreeSet<IpAddr> = live.borrow_and_update().iter().map(|a| a.ip()).collect();
        routes
            .sync_multipath(&ecmp_routes(&current, &node, &up))
            .await;
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            changed = live.changed() => if changed.is_err() { return },
        }
    }
}

impl MeshNode {
    fn observe(&self, state: &ClusterState) {
        if let Some(routed) = &self.routed_state {
            routed.send_if_modified(|current| {
                let changed =
                    current.nodes != state.nodes || current.mesh_peers != state.mesh_peers;
                if changed {
                    *current = Arc::new(routing_objects(state));
                }
                changed
            });
        }
        let peers = valid_peers(state);
        self.watcher
            .set_peers(peer_bounds(&peers, &cluster_prefixes(state)));
        let addrs = gateway_import_addrs(state, &self.node, self.port);
        self.gateways.send_if_modified(|current| {
            let changed = *current != addrs;
            if changed {
                *current = addrs;
            }
            changed
        });
    }

    pub fn watcher(&self) -> &Arc<ImportWatcher> {
        &self.watcher
    }
}

impl Mesh {
    /// Starts this node's role from the first state: the gateway role on a gateway Node, the
    /// watch of a gateway's import otherwise. Either way the import persisted in `state_dir` is
    /// restored first, so the first state the datapath reconciles holds it. With `ecmp_routes`
    /// (native routing), a node that is not a gateway keeps its routes to peers' prefixes itself:
    /// ECMP over the live gateways ([`ecmp_routes`]).
    pub async fn start(
        args: &MeshArgs,
        state: &ClusterState,
        node: &str,
        state_dir: &Path,
        ecmp_routes: bool,
    ) -> Result<Self, MeshError> {
        if let Some(gateway) = Gateway::start_if_gateway(args, state, node, state_dir).await? {
            gateway.observe(state).await;
            return Ok(Mesh::Gateway(gateway));
        }
        let watcher = ImportWatcher::restore(
            node,
            Some(state_dir.join("mesh-import.json")),
            Limits::default(),
        );
        let (gateways, rx) = watch::channel(Vec::new());
        let routed_state = if ecmp_routes {
            if let Err(e) = hash_multipath_by_l4() {
                // Flows still spread, by addresses only; nothing is opened or dropped by it.
                tracing::warn!(error = %e, "mesh routes hash by addresses only");
            }
            let routes = NodeRoutes::open_with(MESH_ROUTE_PROTOCOL).await?;
            let (tx, states) = watch::channel(Arc::new(routing_objects(state)));
            tokio::spawn(keep_ecmp_routes(
                node.to_owned(),
                routes,
                states,
                watcher.live_gateways(),
            ));
            Some(tx)
        } else {
            None
        };
        let mesh = MeshNode {
            node: node.to_owned(),
            port: args.mesh_import_port,
            watcher: Arc::clone(&watcher),
            gateways,
            routed_state,
        };
        mesh.observe(state);
        tokio::spawn(Arc::clone(&watcher).watch_liveness(rx.clone()));
        tokio::spawn(watcher.run(rx));
        Ok(Mesh::Node(mesh))
    }

    /// Follows a new cluster state (MeshPeers, Nodes, exports).
    pub async fn observe(&self, state: &ClusterState) {
        match self {
            Mesh::Gateway(g) => g.observe(state).await,
            Mesh::Node(n) => n.observe(state),
        }
    }

    /// Notified when the imports may have changed.
    pub fn subscribe_imports(&self) -> watch::Receiver<u64> {
        match self {
            Mesh::Gateway(g) => g.subscribe_imports(),
            Mesh::Node(n) => n.watcher.subscribe(),
        }
    }

    /// Every peer's import this node enforces by.
    pub fn imports(&self) -> Vec<Arc<ImportView>> {
        match self {
            Mesh::Gateway(g) => g.imports(),
            Mesh::Node(n) => n.watcher.views(),
        }
    }

    /// What mesh peers export, as the objects the compiler sees besides the source's (the
    /// reconcile task merges them: [`crate::merged_state`]).
    pub fn imported(&self) -> ClusterState {
        merge_imports(&ClusterState::default(), &self.imports())
    }
}

/// Packets the gateway did not send, by reason.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    /// From a local address we do not export to the destination's peer.
    pub unexported_source: AtomicU64,
    /// To an address no MeshPeer's prefixes hold.
    pub no_peer: AtomicU64,
    pub malformed: AtomicU64,
}

/// A running gateway.
pub struct Gateway {
    link: Arc<Link>,
    trust: Arc<TrustStore>,
    identity: Arc<ReloadingIdentity>,
    tun: Arc<Tun>,
    pub counters: Arc<GatewayCounters>,
    state: tokio::sync::Mutex<GatewayState>,
    /// Per peer: our exported address → id (the sending gateway tags records with it).
    exported: Arc<Mutex<HashMap<String, HashMap<IpAddr, u32>>>>,
    /// The merged import, served to the cluster's other nodes.
    import_server: Arc<ImportServer>,
    /// The runtime the gateway's tasks run on: its own thread's ([`MeshThread`]), or the
    /// agent's. Dials started later (a new peer, a rotation) are spawned here too.
    runtime: tokio::runtime::Handle,
    /// The gateway's own thread, when it has one; it ends with the gateway.
    _thread: Option<MeshThread>,
}

#[derive(Default)]
struct GatewayState {
    dialing: BTreeMap<String, tokio::task::JoinHandle<()>>,
    routed: BTreeSet<IpNet>,
    ids: ExportIds,
}

impl Gateway {
    /// Starts the gateway role if `node` is labelled as a gateway in `state`: on a thread of its
    /// own ([`MeshThread`]) if `--mesh-own-thread` resolves to it for the CPUs the agent may run
    /// on, else on the calling runtime.
    pub async fn start_if_gateway(
        args: &MeshArgs,
        state: &ClusterState,
        node: &str,
        state_dir: &Path,
    ) -> Result<Option<Arc<Self>>, MeshError> {
        if !is_gateway(state, node) {
            return Ok(None);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let own_thread = args.data_plane.mesh_own_thread.resolve(cpus);
        tracing::info!(
            mode = ?args.data_plane.mesh_own_thread,
            cpus,
            own_thread,
            "mesh gateway runtime chosen"
        );
        if !own_thread {
            return Self::start_here(args, state, node, state_dir, None).await;
        }
        let thread = MeshThread::start(Duration::from_micros(args.data_plane.sched_slice_us))
            .map_err(MeshError::Thread)?;
        let (args, state, node, state_dir) = (
            args.clone(),
            state.clone(),
            node.to_owned(),
            state_dir.to_owned(),
        );
        let handle = thread.handle().clone();
        // Every task the start spawns (listeners, the TUN reader, sessions) lands on the
        // thread's runtime, which the gateway then keeps.
        handle
            .spawn(async move {
                Self::start_here(&args, &state, &node, &state_dir, Some(thread)).await
            })
            .await
            .map_err(|e| MeshError::ThreadStart(e.to_string()))?
    }

    /// Starts the gateway on the runtime this runs on.
    async fn start_here(
        args: &MeshArgs,
        state: &ClusterState,
        node: &str,
        state_dir: &Path,
        thread: Option<MeshThread>,
    ) -> Result<Option<Arc<Self>>, MeshError> {
        let (Some(cert), Some(key)) = (&args.mesh_cert, &args.mesh_key) else {
            return Err(MeshError::NoCertificate {
                node: node.to_owned(),
            });
        };
        transport::set_max_frame_size(args.data_plane.mesh_h2_frame_bytes);
        let provider = tls::provider();
        let mut identity = ReloadingIdentity::load(cert, key, Arc::clone(&provider))?;
        if let Some(ca) = &args.mesh_ca {
            identity = identity.with_anchors(ca)?;
        }
        let identity = Arc::new(identity);
        let cluster = identity.cluster().map_err(MeshError::Name)?;
        tls::spawn_reloader(Arc::clone(&identity), Duration::from_secs(2));
        tracing::info!(%cluster, node, "this node is a mesh gateway");
        let trust = Arc::new(TrustStore::default());
        let tun = Arc::new(
            Tun::open(
                args.data_plane.mesh_offload,
                usize::from(args.data_plane.mesh_tun_queues),
            )
            .await?,
        );
        let link = Link::with_data_plane(
            cluster.clone(),
            Limits::default(),
            Some(state_dir.to_owned()),
            TunDeliver(Arc::clone(&tun)),
            args.data_plane.data_plane(),
        );
        link.set_gateway_name(node);
        let config = tls::server_config(Arc::clone(&identity), Arc::clone(&trust), provider)?;
        let listener = tokio::net::TcpListener::bind(args.mesh_listen)
            .await
            .map_err(|source| MeshError::Listen {
                addr: args.mesh_listen,
                source,
            })?;
        let incoming = transport::incoming(listener, Arc::new(config));
        let service = link.service();
        tokio::spawn(async move {
            if let Err(e) = transport::server()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(error = %e, "the mesh listener stopped");
            }
        });
        let import_server = ImportServer::new(Limits::default());
        for ip in internal_ips(state, node) {
            let addr = SocketAddr::new(ip, args.mesh_import_port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| MeshError::ImportListen { addr, source })?;
            let service = import_server.service();
            tokio::spawn(async move {
                if let Err(e) = transport::server()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                {
                    tracing::error!(error = %e, %addr, "the mesh import listener stopped");
                }
            });
        }
        let publisher = Arc::clone(&import_server);
        let publish_link = Arc::clone(&link);
        let mut changes = link.subscribe_imports();
        tokio::spawn(async move {
            loop {
                publisher.publish(&publish_link.imports());
                // Ready to carry traffic (what the nodes' liveness watches report): a session
                // with a gateway of every peer, and its import synced.
                let peers = publish_link.peers();
                publisher.set_ready(
                    !peers.is_empty() && peers.iter().all(|p| p.gateways_up() > 0 && p.is_synced()),
                );
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        let gateway = Arc::new(Self {
            link,
            trust,
            identity,
            tun: Arc::clone(&tun),
            counters: Arc::default(),
            state: tokio::sync::Mutex::new(GatewayState::default()),
            exported: Arc::default(),
            import_server,
            runtime: tokio::runtime::Handle::current(),
            _thread: thread,
        });
        tokio::spawn(Arc::clone(&gateway).redial_on_rotation());
        for queue in 0..tun.queues() {
            tokio::spawn(
                Forwarder {
                    tun: Arc::clone(&tun),
                    queue,
                    link: Arc::clone(&gateway.link),
                    exported: Arc::clone(&gateway.exported),
                    counters: Arc::clone(&gateway.counters),
                    batching: args.data_plane.mesh_batching,
                }
                .run(),
            );
        }
        tracing::info!(%cluster, listen = %args.mesh_listen, tun_queues = tun.queues(), "mesh gateway up");
        Ok(Some(gateway))
    }

    /// Notified when any peer's import changes.
    pub fn subscribe_imports(&self) -> watch::Receiver<u64> {
        self.link.subscribe_imports()
    }

    pub fn imports(&self) -> Vec<Arc<ImportView>> {
        self.link.imports()
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Certificate rotations applied and refused since start.
    pub fn rotations(&self) -> (u64, u64) {
        (
            self.identity.rotations.load(Ordering::Relaxed),
            self.identity.refused_rotations.load(Ordering::Relaxed),
        )
    }

    /// Applies a new cluster state: peers, trust, exports, routes into the TUN.
    pub async fn observe(&self, state: &ClusterState) {
        let peers = valid_peers(state);
        let bundles: BTreeMap<String, String> = peers
            .iter()
            .map(|p| (p.name.clone(), p.ca_bundle.clone()))
            .collect();
        for e in self.trust.set(&bundles) {
            tracing::error!(error = %e, "MeshPeer's CA bundle unusable; its certificates are refused");
        }
        let ours = cluster_prefixes(state);
        self.link.set_local_pod_prefixes(ours.clone());
        let mut bounds = peer_bounds(&peers, &ours);
        let specs: Vec<PeerSpec> = peers
            .iter()
            .map(|p| PeerSpec {
                name: p.name.clone(),
                endpoints: p.endpoints.clone(),
                bounds: bounds.remove(&p.name).unwrap_or_default(),
                stale_ttl: p.stale_ttl,
            })
            .collect();
        self.import_server.set_watchers(
            state
                .nodes
                .keys()
                .flat_map(|n| internal_ips(state, n))
                .collect(),
        );
        self.link.set_peers(specs);
        let mut inner = self.state.lock().await;
        let local = self.link.local_cluster().to_owned();
        // Dial the peers whose name sorts after ours; the others dial us.
        let wanted: BTreeSet<String> = peers
            .iter()
            .filter(|p| p.name.as_str() > local.as_str() && !p.endpoints.is_empty())
            .map(|p| p.name.clone())
            .collect();
        inner.dialing.retain(|name, task| {
            let keep = wanted.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        for name in wanted {
            if inner.dialing.contains_key(&name) {
                continue;
            }
            if let Some(task) = self.spawn_dial(&name) {
                inner.dialing.insert(name, task);
            }
        }
        // Exports.
        let mut index = HashMap::new();
        for p in &peers {
            let entries = match &p.export {
                Some(sel) => exports_for(state, sel, &mut inner.ids),
                None => BTreeMap::new(),
            };
            let by_addr: HashMap<IpAddr, u32> = entries
                .values()
                .filter_map(|e| match e {
                    Export::Endpoint(ep) => Some((ep.addr, ep.identity)),
                    Export::Identity(_) => None,
                })
                .collect();
            index.insert(p.name.clone(), by_addr);
            self.link.set_exports(&p.name, entries);
        }
        *self.exported.lock().unwrap_or_else(|e| e.into_inner()) = index;
        // Peers' prefixes into the TUN; a removed MeshPeer's routes go with it.
        let wanted: BTreeSet<IpNet> = peers
            .iter()
            .flat_map(|p| p.allowed_prefixes.iter().copied())
            .collect();
        let gone: Vec<IpNet> = inner.routed.difference(&wanted).copied().collect();
        for prefix in gone {
            match self.tun.unroute(prefix).await {
                Ok(()) => {
                    inner.routed.remove(&prefix);
                }
                Err(e) => tracing::error!(error = %e, "a removed mesh peer's route stays"),
            }
        }
        for p in &peers {
            for prefix in &p.allowed_prefixes {
                if inner.routed.contains(prefix) {
                    continue;
                }
                match self.tun.route(*prefix).await {
                    Ok(()) => {
                        inner.routed.insert(*prefix);
                    }
                    Err(e) => tracing::error!(error = %e, "no route to a mesh peer's prefix"),
                }
            }
        }
    }

    /// After a certificate rotation, dials every peer we dial again: the new session (with the
    /// new certificate) replaces the old one once its connection is up, and the old dialer
    /// stops (make before break). Peers that dial us use our new certificate from their next
    /// connection on.
    async fn redial_on_rotation(self: Arc<Self>) {
        let mut rotations = self.identity.subscribe_rotations();
        while rotations.changed().await.is_ok() {
            let mut inner = self.state.lock().await;
            let names: Vec<String> = inner.dialing.keys().cloned().collect();
            tracing::info!(peers = ?names, "mesh certificate rotated; re-dialling the peers we dial");
            for name in names {
                // The previous task ends by itself once this session replaces its own.
                if let Some(task) = self.spawn_dial(&name) {
                    inner.dialing.insert(name, task);
                }
            }
        }
    }

    /// Starts dialling peer `name` with our certificate as it is now; `None` when the peer is
    /// gone or no client configuration can be made for it (logged).
    fn spawn_dial(&self, name: &str) -> Option<tokio::task::JoinHandle<()>> {
        let peer = self.link.peer(name)?;
        match tls::client_config(
            Arc::clone(&self.identity),
            Arc::clone(&self.trust),
            tls::provider(),
            name,
        ) {
            Ok(config) => Some(
                self.runtime
                    .spawn(Arc::clone(&self.link).dial(peer, Arc::new(config))),
            ),
            Err(e) => {
                tracing::error!(peer = %name, error = %e, "cannot dial the mesh peer");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_policy::model::parse_documents;

    use super::*;

    fn state(yaml: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for o in parse_documents(yaml, "test") {
            s.apply(o.unwrap());
        }
        s
    }

    #[test]
    fn exports_follow_the_selector_and_never_carry_the_cluster_label() {
        let s = state(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {mesh.weir.io/export: 'true'}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: dev}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, labels: {app: web, weir.io/cluster: x}}\nstatus: {podIPs: [{ip: 10.1.0.5}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: dev, labels: {app: web}}\nstatus: {podIPs: [{ip: 10.1.0.6}]}\n",
        );
        let sel = Selector::from_label_selector(&weir_policy::model::LabelSelector {
            match_labels: weir_policy::model::Labels::from([(
                "mesh.weir.io/export".into(),
                "true".into(),
            )]),
            ..Default::default()
        })
        .unwrap();
        let entries = exports_for(&s, &sel, &mut ExportIds::default());
        assert_eq!(entries.len(), 2, "{entries:?}");
        let Export::Identity(id) = &entries["id/256"] else {
            panic!("{entries:?}")
        };
        assert!(!id.pod_labels.contains_key(CLUSTER_LABEL));
        assert!(entries.contains_key("ep/10.1.0.5"));
        assert!(!entries.contains_key("ep/10.1.0.6"));
    }

    #[test]
    fn workers_route_peers_over_the_live_gateways_and_over_all_while_none_is() {
        let node = |name: &str, ip: &str, gateway: bool| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{mesh.weir.io/gateway: '{gateway}'}}}}\n\
                 spec: {{podCIDRs: ['10.1.{}.0/24']}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n",
                &ip[ip.len() - 1..]
            )
        };
        let s = state(&format!(
            "{}{}{}---\napiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: east}}\n\
             spec: {{endpoints: ['192.0.2.5:4243'], allowedPrefixes: ['10.2.0.0/16'], caBundle: '-----BEGIN CERTIFICATE-----'}}\n",
            node("g1", "172.31.0.1", true),
            node("g2", "172.31.0.2", true),
            node("w", "172.31.0.3", false),
        ));
        let east: IpNet = "10.2.0.0/16".parse().unwrap();
        let (g1, g2): (IpAddr, IpAddr) =
            ("172.31.0.1".parse().unwrap(), "172.31.0.2".parse().unwrap());
        assert_eq!(
            ecmp_routes(&s, "w", &BTreeSet::from([g1, g2]))[&east],
            vec![g1, g2]
        );
        assert_eq!(
            ecmp_routes(&s, "w", &BTreeSet::from([g2]))[&east],
            vec![g2],
            "a dead gateway leaves the route"
        );
        assert_eq!(
            ecmp_routes(&s, "w", &BTreeSet::new())[&east],
            vec![g1, g2],
            "with none live, the route keeps them all"
        );
        assert!(
            ecmp_routes(&s, "g1", &BTreeSet::new()).is_empty(),
            "gateways route into the TUN"
        );
    }

    #[test]
    fn imports_become_labelled_namespaces_and_pods() {
        let view = ImportView {
            cluster: "east".into(),
            identities: BTreeMap::from([(
                300,
                IdentityExport {
                    id: 300,
                    namespace: "pay".into(),
                    pod_labels: BTreeMap::from([("app".into(), "api".into())]),
                    namespace_labels: BTreeMap::from([
                        ("kubernetes.io/metadata.name".into(), "pay".into()),
                        ("team".into(), "pay".into()),
                    ]),
                },
            )]),
            endpoints: HashMap::from([
                ("10.245.0.5".parse().unwrap(), 300),
                ("10.245.0.6".parse().unwrap(), 999),
            ]),
        };
        let merged = merge_imports(&ClusterState::default(), &[Arc::new(view)]);
        let ns = &merged.namespaces["east/pay"];
        assert_eq!(ns.metadata.labels[CLUSTER_LABEL], "east");
        assert_eq!(ns.metadata.labels["team"], "pay");
        assert_eq!(
            merged.pods.len(),
            1,
            "the endpoint without identity is left out"
        );
        let pod = &merged.pods[&ObjectKey::new("east/pay", "10.245.0.5")];
        assert_eq!(pod.metadata.labels[CLUSTER_LABEL], "east");
        assert_eq!(pod.status.pod_ips[0].ip, "10.245.0.5");
    }
}
