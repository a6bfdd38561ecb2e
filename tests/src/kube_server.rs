//! A small Kubernetes API server for tests: it speaks the list/watch protocol over HTTP for Pods,
//! Namespaces, Nodes, NetworkPolicies and MeshPeers (weir.io/v1alpha1), and accepts Events.
//!
//! - `GET <collection>` lists, with `metadata.resourceVersion`; `?watch=true&resourceVersion=N`
//!   streams JSON lines `{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}`
//!   of every change after N, then follows new changes.
//! - A watch from a resourceVersion older than the last [`KubeServer::compact`] gets one ERROR
//!   event carrying a `Status` with code 410 (Gone), as the real API server answers.
//! - [`KubeServer::stop`] drops the listener and every connection (the API server goes away);
//!   [`KubeServer::start`] listens again on the same port with the same objects.
//! - `POST /api/v1/namespaces/{ns}/events` stores an Event (409 if the name exists);
//!   `PATCH .../events/{name}` merges into it.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// A collection the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Pods,
    Namespaces,
    Nodes,
    NetworkPolicies,
    MeshPeers,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::Nodes,
        Resource::NetworkPolicies,
        Resource::MeshPeers,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "/api/v1/pods",
            Resource::Namespaces => "/api/v1/namespaces",
            Resource::Nodes => "/api/v1/nodes",
            Resource::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Resource::MeshPeers => "/apis/weir.io/v1alpha1/meshpeers",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::NetworkPolicies => "networking.k8s.io/v1",
            Resource::MeshPeers => "weir.io/v1alpha1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::Nodes => "Node",
            Resource::NetworkPolicies => "NetworkPolicy",
            Resource::MeshPeers => "MeshPeer",
        }
    }

    fn namespaced(self) -> bool {
        matches!(self, Resource::Pods | Resource::NetworkPolicies)
    }

    fn of_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

