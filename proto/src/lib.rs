//! Generated protobuf and gRPC code for Weir's contracts, and the names both sides derive.

pub mod gateway;
pub mod local_socket;
pub mod naming;

/// Where the agent serves its local API when nothing else is configured: the agent, the CNI
/// plugin and the CLI all default to it.
pub const DEFAULT_SOCKET: &str = "/run/weir/agent.sock";

/// The agent's local API (unix socket): CNI plugin and CLI.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("weir.agent.v1");
    }
}

/// The mesh link between gateways of two clusters (mTLS).
pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("weir.mesh.v1");
    }
}
