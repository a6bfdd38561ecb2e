//! `cargo xtask setup`: makes the machine able to build the kernel programs, idempotently.
//! Each step checks first and says what it does; where it cannot install, it says what to install.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::toolchain::{BPF_LINKER_VERSION, LLVM_MAJOR, LLVM_PACKAGES, LLVM_PREFIX, NIGHTLY};

/// Runs every step; returns an error naming what is missing and how to get it.
pub fn run() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    println!("setup: everything the kernel programs need is present");
    // Only the mesh benchmark needs these; a machine without apt still builds and tests.
    if let Err(e) = ensure_mesh_bench_packages() {
        println!("setup: warning: {e:#}");
    }
    Ok(())
}

/// True when `run` has nothing left to do (so `test` and `demo` call it only when needed).
pub fn is_complete() -> bool {
    nightly_present() && rust_src_present() && bpf_linker_present()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    println!("setup: {what}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); the command was {cmd:?}");
    }
    Ok(())
}

fn nightly_present() -> bool {
    output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])).is_some()
}

fn ensure_nightly() -> anyhow::Result<()> {
    if nightly_present() {
        return Ok(());
    }
    status(
        Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]),
        "installing the nightly toolchain",
    )
    .context(
        "the kernel programs need a nightly Rust toolchain (`rustup toolchain install nightly`)",
    )
}

fn rust_src_present() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .is_some_and(|list| list.lines().any(|l| l.starts_with("rust-src")))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    if rust_src_present() {
        return Ok(());
    }
    status(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "adding rust-src to the nightly (for -Z build-std=core)",
    )
}

fn bpf_linker_present() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_present() {
        return Ok(());
    }
    ensure_llvm()?;
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // The workspace's rust-toolchain.toml must not leak into the install.
            .current_dir(std::env::temp_dir()),
        &format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 4 minutes)"
        ),
    )
}

fn ensure_llvm() -> anyhow::Result<()> {
    let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if llvm_config.exists() {
        return Ok(());
    }
    let have_apt = Path::new("/usr/bin/apt-get").exists();
    let is_root = nix_is_root();
    if !(have_apt && is_root) {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} needs LLVM {LLVM_MAJOR} development files at {LLVM_PREFIX}, \
             and this machine {}; install the packages {} (Debian/Ubuntu names; elsewhere LLVM {LLVM_MAJOR} \
             with its static libraries and Polly), then run `cargo xtask setup` again",
            if have_apt {
                "is not being set up as root"
            } else {
                "has no apt-get"
            },
            LLVM_PACKAGES.join(" "),
        );
    }
    status(
        Command::new("apt-get").args(["update", "-q"]),
        "refreshing the apt index",
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(LLVM_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("installing LLVM {LLVM_MAJOR} for bpf-linker"),
    )
}

/// iptables, for the traffic benchmark's baseline (not needed to build or test).
pub fn ensure_iptables() -> anyhow::Result<()> {
    if output(Command::new("iptables-restore").arg("--version")).is_some() {
        return Ok(());
    }
    if !(Path::new("/usr/bin/apt-get").exists() && nix_is_root()) {
        bail!("the traffic benchmark compares against iptables: install iptables and run it again");
    }
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "iptables"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "installing iptables for the benchmark's baseline",
    )
}

/// What the mesh benchmark measures with, from apt: iperf3 (TCP), sockperf (UDP
/// request/response) and wireguard-tools (`wg`, to configure the boringtun anchor).
const MESH_BENCH_PACKAGES: [(&str, &str); 3] = [
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("wg", "wireguard-tools"),
];

pub fn ensure_mesh_bench_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = MESH_BENCH_PACKAGES
        .iter()
        .filter(|(program, _)| Command::new(program).arg("--version").output().is_err())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !(Path::new("/usr/bin/apt-get").exists() && nix_is_root()) {
        bail!(
            "the mesh benchmark needs {}: install them and run it again",
            missing.join(", ")
        );
    }
    status(
        Command::new("apt-get").args(["update", "-q"]),
        "refreshing the apt index",
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "installing the mesh benchmark's tools",
    )
}

/// boringtun-cli, the mesh benchmark's anchor (userspace WireGuard), built from crates.io into
/// a cache directory shared by checkouts; returns its path.
pub fn ensure_boringtun() -> anyhow::Result<std::path::PathBuf> {
    let root = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from("/var/cache"))
        .join("weir/bench-tools");
    let bin = root.join("bin/boringtun-cli");
    if output(Command::new(&bin).arg("--version")).is_some() {
        return Ok(bin);
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                "boringtun-cli",
                "--version",
                BORINGTUN_VERSION,
                "--locked",
                "--root",
            ])
            .arg(&root)
            .current_dir(std::env::temp_dir()),
        &format!(
            "building boringtun-cli {BORINGTUN_VERSION} for the mesh benchmark (about 2 minutes)"
        ),
    )?;
    Ok(bin)
}

/// The boringtun-cli the mesh benchmark compares with.
const BORINGTUN_VERSION: &str = "0.7.1";

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}
