//! A real `weir-agent` process in a node namespace: the one way tests, benchmarks and the lab
//! start an agent ([`AgentArgs`] writes its command line, [`wait_ready`] waits for it), and the
//! test-owned [`Agent`], stopped on drop.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Once,
    time::{Duration, Instant},
};

pub use crate::process::bin;
use crate::{
    netns::{Netns, spawn_in},
    process,
};

/// How long an agent may take to become ready: a large cluster (the benchmarks') takes a while
/// to read and compile.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The prefix of a test's directories and of its pins' directory: `<prefix><tag>-<pid>`.
const DIRS_PREFIX: &str = "weir-test-";
/// Where the tests' pins go.
const BPFFS: &str = "/sys/fs/bpf";

/// Removes the directories and pins of test processes that were killed
/// (`process::owner_is_gone`); bpffs removes a pin on unlink, so its directories go like any.
fn remove_killed_tests_dirs() {
    for parent in [std::env::temp_dir(), PathBuf::from(BPFFS)] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(DIRS_PREFIX) && process::owner_is_gone(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Per-test directories and pins of one node's agent.
pub struct AgentDirs {
    pub root: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
}

impl AgentDirs {
    pub fn new(tag: &str, node: &str) -> Self {
        static SWEPT: Once = Once::new();
        SWEPT.call_once(remove_killed_tests_dirs);
        let root = std::env::temp_dir().join(format!("{DIRS_PREFIX}{tag}-{}", std::process::id()));
        let dirs = Self {
            manifests: root.join("manifests"),
            state: root.join(format!("state-{node}")),
            socket: root.join(format!("{node}.sock")),
            bpffs: PathBuf::from(format!(
                "{BPFFS}/{DIRS_PREFIX}{tag}-{}/{node}",
                std::process::id()
            )),
            root,
        };
        std::fs::create_dir_all(&dirs.manifests).expect("creating the manifests directory");
        dirs
    }
}

impl AgentDirs {
    /// Directories for another node of the same cluster: its own state, socket and pins, the
    /// first node's manifests directory (one API server for all).
    pub fn sharing_manifests(tag: &str, node: &str, first: &AgentDirs) -> Self {
        let mut dirs = Self::new(&format!("{tag}-{node}"), node);
        dirs.manifests = first.manifests.clone();
        dirs
    }

    /// The agent's command line for `node` reading `source`, with these directories.
    pub fn args<'a>(
        &'a self,
        node: &'a str,
        source: ClusterSource<'a>,
        extra: &'a [&'a str],
    ) -> AgentArgs<'a> {
        AgentArgs {
            node,
            source: match source {
                ClusterSource::Manifests => Source::Manifests(&self.manifests),
                ClusterSource::Kubernetes { kubeconfig } => Source::Kubernetes(kubeconfig),
            },
            state: &self.state,
            socket: &self.socket,
            bpffs: &self.bpffs,
            extra,
        }
    }
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        if let Some(parent) = self.bpffs.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Where an agent reads the cluster from.
#[derive(Clone, Copy, Debug)]
pub enum ClusterSource<'a> {
    /// Standalone mode: the [`AgentDirs`]' manifests directory.
    Manifests,
    /// Kubernetes mode: the API server this kubeconfig points at.
    Kubernetes { kubeconfig: &'a Path },
}

/// Where an [`AgentArgs`] agent reads the cluster from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// Standalone mode: this manifests directory.
    Manifests(&'a Path),
    /// Kubernetes mode: the API server this kubeconfig points at.
    Kubernetes(&'a Path),
}

/// An agent's command line: what every agent start (tests, benchmarks, the lab) passes.
#[derive(Clone, Copy, Debug)]
pub struct AgentArgs<'a> {
    pub node: &'a str,
    pub source: Source<'a>,
    pub state: &'a Path,
    pub socket: &'a Path,
    pub bpffs: &'a Path,
    /// More flags (`--pod-cidr`, `--overlay`, ...).
    pub extra: &'a [&'a str],
}

