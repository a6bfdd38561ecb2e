//! `weir-agent`: the node agent. Standalone mode (`--manifests DIR`) reads the cluster from a
//! directory, Kubernetes mode (`--kubernetes`) from the API server; everything after the source
//! is the same code.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use weir_agent::{
    api::{self, ApiConfig},
    config::{Cli, Command, LogFormat, OverlayMode, RunArgs, UninstallArgs, XdpDevice},
    datapath::{bpf_log, events::read_events, loader, object::EBPF_OBJECT},
    health::{self, Health},
    ipam::Ipam,
    mesh::Mesh,
    node,
    overlay::Overlay,
    routes::{NodeRoutes, desired_routes},
    runtime::{Runtime, RuntimeConfig},
    sched_slice,
    source::{
        ObjectCounts, SourceUpdate,
        kubernetes::{self, KubeSourceConfig},
        manifests::{ManifestDir, follow},
    },
};
use weir_common::MAP_EVENTS;
use weir_policy::model::{ClusterState, ObjectRef, StateDelta};

/// mimalloc rather than glibc's malloc. A full compile allocates and frees millions of small
/// objects on the reconcile thread; glibc keeps what it freed in its arenas (fragmented, so the
/// agent's RSS kept the high-water mark of several compiles, even with one arena per process)
/// and spends much of a compile consolidating free chunks. mimalloc returns freed pages to the
/// system and allocates small objects faster; the README's scale benchmark has both measured.
/// Built without transparent huge pages (`no_thp`; `MIMALLOC_ALLOW_THP=1` turns them back on).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h; the -sys crate does
/// not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system when it is freed. mimalloc delays that by default
/// (`purge_delay`, 1 s) and purges what expired only when a later allocation or free looks: the
/// agent frees most of a full compile's peak at its end and then often does nothing at all, so
/// that memory stayed resident at rest (about a third of the agent's RSS in the README's scale
/// benchmark). `MIMALLOC_PURGE_DELAY`, when set, still decides.
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one option of the allocator linked in; every value is valid for it, and
        // mimalloc reads it anew whenever it frees.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

