//! The agent's local gRPC API (`weir.agent.v1.Agent`) on a unix socket: what the CNI plugin and
//! the CLI talk to. The service knows the IPAM and an [`EndpointBackend`]; it knows nothing of
//! eBPF.

mod inspect;
mod service;

use std::{
    future::Future,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use weir_proto::agent::v1::{agent_server::AgentServer, inspect_server::InspectServer};

pub use inspect::InspectService;
pub use service::AgentService;

use crate::{endpoints::EndpointBackend, ipam::Ipam};

/// The socket path when nothing else is configured.
pub use weir_proto::DEFAULT_SOCKET;

/// How long AllocateEndpoint waits for an unknown Pod when the request does not say.
pub const DEFAULT_POD_WAIT: Duration = Duration::from_secs(10);

/// The longest Pod wait a request may ask for.
pub const MAX_POD_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("creating the directory {path} for the API socket")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the stale API socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restricting the API socket {path} to mode 0600")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the API on {path}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Settings of the API service beyond the socket.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Reported by Status.
    pub node_name: String,
    /// AllocateEndpoint's Pod wait when the request gives none.
    pub default_pod_wait: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            node_name: String::new(),
            default_pod_wait: DEFAULT_POD_WAIT,
        }
    }
}

/// Serves the API on `socket` until `shutdown` completes, with the default [`ApiConfig`].
pub async fn serve(
    socket: &Path,
    backend: Arc<dyn EndpointBackend>,
    ipam: Arc<Ipam>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    serve_with(socket, ApiConfig::default(), backend, ipam, None, shutdown).await
}

/// Serves the API on `socket` until `shutdown` completes, with the read-only Inspect service
/// beside it when given. Creates the parent directories, replaces a stale socket file, and
/// restricts the socket to its owner (mode 0600).
pub async fn serve_with(
    socket: &Path,
    config: ApiConfig,
    backend: Arc<dyn EndpointBackend>,
    ipam: Arc<Ipam>,
    inspect: Option<InspectService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let listener = bind(socket)?;
    let service = AgentService::new(config, backend, ipam);
    tracing::info!(socket = %socket.display(), "serving the agent API");
    let result = tonic::transport::Server::builder()
        .add_service(AgentServer::new(service))
        .add_optional_service(inspect.map(InspectServer::new))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ApiError::Serve {
            path: socket.to_owned(),
            source,
        });
    // The socket file outlives the listener; leave nothing that looks like a live agent.
    let _ = std::fs::remove_file(socket);
    result
}

fn bind(socket: &Path) -> Result<UnixListener, ApiError> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::RemoveStale {
                path: socket.to_owned(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(socket).map_err(|source| ApiError::Bind {
        path: socket.to_owned(),
        source,
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Permissions {
            path: socket.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}