impl AgentArgs<'_> {
    /// `program` with these arguments, to run inside the namespace `netns` (network only: the
    /// mount namespace, hence /sys/fs/bpf, stays the machine's).
    pub fn command(&self, program: &Path, netns: &str) -> Command {
        let mut cmd = crate::netns::command_in(netns, program);
        cmd.args(["--node-name", self.node]);
        match self.source {
            Source::Manifests(dir) => {
                cmd.arg("--manifests").arg(dir);
            }
            Source::Kubernetes(kubeconfig) => {
                cmd.arg("--kubernetes").env("KUBECONFIG", kubeconfig);
            }
        }
        cmd.arg("--state-dir")
            .arg(self.state)
            .arg("--socket")
            .arg(self.socket)
            .arg("--bpffs-dir")
            .arg(self.bpffs)
            .args(self.extra)
            .stdin(Stdio::null());
        cmd
    }
}

/// Why an agent did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// The process ended first (its exit, as far as it is known).
    Exited(String),
    TimedOut(Duration),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(how) => write!(f, "exited ({how}) before it was ready"),
            NotReady::TimedOut(t) => write!(f, "did not become ready in {t:?}"),
        }
    }
}

/// Waits until the agent listening on `socket` is ready: its API accepts a connection. The agent
/// serves its API only once it has read the cluster state and put it in the datapath, and a stale
/// socket file from an earlier agent refuses connections. `exited` says whether (and how) the
/// process has ended.
pub fn wait_ready(
    socket: &Path,
    timeout: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(how) = exited() {
            return Err(NotReady::Exited(how));
        }
        if Instant::now() > deadline {
            return Err(NotReady::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on an agent's health endpoint at 127.0.0.1:`port` inside `netns`: the status code
/// and body (0 and empty when nothing answers).
pub fn health_get(netns: &Netns, port: u16, path: &str) -> (u16, String) {
    let path = path.to_owned();
    spawn_in(netns.path(), move || {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return (0, String::new());
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut response = String::new();
        if stream.write_all(request.as_bytes()).is_err()
            || stream.read_to_string(&mut response).is_err()
        {
            return (0, String::new());
        }
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .join()
    .expect("the health request's thread panicked")
}

/// The verdict records an agent with this state directory wrote (`flows.jsonl`), oldest first.
pub fn flows(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("flows.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The value of one sample (`name` or `name{labels}`, exactly) in Prometheus text.
pub fn metric(metrics: &str, sample: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// A running agent owned by a test. Dropping it kills it (SIGKILL: pins stay; `AgentDirs`
/// removes them).
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `weir-agent` in standalone mode in `netns` and waits until it is ready.
    pub fn start(netns: &Netns, node: &str, dirs: &AgentDirs, extra: &[&str]) -> Self {
        Self::start_with(
            &bin("weir-agent"),
            ClusterSource::Manifests,
            netns,
            node,
            dirs,
            extra,
        )
    }

    /// Starts `program` (a `weir-agent` binary, e.g. another build to compare with) reading
    /// `source`, and waits until it is ready.
    pub fn start_with(
        program: &Path,
        source: ClusterSource<'_>,
        netns: &Netns,
        node: &str,
        dirs: &AgentDirs,
        extra: &[&str],
    ) -> Self {
        let log = dirs.root.join(format!("{node}-agent.log"));
        let log_file = std::fs::File::create(&log).expect("creating the agent log");
        let child = dirs
            .args(node, source, extra)
            .command(program, &netns.name)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting weir-agent");
        let mut agent = Self { child, log };
        let ready = wait_ready(&dirs.socket, READY_TIMEOUT, || {
            agent
                .child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| status.to_string())
        });
        if let Err(e) = ready {
            panic!("weir-agent {e}; its log:\n{}", agent.log_text());
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's process id (nsenter execs the agent, so the child is the agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the agent process (VmRSS), in MiB; 0 if it is gone.
    pub fn rss_mib(&self) -> f64 {
        process::rss_mib(self.child.id())
    }

    /// Sends a signal and waits for the exit status.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        // nsenter execs the agent, so the child pid is the agent's.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signalling weir-agent");
        self.child.wait().expect("waiting for weir-agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
