//! The lab itself: its plumbing without an agent (topology, servers, probes), and a real lab on
//! the agent and the CNI plugin that comes up, carries traffic between nodes, and goes down
//! leaving nothing behind, also when the code holding it panics. Root only; never skipped.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use weir_lab::lab::{
    self, Lab, LabSpec, Manifest, ProbeOptions, ProbeSpec, Proto, Target, probe, servers,
    state::State, topology,
};
use weir_lab::netns;

fn nothing_left(name: &str) {
    assert_eq!(
        netns::list(&format!("wl-{name}-")),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    assert!(lab::pin_dirs(name).is_empty(), "bpffs pins left behind");
    assert!(!State::dir_of(name).exists(), "state directory left behind");
}

fn two_pods(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: one\n  namespace: {ns}\n  labels: {{app: one}}\n\
         spec:\n  nodeName: node1\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: two\n  namespace: {ns}\n  labels: {{app: two}}\n\
         spec:\n  nodeName: node2\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n"
    )
}

/// Underlay, nodes and routes as the lab builds them, with plain veth "pods" behind each node
/// instead of the CNI plugin: a TCP and a UDP server answer across nodes, a closed port does not.
#[test]
fn lab_plumbing_without_agent_routes_between_nodes() {
    let name = &lab::process_name("tplmb");
    lab::down(name).unwrap();
    struct Guard<'a>(&'a str);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            lab::down(self.0).unwrap();
        }
    }
    let _guard = Guard(name);
    let mut state = State {
        name: name.into(),
        index: 77,
        dir: State::dir_of(name),
        underlay_netns: topology::underlay_netns(name),
        server_bin: lab::find_bin("xtask", "WEIR_LAB_SERVER_BIN", None).unwrap(),
        ..State::default()
    };
    state.nodes = topology::plan_nodes(&state, 2);
    state.save().unwrap();
    topology::build(&state).unwrap();
    let mut endpoints = Vec::new();
    for (i, node) in state.nodes.iter().enumerate() {
        let n = i + 1;
        let pod_ns = topology::pod_netns(name, "plain", &format!("p{n}"));
        netns::add(&pod_ns).unwrap();
        netns::ip_in(
            &node.netns,
            &[
                "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
            ],
        )
        .unwrap();
        let gw = format!("10.77.{n}.254");
        let ip = format!("10.77.{n}.5");
        netns::ip_in(
            &node.netns,
            &["addr", "add", &format!("{gw}/24"), "dev", "vpod"],
        )
        .unwrap();
        netns::ip_in(&node.netns, &["link", "set", "vpod", "up"]).unwrap();
        netns::ip_in(
            &pod_ns,
            &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )
        .unwrap();
        netns::ip_in(&pod_ns, &["link", "set", "eth0", "up"]).unwrap();
        netns::ip_in(&pod_ns, &["route", "add", "default", "via", &gw]).unwrap();
        std::fs::create_dir_all(&state.dir).unwrap();
        servers::spawn(
            &state.server_bin,
            &pod_ns,
            name,
            &format!("plain/p{n}"),
            &[80],
            &state.dir.join(format!("p{n}.log")),
        )
        .unwrap();
        endpoints.push(probe::Endpoint {
            pod: format!("plain/p{n}"),
            netns: pod_ns,
            ip: ip.parse().unwrap(),
        });
    }
    let targets: Vec<(Target, IpAddr)> = endpoints
        .iter()
        .flat_map(|e| {
            [(80, Proto::Tcp), (80, Proto::Udp), (81, Proto::Tcp)]
                .map(|(port, proto)| (Target::new(&e.pod, port, proto), e.ip))
        })
        .collect();
    let options = ProbeOptions {
        timeout: Duration::from_millis(500),
        udp_attempts: 2,
        retry_within: None,
    };
    let matrix = probe::probe(&endpoints, &targets, |_, _| options);
    println!("{}", matrix.render(None));
    for (from, to) in [("plain/p1", "plain/p2"), ("plain/p2", "plain/p1")] {
        assert_eq!(
            matrix.get(from, &Target::new(to, 80, Proto::Tcp)),
            Some(true)
        );
        assert_eq!(
            matrix.get(from, &Target::new(to, 80, Proto::Udp)),
            Some(true)
        );
        assert_eq!(
            matrix.get(from, &Target::new(to, 81, Proto::Tcp)),
            Some(false)
        );
    }
    assert_eq!(
        matrix.get("plain/p1", &Target::new("plain/p1", 80, Proto::Tcp)),
        None
    );
    drop(_guard);
    nothing_left(name);
}

