//! Weir's lab: the one harness of the end-to-end tests, the benchmarks and `cargo xtask lab`.
//! Network namespaces, processes, agents, the CNI plugin run as kubelet runs it, node
//! topologies, probes and the pod server, on the real `weir-agent` and `weir-cni`.
//!
//! From the bottom up (a module uses only those below it):
//! - `process`, `netns`, `matrix`, `wait`: binaries and processes; network namespaces;
//!   reachability matrices and expectations; waiting for an observable state.
//! - `agent` (the one way to start an agent and wait until it is ready), `cni` (the plugin as a
//!   runtime runs it), `objects` (manifests through the compiler's model), `tcp` and `ping`
//!   (probes for tests).
//! - `kubelet`: a Pod's object, ADD, `status.podIPs`.
//! - Topologies: `nodes` (two nodes on one link, for tests that drive the agents themselves) and
//!   `lab` (any number of nodes on an underlay bridge, with pod servers, kept on disk so that
//!   another process can take it down).
//!
//! Nothing here depends on the agent's crate, so that xtask builds on it without the kernel
//! programs' toolchain.

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
pub mod wait;
