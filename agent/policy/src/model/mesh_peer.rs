//! `weir.io/v1alpha1` `MeshPeer`: one peer cluster of the mesh link, as the gateway reads it.
//! Fields stay strings here (like the other kinds); [`MeshPeer::validate`] turns them into
//! checked values or errors that name the field.

use std::{net::SocketAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{LabelSelector, ObjectMeta};
use crate::selector::Selector;

/// The label the receiver puts on imported namespaces and pods (`weir.io/cluster: <peer>`).
pub const CLUSTER_LABEL: &str = "weir.io/cluster";
/// The Node label that makes a node a mesh gateway.
pub const GATEWAY_NODE_LABEL: &str = "mesh.weir.io/gateway";

/// `weir.io/v1alpha1/MeshPeer`. Cluster-scoped; its name is the peer's cluster name, the one in
/// the peer's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeer {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MeshPeerSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshPeerSpec {
    /// The peer's gateways, `address:port`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// PEM CA certificates the peer's certificate must chain to.
    #[serde(default)]
    pub ca_bundle: String,
    /// The prefixes the peer may claim as its pods.
    #[serde(default)]
    pub allowed_prefixes: Vec<String>,
    /// What we export to this peer.
    #[serde(default)]
    pub export: MeshExport,
    /// How long the peer's import is kept while no session is up, e.g. `10m`, `30s`, `1h`.
    #[serde(default, rename = "staleTTL", skip_serializing_if = "Option::is_none")]
    pub stale_ttl: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshExport {
    /// Namespaces whose pods we export; absent exports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// A MeshPeer after its fields were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidMeshPeer {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub ca_bundle: String,
    pub allowed_prefixes: Vec<IpNet>,
    /// `None`: export nothing.
    pub export: Option<Selector>,
    pub stale_ttl: Duration,
}

/// Default `staleTTL`.
pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(600);

/// A field of a MeshPeer that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("MeshPeer {peer}: {field}: {reason}")]
pub struct MeshPeerError {
    pub peer: String,
    pub field: String,
    pub reason: String,
}

impl MeshPeer {
    pub fn validate(&self) -> Result<ValidMeshPeer, MeshPeerError> {
        let name = self.metadata.name.clone();
        let err = |field: &str, reason: String| MeshPeerError {
            peer: name.clone(),
            field: field.to_owned(),
            reason,
        };
        if !valid_cluster_name(&name) {
            return Err(err(
                "metadata.name",
                "must be a DNS label (lowercase letters, digits, '-'): the cluster name in the peer's certificate".into(),
            ));
        }
        let endpoints = self
            .spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.trim().parse::<SocketAddr>().map_err(|_| {
                    err(
                        &format!("spec.endpoints[{i}]"),
                        format!("{e:?} is not address:port"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !self.spec.ca_bundle.contains("-----BEGIN CERTIFICATE-----") {
            return Err(err(
                "spec.caBundle",
                "must hold the PEM CA certificate(s) the peer's certificate chains to".into(),
            ));
        }
        if self.spec.allowed_prefixes.is_empty() {
            return Err(err(
                "spec.allowedPrefixes",
                "must name the peer's pod prefixes (nothing else is accepted from it)".into(),
            ));
        }
        let allowed_prefixes = self
            .spec
            .allowed_prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
                    err(
                        &format!("spec.allowedPrefixes[{i}]"),
                        format!("{p:?} is not a CIDR"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let export = match &self.spec.export.namespace_selector {
            None => None,
            Some(sel) => Some(
                Selector::from_label_selector(sel)
                    .map_err(|reason| err("spec.export.namespaceSelector", reason))?,
            ),
        };
        let stale_ttl = match &self.spec.stale_ttl {
            None => DEFAULT_STALE_TTL,
            Some(text) => parse_duration(text).ok_or_else(|| {
                err(
                    "spec.staleTTL",
                    format!("{text:?} is not a duration such as 30s, 10m or 1h"),
                )
            })?,
        };
        Ok(ValidMeshPeer {
            name,
            endpoints,
            ca_bundle: self.spec.ca_bundle.clone(),
            allowed_prefixes,
            export,
            stale_ttl,
        })
    }
}

/// A cluster name: a DNS label.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `90s`, `10m`, `1h`, `1h30m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        any = true;
    }
    (any && number.is_empty()).then(|| Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(parse_duration(""), None);
    }
}
