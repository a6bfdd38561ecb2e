//! Helpers shared by the root-only tests: packet builders, namespace guards, agent processes;
//! and the benchmarks `cargo xtask bench` runs.

pub mod bench;
pub mod cni_bench;
pub mod cpu;
pub mod kube_server;
pub mod netpol_cases;
pub mod packet;
pub mod testrun;

// The harness itself lives in weir-lab; these paths stay for the test files.
pub use weir_lab::{agent, cni, lab, netns, nodes, ping, tcp};