/// Namespace ("" for cluster-scoped objects) and name.
type Key = (String, String);

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// Watches from below this resourceVersion get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    /// Every change: (resourceVersion, resource, type, object).
    log: Vec<(u64, Resource, &'static str, Value)>,
    events: BTreeMap<Key, Value>,
    /// Resources whose requests fail with this HTTP status.
    failing: BTreeMap<Resource, u16>,
    /// Writes of Events fail with 503 while set.
    failing_events: bool,
    /// Every request line, for assertions.
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Notify,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct KubeServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl KubeServer {
    /// Starts a server on a free port of 127.0.0.1. Needs a tokio runtime.
    pub async fn start_new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        Self::start_with_listener(listener)
    }

    /// Starts a server on a listener bound elsewhere (e.g. inside a node's network namespace,
    /// with [`crate::netns::spawn_in`]). Needs a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        Self::start_with_listener(TcpListener::from_std(listener).expect("tokio listener"))
    }

    fn start_with_listener(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local address");
        let server = Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                changed: Notify::new(),
            }),
            addr,
            task: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server (for a `weir-agent --kubernetes` process).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n",
            self.url()
        )
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server URL"));
        kube::Client::try_from(config).expect("kube client")
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: dropping the task (stop) drops every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// The API server goes away: the listener and every open connection are dropped.
    pub async fn stop(&self) {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// The API server comes back on the same address, with the same objects.
    pub async fn start(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Creates or replaces an object (any of the four kinds, as YAML or JSON text).
    pub fn apply(&self, manifest: &str) {
        let object: Value = yaml_serde::from_str(manifest).expect("manifest");
        self.apply_value(object);
    }

    pub fn apply_value(&self, mut object: Value) {
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let resource =
            Resource::of_kind(&kind).unwrap_or_else(|| panic!("unsupported kind {kind}"));
        let key = key_of(resource, &mut object);
        let mut store = self.shared.store();
        store.resource_version += 1;
        let rv = store.resource_version;
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("uid")
            .or_insert_with(|| json!(format!("uid-{}-{}-{}", resource.kind(), key.0, key.1)));
        let objects = store.objects.entry(resource).or_default();
        let kind = if objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.log.push((rv, resource, kind, object));
        drop(store);
        self.shared.changed.notify_waiters();
    }

    /// Deletes an object; watchers get a DELETED event.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut store = self.shared.store();
        store.resource_version += 1;
        let rv = store.resource_version;
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(mut object) = store.objects.entry(resource).or_default().remove(&key) {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            store.log.push((rv, resource, "DELETED", object));
        }
        drop(store);
        self.shared.changed.notify_waiters();
    }

    /// Deletes an object and compacts the history past the deletion, so that the only way a
    /// client can learn of it is a relist (what happens to a watch that was down during
    /// compaction). Open watches end, as on an API server restart.
    pub fn delete_and_compact(&self, resource: Resource, namespace: &str, name: &str) {
        {
            let mut store = self.shared.store();
            let key = (namespace.to_owned(), name.to_owned());
            store.objects.entry(resource).or_default().remove(&key);
            store.resource_version += 1;
            store.compacted = store.resource_version;
            store.log.clear();
            store.epoch += 1;
        }
        self.shared.changed.notify_waiters();
    }

    /// Ends every open watch stream, as the API server does when a watch's timeout expires: the
    /// client resumes from its last resourceVersion (no relist needed).
    pub fn end_watches(&self) {
        self.shared.store().epoch += 1;
        self.shared.changed.notify_waiters();
    }

    /// Forgets the change history: watches from older resourceVersions get 410 Gone. Open
    /// watches end.
    pub fn compact(&self) {
        {
            let mut store = self.shared.store();
            store.resource_version += 1;
            store.compacted = store.resource_version;
            store.log.clear();
            store.epoch += 1;
        }
        self.shared.changed.notify_waiters();
    }

    /// Sends a BOOKMARK (the current resourceVersion) on every open watch.
    pub fn bookmark(&self) {
        {
            let mut store = self.shared.store();
            store.resource_version += 1;
            let rv = store.resource_version;
            for resource in Resource::ALL {
                let object = json!({
                    "apiVersion": resource.api_version(), "kind": resource.kind(),
                    "metadata": {"resourceVersion": rv.to_string()},
                });
                store.log.push((rv, resource, "BOOKMARK", object));
            }
        }
        self.shared.changed.notify_waiters();
    }

    /// Requests for `resource` fail with `status` (e.g. 403) until [`Self::heal`].
    pub fn fail(&self, resource: Resource, status: u16) {
        self.shared.store().failing.insert(resource, status);
        self.shared.store().epoch += 1;
        self.shared.changed.notify_waiters();
    }

    pub fn heal(&self, resource: Resource) {
        self.shared.store().failing.remove(&resource);
    }

    /// Writes of Events fail (503) until called again with `false`.
    pub fn fail_events(&self, fail: bool) {
        self.shared.store().failing_events = fail;
    }

    /// Events written by clients, by (namespace, name).
    pub fn events(&self) -> BTreeMap<(String, String), Value> {
        self.shared.store().events.clone()
    }

    /// Waits until every resource has been watched at least `n` times (a watch replays what
    /// changed after its resourceVersion, so from its request on the client misses nothing).
    pub async fn wait_for_watches(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let requests = self.requests();
            let watched = |r: Resource| {
                let prefix = format!("GET {}?", r.path());
                requests
                    .iter()
                    .filter(|line| line.starts_with(&prefix) && line.contains("watch="))
                    .count()
            };
            if Resource::ALL.into_iter().all(|r| watched(r) >= n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every resource was watched {n} times: {requests:#?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Request lines seen so far (`GET /api/v1/pods?watch=true&...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

fn key_of(resource: Resource, object: &mut Value) -> Key {
    let meta = object["metadata"].as_object_mut().expect("metadata");
    let name = meta["name"].as_str().expect("metadata.name").to_owned();
    let namespace = if resource.namespaced() {
        meta.entry("namespace")
            .or_insert_with(|| json!("default"))
            .as_str()
            .unwrap_or("default")
            .to_owned()
    } else {
        String::new()
    };
    (namespace, name)
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let q = query(&req);
    shared.store().requests.push(format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
    ));
    if let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == path) {
        if req.method() != Method::GET {
            return full(
                StatusCode::METHOD_NOT_ALLOWED,
                status(405, "MethodNotAllowed", "read-only"),
            );
        }
        if let Some(&code) = shared.store().failing.get(&resource) {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return full(
                code,
                status(code.as_u16(), "Forbidden", "failing on purpose"),
            );
        }
        let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
        return if watching {
            let from = q
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0);
            watch(shared, resource, from)
        } else {
            list(&shared, resource)
        };
    }
    // Events: /api/v1/namespaces/{ns}/events[/{name}]
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["api", "v1", "namespaces", ns, "events", rest @ ..] = parts.as_slice() {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let body: Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let mut store = shared.store();
        if store.failing_events {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "failing on purpose"),
            );
        }
        return match (rest, body) {
            ([], mut event) if event.is_object() => {
                let name = event["metadata"]["name"].as_str().unwrap_or("").to_owned();
                let key = ((*ns).to_owned(), name.clone());
                if store.events.contains_key(&key) {
                    return full(
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("events \"{name}\" already exists"),
                        ),
                    );
                }
                store.resource_version += 1;
                event["metadata"]["resourceVersion"] = json!(store.resource_version.to_string());
                store.events.insert(key, event.clone());
                full(StatusCode::CREATED, event)
            }
            ([name], Value::Object(patch)) => {
                let key = ((*ns).to_owned(), (*name).to_owned());
                match store.events.get_mut(&key) {
                    Some(event) => {
                        for (k, v) in patch {
                            event[k] = v;
                        }
                        full(StatusCode::OK, event.clone())
                    }
                    None => full(
                        StatusCode::NOT_FOUND,
                        status(404, "NotFound", "no such event"),
                    ),
                }
            }
            _ => full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "bad event"),
            ),
        };
    }
    full(
        StatusCode::NOT_FOUND,
        status(
            404,
            "NotFound",
            &format!("the test server does not serve {path}"),
        ),
    )
}

