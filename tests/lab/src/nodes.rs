//! Two nodes for tests that drive the agents themselves: two node namespaces joined by one
//! underlay veth, an agent's directories each around one shared manifests directory (one API
//! server), their Node objects, and pods started on them as kubelet starts them. (The lab's
//! topology, with its underlay bridge and any number of nodes, is `lab::topology`.)

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::agent::AgentDirs;
use crate::cni::Plugin;
use crate::kubelet;
use crate::netns::Netns;
use crate::objects::{self, Object};
use crate::tcp::PORT;

/// Node `n1` and node `n2`: namespaces, agent directories, and their plugins.
pub struct TwoNodes {
    pub n1: Netns,
    pub n2: Netns,
    pub d1: AgentDirs,
    pub d2: AgentDirs,
    tag: String,
}

/// A pod of a test: its name (in namespace `default`), its node and its `app` label.
pub type PodSpec<'a> = (&'a str, &'a str, &'a str);

/// A started pod: its namespace and address.
pub struct Pod {
    pub netns: Netns,
    pub ip: IpAddr,
}

impl TwoNodes {
    /// `underlay`: the first three octets of the underlay /24 (n1 is .1, n2 is .2); `pods`: the
    /// first two octets of the pod CIDRs (n1 has `<pods>.1.0/24`, n2 `<pods>.2.0/24`). The
    /// Node objects are written; the agents are the test's to start.
    pub fn new(tag: &str, underlay: &str, pods: &str) -> Self {
        let (n1, n2) = (
            Netns::new(&format!("{tag}1")),
            Netns::new(&format!("{tag}2")),
        );
        n1.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &n2.name,
        ]);
        n1.ip(&["addr", "add", &format!("{underlay}.1/24"), "dev", "eth0"]);
        n2.ip(&["addr", "add", &format!("{underlay}.2/24"), "dev", "eth0"]);
        n1.ip(&["link", "set", "eth0", "up"]);
        n2.ip(&["link", "set", "eth0", "up"]);
        let d1 = AgentDirs::new(tag, "n1");
        let d2 = AgentDirs::sharing_manifests(tag, "n2", &d1);
        let nodes = Self {
            n1,
            n2,
            d1,
            d2,
            tag: tag.to_owned(),
        };
        for i in [1, 2] {
            let node = format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\nspec: {{podCIDRs: ['{pods}.{i}.0/24']}}\n\
                 status: {{addresses: [{{type: InternalIP, address: '{underlay}.{i}'}}]}}\n"
            );
            nodes.write(&node);
        }
        nodes
    }

    /// The manifests directory both agents read.
    pub fn manifests(&self) -> &Path {
        &self.d1.manifests
    }

    /// Where the Node object `node` is (remove it to take the node out of the cluster).
    pub fn node_file(&self, node: &str) -> PathBuf {
        self.manifests()
            .join(objects::file_name("Node", None, node))
    }

    /// Writes the objects of `yaml` into the manifests directory.
    pub fn write(&self, yaml: &str) {
        for object in objects::parse(yaml).expect("test manifests") {
            objects::write(self.manifests(), &object).expect("writing a manifest");
        }
    }

    fn pod(name: &str, node: &str, app: &str) -> Object {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: {PORT}}}]}}]}}\n"
        );
        objects::parse(&yaml).expect("a test pod").remove(0)
    }

    /// Writes the Pod objects (so that the agents know them when they start).
    pub fn declare_pods(&self, pods: &[PodSpec<'_>]) {
        for &(name, node, app) in pods {
            objects::write(self.manifests(), &Self::pod(name, node, app)).expect("writing a pod");
        }
    }

    /// The plugin as node `n1` or `n2` runs it.
    pub fn plugin(&self, node: &str) -> Plugin {
        let (netns, dirs) = match node {
            "n1" => (&self.n1, &self.d1),
            "n2" => (&self.n2, &self.d2),
            _ => panic!("no node {node}: there are n1 and n2"),
        };
        Plugin::new(&netns.name, &dirs.socket, &dirs.root.join("cni.log"))
    }

    /// Starts the pods on their nodes (their agents running) as kubelet does, in order: a
    /// namespace each (`<tag><first 3 letters of the name>`), ADD, the address published.
    pub fn start_pods(&self, pods: &[PodSpec<'_>]) -> Vec<Pod> {
        pods.iter()
            .map(|&(name, node, app)| {
                let netns = Netns::new(&format!("{}{}", self.tag, &name[..3]));
                let mut object = Self::pod(name, node, app);
                let ips = kubelet::start_pod(
                    &self.plugin(node),
                    self.manifests(),
                    &mut object,
                    &format!("ctr-{name}"),
                    &netns.name,
                )
                .unwrap_or_else(|e| panic!("{e:#}"));
                Pod { netns, ip: ips[0] }
            })
            .collect()
    }
}
