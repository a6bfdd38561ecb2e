//! Helpers shared by the root-only tests: packet builders, namespace guards, agent processes;
//! and the benchmarks `cargo xtask bench` runs.

pub mod agent;
pub mod bench;
pub mod cni;
pub mod cpu;
pub mod kube_server;
pub mod netns;
pub mod netpol_cases;
pub mod packet;
pub mod ping;
pub mod tcp;
pub mod testrun;
