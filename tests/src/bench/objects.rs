//! Kubernetes objects the agent benchmarks generate at scale (as JSON, the agent's manifests
//! source reads JSON as YAML): the pieces the idle and scale clusters share.

use serde_json::{Value, json};

/// A `kind: List` of `items`, one file of many objects.
pub fn list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Namespaces `ns0`..: each labelled with one of three teams, `team: t{n % 3}`.
pub fn namespaces(count: usize) -> impl Iterator<Item = Value> {
    (0..count).map(|n| {
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 3)}}})
    })
}

/// The name of node `k`: this node for 0, `n{k}` for the others.
pub fn node_name(this_node: &str, k: usize) -> String {
    if k == 0 {
        this_node.to_owned()
    } else {
        format!("n{k}")
    }
}

/// A Node with its pod CIDR and, where given, its InternalIP.
pub fn node(name: &str, pod_cidr: &str, internal_ip: Option<&str>) -> Value {
    let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDRs": [pod_cidr]}});
    if let Some(ip) = internal_ip {
        node["status"] = json!({"addresses": [{"type": "InternalIP", "address": ip}]});
    }
    node
}

/// A running Pod with a named port `http` (80) on `node`; a pod of another node has its address
/// in `status.podIPs` (a local one gets its address from this node's IPAM at ADD).
pub fn pod(name: &str, namespace: &str, labels: Value, node: &str, ip: Option<String>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
        "status": {"phase": "Running"}});
    if let Some(ip) = ip {
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{ "ip": ip }]);
    }
    pod
}

/// For every tenth policy `j`, an ingress rule from a /16 with a /24 excepted (ipBlock rules
/// take the compiler's CIDR path, which other rules do not).
pub fn every_tenth_ip_block(j: usize) -> Option<Value> {
    j.is_multiple_of(10).then(|| {
        let block = 100 + j % 100;
        json!({"from": [{"ipBlock": {"cidr": format!("10.{block}.0.0/16"),
            "except": [format!("10.{block}.1.0/24")]}}]})
    })
}
