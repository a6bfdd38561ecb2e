//! A gRPC channel to the agent's local API over its unix socket, as the CNI plugin and the CLI
//! open it.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long connecting to the agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Socket(#[from] std::io::Error),
    #[error(transparent)]
    Channel(#[from] tonic::transport::Error),
}

/// Opens a channel to the agent at `socket`. The first connection is made here, eagerly, so an
/// absent or silent agent is reported with the socket's own error rather than tonic's
/// "transport error" on the first call; the channel reconnects lazily after that. `call_limit`
/// bounds every call on the channel (None: streams the caller follows as long as it likes).
pub async fn connect(socket: &Path, call_limit: Option<Duration>) -> Result<Channel, ConnectError> {
    let first = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let mut first = Some(first);
    let path = socket.to_owned();
    // The URI is never dialled: the connector below always opens the unix socket.
    let mut endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(CONNECT_TIMEOUT);
    if let Some(limit) = call_limit {
        endpoint = endpoint.timeout(limit);
    }
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
        .await?;
    Ok(channel)
}
