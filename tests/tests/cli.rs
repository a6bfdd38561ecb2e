//! The `weir` CLI against a live agent in standalone mode: a node namespace running the real
//! `weir-agent` on a manifests directory, pods wired by the real `weir-cni`, real TCP between
//! them. Every live command is run as a user runs it (the `weir` binary on the agent's socket);
//! JSON output is checked for content and for its schema (key names and value types) against
//! golden files in tests/golden (regenerate with WEIR_UPDATE_GOLDEN=1). Root only.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::tcp::{PORT, connects, eventually_connects, serve};
use weir_tests::{
    agent::{Agent, AgentDirs, bin},
    cni::{Plugin, PodRef, first_address},
    netns::Netns,
};

const NODE: &str = "n1";

fn manifests() -> [(&'static str, String); 5] {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: app\n  labels: {{app: {name}}}\n\
             spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - containerPort: {PORT}\n      name: web\n"
        )
    };
    [
        (
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n".to_owned(),
        ),
        ("pods.yaml", [pod("client"), pod("intruder"), pod("server")].join("---\n")),
        (
            "policy.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-client\n  namespace: app\n\
             spec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports:\n    - port: web\n"
                .to_owned(),
        ),
        (
            "broken.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: broken\n  namespace: app\n\
             spec:\n  podSelector: {matchLabels: {app: nobody}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n"
                .to_owned(),
        ),
        ("node.yaml", format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n")),
    ]
}

fn weir(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("weir"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running weir")
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let o = weir(socket, args);
    assert!(
        o.status.success(),
        "weir {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

fn json(socket: &Path, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend(args);
    serde_json::from_str(&ok(socket, &all)).expect("JSON output")
}

/// The shape of a JSON value: objects keep their keys, arrays the shape of their first element
/// (`[]` when empty), scalars become their type's name.
fn schema(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), schema(v))).collect()),
        Value::Array(a) => Value::Array(a.first().map(schema).into_iter().collect()),
        Value::String(_) => "string".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => "null".into(),
    }
}

fn golden_schema(name: &str, v: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name);
    let actual = serde_json::to_string_pretty(&schema(v)).unwrap() + "\n";
    if std::env::var_os("WEIR_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEIR_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        want,
        "the JSON schema differs from {}; scripts depend on it",
        path.display()
    );
}

