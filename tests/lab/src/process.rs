//! Processes the harness starts and finds again: the workspace's binaries, detached processes
//! (a lab's agents and servers outlive the command that made them), and what /proc says of a pid.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// A binary of the workspace: `explicit`, or the path in the environment variable `env`, or in
/// WEIR_BIN_DIR (the benchmarks point it at target/release), next to the running executable
/// (or its parent, for test binaries in target/debug/deps), in $CARGO_TARGET_DIR/debug, or in
/// the workspace's target/debug.
pub fn find_bin(name: &str, env: &str, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("WEIR_BIN_DIR") {
        candidates.push(Path::new(&dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&target).join("debug").join(name));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/debug")
            .join(name),
    );
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found: build it first (`cargo xtask build`; `cargo xtask test` does), or set {env}")
        })
}

/// [`find_bin`] for tests: `weir-agent`, `weir-cni` or `weir` (WEIR_AGENT_BIN, WEIR_CNI_BIN,
/// WEIR_CLI_BIN), panicking when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let env = match name {
        "weir-agent" => "WEIR_AGENT_BIN",
        "weir-cni" => "WEIR_CNI_BIN",
        "weir" => "WEIR_CLI_BIN",
        _ => "WEIR_BIN",
    };
    find_bin(name, env, None).unwrap_or_else(|e| panic!("{e:#}"))
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

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `name` (a test's namespace or directory) ends in `-<pid>` of a process that is gone.
/// A test's guards clean up on drop, also when it fails, but not when its process is killed
/// (SIGKILL, or Ctrl-C, which no harness here catches); what such a process made carries its pid
/// in its name. A name without a pid, or whose pid runs (its owner, or an unrelated process that
/// reused the pid), is not a leftover: tests and benchmarks may run side by side.
pub fn owner_is_gone(name: &str) -> bool {
    name.rsplit_once('-')
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid > 0 && !alive(pid))
}

/// The command line of `pid`, arguments separated and ended by a space.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut s: String = raw
        .split(|&b| b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    s.push(' ');
    Some(s)
}

/// The processes (but this one) whose command line contains `marker`.
pub fn find(marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|&pid| cmdline(pid).is_some_and(|c| c.contains(marker)))
        .collect()
}

/// Signals `pid` only if its command line still contains one of `markers` (a pid recorded
/// earlier may have been reused by another process since).
pub fn signal_if(pid: u32, markers: &[&str], signal: i32) {
    let Some(cmd) = cmdline(pid) else { return };
    if markers.iter().any(|m| cmd.contains(m)) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as i32, signal);
        }
    }
}

/// Resident memory of `pid` (VmRSS), in MiB; 0 if it is gone.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The last `lines` lines of a file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
