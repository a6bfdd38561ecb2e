//! Manifests of a one-node mesh cluster (a gateway node `gw`, exported namespaces, pods, a
//! MeshPeer), shared by the mesh benchmark and the mesh failover test.

use std::net::IpAddr;

/// The gateway Node `gw` with its pod CIDR and InternalIP.
pub fn node_yaml(cidr: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: gw, labels: {{mesh.weir.io/gateway: 'true'}}}}\n\
         spec: {{podCIDRs: ['{cidr}']}}\nstatus: {{addresses: [{{type: InternalIP, address: '{ip}'}}]}}\n"
    )
}

/// A Namespace the MeshPeers export.
pub fn namespace_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{mesh.weir.io/export: 'true'}}}}\n"
    )
}

/// A Pod on `gw`, with its address once the CNI ADD gave it one.
pub fn pod_yaml(name: &str, ns: &str, ip: Option<IpAddr>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: gw}}\n"
    );
    if let Some(ip) = ip {
        y.push_str(&format!("status: {{podIPs: [{{ip: '{ip}'}}]}}\n"));
    }
    y
}

/// A MeshPeer: the peer's gateway endpoint, its CA bundle and the prefix it may claim.
pub fn mesh_peer_yaml(name: &str, endpoint: &str, ca: &str, prefix: &str) -> String {
    let ca = ca.replace('\n', "\n    ");
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec:\n  endpoints: ['{endpoint}']\n  \
         allowedPrefixes: ['{prefix}']\n  export: {{namespaceSelector: {{matchLabels: {{mesh.weir.io/export: 'true'}}}}}}\n  \
         staleTTL: 10m\n  caBundle: |\n    {ca}\n"
    )
}
