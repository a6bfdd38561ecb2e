//! `cargo xtask demo`: the Brown Bear scenario on a two-node lab. Builds the binaries, shows the
//! reachability with no policy, applies the design notes' policies and shows the matrix next to
//! what is expected, explains every drop from the agents' flow records, then adds the missing
//! egress policy and shows what changed. The lab is taken down at the end, on error and on Ctrl-C.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{SigSet, Signal};
use weir_lab::lab::{self, Expectations, Lab, LabSpec, Manifest, Matrix, ProbeSpec, Target};

use crate::{build, setup};

const LAB: &str = "demo";

#[derive(clap::Args)]
pub struct Options {
    /// `brownbear` (one cluster, two nodes), or `mesh`: Brown Bear across two clusters joined
    /// by the mesh link (examples/mesh), with a capture of what crosses the WAN.
    #[arg(default_value = "brownbear", value_parser = ["brownbear", "mesh"])]
    pub scenario: String,
    /// Do not build the binaries first (`cargo xtask build`).
    #[arg(long)]
    pub no_build: bool,
    /// Leave the lab running at the end (take it down with `cargo xtask lab down --name demo`).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    if options.scenario == "mesh" {
        return crate::demo_mesh::run(options.no_build, options.keep);
    }
    let example = build::workspace_root().join("examples/brownbear");
    if !options.no_build {
        if !setup::is_complete() {
            setup::run()?;
        }
        step("Building weir-agent, weir-cni and the lab's servers (cargo xtask build)");
        build::binaries(false)?;
    }
    take_down_on_signal(LAB)?;
    let started = Instant::now();
    let result = scenario(&example, options.keep);
    if result.is_err() && !options.keep {
        eprintln!("\nthe demo failed; the lab's agent logs were in /run/weir-lab/{LAB}/");
    }
    println!(
        "\n(demo finished in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    result
}

fn scenario(example: &Path, keep: bool) -> anyhow::Result<()> {
    step("Starting a two-node lab with the Brown Bear cluster (examples/brownbear/cluster.yaml)");
    let mut spec = LabSpec::new(LAB, 2).manifest(Manifest::Path(example.join("cluster.yaml")));
    // expected.md asks about mysql:3307, which no container declares: serve it too, so that a
    // closed port is not mistaken for a drop.
    spec.extra_ports = vec![3307];
    // weir-agent, weir-cni and xtask itself (the pods' servers) are found next to this binary in
    // target/debug (the build above may have replaced it), or through WEIR_AGENT_BIN,
    // WEIR_CNI_BIN and WEIR_LAB_SERVER_BIN.
    let mut lab = Lab::up(spec)?;
    for node in &lab.state().nodes {
        let pods: Vec<String> = lab
            .state()
            .pods
            .iter()
            .filter(|(_, p)| p.node == node.name)
            .map(|(k, p)| format!("{k} ({})", p.ips.join(",")))
            .collect();
        println!(
            "  {} ({} pods {}): {}",
            node.name,
            node.underlay_ip,
            node.pod_cidr,
            pods.join(", ")
        );
    }

    let expected = Expectations::load(&example.join("expected.md"))?;
    let probe = ProbeSpec {
        extra: expected.entries.keys().map(|(_, t)| t.clone()).collect(),
        ..ProbeSpec::default()
    };

    step("No policy: every pod reaches every pod");
    let (open, diffs) =
        lab.probe_until(&probe, &Expectations::all(true), Duration::from_secs(5))?;
    print!("{}", indent(&open.render(None)));
    println!("  (. allowed, X denied, - a pod and itself, not probed)");
    if !diffs.is_empty() {
        print!("{}", indent(&lab::matrix::render_differences(&diffs)));
        bail!("pods cannot reach each other before any policy is applied");
    }

    step("Applying the design notes' policies (examples/brownbear/policies.yaml)");
    let applied = std::time::SystemTime::now();
    lab.apply(&example.join("policies.yaml"))?;
    let (with_policy, diffs) = lab.probe_until(&probe, &expected, Duration::from_secs(5))?;
    print!("{}", indent(&with_policy.render(Some(&expected))));
    println!("\n  next to examples/brownbear/expected.md:");
    print!("{}", indent(&side_by_side(&with_policy, &expected)));
    print!("{}", indent(&lab::matrix::render_differences(&diffs)));

    step("Why each drop happened (from the agents' flow records)");
    explain_drops(&lab, &with_policy, applied);

    step("The same answer offline, from the manifests alone (weir explain --manifests --matrix)");
    offline_matrix(example)?;

    step("Fixing the policy set: web may call the API (examples/brownbear/fix/web-egress.yaml)");
    lab.apply(&example.join("fix/web-egress.yaml"))?;
    let mut fixed_expect = expected.clone();
    fixed_expect.set(
        "brownbear-production/web",
        Target::new("brownbear-production/api", 8080, lab::Proto::Tcp),
        true,
    );
    let (fixed, fix_diffs) = lab.probe_until(&probe, &fixed_expect, Duration::from_secs(5))?;
    print!("{}", indent(&fixed.render(Some(&fixed_expect))));
    println!("\n  what changed:");
    for ((from, to), before) in &with_policy.cells {
        if let Some(after) = fixed.get(from, to)
            && after != *before
        {
            println!(
                "    {from} -> {} {}/{}: {} -> {}",
                to.pod,
                to.port,
                to.proto,
                word(*before),
                word(after)
            );
        }
    }
    print!("{}", indent(&lab::matrix::render_differences(&fix_diffs)));

    if keep {
        lab.keep();
        println!(
            "\nthe lab is still running: `cargo xtask lab probe --name {LAB}`, `cargo xtask lab down --name {LAB}`"
        );
    } else {
        step("Taking the lab down");
        lab.down()?;
    }
    if !diffs.is_empty() || !fix_diffs.is_empty() {
        bail!("the observed reachability differs from the expected table");
    }
    println!("\nthe observed reachability matches examples/brownbear/expected.md");
    Ok(())
}

