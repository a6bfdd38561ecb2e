//! `weir.io/v1alpha1` MeshPeer as the API server serves it (the CRD of
//! `manifests/05-crd-meshpeer.yaml`), for the Kubernetes source's watcher. The spec stays JSON
//! here: the standalone parser converts it, like every other kind, so both modes read a
//! MeshPeer alike.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "weir.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "MeshPeer";
pub const PLURAL: &str = "meshpeers";

fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

fn kind() -> String {
    KIND.to_owned()
}

/// One MeshPeer object. Items of a list may come without apiVersion and kind; they are filled
/// in so the parser recognises the object.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct KMeshPeer {
    #[serde(rename = "apiVersion", default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

impl kube::Resource for KMeshPeer {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    #[test]
    fn the_path_and_the_parser_agree_with_the_crd() {
        assert_eq!(
            KMeshPeer::url_path(&(), None),
            "/apis/weir.io/v1alpha1/meshpeers"
        );
        let crd = include_str!("../../../manifests/05-crd-meshpeer.yaml");
        for needle in [
            "group: weir.io",
            "plural: meshpeers",
            "kind: MeshPeer",
            "name: v1alpha1",
            "scope: Cluster",
        ] {
            assert!(crd.contains(needle), "the CRD has no `{needle}`");
        }
        // An item without apiVersion/kind (as in a list) still parses as a MeshPeer.
        let item: KMeshPeer = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "east", "resourceVersion": "3"},
            "spec": {"endpoints": ["192.0.2.5:4243"], "allowedPrefixes": ["10.245.0.0/16"]}
        }))
        .unwrap();
        let json = serde_json::to_string(&item).unwrap();
        let objects: Vec<_> = weir_policy::model::parse_documents(&json, "test")
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            matches!(&objects[..], [weir_policy::model::Object::MeshPeer(p)] if p.metadata.name == "east"),
            "{objects:?}"
        );
    }
}
