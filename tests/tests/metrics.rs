//! `/metrics` of a live agent (standalone mode: real agent, real weir-cni, real traffic between
//! pod namespaces): the instrumented metrics carry what happened (drops by reason and direction,
//! CNI ADD and DEL latency, compile time, map pressure, conntrack), and every metric the shipped
//! Grafana dashboard (manifests/grafana/weir-dashboard.json) queries is in the output. Root only.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;
use weir_tests::tcp::{PORT, connects, eventually_connects, serve};
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, spawn_in},
};

const NODE: &str = "n1";
const HEALTH: &str = "127.0.0.1:9876";

fn manifests() -> String {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: app\n  labels: {{app: {name}}}\n\
             spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - containerPort: {PORT}\n"
        )
    };
    [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n".to_owned(),
        pod("client"),
        pod("intruder"),
        pod("server"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-client\n  namespace: app\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n"
            .to_owned(),
    ]
    .join("---\n")
}

/// GET /metrics from inside the node's namespace, where the agent listens.
fn scrape(node: &Netns) -> String {
    spawn_in(node.path(), || {
        let mut s = TcpStream::connect(HEALTH).expect("connecting to the health endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    })
    .join()
    .unwrap()
}

/// `name{labels}` → value, for every sample line.
fn samples(body: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no sample {series}"))
        .1
}

/// Metric names (`weir_...`) a PromQL expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("weir_") {
                out.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    out
}

#[test]
fn metrics_record_what_happened_and_cover_the_dashboard() {
    let node = Netns::new("met");
    let dirs = AgentDirs::new("met", NODE);
    std::fs::write(dirs.manifests.join("cluster.yaml"), manifests()).unwrap();
    let agent = Agent::start(
        &node,
        NODE,
        &dirs,
        &["--pod-cidr", "10.212.1.0/24", "--health-addr", HEALTH],
    );
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let mut pods = Vec::new();
    for name in ["client", "intruder", "server"] {
        let netns = Netns::new(&format!("met{}", &name[..3]));
        let id = format!("ctr-{name}");
        let pod = PodRef {
            container_id: &id,
            namespace: "app",
            name,
            netns: &netns.name,
        };
        let (out, _) = plugin.ok("ADD", &pod);
        let ip = first_address(&out);
        pods.push((name, netns, ip));
    }
    let server_ip = pods[2].2;
    serve(&pods[2].1, server_ip);
    assert!(
        eventually_connects(&pods[0].1, server_ip),
        "the client reaches the server"
    );
    assert!(!connects(&pods[1].1, server_ip), "intruder is dropped");
    // A DEL, for its latency.
    let intruder_id = "ctr-intruder";
    plugin.ok(
        "DEL",
        &PodRef {
            container_id: intruder_id,
            namespace: "app",
            name: "intruder",
            netns: &pods[1].1.name,
        },
    );

    // The drop's event is read asynchronously: scrape until it is counted.
    let drop_series =
        r#"weir_verdicts_total{verdict="drop",reason="policy-denied",direction="ingress"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let response = loop {
        let response = scrape(&node);
        if response.contains(drop_series) || std::time::Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(
        response.contains("application/openmetrics-text"),
        "{response}"
    );
    let body = response.split_once("\r\n\r\n").unwrap().1;
    assert!(body.ends_with("# EOF\n"));
    let s = samples(body);
    assert!(value(&s, drop_series) >= 1.0, "{body}");
    assert!(
        value(
            &s,
            r#"weir_datapath_packets_total{verdict="drop",reason="policy-denied"}"#
        ) >= 1.0
    );
    assert!(
        value(
            &s,
            r#"weir_datapath_packets_total{verdict="allow",reason="rule"}"#
        ) >= 1.0
    );
    assert!(
        value(&s, r#"weir_cni_seconds_count{command="add"}"#) >= 3.0,
        "{body}"
    );
    assert!(
        value(&s, r#"weir_cni_seconds_count{command="del"}"#) >= 1.0,
        "{body}"
    );
    assert!(value(&s, "weir_policy_compile_seconds_count") >= 1.0);
    assert_eq!(value(&s, r#"weir_map_entries{map="WEIR_ENDPOINTS"}"#), 2.0);
    assert_eq!(
        value(&s, r#"weir_map_capacity{map="WEIR_POLICY"}"#),
        1_048_576.0
    );
    assert!(
        value(&s, "weir_conntrack_entries") >= 1.0,
        "the client's connection is tracked"
    );
    assert_eq!(
        value(&s, r#"weir_endpoints_by_state{state="enforced"}"#),
        2.0
    );
    assert_eq!(
        value(&s, r#"weir_endpoints_by_state{state="allocating"}"#),
        0.0
    );
    assert_eq!(value(&s, "weir_events_lost_total"), 0.0);
    // The names the hand-written exposition had are all still there.
    for series in [
        r#"weir_enforcement_state{state="enforcing"}"#,
        "weir_endpoints",
        r#"weir_cluster_objects{kind="Pod"}"#,
        "weir_rejected_policies",
        "weir_cluster_state_updates_total",
        "weir_source_connected",
        "weir_source_watch_errors_total",
        "weir_source_relists_total",
        "weir_policy_events_total",
        "weir_process_start_time_seconds",
    ] {
        value(&s, series);
    }

    // Every metric the dashboard queries exists (histograms by their _bucket/_count series).
    let names: BTreeSet<String> = s
        .iter()
        .map(|(series, _)| series.split('{').next().unwrap().to_owned())
        .collect();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana/weir-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut queried = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {} queries nothing",
            panel["title"]
        );
        for t in targets {
            queried.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    for templ in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = templ["query"].as_str() {
            queried.extend(metric_names(q));
        }
    }
    let missing: Vec<&String> = queried.iter().filter(|m| !names.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not export: {missing:?}"
    );
    for wanted in [
        "weir_verdicts_total",
        "weir_policy_compile_seconds_bucket",
        "weir_rejected_policies",
        "weir_map_entries",
        "weir_map_capacity",
        "weir_conntrack_entries",
        "weir_cni_seconds_bucket",
        "weir_endpoints_by_state",
        "weir_events_lost_total",
    ] {
        assert!(queried.contains(wanted), "the dashboard shows {wanted}");
    }
    drop(agent);
}