/// A two-node lab on the real agent and plugin: a pod on node 1 reaches a pod on node 2 and
/// back (no policy), labels and objects can be changed, and down leaves no namespace, pin,
/// process or state.
#[test]
fn lab_up_probe_down_leaves_nothing() {
    let name = &lab::process_name("tlab");
    let started = Instant::now();
    let mut lab = Lab::up(LabSpec::new(name, 2).manifest(Manifest::Yaml(two_pods("la")))).unwrap();
    println!("lab up in {:?}", started.elapsed());
    let state = lab.state().clone();
    assert_eq!(state.pods["la/one"].node, "node1");
    assert_eq!(state.pods["la/two"].node, "node2");
    let agents: Vec<u32> = state.nodes.iter().filter_map(|n| n.agent_pid).collect();
    assert_eq!(agents.len(), 2);
    assert!(
        !lab::pin_dirs(name).is_empty(),
        "the agents pin under /sys/fs/bpf/weir/{name}-*"
    );

    let spec = ProbeSpec {
        ports: Some(vec![(80, Proto::Tcp), (80, Proto::Udp)]),
        ..ProbeSpec::default()
    };
    let (matrix, diffs) = lab
        .probe_until(&spec, &lab::Expectations::all(true), Duration::from_secs(5))
        .unwrap();
    println!("{}", matrix.render(None));
    assert!(
        diffs.is_empty(),
        "{}",
        lab::matrix::render_differences(&diffs)
    );
    assert_eq!(matrix.cells.len(), 4);

    // A pod applied later is wired and served like the first ones; deleting it takes it away.
    let three = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: three\n  namespace: la\n\
                 spec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n";
    lab.apply_yaml(three).unwrap();
    let netns_three = lab.state().pods["la/three"].netns.clone();
    assert!(netns::exists(&netns_three));
    let (matrix, diffs) = lab
        .probe_until(&spec, &lab::Expectations::all(true), Duration::from_secs(5))
        .unwrap();
    assert!(diffs.is_empty(), "{}", matrix.render(None));
    assert_eq!(matrix.cells.len(), 12);
    lab.delete_yaml(three).unwrap();
    assert!(!netns::exists(&netns_three));
    assert!(!lab.pods().contains(&"la/three".to_string()));

    // The manifests directory follows label changes.
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "renamed".to_string());
    lab.set_labels("Pod", Some("la"), "two", &labels).unwrap();
    assert_eq!(lab.labels("Pod", Some("la"), "two").unwrap(), labels);

    lab.down().unwrap();
    nothing_left(name);
    for pid in agents {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "agent {pid} still running: {stat}"
        );
    }
}

/// A panic while a lab is held takes the lab down (the guard's Drop).
#[test]
fn lab_is_taken_down_when_its_holder_panics() {
    let name = &lab::process_name("tpnic");
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::up(
            LabSpec::new(name, 1).manifest(Manifest::Yaml(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: lp\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: one\n  namespace: lp\n\
             spec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n"
                    .to_string(),
            )),
        )
        .unwrap();
        assert_eq!(lab.pods(), vec!["lp/one".to_string()]);
        panic!("on purpose, with the lab up");
    });
    let payload = result.expect_err("the closure panics");
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert_eq!(
        message, "on purpose, with the lab up",
        "the lab did not come up"
    );
    nothing_left(name);
}
