//! Weir's node agent as a library: the binary (`main.rs`) wires these together, and the root-only
//! tests in `tests/` drive them directly.

pub mod datapath;
pub mod endpoints;
pub mod source;
