//! Benchmarks (run by `cargo xtask bench`, never by the test suite). Each prints its baseline,
//! measured in the same run, next to Weir, and the ratio.

pub mod cni;
pub mod cpu_wakeup;
pub mod datapath;
pub mod datapath_redirect;
pub mod datapath_xdp;
pub mod heap;
pub mod idle;
pub mod mesh;
pub mod mesh_sync;
mod objects;
pub mod propagation;
pub mod scale;
pub mod stats;
pub mod traffic;
pub mod traffic_agent;
pub mod traffic_bpf_stats;
pub mod xdp;
pub mod xdp_frames;
