//! `cargo xtask kind`: Weir on a real Kubernetes cluster, for machines with a Docker engine.
//!
//! A kind cluster with the default CNI disabled, the image built from the Containerfile and
//! loaded, `manifests/` applied, then the Brown Bear scenario run against it: its pods as agnhost
//! servers on their containerPorts, its policies applied, and every row of its expected.md probed
//! with `agnhost connect` from the source pod.
//!
//! NOT RUN where Weir is developed: those machines have no Docker engine, so this command has
//! never been executed end to end. Treat a failure as a bug in this file first.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use weir_lab::lab::{Expectations, Proto, objects};

const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const IMAGE: &str = "weir:dev";
const KIND_CONFIG: &str = "kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: 10.244.0.0/16
nodes:
- role: control-plane
- role: worker
";

#[derive(clap::Args)]
pub struct Options {
    /// The kind cluster's name.
    #[arg(long, default_value = "weir")]
    pub name: String,
    /// Keep the cluster afterwards.
    #[arg(long)]
    pub keep: bool,
}

fn run_cmd(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    println!("kind: {what}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {cmd:?}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_stdin(cmd: &mut Command, stdin: &str, what: &str) -> anyhow::Result<()> {
    println!("kind: {what}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    if !child.wait()?.success() {
        bail!("{what} failed: {cmd:?}");
    }
    Ok(())
}

fn require(program: &str, args: &[&str], hint: &str) -> anyhow::Result<()> {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("`{program} {}` failed: {hint}", args.join(" "));
    }
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    require(
        "docker",
        &["info"],
        "this needs a running Docker engine (none runs on Weir's development machines)",
    )?;
    require(
        "kind",
        &["version"],
        "install kind (https://kind.sigs.k8s.io)",
    )?;
    require("kubectl", &["version", "--client"], "install kubectl")?;
    let context = format!("kind-{}", options.name);
    let kubectl = || {
        let mut c = Command::new("kubectl");
        c.args(["--context", &context]);
        c
    };

    let clusters = run_cmd(
        Command::new("kind").args(["get", "clusters"]),
        "listing kind clusters",
    )?;
    if !clusters.lines().any(|c| c == options.name) {
        run_with_stdin(
            Command::new("kind").args([
                "create",
                "cluster",
                "--name",
                &options.name,
                "--config",
                "-",
            ]),
            KIND_CONFIG,
            "creating the cluster (default CNI disabled)",
        )?;
    }
    let result = deploy_and_probe(options, &kubectl);
    if !options.keep {
        let _ = run_cmd(
            Command::new("kind").args(["delete", "cluster", "--name", &options.name]),
            "deleting the cluster",
        );
    }
    result
}

fn deploy_and_probe(options: &Options, kubectl: &dyn Fn() -> Command) -> anyhow::Result<()> {
    run_cmd(
        Command::new("docker").args(["build", "-t", IMAGE, "-f", "Containerfile", "."]),
        "building the image",
    )?;
    run_cmd(
        Command::new("kind").args(["load", "docker-image", IMAGE, "--name", &options.name]),
        "loading the image into the cluster",
    )?;
    run_cmd(
        kubectl().args(["apply", "-f", "manifests/"]),
        "applying manifests/",
    )?;
    run_cmd(
        kubectl().args([
            "-n",
            "weir-system",
            "rollout",
            "status",
            "daemonset/weir-agent",
            "--timeout=300s",
        ]),
        "waiting for the agents",
    )?;

    // The scenario's pods, as agnhost servers on their declared ports.
    let scenario = Path::new("examples/brownbear");
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    for object in objects::load(&scenario.join("cluster.yaml"))? {
        match object.kind() {
            "Namespace" => namespaces.push(object.to_json()),
            "Pod" => {
                let ports = object.pod_ports();
                let containers: Vec<serde_json::Value> = ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        json!({"name": format!("serve-{i}"), "image": AGNHOST,
                               "args": ["netexec", format!("--http-port={}", p.port), format!("--udp-port={}", p.port)]})
                    })
                    .collect();
                let mut pod = object.to_json();
                pod["spec"] = json!({"containers": containers});
                pods.push(pod);
            }
            _ => {}
        }
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": namespaces.into_iter().chain(pods).collect::<Vec<_>>()});
    run_with_stdin(
        kubectl().args(["apply", "-f", "-"]),
        &list.to_string(),
        "creating the scenario's pods",
    )?;
    run_cmd(
        kubectl().args([
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "--all-namespaces",
            "--timeout=300s",
        ]),
        "waiting for the pods",
    )?;
    run_cmd(
        kubectl().args(["apply", "-f", "examples/brownbear/policies.yaml"]),
        "applying the scenario's policies",
    )?;
    std::thread::sleep(std::time::Duration::from_secs(2));

    let expected = Expectations::load(&scenario.join("expected.md"))?;
    let mut differences = 0;
    for (from, to) in &expected.order {
        let want = expected.get(from, to).unwrap_or(true);
        let (from_ns, from_name) = from.split_once('/').context("pod as ns/name")?;
        let (to_ns, to_name) = to.pod.split_once('/').context("pod as ns/name")?;
        let ip = run_cmd(
            kubectl().args([
                "-n",
                to_ns,
                "get",
                "pod",
                to_name,
                "-o",
                "jsonpath={.status.podIP}",
            ]),
            &format!("address of {}", to.pod),
        )?;
        let proto = if to.proto == Proto::Udp { "udp" } else { "tcp" };
        let got = kubectl()
            .args([
                "-n", from_ns, "exec", from_name, "-c", "serve-0", "--", "/agnhost", "connect",
            ])
            .arg(format!("{}:{}", ip.trim(), to.port))
            .args(["--timeout=3s", &format!("--protocol={proto}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let verdict = |b: bool| if b { "ALLOW" } else { "DENY" };
        let mark = if got == want { "ok" } else { "DIFFERS" };
        println!(
            "  {from:<28} -> {:<28} {}/{proto}  expected {:<5} observed {:<5} {mark}",
            to.pod,
            to.port,
            verdict(want),
            verdict(got)
        );
        differences += usize::from(got != want);
    }
    if differences > 0 {
        bail!("{differences} probe(s) differ from examples/brownbear/expected.md");
    }
    println!("kind: the cluster's reachability matches examples/brownbear/expected.md");
    Ok(())
}
