//! Test executables run side by side. `cargo test` runs a package's test executables one after
//! another, although most of the root-only ones spend their time waiting (for an agent to apply
//! a manifest, a link to come back, a connection to time out) rather than on the CPU. Here cargo
//! only builds them (`--no-run`); they then run a few at a time, the longest of the last run
//! first, each with its output held back and printed whole once it exits, so the log reads as
//! cargo's does, one executable after another.
//!
//! Every test names what it creates with its process id (namespaces, labs, pins), so executables
//! of one package do not collide when they run at once.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::build;

/// A test executable cargo built, and where cargo would run it.
#[derive(Debug)]
pub struct Executable {
    pub package: String,
    /// `<package> <target>`, e.g. `weir-tests netpol` (how the log and the summary name it).
    pub name: String,
    pub path: PathBuf,
    /// The package's directory: cargo runs a package's tests there.
    pub package_dir: PathBuf,
}

/// Runs `cargo <args> --message-format=json-render-diagnostics` (a build that makes test
/// executables: `build --tests`, `test --no-run`) and returns the test executables it names;
/// compiler output goes to the terminal as usual.
pub fn build(args: &[&str], what: &str) -> anyhow::Result<Vec<Executable>> {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--message-format=json-render-diagnostics");
    println!("\n==> {what}: cargo {}", all.join(" "));
    let out = build::cargo_command()
        .args(&all)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{what}: could not start cargo"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(executable) = executable_of(line)? {
            found.push(executable);
        }
    }
    Ok(found)
}

/// The test executable a line of cargo's JSON output announces, if it announces one.
fn executable_of(line: &str) -> anyhow::Result<Option<Executable>> {
    let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
        // Not JSON: a build script or cargo itself printed it; pass it on.
        println!("{line}");
        return Ok(None);
    };
    if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
        return Ok(None);
    }
    let Some(path) = message["executable"].as_str() else {
        return Ok(None);
    };
    let manifest = message["manifest_path"]
        .as_str()
        .context("a compiler-artifact message without manifest_path")?;
    let package_dir = Path::new(manifest)
        .parent()
        .context("a manifest path without a directory")?
        .to_path_buf();
    let package = message["package_id"]
        .as_str()
        .and_then(package_name)
        .unwrap_or("?");
    let target = message["target"]["name"].as_str().unwrap_or("?");
    let kind = message["target"]["kind"][0].as_str().unwrap_or("?");
    // A library's or a binary's own unit tests carry the target's name; say which they are.
    let name = match kind {
        "test" => format!("{package} {target}"),
        _ => format!("{package} {target} ({kind})"),
    };
    Ok(Some(Executable {
        package: package.to_owned(),
        name,
        path: PathBuf::from(path),
        package_dir,
    }))
}

/// The package name in a cargo package id: `path+file:///w/tests#weir-tests@0.1.0` (a path
/// whose last component differs from the name) or `path+file:///w/agent/cli#0.1.0` (the last
/// component is the name) or `registry+...#name@version`.
fn package_name(id: &str) -> Option<&str> {
    let (url, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _)) => Some(name),
        None => url.rsplit('/').next(),
    }
}

/// How one executable did.
struct Outcome {
    name: String,
    passed: bool,
    took: Duration,
    /// The `test result:` line's counts.
    counts: Option<Counts>,
}

#[derive(Clone, Copy, Default)]
struct Counts {
    passed: u32,
    failed: u32,
}

