//! Running `weir-cni` as a container runtime does: CNI_* environment, the network config on
//! stdin, in the node's network namespace (the forking thread is inside it, so the plugin
//! inherits it, as it does from kubelet's host namespace).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::spawn_in, process::bin};

/// The plugin as one node's runtime would call it.
#[derive(Clone)]
pub struct Plugin {
    pub node_netns: String,
    /// The network config handed on stdin.
    pub config: String,
    /// The `weir-cni` executable.
    pub program: PathBuf,
}

/// One pod's CNI identity.
pub struct PodRef<'a> {
    pub container_id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    /// Name of the pod's network namespace (under /run/netns).
    pub netns: &'a str,
}

impl Plugin {
    /// The config the README documents, pointing at `socket`.
    pub fn new(node_netns: &str, socket: &Path, log_file: &Path) -> Self {
        Self::of(&bin("weir-cni"), node_netns, socket, log_file)
    }

    /// [`Plugin::new`] with the executable `program`.
    pub fn of(program: &Path, node_netns: &str, socket: &Path, log_file: &Path) -> Self {
        Self {
            program: program.to_owned(),
            node_netns: node_netns.to_owned(),
            config: format!(
                r#"{{"cniVersion":"1.1.0","name":"weir","type":"weir-cni","agentSocket":"{}","mtu":1500,"logFile":"{}"}}"#,
                socket.display(),
                log_file.display()
            ),
        }
    }

    /// Runs `verb` for `pod`'s eth0; returns the output and how long the plugin took.
    pub fn run(&self, verb: &str, pod: &PodRef<'_>) -> (Output, Duration) {
        self.run_on(verb, pod, "eth0", None)
    }

    /// Runs `verb` for the pod interface `ifname`, with `prev_result` in the config when given
    /// (CHECK and DEL after a chained ADD, as a runtime passes it).
    pub fn run_on(
        &self,
        verb: &str,
        pod: &PodRef<'_>,
        ifname: &str,
        prev_result: Option<&serde_json::Value>,
    ) -> (Output, Duration) {
        self.try_run_on(verb, pod, ifname, prev_result)
            .expect("running weir-cni")
    }

    /// [`Plugin::run_on`], with an error when the plugin cannot be started.
    pub fn try_run_on(
        &self,
        verb: &str,
        pod: &PodRef<'_>,
        ifname: &str,
        prev_result: Option<&serde_json::Value>,
    ) -> std::io::Result<(Output, Duration)> {
        let node = format!("/run/netns/{}", self.node_netns);
        let config = match prev_result {
            None => self.config.clone(),
            Some(prev) => {
                let mut config: serde_json::Value =
                    serde_json::from_str(&self.config).expect("the config is JSON");
                config["prevResult"] = prev.clone();
                config.to_string()
            }
        };
        let env = [
            ("CNI_COMMAND", verb.to_owned()),
            ("CNI_CONTAINERID", pod.container_id.to_owned()),
            ("CNI_NETNS", format!("/run/netns/{}", pod.netns)),
            ("CNI_IFNAME", ifname.to_owned()),
            ("CNI_PATH", "/opt/cni/bin".to_owned()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    pod.namespace, pod.name
                ),
            ),
        ];
        let program = self.program.clone();
        spawn_in(node, move || {
            let started = Instant::now();
            let mut child = Command::new(program)
                .envs(env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(config.as_bytes())?;
            let out = child.wait_with_output()?;
            Ok((out, started.elapsed()))
        })
        .join()
        .expect("plugin thread panicked")
    }

    /// Runs `verb` and panics with the plugin's error JSON when it fails.
    pub fn ok(&self, verb: &str, pod: &PodRef<'_>) -> (String, Duration) {
        let (out, took) = self.run(verb, pod);
        assert!(
            out.status.success(),
            "weir-cni {verb} of {}/{} failed: {}{}",
            pod.namespace,
            pod.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (String::from_utf8_lossy(&out.stdout).into_owned(), took)
    }
}

/// The addresses of an ADD result (`ips[].address`, without their prefix length).
pub fn addresses(add_result: &str) -> Result<Vec<std::net::IpAddr>, String> {
    let v: serde_json::Value =
        serde_json::from_str(add_result).map_err(|e| format!("not JSON: {e}"))?;
    let ips: Vec<std::net::IpAddr> = v["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ip| {
            let cidr = ip["address"].as_str().unwrap_or_default();
            cidr.split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("ips[].address is not an address: {cidr:?}"))
        })
        .collect::<Result<_, _>>()?;
    if ips.is_empty() {
        return Err("no address in ips".to_owned());
    }
    Ok(ips)
}

/// The first address of an ADD result (`ips[0].address`, without its prefix length).
pub fn first_address(add_result: &str) -> std::net::IpAddr {
    addresses(add_result).unwrap_or_else(|e| panic!("ADD result {add_result}: {e}"))[0]
}
