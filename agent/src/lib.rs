//! Weir's node agent as a library: the binary (`main.rs`) wires these together, and the root-only
//! tests in `tests/` drive them directly.

pub mod api;
pub mod config;
pub mod datapath;
pub mod endpoints;
pub mod flows;
pub mod health;
pub mod ipam;
pub mod merged_state;
pub mod mesh;
pub mod mesh_forward;
pub mod mesh_status;
pub mod mesh_thread;
pub mod mesh_tun;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod persist;
pub mod prefilter;
pub mod reconcile;
pub mod routes;
pub mod runtime;
pub mod sched_slice;
pub mod source;