fn side_by_side(matrix: &Matrix, expected: &Expectations) -> String {
    let mut out = format!(
        "{:<28} {:<28} {:<9} {:<9} {:<9}\n",
        "from", "to", "port", "expected", "observed"
    );
    for (from, to) in &expected.order {
        let want = &expected.entries[&(from.clone(), to.clone())];
        let got = matrix.get(from, to);
        let mark = match got {
            Some(g) if g == *want => "ok",
            Some(_) => "DIFFERS",
            None => "not probed",
        };
        out.push_str(&format!(
            "{:<28} {:<28} {:<9} {:<9} {:<9} {mark}\n",
            from,
            to.pod,
            format!("{}/{}", to.port, to.proto),
            word(*want),
            got.map(word).unwrap_or("-"),
        ));
    }
    out
}

/// For every denied cell, the agents' drop records for that flow: where it was dropped, which
/// policies isolated the pod, and that no rule allowed it.
fn explain_drops(lab: &Lab, matrix: &Matrix, since: std::time::SystemTime) {
    for ((from, to), allowed) in &matrix.cells {
        if *allowed {
            continue;
        }
        println!("  {from} -> {} {}/{} is denied:", to.pod, to.port, to.proto);
        let why = lab.explain_drop(from, to, since);
        if why.is_empty() {
            println!("    (no drop record for this flow in the nodes' flows.jsonl)");
        }
        for line in why {
            println!("    {line}");
        }
    }
}

/// What `weir explain` computes from the example's manifests, without the lab, and its picture.
fn offline_matrix(example: &Path) -> anyhow::Result<()> {
    let weir = lab::find_bin("weir", "WEIR_CLI_BIN", None)?;
    let svg = std::env::temp_dir().join("weir-demo-brownbear.svg");
    let out = std::process::Command::new(&weir)
        .arg("explain")
        .arg("--manifests")
        .arg(example)
        .args(["--matrix", "--port", "3307/TCP", "--svg"])
        .arg(&svg)
        .output()?;
    if !out.status.success() {
        bail!(
            "weir explain --matrix failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table = String::from_utf8_lossy(&out.stdout);
    // The matrix, without the list of denials the flow records above already explained.
    let matrix = table.split("\ndenied:").next().unwrap_or_default();
    print!("{}", indent(matrix));
    println!(
        "  the picture, each cell's tooltip naming its deciding rule: {}",
        svg.display()
    );
    Ok(())
}

/// Ctrl-C, SIGTERM, SIGHUP: take the lab down, then exit. The signals are blocked in every
/// thread and taken by one thread with sigwait (the agents and servers unblock them). Both demos
/// use it, each with its own lab.
pub(crate) fn take_down_on_signal(lab_name: &'static str) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            eprintln!("\n{signal}: taking the lab down");
            if let Err(e) = lab::down(lab_name) {
                eprintln!("taking the lab down: {e:#}");
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

pub(crate) fn step(text: &str) {
    println!("\n== {text}");
}

pub(crate) fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

pub(crate) fn word(allowed: bool) -> &'static str {
    if allowed { "ALLOW" } else { "DENY" }
}
