//! The traffic benchmark's node run by the real agent: `weir-agent` in standalone mode in a node
//! namespace, a client and a server pod wired by `weir-cni`, and real NetworkPolicy manifests.
//! Each case restarts the agent with its policies and flags and waits until it enforces them;
//! the baseline is the same veths with Weir uninstalled (`weir-agent uninstall`).
//!
//! The policies: one that admits the client to the server (the measured UDP and TCP ports), and
//! for the large cases as many more that select the server, each admitting its own peer (an
//! ipBlock of one address) on its own port, so that every one of them is a real rule in the
//! server's ingress map.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    objects::list,
    traffic::{TCP_PORT, UDP_PORT},
};
use crate::{
    agent::{Agent, AgentDirs, bin, health_get, metric},
    cni::{Plugin, PodRef, first_address},
    netns::Netns,
};

const NODE: &str = "bench";
const NAMESPACE: &str = "bench";
const POD_CIDR: &str = "10.231.0.0/24";
/// The agent's default health address, inside the node's namespace.
const HEALTH_PORT: u16 = 9876;
/// How long an agent may take to read, compile and apply 10,000 policies.
const ENFORCING_WITHIN: Duration = Duration::from_secs(180);

/// The agent's node, its two pods and (between cases) the running agent.
pub struct AgentNode {
    /// Dropped first: the agent is killed before its pods and pins go.
    agent: Option<Agent>,
    pub client: Netns,
    pub server: Netns,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    pub node: Netns,
    dirs: AgentDirs,
}

fn cluster() -> Vec<Value> {
    let pod = |name: &str, ports: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": ports}]}})
    };
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        pod("client", json!([])),
        pod(
            "server",
            json!([{"containerPort": TCP_PORT}, {"containerPort": UDP_PORT, "protocol": "UDP"}]),
        ),
    ]
}

/// `policies` NetworkPolicies selecting the server: the one admitting the client, and the others
/// each admitting one address of 10.88.0.0/16 on its own TCP port.
fn policies(policies: usize) -> Vec<Value> {
    let mut out = vec![
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-from-client", "namespace": NAMESPACE},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"protocol": "TCP", "port": TCP_PORT}, {"protocol": "UDP", "port": UDP_PORT}]}]}}),
    ];
    for n in 0..policies.saturating_sub(1) {
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("server-from-peer-{n}"), "namespace": NAMESPACE},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": format!("10.88.{}.{}/32", n / 250, n % 250 + 1)}}],
                    "ports": [{"protocol": "TCP", "port": 10_000 + n}]}]}}));
    }
    out
}

impl AgentNode {
    /// The node with its agent enforcing 1 policy, and both pods added through `weir-cni`.
    pub fn start() -> anyhow::Result<Self> {
        let node = Netns::new("bta");
        let dirs = AgentDirs::new("traffic", NODE);
        std::fs::write(dirs.manifests.join("cluster.json"), list(cluster()))?;
        let mut this = Self {
            agent: None,
            client: Netns::new("btac"),
            server: Netns::new("btas"),
            client_ip: IpAddr::from([0, 0, 0, 0]),
            server_ip: IpAddr::from([0, 0, 0, 0]),
            node,
            dirs,
        };
        this.enforce(1, true)?;
        let plugin = Plugin::new(
            &this.node.name,
            &this.dirs.socket,
            &this.dirs.root.join("cni.log"),
        );
        for (name, pod) in [("client", &this.client), ("server", &this.server)] {
            let id = format!("bench-traffic-{name}");
            let (out, _) = plugin.ok(
                "ADD",
                &PodRef {
                    container_id: &id,
                    namespace: NAMESPACE,
                    name,
                    netns: &pod.name,
                },
            );
            let ip = first_address(&out);
            if name == "client" {
                this.client_ip = ip;
            } else {
                this.server_ip = ip;
            }
        }
        this.wait_enforcing(1)?;
        Ok(this)
    }

    /// Stops the running agent (SIGTERM: enforcement stays in place, as on a node).
    fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop(nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Restarts the agent with `policies` NetworkPolicies in the manifests directory and
    /// `--redirect-local-pods redirect`; returns once it enforces them.
    pub fn enforce(&mut self, policies: usize, redirect: bool) -> anyhow::Result<()> {
        self.stop();
        let file = self.dirs.manifests.join("policies.json");
        std::fs::write(&file, list(self::policies(policies)))?;
        let redirect = redirect.to_string();
        self.agent = Some(Agent::start(
            &self.node,
            NODE,
            &self.dirs,
            &[
                "--pod-cidr",
                POD_CIDR,
                "--xdp-device",
                "none",
                "--redirect-local-pods",
                &redirect,
            ],
        ));
        if self.server_ip != IpAddr::from([0, 0, 0, 0]) {
            self.wait_enforcing(policies)?;
        }
        Ok(())
    }

    /// Waits until the agent's metrics say it enforces `policies` policies on both pods.
    fn wait_enforcing(&self, policies: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + ENFORCING_WITHIN;
        let wanted = [
            ("weir_enforcement_state{state=\"enforcing\"}", 1),
            (
                "weir_cluster_objects{kind=\"NetworkPolicy\"}",
                policies as u64,
            ),
            ("weir_endpoints_by_state{state=\"enforced\"}", 2),
        ];
        loop {
            let (_, metrics) = health_get(&self.node, HEALTH_PORT, "/metrics");
            if wanted
                .iter()
                .all(|(sample, value)| metric(&metrics, sample) == Some(*value))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not enforce {policies} policies within {ENFORCING_WITHIN:?}; its metrics:\n{metrics}\nits log:\n{}",
                self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent and removes Weir from the node (`weir-agent uninstall`): the pods' veths
    /// and routes stay, without programs.
    pub fn uninstall(&mut self) -> anyhow::Result<()> {
        self.stop();
        let out = self
            .node
            .command(bin("weir-agent").to_str().unwrap_or("weir-agent"))
            .args(["uninstall", "--node-name", NODE, "--bpffs-dir"])
            .arg(&self.dirs.bpffs)
            .arg("--state-dir")
            .arg(&self.dirs.state)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "weir-agent uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}
