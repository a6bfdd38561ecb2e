//! A gateway's merged import served to the other nodes of its cluster (`MeshImport.Watch`) over
//! real gRPC on loopback (no root): a node follows the gateway's import through changes, only the
//! cluster's Node addresses may watch, a node refuses whole an import that names a peer it does
//! not know or an address its MeshPeer does not allow (counted by reason), and what it holds
//! survives its restart.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use weir_mesh::{
    confine::{PeerBounds, Refusal},
    export::IdentityExport,
    fanout::{ImportServer, ImportWatcher, check_entry, merged_entries},
    link::ImportView,
    sync::Limits,
};
use weir_proto::mesh::v1::{self as pb, mesh_import_client::MeshImportClient};

fn view(cluster: &str, endpoints: &[(&str, u32)]) -> Arc<ImportView> {
    let identities = endpoints
        .iter()
        .map(|(_, id)| {
            (
                *id,
                IdentityExport {
                    id: *id,
                    namespace: "pay".into(),
                    pod_labels: BTreeMap::from([("app".into(), format!("a{id}"))]),
                    namespace_labels: BTreeMap::from([("team".into(), "pay".into())]),
                },
            )
        })
        .collect();
    Arc::new(ImportView {
        cluster: cluster.into(),
        identities,
        endpoints: endpoints
            .iter()
            .map(|(a, id)| (a.parse().unwrap(), *id))
            .collect::<HashMap<IpAddr, u32>>(),
    })
}

fn east_bounds() -> BTreeMap<String, PeerBounds> {
    BTreeMap::from([(
        "east".to_owned(),
        PeerBounds {
            allowed: vec!["10.245.0.0/16".parse().unwrap()],
            ours: vec!["10.244.0.0/16".parse().unwrap()],
            third: vec![],
        },
    )])
}

async fn serve(server: &Arc<ImportServer>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = server.service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn endpoints_of(watcher: &ImportWatcher) -> Vec<(String, IpAddr)> {
    let mut out: Vec<_> = watcher
        .views()
        .iter()
        .flat_map(|v| v.endpoints.keys().map(|a| (v.cluster.clone(), *a)))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_node_follows_its_gateways_import_and_restores_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ImportServer::new(Limits::default());
    server.set_watchers(["127.0.0.1".parse().unwrap()].into());
    server.publish(&[view("east", &[("10.245.0.5", 300)])]);
    let addr = serve(&server).await;

    let path = dir.path().join("mesh-import.json");
    let watcher = ImportWatcher::restore("n2", Some(path.clone()), Limits::default());
    watcher.set_peers(east_bounds());
    let (gateways, rx) = watch::channel(vec![addr]);
    let task = tokio::spawn(Arc::clone(&watcher).run(rx));
    eventually("the first snapshot arrives", || {
        watcher.is_synced() && endpoints_of(&watcher).len() == 1
    })
    .await;
    assert!(watcher.is_connected());

    // Changes follow as deltas.
    server.publish(&[view("east", &[("10.245.0.5", 300), ("10.245.0.6", 301)])]);
    eventually("an added endpoint arrives", || {
        endpoints_of(&watcher).len() == 2
    })
    .await;
    server.publish(&[view("east", &[("10.245.0.6", 301)])]);
    eventually("a removed endpoint goes", || {
        endpoints_of(&watcher) == vec![("east".into(), "10.245.0.6".parse().unwrap())]
    })
    .await;

    // The MeshPeer removed on this node: its import is no longer enforced by, at once.
    watcher.set_peers(BTreeMap::new());
    assert!(watcher.views().is_empty());
    watcher.set_peers(east_bounds());

    // A restart: the node holds what it held before it talks to anyone.
    task.abort();
    drop(gateways);
    let restarted = ImportWatcher::restore("n2", Some(path), Limits::default());
    restarted.set_peers(east_bounds());
    assert_eq!(
        endpoints_of(&restarted),
        vec![("east".into(), "10.245.0.6".parse().unwrap())]
    );
    assert!(!restarted.is_synced(), "restored, not yet synced");
}

#[tokio::test]
async fn only_the_clusters_nodes_may_watch() {
    let server = ImportServer::new(Limits::default());
    server.set_watchers(["192.0.2.7".parse().unwrap()].into());
    server.publish(&[view("east", &[("10.245.0.5", 300)])]);
    let addr = serve(&server).await;
    let mut client = MeshImportClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let hello = pb::SyncFrame {
        kind: Some(pb::sync_frame::Kind::Hello(pb::Hello {
            protocol_version: weir_mesh::link::PROTOCOL_VERSION,
            ..Default::default()
        })),
    };
    let err = client
        .watch(futures::stream::iter([hello]))
        .await
        .expect_err("127.0.0.1 is not a Node's InternalIP here");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
}

#[tokio::test]
async fn a_node_refuses_an_import_its_meshpeers_do_not_allow_whole() {
    let server = ImportServer::new(Limits::default());
    server.set_watchers(["127.0.0.1".parse().unwrap()].into());
    let addr = serve(&server).await;
    let watcher = ImportWatcher::restore("n2", None, Limits::default());
    watcher.set_peers(east_bounds());
    let (_gateways, rx) = watch::channel(vec![addr]);
    tokio::spawn(Arc::clone(&watcher).run(rx));

    // A good endpoint next to one inside our own prefixes: nothing of the snapshot applies.
    server.publish(&[view("east", &[("10.245.0.5", 300), ("10.244.0.9", 301)])]);
    let refused = |peer: &str, reason: Refusal| {
        watcher
            .refusals()
            .iter()
            .find(|(p, _)| p == peer)
            .map_or(0, |(_, c)| c.get(reason))
    };
    eventually("the address of ours is refused", || {
        refused("east", Refusal::AddressOurs) > 0
    })
    .await;
    assert!(endpoints_of(&watcher).is_empty(), "nothing applied");

    // A peer this node has no MeshPeer for.
    server.publish(&[view("mallory", &[("10.245.0.5", 300)])]);
    eventually("the unknown peer is refused", || {
        refused("-", Refusal::UnknownPeer) > 0
    })
    .await;
    assert!(endpoints_of(&watcher).is_empty(), "nothing applied");

    // Once the gateway serves only what this node allows, the next session takes it.
    server.publish(&[view("east", &[("10.245.0.5", 300)])]);
    eventually("the honest import arrives", || {
        endpoints_of(&watcher).len() == 1 && watcher.is_synced()
    })
    .await;
}

#[test]
fn merged_entries_are_checked_by_the_peer_they_name() {
    let entries = merged_entries(&[view("east", &[("10.245.0.5", 300)])]);
    let bounds = east_bounds();
    for (name, e) in &entries {
        assert!(name.starts_with("east/"), "{name}");
        assert_eq!(check_entry(name, e, &bounds), Ok(()), "{name}");
        let inner = name.strip_prefix("east/").unwrap();
        assert_eq!(
            check_entry(inner, e, &bounds),
            Err(Refusal::UnknownPeer),
            "an entry without its peer's name: {inner}"
        );
    }
}
