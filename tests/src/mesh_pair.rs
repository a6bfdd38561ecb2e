//! Two one-node clusters, west and east, joined only through a WAN router namespace, as the
//! mesh link's end-to-end tests and its benchmark use them: each cluster a gateway node `gw`
//! with the real agent in standalone mode (its manifests directory is the cluster), pods wired by
//! the real weir-cni, a certificate of one mesh CA and a MeshPeer for the other cluster. There
//! is no route between the clusters' pod networks but through the gateways' mTLS link.
//!
//! West's gateway has WAN address 192.0.2.1, east's 192.0.2.5, the router 192.0.2.2 and
//! 192.0.2.6. East may also have a worker node `wk` (pods 10.161.2.0/24) on a LAN with its
//! gateway (192.168.91.0/24; the gateway's InternalIP is its LAN address then), which is not a
//! gateway and has no certificate.

use std::{net::IpAddr, path::Path};

use weir_lab::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::Netns,
};
use weir_mesh::certs::MeshCa;

/// Each cluster's pods, and the part of them on its gateway node.
pub const WEST_PODS: &str = "10.160.0.0/16";
pub const EAST_PODS: &str = "10.161.0.0/16";
pub const WEST_NODE_PODS: &str = "10.160.1.0/24";
pub const EAST_NODE_PODS: &str = "10.161.1.0/24";
/// West's gateway on the WAN, and east's, with the mesh port.
pub const WEST_ENDPOINT: &str = "192.0.2.1:4243";
pub const EAST_ENDPOINT: &str = "192.0.2.5:4243";

/// A Node of a cluster, with its pod CIDR, its InternalIP and whether it is a mesh gateway.
pub fn node_yaml(name: &str, cidr: &str, ip: &str, gateway: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{mesh.weir.io/gateway: '{gateway}'}}}}\n\
         spec: {{podCIDRs: ['{cidr}']}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
    )
}

/// A Namespace the MeshPeers export, labelled `team: <name>` for policies to select.
pub fn namespace_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {name}, mesh.weir.io/export: 'true'}}}}\n"
    )
}

/// A Pod on `node`, labelled `app: <name>`, with its address once the CNI ADD gave it one.
pub fn pod_yaml(name: &str, ns: &str, node: &str, ip: Option<IpAddr>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {node}}}\n"
    );
    if let Some(ip) = ip {
        y.push_str(&format!("status: {{podIPs: [{{ip: '{ip}'}}]}}\n"));
    }
    y
}

/// A MeshPeer: the peer's gateway endpoint, its CA bundle and the prefix it may claim.
pub fn mesh_peer_yaml(name: &str, endpoint: &str, ca: &str, prefix: &str) -> String {
    let ca = ca.replace('\n', "\n    ");
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec:\n  endpoints: ['{endpoint}']\n  \
         allowedPrefixes: ['{prefix}']\n  export: {{namespaceSelector: {{matchLabels: {{mesh.weir.io/export: 'true'}}}}}}\n  \
         staleTTL: 10m\n  caBundle: |\n    {ca}\n"
    )
}

/// One node of a cluster: its namespace, its agent's directories (the cluster's manifests
/// directory is shared by its nodes), its agent's arguments and its CNI plugin.
pub struct Node {
    pub name: String,
    pub netns: Netns,
    pub dirs: AgentDirs,
    pub plugin: Plugin,
    pub args: Vec<String>,
}

impl Node {
    fn new(name: &str, netns: Netns, dirs: AgentDirs, args: Vec<String>) -> Self {
        let plugin = Plugin::new(&netns.name, &dirs.socket, &dirs.root.join("cni.log"));
        Self {
            name: name.to_owned(),
            netns,
            dirs,
            plugin,
            args,
        }
    }

    pub fn manifests(&self) -> &Path {
        &self.dirs.manifests
    }

    /// Starts the node's agent with its arguments and `extra` ones.
    pub fn start_with(&self, extra: &[&str]) -> Agent {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Agent::start(&self.netns, &self.name, &self.dirs, &args)
    }

    pub fn start(&self) -> Agent {
        self.start_with(&[])
    }

    /// Wires pod `name` in `ns` with the real plugin and publishes its address, as kubelet does:
    /// the Pod object first, its address once the ADD gave it one. `tag` names the pod's
    /// network namespace.
    pub fn add_pod(&self, name: &str, ns: &str, tag: &str) -> (Netns, IpAddr) {
        let file = self.manifests().join(format!("pod-{name}.yaml"));
        std::fs::write(&file, pod_yaml(name, ns, &self.name, None)).expect("writing the pod");
        let pod_ns = Netns::new(tag);
        let (out, _) = self.plugin.ok(
            "ADD",
            &PodRef {
                container_id: &format!("ctr-{name}"),
                namespace: ns,
                name,
                netns: &pod_ns.name,
            },
        );
        let ip = first_address(&out);
        std::fs::write(&file, pod_yaml(name, ns, &self.name, Some(ip))).expect("writing the pod");
        (pod_ns, ip)
    }
}