fn list(shared: &Shared, resource: Resource) -> Response<Body> {
    let store = shared.store();
    let items: Vec<Value> = store
        .objects
        .get(&resource)
        .map(|o| o.values().cloned().collect())
        .unwrap_or_default();
    full(
        StatusCode::OK,
        json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind()),
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        }),
    )
}

/// Streams changes after `from`, then follows; ends when the epoch changes.
fn watch(shared: Arc<Shared>, resource: Resource, from: u64) -> Response<Body> {
    let (epoch, gone) = {
        let store = shared.store();
        (store.epoch, from < store.compacted)
    };
    let line = |event: Value| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{event}\n"))));
    let body: Body = if gone {
        let event = json!({"type": "ERROR", "object": status(410, "Expired",
            &format!("too old resource version: {from}"))});
        BodyExt::boxed_unsync(StreamBody::new(stream::iter([line(event)])))
    } else {
        let events = stream::unfold((shared, from), move |(shared, mut cursor)| async move {
            loop {
                let changed = shared.changed.notified();
                {
                    let store = shared.store();
                    if store.epoch != epoch || store.failing.contains_key(&resource) {
                        return None;
                    }
                    let after = cursor;
                    let next: Vec<Value> = store
                        .log
                        .iter()
                        .filter(|(rv, r, _, _)| *r == resource && *rv > after)
                        .map(|(rv, _, kind, object)| {
                            cursor = *rv;
                            json!({"type": kind, "object": object})
                        })
                        .collect();
                    if !next.is_empty() {
                        let text: String = next.iter().map(|e| format!("{e}\n")).collect();
                        return Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(text))),
                            (shared.clone(), cursor),
                        ));
                    }
                }
                changed.await;
            }
        });
        BodyExt::boxed_unsync(StreamBody::new(events.boxed()))
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
