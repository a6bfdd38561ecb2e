//! The gRPC client for the agent's local API, over its unix socket.

use std::{path::Path, time::Duration};

use tonic::transport::Channel;
use weir_proto::{agent::v1::agent_client::AgentClient, local_socket};

use crate::error::{PluginError, error_chain};

pub type Client = AgentClient<Channel>;

/// The longest any call on the connection may take, enforced here even when the agent stops
/// answering (the per-request deadlines sent with each call are enforced by the agent).
pub const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Connects eagerly, so an absent agent is reported as such (code 11) before anything else.
/// Every call is bounded by `call_limit`.
pub async fn connect(socket: &Path, call_limit: Duration) -> Result<Client, PluginError> {
    let channel = local_socket::connect(socket, Some(call_limit))
        .await
        .map_err(|e| PluginError::AgentUnreachable {
            socket: socket.to_owned(),
            reason: error_chain(&e),
        })?;
    Ok(AgentClient::new(channel))
}

/// A request with a deadline.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}
