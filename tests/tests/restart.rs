//! Restart safety (design guarantee 4): SIGKILL of the agent under steady traffic drops no
//! established connection and opens no bypass; a new agent adopts the pinned maps and programs
//! and reconciles before it changes anything. The client is isolated for ingress, so a flow
//! where only the server speaks lives on its conntrack entry alone: without it, the server's
//! packets would meet the client's ingress policy as a new connection, and be dropped. Root
//! only; never skipped.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use weir_lab::lab::{self, Lab, LabSpec, Manifest};
use weir_tests::netns::{self, spawn_in};

const ECHO_PORT: u16 = 9000;
const PUSH_PORT: u16 = 9001;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: rs}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: rs, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: rs, labels: {app: intruder}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: rs, labels: {app: server}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: rs, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: servers-from-client, namespace: rs}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {port: 9000}, {port: 9001}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-isolated, namespace: rs}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
"#;

/// Counters shared by the traffic threads.
#[derive(Default)]
struct Tally {
    /// Round trips on long-lived connections that succeeded / failed (reset, timeout).
    echoes: AtomicU64,
    echo_failures: AtomicU64,
    /// Lines received on server-push connections / push connections that broke.
    pushed: AtomicU64,
    push_failures: AtomicU64,
    /// New connections from the client that succeeded / failed.
    requests: AtomicU64,
    request_failures: AtomicU64,
    /// Connections from the intruder that got through (must stay 0).
    bypasses: AtomicU64,
    intruder_attempts: AtomicU64,
}

/// An echo server on ECHO_PORT inside a pod: one line back per line in.
fn echo_server(pod_netns: String, ip: IpAddr) {
    spawn_in(netns::path(&pod_netns), move || {
        let listener = TcpListener::bind((ip, ECHO_PORT)).expect("binding the echo server");
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut writer = stream.try_clone().expect("clone");
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(writer, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A push server on PUSH_PORT inside a pod: a line every 5 ms to whoever connects, until the
/// connection breaks.
fn push_server(pod_netns: String, ip: IpAddr) {
    spawn_in(netns::path(&pod_netns), move || {
        let listener = TcpListener::bind((ip, PUSH_PORT)).expect("binding the push server");
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                while writeln!(stream, "tick").is_ok() {
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
    });
}

/// Who speaks on a long-lived connection.
#[derive(Clone, Copy)]
enum Flow {
    /// The client sends a line every 5 ms and reads it back from the echo server.
    Echo,
    /// Only the push server speaks, a line every 5 ms.
    Push,
}

/// A long-lived connection of `flow` until `stop`; it counts each line read, and ends at the
/// first that does not come.
fn long_lived(
    client_netns: String,
    to: SocketAddr,
    flow: Flow,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    spawn_in(netns::path(&client_netns), move || {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .expect("connecting a long-lived flow");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let (lines, failures) = match flow {
            Flow::Echo => (&tally.echoes, &tally.echo_failures),
            Flow::Push => (&tally.pushed, &tally.push_failures),
        };
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            line.clear();
            let sent = match flow {
                Flow::Echo => writeln!(writer, "ping").is_ok(),
                Flow::Push => true,
            };
            if sent && reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                lines.fetch_add(1, Ordering::Relaxed);
            } else {
                failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Flow::Echo = flow {
                thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

/// New connections every 20 ms; `allowed` says whether they should get through.
fn requests(
    netns_name: String,
    to: SocketAddr,
    allowed: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    spawn_in(netns::path(&netns_name), move || {
        while !stop.load(Ordering::Relaxed) {
            let timeout = if allowed {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(200)
            };
            let connected = TcpStream::connect_timeout(&to, timeout).is_ok();
            match (allowed, connected) {
                (true, true) => tally.requests.fetch_add(1, Ordering::Relaxed),
                (true, false) => tally.request_failures.fetch_add(1, Ordering::Relaxed),
                (false, true) => tally.bypasses.fetch_add(1, Ordering::Relaxed),
                (false, false) => tally.intruder_attempts.fetch_add(1, Ordering::Relaxed),
            };
            thread::sleep(Duration::from_millis(20));
        }
    })
}

#[test]
fn sigkill_of_the_agent_drops_nothing_and_opens_nothing() {
    let mut lab = Lab::up(
        LabSpec::new(&lab::process_name("trest"), 2).manifest(Manifest::Yaml(CLUSTER.to_owned())),
    )
    .expect("lab up");
    let pod_netns = |name: &str| lab.state().pods[&format!("rs/{name}")].netns.clone();
    let local = lab.pod_ip("rs/local").unwrap();
    let remote = lab.pod_ip("rs/remote").unwrap();
    for (pod, ip) in [("local", local), ("remote", remote)] {
        echo_server(pod_netns(pod), ip);
        push_server(pod_netns(pod), ip);
    }
    thread::sleep(Duration::from_millis(200));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads = Vec::new();
    for server in [local, remote] {
        for _ in 0..2 {
            threads.push(long_lived(
                pod_netns("client"),
                (server, ECHO_PORT).into(),
                Flow::Echo,
                stop.clone(),
                tally.clone(),
            ));
        }
        threads.push(long_lived(
            pod_netns("client"),
            (server, PUSH_PORT).into(),
            Flow::Push,
            stop.clone(),
            tally.clone(),
        ));
        threads.push(requests(
            pod_netns("client"),
            (server, 80).into(),
            true,
            stop.clone(),
            tally.clone(),
        ));
        threads.push(requests(
            pod_netns("intruder"),
            (server, 80).into(),
            false,
            stop.clone(),
            tally.clone(),
        ));
    }

    thread::sleep(Duration::from_secs(1));
    let before_kill = tally.echoes.load(Ordering::Relaxed);
    lab.kill_agent("node1").expect("SIGKILL the agent of node1");
    // Enforcement without an agent: the pinned programs and maps keep working.
    thread::sleep(Duration::from_secs(2));
    let while_dead = tally.echoes.load(Ordering::Relaxed) - before_kill;
    lab.start_agent("node1")
        .expect("restart the agent of node1");
    let pushed_at_restart = tally.pushed.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a traffic thread panicked");
    }

    let log = lab.agent_log("node1", 40);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert!(
        while_dead > 100,
        "long-lived flows stalled while the agent was dead ({while_dead} round trips)"
    );
    assert_eq!(
        get(&tally.echo_failures),
        0,
        "an established connection broke across the restart; agent log:\n{log}"
    );
    assert_eq!(
        get(&tally.push_failures),
        0,
        "a connection where only the server speaks broke across the restart; agent log:\n{log}"
    );
    assert!(
        get(&tally.pushed) > pushed_at_restart + 100,
        "the server-push flows stalled after the restart"
    );
    assert_eq!(
        get(&tally.request_failures),
        0,
        "new allowed connections failed across the restart; agent log:\n{log}"
    );
    assert_eq!(
        get(&tally.bypasses),
        0,
        "a denied flow got through across the restart; agent log:\n{log}"
    );
    assert!(
        get(&tally.requests) > 50 && get(&tally.intruder_attempts) > 10,
        "too little traffic to judge"
    );
    assert!(
        log.contains("adopted endpoint"),
        "the new agent did not adopt the endpoints; log:\n{log}"
    );
}
