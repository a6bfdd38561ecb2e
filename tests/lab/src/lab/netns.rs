//! Network namespaces and the commands run inside them: `ip`, `nsenter`, `setns`.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    run(Command::new("ip").args(args))
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Writes a sysctl inside a namespace (through /proc/sys of a process in it).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run(Command::new("nsenter")
        .arg(format!("--net={}", path(ns).display()))
        .args(["sysctl", "-q", "-w", &format!("{key}={value}")]))
}

/// A command that runs `program` inside the namespace `ns` (nsenter --net, so /sys and the bpffs
/// mounts of the caller stay as they are).
pub fn command_in(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", path(ns).display()))
        .arg(program);
    cmd
}

/// Makes `cmd` a detached process: its own session (no terminal signals), no signals blocked.
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid and sigprocmask are async-signal-safe and touch only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
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
    Ok(())
}

/// Moves the calling thread into the namespace. Use on a thread that is thrown away afterwards.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name}"))?;
    Ok(())
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
