//! Command-line flags (each also settable through the environment, for the DaemonSet).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

#[derive(Parser, Debug)]
#[command(
    name = "weir-agent",
    about = "Weir's node agent: enforces Kubernetes NetworkPolicy in eBPF on this node",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// How log lines are written.
    #[arg(long, env = "WEIR_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One object per line, for log collectors.
    Json,
}

/// How this node reaches other nodes' pods when native routes cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OverlayMode {
    /// No overlay: native routes (--native-routing) or nothing.
    None,
    /// A VXLAN overlay between the nodes' InternalIPs (IPv4).
    Vxlan,
}

/// Where the XDP early filter runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpDevice {
    /// The interface holding this Node's InternalIP; none without one.
    Auto,
    /// No XDP filter.
    None,
    /// This interface.
    Named(String),
}

impl std::str::FromStr for XdpDevice {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => XdpDevice::Auto,
            "none" => XdpDevice::None,
            name => XdpDevice::Named(name.to_owned()),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Remove Weir's enforcement from this node: detach every program and remove the pins.
    Uninstall(UninstallArgs),
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// This node's name: Pods with this spec.nodeName are local; names the default directories.
    /// Required.
    #[arg(long, env = "WEIR_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where maps and links are pinned [default: /sys/fs/bpf/weir/<node>].
    #[arg(long, env = "WEIR_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Where IPAM, endpoints, identities and the flow log live [default: /var/lib/weir/<node>].
    #[arg(long, env = "WEIR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl NodeArgs {
    /// The node name, or an error that says how to give it.
    pub fn node_name(&self) -> anyhow::Result<&str> {
        self.node_name.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "--node-name (or WEIR_NODE_NAME) is required: the name of this node's Node object"
            )
        })
    }

    pub fn bpffs_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.bpffs_dir {
            Some(dir) => dir.clone(),
            None => PathBuf::from("/sys/fs/bpf/weir").join(self.node_name()?),
        })
    }

    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.state_dir {
            Some(dir) => dir.clone(),
            None => PathBuf::from("/var/lib/weir").join(self.node_name()?),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Standalone mode: read Namespace, Pod, NetworkPolicy and Node manifests from this directory
    /// and follow its changes.
    #[arg(long, env = "WEIR_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubernetes mode: watch Pods, Namespaces, NetworkPolicies, Nodes and MeshPeers through the
    /// API server (in-cluster service account, or KUBECONFIG).
    #[arg(long, env = "WEIR_KUBERNETES", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub kubernetes: bool,
    /// Kubernetes mode: seconds to wait at start-up for the first complete list and, without
    /// --pod-cidr, for this node's Node object with spec.podCIDRs.
    #[arg(long, env = "WEIR_NODE_WAIT_SECONDS", default_value_t = 120)]
    pub node_wait_seconds: u64,
    /// Kubernetes mode: write a Kubernetes Event (reason PolicyRejected) on every rejected
    /// NetworkPolicy.
    #[arg(long, env = "WEIR_POLICY_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub policy_events: bool,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "WEIR_HEALTH_ADDR", default_value = "127.0.0.1:9876")]
    pub health_addr: std::net::SocketAddr,
    /// This node's pod CIDR(s), comma-separated for dual-stack; wins over the Node object's
    /// spec.podCIDRs.
    #[arg(long, env = "WEIR_POD_CIDR", value_delimiter = ',')]
    pub pod_cidr: Vec<IpNet>,
    /// The local API's unix socket: where the CNI plugin (`agentSocket`) and the `weir` CLI look
    /// by default. Agents of several nodes on one host (a lab) each need their own.
    #[arg(long, env = "WEIR_SOCKET", default_value = weir_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Reach other nodes' pods through a VXLAN overlay instead of native routes (for underlays
    /// that cannot route pod addresses).
    #[arg(long, env = "WEIR_OVERLAY", value_enum, default_value_t = OverlayMode::None)]
    pub overlay: OverlayMode,
    /// Route other nodes' pod CIDRs (their Node objects' spec.podCIDRs) via their InternalIP.
    #[arg(long, env = "WEIR_NATIVE_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_routing: bool,
    /// Cut established connections that a policy change no longer allows.
    #[arg(long, env = "WEIR_REVOKE_ESTABLISHED", default_value_t = true, action = clap::ArgAction::Set)]
    pub revoke_established: bool,
    /// Deliver traffic between pods of this node straight into the destination's namespace
    /// (`bpf_redirect_peer`, its ingress policy checked inline) instead of through the node's IP
    /// stack (and its iptables FORWARD chain).
    #[arg(long, env = "WEIR_REDIRECT_LOCAL_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub redirect_local_pods: bool,
    /// Hand traffic from this node's pods to other nodes' pods straight to the next hop of the
    /// node's route (`bpf_redirect_neigh` to the uplink or overlay device) instead of through the
    /// node's IP stack (and its iptables FORWARD chain).
    #[arg(long, env = "WEIR_REDIRECT_REMOTE_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub redirect_remote_pods: bool,
    /// Kernel-side debug logging: the programs log every verdict they report and the path each
    /// packet leaving a pod takes, into the agent's log (target `weir::bpf`). For debugging only:
    /// it costs per packet. Off, the log statements are removed at load and cost nothing.
    #[arg(long, env = "WEIR_BPF_LOG", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub bpf_log: bool,
    /// Log every new allowed connection to the flow log too, not only drops.
    #[arg(long, env = "WEIR_LOG_ALLOWED", default_value_t = false, action = clap::ArgAction::Set)]
    pub log_allowed: bool,
    /// The node's uplink (the device of node-to-node and overlay traffic), where the XDP early
    /// filter runs: `auto` (the interface holding this Node's InternalIP; none without one),
    /// `none`, or an interface name.
    #[arg(long, env = "WEIR_XDP_DEVICE", default_value = "auto")]
    pub xdp_device: XdpDevice,
    /// The XDP filter's mode: `auto` (generic on a veth, whose native XDP takes the peer's
    /// segmentation offloads away and saves nothing; native elsewhere, generic where the driver
    /// has none), `native` or `generic`.
    #[arg(long, env = "WEIR_XDP_MODE", value_enum, default_value_t = crate::datapath::uplink::XdpMode::Auto)]
    pub xdp_mode: crate::datapath::uplink::XdpMode,
    /// The operator's deny list, dropped at XDP on the uplink: a file with one CIDR or address
    /// per line (`#` comments), followed for changes. In Kubernetes mode, mount the
    /// `weir-prefilter` ConfigMap's `deny` key here.
    #[arg(long, env = "WEIR_PREFILTER_FILE")]
    pub prefilter_file: Option<PathBuf>,
    /// Seconds a CNI ADD waits for its Pod object before failing with "try again later".
    #[arg(long, env = "WEIR_POD_WAIT_SECONDS", default_value_t = 10)]
    pub pod_wait_seconds: u64,
    #[command(flatten)]
    pub mesh: crate::mesh::MeshArgs,
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Also delete the state directory (IPAM allocations, endpoints, identities, flow log).
    #[arg(long)]
    pub purge_state: bool,
}
