//! What a lab made, on disk in /run/weir-lab/<lab>/state.json, so that another process (`cargo
//! xtask lab down --name X`) or a later run can take it down after a crash or a kill.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cni::PodRef;
use crate::matrix::Proto;

pub const ROOT: &str = "/run/weir-lab";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    /// Picks the lab's address ranges: underlay 172.31.<index>.0/24, pods 10.<index>.<n>.0/24.
    pub index: u8,
    pub dir: PathBuf,
    pub underlay_netns: String,
    pub agent_bin: PathBuf,
    pub cni_bin: PathBuf,
    pub server_bin: PathBuf,
    /// Ports every pod serves besides its containerPorts.
    #[serde(default)]
    pub extra_ports: Vec<u16>,
    /// Flags every agent gets besides the lab's own.
    #[serde(default)]
    pub agent_args: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub pods: BTreeMap<String, PodState>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    pub pod_cidr: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    pub agent_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<String>,
    /// Declared ports (containerPort, protocol): the matrix's columns.
    pub ports: Vec<(u16, Proto)>,
    pub server_pid: Option<u32>,
}

impl State {
    pub fn dir_of(name: &str) -> PathBuf {
        Path::new(ROOT).join(name)
    }

    pub fn path_of(name: &str) -> PathBuf {
        Self::dir_of(name).join("state.json")
    }

    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = Self::path_of(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab named {name:?} ({path:?} is missing)"))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = Self::path_of(&self.name);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Names of the labs that have a state directory.
    pub fn all_names() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(ROOT)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl PodState {
    /// The pod's identity as the plugin is given it.
    pub fn cni_ref(&self) -> PodRef<'_> {
        PodRef {
            container_id: &self.container_id,
            namespace: &self.namespace,
            name: &self.name,
            netns: &self.netns,
        }
    }
}
