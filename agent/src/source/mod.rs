//! Where cluster state comes from. Standalone mode reads a manifests directory; Kubernetes mode
//! (kube-rs watchers) will feed the same `ClusterState` into the same runtime.

pub mod manifests;
