//! Health and metrics over HTTP: `/healthz` (the process serves requests), `/readyz` (the
//! runtime has read the cluster and its last apply succeeded) and `/metrics` (OpenMetrics text,
//! encoded by prometheus-client): the instrumented metrics of [`crate::metrics`] plus what is
//! read at scrape time (enforcement state, cluster objects, map pressure, the kernel's counters).
//!
//! The server starts before the runtime exists (so a liveness probe passes while the agent waits
//! for the API server); until [`Health::attach`] is called `/readyz` answers 503 `starting: ...`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use weir_common::{
    COUNTER_EVENTS_LOST, COUNTER_EVENTS_THROTTLED, COUNTER_PATH_REDIRECT_NEIGH,
    COUNTER_PATH_REDIRECT_PEER, COUNTER_PATH_STACK, COUNTER_XDP_PASSED, FIRST_COUNTER_SLOT,
    REASON_POLICY_DENIED,
};

use crate::{endpoints::EndpointBackend, runtime::Runtime, source::SourceStats};

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "binding the health endpoint to {addr}: {source}; pass another --health-addr (WEIR_HEALTH_ADDR)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why the agent is not enforcing (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotEnforcing {
    /// Still starting: the cluster state has not been read yet.
    Starting(String),
    /// The last compile or apply failed; the previous enforcement stays in place.
    Degraded(String),
}

/// What the health endpoint reads from the runtime. [`Runtime`] implements it; tests use fakes.
pub trait Enforcement: Send + Sync {
    /// `Ok` when the cluster state has been read and the last apply succeeded.
    fn enforcement(&self) -> Result<(), NotEnforcing>;
    /// Number of local endpoints (pod interfaces) the agent enforces.
    fn endpoint_count(&self) -> usize;
    /// Policy compiles since start (a changed cluster state, an endpoint added or removed).
    fn compiles(&self) -> u64;
    /// NetworkPolicies the compiler rejected (in whole or in part) in the state in force.
    fn rejected_policies(&self) -> u64;
    /// What the datapath holds and has counted; nothing for a runtime without one.
    fn datapath(&self) -> DatapathSnapshot {
        DatapathSnapshot::default()
    }
}

/// The datapath's state at one scrape.
#[derive(Clone, Debug, Default)]
pub struct DatapathSnapshot {
    /// `(map name, entries, capacity)`.
    pub maps: Vec<(&'static str, u64, u64)>,
    /// Connections tracked, when the conntrack map could be read.
    pub conntrack_entries: Option<u64>,
    /// `WEIR_COUNTERS` summed over CPUs (index: `REASON_*`, `COUNTER_EVENTS_LOST`).
    pub counters: Vec<u64>,
    /// Registered endpoints whose addresses the compiler placed (enforced), and those it did
    /// not (their Pod object is not on this node).
    pub endpoints_enforced: u64,
    pub endpoints_unplaced: u64,
}

impl Enforcement for Runtime {
    fn enforcement(&self) -> Result<(), NotEnforcing> {
        self.readiness().map_err(NotEnforcing::Starting)?;
        match self.degraded() {
            Some(reason) => Err(NotEnforcing::Degraded(reason)),
            None => Ok(()),
        }
    }

    fn endpoint_count(&self) -> usize {
        usize::try_from(self.published().endpoints).unwrap_or(usize::MAX)
    }

    fn compiles(&self) -> u64 {
        Runtime::compiles(self)
    }

    fn rejected_policies(&self) -> u64 {
        self.published().rejected_policies
    }

