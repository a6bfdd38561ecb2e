//! Mesh control plane through the real agents, on a mesh lab (two clusters, west and east, a
//! gateway and a worker each, joined only through the WAN namespace):
//!
//! (a) A pod's label change in west, until east enforces it. West's client pod (on west's worker)
//!     flips between `role: allowed` and `role: denied`; east's server (on east's gateway node)
//!     admits `role: allowed` pods of cluster west. The change is a write of the Pod's manifest;
//!     enforcement is observed with real traffic: the client sends a UDP probe every 2 ms, each
//!     from a new socket (a new flow, so conntrack never carries an old verdict), and the time is
//!     the send time of the first probe that shows the new verdict for good (for an allow: the
//!     first answered probe; for a deny: the first of the unanswered probes that follow the last
//!     answered one), minus the time of the write. So it includes west's manifest watch, its
//!     export, the sync to east, east's compile and map writes, and the probe's own trip (about a
//!     millisecond); its resolution is the 2 ms probe interval.
//!     Baseline, same run and same method: the same label change of a pod of east itself (on
//!     east's worker), enforced on the same node of east: local propagation.
//! (b) The first sync of 10,000 exported endpoints (100 label sets), gateway to gateway: east's
//!     MeshPeer for west is removed (east forgets west's import and its file), then written
//!     again; the time runs from that write until east's gateway has persisted the complete
//!     import, which it does only after west's "synced" marker. It includes east's manifest watch,
//!     the dial, the TLS handshake and the snapshot. Also shown: the same 10,000 pods appearing in
//!     west's manifests, until east holds them (a delta on the live session).
//!
//! Only the gateways import today (agents on other nodes getting the gateway's merged import is
//! the mesh control plane's next part), so east's enforcing node is its gateway.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use weir_lab::lab::{
    Manifest,
    mesh::{ClusterSpec, MeshLab, MeshSpec},
};
use weir_lab::netns;

use super::stats::{Samples, ms};

const LAB: &str = "msync";
const PORT: u16 = 8080;
const PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// A probe not answered within this is unanswered (answers take about a millisecond).
const ANSWER_WINDOW: Duration = Duration::from_millis(500);
const BULK_PODS: usize = 10_000;

fn pod(name: &str, ns: &str, node: &str, role: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}, role: {role}}}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - containerPort: {PORT}\n      protocol: UDP\n"
    )
}

fn namespace(name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{mesh.weir.io/export: 'true'}}}}\n"
    )
}

/// East's server admits `role: allowed` pods of cluster west, and of its own namespace.
const SERVER_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: server, namespace: pay}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  \
    policyTypes: [Ingress]\n  ingress:\n  - from:\n    \
    - namespaceSelector: {matchLabels: {weir.io/cluster: west}}\n      podSelector: {matchLabels: {role: allowed}}\n    \
    - podSelector: {matchLabels: {role: allowed}}\n";

