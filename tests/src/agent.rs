//! A real `weir-agent` process in a node namespace, stopped and uninstalled on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, spawn_in};

/// Where cargo put the binaries (`cargo build --bins` runs before these tests in `xtask test`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
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
        let root = std::env::temp_dir().join(format!("weir-test-{tag}-{}", std::process::id()));
        let dirs = Self {
            manifests: root.join("manifests"),
            state: root.join(format!("state-{node}")),
            socket: root.join(format!("{node}.sock")),
            bpffs: PathBuf::from(format!(
                "/sys/fs/bpf/weir-test-{tag}-{}/{node}",
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

/// The value of one sample (`name` or `name{labels}`, exactly) in Prometheus text.
pub fn metric(metrics: &str, sample: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// Waits until the agent serving `socket` has written to its datapath the manifests directory
/// `manifests` as it is now (its fingerprint, in `weir status`); returns the applied generation.
/// Panics with the agent's last status after `timeout`, a bound for failures only.
pub fn wait_applied(socket: &Path, manifests: &Path, timeout: Duration) -> u64 {
    let want = weir_agent::source::manifests::fingerprint(manifests)
        .unwrap_or_else(|e| panic!("reading {}: {e}", manifests.display()));
    let deadline = Instant::now() + timeout;
    loop {
        let status = applied_status(socket);
        if let Some(status) = &status
            && status["applied_fingerprint"] == want.as_str()
        {
            return status["applied_generation"]
                .as_u64()
                .expect("applied_generation is a number");
        }
        assert!(
            Instant::now() < deadline,
            "the agent at {} has not applied {} (fingerprint {want}) after {timeout:?}; its status: {status:?}",
            socket.display(),
            manifests.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `weir status` as JSON, or `None` while the agent does not answer.
fn applied_status(socket: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(bin("weir"))
        .args(["status", "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .expect("running weir status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// How long an agent may take to apply a change before a test fails: a bound for failures, far
/// above the contract's propagation time, so a loaded machine does not fail the test.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent. Dropping it kills it (SIGKILL: pins stay; `AgentDirs` removes them).
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `weir-agent` in standalone mode in `netns` and waits until its socket answers.
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
    /// `source`, and waits until its socket answers.
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
        let mut cmd = netns.command(program.to_str().expect("utf-8 path"));
        cmd.args(["--node-name", node]);
        match source {
            ClusterSource::Manifests => {
                cmd.arg("--manifests").arg(&dirs.manifests);
            }
            ClusterSource::Kubernetes { kubeconfig } => {
                cmd.arg("--kubernetes").env("KUBECONFIG", kubeconfig);
            }
        }
        cmd.arg("--state-dir")
            .arg(&dirs.state)
            .arg("--socket")
            .arg(&dirs.socket)
            .arg("--bpffs-dir")
            .arg(&dirs.bpffs)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().expect("starting weir-agent");
        let mut agent = Self { child, log };
        // A large cluster (the benchmarks') takes a while to read and compile.
        agent.wait_ready(Duration::from_secs(120));
        agent
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains("serving the agent API") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "weir-agent exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "weir-agent did not become ready in {timeout:?}; its log:\n{}",
            self.log_text()
        );
    }

    /// Waits until the agent has written the manifests directory of `dirs`, as it is now, to
    /// its datapath; returns the applied generation. See [`wait_applied`].
    pub fn wait_applied(&self, dirs: &AgentDirs) -> u64 {
        wait_applied(&dirs.socket, &dirs.manifests, APPLY_TIMEOUT)
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
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0)
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
