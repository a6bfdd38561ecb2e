//! The agent's life on a node: it loads the embedded programs (the verifier accepts them), pins
//! its maps, serves its socket, and on SIGTERM exits cleanly leaving exactly what it pinned on
//! purpose; a second agent adopts the pins; `uninstall` removes them.

use nix::sys::signal::Signal;
use weir_common::MAP_POLICY;
use weir_tests::{
    agent::{Agent, AgentDirs, ClusterSource, bin},
    netns::{Netns, run},
};

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n";

#[test]
fn agent_loads_pins_and_stops_cleanly_on_sigterm() {
    let node = Netns::new("life");
    let dirs = AgentDirs::new("life", "n1");
    std::fs::write(dirs.manifests.join("ns.yaml"), NAMESPACE).unwrap();

    let agent = Agent::start(&node, "n1", &dirs, &["--pod-cidr", "10.200.1.0/24"]);
    assert!(dirs.socket.exists(), "the agent's socket is missing");
    let policy_pin = dirs.bpffs.join("maps").join(MAP_POLICY);
    assert!(
        policy_pin.exists(),
        "the policy map is not pinned at {}",
        policy_pin.display()
    );
    let status = agent.stop(Signal::SIGTERM);
    assert!(
        status.success(),
        "weir-agent exited with {status} on SIGTERM"
    );
    assert!(
        policy_pin.exists(),
        "SIGTERM must leave the pinned maps in place"
    );
    assert!(!dirs.socket.exists(), "the socket file outlived the agent");

    // A second agent adopts the pinned maps and stops again.
    let again = Agent::start(&node, "n1", &dirs, &["--pod-cidr", "10.200.1.0/24"]);
    assert!(again.stop(Signal::SIGTERM).success());

    let out = run(
        bin("weir-agent").to_str().unwrap(),
        &[
            "uninstall",
            "--node-name",
            "n1",
            "--bpffs-dir",
            dirs.bpffs.to_str().unwrap(),
        ],
    );
    assert!(out.contains("removed"), "uninstall said: {out}");
    assert!(
        !dirs.bpffs.exists(),
        "uninstall left {}",
        dirs.bpffs.display()
    );
}

#[test]
fn agent_without_pod_cidr_says_what_to_do() {
    let node = Netns::new("nocidr");
    let dirs = AgentDirs::new("nocidr", "n1");
    let out = dirs
        .args("n1", ClusterSource::Manifests, &[])
        .command(&bin("weir-agent"), &node.name)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--pod-cidr") && stderr.contains("spec.podCIDRs"),
        "the error should say how to give a pod CIDR: {stderr}"
    );
}
