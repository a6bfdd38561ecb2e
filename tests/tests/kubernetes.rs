//! Kubernetes mode's source against a server that speaks the list/watch protocol over HTTP
//! (`weir_tests::kube_server`): the states the source hands on, observed on its channel.
//! The source's tests need no kernel and no root; the last ones run the `weir-agent` binary in
//! Kubernetes mode in a node namespace (root, like the rest of weir-tests).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};
use weir_agent::{
    source::SourceStats,
    source::kubernetes::{self, KubeSourceConfig},
};
use weir_policy::model::{ClusterState, ObjectKey};
use weir_tests::{
    agent::{AgentDirs, ClusterSource, bin, health_get},
    kube_server::{KubeServer, Resource},
    netns::{Netns, spawn_in},
};

const WAIT: Duration = Duration::from_secs(30);

const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: web}}
"#;

const NODE_1: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]}
status:
  addresses: [{type: InternalIP, address: 192.168.0.1}]
  images: [{names: [big/image], sizeBytes: 1000}]
"#;

const NODE_2: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDRs: [10.244.2.0/24]}
"#;

fn pod(name: &str, node: &str, ip: &str, app: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: {app}}}
  annotations: {{kubectl.kubernetes.io/last-applied-configuration: "{{}}"}}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: registry.example/{app}:1
    ports: [{{name: http, containerPort: 8080}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
"#
    )
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-team, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: web}}}]
    ports: [{port: http}]
"#;

const BAD_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-cidr, namespace: shop}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/99}}]
"#;

fn seed(server: &KubeServer) {
    server.apply(NAMESPACE);
    server.apply(NODE_1);
    server.apply(NODE_2);
    server.apply(&pod("web", "n1", "10.244.1.5", "web"));
    server.apply(&pod("db", "n2", "10.244.2.7", "db"));
    server.apply(POLICY);
}

/// The source under test, running against `server`, with its output channel. The agent's
/// runtime is played by a compiler that reports each state's rejected policies back to the
/// source (for its Events), as the runtime does.
struct Source {
    states: mpsc::Receiver<ClusterState>,
    stats: Arc<SourceStats>,
    task: JoinHandle<()>,
    compiler: JoinHandle<()>,
}

impl Source {
    fn start(server: &KubeServer, node: &str) -> Self {
        let (source_tx, mut source_rx) = mpsc::channel::<ClusterState>(64);
        let (tx, states) = mpsc::channel(64);
        let (rejections_tx, rejections_rx) = tokio::sync::watch::channel(Arc::from([]));
        let stats = Arc::new(SourceStats::default());
        let task = tokio::spawn(kubernetes::run(
            server.client(),
            KubeSourceConfig::new(node),
            source_tx,
            rejections_rx,
            stats.clone(),
        ));
        let node = node.to_owned();
        let compiler = tokio::spawn(async move {
            let mut identities = weir_policy::identity::IdentityAllocator::default();
            while let Some(state) = source_rx.recv().await {
                let input = weir_policy::compile::CompileInput {
                    state: state.clone(),
                    node_name: node.clone(),
                    ..Default::default()
                };
                let compiled = weir_policy::compile::compile(&input, &mut identities)
                    .expect("compiling the source's state");
                rejections_tx.send_replace(compiled.rejections.into());
                if tx.send(state).await.is_err() {
                    return;
                }
            }
        });
        Self {
            states,
            stats,
            task,
            compiler,
        }
    }

    /// The next state, failing the test after `WAIT`.
    async fn next(&mut self) -> ClusterState {
        tokio::time::timeout(WAIT, self.states.recv())
            .await
            .expect("no state from the source in time")
            .expect("the source stopped")
    }