    fn datapath(&self) -> DatapathSnapshot {
        self.datapath_snapshot()
    }
}

/// Shared between the HTTP server, `main` and the cluster source.
pub struct Health {
    started: SystemTime,
    enforcement: OnceLock<Arc<dyn Enforcement>>,
    phase: Mutex<String>,
    pub source: Arc<SourceStats>,
    mesh: OnceLock<Arc<crate::mesh::Mesh>>,
    /// What `/metrics` encodes, built once: the instrumented metrics are shared handles, and
    /// the collectors read the agent's state when a scrape encodes them.
    registry: Registry,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|health| {
            let mut registry = Registry::default();
            crate::metrics::metrics().register(&mut registry);
            registry.register_collector(Box::new(ScrapeTime(health.clone())));
            registry.register_collector(Box::new(MeshScrapeTime(health.clone())));
            Self {
                started: SystemTime::now(),
                enforcement: OnceLock::new(),
                phase: Mutex::new("starting".to_owned()),
                source: Arc::default(),
                mesh: OnceLock::new(),
                registry,
            }
        })
    }

    /// From now on `/metrics` shows the mesh role's peers.
    pub fn attach_mesh(&self, mesh: Arc<crate::mesh::Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    /// What the agent is doing before the runtime exists (shown by `/readyz`).
    pub fn set_phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.into();
    }

    /// From now on `/readyz` and `/metrics` read the runtime.
    pub fn attach(&self, enforcement: Arc<dyn Enforcement>) {
        let _ = self.enforcement.set(enforcement);
    }

    fn state(&self) -> Result<(), NotEnforcing> {
        match self.enforcement.get() {
            Some(e) => e.enforcement(),
            None => Err(NotEnforcing::Starting(
                self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            )),
        }
    }

    /// `/readyz`: status code and body.
    pub fn readyz(&self) -> (StatusCode, String) {
        match self.state() {
            Ok(()) => (StatusCode::OK, "enforcing\n".to_owned()),
            Err(NotEnforcing::Degraded(reason)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("degraded: {reason}\n"),
            ),
            Err(NotEnforcing::Starting(reason)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("starting: {reason}\n"),
            ),
        }
    }

    /// `/metrics` in the OpenMetrics text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// What `/metrics` reads at scrape time.
    fn snapshot(&self) -> Snapshot {
        let state = self.state();
        let enforcement = self.enforcement.get();
        let s = &self.source;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let objects = s.object_counts();
        Snapshot {
            state: [
                ("enforcing", state.is_ok()),
                ("degraded", matches!(state, Err(NotEnforcing::Degraded(_)))),
                ("starting", matches!(state, Err(NotEnforcing::Starting(_)))),
            ],
            endpoints: enforcement.map_or(0, |e| e.endpoint_count()) as u64,
            datapath: enforcement.map(|e| e.datapath()).unwrap_or_default(),
            adds_in_progress: crate::metrics::metrics().adds_in_progress() as u64,
            objects: [
                ("Pod", objects.pods),
                ("Namespace", objects.namespaces),
                ("NetworkPolicy", objects.policies),
                ("Node", objects.nodes),
            ],
            rejected_policies: enforcement.map_or(0, |e| e.rejected_policies()),
            updates: load(&s.updates),
            compiles: enforcement.map_or(0, |e| e.compiles()),
            manifest_scans: load(&s.manifest_scans),
            manifest_files_parsed: load(&s.manifest_files_parsed),
            connected: s.connected.load(Ordering::Relaxed),
            watch_errors: load(&s.watch_errors),
            relists: load(&s.relists),
            events_written: load(&s.events_written),
            started: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                (StatusCode::OK, "text/plain", "ok\n".to_owned())
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                let (status, body) = self.readyz();
                (status, "text/plain", body)
            }
            (&Method::GET | &Method::HEAD, "/metrics") => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics(),
            ),
            (&Method::GET | &Method::HEAD, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz or /metrics\n".to_owned(),
            ),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".to_owned(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, v);
        }
        response
    }
}

/// The collector of what `/metrics` reads at scrape time (a weak reference: the registry it is
/// in belongs to the [`Health`] it reads).
#[derive(Debug)]
struct ScrapeTime(Weak<Health>);

impl Collector for ScrapeTime {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        match self.0.upgrade() {
            Some(health) => health.snapshot().encode(encoder),
            None => Ok(()),
        }
    }
}

/// The mesh role's peers, once a mesh is attached.
#[derive(Debug)]
struct MeshScrapeTime(Weak<Health>);

impl Collector for MeshScrapeTime {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        match self.0.upgrade().and_then(|h| h.mesh.get().cloned()) {
            Some(mesh) => crate::mesh_status::MeshCollector(mesh.status()).encode(encoder),
            None => Ok(()),
        }
    }
}

