//! `cargo xtask test`: the whole suite, as CI runs it. Nothing is skipped: the kernel tests need
//! root, and without root this fails and says so rather than passing quietly.
//!
//! One cargo build makes the binaries the end-to-end tests drive and every test executable, so
//! the workspace's crates are compiled with one set of features (a `cargo test` per package, or
//! a `cargo build --bins` beside `cargo test`, resolves features differently and compiles the
//! agent again for each). The test executables then run side by side ([`test_binaries`]).

use anyhow::bail;

use crate::{build, setup, test_binaries};

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to the test harness).
    pub filter: Option<String>,
    /// How many test executables run at once. Most root-only tests wait on the kernel, the
    /// agents and the network more than they compute, so more than the number of CPUs pays.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
}

/// The package of the tests that need root (kernel programs, namespaces).
const ROOT_ONLY_PACKAGE: &str = "weir-tests";

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !setup::is_complete() {
        setup::run()?;
    }
    build::cargo(
        &["fmt", "--all", "--check"],
        &[],
        "formatting (fix with `cargo fmt --all`)",
    )?;
    build::cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--exclude",
            "weir-ebpf",
            "--",
            "-D",
            "warnings",
        ],
        &[],
        "clippy",
    )?;
    // Binaries first in target/debug (the end-to-end tests find them there), weir-cni then
    // replaced by its static build as `cargo xtask build` makes it.
    let executables = test_binaries::build(
        &[
            "build",
            "--workspace",
            "--exclude",
            "weir-ebpf",
            "--bins",
            "--tests",
        ],
        "building the binaries and the test executables",
    )?;
    build::static_cni(false, false)?;
    let filter: Vec<&str> = options.filter.iter().map(String::as_str).collect();
    let mut doc = vec![
        "test",
        "--workspace",
        "--exclude",
        "weir-ebpf",
        "--doc",
        "--",
    ];
    doc.extend(&filter);
    build::cargo(&doc, &[], "doc tests")?;

    let root = is_root();
    let (runnable, root_only): (Vec<_>, Vec<_>) = executables
        .into_iter()
        .partition(|e| root || e.package != ROOT_ONLY_PACKAGE);
    test_binaries::run(
        runnable,
        &filter,
        options.jobs,
        &build::workspace_root().join("target/xtask-test"),
        if root {
            "unit, kernel and end-to-end tests"
        } else {
            "unit tests"
        },
    )?;
    if !root_only.is_empty() {
        bail!(
            "the kernel and end-to-end tests (crate {ROOT_ONLY_PACKAGE}) need root: they load eBPF \
             programs and create network namespaces; run `sudo -E cargo xtask test`"
        );
    }
    println!("xtask test: all passed");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