/// Runs `executables` with `harness_args`, at most `jobs` at once, the slowest of the last run
/// first; prints each one's output whole when it exits, then a summary. `dir` keeps each
/// executable's output (`<name>.log`) and the durations of the last run without harness
/// arguments (`timings.json`).
/// Fails naming every executable that failed.
pub fn run(
    executables: Vec<Executable>,
    harness_args: &[&str],
    jobs: usize,
    dir: &Path,
    what: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let timings = dir.join("timings.json");
    let last = load_timings(&timings);
    let mut queue: Vec<Executable> = executables;
    // Longest first; an executable never timed goes first (it might be long).
    queue.sort_by(|a, b| {
        let of = |e: &Executable| last.get(&e.name).copied().unwrap_or(f64::INFINITY);
        of(b).total_cmp(&of(a))
    });
    let total = queue.len();
    let jobs = jobs.clamp(1, total.max(1));
    println!("\n==> {what}: {total} test executables, {jobs} at a time");
    let queue = Arc::new(Mutex::new(VecDeque::from(queue)));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let harness_args: Vec<String> = harness_args.iter().map(|s| (*s).to_owned()).collect();
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let queue = queue.clone();
            let outcomes = outcomes.clone();
            let harness_args = harness_args.clone();
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                loop {
                    let Some(executable) = queue.lock().expect("queue lock").pop_front() else {
                        return;
                    };
                    let outcome = run_one(&executable, &harness_args, &dir);
                    outcomes.lock().expect("outcomes lock").push(outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a test runner thread panicked"))?;
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    // A filtered run times only what it filtered in: it would mislead the next full run.
    if harness_args.is_empty() {
        save_timings(&timings, &last, &outcomes);
    }
    summarize(what, &outcomes, started.elapsed())
}

/// Runs one executable with its output (stdout and stderr, interleaved as written) held back in
/// `dir`; prints it whole when the executable exits.
fn run_one(executable: &Executable, harness_args: &[String], dir: &Path) -> Outcome {
    let started = Instant::now();
    let log = dir.join(format!(
        "{}.log",
        executable.name.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_"
        )
    ));
    let result = capture(executable, harness_args, &log);
    let took = started.elapsed();
    let (passed, output) = match result {
        Ok((status, output)) => (status.success(), output),
        Err(e) => (
            false,
            format!("could not run {}: {e:#}\n", executable.path.display()),
        ),
    };
    let counts = output.lines().rev().find_map(result_counts);
    // One print for the whole block, so blocks of executables that end together do not mix.
    let verdict = if passed { "ok" } else { "FAILED" };
    print!(
        "\n     Running {} ({})\n{output}     {verdict}: {} in {:.1} s\n",
        executable.name,
        executable.path.display(),
        executable.name,
        took.as_secs_f64()
    );
    Outcome {
        name: executable.name.clone(),
        passed,
        took,
        counts,
    }
}

fn capture(
    executable: &Executable,
    harness_args: &[String],
    log: &Path,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    // One file for both streams keeps their order, as a terminal would show it. A file, not a
    // pipe: a process a test leaves running with the streams inherited cannot hold this up.
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // As `cargo test` runs it: in its package's directory, which CARGO_MANIFEST_DIR names.
    let status = Command::new(&executable.path)
        .args(harness_args)
        .current_dir(&executable.package_dir)
        .env("CARGO_MANIFEST_DIR", &executable.package_dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicating a file handle")?)
        .stderr(file)
        .status()
        .with_context(|| format!("starting {}", executable.path.display()))?;
    let output = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    Ok((status, String::from_utf8_lossy(&output).into_owned()))
}

/// `test result: ok. 51 passed; 0 failed; ...` → its counts.
fn result_counts(line: &str) -> Option<Counts> {
    let rest = line.strip_prefix("test result: ")?;
    let number_before = |word: &str| -> Option<u32> {
        rest.split("; ")
            .map(|part| part.trim_start_matches(|c: char| !c.is_ascii_digit()))
            .find_map(|part| part.strip_suffix(word)?.trim().parse().ok())
    };
    Some(Counts {
        passed: number_before("passed")?,
        failed: number_before("failed").unwrap_or(0),
    })
}

fn summarize(what: &str, outcomes: &[Outcome], took: Duration) -> anyhow::Result<()> {
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| std::cmp::Reverse(o.took));
    let sum: Counts = outcomes
        .iter()
        .filter_map(|o| o.counts)
        .fold(Counts::default(), |acc, c| Counts {
            passed: acc.passed + c.passed,
            failed: acc.failed + c.failed,
        });
    println!(
        "\n==> {what}: {} passed, {} failed, in {:.1} s; slowest executables:",
        sum.passed,
        sum.failed,
        took.as_secs_f64()
    );
    for outcome in sorted.iter().take(8) {
        println!("    {:6.1} s  {}", outcome.took.as_secs_f64(), outcome.name);
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{what} failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The seconds each executable took in the last run (a file per suite under target/), which
/// only orders the next run: a missing or unreadable file orders nothing.
fn load_timings(path: &Path) -> BTreeMap<String, f64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

fn save_timings(path: &Path, last: &BTreeMap<String, f64>, outcomes: &[Outcome]) {
    let mut timings = last.clone();
    for outcome in outcomes {
        timings.insert(outcome.name.clone(), outcome.took.as_secs_f64());
    }
    let text = serde_json::to_string_pretty(&timings).expect("timings serialize");
    if let Err(e) = std::fs::write(path, text) {
        println!(
            "note: could not record test timings in {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_come_from_either_form_of_id() {
        assert_eq!(
            package_name("path+file:///w/tests#weir-tests@0.1.0"),
            Some("weir-tests")
        );
        assert_eq!(package_name("path+file:///w/agent/cli#0.1.0"), Some("cli"));
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#serde@1.0.0"),
            Some("serde")
        );
    }

    #[test]
    fn result_lines_give_their_counts() {
        let c = result_counts(
            "test result: ok. 51 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; \
             finished in 27.32s",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed), (51, 0));
        let c = result_counts("test result: FAILED. 3 passed; 2 failed; 0 ignored").unwrap();
        assert_eq!((c.passed, c.failed), (3, 2));
        assert!(result_counts("test x::result ... ok").is_none());
    }

    #[test]
    fn test_executables_are_found_in_cargo_messages() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#weir-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"netpol"},"profile":{"test":true},"executable":"/w/target/debug/deps/netpol-1"}"#;
        let e = executable_of(line).unwrap().unwrap();
        assert_eq!(e.name, "weir-tests netpol");
        assert_eq!(e.path, Path::new("/w/target/debug/deps/netpol-1"));
        assert_eq!(e.package_dir, Path::new("/w/tests"));
        let library = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#weir-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"weir_tests"},"profile":{"test":false},"executable":null}"#;
        assert!(executable_of(library).unwrap().is_none());
    }
}
