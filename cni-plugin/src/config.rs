//! The plugin's input: the CNI environment variables and the network configuration on stdin.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use crate::{error::PluginError, result::CniResult};

/// Versions this plugin speaks (VERSION's `supportedVersions`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The version reported when the input names none we can use.
pub const LATEST_VERSION: &str = "1.1.0";

pub use weir_proto::DEFAULT_SOCKET;
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_LOG_FILE: &str = "/var/log/weir-cni.log";
pub const DEFAULT_POD_WAIT_SECONDS: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// The CNI_* environment, validated per verb.
#[derive(Debug, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
}

/// The keys of CNI_ARGS Weir reads.
#[derive(Debug, Default, Clone)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

pub fn command() -> Result<Command, PluginError> {
    let raw = std::env::var("CNI_COMMAND").map_err(|_| PluginError::InvalidEnv {
        var: "CNI_COMMAND",
        reason: "not set".into(),
    })?;
    Ok(match raw.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        "VERSION" => Command::Version,
        other => {
            return Err(PluginError::InvalidEnv {
                var: "CNI_COMMAND",
                reason: format!("unknown command {other:?}"),
            });
        }
    })
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn required(name: &'static str) -> Result<String, PluginError> {
    var(name).ok_or(PluginError::InvalidEnv {
        var: name,
        reason: "required but not set".into(),
    })
}

/// Reads the environment for `command`: ADD and CHECK need the container, netns and ifname; DEL
/// needs the container and ifname (the netns may be gone).
pub fn env(command: Command) -> Result<Env, PluginError> {
    let mut env = Env::default();
    match command {
        Command::Add | Command::Check | Command::Del => {
            env.container_id = required("CNI_CONTAINERID")?;
            validate_container_id(&env.container_id)?;
            env.ifname = required("CNI_IFNAME")?;
            validate_ifname(&env.ifname)?;
            env.netns = if command == Command::Del {
                var("CNI_NETNS").unwrap_or_default()
            } else {
                required("CNI_NETNS")?
            };
            env.args = parse_cni_args(&var("CNI_ARGS").unwrap_or_default())?;
        }
        Command::Status | Command::Gc | Command::Version => {}
    }
    Ok(env)
}

fn validate_container_id(id: &str) -> Result<(), PluginError> {
    if id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        Ok(())
    } else {
        Err(PluginError::InvalidEnv {
            var: "CNI_CONTAINERID",
            reason: format!("{id:?} has characters other than letters, digits, '_', '.' and '-'"),
        })
    }
}

fn validate_ifname(name: &str) -> Result<(), PluginError> {
    let bad = if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match bad {
        Some(reason) => Err(PluginError::InvalidEnv {
            var: "CNI_IFNAME",
            reason: format!("{name:?} is {reason}"),
        }),
        None => Ok(()),
    }
}

/// Parses `K=V;K=V`. Weir needs K8S_POD_NAMESPACE and K8S_POD_NAME (checked by ADD); the other
/// keys runtimes send (IgnoreUnknown, K8S_POD_UID, K8S_POD_INFRA_CONTAINER_ID, ...) are accepted.
pub fn parse_cni_args(raw: &str) -> Result<CniArgs, PluginError> {
    let mut args = CniArgs::default();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(PluginError::InvalidEnv {
                var: "CNI_ARGS",
                reason: format!("{pair:?} is not KEY=VALUE"),
            });
        };
        let value = Some(value.to_owned()).filter(|v| !v.is_empty());
        match key {
            "K8S_POD_NAMESPACE" => args.pod_namespace = value,
            "K8S_POD_NAME" => args.pod_name = value,
            "K8S_POD_UID" => args.pod_uid = value,
            _ => {}
        }
    }
    Ok(args)
}

/// The network configuration (one plugin entry of a conflist, as the runtime passes it: SPEC 1.1
/// section 3 has the runtime insert `cniVersion` and the network's `name` into it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Required; optional here only so that a missing one is reported as code 7, not 6.
    #[serde(default)]
    cni_version: Option<String>,
    /// The network's name (required).
    #[serde(default)]
    name: Option<String>,
    /// The plugin binary's name (required).
    #[serde(default, rename = "type")]
    plugin_type: Option<String>,
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub pod_wait_seconds: Option<u64>,
    /// The previous plugin's result when chained, as given; checked and typed into
    /// `prev_result` by [`parse_netconf`].
    #[serde(default, rename = "prevResult")]
    prev_result_given: Option<Value>,
    #[serde(skip)]
    pub prev_result: Option<CniResult>,
    /// Weir allocates addresses itself (the agent's IPAM); an `ipam` section is refused.
    #[serde(default)]
    pub ipam: Option<Value>,
    /// GC: the attachments the runtime still knows.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// The validated `cniVersion` ([`parse_netconf`] refuses a configuration without one).
    pub fn cni_version(&self) -> &str {
        self.cni_version.as_deref().unwrap_or(LATEST_VERSION)
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    pub fn pod_wait(&self) -> Duration {
        Duration::from_secs(self.pod_wait_seconds.unwrap_or(DEFAULT_POD_WAIT_SECONDS))
    }
}

