//! Local endpoints as the agent's API sees them: what a CNI ADD registers, and the operations the
//! gRPC service (`api`) asks of the agent's runtime (`runtime`), which owns the cluster state and
//! the datapath.

use std::{net::IpAddr, time::Duration};

use weir_policy::model::ObjectKey;

/// One pod interface on this node, as wired by the CNI plugin.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalEndpoint {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME (inside the pod).
    pub ifname: String,
    /// The Pod object this interface belongs to.
    pub pod: ObjectKey,
    /// Name of the host-side veth (in the node's network namespace).
    pub host_ifname: String,
    /// The pod's addresses (from IPAM).
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The agent does not know the Pod (yet): CNI code 11, try again later.
    #[error(
        "the agent has no Pod object {pod} after waiting {waited:?}; create the Pod object (standalone: a manifest in the manifests directory) before the CNI ADD, or retry"
    )]
    PodUnknown { pod: ObjectKey, waited: Duration },
    /// The agent is not ready (datapath not loaded, state not read): code 11.
    #[error("the agent is not ready: {0}")]
    NotReady(String),
    /// Attaching or writing the datapath failed: enforcement is not in place.
    #[error("enforcement for {pod} could not be put in place on {host_ifname}: {reason}")]
    Datapath {
        pod: ObjectKey,
        host_ifname: String,
        reason: String,
    },
}

/// What the API service needs from the agent's runtime.
#[tonic::async_trait]
pub trait EndpointBackend: Send + Sync + 'static {
    /// `Ok` when the agent can serve ADD; otherwise why not.
    fn readiness(&self) -> Result<(), String>;
    /// Waits until the Pod object is known, up to `timeout`.
    async fn wait_for_pod(&self, pod: &ObjectKey, timeout: Duration) -> Result<(), EndpointError>;
    /// Puts enforcement in place for the endpoint (programs attached to its host veth, endpoint,
    /// identity and policy in the maps) and returns only once the datapath has it.
    async fn activate(&self, endpoint: LocalEndpoint) -> Result<(), EndpointError>;
    /// Removes the endpoint's enforcement state; idempotent, and fine for unknown endpoints.
    async fn deactivate(&self, container_id: &str, ifname: &str) -> Result<(), EndpointError>;
    /// The endpoint is known and its enforcement is in the datapath (for CNI CHECK).
    async fn is_enforced(&self, container_id: &str, ifname: &str) -> bool;
}
