//! The agent's instrumented metrics (prometheus-client): what happens over time, recorded where
//! it happens — verdict events by verdict, reason and direction (the event reader), policy
//! compile time (the runtime), CNI ADD and DEL latency (the API). Values read at scrape time
//! (enforcement state, map pressure, the kernel's counters) are encoded by `health`.
//!
//! One process-wide set: it is recorded from the runtime, the API service and the event reader,
//! and an agent process runs one of each, so threading a handle through every constructor would
//! add nothing but parameters.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::Instant,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// A label set: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// ADDs the agent has seen start (AllocateEndpoint) and not yet finish (ActivateEndpoint or
/// ReleaseEndpoint). Bounded: a runtime that never finishes its ADDs cannot grow it past this.
const MAX_PENDING_ADDS: usize = 4096;

pub struct Metrics {
    /// `weir_verdicts_total{verdict, reason, direction}`: verdict events from the datapath.
    pub verdicts: Family<Labels, Counter>,
    /// `weir_policy_compile_seconds`: one compile of the cluster state.
    pub compile_seconds: Histogram,
    /// `weir_cni_seconds{command}`: ADD from AllocateEndpoint to ActivateEndpoint done, DEL as
    /// ReleaseEndpoint.
    pub cni_seconds: Family<Labels, Histogram>,
    pending_adds: Mutex<HashMap<(String, String), Instant>>,
}

fn compile_buckets() -> Histogram {
    // 0.1 ms .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-4, 2.0, 16,
    ))
}

fn cni_buckets() -> Histogram {
    // 1 ms .. ~16 s (an ADD may wait for its Pod object)
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-3, 2.0, 15,
    ))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    verdicts: Family::default(),
    compile_seconds: compile_buckets(),
    cni_seconds: Family::new_with_constructor(cni_buckets),
    pending_adds: Mutex::new(HashMap::new()),
});

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Adds the instrumented metrics to `registry` (they are shared handles: the registry reads
    /// the live values).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_verdicts",
            "Verdict events from the datapath by verdict, reason and direction: every drop, and new allowed connections when --emit-allow-events is on (weir_datapath_packets_total counts every packet, by reason)",
            self.verdicts.clone(),
        );
        registry.register(
            "weir_policy_compile_seconds",
            "Time to compile the cluster state into the desired map contents",
            self.compile_seconds.clone(),
        );
        registry.register(
            "weir_cni_seconds",
            "CNI latency as the agent sees it, by command: add from AllocateEndpoint to the endpoint enforced (ActivateEndpoint done), del for ReleaseEndpoint",
            self.cni_seconds.clone(),
        );
    }

    pub fn record_verdict(&self, verdict: &str, reason: &str, direction: &str) {
        self.verdicts
            .get_or_create(&vec![
                ("verdict", verdict.to_owned()),
                ("reason", reason.to_owned()),
                ("direction", direction.to_owned()),
            ])
            .inc();
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        self.pending_adds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An ADD reached the agent (AllocateEndpoint). A repeated ADD keeps its first start.
    pub fn add_started(&self, container_id: &str, ifname: &str) {
        let mut pending = self.lock_pending();
        if pending.len() >= MAX_PENDING_ADDS {
            return;
        }
        pending
            .entry((container_id.to_owned(), ifname.to_owned()))
            .or_insert_with(Instant::now);
    }

    /// The ADD's endpoint is enforced (ActivateEndpoint succeeded).
    pub fn add_finished(&self, container_id: &str, ifname: &str) {
        let started = self
            .lock_pending()
            .remove(&(container_id.to_owned(), ifname.to_owned()));
        if let Some(started) = started {
            self.cni_seconds
                .get_or_create(&vec![("command", "add".to_owned())])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// A DEL (ReleaseEndpoint) took `seconds`; an ADD still pending for it is abandoned.
    pub fn del_finished(&self, container_id: &str, ifname: &str, seconds: f64) {
        self.lock_pending()
            .remove(&(container_id.to_owned(), ifname.to_owned()));
        self.cni_seconds
            .get_or_create(&vec![("command", "del".to_owned())])
            .observe(seconds);
    }

    /// ADDs started and not finished: endpoints being allocated.
    pub fn adds_in_progress(&self) -> usize {
        self.lock_pending().len()
    }
}
