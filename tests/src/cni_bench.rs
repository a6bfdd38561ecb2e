//! The CNI plugin's test bench: the real `weir-cni` binary run in a node namespace as a
//! runtime runs it, against the agent's real gRPC API (`api::serve`) and IPAM, with a recording
//! `EndpointBackend` standing in for the datapath (tests/tests/cni.rs).

use std::{
    collections::HashSet,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde_json::{Value, json};
use weir_agent::{
    api,
    endpoints::{EndpointBackend, EndpointError, LocalEndpoint},
    ipam::Ipam,
};
use weir_lab::{netns::Netns, process::bin};
use weir_policy::model::ObjectKey;
use weir_proto::naming::is_host_veth_name;

// ---------------------------------------------------------------------------------------------
// A recording backend.

#[derive(Default)]
pub struct FakeBackend {
    /// The node namespace: activate records whether the host veth was still down.
    pub node: String,
    pub not_ready: Mutex<Option<String>>,
    /// When set, only these pods are known.
    pub known_pods: Mutex<Option<HashSet<ObjectKey>>>,
    pub fail_activate: AtomicBool,
    /// Record whether the host veth was up at activation (costs an `ip` run per ADD).
    pub probe_host_veth: AtomicBool,
    pub activated: Mutex<Vec<(LocalEndpoint, bool)>>,
    pub deactivated: Mutex<Vec<(String, String)>>,
    pub enforced: Mutex<HashSet<(String, String)>>,
}

#[tonic::async_trait]
impl EndpointBackend for FakeBackend {
    fn readiness(&self) -> Result<(), String> {
        match self.not_ready.lock().unwrap().clone() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    async fn wait_for_pod(&self, pod: &ObjectKey, timeout: Duration) -> Result<(), EndpointError> {
        let start = Instant::now();
        loop {
            let known = match &*self.known_pods.lock().unwrap() {
                None => true,
                Some(set) => set.contains(pod),
            };
            if known {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(EndpointError::PodUnknown {
                    pod: pod.clone(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn activate(&self, endpoint: LocalEndpoint) -> Result<(), EndpointError> {
        if self.fail_activate.load(Ordering::SeqCst) {
            return Err(EndpointError::Datapath {
                pod: endpoint.pod.clone(),
                host_ifname: endpoint.host_ifname.clone(),
                reason: "injected failure".into(),
            });
        }
        let mut up = false;
        if self.probe_host_veth.load(Ordering::SeqCst) {
            let flags = Command::new("ip")
                .args([
                    "-n",
                    &self.node,
                    "-j",
                    "link",
                    "show",
                    &endpoint.host_ifname,
                ])
                .output()
                .expect("ip link show");
            let links: Value = serde_json::from_slice(&flags.stdout).unwrap_or(json!([]));
            up = links[0]["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"));
        }
        self.enforced
            .lock()
            .unwrap()
            .insert((endpoint.container_id.clone(), endpoint.ifname.clone()));
        self.activated.lock().unwrap().push((endpoint, up));
        Ok(())
    }

    async fn deactivate(&self, container_id: &str, ifname: &str) -> Result<(), EndpointError> {
        self.enforced
            .lock()
            .unwrap()
            .remove(&(container_id.to_owned(), ifname.to_owned()));
        self.deactivated
            .lock()
            .unwrap()
            .push((container_id.to_owned(), ifname.to_owned()));
        Ok(())
    }

    async fn is_enforced(&self, container_id: &str, ifname: &str) -> bool {
        self.enforced
            .lock()
            .unwrap()
            .contains(&(container_id.to_owned(), ifname.to_owned()))
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: a node namespace, an in-process agent API, and the real plugin binary.

pub struct RunningAgent {
    pub shutdown: tokio::sync::oneshot::Sender<()>,
    pub thread: std::thread::JoinHandle<()>,
}

pub struct Harness {
    pub node: Netns,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cidrs: Vec<IpNet>,
    pub backend: Arc<FakeBackend>,
    pub ipam: Option<Arc<Ipam>>,
    pub agent: Option<RunningAgent>,
}

/// The result of one plugin run.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub json: Value,
    pub stdout: String,
    pub took: Duration,
}

impl Out {
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got success: {}", self.stdout);
        self.json["code"].as_u64().expect("error code")
    }

    #[track_caller]
    pub fn expect_ok_took(&self) -> Duration {
        self.expect_ok();
        self.took
    }

    #[track_caller]
    pub fn expect_ok(&self) -> &Value {
        assert!(self.ok, "plugin failed: {}", self.stdout);
        &self.json
    }
}

impl Harness {
    pub fn new(tag: &str, cidrs: &[&str]) -> Self {
        let node = Netns::new(&format!("cni-{tag}"));
        let dir = std::env::temp_dir().join(format!("weir-cni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let backend = Arc::new(FakeBackend {
            node: node.name.clone(),
            probe_host_veth: AtomicBool::new(true),
            ..FakeBackend::default()
        });
        let mut h = Harness {
            socket: dir.join("run/agent.sock"),
            node,
            dir,
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            backend,
            ipam: None,
            agent: None,
        };
        h.start_agent();
        h
    }

    /// Starts the API as the agent does: open IPAM, reconcile against the node's host veths,
    /// serve.
    pub fn start_agent(&mut self) {
        let ipam = Arc::new(Ipam::open(&self.dir.join("state"), &self.cidrs).unwrap());
        // As the agent does at start-up, in the node's namespace.
        let node = std::fs::File::open(self.node.path()).unwrap();
        let veths = std::thread::spawn(move || {
            nix::sched::setns(&node, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            weir_agent::ipam::existing_host_veths().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(veths, self.host_veths().into_iter().collect::<HashSet<_>>());
        ipam.reconcile(&veths).unwrap();
        self.ipam = Some(ipam.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let socket = self.socket.clone();
        let backend: Arc<dyn EndpointBackend> = self.backend.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                api::serve(&socket, backend, ipam, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        let start = Instant::now();
        while !self.socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the API never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.agent = Some(RunningAgent {
            shutdown: tx,
            thread,
        });
    }

    pub fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            let _ = agent.shutdown.send(());
            agent.thread.join().unwrap();
        }
        self.ipam = None;
    }

    pub fn ipam(&self) -> &Ipam {
        self.ipam.as_ref().expect("agent running")
    }

    pub fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "type": "weir-cni",
            "agentSocket": self.socket,
            "mtu": 1400,
            "logFile": self.dir.join("cni.log"),
            "podWaitSeconds": 2,
        })
    }

    /// Starts weir-cni in the node namespace as a runtime does; stdin written and closed.
    pub fn spawn_cni(
        &self,
        command: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> std::process::Child {
        let mut cmd = self.node.command(bin("weir-cni").to_str().unwrap());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning weir-cni");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child
    }

    /// Runs weir-cni in the node namespace as a runtime does, to its end.
    pub fn cni(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> Out {
        let start = Instant::now();
        let out = self
            .spawn_cni(command, env, stdin)
            .wait_with_output()
            .unwrap();
        let took = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.stderr.is_empty(),
            "weir-cni wrote to stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
        };
        if !out.status.success() {
            // The spec's error object.
            for key in ["cniVersion", "code", "msg"] {
                assert!(json.get(key).is_some(), "error without {key}: {stdout}");
            }
        }
        Out {
            ok: out.status.success(),
            json,
            stdout,
            took,
        }
    }

    pub fn run_verb(&self, verb: &str, container: &str, pod: Option<&Netns>, conf: &Value) -> Out {
        self.run_verb_on(verb, container, "eth0", pod, conf)
    }

    /// `run_verb` for the pod interface `ifname`.
    pub fn run_verb_on(
        &self,
        verb: &str,
        container: &str,
        ifname: &str,
        pod: Option<&Netns>,
        conf: &Value,
    ) -> Out {
        let netns = pod.map(Netns::path).unwrap_or_default();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID=uid-{container}"
        );
        let mut env = vec![
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args.as_str()),
        ];
        if !netns.is_empty() {
            env.push(("CNI_NETNS", netns.as_str()));
        }
        self.cni(verb, &env, conf.to_string().as_bytes())
    }

    pub fn add(&self, container: &str, pod: &Netns) -> Out {
        self.run_verb("ADD", container, Some(pod), &self.conf())
    }

    pub fn del(&self, container: &str, pod: Option<&Netns>) -> Out {
        self.run_verb("DEL", container, pod, &self.conf())
    }

    pub fn check(&self, container: &str, pod: &Netns, prev: &Value) -> Out {
        let mut conf = self.conf();
        conf["prevResult"] = prev.clone();
        self.run_verb("CHECK", container, Some(pod), &conf)
    }

    pub fn host_veths(&self) -> Vec<String> {
        let links: Value = serde_json::from_str(&self.node.ip(&["-j", "link", "show"])).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| is_host_veth_name(n))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The IPv6 addresses (address/prefix) on `ifname` in `ns`.
pub fn ipv6_addresses(ns: &Netns, ifname: &str) -> Vec<String> {
    ip_json(ns, &["-6", "addr", "show", "dev", ifname])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

pub fn ip_json(ns: &Netns, args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    serde_json::from_str(&ns.ip(&full)).unwrap()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}
