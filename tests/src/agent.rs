//! A real `weir-agent` process in a node namespace, stopped and uninstalled on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

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

/// A running agent. Dropping it kills it (SIGKILL: pins stay; `AgentDirs` removes them).
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `weir-agent` in `netns` and waits until its socket answers.
    pub fn start(netns: &Netns, node: &str, dirs: &AgentDirs, extra: &[&str]) -> Self {
        let log = dirs.root.join(format!("{node}-agent.log"));
        let log_file = std::fs::File::create(&log).expect("creating the agent log");
        let mut cmd = netns.command(bin("weir-agent").to_str().expect("utf-8 path"));
        cmd.args(["--node-name", node])
            .arg("--manifests")
            .arg(&dirs.manifests)
            .arg("--state-dir")
            .arg(&dirs.state)
            .arg("--socket")
            .arg(&dirs.socket)
            .arg("--bpffs-dir")
            .arg(&dirs.bpffs)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().expect("starting weir-agent");
        let agent = Self { child, log };
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains("serving the agent API") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "weir-agent did not become ready in {timeout:?}; its log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's process id (nsenter execs the agent, so the child is the agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
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