fn main() -> anyhow::Result<()> {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if cli.log_format == LogFormat::Json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Some(Command::Uninstall(args)) => uninstall(&args),
        None => {
            let slice = Duration::from_micros(cli.run.mesh.data_plane.sched_slice_us);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(move || {
                    if let Err(e) = sched_slice::request_for_current_thread(slice) {
                        tracing::debug!(error = %e, "the scheduler slice was not set on a runtime thread");
                    }
                })
                .build()
                .context("starting the async runtime")?
                .block_on(run(cli.run))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = args.node.node_name()?.to_owned();
    let bpffs_dir = args.node.bpffs_dir()?;
    let state_dir = args.node.state_dir()?;
    let socket = args.socket.clone();
    // Health first, so a liveness probe passes while the agent waits for the API server.
    // A taken port costs the probes, not enforcement: say so loudly and go on.
    let health = Health::new();
    match health::bind(args.health_addr).await {
        Ok(listener) => {
            tokio::spawn(health::serve(listener, health.clone()));
        }
        Err(e) => tracing::error!(error = %e, "no health endpoint; enforcing without it"),
    }

    if args.kubernetes && args.manifests.is_some() {
        bail!(
            "two cluster sources: --kubernetes (WEIR_KUBERNETES) and --manifests (WEIR_MANIFESTS); pass one"
        );
    }
    // The compiler's rejections, for the Kubernetes source's Events (validation runs once).
    let (rejections_tx, rejections_rx) = tokio::sync::watch::channel(Arc::from([]));
    let (first_state, first_fingerprint, source, pod_cidrs) = if args.kubernetes {
        node::prepare(&bpffs_dir).context("preparing the node")?;
        let (first_state, states) =
            start_kubernetes(&args, &node_name, &health, rejections_rx).await?;
        let pod_cidrs = if !args.pod_cidr.is_empty() {
            args.pod_cidr.clone()
        } else {
            node_pod_cidrs(&first_state, &node_name)?
        };
        (
            first_state,
            String::new(),
            Source::Kubernetes(states),
            pod_cidrs,
        )
    } else {
        let Some(manifests) = args.manifests.clone() else {
            bail!(
                "no cluster source: pass --manifests DIR (standalone mode) or --kubernetes (Kubernetes mode)"
            );
        };

        node::prepare(&bpffs_dir).context("preparing the node")?;
        let mut source = ManifestDir::new(&manifests).with_stats(health.source.clone());
        let first_state = source
            .scan()
            .with_context(|| format!("reading the manifests in {}", manifests.display()))?;
        let pod_cidrs = if !args.pod_cidr.is_empty() {
            args.pod_cidr.clone()
        } else {
            node_pod_cidrs(&first_state, &node_name)?
        };
        if pod_cidrs.is_empty() {
            bail!(
                "no pod CIDR for node {node_name}: pass --pod-cidr, or put a Node object named {node_name} \
                 with spec.podCIDRs in {}",
                manifests.display()
            );
        }
        health.source.connected.store(true, Ordering::Relaxed);
        let fingerprint = source.fingerprint();
        (
            first_state,
            fingerprint,
            Source::Manifests(Box::new(source)),
            pod_cidrs,
        )
    };
    health.set_phase("loading the datapath");

    let mut ebpf = loader::load_object(
        EBPF_OBJECT,
        Some(&loader::pin_dir(&bpffs_dir)),
        args.bpf_log,
    )
    .context("loading the datapath")?;
    // Held for the agent's life: the task forwards the kernel's debug log.
    let _bpf_log = if args.bpf_log {
        tracing::warn!(
            "kernel-side debug logging is on (--bpf-log): every packet leaving a pod is logged"
        );
        Some(bpf_log::start(&mut ebpf).context("starting the kernel's debug log")?)
    } else {
        None
    };
    start_uplink_filter(&args, &mut ebpf, &first_state, &node_name, &bpffs_dir)?;
    let events = ebpf
        .take_map(MAP_EVENTS)
        .context("the kernel object has no events ring buffer")?;
    let events =
        aya::maps::RingBuf::try_from(events).context("the events map is not a ring buffer")?;
    let runtime = Runtime::start(
        RuntimeConfig {
            node_name: node_name.clone(),
            cluster_id: 0,
            state_dir: state_dir.clone(),
            bpffs_dir: bpffs_dir.clone(),
            revoke_established: args.revoke_established,
            emit_allow_events: args.log_allowed,
            redirect_local_pods: args.redirect_local_pods,
            redirect_remote_pods: args.redirect_remote_pods,
        },
        ebpf,
        rejections_tx,
    )
    .context("starting the runtime")?;
    health.attach(runtime.clone());

    let ipam = Arc::new(Ipam::open(&state_dir, &pod_cidrs).context("opening IPAM")?);
    let veths =
        weir_agent::ipam::existing_host_veths().context("listing this node's interfaces")?;
    for released in ipam.reconcile(&veths).context("reconciling IPAM")? {
        tracing::info!(
            ?released,
            "released the address of an endpoint whose veth is gone"
        );
    }

    // Events first, so the first reconcile's drops are explained.
    let events_runtime = runtime.clone();
    tokio::spawn(async move {
        if let Err(e) = read_events(events, move |event| events_runtime.record_event(&event)).await
        {
            tracing::error!(error = %e, "reading verdict events stopped");
        }
    });

    // Other nodes' pods: native routes, or the VXLAN overlay, from their Node objects.
    let mut peers = if args.overlay == OverlayMode::Vxlan {
        let (underlay, cidr) = overlay_endpoint(&first_state, &node_name, &pod_cidrs)?;
        let overlay = Overlay::open(underlay, cidr)
            .await
            .context("setting up the VXLAN overlay")?;
        NodePeers::Overlay(overlay)
    } else if args.native_routing {
        NodePeers::Routes(
            NodeRoutes::open()
                .await
                .context("opening netlink for node routes")?,
        )
    } else {
        NodePeers::None
    };
    // Mesh role: a gateway (Node label mesh.weir.io/gateway=true), or a node watching a
    // gateway's import. Imports restored from the state directory are part of the very first
    // state the datapath reconciles. With native routes, a node keeps its ECMP routes to peers
    // over the live gateways itself; through the overlay, they are node routes (one gateway).
    let mesh_ecmp = matches!(peers, NodePeers::Routes(_));
    let mesh = Arc::new(
        Mesh::start(&args.mesh, &first_state, &node_name, &state_dir, mesh_ecmp)
            .await
            .context("starting the mesh role")?,
    );
    health.attach_mesh(Arc::clone(&mesh));
    peers
        .sync(&node_and_mesh_routes(&first_state, &node_name, mesh_ecmp))
        .await;
    health.source.observe_state(&first_state);
    // Subscribed before the imports are read, so no change of them is missed.
    let mut imports = Some(mesh.subscribe_imports());
    runtime
        .update_cluster_state(
            StateDelta::between(&ClusterState::default(), &first_state),
            Some(mesh.imported()),
            first_fingerprint.clone(),
        )
        .await
        .context("applying the first cluster state")?;
    // The source's state, kept object by object from the changes the source names: node routes
    // and the mesh role follow it. They need only the Nodes and MeshPeers, unless this node is
    // a gateway (it exports its cluster's pods) or the source hands on whole states (compared
    // with the one before): the other objects are not held here a second time (the reconcile
    // task keeps them), and the manifests source counts them.
    let routing_only = matches!(source, Source::Manifests(_)) && !matches!(*mesh, Mesh::Gateway(_));
    let mut state = if routing_only {
        routing_objects(first_state)
    } else {
        first_state
    };
    let mut fingerprint = first_fingerprint;
    let mut states = match source {
        Source::Manifests(source) => {
            let (states_tx, states_rx) = mpsc::channel(4);
            tokio::spawn(async move {
                if let Err(e) = follow(*source, states_tx, Duration::from_secs(2)).await {
                    tracing::error!(error = %e, "following the manifests directory stopped; enforcement stays as last applied");
                }
            });
            States::Manifests {
                updates: states_rx,
                routing_only,
            }
        }
        Source::Kubernetes(states_rx) => States::Kubernetes(states_rx),
    };
    let state_runtime = runtime.clone();
    let state_health = health.clone();
    let routes_node = node_name.clone();
    let state_mesh = Arc::clone(&mesh);
    // The source's changes and the mesh imports, in order, to the reconcile task: each is sent
    // once the one before is enforced (what queues meanwhile in the source is merged there).
    tokio::spawn(async move {
        loop {
            let (delta, imported) = tokio::select! {
                update = states.next(&mut state) => {
                    let Some(update) = update else { break };
                    // The same objects under a new fingerprint (a comment in a manifest) only
                    // tell the runtime what its state was read from.
                    if !update.delta.is_empty() {
                        state_health.source.observe_counts(update.counts);
                        peers.sync(&node_and_mesh_routes(&state, &routes_node, mesh_ecmp)).await;
                        state_mesh.observe(&state).await;
                    }
                    fingerprint = update.fingerprint;
                    (update.delta, None)
                }
                () = imports_changed(&mut imports) => (StateDelta::default(), Some(state_mesh.imported())),
            };
            if let Err(e) = state_runtime
                .update_cluster_state(delta, imported, fingerprint.clone())
                .await
            {
                tracing::error!(error = %e, "cluster states are no longer applied");
                break;
            }
        }
    });

    let api_config = ApiConfig {
        node_name: node_name.clone(),
        default_pod_wait: Duration::from_secs(args.pod_wait_seconds),
    };
    tracing::info!(node = %node_name, ?pod_cidrs, socket = %socket.display(), pins = %bpffs_dir.display(), health = %args.health_addr, "weir-agent ready");
    let inspect = api::InspectService::new(runtime.clone()).with_mesh(Arc::clone(&mesh));
    api::serve_with(
        &socket,
        api_config,
        runtime,
        ipam,
        Some(inspect),
        shutdown_signal(),
    )
    .await
    .context("serving the agent API")?;
    tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
    Ok(())
}

/// Routes to other nodes' pods and, on nodes that are not mesh gateways and unless the mesh
/// keeps its own ECMP routes (`mesh_ecmp`), to peer clusters' prefixes via a gateway node.
fn node_and_mesh_routes(
    state: &ClusterState,
    node_name: &str,
    mesh_ecmp: bool,
) -> std::collections::BTreeMap<ipnet::IpNet, std::net::IpAddr> {
    let mut routes = desired_routes(state, node_name);
    if !mesh_ecmp {
        routes.extend(weir_agent::mesh::gateway_routes(state, node_name));
    }
    routes
}

/// Resolves when a mesh peer's import changed.
async fn imports_changed(imports: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = imports
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Where the cluster state comes from after the first one.
enum Source {
    Manifests(Box<ManifestDir>),
    Kubernetes(mpsc::Receiver<ClusterState>),
}

/// The states the source hands on after the first one.
enum States {
    /// The manifests source names the objects that changed; with `routing_only`, only the
    /// Nodes and MeshPeers among them are kept ([`routing_objects`]).
    Manifests {
        updates: mpsc::Receiver<SourceUpdate>,
        routing_only: bool,
    },
    /// The Kubernetes source hands on whole states, compared here with the one before to find
    /// what changed. It has no fingerprint: the applied generation tells its states apart.
    Kubernetes(mpsc::Receiver<ClusterState>),
}

impl States {
    /// The next change, applied to `state` (the source's state as of the change before).
    async fn next(&mut self, state: &mut ClusterState) -> Option<SourceUpdate> {
        match self {
            States::Manifests {
                updates,
                routing_only,
            } => {
                let update = updates.recv().await?;
                if *routing_only {
                    for (what, now) in update.delta.iter() {
                        if matches!(what, ObjectRef::Node(_) | ObjectRef::MeshPeer(_)) {
                            match now {
                                Some(object) => state.apply(object.clone()),
                                None => {
                                    state.remove(what);
                                }
                            }
                        }
                    }
                } else {
                    update.delta.apply_to(state);
                }
                Some(update)
            }
            States::Kubernetes(rx) => {
                let new = rx.recv().await?;
                let delta = StateDelta::between(state, &new);
                let counts = ObjectCounts::of(&new);
                *state = new;
                Some(SourceUpdate {
                    delta,
                    fingerprint: String::new(),
                    counts,
                })
            }
        }
    }
}

/// What node routes and a node's mesh role (not a gateway's) read of a cluster state.
fn routing_objects(state: ClusterState) -> ClusterState {
    ClusterState {
        nodes: state.nodes,
        mesh_peers: state.mesh_peers,
        ..ClusterState::default()
    }
}

/// Starts the watchers and waits (bounded) for the first complete state and, without
/// --pod-cidr, for this node's Node object with its pod CIDRs.
async fn start_kubernetes(
    args: &RunArgs,
    node_name: &str,
    health: &Arc<Health>,
    rejections: tokio::sync::watch::Receiver<Arc<[weir_policy::output::Rejection]>>,
) -> anyhow::Result<(ClusterState, mpsc::Receiver<ClusterState>)> {
    health.set_phase("connecting to the API server");
    let client = kubernetes::client().await?;
    let (states_tx, mut states_rx) = mpsc::channel(4);
    let config = KubeSourceConfig {
        policy_events: args.policy_events,
        ..KubeSourceConfig::new(node_name)
    };
    tokio::spawn(kubernetes::run(
        client,
        config,
        states_tx,
        rejections,
        health.source.clone(),
    ));
    health.set_phase("listing Pods, Namespaces, NetworkPolicies, Nodes and MeshPeers");
    let wait = Duration::from_secs(args.node_wait_seconds);
    let deadline = tokio::time::Instant::now() + wait;
    let need_cidrs = args.pod_cidr.is_empty();
    let mut last: Option<ClusterState> = None;
    loop {
        match tokio::time::timeout_at(deadline, states_rx.recv()).await {
            Ok(Some(state)) => {
                if !need_cidrs || !node_pod_cidrs(&state, node_name)?.is_empty() {
                    return Ok((state, states_rx));
                }
                health.set_phase(format!("waiting for Node {node_name} with spec.podCIDRs"));
                if last.is_none() {
                    tracing::info!(
                        node = node_name,
                        "cluster listed; waiting for this node's Node object and its spec.podCIDRs"
                    );
                }
                last = Some(state);
            }
            Ok(None) => bail!("the Kubernetes source stopped before the first complete list"),
            Err(_) => match last {
                None => bail!(
                    "no complete list of Pods, Namespaces, NetworkPolicies, Nodes and MeshPeers from the \
                     API server within {}s: check that the API server is reachable, that the MeshPeer CRD \
                     (manifests/05-crd-meshpeer.yaml) is installed and that the service account may list \
                     and watch them (manifests/10-rbac.yaml; see the warnings above)",
                    wait.as_secs()
                ),
                Some(state) if !state.nodes.contains_key(node_name) => bail!(
                    "there is no Node object named {node_name} (waited {}s): --node-name \
                     (WEIR_NODE_NAME) must be this node's name as the API server knows it",
                    wait.as_secs()
                ),
                Some(_) => bail!(
                    "Node {node_name} has no spec.podCIDRs (waited {}s): let the controller manager \
                     allocate node CIDRs (--allocate-node-cidrs with --cluster-cidr) or pass --pod-cidr \
                     (WEIR_POD_CIDR)",
                    wait.as_secs()
                ),
            },
        }
    }
}

/// The node's pod CIDRs from its Node object (`spec.podCIDRs`, else `spec.podCIDR`).
fn node_pod_cidrs(
    state: &weir_policy::model::ClusterState,
    node_name: &str,
) -> anyhow::Result<Vec<ipnet::IpNet>> {
    let Some(node) = state.nodes.get(node_name) else {
        return Ok(Vec::new());
    };
    let spec = &node.spec;
    let cidrs: Vec<&String> = if spec.pod_cidrs.is_empty() {
        spec.pod_cidr.iter().collect()
    } else {
        spec.pod_cidrs.iter().collect()
    };
    cidrs
        .into_iter()
        .map(|c| {
            c.parse().with_context(|| {
                format!("Node {node_name}: spec.podCIDRs has {c:?}, which is not a CIDR")
            })
        })
        .collect()
}

/// How this node reaches other nodes' pods.
enum NodePeers {
    None,
    Routes(NodeRoutes),
    Overlay(Overlay),
}

impl NodePeers {
    async fn sync(&mut self, desired: &std::collections::BTreeMap<ipnet::IpNet, std::net::IpAddr>) {
        match self {
            NodePeers::None => {}
            NodePeers::Routes(routes) => routes.sync(desired).await,
            NodePeers::Overlay(overlay) => overlay.sync(desired).await,
        }
    }
}

/// This node's overlay endpoint: its Node's IPv4 InternalIP and its IPv4 pod CIDR.
fn overlay_endpoint(
    state: &weir_policy::model::ClusterState,
    node_name: &str,
    pod_cidrs: &[ipnet::IpNet],
) -> anyhow::Result<(std::net::Ipv4Addr, ipnet::Ipv4Net)> {
    let underlay = state
        .nodes
        .get(node_name)
        .into_iter()
        .flat_map(|n| n.status.addresses.iter())
        .filter(|a| a.kind == "InternalIP")
        .find_map(|a| a.address.trim().parse::<std::net::Ipv4Addr>().ok())
        .with_context(|| {
            format!("--overlay vxlan needs this node's IPv4 InternalIP: Node {node_name} has none in status.addresses")
        })?;
    let cidr = pod_cidrs
        .iter()
        .find_map(|c| match c {
            ipnet::IpNet::V4(v4) => Some(*v4),
            ipnet::IpNet::V6(_) => None,
        })
        .context("--overlay vxlan needs an IPv4 pod CIDR for this node")?;
    Ok((underlay, cidr))
}

/// The XDP early filter on the node's uplink and the operator's deny list it enforces. The list
/// is written before the program is attached (or swapped in), so it holds from the first packet.
fn start_uplink_filter(
    args: &RunArgs,
    ebpf: &mut aya::Ebpf,
    state: &weir_policy::model::ClusterState,
    node_name: &str,
    bpffs_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use weir_agent::{datapath::uplink, prefilter};
    let device = match &args.xdp_device {
        XdpDevice::None => None,
        XdpDevice::Auto => {
            let internal_ips: Vec<std::net::IpAddr> = state
                .nodes
                .get(node_name)
                .into_iter()
                .flat_map(|n| n.status.addresses.iter())
                .filter(|a| a.kind == "InternalIP")
                .filter_map(|a| a.address.trim().parse().ok())
                .collect();
            let device = internal_ips
                .iter()
                .find_map(|ip| uplink::device_with_address(*ip));
            if device.is_none() {
                tracing::warn!(
                    node = node_name,
                    ?internal_ips,
                    "no interface holds this Node's InternalIP: running without the XDP filter (pass --xdp-device to name the uplink)"
                );
            }
            device
        }
        XdpDevice::Named(name) => Some(name.clone()),
    };
    let map = ebpf
        .take_map(weir_common::MAP_PREFILTER)
        .context("the kernel object has no prefilter map")?;
    let map = aya::maps::LpmTrie::try_from(map).context("the prefilter map's layout")?;
    let mut deny_list = prefilter::Prefilter::adopt(map)?;
    let entries = match &args.prefilter_file {
        Some(path) => {
            if device.is_none() {
                bail!(
                    "--prefilter-file {} is enforced by the XDP filter, which has no device: pass --xdp-device",
                    path.display()
                );
            }
            prefilter::read(path)?
        }
        None => Vec::new(),
    };
    deny_list.apply(&entries)?;
    let Some(device) = device else {
        for device in uplink::detach_all(bpffs_dir).context("removing the XDP links")? {
            tracing::info!(device, "took the XDP filter off (--xdp-device none)");
        }
        return Ok(());
    };
    let vxlan_port =
        (args.overlay == OverlayMode::Vxlan).then_some(weir_agent::overlay::VXLAN_PORT);
    let attached = uplink::attach(ebpf, &device, vxlan_port, bpffs_dir, args.xdp_mode)?;
    tracing::info!(
        device,
        ?attached,
        deny_list = deny_list.len(),
        "XDP filter on the uplink"
    );
    if let Some(path) = args.prefilter_file.clone() {
        tokio::spawn(prefilter::follow(path, deny_list, Duration::from_secs(2)));
    }
    Ok(())
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not when the future is
/// first polled: the API server polls it only after it has said it is serving, and a SIGTERM in
/// between would otherwise kill the agent without its clean stop.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Takes the programs off every Weir host veth, removes every pin and optionally the state.
fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let mut detached = Vec::new();
    for veth in weir_agent::ipam::existing_host_veths().context("listing this node's interfaces")? {
        if weir_agent::datapath::attach::detach_endpoint(&veth)
            .with_context(|| format!("taking Weir's programs off {veth}"))?
        {
            detached.push(veth);
        }
    }
    detached.sort();
    println!(
        "took Weir's programs off {} veth(s) {detached:?}",
        detached.len()
    );
    let bpffs_dir = args.node.bpffs_dir()?;
    let xdp_devices =
        weir_agent::datapath::uplink::detach_all(&bpffs_dir).context("removing the XDP links")?;
    println!("took Weir's XDP filter off {xdp_devices:?}");
    if bpffs_dir.exists() {
        std::fs::remove_dir_all(&bpffs_dir)
            .with_context(|| format!("removing the pins under {}", bpffs_dir.display()))?;
        println!("removed {} (maps unpinned)", bpffs_dir.display());
        // The per-node directory's parent (e.g. /sys/fs/bpf/weir) goes too once no node uses it.
        if let Some(parent) = bpffs_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    } else {
        println!("nothing pinned at {}", bpffs_dir.display());
    }
    // Routes to other nodes' pods and the overlay device: the agent's own, found by protocol
    // and name.
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(async {
            NodeRoutes::open().await?.sync(&Default::default()).await;
            NodeRoutes::open_with(weir_agent::routes::MESH_ROUTE_PROTOCOL)
                .await?
                .sync(&Default::default())
                .await;
            weir_agent::overlay::remove_device().await
        })
        .context("removing Weir's routes and overlay device")?;
    println!("removed Weir's routes to other nodes' pods and its overlay device, if any");
    if args.purge_state {
        let state_dir = args.node.state_dir()?;
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .with_context(|| format!("removing {}", state_dir.display()))?;
            println!("removed {}", state_dir.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // mimalloc's options are numbered by their place in mimalloc.h: the option at this
        // number has purge_delay's default (1,000 ms; no other option has it), and takes 0.
        // SAFETY (both): reads an option.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            1000
        );
        purge_freed_memory_at_once();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            0
        );
    }
}