/// Everything `/metrics` reads at scrape time, encoded by prometheus-client.
#[derive(Debug)]
struct Snapshot {
    state: [(&'static str, bool); 3],
    endpoints: u64,
    datapath: DatapathSnapshot,
    adds_in_progress: u64,
    objects: [(&'static str, u64); 4],
    rejected_policies: u64,
    updates: u64,
    compiles: u64,
    manifest_scans: u64,
    manifest_files_parsed: u64,
    connected: bool,
    watch_errors: u64,
    relists: u64,
    events_written: u64,
    started: u64,
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A gauge family: one sample per label set (an empty label set for an unlabelled gauge).
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, i64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    match samples {
        [(labels, value)] if labels.is_empty() => ConstGauge::new(*value).encode(metric),
        _ => {
            for (labels, value) in samples {
                ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

/// A counter family; `name` without `_total` (the encoder adds it).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    match samples {
        [(labels, value)] if labels.is_empty() => ConstCounter::new(*value).encode(metric),
        _ => {
            for (labels, value) in samples {
                ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

fn label(name: &'static str, value: &str) -> Vec<(&'static str, String)> {
    vec![(name, value.to_owned())]
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut e,
            "weir_enforcement_state",
            "1 on the agent's current state: enforcing (cluster read, last apply succeeded), degraded (last compile or apply failed; the previous enforcement stays), or starting",
            &self
                .state
                .iter()
                .map(|(s, on)| (label("state", s), i64::from(*on)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "weir_endpoints",
            "Local endpoints (pod interfaces) under enforcement",
            &[(vec![], signed(self.endpoints))],
        )?;
        gauge(
            &mut e,
            "weir_endpoints_by_state",
            "Local endpoints by state: enforced (in the datapath), unplaced (registered, but the compiler did not place its addresses: the Pod is not on this node), allocating (a CNI ADD between AllocateEndpoint and ActivateEndpoint)",
            &[
                (
                    label("state", "enforced"),
                    signed(self.datapath.endpoints_enforced),
                ),
                (
                    label("state", "unplaced"),
                    signed(self.datapath.endpoints_unplaced),
                ),
                (label("state", "allocating"), signed(self.adds_in_progress)),
            ],
        )?;
        gauge(
            &mut e,
            "weir_cluster_objects",
            "Objects in the last cluster state handed to the runtime, by kind",
            &self
                .objects
                .iter()
                .map(|(kind, n)| (label("kind", kind), signed(*n)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "weir_rejected_policies",
            "NetworkPolicies rejected (in whole or in part) in the cluster state in force, as the compiler validated them",
            &[(vec![], signed(self.rejected_policies))],
        )?;
        counter(
            &mut e,
            "weir_cluster_state_updates",
            "Complete cluster states handed to the runtime",
            &[(vec![], self.updates)],
        )?;
        counter(
            &mut e,
            "weir_policy_compiles",
            "Policy compiles: a changed cluster state, a local endpoint added or removed (an unchanged state compiles nothing)",
            &[(vec![], self.compiles)],
        )?;
        counter(
            &mut e,
            "weir_manifest_scans",
            "Scans of the manifests directory (standalone mode): after an inotify event, and the periodic rescan",
            &[(vec![], self.manifest_scans)],
        )?;
        counter(
            &mut e,
            "weir_manifest_files_parsed",
            "Manifest files parsed (standalone mode): new files and files whose bytes changed",
            &[(vec![], self.manifest_files_parsed)],
        )?;
        gauge(
            &mut e,
            "weir_source_connected",
            "1 while every watch of the cluster source is established",
            &[(vec![], i64::from(self.connected))],
        )?;
        counter(
            &mut e,
            "weir_source_watch_errors",
            "List and watch failures of the cluster source (the last state keeps being enforced)",
            &[(vec![], self.watch_errors)],
        )?;
        counter(
            &mut e,
            "weir_source_relists",
            "410 Gone answers that made the source relist",
            &[(vec![], self.relists)],
        )?;
        counter(
            &mut e,
            "weir_policy_events",
            "Kubernetes Events written for rejected policies",
            &[(vec![], self.events_written)],
        )?;
        gauge(
            &mut e,
            "weir_map_entries",
            "Entries in each datapath map",
            &self
                .datapath
                .maps
                .iter()
                .map(|(map, n, _)| (label("map", map), signed(*n)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "weir_map_capacity",
            "Capacity (max entries) of each datapath map; a full map stops policy updates (the previous enforcement stays)",
            &self
                .datapath
                .maps
                .iter()
                .map(|(map, _, cap)| (label("map", map), signed(*cap)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "weir_conntrack_entries",
            "Connections in the datapath's connection tracking table",
            &self
                .datapath
                .conntrack_entries
                .map(|n| vec![(vec![], signed(n))])
                .unwrap_or_default(),
        )?;
        let packets: Vec<(Vec<(&str, String)>, u64)> = self
            .datapath
            .counters
            .iter()
            .enumerate()
            .filter(|(slot, n)| **n > 0 && (*slot as u32) < FIRST_COUNTER_SLOT)
            .map(|(slot, n)| {
                let reason = slot as u8;
                let verdict = if reason >= REASON_POLICY_DENIED {
                    "drop"
                } else {
                    "allow"
                };
                (
                    vec![
                        ("verdict", verdict.to_owned()),
                        ("reason", crate::flows::reason_name(reason).to_owned()),
                    ],
                    *n,
                )
            })
            .collect();
        counter(
            &mut e,
            "weir_datapath_packets",
            "Packets the datapath judged since its maps were created, by verdict and reason (the kernel counts per reason, not per direction; weir_verdicts_total has the direction)",
            &packets,
        )?;
        let slot = |counter: u32| {
            self.datapath
                .counters
                .get(counter as usize)
                .copied()
                .unwrap_or(0)
        };
        counter(
            &mut e,
            "weir_datapath_path_packets",
            "Packets by the way the datapath delivered or passed them: a pod's allowed packets by the node's stack, by bpf_redirect_peer (to a local pod) or by bpf_redirect_neigh (to another node's pod), and what the uplink's XDP filter passed on to tc",
            &[
                (label("path", "stack"), slot(COUNTER_PATH_STACK)),
                (
                    label("path", "redirect_peer"),
                    slot(COUNTER_PATH_REDIRECT_PEER),
                ),
                (
                    label("path", "redirect_neigh"),
                    slot(COUNTER_PATH_REDIRECT_NEIGH),
                ),
                (label("path", "xdp_passed"), slot(COUNTER_XDP_PASSED)),
            ],
        )?;
        counter(
            &mut e,
            "weir_events_lost",
            "Verdict events the ring buffer had no room for (the packets were still judged; their flow records are missing)",
            &[(vec![], slot(COUNTER_EVENTS_LOST))],
        )?;
        counter(
            &mut e,
            "weir_events_throttled",
            "XDP drops counted but not reported because the same kind of drop (source, destination, port, reason) was reported within the second, or the CPU's report budget was spent (weir_datapath_packets_total still counts every drop)",
            &[(vec![], slot(COUNTER_EVENTS_THROTTLED))],
        )?;
        gauge(
            &mut e,
            "weir_process_start_time_seconds",
            "Start time of the agent since the Unix epoch",
            &[(vec![], signed(self.started))],
        )?;
        gauge(
            &mut e,
            "weir_build_info",
            "The agent's version",
            &[(label("version", env!("CARGO_PKG_VERSION")), 1)],
        )?;
        Ok(())
    }
}

/// Binds the health endpoint (separately from serving, so a taken port fails start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HealthError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })
}

/// Serves `/healthz`, `/readyz` and `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a health connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = health.respond(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "health connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    struct Fake(Mutex<Result<(), NotEnforcing>>, usize);

    impl Enforcement for Fake {
        fn enforcement(&self) -> Result<(), NotEnforcing> {
            self.0.lock().unwrap().clone()
        }
        fn endpoint_count(&self) -> usize {
            self.1
        }
        fn compiles(&self) -> u64 {
            7
        }
        fn rejected_policies(&self) -> u64 {
            2
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn probes_and_metrics_follow_the_runtime() {
        let health = Health::new();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, health.clone()));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        health.set_phase("waiting for the Node object");
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "starting: waiting for the Node object\n".to_owned())
        );
        let metrics = get(addr, "/metrics").await.1;
        assert!(metrics.contains("weir_enforcement_state{state=\"starting\"} 1\n"));

        let fake = Arc::new(Fake(Mutex::new(Ok(())), 3));
        health.attach(fake.clone());
        assert_eq!(get(addr, "/readyz").await, (200, "enforcing\n".to_owned()));
        let metrics = get(addr, "/metrics").await.1;
        assert!(metrics.contains("weir_enforcement_state{state=\"enforcing\"} 1\n"));
        assert!(metrics.contains("weir_enforcement_state{state=\"degraded\"} 0\n"));
        assert!(metrics.contains("# TYPE weir_endpoints gauge\nweir_endpoints 3\n"));
        assert!(metrics.contains("\nweir_policy_compiles_total 7\n"));
        assert!(metrics.contains("\nweir_rejected_policies 2\n"));

        *fake.0.lock().unwrap() = Err(NotEnforcing::Degraded("map full".to_owned()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "degraded: map full\n".to_owned())
        );
        let metrics = get(addr, "/metrics").await.1;
        assert!(metrics.contains("weir_enforcement_state{state=\"degraded\"} 1\n"));
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let health = Health::new();
        health
            .source
            .observe_state(&weir_policy::model::ClusterState::default());
        let metrics = health.metrics();
        // OpenMetrics ends with `# EOF`; histogram sums and buckets are floats.
        let body = metrics.strip_suffix("# EOF\n").expect("ends with # EOF");
        for line in body.lines() {
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP weir_") || line.starts_with("# TYPE weir_"));
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("weir_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
