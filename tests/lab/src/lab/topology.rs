//! The lab's network: an underlay namespace holding a bridge, and node namespaces joined to it by
//! veths. Nodes route each other's pod CIDRs over the underlay; nothing routes out of the machine
//! (no default route anywhere, and no link to the root namespace).

use anyhow::Context as _;

use super::state::{NodeState, State};
use crate::netns;

pub fn underlay_netns(lab: &str) -> String {
    format!("wl-{lab}-ul")
}

pub fn node_netns(lab: &str, node: &str) -> String {
    format!("wl-{lab}-{node}")
}

/// Pod namespaces: `wl-<lab>-<namespace>.<pod>` (a Kubernetes namespace name has no dot, so this
/// is unambiguous).
pub fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("wl-{lab}-{namespace}.{pod}")
}

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// The lab's node records (not yet built).
pub fn plan_nodes(state: &State, count: usize) -> Vec<NodeState> {
    (1..=count)
        .map(|i| {
            let name = node_name(i);
            let dir = state.dir.join(&name);
            NodeState {
                netns: node_netns(&state.name, &name),
                underlay_ip: format!("172.31.{}.{i}", state.index),
                pod_cidr: format!("10.{}.{i}.0/24", state.index),
                socket: dir.join("agent.sock"),
                state_dir: dir.join("state"),
                bpffs_dir: format!("/sys/fs/bpf/weir/{}-{name}", state.name).into(),
                log: dir.join("agent.log"),
                agent_pid: None,
                name,
            }
        })
        .collect()
}

/// Creates the underlay and the node namespaces with their addresses and routes.
pub fn build(state: &State) -> anyhow::Result<()> {
    let ul = &state.underlay_netns;
    netns::add(ul)?;
    netns::ip_in(ul, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(ul, &["link", "set", "br0", "up"])?;
    for (i, node) in state.nodes.iter().enumerate() {
        let ns = &node.netns;
        netns::add(ns).with_context(|| format!("creating node {}", node.name))?;
        let port = format!("n{}", i + 1);
        netns::ip_in(
            ul,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        netns::ip_in(ul, &["link", "set", &port, "master", "br0", "up"])?;
        netns::ip_in(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/24", node.underlay_ip),
                "dev",
                "eth0",
            ],
        )?;
        netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
        netns::sysctl_in(ns, "net.ipv4.ip_forward", "1")?;
        netns::sysctl_in(ns, "net.ipv4.conf.all.rp_filter", "0")?;
        netns::sysctl_in(ns, "net.ipv4.conf.default.rp_filter", "0")?;
        for other in &state.nodes {
            if other.name != node.name {
                netns::ip_in(
                    ns,
                    &[
                        "route",
                        "add",
                        &other.pod_cidr,
                        "via",
                        &other.underlay_ip,
                        "dev",
                        "eth0",
                    ],
                )?;
            }
        }
    }
    Ok(())
}
