//! The gRPC client for the agent's local API, over its unix socket.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use weir_proto::agent::v1::agent_client::AgentClient;

use crate::error::{PluginError, error_chain};

pub type Client = AgentClient<Channel>;

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest any call on the connection may take, enforced here even when the agent stops
/// answering (the per-request deadlines sent with each call are enforced by the agent).
pub const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Connects eagerly, so an absent agent is reported as such (code 11) before anything else.
/// Every call is bounded by `call_limit`.
pub async fn connect(socket: &Path, call_limit: Duration) -> Result<Client, PluginError> {
    let unreachable = |reason: String| PluginError::AgentUnreachable {
        socket: socket.to_owned(),
        reason,
    };
    // Connect once here so the error names the socket and the OS error, not "transport error".
    let first = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let mut first = Some(first);
    let path = socket.to_owned();
    let endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| unreachable(error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(call_limit);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let ready = first.take();
            async move {
                let stream = match ready {
                    Some(s) => s,
                    None => UnixStream::connect(path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    Ok(AgentClient::new(channel))
}

/// A request with a deadline.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}