    /// Skips states until one satisfies `what`.
    async fn until(&mut self, what: &str, f: impl Fn(&ClusterState) -> bool) -> ClusterState {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let state = tokio::time::timeout_at(deadline, self.states.recv())
                .await
                .unwrap_or_else(|_| panic!("no state in time where {what}"))
                .expect("the source stopped");
            if f(&state) {
                return state;
            }
        }
    }

    /// Asserts that no state arrives for `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration, why: &str) {
        if let Ok(Some(state)) = tokio::time::timeout(quiet, self.states.recv()).await {
            panic!("{why}, but the source sent a state: {state:#?}");
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
        self.compiler.abort();
    }
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("shop", name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_is_one_complete_state_converted_like_standalone() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    let state = source.next().await;

    assert_eq!(state.pods.len(), 2);
    assert_eq!(state.policies.len(), 1);
    assert_eq!(state.nodes.len(), 2);
    let web = &state.pods[&key("web")];
    assert_eq!(web.metadata.labels["app"], "web");
    assert_eq!(web.spec.node_name.as_deref(), Some("n1"));
    assert_eq!(
        web.spec.containers[0].ports[0].name.as_deref(),
        Some("http")
    );
    assert_eq!(web.spec.containers[0].ports[0].protocol, "TCP", "defaulted");
    assert_eq!(web.status.pod_ips[0].ip, "10.244.1.5");
    // Defaulting as the API server (and the standalone parser) does.
    assert_eq!(
        state.namespaces["shop"].metadata.labels["kubernetes.io/metadata.name"],
        "shop"
    );
    assert_eq!(
        state.policies[&key("web-from-team")].spec.policy_types,
        Some(vec!["Ingress".to_owned()])
    );
    assert_eq!(
        state.nodes["n1"].spec.pod_cidrs,
        ["10.244.1.0/24", "fd00:244:1::/64"]
    );
    assert_eq!(state.nodes["n1"].status.addresses[0].address, "192.168.0.1");

    // The very same objects through the standalone parser give the very same state.
    let mut standalone = ClusterState::default();
    for text in [
        NAMESPACE.to_owned(),
        NODE_1.to_owned(),
        NODE_2.to_owned(),
        pod("web", "n1", "10.244.1.5", "web"),
        pod("db", "n2", "10.244.2.7", "db"),
        POLICY.to_owned(),
    ] {
        for object in weir_policy::model::parse_documents(&text, "test") {
            standalone.apply(object.unwrap());
        }
    }
    assert_eq!(state, standalone);

    // Every collection was listed and then watched.
    let requests = server.requests();
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/api/v1/nodes",
        "/apis/networking.k8s.io/v1/networkpolicies",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=")),
            "no list of {path}: {requests:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_updates_and_deletes_are_followed() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;

    server.apply(&pod("cache", "n1", "10.244.1.9", "cache"));
    let state = source
        .until("the new pod is there", |s| {
            s.pods.contains_key(&key("cache"))
        })
        .await;
    assert_eq!(state.pods[&key("cache")].status.pod_ips[0].ip, "10.244.1.9");

    server.apply(&pod("cache", "n1", "10.244.1.9", "redis"));
    source
        .until("the pod's labels changed", |s| {
            s.pods[&key("cache")].metadata.labels["app"] == "redis"
        })
        .await;

    server.bookmark();
    server.delete(Resource::NetworkPolicies, "shop", "web-from-team");
    let state = source
        .until("the policy is gone", |s| s.policies.is_empty())
        .await;
    assert_eq!(state.pods.len(), 3);

    server.delete(Resource::Namespaces, "", "shop");
    source
        .until("the namespace is gone", |s| s.namespaces.is_empty())
        .await;
    assert!(source.stats.watch_errors.load(Ordering::Relaxed) == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relist_drops_what_was_deleted_meanwhile() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    assert!(source.next().await.pods.contains_key(&key("db")));
    // The watches have started, so the next one resumes from their resourceVersion.
    server.wait_for_watches(1).await;

    // The deletion is never sent as a watch event: the history is compacted and the watches
    // end; resuming gets 410 Gone, and only the relist can tell that db is gone.
    server.delete_and_compact(Resource::Pods, "shop", "db");
    let state = source
        .until("db is gone", |s| !s.pods.contains_key(&key("db")))
        .await;
    assert!(
        state.pods.contains_key(&key("web")),
        "a relist keeps what is still there"
    );
    assert_eq!(state.policies.len(), 1);
    assert!(source.stats.relists.load(Ordering::Relaxed) >= 1);
    let pod_lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    assert!(pod_lists >= 2, "Pods were not relisted");

    // And it goes on following changes after the relist.
    server.apply(&pod("db", "n2", "10.244.2.8", "db"));
    source
        .until("db is back", |s| s.pods.contains_key(&key("db")))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_watch_resumes_where_it_was_without_a_relist() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    server.wait_for_watches(1).await;
    let lists = |server: &KubeServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && !r.contains("watch="))
            .count()
    };
    let lists_before = lists(&server);
    server.end_watches();
    server.wait_for_watches(2).await;
    server.apply(&pod("after", "n1", "10.244.1.60", "web"));
    source
        .until("the change after the restart arrived", |s| {
            s.pods.contains_key(&key("after"))
        })
        .await;
    let watches_resumed = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch="))
        .count();
    assert!(watches_resumed >= 2, "the Pods watch was not restarted");
    assert_eq!(
        lists(&server),
        lists_before,
        "a resumed watch needs no relist"
    );
    assert_eq!(source.stats.relists.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_debounced_into_few_states() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    for i in 0..200 {
        server.apply(&pod(
            &format!("burst-{i}"),
            "n2",
            &format!("10.244.2.{}", i + 10),
            "web",
        ));
    }
    let mut states = 0;
    loop {
        let state = source.next().await;
        states += 1;
        if state.pods.len() == 202 {
            break;
        }
    }
    assert!(
        states < 200,
        "every change produced its own state ({states} states for 200 changes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_going_away_keeps_the_last_state_and_reconnects() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    server.wait_for_watches(1).await;
    assert!(
        source.stats.connected.load(Ordering::Relaxed),
        "{:?} {:?}",
        source.stats,
        server.requests()
    );

    server.stop().await;
    // Changes made while the agent cannot see them.
    server.apply(&pod("late", "n1", "10.244.1.20", "web"));
    server.delete(Resource::Pods, "shop", "db");
    source
        .assert_quiet(
            Duration::from_secs(2),
            "the API server is gone, so the last state must stay",
        )
        .await;
    assert!(
        !source.stats.connected.load(Ordering::Relaxed),
        "the lost connection is not reported"
    );
    assert!(source.stats.watch_errors.load(Ordering::Relaxed) > 0);

    server.start().await;
    let state = source
        .until("the changes made while away arrived", |s| {
            s.pods.contains_key(&key("late")) && !s.pods.contains_key(&key("db"))
        })
        .await;
    assert_eq!(state.policies.len(), 1);
    // Kinds with nothing new come back quietly; the source's probe notices them.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !source.stats.connected.load(Ordering::Relaxed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source never reported the API server back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Restarted with its history gone (an API server whose etcd was compacted meanwhile).
    server.stop().await;
    server.delete_and_compact(Resource::Pods, "shop", "late");
    server.start().await;
    source
        .until("late is gone after the relist", |s| {
            !s.pods.contains_key(&key("late"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_appears_after_its_add_started_is_delivered() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    // kubelet ran the CNI ADD; the Pod object (with the node) arrives a little later, and then
    // its addresses: every step is a new state (the runtime's ADD waits on these).
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: slow, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: main, image: x}]}
status: {phase: Pending}
"#,
    );
    let state = source
        .until("slow is there", |s| s.pods.contains_key(&key("slow")))
        .await;
    assert!(state.pods[&key("slow")].status.pod_ips.is_empty());
    server.apply(&pod("slow", "n1", "10.244.1.33", "web"));
    source
        .until("slow has its address", |s| {
            s.pods[&key("slow")].status.pod_ips.len() == 1
        })
        .await;
}

fn mesh_peer(prefix: &str) -> String {
    format!(
        "apiVersion: weir.io/v1alpha1\nkind: MeshPeer\nmetadata: {{name: east}}\nspec:\n  endpoints: ['192.0.2.5:4243']\n  \
         allowedPrefixes: ['{prefix}']\n  export: {{namespaceSelector: {{matchLabels: {{mesh.weir.io/export: 'true'}}}}}}\n  \
         staleTTL: 10m\n  caBundle: 'PEM'\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peers_are_watched_as_a_crd_and_read_like_standalone() {
    let server = KubeServer::start_new().await;
    seed(&server);
    server.apply(&mesh_peer("10.245.0.0/16"));
    let mut source = Source::start(&server, "n1");
    let state = source.next().await;
    let mut standalone = ClusterState::default();
    for object in weir_policy::model::parse_documents(&mesh_peer("10.245.0.0/16"), "test") {
        standalone.apply(object.unwrap());
    }
    assert_eq!(state.mesh_peers, standalone.mesh_peers);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /apis/weir.io/v1alpha1/meshpeers?")),
        "{:?}",
        server.requests()
    );

    server.apply(&mesh_peer("10.246.0.0/16"));
    source
        .until("the MeshPeer's change is followed", |s| {
            s.mesh_peers
                .get("east")
                .is_some_and(|p| p.spec.allowed_prefixes == ["10.246.0.0/16"])
        })
        .await;
    server.delete(Resource::MeshPeers, "", "east");
    source
        .until("the deleted MeshPeer is gone", |s| s.mesh_peers.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_until_the_mesh_peers_are_listed() {
    let server = KubeServer::start_new().await;
    seed(&server);
    // As when the MeshPeer CRD is not installed: a node's restored mesh import must not meet a
    // state without its MeshPeers.
    server.fail(Resource::MeshPeers, 404);
    let mut source = Source::start(&server, "n1");
    source
        .assert_quiet(
            Duration::from_secs(2),
            "a state without MeshPeers would drop a node's restored mesh import",
        )
        .await;
    server.heal(Resource::MeshPeers);
    let state = source.next().await;
    assert_eq!(state.pods.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_until_every_kind_is_listed() {
    let server = KubeServer::start_new().await;
    seed(&server);
    server.fail(Resource::NetworkPolicies, 403);
    let mut source = Source::start(&server, "n1");
    source
        .assert_quiet(
            Duration::from_secs(2),
            "a state without the policies would enforce less than the cluster says",
        )
        .await;
    assert!(source.stats.watch_errors.load(Ordering::Relaxed) > 0);
    server.heal(Resource::NetworkPolicies);
    let state = source.next().await;
    assert_eq!(state.policies.len(), 1);
    assert_eq!(state.pods.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pods_are_left_out() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let done = pod("job", "n1", "10.244.1.40", "job").replace("phase: Running", "phase: Succeeded");
    server.apply(&done);
    let mut source = Source::start(&server, "n1");
    let state = source.next().await;
    assert!(state.pods.contains_key(&key("web")));
    assert!(
        !state.pods.contains_key(&key("job")),
        "a Succeeded pod's address is released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_cannot_be_written_yet_is_retried() {
    let server = KubeServer::start_new().await;
    seed(&server);
    server.apply(BAD_POLICY);
    server.fail_events(true);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.events().is_empty());
    server.fail_events(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.events().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Event was not retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(source.stats.events_written.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_policy_gets_one_event_from_all_agents() {
    let server = KubeServer::start_new().await;
    seed(&server);
    server.apply(BAD_POLICY);
    let mut source = Source::start(&server, "n1");
    let state = source.next().await;
    assert_eq!(
        state.policies.len(),
        2,
        "the state carries it; the compiler rejects it"
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    while server.events().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no Event written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let ((namespace, _), event) = events.into_iter().next().unwrap();
    assert_eq!(namespace, "shop");
    assert_eq!(event["reason"], "PolicyRejected");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "NetworkPolicy");
    assert_eq!(event["involvedObject"]["name"], "bad-cidr");
    assert_eq!(
        event["involvedObject"]["uid"],
        "uid-NetworkPolicy-shop-bad-cidr"
    );
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("spec.ingress[0].from[0].ipBlock.cidr") && message.contains("10.0.0.0/99"),
        "the message names the field and the reason: {message}"
    );
    assert_eq!(event["reportingInstance"], "n1");

    // Other changes do not repeat it.
    server.apply(&pod("more", "n1", "10.244.1.50", "web"));
    source
        .until("more is there", |s| s.pods.contains_key(&key("more")))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 1);

    // A second node's agent finds it written and only marks it as seen again.
    let mut other = Source::start(&server, "n2");
    other.next().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server
        .requests()
        .iter()
        .any(|r| r.starts_with("PATCH /api/v1/namespaces/shop/events/"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PATCH of the Event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.events().len(),
        1,
        "one Event per rejection, cluster-wide"
    );
}

#[test]
fn the_cli_selects_kubernetes_mode_from_a_flag_or_the_environment() {
    use clap::Parser as _;
    use weir_agent::config::Cli;
    let cli = Cli::try_parse_from(["weir-agent", "--node-name", "n1", "--kubernetes"]).unwrap();
    assert!(cli.run.kubernetes && cli.run.manifests.is_none());
    assert_eq!(cli.run.health_addr.to_string(), "127.0.0.1:9876");
    let cli =
        Cli::try_parse_from(["weir-agent", "--kubernetes=false", "--manifests", "/m"]).unwrap();
    assert!(!cli.run.kubernetes);
    let cli = Cli::try_parse_from(["weir-agent", "--health-addr", "0.0.0.0:9000"]).unwrap();
    assert_eq!(cli.run.health_addr.port(), 9000);
}

// ---- The agent binary in Kubernetes mode (root: it loads the datapath in a node namespace). ----

/// One `weir-agent --kubernetes` in its own namespace, with the test server inside that
/// namespace too (the agent reaches it at 127.0.0.1 through a kubeconfig).
struct KubeNode {
    netns: Netns,
    dirs: AgentDirs,
    server: KubeServer,
    health_port: u16,
}

impl KubeNode {
    fn new(tag: &str) -> Self {
        let netns = Netns::new(tag);
        let listener = spawn_in(netns.path(), || {
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding in the namespace")
        })
        .join()
        .unwrap();
        let server = KubeServer::start_on(listener);
        let dirs = AgentDirs::new(tag, "n1");
        std::fs::write(dirs.root.join("kubeconfig"), server.kubeconfig()).unwrap();
        let health_port = 19000 + (std::process::id() % 1000) as u16;
        Self {
            netns,
            dirs,
            server,
            health_port,
        }
    }

    fn command(&self, extra: &[&str]) -> std::process::Command {
        let kubeconfig = self.dirs.root.join("kubeconfig");
        let source = ClusterSource::Kubernetes {
            kubeconfig: &kubeconfig,
        };
        let mut cmd = self
            .dirs
            .args("n1", source, extra)
            .command(&bin("weir-agent"), &self.netns.name);
        cmd.args(["--health-addr", &format!("127.0.0.1:{}", self.health_port)])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null());
        cmd
    }

    /// A `weir-cni` invocation for pod `shop/<name>` (container id = name) and its stdin.
    fn cni(&self, verb: &str, name: &str, pod: &Netns) -> (std::process::Command, String) {
        let mut cmd = self.netns.command(bin("weir-cni").to_str().unwrap());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", name)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", pod.path())
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "type": "weir-cni",
            "agentSocket": self.dirs.socket,
            "logFile": self.dirs.root.join("cni.log"),
            "podWaitSeconds": 20,
        });
        (cmd, conf.to_string())
    }

    /// `GET path` on the agent's health port, from inside the namespace.
    fn get(&self, path: &str) -> (u16, String) {
        health_get(&self.netns, self.health_port, path)
    }
}

async fn wait_for(what: &str, log: &std::path::Path, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; the agent's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_in_kubernetes_mode_serves_a_late_pod_reports_health_and_writes_events() {
    let node = KubeNode::new("k8s-agent");
    node.server.apply(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.201.1.0/24]}\n",
    );
    node.server
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    node.server.apply(POLICY);
    let log = node.dirs.root.join("agent.log");
    let mut child = node
        .command(&[])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guard = scopeguard(&mut child);

    wait_for("the agent API", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("serving the agent API")
    })
    .await;
    assert_eq!(node.get("/healthz"), (200, "ok\n".to_owned()));
    wait_for("/readyz to say enforcing", &log, || {
        node.get("/readyz") == (200, "enforcing\n".to_owned())
    })
    .await;
    let metrics = node.get("/metrics").1;
    for sample in [
        "weir_enforcement_state{state=\"enforcing\"} 1\n",
        "weir_cluster_objects{kind=\"Node\"} 1\n",
        "weir_cluster_objects{kind=\"NetworkPolicy\"} 1\n",
        "weir_source_connected 1\n",
        "weir_endpoints 0\n",
    ] {
        assert!(metrics.contains(sample), "no {sample:?} in\n{metrics}");
    }
    // The pod CIDR came from the Node object.
    let text = std::fs::read_to_string(&log).unwrap();
    let ready = text
        .lines()
        .find(|l| l.contains("weir-agent ready"))
        .unwrap_or_default();
    assert!(
        ready.contains("10.201.1.0/24"),
        "the pod CIDR does not come from the Node's spec.podCIDRs: {ready}"
    );

    // kubelet runs the CNI ADD before the agent has seen the Pod: ADD waits for it.
    let pod_ns = Netns::new("k8s-pod");
    let add = tokio::task::spawn_blocking({
        let cmd = node.cni("ADD", "late", &pod_ns);
        move || run_cni(cmd)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!add.is_finished(), "ADD finished before its Pod existed");
    node.server.apply(&pod("late", "n1", "10.201.1.99", "web"));
    let (ok, result) = add.await.unwrap();
    assert!(ok, "ADD failed: {result}");
    let address = result["ips"][0]["address"].as_str().unwrap_or_default();
    assert!(
        address.starts_with("10.201.1."),
        "the pod's address is not from the Node's pod CIDR: {result}"
    );
    wait_for("the endpoint metric", &log, || {
        node.get("/metrics").1.contains("weir_endpoints 1\n")
    })
    .await;
    let del = tokio::task::spawn_blocking({
        let cmd = node.cni("DEL", "late", &pod_ns);
        move || run_cni(cmd)
    });
    let (ok, result) = del.await.unwrap();
    assert!(ok, "DEL failed: {result}");

    // A policy the compiler rejects: a log line and an Event, written by the agent.
    node.server.apply(BAD_POLICY);
    wait_for("the PolicyRejected Event", &log, || {
        node.server
            .events()
            .values()
            .any(|e| e["reason"] == "PolicyRejected" && e["involvedObject"]["name"] == "bad-cidr")
    })
    .await;
    wait_for("the rejection's log line", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("rejected NetworkPolicy")
    })
    .await;
    wait_for("the metrics to count it", &log, || {
        node.get("/metrics")
            .1
            .contains("weir_rejected_policies 1\n")
    })
    .await;

    // The API server goes away: enforcement and readiness stay, the metric says so.
    node.server.stop().await;
    wait_for("the source to report the lost connection", &log, || {
        node.get("/metrics").1.contains("weir_source_connected 0\n")
    })
    .await;
    assert_eq!(node.get("/readyz"), (200, "enforcing\n".to_owned()));
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_node_object_the_agent_stops_with_a_clear_error() {
    let node = KubeNode::new("k8s-nonode");
    node.server
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let output = tokio::task::spawn_blocking({
        let mut cmd = node.command(&["--node-wait-seconds", "2"]);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("there is no Node object named n1"),
        "the error should name the missing Node: {stderr}"
    );
}

/// Runs weir-cni with the environment and stdin `cmd` carries; returns success and its JSON.
fn run_cni((mut cmd, stdin): (std::process::Command, String)) -> (bool, serde_json::Value) {
    use std::io::Write as _;
    let mut child = cmd.spawn().expect("spawning weir-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json)
}

/// Kills the agent when the test ends, however it ends.
struct KillOnDrop<'a>(&'a mut std::process::Child);

fn scopeguard(child: &mut std::process::Child) -> KillOnDrop<'_> {
    KillOnDrop(child)
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_resumed_watches_and_relists_of_unchanged_objects_send_no_state() {
    let server = KubeServer::start_new().await;
    seed(&server);
    let mut source = Source::start(&server, "n1");
    source.next().await;
    let watches = |server: &KubeServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.contains("watch=true"))
            .count()
    };
    // A bookmark, watches ended by the server (resumed), and a compaction (410 Gone: relist),
    // each waited for until the source has come back for every kind.
    let before = watches(&server);
    server.bookmark();
    server.end_watches();
    wait_until("the watches to resume", || watches(&server) >= before + 4).await;
    let before = watches(&server);
    server.compact();
    // Per kind: the resumed watch that gets 410, then the watch after the relist.
    wait_until("a relist of every kind", || {
        source.stats.relists.load(Ordering::Relaxed) >= 4 && watches(&server) >= before + 8
    })
    .await;
    // Then a real change. States are sent in order, so had any of the above sent one, it
    // would come first.
    server.apply(&pod("late", "n2", "10.244.2.9", "db"));
    let next = source.next().await;
    assert!(
        next.pods.contains_key(&key("late")),
        "the source sent a state for unchanged objects: {next:#?}"
    );
    assert_eq!(next.pods.len(), 3);
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
