//! `cargo xtask demo mesh`: Brown Bear across two clusters (examples/mesh). Builds a mesh lab
//! (clusters west and east, a gateway and a worker each, joined only gateway to gateway through
//! a WAN namespace), shows the cross-cluster reachability with no policy, proves that the WAN
//! carries only TLS (a capture on the WAN while a known payload crosses pod to pod finds it
//! nowhere in clear, and finds it in clear at the receiving pod), applies the teams' policies,
//! shows the table next to expected.md and explains each drop from the agents' flow records,
//! which name the remote cluster and labels. Fails when the table differs from expected.md or
//! the WAN shows anything but TLS. The lab is taken down at the end, on error and on Ctrl-C.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use weir_lab::lab::mesh::{ClusterSpec, MESH_PORT, MeshLab, MeshSpec};
use weir_lab::lab::wan_capture::WanCapture;
use weir_lab::lab::{self, Expectations, Manifest, Matrix, Proto, Target};

use crate::demo::{indent, step, take_down_on_signal, word};
use crate::{build, setup};

const LAB: &str = "mesh";

pub fn run(no_build: bool, keep: bool) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    let example = build::workspace_root().join("examples/mesh");
    if !no_build {
        if !setup::is_complete() {
            setup::run()?;
        }
        step("Building weir-agent, weir-cni and the lab's servers (cargo xtask build)");
        build::binaries(false)?;
    }
    take_down_on_signal(LAB)?;
    let started = Instant::now();
    let result = scenario(&example, keep);
    if result.is_err() && !keep {
        eprintln!(
            "\nthe demo failed; the agents' logs of a cluster that failed to start are kept in /tmp/weir-lab-logs/"
        );
    }
    println!(
        "\n(demo finished in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    result
}

fn scenario(example: &Path, keep: bool) -> anyhow::Result<()> {
    step(
        "Starting two clusters, west (examples/mesh/west) and east (examples/mesh/east), \
         joined gateway to gateway through a WAN namespace",
    );
    let cluster = |name: &str| ClusterSpec {
        name: name.into(),
        nodes: 2,
        gateways: 1,
        manifests: vec![Manifest::Path(example.join(name).join("cluster.yaml"))],
    };
    let mut lab = MeshLab::up(MeshSpec {
        name: LAB.into(),
        clusters: vec![cluster("west"), cluster("east")],
        extra_ports: Vec::new(),
        capture_wan: true,
    })?;
    for c in &lab.state().clusters {
        let cl = lab.cluster(&c.name)?;
        println!(
            "  cluster {} (pods {}): gateway {} at {}:{MESH_PORT} on the WAN",
            c.name, c.pod_prefix, c.gateway_node, c.wan_ip
        );
        for node in &cl.state().nodes {
            let pods: Vec<String> = cl
                .state()
                .pods
                .iter()
                .filter(|(_, p)| p.node == node.name)
                .map(|(k, p)| format!("{k} ({})", p.ips.join(",")))
                .collect();
            println!(
                "    {} ({}, {}): {}",
                node.name,
                if node.name == c.gateway_node {
                    "gateway"
                } else {
                    "worker, no route to the other cluster"
                },
                node.pod_cidr,
                pods.join(", ")
            );
        }
    }

    let expected = Expectations::load(&example.join("expected.md"))?;
    let mut open = Expectations::default();
    for (from, to) in &expected.order {
        open.set(from, to.clone(), true);
    }

    step("No policy: every pod reaches every pod of the other cluster");
    let (before, diffs) = lab.probe_until(&open, Duration::from_secs(30))?;
    print!("{}", indent(&before.render(None)));
    println!("  (. allowed, X denied)");
    if !diffs.is_empty() {
        print!("{}", indent(&lab::matrix::render_differences(&diffs)));
        bail!("pods cannot reach the other cluster before any policy is applied");
    }

    step("What the WAN carries while a known payload crosses pod to pod (a capture on the WAN)");
    let capture = lab
        .take_capture()
        .ok_or_else(|| anyhow::anyhow!("the WAN capture did not start"))?;
    wan_shows_only_tls(&lab, capture)?;

    step("Applying the teams' policies (examples/mesh/east/policies.yaml, west/policies.yaml)");
    let applied = SystemTime::now();
    for c in ["east", "west"] {
        lab.cluster_mut(c)?
            .apply(&example.join(c).join("policies.yaml"))?;
    }
    let (after, diffs) = lab.probe_until(&expected, Duration::from_secs(30))?;
    print!("{}", indent(&after.render(Some(&expected))));
    println!("\n  next to examples/mesh/expected.md:");
    print!("{}", indent(&side_by_side(&after, &expected)));
    print!("{}", indent(&lab::matrix::render_differences(&diffs)));

    step("Why each drop happened (the flow records of the node that dropped it)");
    for ((from, to), allowed) in &after.cells {
        if *allowed {
            continue;
        }
        println!("  {from} -> {} {}/{} is denied:", to.pod, to.port, to.proto);
        let why = lab.explain_drop(from, to, applied)?;
        if why.is_empty() {
            println!("    (no drop record for this flow in the nodes' flows.jsonl)");
        }
        for line in why {
            println!("    {line}");
        }
    }

    if keep {
        lab.keep();
        println!(
            "\nthe lab is still running: `cargo xtask lab probe --name {LAB}`, `cargo xtask lab down --name {LAB}`"
        );
    } else {
        step("Taking the lab down");
        lab.down()?;
    }
    if !diffs.is_empty() {
        bail!("the observed reachability differs from examples/mesh/expected.md");
    }
    println!("\nthe observed reachability matches examples/mesh/expected.md");
    Ok(())
}

