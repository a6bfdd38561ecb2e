//! What the root-only tests share beyond the harness (weir-lab): packet builders, the datapath's
//! test-run bench, the CNI plugin's bench against the agent's API, the fake Kubernetes API
//! server, the NetworkPolicy cases; and the benchmarks `cargo xtask bench` runs.

pub mod applied;
pub mod bench;
pub mod bpf_syscall;
pub mod cni_bench;
pub mod cpu;
pub mod kube_server;
pub mod mesh_pair;
pub mod netpol_cases;
pub mod netpol_lab;
pub mod packet;
pub mod testrun;

// The harness itself lives in weir-lab; these paths stay for the test files.
pub use weir_lab::{agent, cni, lab, netns, nodes, ping, tcp, wait};
