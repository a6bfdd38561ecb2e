//! `cargo xtask test`: the whole suite, as CI runs it. Nothing is skipped: the kernel tests need
//! root, and without root this fails and says so rather than passing quietly.

use anyhow::bail;

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to the test harness).
    pub filter: Option<String>,
}

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
    let filter: Vec<&str> = options.filter.iter().map(String::as_str).collect();
    let mut unit = vec![
        "test",
        "--workspace",
        "--exclude",
        "weir-ebpf",
        "--exclude",
        "weir-tests",
        "--",
    ];
    unit.extend(&filter);
    build::cargo(&unit, &[], "unit tests")?;
    if !is_root() {
        bail!(
            "the kernel and end-to-end tests (crate weir-tests) need root: they load eBPF programs and \
             create network namespaces; run `sudo -E cargo xtask test`"
        );
    }
    // Binaries the end-to-end tests drive, built first so tests find them in target/debug.
    build::binaries(false)?;
    let mut root = vec!["test", "--package", "weir-tests", "--"];
    root.extend(&filter);
    build::cargo(&root, &[], "root-only kernel and end-to-end tests")?;
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
