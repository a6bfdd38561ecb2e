//! Control-plane timings of the mesh link, each next to a baseline measured in the same run:
//! - first sync of N exported endpoints (N/10 label sets) from one gateway to another over mTLS
//!   on loopback, until the importer has reached Synced; baseline: the same exporter → importer
//!   frames applied in memory (no TLS, no gRPC, no protobuf);
//! - a label change: the exporter replaces one label set, until the peer's import view shows it;
//!   p50/p99 over rounds. This is the link's share of "a label change in cluster A enforced on a
//!   node of cluster B"; the manifests watch, the compile and the map write on B come on top.
//!
//! `cargo run --release -p weir-mesh --example sync_bench [-- N ROUNDS]`

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, sync::mpsc};
use weir_mesh::{
    certs::MeshCa,
    confine::PeerBounds,
    export::{EndpointExport, Export, IdentityExport, endpoint_name, identity_name},
    link::{Link, PeerSpec},
    sync::{Exporter, Importer, Limits},
    tls::{self, ReloadingIdentity, TrustStore},
    transport,
};

fn exports(n: usize, generation: u32) -> BTreeMap<String, Export> {
    let mut out = BTreeMap::new();
    let sets = (n / 10).max(1);
    for s in 0..sets {
        let id = 256 + s as u32;
        out.insert(
            identity_name(id),
            Export::Identity(IdentityExport {
                id,
                namespace: format!("ns{}", s % 50),
                pod_labels: BTreeMap::from([
                    ("app".into(), format!("app{s}")),
                    (
                        "gen".into(),
                        if s == 0 {
                            generation.to_string()
                        } else {
                            "0".into()
                        },
                    ),
                ]),
                namespace_labels: BTreeMap::from([(
                    "kubernetes.io/metadata.name".into(),
                    format!("ns{}", s % 50),
                )]),
            }),
        );
    }
    for i in 0..n {
        let addr = IpAddr::from([10, 245, (i / 250) as u8, (i % 250) as u8 + 1]);
        out.insert(
            endpoint_name(&addr),
            Export::Endpoint(EndpointExport {
                addr,
                identity: 256 + (i % sets) as u32,
            }),
        );
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(10_000);
    let rounds = args.get(1).copied().unwrap_or(50);
    let limits = Limits::default();

    // Baseline: in memory.
    let start = Instant::now();
    let mut e = Exporter::new(1, 1 << 16);
    e.replace_all(exports(n, 0));
    let mut i: Importer<Export> = Importer::new();
    for f in e.catch_up(None, limits.max_delta_entries, true) {
        i.apply(&f, &limits, |_, _| Ok::<(), ()>(())).unwrap();
    }
    assert_eq!(i.entries().len(), e.entries().len());
    let in_memory = start.elapsed();

    // Over the link.
    let dir = std::env::temp_dir().join(format!("weir-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = MeshCa::new("bench").unwrap();
    let identity = |name: &str| {
        let (c, k) = ca
            .gateway("bench", name)
            .unwrap()
            .write(&dir, name)
            .unwrap();
        Arc::new(ReloadingIdentity::load(c, k, tls::provider()).unwrap())
    };
    let trust = Arc::new(TrustStore::default());
    trust.set(&BTreeMap::from([
        ("east".to_owned(), ca.pem()),
        ("west".to_owned(), ca.pem()),
    ]));
    let spec = |name: &str, prefix: &str, endpoints| PeerSpec {
        name: name.into(),
        endpoints,
        bounds: PeerBounds {
            allowed: vec![prefix.parse().unwrap()],
            ..PeerBounds::default()
        },
        stale_ttl: Duration::from_secs(600),
    };
    let (d1, _r1) = mpsc::channel(1);
    let west = Link::new("west", limits, None, d1);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = tls::server_config(identity("west"), Arc::clone(&trust), tls::provider()).unwrap();
    let service = west.service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(transport::incoming(listener, Arc::new(config))),
    );
    west.set_peers(vec![spec("east", "10.245.0.0/16", vec![])]);
    let (d2, _r2) = mpsc::channel(1);
    let east = Link::new("east", limits, None, d2);
    east.set_peers(vec![spec("west", "10.244.0.0/16", vec![addr])]);
    east.set_exports("west", exports(n, 0));
    let client = tls::client_config(identity("east"), trust, tls::provider(), "west").unwrap();
    let from_east = west.peer("east").unwrap();
    let start = Instant::now();
    tokio::spawn(Arc::clone(&east).dial(east.peer("west").unwrap(), Arc::new(client)));
    while !(from_east.is_synced() && from_east.view().endpoints.len() == n) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let first_sync = start.elapsed();

    let mut changes = Vec::new();
    for round in 1..=rounds as u32 {
        let start = Instant::now();
        east.set_exports("west", exports(n, round));
        let want = round.to_string();
        while from_east
            .view()
            .identities
            .get(&256)
            .map(|i| &i.pod_labels["gen"])
            != Some(&want)
        {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        changes.push(start.elapsed());
    }
    changes.sort();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "mesh sync bench: {n} endpoints, {} label sets",
        (n / 10).max(1)
    );
    println!(
        "  first sync over mTLS: {:.1} ms (in-memory baseline {:.1} ms, {:.1}x)",
        first_sync.as_secs_f64() * 1e3,
        in_memory.as_secs_f64() * 1e3,
        first_sync.as_secs_f64() / in_memory.as_secs_f64()
    );
    println!(
        "  label change to the peer's import ({rounds} rounds): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&changes, 0.5).as_secs_f64() * 1e3,
        percentile(&changes, 0.99).as_secs_f64() * 1e3
    );
}
