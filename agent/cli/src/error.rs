//! What can go wrong in the CLI, each error saying what to do about it.

use std::path::PathBuf;

use weir_policy::{
    explain::{ExplainError, PortProtoError},
    model::ParseError,
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "reading the manifests directory {path}: {source}; pass a directory of .yaml/.yml/.json manifests"
    )]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the manifest {path}: {source}; pass a directory or a .yaml/.yml/.json file")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0}; fix the manifest (the agent would ignore this object, so the answer would not be what is enforced)"
    )]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Explain(#[from] ExplainError),
    #[error("{0}")]
    PortProto(#[from] PortProtoError),
    #[error("{0}")]
    Usage(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the output: {0}")]
    Encode(String),
    #[error(
        "cannot reach the agent at {socket}: {reason}; is weir-agent running on this node? (another socket: --socket or WEIR_SOCKET; the socket is root-only)"
    )]
    Unreachable { socket: PathBuf, reason: String },
    #[error("the agent answered {code}: {message}")]
    Rpc { code: String, message: String },
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc {
            code: format!("{:?}", s.code()),
            message: s.message().to_owned(),
        }
    }
}
