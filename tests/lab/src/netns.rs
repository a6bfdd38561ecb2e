//! Network namespaces for tests, deleted on drop (also when the test fails).

use std::process::Command;

/// A network namespace at /run/netns/<name>, with `lo` up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `weir-t-<tag>-<pid>` (unique per test process and tag).
    pub fn new(tag: &str) -> Self {
        let name = format!("wt-{tag}-{}", std::process::id());
        // A leftover from a killed run of the same pid (unlikely) is removed first.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// /run/netns/<name>, for CNI_NETNS and nsenter.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs `program` inside this namespace (network only: the mount namespace,
    /// hence /sys/fs/bpf, stays the machine's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path())).arg(program);
        cmd
    }

    /// The tc filters on one hook ("ingress" or "egress") of `ifname` in this namespace, as
    /// `tc filter show` prints them (empty when the interface has no clsact qdisc).
    pub fn tc_filters(&self, ifname: &str, hook: &str) -> String {
        let out = self
            .command("tc")
            .args(["filter", "show", "dev", ifname, hook])
            .output()
            .unwrap_or_else(|e| panic!("cannot run tc: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip <args>` in the namespace and panics with its output on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a new thread inside the network namespace at `path` (a thread's namespace is its
/// own: the rest of the process stays where it is).
pub fn spawn_in<T: Send + 'static>(
    path: impl Into<std::path::PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsFd as _;
    let path = path.into();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
        f()
    })
}
