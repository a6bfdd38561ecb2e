//! What one cluster exports to a peer: identities (label sets with a session-scoped id) and
//! endpoints (pod address → identity id), as synced entries named `id/<n>` and `ep/<address>`,
//! and their conversion from and to the wire messages.

use std::{collections::BTreeMap, net::IpAddr};

use weir_proto::mesh::v1 as pb;

/// An exported label set. `id` is scoped to the exporter's session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityExport {
    pub id: u32,
    pub namespace: String,
    pub pod_labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
}

/// An exported pod address and the id of its identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointExport {
    pub addr: IpAddr,
    pub identity: u32,
}

/// One synced entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Export {
    Identity(IdentityExport),
    Endpoint(EndpointExport),
}

impl Export {
    /// The entry's name in the sync protocol; the importer requires names to match bodies.
    pub fn name(&self) -> String {
        match self {
            Export::Identity(i) => identity_name(i.id),
            Export::Endpoint(e) => endpoint_name(&e.addr),
        }
    }
}

pub fn identity_name(id: u32) -> String {
    format!("id/{id}")
}

pub fn endpoint_name(addr: &IpAddr) -> String {
    format!("ep/{}", addr.to_canonical())
}

/// Why a wire resource could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("resource `{name}` has no body")]
    NoBody { name: String },
    #[error("resource `{name}`: address of {len} bytes (4 or 16 expected)")]
    BadAddress { name: String, len: usize },
}

impl TryFrom<&pb::Resource> for Export {
    type Error = WireError;

    fn try_from(r: &pb::Resource) -> Result<Self, WireError> {
        match &r.body {
            Some(pb::resource::Body::Identity(i)) => Ok(Export::Identity(IdentityExport {
                id: i.id,
                namespace: i.namespace.clone(),
                pod_labels: i.pod_labels.clone().into_iter().collect(),
                namespace_labels: i.namespace_labels.clone().into_iter().collect(),
            })),
            Some(pb::resource::Body::Endpoint(e)) => Ok(Export::Endpoint(EndpointExport {
                addr: addr_from_bytes(&e.addr).ok_or(WireError::BadAddress {
                    name: r.name.clone(),
                    len: e.addr.len(),
                })?,
                identity: e.identity,
            })),
            None => Err(WireError::NoBody {
                name: r.name.clone(),
            }),
        }
    }
}

impl Export {
    pub fn to_wire(&self, name: &str) -> pb::Resource {
        let body = match self {
            Export::Identity(i) => pb::resource::Body::Identity(pb::IdentityExport {
                id: i.id,
                namespace: i.namespace.clone(),
                pod_labels: i.pod_labels.clone().into_iter().collect(),
                namespace_labels: i.namespace_labels.clone().into_iter().collect(),
            }),
            Export::Endpoint(e) => pb::resource::Body::Endpoint(pb::EndpointExport {
                addr: addr_to_bytes(&e.addr),
                identity: e.identity,
            }),
        };
        pb::Resource {
            name: name.to_owned(),
            body: Some(body),
        }
    }
}

pub fn addr_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?).to_canonical()),
        _ => None,
    }
}

pub fn addr_to_bytes(a: &IpAddr) -> Vec<u8> {
    match a.to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
