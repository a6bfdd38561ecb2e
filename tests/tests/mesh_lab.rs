//! The mesh lab (`cargo xtask lab up --cluster ...`, `cargo xtask demo mesh`): two clusters of
//! namespaces on the real agents and weir-cni, joined only gateway to gateway through a WAN
//! namespace. Checked: workers of different clusters have no route to each other, pods of every
//! node reach the other cluster's pods (through both gateways), a capture on the WAN while a known
//! payload crosses both ways finds only TLS to the mesh port and never the payload (which a
//! capture in the receiving pod does see in clear), and `down` leaves nothing, also when building
//! the second cluster fails. Root only; never skipped.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use weir_lab::lab::{
    self, Expectations, Manifest, Proto, Target,
    mesh::{ClusterSpec, MESH_PORT, MeshLab, MeshSpec},
    state::State,
    wan_capture::WanCapture,
};
use weir_lab::netns;

/// A name unique to this process (test binaries run side by side with other helpers' labs).
fn lab_name(tag: char) -> String {
    format!("{tag}{}", std::process::id())
}

/// Namespace `app` (exported), a pod on the gateway (node1) and one on the worker (node2).
fn cluster(name: &str, extra: &str) -> ClusterSpec {
    let pod = |pod: &str, node: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: app, labels: {{app: {pod}}}}}\n\
             spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - containerPort: 8080\n"
        )
    };
    ClusterSpec {
        name: name.into(),
        nodes: 2,
        gateways: 1,
        manifests: vec![Manifest::Yaml(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{mesh.weir.io/export: 'true'}}}}\n{}{}{extra}",
            pod("gw", "node1"),
            pod("wk", "node2"),
        ))],
    }
}

fn nothing_left(name: &str, clusters: &[&str]) {
    let mut labs = vec![name.to_string()];
    labs.extend(clusters.iter().map(|c| format!("{name}{c}")));
    for l in &labs {
        assert_eq!(
            netns::list(&format!("wl-{l}-")),
            Vec::<String>::new(),
            "namespaces of {l} left behind"
        );
        assert!(lab::pin_dirs(l).is_empty(), "bpffs pins of {l} left behind");
        assert!(
            !State::dir_of(l).exists(),
            "state directory of {l} left behind"
        );
    }
}

#[test]
fn mesh_lab_joins_clusters_only_through_gateways_and_the_wan_carries_only_tls() {
    let name = lab_name('m');
    let mut mesh = MeshLab::up(MeshSpec {
        name: name.clone(),
        clusters: vec![cluster("west", ""), cluster("east", "")],
        extra_ports: Vec::new(),
        capture_wan: true,
    })
    .unwrap();

    // A worker of west has no route to east's nodes, neither their underlay nor the WAN.
    let west = mesh.cluster("west").unwrap();
    let east = mesh.cluster("east").unwrap();
    let west_worker = west.state().node("node2").unwrap().netns.clone();
    for target in [
        east.state().node("node2").unwrap().underlay_ip.clone(),
        east.state().node("node1").unwrap().underlay_ip.clone(),
        mesh.state().cluster("east").unwrap().wan_ip.clone(),
    ] {
        let addr: SocketAddr = format!("{target}:{MESH_PORT}").parse().unwrap();
        let error = netns::run_in(&west_worker, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(|_| ())
        })
        .unwrap()
        .expect_err("a west worker reached east");
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::NetworkUnreachable,
            "{target}: {error}"
        );
    }

    // Every pod reaches every pod of the other cluster: gateway and worker, both ways.
    let mut all = Expectations::default();
    for from in ["west", "east"] {
        let to = if from == "west" { "east" } else { "west" };
        for a in ["gw", "wk"] {
            for b in ["gw", "wk"] {
                all.set(
                    &format!("{from}/app/{a}"),
                    Target::new(&format!("{to}/app/{b}"), 8080, Proto::Tcp),
                    true,
                );
            }
        }
    }
    let (matrix, diffs) = mesh.probe_until(&all, Duration::from_secs(30)).unwrap();
    assert!(diffs.is_empty(), "{}\n{diffs:?}", matrix.render(Some(&all)));

    // A marker crosses worker to worker both ways, over TCP and UDP.
    let capture = mesh.take_capture().expect("the WAN capture runs");
    let marker = format!(
        "weir-test-marker-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    );
    let sends = [
        ("west/app/wk", Target::new("east/app/wk", 8080, Proto::Tcp)),
        ("east/app/wk", Target::new("west/app/wk", 8080, Proto::Udp)),
    ];
    let at_pods: Vec<WanCapture> = sends
        .iter()
        .map(|(_, to)| WanCapture::start(&mesh.pod_netns(&to.pod).unwrap()).unwrap())
        .collect();
    for (from, to) in &sends {
        assert!(
            mesh.send_marker(from, to, marker.as_bytes()).unwrap(),
            "{from} -> {to:?}: no answer"
        );
    }
    let report = capture
        .stop()
        .unwrap()
        .analyse(MESH_PORT, marker.as_bytes());
    for (capture, (_, to)) in at_pods.into_iter().zip(&sends) {
        assert!(
            capture.stop().unwrap().frames_containing(marker.as_bytes()) > 0,
            "the capture in {} missed the marker, so the WAN capture would prove nothing",
            to.pod
        );
    }
    assert_eq!(
        report.problems(),
        Vec::<String>::new(),
        "{}",
        report.summary()
    );
    assert!(
        report
            .streams
            .iter()
            .filter(|s| s.saw_syn)
            .all(|s| s.from.unwrap().port() == MESH_PORT || s.to.unwrap().port() == MESH_PORT),
        "{}",
        report.summary()
    );

    mesh.down().unwrap();
    nothing_left(&name, &["west", "east"]);
}

#[test]
fn a_mesh_lab_that_fails_to_build_leaves_nothing_behind() {
    let name = lab_name('f');
    // East's pod asks for a node the cluster does not have: west is built, then east fails.
    let bad = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: app}\n\
               spec: {nodeName: node9}\n";
    let error = MeshLab::up(MeshSpec {
        name: name.clone(),
        clusters: vec![cluster("west", ""), cluster("east", bad)],
        extra_ports: Vec::new(),
        capture_wan: false,
    })
    .err()
    .expect("a pod on a missing node fails the lab");
    assert!(format!("{error:#}").contains("node9"), "{error:#}");
    nothing_left(&name, &["west", "east"]);

    // And `lab down` of a mesh takes its clusters too, from another process's point of view.
    let mesh = MeshLab::up(MeshSpec {
        name: name.clone(),
        clusters: vec![cluster("west", ""), cluster("east", "")],
        extra_ports: Vec::new(),
        capture_wan: false,
    })
    .unwrap();
    mesh.keep();
    assert!(netns::exists(&format!("wl-{name}west-node2")));
    lab::down(&name).unwrap();
    nothing_left(&name, &["west", "east"]);
}
