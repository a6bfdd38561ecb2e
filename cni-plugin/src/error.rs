//! Every way the plugin fails, and the CNI error code (SPEC 1.1, "Error") each maps to.

use std::path::PathBuf;

/// CNI codes 100 and up are plugin-specific; these are Weir's.
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The agent answered with an error that is not "try again".
    pub const AGENT_FAILED: u32 = 100;
    /// The node's pod CIDR has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 101;
    /// A netlink operation (veth, address, route, neighbour) failed.
    pub const WIRING_FAILED: u32 = 102;
    /// CHECK found the endpoint not as ADD left it.
    pub const CHECK_FAILED: u32 = 103;
    /// A bug: the plugin panicked.
    pub const INTERNAL: u32 = 104;
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("CNI version {version} is not supported (supported: {supported})")]
    IncompatibleVersion { version: String, supported: String },
    #[error("unsupported field {field}: {reason}")]
    UnsupportedField { field: String, reason: String },
    #[error(
        "unknown container {container_id} (interface {ifname}): the agent has no endpoint for it"
    )]
    UnknownContainer {
        container_id: String,
        ifname: String,
    },
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    /// SPEC 1.1 ADD: "If an interface of the requested name already exists in the container,
    /// the CNI plugin MUST return with an error." Code 4: the variables naming the attachment
    /// cannot be used.
    #[error(
        "CNI_CONTAINERID={container_id} CNI_IFNAME={ifname} cannot be added: {what}; the first attachment is left as it was (DEL it before adding it again, or use another CNI_IFNAME)"
    )]
    AlreadyExists {
        container_id: String,
        ifname: String,
        what: String,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid network configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error(
        "cannot reach the weir agent at {}: {reason}; is weir-agent running on this node?",
        socket.display()
    )]
    AgentUnreachable { socket: PathBuf, reason: String },
    #[error("the weir agent cannot serve {rpc} now, try again later: {message}")]
    AgentBusy { rpc: &'static str, message: String },
    #[error("the weir agent failed {rpc} ({code:?}): {message}")]
    AgentFailed {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("no address for the pod: {message}")]
    Exhausted { message: String },
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("CHECK failed: {0}")]
    CheckFailed(String),
    #[error("the weir agent is not ready to serve ADD: {reason}")]
    NotReady { reason: String },
    #[error(
        "no address left for another pod: pod CIDR {cidr} has all {usable} usable addresses allocated; ADD is possible again once a pod is deleted"
    )]
    PoolExhausted { cidr: String, usable: u64 },
    #[error("the plugin panicked: {0}")]
    Panic(String),
}

impl PluginError {
    pub fn code(&self) -> u32 {
        use codes::*;
        match self {
            PluginError::IncompatibleVersion { .. } => INCOMPATIBLE_VERSION,
            PluginError::UnsupportedField { .. } => UNSUPPORTED_FIELD,
            PluginError::UnknownContainer { .. } => UNKNOWN_CONTAINER,
            PluginError::InvalidEnv { .. } | PluginError::AlreadyExists { .. } => INVALID_ENV,
            PluginError::Io { .. } => IO,
            PluginError::Decode { .. } => DECODE,
            PluginError::InvalidConfig { .. } => INVALID_CONFIG,
            PluginError::AgentUnreachable { .. } | PluginError::AgentBusy { .. } => TRY_AGAIN_LATER,
            PluginError::AgentFailed { .. } => AGENT_FAILED,
            PluginError::Exhausted { .. } => ADDRESSES_EXHAUSTED,
            PluginError::Netlink { .. } => WIRING_FAILED,
            PluginError::CheckFailed(_) => CHECK_FAILED,
            // Existing pods keep their wiring and enforcement in both cases, so 50, not 51
            // ("existing containers ... may have limited connectivity").
            PluginError::NotReady { .. } | PluginError::PoolExhausted { .. } => {
                PLUGIN_NOT_AVAILABLE
            }
            PluginError::Panic(_) => INTERNAL,
        }
    }

    /// The error with its whole source chain, for the `details` field.
    pub fn details(&self) -> String {
        error_chain(self)
    }

    /// Maps a gRPC status from the agent.
    pub fn from_status(rpc: &'static str, status: tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable
            | Code::FailedPrecondition
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled => PluginError::AgentBusy { rpc, message },
            Code::ResourceExhausted => PluginError::Exhausted { message },
            code => PluginError::AgentFailed { rpc, code, message },
        }
    }

    /// The errno of a failed netlink request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            PluginError::Netlink { source, .. } => netlink_errno(source),
            _ => None,
        }
    }

    pub fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> Self {
        PluginError::Netlink {
            what: what.into(),
            source,
        }
    }
}

/// `e: cause: cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.ends_with(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// The errno of a netlink error, if it is one.
pub fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}
