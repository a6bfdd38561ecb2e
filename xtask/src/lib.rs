//! The library half of xtask: the lab of nodes and pods in network namespaces, shared by the
//! `cargo xtask lab` and `demo` commands and the end-to-end tests.

pub mod lab;
