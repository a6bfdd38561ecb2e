//! Two gateways' mesh links over real mTLS on loopback (no root): exports reach the peer and
//! follow changes, packets cross with their identity checked, and an evil peer with a valid
//! certificate is refused everything that is not its own, counted by reason, while the honest
//! peer's import stays untouched; every lane of a replaced dial or a removed peer ends; the
//! latency lane carries packets both ways and its queue is bounded; a gateway that goes silent
//! leaves the set that carries traffic, and a lane's batches count as hearing from it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use tokio::{net::TcpListener, sync::mpsc};
use weir_mesh::{
    certs::MeshCa,
    codec::{GSO_TCPV4, Offload, VNET_F_NEEDS_CSUM, encode_record, encode_record_with},
    confine::{PeerBounds, Refusal},
    export::{EndpointExport, Export, IdentityExport, endpoint_name, identity_name},
    lanes::Lane,
    link::{Link, PeerSpec},
    sync::Limits,
    tls::{self, ReloadingIdentity, TrustStore},
    transport,
};
use weir_proto::mesh::v1::{self as pb, mesh_link_client::MeshLinkClient};

const EAST_PODS: &str = "10.245.0.0/16";
const WEST_PODS: &str = "10.244.0.0/16";
const MALLORY_PODS: &str = "10.247.0.0/16";

struct Gateway {
    link: Arc<Link>,
    addr: SocketAddr,
    delivered: mpsc::Receiver<Bytes>,
    identity: Arc<ReloadingIdentity>,
    trust: Arc<TrustStore>,
}

struct Lab {
    dir: tempfile::TempDir,
    ca: MeshCa,
}

