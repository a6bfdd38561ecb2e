//! The standalone contract, driven exactly as the README documents it: a manifests directory, the
//! agent run with `nsenter --net` in a node namespace, `weir-cni` run with the CNI environment and
//! the documented conflist, real TCP between pod namespaces. Root only; never skipped.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use weir_tests::applied::{APPLY_TIMEOUT, wait_applied};
use weir_tests::tcp::{PORT, connects, eventually_connects, serve};
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef, first_address},
    netns::{Netns, run, spawn_in},
};

const NODE: &str = "n1";

fn namespace(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n")
}

fn pod(ns: &str, name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {app}}}\n\
         spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - containerPort: {PORT}\n      name: web\n"
    )
}

/// Ingress to app=server only from app=client, on the named port.
fn policy(ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-client\n  namespace: {ns}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: client}}}}\n    ports:\n    - port: web\n"
    )
}

/// Ingress to app=server only from namespaces labelled team=blue.
fn policy_by_namespace(ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-from-blue\n  namespace: {ns}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{team: blue}}}}\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

/// Waits (the contract: within 1 s) until `from` → `to` reaches `want`.
fn eventually(from: &Netns, to: IpAddr, want: bool, what: &str, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if connects(from, to) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {} within 1 s; agent log:\n{}",
            if want { "allowed" } else { "denied" },
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not seen; agent log:\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's /metrics, from inside the node's namespace (it listens on 127.0.0.1:9876).
fn metrics(node: &Netns) -> String {
    spawn_in(node.path(), || {
        let Ok(mut s) = TcpStream::connect("127.0.0.1:9876") else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .join()
    .unwrap()
}

/// The agent's resident set size.
fn rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn the_documented_standalone_contract_holds() {
    let node = Netns::new("sc");
    let dirs = AgentDirs::new("sc", NODE);
    let m = &dirs.manifests;
    write(m, "ns.yaml", &namespace("app", "team: red"));
    write(m, "client-ns.yaml", &namespace("other", "team: blue"));
    write(m, "client.yaml", &pod("app", "client", "client"));
    write(m, "intruder.yaml", &pod("app", "intruder", "intruder"));
    write(m, "server.yaml", &pod("app", "server", "server"));
    write(m, "blue.yaml", &pod("other", "blue", "blue"));
    let agent = Agent::start(
        &node,
        NODE,
        &dirs,
        &["--pod-cidr", "10.210.1.0/24", "--pod-wait-seconds", "2"],
    );
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let status_pod = PodRef {
        container_id: "status",
        namespace: "",
        name: "",
        netns: &node.name,
    };
    plugin.ok("STATUS", &status_pod);

    let pods: Vec<(&str, &str, Netns)> = [
        ("app", "client"),
        ("app", "intruder"),
        ("app", "server"),
        ("other", "blue"),
    ]
    .into_iter()
    .map(|(ns, name)| (ns, name, Netns::new(&format!("sc{}", &name[..3]))))
    .collect();
    let mut ips = Vec::new();
    for (ns, name, netns) in &pods {
        let id = format!("ctr-{name}");
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &id,
                namespace: ns,
                name,
                netns: &netns.name,
            },
        );
        ips.push(first_address(&out));
    }
    let (client, intruder, server, blue) = (&pods[0].2, &pods[1].2, &pods[2].2, &pods[3].2);
    let server_ip = ips[2];
    serve(server, server_ip);
    assert!(
        eventually_connects(client, server_ip),
        "no policy: client reaches server"
    );
    assert!(
        eventually_connects(intruder, server_ip),
        "no policy: intruder reaches server"
    );

    // Dotfiles and editor leftovers are ignored; a rename into place is picked up. A manifest
    // written after them is applied by a scan that saw them too: once it is, they have had
    // every chance to take effect.
    write(m, ".policy.yaml", &policy("app"));
    write(m, "policy.yaml.swp", &policy("app"));
    write(m, "policy.yaml~", &policy("app"));
    write(m, "marker.yaml", &namespace("marker", "team: none"));
    wait_applied(&dirs.socket, &dirs.manifests, APPLY_TIMEOUT);
    assert!(
        eventually_connects(intruder, server_ip),
        "ignored files must not apply"
    );
    std::fs::rename(m.join(".policy.yaml"), m.join("policy.yaml")).unwrap();
    eventually(
        intruder,
        server_ip,
        false,
        "policy renamed into the directory",
        &agent,
    );
    assert!(
        eventually_connects(client, server_ip),
        "the policy allows the client (named port)"
    );
    assert!(!connects(blue, server_ip), "blue is not app=client");

    // An invalid policy beside it is rejected and harms nothing else.
    serve(client, ips[0]);
    eventually(
        intruder,
        ips[0],
        true,
        "the client is not isolated yet",
        &agent,
    );
    write(
        m,
        "broken.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: broken\n  namespace: app\n\
         spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n",
    );
    wait_until(
        "the rejection's log line, naming the policy",
        &agent,
        || {
            agent.log_text().contains("rejected NetworkPolicy")
                && agent.log_text().contains("broken")
        },
    );
    wait_until("the metric to count the rejection", &agent, || {
        metrics(&node).contains("weir_rejected_policies 1\n")
    });
    assert!(eventually_connects(client, server_ip) && !connects(intruder, server_ip));
    // Fail closed: it selects every pod of `app` for ingress and allows nothing, so the client
    // (otherwise not isolated) is no longer reachable.
    eventually(
        intruder,
        ips[0],
        false,
        "the rejected policy still isolates what it selects",
        &agent,
    );

    // Objects the API server would refuse: a 20 MB label value (the file is refused before it
    // is parsed: the agent does not grow) and a Pod with an invalid label (never wired).
    let rss_before = rss_kib(&agent);
    let huge = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: huge\n  labels:\n    x: {}\n",
        "v".repeat(20_000_000)
    );
    // Renamed into place, so the agent never reads it half written.
    write(m, ".huge.yaml", &huge);
    drop(huge);
    std::fs::rename(m.join(".huge.yaml"), m.join("huge.yaml")).unwrap();
    wait_until("the huge file's rejection", &agent, || {
        agent.log_text().contains("a manifest file may have")
    });
    let rss_after = rss_kib(&agent);
    eprintln!("agent RSS around a refused 20 MB manifest: {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the agent's RSS grew from {rss_before} KiB to {rss_after} KiB on a refused 20 MB file"
    );
    std::fs::remove_file(m.join("huge.yaml")).unwrap();

    // Namespace labels take effect without a policy change.
    write(m, "policy2.yaml", &policy_by_namespace("app"));
    eventually(
        blue,
        server_ip,
        true,
        "namespace other has team=blue",
        &agent,
    );
    write(m, "client-ns.yaml", &namespace("other", "team: green"));
    eventually(
        blue,
        server_ip,
        false,
        "team label changed to green",
        &agent,
    );

    // Deleting the file deletes its objects.
    std::fs::remove_file(m.join("policy.yaml")).unwrap();
    std::fs::remove_file(m.join("policy2.yaml")).unwrap();
    std::fs::remove_file(m.join("broken.yaml")).unwrap();
    eventually(intruder, server_ip, true, "policies deleted", &agent);

    // The Pod object may come after ADD started: ADD waits for it.
    let late = Netns::new("sclate");
    let writer_dir = m.clone();
    let later = thread::spawn(move || {
        thread::sleep(Duration::from_millis(400));
        write(&writer_dir, "late.yaml", &pod("app", "late", "client"));
    });
    let late_pod = PodRef {
        container_id: "ctr-late",
        namespace: "app",
        name: "late",
        netns: &late.name,
    };
    plugin.ok("ADD", &late_pod);
    later.join().unwrap();

    // CHECK looks at the kernel: with the programs taken off the pod's host veth it fails and
    // says why; DEL still cleans up.
    plugin.ok("CHECK", &late_pod);
    let late_veth = weir_proto::naming::host_veth_name("ctr-late", "eth0");
    run(
        "tc",
        &[
            "-n", &node.name, "qdisc", "del", "dev", &late_veth, "clsact",
        ],
    );
    let (out, _) = plugin.run("CHECK", &late_pod);
    assert!(
        !out.status.success(),
        "CHECK passed without programs on {late_veth}"
    );
    let err: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or("")
            .contains("not in the datapath"),
        "CHECK should say the enforcement is missing: {err}"
    );
    plugin.ok("DEL", &late_pod);

    // A Pod that never comes: code 11 after the bound.
    let never = Netns::new("scnever");
    let (out, took) = plugin.run(
        "ADD",
        &PodRef {
            container_id: "ctr-never",
            namespace: "app",
            name: "never",
            netns: &never.name,
        },
    );
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert_eq!(
        err["code"], 11,
        "unknown Pod must be 'try again later': {err}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "ADD should wait for the Pod object"
    );

    // A Pod whose manifest the API server would refuse is rejected, so it cannot be wired
    // (rather than run unenforced).
    write(
        m,
        "badpod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: badpod\n  namespace: app\n  labels: {app: 'not a label value!'}\nspec:\n  nodeName: n1\n",
    );
    wait_until("the bad Pod's rejection", &agent, || {
        agent.log_text().contains("Pod `badpod`")
    });
    let bad = Netns::new("scbad");
    let (out, _) = plugin.run(
        "ADD",
        &PodRef {
            container_id: "ctr-bad",
            namespace: "app",
            name: "badpod",
            netns: &bad.name,
        },
    );
    assert!(!out.status.success(), "a rejected Pod must not be wired");
    let err: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert_eq!(err["code"], 11, "{err}");

    // SIGTERM leaves enforcement in place.
    write(m, "policy.yaml", &policy("app"));
    eventually(intruder, server_ip, false, "policy back", &agent);
    assert!(agent.stop(Signal::SIGTERM).success());
    assert!(
        !connects(intruder, server_ip),
        "after SIGTERM the policy is still enforced"
    );
    assert!(
        eventually_connects(client, server_ip),
        "after SIGTERM allowed traffic still flows"
    );
}