/// Decodes stdin and checks the version and the values Weir reads.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, PluginError> {
    let mut conf: NetConf =
        serde_json::from_slice(stdin).map_err(|source| PluginError::Decode {
            what: "the network configuration on stdin",
            source,
        })?;
    check_required(&conf)?;
    if conf.ipam.is_some() {
        return Err(PluginError::UnsupportedField {
            field: "ipam".into(),
            reason: "weir-cni takes addresses from the weir agent's IPAM; remove the ipam section"
                .into(),
        });
    }
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(PluginError::InvalidConfig {
            reason: format!("mtu {mtu} is outside 68..=65535"),
        });
    }
    if conf.pod_wait_seconds.is_some_and(|s| s > 120) {
        return Err(PluginError::InvalidConfig {
            reason: "podWaitSeconds is above 120".into(),
        });
    }
    if let Some(p) = &conf.agent_socket
        && p.as_os_str().is_empty()
    {
        return Err(PluginError::InvalidConfig {
            reason: "agentSocket is empty".into(),
        });
    }
    if let Some(prev) = conf.prev_result_given.take() {
        if !prev.is_object() {
            return Err(PluginError::InvalidConfig {
                reason: "prevResult is not an object".into(),
            });
        }
        let typed = serde_json::from_value(prev).map_err(|e| PluginError::InvalidConfig {
            reason: format!("prevResult is not a CNI result: {e}"),
        })?;
        conf.prev_result = Some(typed);
    }
    Ok(conf)
}

/// The keys SPEC 1.1 requires of every request configuration, each refused with code 7 (invalid
/// network config) when missing or malformed; a `cniVersion` this plugin does not speak is code 1.
fn check_required(conf: &NetConf) -> Result<(), PluginError> {
    let missing = |key: &str, what: &str| PluginError::InvalidConfig {
        reason: format!("the required key {key:?} is missing or empty: {what}"),
    };
    let version = conf
        .cni_version
        .as_deref()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            missing(
                "cniVersion",
                "the CNI version the runtime speaks, e.g. \"1.1.0\"",
            )
        })?;
    let name = conf
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| missing("name", "the network's name, from the conflist"))?;
    // SPEC 1.1 section 1: an alphanumeric character, then alphanumerics, '_', '.' or '-'.
    let mut chars = name.chars();
    let valid_name = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_name {
        return Err(PluginError::InvalidConfig {
            reason: format!(
                "name {name:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
            ),
        });
    }
    let plugin_type = conf
        .plugin_type
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| missing("type", "the plugin's binary name, \"weir-cni\""))?;
    if plugin_type.contains(['/', '\\']) {
        return Err(PluginError::InvalidConfig {
            reason: format!("type {plugin_type:?} must not contain '/' or '\\'"),
        });
    }
    check_version(version)
}

pub fn check_version(version: &str) -> Result<(), PluginError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(PluginError::IncompatibleVersion {
            version: version.to_owned(),
            supported: SUPPORTED_VERSIONS.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_accept_what_runtimes_send() {
        let args = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u",
        )
        .unwrap();
        assert_eq!(args.pod_namespace.as_deref(), Some("ns"));
        assert_eq!(args.pod_name.as_deref(), Some("p"));
        assert_eq!(args.pod_uid.as_deref(), Some("u"));
        assert!(parse_cni_args("").unwrap().pod_name.is_none());
        assert_eq!(parse_cni_args("garbage").unwrap_err().code(), 4);
    }

    #[test]
    fn netconf_defaults_and_validation() {
        let conf =
            parse_netconf(br#"{"cniVersion":"1.1.0","name":"weir","type":"weir-cni"}"#).unwrap();
        assert_eq!(conf.agent_socket(), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(conf.mtu(), 1500);
        assert_eq!(conf.pod_wait(), Duration::from_secs(10));
        assert_eq!(conf.cni_version(), "1.1.0");
        // Each case: the valid base with `extra` merged in (a null removes the key).
        let code = |extra: &str| {
            let mut base: serde_json::Map<String, Value> =
                serde_json::from_str(r#"{"cniVersion":"1.1.0","name":"weir","type":"weir-cni"}"#)
                    .unwrap();
            let extra: serde_json::Map<String, Value> = serde_json::from_str(extra).unwrap();
            for (k, v) in extra {
                if v.is_null() {
                    base.remove(&k);
                } else {
                    base.insert(k, v);
                }
            }
            parse_netconf(Value::Object(base).to_string().as_bytes()).map(|_| ())
        };
        let err = |extra: &str| code(extra).unwrap_err().code();
        assert_eq!(err(r#"{"cniVersion":"0.3.1"}"#), 1);
        assert_eq!(err(r#"{"ipam":{"type":"host-local"}}"#), 2);
        assert_eq!(parse_netconf(b"{").unwrap_err().code(), 6);
        assert_eq!(err(r#"{"name":7}"#), 6);
        assert_eq!(err(r#"{"mtu":20}"#), 7);
        assert_eq!(err(r#"{"prevResult":[]}"#), 7);
        // The keys SPEC 1.1 requires: missing, empty or malformed → 7.
        for bad in [
            r#"{"name":null}"#,
            r#"{"name":""}"#,
            r#"{"name":"-weir"}"#,
            r#"{"name":"we/ir"}"#,
            r#"{"type":null}"#,
            r#"{"type":""}"#,
            r#"{"type":"../weir-cni"}"#,
            r#"{"cniVersion":null}"#,
            r#"{"cniVersion":""}"#,
        ] {
            assert_eq!(err(bad), 7, "{bad}");
        }
        let msg = code(r#"{"name":null}"#).unwrap_err().to_string();
        assert!(msg.contains("\"name\""), "{msg}");
        assert!(code(r#"{"name":"k8s-pod_network.v1"}"#).is_ok());
        let gc = parse_netconf(
            br#"{"cniVersion":"1.1.0","name":"weir","type":"weir-cni","cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(gc.valid_attachments.unwrap()[0].container_id, "c");
    }

    #[test]
    fn interface_names_and_container_ids_are_validated() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a-very-long-name-x").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_container_id("abc_1.2-3").is_ok());
        assert!(validate_container_id("a b").is_err());
    }
}