/// A child process killed when the test is done with it, also when an assertion fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `weir flows` (with `args`) lists a record `pred` accepts; returns it.
fn wait_for_flow(socket: &Path, args: &[&str], pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = vec!["-o", "json", "flows"];
        all.extend(args);
        let out = ok(socket, &all);
        let found = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("one JSON object per line"))
            .find(|v| pred(v));
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no such flow record; weir flows printed:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_cli_reads_a_live_agent() {
    let node = Netns::new("cli");
    let dirs = AgentDirs::new("cli", NODE);
    for (file, text) in manifests() {
        std::fs::write(dirs.manifests.join(file), text).unwrap();
    }
    let agent = Agent::start(&node, NODE, &dirs, &["--pod-cidr", "10.211.1.0/24"]);
    let socket = dirs.socket.as_path();
    let plugin = Plugin::new(&node.name, socket, &dirs.root.join("cni.log"));
    let pods: Vec<(&str, Netns)> = ["client", "intruder", "server"]
        .into_iter()
        .map(|name| (name, Netns::new(&format!("cli{}", &name[..3]))))
        .collect();
    let mut ips = Vec::new();
    for (name, netns) in &pods {
        let id = format!("ctr-{name}");
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &id,
                namespace: "app",
                name,
                netns: &netns.name,
            },
        );
        ips.push(first_address(&out));
    }
    let (client, intruder, server) = (&pods[0].1, &pods[1].1, &pods[2].1);
    serve(server, ips[2]);

    // status
    let status = json(socket, &["status"]);
    assert_eq!(status["node"], NODE);
    assert_eq!(status["enforcement"], "enforcing", "{status}");
    assert_eq!(status["endpoints"], 3);
    assert_eq!(status["policies"], 2);
    assert_eq!(status["policies_enforced"], 1);
    assert_eq!(status["rejected"][0]["policy"], "app/broken");
    assert_eq!(
        status["rejected"][0]["field"],
        "spec.ingress[0].from[0].ipBlock.cidr"
    );
    let maps = status["maps"].as_array().unwrap();
    let policy_map = maps
        .iter()
        .find(|m| m["name"] == "WEIR_POLICY")
        .expect("WEIR_POLICY");
    assert!(policy_map["entries"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(policy_map["capacity"], 1_048_576);
    let endpoints_map = maps.iter().find(|m| m["name"] == "WEIR_ENDPOINTS").unwrap();
    assert_eq!(endpoints_map["entries"], 3);
    let table = ok(socket, &["status"]);
    assert!(
        table.starts_with(&format!("node {NODE}: enforcing")),
        "{table}"
    );
    assert!(table.contains("rejected app/broken"), "{table}");

    // endpoints
    let endpoints = json(socket, &["endpoints"]);
    let list = endpoints.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for ((name, _), ip) in pods.iter().zip(&ips) {
        let e = list
            .iter()
            .find(|e| e["pod"] == format!("app/{name}"))
            .expect("endpoint");
        assert_eq!(e["addresses"][0], ip.to_string());
        assert_eq!(e["labels"]["app"], *name);
        assert!(e["identity"].as_u64().unwrap() >= 256);
    }
    golden_schema("cli-endpoints.schema.json", &endpoints);

    // identities
    let identities = json(socket, &["identities"]);
    let server_id = identities
        .as_array()
        .unwrap()
        .iter()
        .find(|i| {
            i["local_pods"]
                .as_array()
                .is_some_and(|p| p.contains(&"app/server".into()))
        })
        .expect("the server's identity");
    assert_eq!(server_id["kind"], "pod");
    assert_eq!(server_id["addresses"][0], ips[2].to_string());
    golden_schema("cli-identities.schema.json", &identities);

    // policy POD
    let policy = json(socket, &["policy", "app/server"]);
    assert_eq!(policy["ingress"]["isolated"], true);
    assert_eq!(
        policy["ingress"]["selected_by"][0],
        "app/server-from-client"
    );
    let rules = policy["ingress"]["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["rule"] == "app/server-from-client ingress[0]"
                && r["peer"].as_str().unwrap().contains("app=client")
                && r["ports"] == "TCP 8080"),
        "{policy}"
    );
    assert_eq!(policy["egress"]["isolated"], false);
    golden_schema("cli-policy.schema.json", &policy);
    let o = weir(socket, &["policy", "app/nobody"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "no pod app/nobody; pods enforced on node n1: app/client, app/intruder, app/server"
        ),
        "{err}"
    );

    // explain, live and offline agree
    for (src, want) in [("app/client", "ALLOW"), ("app/intruder", "DENY")] {
        let live = json(socket, &["explain", src, "app/server", "8080/TCP"]);
        assert_eq!(live["verdict"], want, "{live}");
        assert_eq!(live["ingress"]["basis"], format!("enforced on node {NODE}"));
        assert_eq!(live["destination"]["address"], ips[2].to_string());
        let offline = json(
            socket,
            &[
                "explain",
                "--manifests",
                dirs.manifests.to_str().unwrap(),
                src,
                "app/server",
                "8080/TCP",
            ],
        );
        assert_eq!(offline["verdict"], want, "{offline}");
        assert_eq!(
            offline["ingress"]["rule"]["name"],
            live["ingress"]["rule"]["name"]
        );
        assert_eq!(
            schema(&offline["egress"]["rule"]),
            schema(&live["egress"]["rule"])
        );
    }
    let denied = ok(
        socket,
        &["explain", "app/intruder", "app/server", "8080/TCP"],
    );
    assert!(
        denied.starts_with("DENY app/intruder -> app/server 8080/TCP"),
        "{denied}"
    );
    assert!(
        denied.contains("selected by app/server-from-client"),
        "{denied}"
    );
    let o = weir(socket, &["explain", "app/ghost", "app/server", "8080/TCP"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no pod app/ghost; known pods in app: client, intruder, server"),
        "{err}"
    );
    let o = weir(socket, &["explain", "app/client", "app/server", "8080"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not PORT/PROTO"), "{err}");

    // flows: a drop shows up in the history, and live with --follow
    assert!(
        eventually_connects(client, ips[2]),
        "the client reaches the server"
    );
    assert!(!connects(intruder, ips[2]), "the intruder is dropped");
    let dropped = wait_for_flow(socket, &["--verdict", "drop", "--pod", "app/server"], |v| {
        v["src"] == ips[1].to_string() && v["reason"] == "policy-denied"
    });
    assert_eq!(dropped["direction"], "ingress");
    assert_eq!(dropped["policies"][0], "app/server-from-client");
    golden_schema("cli-flow.schema.json", &dropped);
    let none = ok(
        socket,
        &[
            "-o",
            "json",
            "flows",
            "--verdict",
            "drop",
            "--namespace",
            "other",
        ],
    );
    assert!(none.is_empty(), "{none}");

    let follower = Command::new(bin("weir"))
        .arg("--socket")
        .arg(socket)
        .args([
            "-o",
            "json",
            "flows",
            "--follow",
            "--verdict",
            "drop",
            "--since",
            "0s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir flows --follow");
    let mut follower = KillOnDrop(follower);
    let stdout = follower.0.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    // The follower asked for nothing older than its own start, which may come after any one
    // connection attempt: make new drops until it prints one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        assert!(!connects(intruder, ips[2]));
        match received.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => break line.expect("reading weir flows --follow"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => assert!(
                Instant::now() < deadline,
                "weir flows --follow printed no drop within 20 s"
            ),
            Err(e) => panic!("weir flows --follow ended: {e}"),
        }
    };
    drop(follower);
    let v: Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["endpoint"], "app/server");

    // Status keeps counting what the datapath judged.
    let status = json(socket, &["status"]);
    let packets = status["packets"].as_array().unwrap();
    assert!(
        packets.iter().any(|p| p["reason"] == "policy-denied"
            && p["verdict"] == "drop"
            && p["packets"].as_u64().unwrap() > 0),
        "{status}"
    );
    golden_schema("cli-status.schema.json", &status);
    drop(agent);
}