/// The two clusters; namespaces and directories go away on drop. Agents are the caller's.
pub struct MeshPair {
    pub wan: Netns,
    pub ca: MeshCa,
    pub west: Node,
    pub east: Node,
    pub worker: Option<Node>,
}

/// What differs between the users of the pair.
pub struct PairOptions<'a> {
    /// Prefixes every namespace and directory name (each is also unique per process).
    pub tag: &'a str,
    /// The mesh trust domain the gateway certificates name.
    pub domain: &'a str,
    /// Whether east has a worker node.
    pub east_worker: bool,
}

impl MeshPair {
    pub fn new(options: &PairOptions<'_>) -> Self {
        let tag = options.tag;
        let wan = Netns::new(&format!("{tag}w"));
        let (gw_west, gw_east) = (
            Netns::new(&format!("{tag}gw")),
            Netns::new(&format!("{tag}ge")),
        );
        for (dev, gw, wan_addr, gw_addr, other) in [
            (
                "w0",
                &gw_west,
                "192.0.2.2/30",
                "192.0.2.1/30",
                "192.0.2.4/30",
            ),
            (
                "e0",
                &gw_east,
                "192.0.2.6/30",
                "192.0.2.5/30",
                "192.0.2.0/30",
            ),
        ] {
            wan.ip(&[
                "link", "add", dev, "type", "veth", "peer", "name", "wan0", "netns", &gw.name,
            ]);
            wan.ip(&["addr", "add", wan_addr, "dev", dev]);
            wan.ip(&["link", "set", dev, "up"]);
            gw.ip(&["addr", "add", gw_addr, "dev", "wan0"]);
            gw.ip(&["link", "set", "wan0", "up"]);
            let via = wan_addr.split('/').next().unwrap_or_default();
            gw.ip(&["route", "add", other, "via", via]);
        }
        let forwarding = wan
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()
            .expect("running sysctl in the WAN namespace");
        assert!(forwarding.success(), "the WAN router forwards");
        let worker_ns = options.east_worker.then(|| {
            let wk = Netns::new(&format!("{tag}wk"));
            gw_east.ip(&[
                "link", "add", "lan0", "type", "veth", "peer", "name", "lan0", "netns", &wk.name,
            ]);
            gw_east.ip(&["addr", "add", "192.168.91.1/24", "dev", "lan0"]);
            wk.ip(&["addr", "add", "192.168.91.2/24", "dev", "lan0"]);
            gw_east.ip(&["link", "set", "lan0", "up"]);
            wk.ip(&["link", "set", "lan0", "up"]);
            wk
        });

        let ca = MeshCa::new(&format!("weir {} CA", options.domain)).expect("making the mesh CA");
        let east_internal = if options.east_worker {
            "192.168.91.1"
        } else {
            "192.0.2.5"
        };
        let mut gateways = Vec::new();
        for (name, node_ns, cidr, ip, peer, peer_endpoint, peer_prefix) in [
            (
                "west",
                gw_west,
                WEST_NODE_PODS,
                "192.0.2.1",
                "east",
                EAST_ENDPOINT,
                EAST_PODS,
            ),
            (
                "east",
                gw_east,
                EAST_NODE_PODS,
                east_internal,
                "west",
                WEST_ENDPOINT,
                WEST_PODS,
            ),
        ] {
            let dirs = AgentDirs::new(&format!("{tag}-{name}"), "gw");
            let (cert, key) = ca
                .gateway(options.domain, name)
                .expect("issuing the gateway certificate")
                .write(&dirs.root, name)
                .expect("writing the gateway certificate");
            let m = &dirs.manifests;
            std::fs::write(m.join("node.yaml"), node_yaml("gw", cidr, ip, true))
                .expect("writing the node");
            std::fs::write(
                m.join("peer.yaml"),
                mesh_peer_yaml(peer, peer_endpoint, &ca.pem(), peer_prefix),
            )
            .expect("writing the mesh peer");
            let args = vec![
                "--mesh-cert".into(),
                display(&cert),
                "--mesh-key".into(),
                display(&key),
            ];
            gateways.push(Node::new("gw", node_ns, dirs, args));
        }
        let east = gateways.pop().expect("east");
        let west = gateways.pop().expect("west");
        let worker = worker_ns.map(|wk| {
            let dirs = AgentDirs::sharing_manifests(&format!("{tag}-east"), "wk", &east.dirs);
            std::fs::write(
                east.manifests().join("node-wk.yaml"),
                node_yaml("wk", "10.161.2.0/24", "192.168.91.2", false),
            )
            .expect("writing the worker node");
            Node::new("wk", wk, dirs, Vec::new())
        });
        Self {
            wan,
            ca,
            west,
            east,
            worker,
        }
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