/// Sends a marker from west's checkout to east's API (TCP) and from east's notifier to west's
/// analytics (UDP), then reads the WAN capture: only TCP to the mesh port, every stream TLS
/// records from its SYN on, the marker nowhere. A capture in the receiving pod shows the same
/// marker in clear, so the capture would have seen it.
fn wan_shows_only_tls(lab: &MeshLab, wan: WanCapture) -> anyhow::Result<()> {
    let marker = format!("weir-demo-marker-{:016x}", rand_u64());
    let sends = [
        (
            "west/shop/checkout",
            Target::new("east/payments/api", 8080, Proto::Tcp),
        ),
        (
            "east/payments/notifier",
            Target::new("west/shop/analytics", 9000, Proto::Udp),
        ),
    ];
    let mut at_pods = Vec::new();
    for (_, to) in &sends {
        at_pods.push((to.pod.clone(), WanCapture::start(&lab.pod_netns(&to.pod)?)?));
    }
    for (from, to) in &sends {
        if !lab.send_marker(from, to, marker.as_bytes())? {
            bail!(
                "{from} -> {} {}/{}: the marker got no answer",
                to.pod,
                to.port,
                to.proto
            );
        }
        println!(
            "  sent {marker:?} from {from} to {} {}/{}",
            to.pod, to.port, to.proto
        );
    }
    let report = wan.stop()?.analyse(MESH_PORT, marker.as_bytes());
    print!("{}", indent(&report.summary()));
    for (pod, capture) in at_pods {
        let seen = capture.stop()?.frames_containing(marker.as_bytes());
        println!("  in {pod}'s namespace the marker is in clear in {seen} frame(s)");
        if seen == 0 {
            bail!("the capture in {pod} did not see the marker: the WAN check would prove nothing");
        }
    }
    let problems = report.problems();
    if !problems.is_empty() {
        for p in &problems {
            println!("  PROBLEM: {p}");
        }
        bail!("the WAN carries more than TLS");
    }
    println!(
        "  the WAN carried only TLS to port {MESH_PORT}; the marker appears in none of its {} frames",
        report.frames
    );
    Ok(())
}

/// A marker unique to this run (so an old capture or log cannot match it).
fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_err()
    {
        return u64::from(std::process::id())
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default();
    }
    u64::from_ne_bytes(buf)
}

fn side_by_side(matrix: &Matrix, expected: &Expectations) -> String {
    let mut out = format!(
        "{:<24} {:<22} {:<9} {:<9} {:<9}\n",
        "from", "to", "port", "expected", "observed"
    );
    for (from, to) in &expected.order {
        let want = expected.entries[&(from.clone(), to.clone())];
        let got = matrix.get(from, to);
        let mark = match got {
            Some(g) if g == want => "ok",
            Some(_) => "DIFFERS",
            None => "not probed",
        };
        out.push_str(&format!(
            "{:<24} {:<22} {:<9} {:<9} {:<9} {mark}\n",
            from,
            to.pod,
            format!("{}/{}", to.port, to.proto),
            word(want),
            got.map(word).unwrap_or("-"),
        ));
    }
    out
}
