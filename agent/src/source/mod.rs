//! Where cluster state comes from. Standalone mode reads a manifests directory; Kubernetes mode
//! (kube-rs watchers) feeds the same `ClusterState` into the same runtime.

pub mod kubernetes;
pub mod manifests;
