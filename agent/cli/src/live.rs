//! Commands that ask a running agent, over its local gRPC API on a unix socket.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use weir_proto::agent::v1::{StatusRequest, agent_client::AgentClient};

use crate::{
    error::CliError,
    output::{Format, Style, encode},
};

/// How long connecting may take, and any one call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a live command on a small runtime of its own.
pub fn block_on<T>(f: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Unreachable {
            socket: Default::default(),
            reason: format!("cannot start the async runtime: {e}"),
        })?
        .block_on(f)
}

/// A channel to the agent; connects once up front so that a missing agent is reported with
/// the socket and the OS error.
pub async fn channel(socket: &Path) -> Result<Channel, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        socket: socket.to_owned(),
        reason,
    };
    let first = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let mut first = Some(first);
    let path = socket.to_owned();
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
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
        .map_err(|e| unreachable(e.to_string()))
}

/// `weir status` as scripts see it.
#[derive(Serialize)]
struct StatusView {
    node: String,
    ready: bool,
    reason: String,
}

pub async fn status(socket: &Path, format: Format) -> Result<String, CliError> {
    let mut client = AgentClient::new(channel(socket).await?);
    let reply = client.status(StatusRequest {}).await?.into_inner();
    let view = StatusView {
        node: reply.node_name,
        ready: reply.ready,
        reason: reply.reason,
    };
    match format {
        Format::Table => {
            let style = Style::detect();
            let state = if view.ready {
                style.good("ready")
            } else {
                style.bad("not ready")
            };
            let mut out = format!("node {}: {state}\n", view.node);
            if !view.reason.is_empty() {
                out.push_str(&format!("  {}\n", view.reason));
            }
            Ok(out)
        }
        _ => encode(format, &view),
    }
}