/// What the agent logs when a CNI ADD or DEL changed only that pod's entries (compiled in place).
const IN_PLACE: &str = "local endpoints compiled in place";

/// A CNI ADD or DEL of a pod whose Pod names this node changes only that pod's entries in the
/// maps (compiled in place, not the whole cluster), and is enforced when ADD returns: the pod's
/// first packet meets its policy, and so do the packets of its next sandbox.
#[test]
fn adds_and_dels_of_this_nodes_pods_are_compiled_in_place_and_enforced() {
    let node = Netns::new("sci");
    let dirs = AgentDirs::new("sci", NODE);
    let m = &dirs.manifests;
    write(m, "ns.yaml", &namespace("app", "team: red"));
    write(m, "client.yaml", &pod("app", "client", "client"));
    write(m, "intruder.yaml", &pod("app", "intruder", "intruder"));
    write(m, "server.yaml", &pod("app", "server", "server"));
    write(m, "policy.yaml", &policy("app"));
    let agent = Agent::start(&node, NODE, &dirs, &["--pod-cidr", "10.210.2.0/24"]);
    wait_applied(&dirs.socket, &dirs.manifests, APPLY_TIMEOUT);
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let in_place = || agent.log_text().matches(IN_PLACE).count();
    // Runs `verb` (one round of the agent each) and waits for its in-place line.
    let verb = |verb: &str, container_id: &str, name: &str, netns: &Netns| {
        let before = in_place();
        let pod = PodRef {
            container_id,
            namespace: "app",
            name,
            netns: &netns.name,
        };
        let (out, _) = plugin.ok(verb, &pod);
        wait_until(&format!("{verb} {name} compiled in place"), &agent, || {
            in_place() > before
        });
        out
    };
    let (client, intruder, server) = (
        Netns::new("scicl"),
        Netns::new("sciin"),
        Netns::new("scisv"),
    );
    verb("ADD", "ctr-client", "client", &client);
    verb("ADD", "ctr-intruder", "intruder", &intruder);
    let server_ip = first_address(&verb("ADD", "ctr-server", "server", &server));
    serve(&server, server_ip);
    // Enforced when ADD returned: the intruder is refused from its first packet on.
    assert!(
        !connects(&intruder, server_ip),
        "the intruder reached the server right after ADD; agent log:\n{}",
        agent.log_text()
    );
    assert!(
        eventually_connects(&client, server_ip),
        "the policy admits the client"
    );

    // DEL, then the pod's next sandbox at a new address: enforced as well.
    verb("DEL", "ctr-server", "server", &server);
    let next = Netns::new("scisv2");
    let next_ip = first_address(&verb("ADD", "ctr-server-2", "server", &next));
    assert_ne!(next_ip, server_ip);
    serve(&next, next_ip);
    assert!(
        !connects(&intruder, next_ip),
        "the intruder reached the server's next sandbox; agent log:\n{}",
        agent.log_text()
    );
    assert!(
        eventually_connects(&client, next_ip),
        "the policy admits the client"
    );
}