impl Lab {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            ca: MeshCa::new("mesh").unwrap(),
        }
    }

    fn identity(&self, cluster: &str) -> Arc<ReloadingIdentity> {
        let cert = self.ca.gateway("mesh.test", cluster).unwrap();
        let (c, k) = cert.write(self.dir.path(), cluster).unwrap();
        Arc::new(ReloadingIdentity::load(c, k, tls::provider()).unwrap())
    }

    /// A gateway of `cluster` with pods in `ours`, knowing `peers` (name, prefix).
    /// West's gateway, peered with east and with mallory (whose valid certificate `Evil`
    /// uses to attack west).
    async fn west_with_mallory(&self, limits: Limits) -> Gateway {
        self.gateway(
            "west",
            WEST_PODS,
            &[("east", EAST_PODS), ("mallory", MALLORY_PODS)],
            limits,
        )
        .await
    }

    async fn gateway(
        &self,
        cluster: &str,
        ours: &str,
        peers: &[(&str, &str)],
        limits: Limits,
    ) -> Gateway {
        let identity = self.identity(cluster);
        let trust = Arc::new(TrustStore::default());
        let bundles: BTreeMap<String, String> = peers
            .iter()
            .map(|(p, _)| ((*p).to_owned(), self.ca.pem()))
            .collect();
        assert!(trust.set(&bundles).is_empty());
        let (deliver, delivered) = mpsc::channel(1024);
        let state_dir = self.dir.path().join(format!("state-{cluster}"));
        let link = Link::new(cluster, limits, Some(state_dir), deliver);
        link.set_local_pod_prefixes(vec![ours.parse().unwrap()]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config =
            tls::server_config(Arc::clone(&identity), Arc::clone(&trust), tls::provider()).unwrap();
        let incoming = transport::incoming(listener, Arc::new(config));
        let service = link.service();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        let specs = peers
            .iter()
            .map(|(name, prefix)| PeerSpec {
                name: (*name).to_owned(),
                endpoints: vec![],
                bounds: PeerBounds {
                    allowed: vec![prefix.parse().unwrap()],
                    ours: vec![ours.parse().unwrap()],
                    third: peers
                        .iter()
                        .filter(|(n, _)| n != name)
                        .map(|(_, p)| p.parse().unwrap())
                        .collect(),
                },
                stale_ttl: Duration::from_secs(600),
            })
            .collect();
        link.set_peers(specs);
        Gateway {
            link,
            addr,
            delivered,
            identity,
            trust,
        }
    }

    /// `from` dials `to`.
    fn connect(&self, from: &Gateway, to: &Gateway, to_name: &str) {
        let config = tls::client_config(
            Arc::clone(&from.identity),
            Arc::clone(&from.trust),
            tls::provider(),
            to_name,
        )
        .unwrap();
        let mut specs: Vec<PeerSpec> = from
            .link
            .peers()
            .iter()
            .map(|p| from.link.peer_spec(&p.name()).unwrap())
            .collect();
        for s in &mut specs {
            if s.name == to_name {
                s.endpoints = vec![to.addr];
            }
        }
        from.link.set_peers(specs);
        let peer = from.link.peer(to_name).unwrap();
        tokio::spawn(Arc::clone(&from.link).dial(peer, Arc::new(config)));
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn identity(id: u32, ns: &str, pod: &[(&str, &str)]) -> (String, Export) {
    (
        identity_name(id),
        Export::Identity(IdentityExport {
            id,
            namespace: ns.into(),
            pod_labels: labels(pod),
            namespace_labels: labels(&[("kubernetes.io/metadata.name", ns)]),
        }),
    )
}

fn endpoint(addr: &str, id: u32) -> (String, Export) {
    let addr: IpAddr = addr.parse().unwrap();
    (
        endpoint_name(&addr),
        Export::Endpoint(EndpointExport { addr, identity: id }),
    )
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

fn ipv4_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[3] = 28;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

fn batch(records: &[(u32, Vec<u8>)]) -> Bytes {
    let mut b = BytesMut::new();
    for (id, p) in records {
        encode_record(&mut b, *id, p);
    }
    b.freeze()
}

#[tokio::test]
async fn exports_sync_follow_changes_and_packets_cross_checked() {
    let lab = Lab::new();
    let mut west = lab
        .gateway("west", WEST_PODS, &[("east", EAST_PODS)], Limits::default())
        .await;
    let east = lab
        .gateway("east", EAST_PODS, &[("west", WEST_PODS)], Limits::default())
        .await;
    east.link.set_exports(
        "west",
        BTreeMap::from([
            identity(300, "pay", &[("app", "api")]),
            endpoint("10.245.1.5", 300),
        ]),
    );
    lab.connect(&east, &west, "west");
    let from_east = west.link.peer("east").unwrap();
    eventually("west imports east's exports", || {
        from_east.is_synced()
            && from_east
                .view()
                .endpoints
                .get(&"10.245.1.5".parse().unwrap())
                == Some(&300)
    })
    .await;
    assert_eq!(from_east.view().identities[&300].namespace, "pay");

    // A label change travels as a delta.
    east.link.set_exports(
        "west",
        BTreeMap::from([
            identity(301, "pay", &[("app", "api"), ("tier", "gold")]),
            endpoint("10.245.1.5", 301),
        ]),
    );
    eventually("the label change reaches west", || {
        from_east
            .view()
            .endpoints
            .get(&"10.245.1.5".parse().unwrap())
            == Some(&301)
            && !from_east.view().identities.contains_key(&300)
    })
    .await;

    // Packets: the good one is delivered, the others are refused by reason.
    let to_west = east.link.peer("west").unwrap();
    east.link.send_batch(
        &to_west,
        batch(&[
            (301, ipv4_packet([10, 245, 1, 5], [10, 244, 0, 7])),
            (300, ipv4_packet([10, 245, 1, 5], [10, 244, 0, 7])),
            (301, ipv4_packet([10, 245, 1, 6], [10, 244, 0, 7])),
            (301, ipv4_packet([10, 245, 1, 5], [192, 168, 0, 1])),
        ]),
        4,
    );
    let got = tokio::time::timeout(Duration::from_secs(30), west.delivered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[12..20], &[10, 245, 1, 5, 10, 244, 0, 7]);
    eventually("three refusals counted", || {
        from_east.refusals.get(Refusal::IdentityMismatch) == 1
            && from_east.refusals.get(Refusal::UnexportedSource) == 1
            && from_east.refusals.get(Refusal::DestinationNotLocalPod) == 1
    })
    .await;
    assert!(
        west.delivered.try_recv().is_err(),
        "only one packet delivered"
    );

    // And the other way: west → east over the same session's tunnel.
    west.link.set_exports(
        "east",
        BTreeMap::from([
            identity(500, "shop", &[("app", "web")]),
            endpoint("10.244.0.7", 500),
        ]),
    );
    let west_at_east = east.link.peer("west").unwrap();
    eventually("east imports west's exports", || {
        west_at_east
            .view()
            .endpoints
            .contains_key(&"10.244.0.7".parse().unwrap())
    })
    .await;
    let mut east = east;
    west.link.send_batch(
        &from_east,
        batch(&[(500, ipv4_packet([10, 244, 0, 7], [10, 245, 1, 5]))]),
        1,
    );
    let got = tokio::time::timeout(Duration::from_secs(30), east.delivered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[12..20], &[10, 244, 0, 7, 10, 245, 1, 5]);
}

/// A test client that speaks MeshLink with mallory's valid certificate.
struct Evil {
    client: MeshLinkClient<tonic::transport::Channel>,
}

impl Evil {
    fn new(lab: &Lab, target: &Gateway, cert_cluster: &str) -> Self {
        let identity = lab.identity(cert_cluster);
        let trust = Arc::new(TrustStore::default());
        assert!(
            trust
                .set(&BTreeMap::from([("west".to_owned(), lab.ca.pem())]))
                .is_empty()
        );
        let config = tls::client_config(identity, trust, tls::provider(), "west").unwrap();
        Self {
            client: MeshLinkClient::new(transport::channel(target.addr, Arc::new(config))),
        }
    }

    /// Opens a Sync session, sends `frames` after Hello and returns the NACK text, if any.
    async fn session(
        &mut self,
        hello_name: &str,
        frames: Vec<pb::sync_frame::Kind>,
    ) -> Option<String> {
        // Room for every frame: they are queued before the stream is opened.
        let (tx, rx) = mpsc::channel(frames.len() + 1);
        tx.send(pb::SyncFrame {
            kind: Some(pb::sync_frame::Kind::Hello(pb::Hello {
                protocol_version: weir_mesh::link::PROTOCOL_VERSION,
                cluster_name: hello_name.into(),
                session_id: "evil".into(),
                resume: None,
                limits: None,
            })),
        })
        .await
        .unwrap();
        for f in frames {
            tx.send(pb::SyncFrame { kind: Some(f) }).await.unwrap();
        }
        let mut inbound = match self
            .client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return Some(e.to_string()),
        };
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_secs(30), inbound.next()).await
        {
            if let Some(pb::sync_frame::Kind::Ack(a)) = frame.kind
                && !a.error.is_empty()
            {
                return Some(a.error);
            }
        }
        drop(tx);
        None
    }
}

fn snapshot(entries: Vec<(String, Export)>) -> Vec<pb::sync_frame::Kind> {
    use pb::sync_frame::Kind;
    vec![
        Kind::Snapshot(pb::Snapshot {
            incarnation: 9,
            version: 1,
        }),
        Kind::Delta(pb::Delta {
            incarnation: 9,
            base_version: 1,
            version: 1,
            upsert: entries.iter().map(|(n, e)| e.to_wire(n)).collect(),
            remove: vec![],
        }),
        Kind::Synced(pb::Synced {
            incarnation: 9,
            version: 1,
        }),
    ]
}

#[tokio::test]
async fn an_evil_peer_with_a_valid_certificate_gets_nothing_that_is_not_its_own() {
    let lab = Lab::new();
    let limits = Limits {
        max_entries: 50,
        max_delta_entries: 1_000,
    };
    let west = lab.west_with_mallory(limits).await;
    let east = lab
        .gateway("east", EAST_PODS, &[("west", WEST_PODS)], Limits::default())
        .await;
    east.link.set_exports(
        "west",
        BTreeMap::from([
            identity(300, "pay", &[("app", "api")]),
            endpoint("10.245.1.5", 300),
        ]),
    );
    lab.connect(&east, &west, "west");
    let from_east = west.link.peer("east").unwrap();
    eventually("west imports east", || from_east.is_synced()).await;
    let east_view = from_east.view();

    west.link.set_max_deltas_per_second(5);
    let from_mallory = west.link.peer("mallory").unwrap();
    let mut evil = Evil::new(&lab, &west, "mallory");
    type Case = (&'static str, Vec<(String, Export)>, Refusal);
    let cases: Vec<Case> = vec![
        (
            "our address",
            vec![endpoint("10.244.3.3", 300)],
            Refusal::AddressOurs,
        ),
        (
            "east's address",
            vec![endpoint("10.245.1.5", 300)],
            Refusal::AddressThirdCluster,
        ),
        (
            "an address outside its prefixes",
            vec![endpoint("192.0.2.9", 300)],
            Refusal::AddressOutsidePrefixes,
        ),
        (
            "a reserved identity",
            vec![endpoint("10.247.0.1", 1)],
            Refusal::ReservedIdentity,
        ),
        (
            "the weir.io/cluster label",
            vec![identity(300, "pay", &[("weir.io/cluster", "east")])],
            Refusal::ClusterLabel,
        ),
        (
            "a name that is not its body",
            vec![("ep/10.247.0.2".to_owned(), endpoint("10.247.0.3", 300).1)],
            Refusal::MalformedEntry,
        ),
        (
            "more entries than the limit",
            (0..60)
                .map(|i| endpoint(&format!("10.247.1.{i}"), 300))
                .collect(),
            Refusal::Limit,
        ),
    ];
    for (what, entries, reason) in cases {
        let nack = evil.session("mallory", snapshot(entries)).await;
        let nack = nack.unwrap_or_else(|| panic!("{what}: not refused"));
        assert!(nack.starts_with(reason.as_str()), "{what}: {nack}");
        assert!(
            from_mallory.refusals.get(reason) >= 1,
            "{what}: not counted"
        );
    }
    assert!(
        from_mallory.view().endpoints.is_empty(),
        "nothing of mallory's was imported"
    );

    // A flood of deltas, each valid on its own: refused once above the rate.
    let mut flood = snapshot(vec![identity(300, "pay", &[])]);
    for v in 1..50u64 {
        flood.push(pb::sync_frame::Kind::Delta(pb::Delta {
            incarnation: 9,
            base_version: v,
            version: v + 1,
            upsert: vec![
                endpoint(&format!("10.247.2.{v}"), 300)
                    .1
                    .to_wire(&format!("ep/10.247.2.{v}")),
            ],
            remove: vec![],
        }));
    }
    let nack = evil.session("mallory", flood).await;
    let nack = nack.expect("a delta flood is refused");
    assert!(nack.starts_with("limit: more than 5 deltas"), "{nack}");
    assert!(from_mallory.refusals.get(Refusal::Limit) >= 1);
    // Impersonation: mallory's certificate with a Hello that says east.
    let _ = evil.session("east", vec![]).await;
    eventually("the impersonation is counted", || {
        from_mallory.refusals.get(Refusal::Impersonation) == 1
    })
    .await;
    assert_eq!(from_east.view(), east_view, "east's import is untouched");

    // A certificate for east from mallory's key would need east's CA: see the TLS tests.
    // Now a legitimate import for mallory, then packets that abuse it.
    let nack = {
        let (tx, rx) = mpsc::channel(16);
        let mut frames = vec![pb::sync_frame::Kind::Hello(pb::Hello {
            protocol_version: weir_mesh::link::PROTOCOL_VERSION,
            cluster_name: "mallory".into(),
            session_id: "evil".into(),
            resume: None,
            limits: None,
        })];
        frames.extend(snapshot(vec![
            identity(400, "evil", &[]),
            identity(401, "evil", &[("role", "admin")]),
            endpoint("10.247.0.1", 400),
        ]));
        for f in frames {
            tx.send(pb::SyncFrame { kind: Some(f) }).await.unwrap();
        }
        let mut inbound = evil
            .client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        eventually("mallory's own export is imported", || {
            from_mallory
                .view()
                .endpoints
                .contains_key(&"10.247.0.1".parse().unwrap())
        })
        .await;
        let (btx, brx) = mpsc::channel::<pb::PacketBatch>(4);
        let mut tunnel_client = evil.client.clone();
        btx.send(pb::PacketBatch {
            seq: 0,
            records: batch(&[
                // East's address with mallory's id, and with east's id.
                (400, ipv4_packet([10, 245, 1, 5], [10, 244, 0, 7])),
                (300, ipv4_packet([10, 245, 1, 5], [10, 244, 0, 7])),
                // Its own address, to west's node network and to east (transit).
                (400, ipv4_packet([10, 247, 0, 1], [192, 168, 1, 1])),
                (400, ipv4_packet([10, 247, 0, 1], [10, 245, 1, 5])),
                // Its own address with another identity it exported (for no address).
                (401, ipv4_packet([10, 247, 0, 1], [10, 244, 0, 7])),
            ]),
        })
        .await
        .unwrap();
        let _t = tunnel_client
            .tunnel(tokio_stream::wrappers::ReceiverStream::new(brx))
            .await
            .unwrap();
        eventually("every abusive packet refused", || {
            from_mallory.refusals.get(Refusal::UnexportedSource) == 2
                && from_mallory.refusals.get(Refusal::DestinationNotLocalPod) == 2
                && from_mallory.refusals.get(Refusal::IdentityMismatch) == 1
        })
        .await;
        let _ = inbound.next().await;
        None::<String>
    };
    assert!(nack.is_none());
    assert_eq!(from_east.view(), east_view, "east's import is untouched");
}

#[tokio::test]
async fn the_import_survives_a_restart_of_the_link() {
    let lab = Lab::new();
    let state = lab.dir.path().join("state-west");
    {
        let west = lab
            .gateway("west", WEST_PODS, &[("east", EAST_PODS)], Limits::default())
            .await;
        let east = lab
            .gateway("east", EAST_PODS, &[("west", WEST_PODS)], Limits::default())
            .await;
        east.link.set_exports(
            "west",
            BTreeMap::from([
                identity(300, "pay", &[("app", "api")]),
                endpoint("10.245.1.5", 300),
            ]),
        );
        lab.connect(&east, &west, "west");
        let from_east = west.link.peer("east").unwrap();
        eventually("west imports east", || from_east.is_synced()).await;
    }
    assert!(state.join("mesh/east.json").exists());
    // A new link with the same state directory (the agent restarted), no session yet.
    let (deliver, _rx) = mpsc::channel(1);
    let link = Link::new("west", Limits::default(), Some(state), deliver);
    link.set_peers(vec![PeerSpec {
        name: "east".into(),
        endpoints: vec![],
        bounds: PeerBounds {
            allowed: vec![EAST_PODS.parse().unwrap()],
            ..PeerBounds::default()
        },
        stale_ttl: Duration::from_secs(600),
    }]);
    let view = link.peer("east").unwrap().view();
    assert_eq!(
        view.endpoints.get(&"10.245.1.5".parse().unwrap()),
        Some(&300)
    );
}

/// An IPv4 TCP super-packet of `len` bytes as a TUN with TSO reads it, and its offload fields.
fn tso4_packet(src: [u8; 4], dst: [u8; 4], len: usize) -> (Vec<u8>, Offload) {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let offload = Offload {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1448,
        csum_start: 20,
        csum_offset: 16,
    };
    (p, offload)
}

#[tokio::test]
async fn super_packets_and_lanes_are_confined_like_single_packets() {
    let lab = Lab::new();
    let west = lab.west_with_mallory(Limits::default()).await;
    let from_mallory = west.link.peer("mallory").unwrap();
    let mut evil = Evil::new(&lab, &west, "mallory");
    // Mallory's own, legitimate export, kept up by an open session.
    let (tx, rx) = mpsc::channel(16);
    let mut frames = vec![pb::sync_frame::Kind::Hello(pb::Hello {
        protocol_version: weir_mesh::link::PROTOCOL_VERSION,
        cluster_name: "mallory".into(),
        session_id: "evil".into(),
        resume: None,
        limits: None,
    })];
    frames.extend(snapshot(vec![
        identity(400, "evil", &[]),
        endpoint("10.247.0.1", 400),
    ]));
    for f in frames {
        tx.send(pb::SyncFrame { kind: Some(f) }).await.unwrap();
    }
    let _inbound = evil
        .client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    eventually("mallory's own export is imported", || {
        from_mallory.is_synced()
    })
    .await;

    let mut b = BytesMut::new();
    // Its own address to one of our pods, whole and well formed: passes the checks (the test's
    // plain-packet receiver then cannot take a super-packet, which is counted as a drop).
    let (good, tso) = tso4_packet([10, 247, 0, 1], [10, 244, 0, 7], 60_000);
    encode_record_with(&mut b, 400, &tso, &good);
    // East's address, and our node network, as super-packets: refused as single packets are.
    let (spoofed, _) = tso4_packet([10, 245, 1, 5], [10, 244, 0, 7], 60_000);
    encode_record_with(&mut b, 400, &tso, &spoofed);
    let (to_node, _) = tso4_packet([10, 247, 0, 1], [192, 168, 1, 1], 60_000);
    encode_record_with(&mut b, 400, &tso, &to_node);
    // Offload fields that do not describe the packet: TSO of a UDP packet, a checksum beyond
    // the packet, a length field that is not the record's.
    let mut udp = good.clone();
    udp[9] = 17;
    encode_record_with(&mut b, 400, &tso, &udp);
    let beyond = Offload {
        csum_start: 59_990,
        ..tso
    };
    encode_record_with(&mut b, 400, &beyond, &good);
    encode_record_with(&mut b, 400, &tso, &good[..50_000]);
    let mut lane_one = tonic::Request::new(futures::stream::iter([pb::PacketBatch {
        seq: 0,
        records: b.freeze(),
    }]));
    lane_one
        .metadata_mut()
        .insert(weir_mesh::link::LANE_METADATA, "1".parse().unwrap());
    let _t = evil.client.clone().tunnel(lane_one).await.unwrap();
    eventually("every abusive super-packet refused", || {
        from_mallory.refusals.get(Refusal::UnexportedSource) == 1
            && from_mallory.refusals.get(Refusal::DestinationNotLocalPod) == 1
            && from_mallory.refusals.get(Refusal::MalformedPacket) == 3
    })
    .await;
    eventually("the good super-packet passed the checks", || {
        from_mallory.tunnel.rx_packets.load(Ordering::Relaxed) == 1
            && from_mallory.tunnel.rx_dropped.load(Ordering::Relaxed) == 1
    })
    .await;

    // A lane beyond what any gateway opens is refused.
    let mut lane_far = tonic::Request::new(futures::stream::iter(Vec::<pb::PacketBatch>::new()));
    lane_far
        .metadata_mut()
        .insert(weir_mesh::link::LANE_METADATA, "99".parse().unwrap());
    let refused = evil.client.clone().tunnel(lane_far).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
}

/// Opens a Sync session of dial `dial` as mallory; the returned sender keeps it open.
async fn mallory_session(
    evil: &mut Evil,
    dial: &str,
) -> (mpsc::Sender<pb::SyncFrame>, tonic::Streaming<pb::SyncFrame>) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::SyncFrame {
        kind: Some(pb::sync_frame::Kind::Hello(pb::Hello {
            protocol_version: weir_mesh::link::PROTOCOL_VERSION,
            cluster_name: "mallory".into(),
            session_id: format!("dial-{dial}"),
            resume: None,
            limits: None,
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(weir_mesh::link::DIAL_METADATA, dial.parse().unwrap());
    let inbound = evil.client.sync(request).await.unwrap().into_inner();
    (tx, inbound)
}

/// Opens lane `lane`'s Tunnel of dial `dial` (on a connection of its own, as lanes above 0 are);
/// the returned sender sends batches on it and keeps our side open.
async fn mallory_lane(
    lab: &Lab,
    west: &Gateway,
    dial: &str,
    lane: usize,
) -> (
    mpsc::Sender<pb::PacketBatch>,
    tonic::Streaming<pb::PacketBatch>,
) {
    let mut client = Evil::new(lab, west, "mallory").client;
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        weir_mesh::link::LANE_METADATA,
        lane.to_string().parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert(weir_mesh::link::DIAL_METADATA, dial.parse().unwrap());
    (tx, client.tunnel(request).await.unwrap().into_inner())
}

/// Whether the Tunnel's stream from the server ended (closed or failed).
async fn tunnel_ends(tunnel: &mut tonic::Streaming<pb::PacketBatch>) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(30), tunnel.next()).await,
        Ok(None | Some(Err(_)))
    )
}

#[tokio::test]
async fn a_replaced_dials_lanes_hand_over_and_a_removed_peers_lanes_end() {
    let lab = Lab::new();
    let west = lab.west_with_mallory(Limits::default()).await;
    let from_mallory = west.link.peer("mallory").unwrap();
    let mut first = Evil::new(&lab, &west, "mallory");
    let _first_session = mallory_session(&mut first, "1").await;
    let (old_lane_out, mut old_lane) = mallory_lane(&lab, &west, "1", 1).await;
    // The re-dial's lane may come up before its Sync session: it must survive that session.
    let (_new_lane_out, mut new_lane) = mallory_lane(&lab, &west, "2", 1).await;
    let mut second = Evil::new(&lab, &west, "mallory");
    let _second_session = mallory_session(&mut second, "2").await;
    assert!(
        tunnel_ends(&mut old_lane).await,
        "what west sends on the replaced dial's lane 1 ends"
    );
    // What the dialer still sends on its old lane, until it ends that lane itself, is read
    // (make before break): this packet's source is not exported, so it is refused.
    old_lane_out
        .send(pb::PacketBatch {
            seq: 0,
            records: batch(&[(1, ipv4_packet([10, 247, 0, 9], [10, 244, 0, 7]))]),
        })
        .await
        .expect("west still reads the old lane");
    eventually("the old lane's batch is read and checked", || {
        from_mallory.refusals.get(Refusal::UnexportedSource) == 1
    })
    .await;
    // The new dial's lane still carries lane 1's packets.
    west.link.send_batch_on(
        &from_mallory,
        1,
        batch(&[(1, ipv4_packet([10, 244, 0, 7], [10, 247, 0, 1]))]),
        1,
    );
    let got = tokio::time::timeout(Duration::from_secs(30), new_lane.next())
        .await
        .expect("a batch on the new dial's lane")
        .expect("the new dial's lane is open")
        .expect("a batch, not an error");
    assert_eq!(
        &got.records[..],
        &batch(&[(1, ipv4_packet([10, 244, 0, 7], [10, 247, 0, 1]))])[..]
    );

    // Removing the peer ends its lanes too.
    let specs: Vec<PeerSpec> = west
        .link
        .peers()
        .iter()
        .map(|p| west.link.peer_spec(&p.name()).unwrap())
        .filter(|s| s.name != "mallory")
        .collect();
    west.link.set_peers(specs);
    assert!(
        tunnel_ends(&mut new_lane).await,
        "a removed peer's lane ends"
    );
}

#[tokio::test]
async fn the_latency_lane_carries_packets_both_ways_and_nothing_is_buffered_without_a_gateway() {
    let lab = Lab::new();
    let mut west = lab.west_with_mallory(Limits::default()).await;
    let mut east = lab
        .gateway("east", EAST_PODS, &[("west", WEST_PODS)], Limits::default())
        .await;
    east.link.set_exports(
        "west",
        BTreeMap::from([
            identity(300, "pay", &[("app", "api")]),
            endpoint("10.245.1.5", 300),
        ]),
    );
    west.link.set_exports(
        "east",
        BTreeMap::from([
            identity(500, "shop", &[("app", "web")]),
            endpoint("10.244.0.7", 500),
        ]),
    );
    lab.connect(&east, &west, "west");
    let from_east = west.link.peer("east").unwrap();
    let to_west = east.link.peer("west").unwrap();
    // The dialer opens the latency lane by default; both sides see a Tunnel serving it.
    eventually(
        "both imports synced and the latency lane up on both sides",
        || {
            from_east.is_synced()
                && to_west.is_synced()
                && from_east.latency_lane_up()
                && to_west.latency_lane_up()
        },
    )
    .await;

    // Dialer to listener, and back, on the latency lane; checked like any other packet.
    east.link.send_batch_to(
        &to_west,
        Lane::Latency,
        batch(&[
            (300, ipv4_packet([10, 245, 1, 5], [10, 244, 0, 7])),
            (300, ipv4_packet([10, 245, 1, 6], [10, 244, 0, 7])),
        ]),
        2,
    );
    let got = tokio::time::timeout(Duration::from_secs(30), west.delivered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[12..20], &[10, 245, 1, 5, 10, 244, 0, 7]);
    eventually(
        "the unexported source refused on the latency lane too",
        || from_east.refusals.get(Refusal::UnexportedSource) == 1,
    )
    .await;
    west.link.send_batch_to(
        &from_east,
        Lane::Latency,
        batch(&[(500, ipv4_packet([10, 244, 0, 7], [10, 245, 1, 5]))]),
        1,
    );
    let got = tokio::time::timeout(Duration::from_secs(30), east.delivered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[12..20], &[10, 244, 0, 7, 10, 245, 1, 5]);

    // A latency lane nobody serves (mallory never connected) is not up, and with no gateway of
    // mallory's to carry them, batches are dropped and counted, never buffered.
    let to_mallory = west.link.peer("mallory").unwrap();
    assert!(!to_mallory.latency_lane_up());
    let queue = west.link.data_plane().queue as u64;
    for _ in 0..=queue {
        west.link.send_batch_to(
            &to_mallory,
            Lane::Latency,
            batch(&[(500, ipv4_packet([10, 244, 0, 7], [10, 247, 0, 1]))]),
            1,
        );
    }
    assert_eq!(to_mallory.tunnel.tx_packets.load(Ordering::Relaxed), 0);
    assert_eq!(
        to_mallory.tunnel.tx_queue_full.load(Ordering::Relaxed),
        queue + 1
    );
}

#[tokio::test]
async fn a_peer_that_names_more_gateways_than_allowed_is_refused() {
    let lab = Lab::new();
    let west = lab.west_with_mallory(Limits::default()).await;
    let mut client = Evil::new(&lab, &west, "mallory").client;
    // Each Tunnel names another gateway of mallory's; the ones within the limit stay open.
    let mut open = Vec::new();
    for g in 0..=weir_mesh::link::MAX_GATEWAYS {
        let mut request = tonic::Request::new(futures::stream::pending::<pb::PacketBatch>());
        request.metadata_mut().insert(
            weir_mesh::link::GATEWAY_METADATA,
            format!("gateway-{g}").parse().unwrap(),
        );
        let result = client.tunnel(request).await;
        if g < weir_mesh::link::MAX_GATEWAYS {
            open.push(result.expect("a gateway within the limit").into_inner());
        } else {
            let refused = result.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        }
    }
    let from_mallory = west.link.peer("mallory").unwrap();
    assert!(
        from_mallory
            .refusals
            .snapshot()
            .iter()
            .any(|(reason, n)| *reason == weir_mesh::confine::Refusal::Limit && *n == 1),
        "counted as a limit refusal"
    );
    assert_eq!(from_mallory.remotes().len(), weir_mesh::link::MAX_GATEWAYS);
}

#[tokio::test]
async fn a_gateway_that_goes_silent_leaves_the_set_and_its_batches_count_as_liveness() {
    let lab = Lab::new();
    let west = lab.west_with_mallory(Limits::default()).await;
    let from_mallory = west.link.peer("mallory").unwrap();
    let mut evil = Evil::new(&lab, &west, "mallory");
    // Mallory's session sends its Hello and then nothing (no heartbeat, no frame), while a
    // lane of the same dial carries a batch every 50 ms, as a busy lane whose session's
    // heartbeats queue behind its data would.
    let (_keep_open, mut inbound) = mallory_session(&mut evil, "1").await;
    eventually("mallory's session is up", || {
        from_mallory.gateways_up() == 1
    })
    .await;
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let lane_sending = Arc::clone(&sending);
    let batches = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
        Duration::from_millis(50),
    ))
    .take_while(move |_| std::future::ready(lane_sending.load(Ordering::Relaxed)))
    .map(|_| pb::PacketBatch {
        seq: 0,
        // From an address mallory does not export: refused, and counted, once heard.
        records: batch(&[(1, ipv4_packet([10, 247, 0, 9], [10, 244, 0, 7]))]),
    });
    let mut request = tonic::Request::new(batches);
    request
        .metadata_mut()
        .insert(weir_mesh::link::DIAL_METADATA, "1".parse().unwrap());
    let _lane = evil.client.tunnel(request).await.unwrap();
    // Ten silence timeouts' worth of batches: the session stays up all along.
    let heard = || {
        from_mallory
            .refusals
            .snapshot()
            .into_iter()
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let enough = 10 * weir_mesh::link::SILENCE_TIMEOUT.as_millis() as u64 / 50;
    eventually("the lane's batches arrive", || heard() >= enough).await;
    assert_eq!(
        from_mallory.tunnel.silent_sessions.load(Ordering::Relaxed),
        0,
        "a gateway whose lane carries batches is not silent"
    );
    assert_eq!(from_mallory.gateways_up(), 1);

    // The lane stops too: the gateway is silent, its session ends and it leaves the set.
    sending.store(false, Ordering::Relaxed);
    eventually("the silent gateway leaves the set", || {
        from_mallory.gateways_up() == 0
    })
    .await;
    assert_eq!(
        from_mallory.tunnel.silent_sessions.load(Ordering::Relaxed),
        1
    );
    // Its session's stream from us ended (after heartbeats while it lasted).
    let mut heartbeats = 0;
    while let Ok(Some(Ok(frame))) =
        tokio::time::timeout(Duration::from_secs(30), inbound.next()).await
    {
        if matches!(frame.kind, Some(pb::sync_frame::Kind::Heartbeat(_))) {
            heartbeats += 1;
        }
    }
    assert!(
        heartbeats > 0,
        "the session sent heartbeats while it lasted"
    );
}
