//! The policy compiler: a pure function from cluster state (Namespaces, Pods, NetworkPolicies,
//! Nodes) to the desired contents of the datapath maps.

pub mod model;
pub mod output;
