//! Network namespaces and what runs inside them: named namespaces under /run/netns (the lab's,
//! which outlive the process that made them), [`Netns`] guards deleted on drop (the tests'), and
//! commands and threads entered into either.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` puts its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates the namespace (replacing a stale one of the same name) and brings its loopback up.
pub fn add(name: &str) -> anyhow::Result<()> {
    if exists(name) {
        delete(name);
    }
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the namespace; a missing namespace is not an error.
pub fn delete(name: &str) {
    if exists(name) {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }
    // `ip netns del` leaves nothing behind, but a half-created namespace may leave its file.
    let _ = std::fs::remove_file(path(name));
}

/// Names of the namespaces under /run/netns starting with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Runs `ip ARGS` in the current namespace.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    checked(Command::new("ip").args(args)).map(drop)
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    checked(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// Writes a sysctl inside a namespace (through /proc/sys of a process in it).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    checked(
        Command::new("nsenter")
            .arg(format!("--net={}", path(ns).display()))
            .args(["sysctl", "-q", "-w", &format!("{key}={value}")]),
    )
    .map(drop)
}

/// A command that runs `program` inside the namespace `ns` (nsenter --net: the mount namespace,
/// hence /sys/fs/bpf, stays the caller's).
pub fn command_in(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", path(ns).display()))
        .arg(program);
    cmd
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn checked(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the namespace at `path`. Use on a thread that is thrown away
/// afterwards (a thread's namespace is its own: the rest of the process stays where it is).
fn enter_path(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {}", path.display()))
}

/// Moves the calling thread into the namespace `name`.
pub fn enter(name: &str) -> anyhow::Result<()> {
    enter_path(&path(name))
}

/// Runs `f` on a new thread inside the namespace and returns its result.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> anyhow::Result<T> {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Runs `f` on a new thread inside the network namespace at `path`; panics if it cannot enter.
pub fn spawn_in<T: Send + 'static>(
    path: impl Into<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = path.into();
    std::thread::spawn(move || {
        enter_path(&path).unwrap_or_else(|e| panic!("{e:#}"));
        f()
    })
}

/// The prefix of the tests' namespaces, `wt-<tag>-<pid>`.
const TEST_PREFIX: &str = "wt-";

/// A test's network namespace at /run/netns/<name>, with `lo` up; deleted on drop (also when the
/// test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `wt-<tag>-<pid>` (unique per test process and tag); a leftover
    /// of the same name (a killed run of the same pid) is replaced. The first one a process
    /// creates also deletes those of test processes that were killed.
    pub fn new(tag: &str) -> Self {
        static SWEPT: Once = Once::new();
        SWEPT.call_once(|| {
            for name in list(TEST_PREFIX) {
                if crate::process::owner_is_gone(&name) {
                    delete(&name);
                }
            }
        });
        let name = format!("{TEST_PREFIX}{tag}-{}", std::process::id());
        add(&name).unwrap_or_else(|e| panic!("creating netns {name}: {e:#}"));
        Self { name }
    }

    /// /run/netns/<name>, for CNI_NETNS and nsenter.
    pub fn path(&self) -> String {
        path(&self.name).display().to_string()
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.name, Path::new(program))
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
        delete(&self.name);
    }
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    checked(Command::new(program).args(args)).unwrap_or_else(|e| panic!("{e:#}"))
}
