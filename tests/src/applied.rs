//! Waiting for an agent to have applied what a test wrote: the agent reports the fingerprint of
//! the manifests directory it last wrote to its datapath (`weir status`), so a test waits for
//! exactly the state it made instead of sleeping. Here, not in weir-lab, because the fingerprint
//! is the agent's own function (weir-lab does not build the agent).

use std::path::Path;
use std::time::{Duration, Instant};

use weir_lab::lab::Lab;
use weir_lab::process::bin;

/// Waits until the agent serving `socket` has written to its datapath the manifests directory
/// `manifests` as it is now (its fingerprint, in `weir status`); returns the applied generation.
/// Panics with the agent's last status after `timeout`, a bound for failures only.
pub fn wait_applied(socket: &Path, manifests: &Path, timeout: Duration) -> u64 {
    let want = weir_agent::source::manifests::fingerprint(manifests)
        .unwrap_or_else(|e| panic!("reading {}: {e}", manifests.display()));
    let deadline = Instant::now() + timeout;
    loop {
        let status = applied_status(socket);
        if let Some(status) = &status
            && status["applied_fingerprint"] == want.as_str()
        {
            return status["applied_generation"]
                .as_u64()
                .expect("applied_generation is a number");
        }
        assert!(
            Instant::now() < deadline,
            "the agent at {} has not applied {} (fingerprint {want}) after {timeout:?}; its status: {status:?}",
            socket.display(),
            manifests.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every agent of `lab` has applied the lab's manifests directory as it is now.
pub fn wait_lab_applied(lab: &Lab) {
    let state = lab.state();
    for node in &state.nodes {
        wait_applied(&node.socket, &state.manifests_dir(), APPLY_TIMEOUT);
    }
}

/// `weir status` as JSON, or `None` while the agent does not answer.
fn applied_status(socket: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(bin("weir"))
        .args(["status", "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .expect("running weir status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// How long an agent may take to apply a change before a test fails: a bound for failures, far
/// above the contract's propagation time, so a loaded machine does not fail the test.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
