//! Weir's lab: the one harness of the end-to-end tests, the benchmarks and `cargo xtask lab`.
//! Network namespaces, processes, agents, the CNI plugin run as kubelet runs it, node
//! topologies, probes and the pod server, on the real `weir-agent` and `weir-cni`.

pub mod agent;
pub mod cni;
pub mod kubelet;
pub mod lab;
pub mod matrix;
pub mod netns;
pub mod nodes;
pub mod objects;
pub mod ping;
pub mod process;
pub mod tcp;
