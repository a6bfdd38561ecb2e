//! `cargo xtask build [--release]`: the binaries Weir ships, as the tests, the lab, the benchmarks
//! and the image use them: `cargo build --bins`, then weir-cni again as a static executable.
//!
//! Why static: kubelet starts weir-cni for every pod's ADD and DEL, so its start-up is paid on
//! every call. A static, non-PIE executable has no dynamic loader to run (no libgcc_s, libm and
//! libc to map and relocate), which saves CPU on every call compared with cargo's default
//! (dynamic, PIE) build; `cargo xtask bench cni` prints the CPU per call. It also runs on
//! any node whatever its libc, as the Go plugins in /opt/cni/bin do, although the image that
//! installs it was built on another distribution.
//!
//! The static build needs an explicit `--target`: only then do RUSTFLAGS reach the plugin's code
//! alone, not the build scripts and proc-macros (which cannot be linked statically). Its output
//! then replaces cargo's dynamic `target/<profile>/weir-cni`, where everything looks for it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C relocation-model=static";

#[derive(clap::Args)]
pub struct Options {
    /// Optimised binaries (target/release) instead of target/debug.
    #[arg(long)]
    pub release: bool,
    /// Build with exactly the versions in Cargo.lock (as the image does).
    #[arg(long)]
    pub locked: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let dir = build(options.release, options.locked)?;
    println!(
        "build: weir-agent and weir-cni (static) are in {}",
        dir.display()
    );
    Ok(())
}

/// Builds every binary of the default members (weir-agent, weir-cni, xtask's lab servers), then
/// the static weir-cni in place of cargo's; returns `target/<profile>`.
pub fn binaries(release: bool) -> anyhow::Result<PathBuf> {
    build(release, false)
}

fn build(release: bool, locked: bool) -> anyhow::Result<PathBuf> {
    let mut all = vec!["build", "--bins"];
    all.extend(flags(release, locked));
    cargo(&all, &[], "building weir-agent and weir-cni")?;
    static_cni(release, locked)
}

fn flags(release: bool, locked: bool) -> Vec<&'static str> {
    [(release, "--release"), (locked, "--locked")]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect()
}

/// Builds weir-cni as a static executable and puts it in place of cargo's
/// `target/<profile>/weir-cni` (which a `cargo build` of the binaries made first); returns
/// `target/<profile>`.
pub fn static_cni(release: bool, locked: bool) -> anyhow::Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    let flags = flags(release, locked);
    let triple = host_triple()?;
    let mut static_build = vec!["build", "--package", "weir-cni", "--target", &triple];
    static_build.extend(&flags);
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(own) if !own.trim().is_empty() => format!("{own} {STATIC_RUSTFLAGS}"),
        _ => STATIC_RUSTFLAGS.to_owned(),
    };
    cargo(
        &static_build,
        &[("RUSTFLAGS", &rustflags)],
        "building weir-cni as a static executable",
    )?;

    let target = workspace_root().join("target");
    let built = target.join(&triple).join(profile).join("weir-cni");
    if has_interpreter(&built)? {
        bail!(
            "{} still needs a dynamic loader: is the static C library installed (libc6-dev \
             carries libc.a)?",
            built.display()
        );
    }
    let dir = target.join(profile);
    let installed = dir.join("weir-cni");
    // cargo's weir-cni is a hard link into target/<profile>/deps: unlink it rather than write
    // through it, so cargo's own copy stays intact.
    match std::fs::remove_file(&installed) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", installed.display()));
        }
        _ => {}
    }
    std::fs::copy(&built, &installed)
        .with_context(|| format!("copying {} to {}", built.display(), installed.display()))?;
    Ok(dir)
}

/// The workspace's root directory (where Cargo.toml, target/ and examples/ are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cargo <args>` in the workspace root with `env` added, saying what it does; an error
/// names `what` when cargo fails.
pub fn cargo(args: &[&str], env: &[(&str, &str)], what: &str) -> anyhow::Result<()> {
    println!("\n==> {what}: cargo {}", args.join(" "));
    let status = cargo_command()
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("{what}: could not start cargo"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `cargo`, in the workspace root, with the environment a shell would give it.
///
/// `cargo xtask` runs under `cargo run`, which gives xtask the variables of its own package
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...). A nested cargo must not see them: some build
/// scripts name them in `rerun-if-env-changed` (ring does), and cargo compares the values in its
/// own environment with those of the last run. The `cargo run` that starts xtask sees none, the
/// cargo xtask starts would see xtask's, so every `cargo xtask test` ran ring's build script
/// twice and rebuilt everything above ring (rustls, kube, the agent, the tests) on a warm
/// target directory with nothing changed.
pub fn cargo_command() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_set_by_cargo_run) {
            command.env_remove(name);
        }
    }
    command
}

/// The variables `cargo run` sets for the package it runs (its manifest, name, version,
/// authors, crate and binary name); not `CARGO` (which cargo to run) nor the user's own
/// `CARGO_*` settings (`CARGO_HOME`, `CARGO_TARGET_DIR`, ...).
fn is_set_by_cargo_run(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// The triple rustc builds for by default (`host:` in `rustc -vV`).
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .current_dir(workspace_root())
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

/// Whether an ELF executable asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELF64, little-endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} has a truncated ELF header", path.display());
    };
    Ok((0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at) == Some(PT_INTERP)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        // Any dynamically linked executable of the machine will do; the running test is one.
        let me = std::env::current_exe().unwrap();
        assert!(has_interpreter(&me).unwrap());
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        std::fs::write(&dir, b"#!/bin/sh\n").unwrap();
        let err = has_interpreter(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.contains("not a 64-bit"), "{err}");
    }
}
