//! Health and metrics over HTTP: `/healthz` (the process serves requests), `/readyz` (the
//! runtime has read the cluster and its last apply succeeded) and `/metrics` (Prometheus text
//! exposition format 0.0.4, written by hand: a handful of gauges and counters does not need a
//! metrics library).
//!
//! The server starts before the runtime exists (so a liveness probe passes while the agent waits
//! for the API server); until [`Health::attach`] is called `/readyz` answers 503 `starting: ...`.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{endpoints::EndpointBackend, runtime::Runtime, source::SourceStats};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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
        self.endpoints().len()
    }

    fn compiles(&self) -> u64 {
        Runtime::compiles(self)
    }
}

/// Shared between the HTTP server, `main` and the cluster source.
pub struct Health {
    started: SystemTime,
    enforcement: OnceLock<Arc<dyn Enforcement>>,
    phase: Mutex<String>,
    pub source: Arc<SourceStats>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: SystemTime::now(),
            enforcement: OnceLock::new(),
            phase: Mutex::new("starting".to_owned()),
            source: Arc::default(),
        })
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

    /// `/metrics` in the Prometheus text format.
    pub fn metrics(&self) -> String {
        let state = self.state();
        let endpoints = self.enforcement.get().map_or(0, |e| e.endpoint_count());
        let compiles = self.enforcement.get().map_or(0, |e| e.compiles());
        let s = &self.source;
        let objects = s.object_counts();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let flag = |b: bool| u8::from(b);
        family(
            &mut out,
            "weir_enforcement_state",
            "gauge",
            "1 on the agent's current state: enforcing (cluster read, last apply succeeded), degraded (last compile or apply failed; the previous enforcement stays), or starting.",
            &[
                ("state=\"enforcing\"", flag(state.is_ok()).into()),
                (
                    "state=\"degraded\"",
                    flag(matches!(state, Err(NotEnforcing::Degraded(_)))).into(),
                ),
                (
                    "state=\"starting\"",
                    flag(matches!(state, Err(NotEnforcing::Starting(_)))).into(),
                ),
            ],
        );
        family(
            &mut out,
            "weir_endpoints",
            "gauge",
            "Local endpoints (pod interfaces) under enforcement.",
            &[("", u64::try_from(endpoints).unwrap_or(u64::MAX))],
        );
        family(
            &mut out,
            "weir_cluster_objects",
            "gauge",
            "Objects in the last cluster state handed to the runtime, by kind.",
            &[
                ("kind=\"Pod\"", objects.pods),
                ("kind=\"Namespace\"", objects.namespaces),
                ("kind=\"NetworkPolicy\"", objects.policies),
                ("kind=\"Node\"", objects.nodes),
            ],
        );
        family(
            &mut out,
            "weir_rejected_policies",
            "gauge",
            "NetworkPolicies rejected (in whole or in part) in the last cluster state.",
            &[("", objects.rejected_policies)],
        );
        family(
            &mut out,
            "weir_cluster_state_updates_total",
            "counter",
            "Complete cluster states handed to the runtime.",
            &[("", load(&s.updates))],
        );
        family(
            &mut out,
            "weir_policy_compiles_total",
            "counter",
            "Policy compiles: a changed cluster state, a local endpoint added or removed (an unchanged state compiles nothing).",
            &[("", compiles)],
        );
        family(
            &mut out,
            "weir_manifest_scans_total",
            "counter",
            "Scans of the manifests directory (standalone mode): after an inotify event, and the periodic rescan.",
            &[("", load(&s.manifest_scans))],
        );
        family(
            &mut out,
            "weir_manifest_files_parsed_total",
            "counter",
            "Manifest files parsed (standalone mode): new files and files whose bytes changed.",
            &[("", load(&s.manifest_files_parsed))],
        );
        family(
            &mut out,
            "weir_source_connected",
            "gauge",
            "1 while every watch of the cluster source is established.",
            &[("", flag(s.connected.load(Ordering::Relaxed)).into())],
        );
        family(
            &mut out,
            "weir_source_watch_errors_total",
            "counter",
            "List and watch failures of the cluster source (the last state keeps being enforced).",
            &[("", load(&s.watch_errors))],
        );
        family(
            &mut out,
            "weir_source_relists_total",
            "counter",
            "410 Gone answers that made the source relist.",
            &[("", load(&s.relists))],
        );
        family(
            &mut out,
            "weir_policy_events_total",
            "counter",
            "Kubernetes Events written for rejected policies.",
            &[("", load(&s.events_written))],
        );
        let started = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        family(
            &mut out,
            "weir_process_start_time_seconds",
            "gauge",
            "Start time of the agent since the Unix epoch.",
            &[("", started)],
        );
        family(
            &mut out,
            "weir_build_info",
            "gauge",
            "The agent's version.",
            &[(concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""), 1)],
        );
        out
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
                "text/plain; version=0.0.4; charset=utf-8",
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

/// One metric family: HELP, TYPE and one sample per label set.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
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

    use weir_policy::model::ClusterState;

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
        health.source.observe_state(&ClusterState::default());
        for line in health.metrics().lines() {
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP weir_") || line.starts_with("# TYPE weir_"));
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("weir_"), "{line}");
            value.parse::<u64>().unwrap();
        }
    }
}