pub fn run(rounds: usize) -> anyhow::Result<()> {
    let cluster = |name: &str, yaml: String| ClusterSpec {
        name: name.into(),
        nodes: 2,
        gateways: 1,
        manifests: vec![Manifest::Yaml(yaml)],
    };
    let west = format!(
        "{}{}",
        namespace("shop"),
        pod("client", "shop", "node2", "denied")
    );
    let east = format!(
        "{}{}{}---\n{SERVER_POLICY}",
        namespace("pay"),
        pod("server", "pay", "node1", "server"),
        pod("local", "pay", "node2", "denied")
    );
    let mut lab = MeshLab::up(MeshSpec {
        name: LAB.into(),
        clusters: vec![cluster("west", west), cluster("east", east)],
        extra_ports: Vec::new(),
        capture_wan: false,
    })?;
    let server = SocketAddr::new(lab.cluster("east")?.pod_ip("pay/server")?, PORT);

    println!(
        "mesh sync through the real agents (two clusters, {rounds} rounds; each sample is one label change):"
    );
    let mut remote = Vec::new();
    let mut local = Vec::new();
    for round in 0..rounds {
        for allowed in [true, false] {
            remote.push(
                change_label(&mut lab, "west", "shop", "client", allowed, server)
                    .with_context(|| format!("round {round}: west's client"))?,
            );
            local.push(
                change_label(&mut lab, "east", "pay", "local", allowed, server)
                    .with_context(|| format!("round {round}: east's own pod"))?,
            );
        }
    }
    let (remote, local) = (Samples::new(remote), Samples::new(local));
    println!(
        "  (a) label change in west, enforced on east's node: p50 {} p99 {}  (goal p99 <= 300 ms)",
        ms(remote.percentile(50.0)),
        ms(remote.percentile(99.0))
    );
    println!(
        "      baseline, the same change of one of east's own pods: p50 {} p99 {}; ratio p50 {:.2}x, p99 {:.2}x",
        ms(local.percentile(50.0)),
        ms(local.percentile(99.0)),
        ratio(remote.percentile(50.0), local.percentile(50.0)),
        ratio(remote.percentile(99.0), local.percentile(99.0)),
    );

    first_sync(&mut lab, 5)?;
    lab.down()
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// Sets the pod's `role` label (allowed or denied) and returns how long until the server's
/// node enforces it, observed with probes from the pod.
fn change_label(
    lab: &mut MeshLab,
    cluster: &str,
    ns: &str,
    name: &str,
    allowed: bool,
    server: SocketAddr,
) -> anyhow::Result<Duration> {
    let netns = lab.pod_netns(&format!("{cluster}/{ns}/{name}"))?;
    let prober = Prober::start(&netns, server)?;
    // The previous verdict holds before the change (the previous round settled it).
    let before = Instant::now();
    while prober.settled_since(before, !allowed).is_none() {
        if before.elapsed() > Duration::from_secs(10) {
            bail!("{cluster}/{ns}/{name}: the verdict before the change is not settled");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let labels = BTreeMap::from([
        ("app".to_string(), name.to_string()),
        (
            "role".to_string(),
            if allowed { "allowed" } else { "denied" }.to_string(),
        ),
    ]);
    let written = Instant::now();
    lab.cluster_mut(cluster)?
        .set_labels("Pod", Some(ns), name, &labels)?;
    loop {
        if let Some(at) = prober.settled_since(written, allowed) {
            prober.stop();
            return Ok(at.saturating_duration_since(written));
        }
        if written.elapsed() > Duration::from_secs(20) {
            prober.stop();
            bail!(
                "{cluster}/{ns}/{name} set to role={} was not enforced within 20 s",
                labels["role"]
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A probe: when it was sent, and when it was answered.
#[derive(Clone, Copy)]
struct Probe {
    sent: Instant,
    answered: Option<Instant>,
}

/// UDP probes every [`PROBE_INTERVAL`] from a pod's namespace, each from a new socket.
struct Prober {
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(netns: &str, to: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let (stop2, probes2, ns) = (Arc::clone(&stop), Arc::clone(&probes), netns.to_string());
        let thread = std::thread::spawn(move || {
            if netns::enter(&ns).is_ok() {
                probe_loop(to, &stop2, &probes2);
            }
        });
        Ok(Prober {
            stop,
            probes,
            thread: Some(thread),
        })
    }

    /// If the verdict `allowed` holds for good from some probe sent after `since`: that probe's
    /// send time. An allow holds from the first answered probe; a deny from the first of the
    /// unanswered probes after the last answered one, once at least 50 ms of probes (sent long
    /// enough ago to be known unanswered) agree.
    fn settled_since(&self, since: Instant, allowed: bool) -> Option<Instant> {
        let now = Instant::now();
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let after: Vec<&Probe> = probes.iter().filter(|p| p.sent >= since).collect();
        if allowed {
            return after.iter().find(|p| p.answered.is_some()).map(|p| p.sent);
        }
        // Only probes whose answer window has passed count.
        let decided: Vec<&&Probe> = after
            .iter()
            .filter(|p| p.answered.is_some() || now.duration_since(p.sent) > ANSWER_WINDOW)
            .collect();
        let last_answered = decided.iter().rposition(|p| p.answered.is_some());
        let first_denied = match last_answered {
            Some(i) => decided.get(i + 1)?,
            None => decided.first()?,
        };
        let last = decided.last()?;
        (last.sent.duration_since(first_denied.sent) >= Duration::from_millis(50))
            .then_some(first_denied.sent)
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe_loop(to: SocketAddr, stop: &AtomicBool, probes: &Mutex<Vec<Probe>>) {
    // Sockets waiting for an answer: (index into probes, socket).
    let mut waiting: Vec<(usize, UdpSocket)> = Vec::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next = now + PROBE_INTERVAL;
            if let Ok(socket) = UdpSocket::bind("0.0.0.0:0")
                && socket.set_nonblocking(true).is_ok()
            {
                let sent = Instant::now();
                if socket.send_to(b"probe", to).is_ok() {
                    let mut list = probes.lock().unwrap_or_else(|p| p.into_inner());
                    list.push(Probe {
                        sent,
                        answered: None,
                    });
                    waiting.push((list.len() - 1, socket));
                }
            }
        }
        // Wait for answers until the next probe is due (one poll for every waiting socket).
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|(_, s)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait = next.saturating_duration_since(Instant::now());
        // SAFETY: fds is a valid array of fds.len() pollfd structures owned here.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().min(1000) as i32,
            )
        };
        if ready <= 0 && fds.is_empty() {
            std::thread::sleep(wait);
        }
        let answered_at = Instant::now();
        let mut list = probes.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep = Vec::with_capacity(waiting.len());
        for ((index, socket), fd) in waiting.drain(..).zip(&fds) {
            if fd.revents & libc::POLLIN != 0 && matches!(socket.recv(&mut buf), Ok(n) if n > 0) {
                list[index].answered = Some(answered_at);
            } else if answered_at.duration_since(list[index].sent) < ANSWER_WINDOW {
                keep.push((index, socket));
            }
        }
        waiting = keep;
    }
}

/// (b): the first sync of BULK_PODS exported endpoints, `rounds` times.
fn first_sync(lab: &mut MeshLab, rounds: usize) -> anyhow::Result<()> {
    let import = lab.import_path("east", "west")?;
    let prefix = &lab
        .state()
        .cluster("west")
        .context("no cluster west")?
        .pod_prefix;
    let base: IpAddr = prefix.split('/').next().unwrap_or_default().parse()?;
    let IpAddr::V4(base) = base else {
        bail!("IPv4 prefixes only")
    };
    let [a, b, ..] = base.octets();
    let mut yaml = namespace("bulk");
    for i in 0..BULK_PODS {
        // Addresses in west's prefix, away from its nodes' pod CIDRs (10.x.1-2.0/24).
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b{i}, namespace: bulk, labels: {{app: a{}}}}}\n\
             spec: {{nodeName: elsewhere}}\nstatus: {{podIPs: [{{ip: '{a}.{b}.{}.{}'}}]}}\n",
            i % 100,
            100 + i / 250,
            1 + i % 250
        );
    }
    let west_manifests = lab.cluster("west")?.state().manifests_dir();
    let before = endpoints_in(&import);
    let written = Instant::now();
    write_atomically(&west_manifests.join("bulk.yaml"), &yaml)?;
    // Reading the whole import is not free: every 10 ms (the resolution of this number).
    wait_for(Duration::from_secs(60), Duration::from_millis(10), || {
        endpoints_in(&import) >= before + BULK_PODS
    })
    .context("east never held west's 10,000 new endpoints")?;
    let live = written.elapsed();

    let east = lab.cluster("east")?.state().manifests_dir();
    let peer_file = std::fs::read_dir(&east)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("meshpeer_"))
                && std::fs::read_to_string(p).is_ok_and(|t| t.contains("name: west"))
        })
        .context("east's MeshPeer for west")?;
    let peer_yaml = std::fs::read_to_string(&peer_file)?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        std::fs::remove_file(&peer_file)?;
        wait_for(Duration::from_secs(30), Duration::from_millis(1), || {
            !import.exists()
        })
        .context("east kept west's import after its MeshPeer went")?;
        let written = Instant::now();
        write_atomically(&peer_file, &peer_yaml)?;
        wait_for(Duration::from_secs(60), Duration::from_millis(1), || {
            import.exists()
        })
        .context("east never completed the first sync")?;
        samples.push(written.elapsed());
        let held = endpoints_in(&import);
        if held < BULK_PODS {
            bail!("east's first sync holds {held} endpoints, not {BULK_PODS} or more");
        }
    }
    let samples = Samples::new(samples);
    println!(
        "  (b) first sync of {} exported endpoints (100 label sets), gateway to gateway, {rounds} rounds: \
         median {} max {}  (goal <= 2 s)",
        endpoints_in(&import),
        ms(samples.percentile(50.0)),
        ms(samples.percentile(100.0))
    );
    println!(
        "      the same 10,000 pods written into west's manifests, until east held them over the live session: {}",
        ms(live)
    );
    Ok(())
}

/// Endpoints in a persisted import (0 if there is none).
fn endpoints_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches("\"ep/").count())
        .unwrap_or(0)
}

/// Written whole under a hidden name, then renamed: the agents never read half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a file path")?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Polls `done` every `every` until it holds or `timeout` passes.
fn wait_for(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("not within {timeout:?}");
        }
        std::thread::sleep(every);
    }
    Ok(())
}
