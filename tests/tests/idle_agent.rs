//! An idle agent does no work (standalone mode, the real `weir-agent`): a large manifest that
//! does not change is not parsed again by the periodic rescans, a rewrite with the same objects
//! is parsed but compiles nothing, and a real change is still applied. Observed through the
//! agent's `/metrics` counters and the order in which it applies states, never through timings.

use std::{fmt::Write as _, path::Path, time::Duration};

use weir_tests::{
    agent::{Agent, AgentDirs, health_get, metric},
    netns::Netns,
};

const NODE: &str = "n1";
const POLICIES: usize = 2_000;
const WAIT: Duration = Duration::from_secs(60);
/// The agent's default health address, inside its node namespace.
const HEALTH_PORT: u16 = 9876;

const PARSED: &str = "weir_manifest_files_parsed_total";
const SCANS: &str = "weir_manifest_scans_total";
const STATES: &str = "weir_cluster_state_updates_total";
const COMPILES: &str = "weir_policy_compiles_total";
const POLICY_COUNT: &str = "weir_cluster_objects{kind=\"NetworkPolicy\"}";

fn policies(n: usize, comment: &str) -> String {
    let mut y = format!("{comment}apiVersion: v1\nkind: List\nitems:\n");
    for i in 0..n {
        let _ = write!(
            y,
            "- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {{name: p{i}, namespace: shop}}\n  spec:\n    podSelector: {{matchLabels: {{app: a{}}}}}\n    ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}]\n      ports: [{{port: {}}}]\n",
            i % 50,
            (i + 1) % 50,
            8000 + i % 100
        );
    }
    y
}

const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: a1}}\n\
spec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.232.1.5}]}\n";

const EXTRA: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {name: extra, namespace: shop}\nspec: {podSelector: {}, ingress: [{}]}\n";

/// Writes `text` to `dir/file` by renaming it into place, so no scan sees it half-written.
fn write(dir: &Path, file: &str, text: &str) {
    let hidden = dir.join(format!(".{file}.tmp"));
    std::fs::write(&hidden, text).unwrap();
    std::fs::rename(&hidden, dir.join(file)).unwrap();
}

struct Node {
    netns: Netns,
    agent: Agent,
}

impl Node {
    fn metrics(&self) -> String {
        let (status, body) = health_get(&self.netns, HEALTH_PORT, "/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        body
    }

    fn counter(&self, name: &str) -> u64 {
        let metrics = self.metrics();
        metric(&metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    }

    /// Waits until `f` holds for the metrics; returns them.
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let metrics = self.metrics();
            if f(&metrics) {
                return metrics;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{metrics}\nthe agent's log:\n{}",
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `n` more scans of the manifests directory than now.
    fn wait_for_scans(&self, n: u64) {
        let target = self.counter(SCANS) + n;
        self.wait_for(&format!("{n} more scans"), |m| {
            metric(m, SCANS).is_some_and(|s| s >= target)
        });
    }
}

#[test]
fn a_large_unchanged_manifest_is_neither_parsed_nor_compiled_again() {
    let netns = Netns::new("idle");
    let dirs = AgentDirs::new("idle", NODE);
    write(&dirs.manifests, "cluster.yaml", CLUSTER);
    write(&dirs.manifests, "policies.yaml", &policies(POLICIES, ""));
    let agent = Agent::start(&netns, NODE, &dirs, &["--pod-cidr", "10.232.0.0/24"]);
    let node = Node { netns, agent };

    let start = node.metrics();
    let at_start = |name: &str| metric(&start, name).unwrap();
    assert_eq!(at_start(POLICY_COUNT), POLICIES as u64);
    assert_eq!(at_start(PARSED), 2, "each file parsed once at start-up");
    assert_eq!(at_start(STATES), 1);
    assert_eq!(at_start(COMPILES), 1, "one compile at start-up");

    // Periodic rescans of an unchanged directory: a stat per file, nothing more.
    node.wait_for_scans(3);
    let idle = node.metrics();
    for name in [PARSED, STATES, COMPILES] {
        assert_eq!(
            metric(&idle, name),
            Some(at_start(name)),
            "{name} moved while nothing changed"
        );
    }

    // touch: a new mtime, the same bytes; read and compared, not parsed.
    std::fs::File::options()
        .write(true)
        .open(dirs.manifests.join("policies.yaml"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    node.wait_for_scans(2);
    assert_eq!(node.counter(PARSED), 2, "a touched file was parsed again");

    // The same objects in new bytes: parsed, but nothing to apply.
    write(
        &dirs.manifests,
        "policies.yaml",
        &policies(POLICIES, "# reviewed\n"),
    );
    node.wait_for("the rewritten file to be parsed", |m| {
        metric(m, PARSED) == Some(3)
    });

    // A real change is applied. States are applied in order, so once it shows, a state from the
    // rewrite would have been counted already.
    write(&dirs.manifests, "extra.yaml", EXTRA);
    let changed = node.wait_for("the new policy to be compiled", |m| {
        metric(m, POLICY_COUNT) == Some(POLICIES as u64 + 1)
            && metric(m, COMPILES).is_some_and(|c| c >= 2)
    });
    assert_eq!(metric(&changed, STATES), Some(2), "{changed}");
    assert_eq!(metric(&changed, COMPILES), Some(2), "{changed}");
    assert_eq!(metric(&changed, PARSED), Some(4), "{changed}");
    assert!(
        !node.agent.log_text().contains("ERROR"),
        "{}",
        node.agent.log_text()
    );
}
