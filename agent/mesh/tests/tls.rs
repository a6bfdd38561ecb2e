//! mTLS of the mesh link against real sockets: who is accepted, who is refused, where the
//! peer's cluster name comes from, and certificate reload. Certificates are made here (rcgen).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;
use weir_mesh::{
    certs::{GatewayCert, MeshCa},
    tls::{self, ReloadingIdentity, TrustStore},
    transport,
};

struct Pki {
    dir: tempfile::TempDir,
    mesh: MeshCa,
    wrong: MeshCa,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            mesh: MeshCa::new("mesh").unwrap(),
            wrong: MeshCa::new("wrong").unwrap(),
        }
    }

    fn identity(&self, cert: &GatewayCert, stem: &str) -> Arc<ReloadingIdentity> {
        let (c, k) = cert.write(self.dir.path(), stem).unwrap();
        Arc::new(ReloadingIdentity::load(c, k, tls::provider()).unwrap())
    }

    /// A trust store that knows `peers`, all under the mesh CA.
    fn trust(&self, peers: &[&str]) -> Arc<TrustStore> {
        let trust = Arc::new(TrustStore::default());
        let bundles: BTreeMap<String, String> = peers
            .iter()
            .map(|p| ((*p).to_owned(), self.mesh.pem()))
            .collect();
        assert!(trust.set(&bundles).is_empty());
        trust
    }
}

/// A west listener that knows `east`; returns its address and the authenticated connections.
async fn west_listener(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    tokio_stream::wrappers::ReceiverStream<Result<transport::MeshConn, std::io::Error>>,
    Arc<ReloadingIdentity>,
) {
    let west = pki.identity(&pki.mesh.gateway("mesh.test", "west").unwrap(), "west");
    let config =
        tls::server_config(Arc::clone(&west), pki.trust(&["east"]), tls::provider()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, transport::incoming(listener, Arc::new(config)), west)
}

async fn dial(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(tls::sni(), tcp)
        .await?;
    // TLS 1.3 clients finish before the server has checked their certificate: a round trip
    // shows whether the server kept the connection.
    tls.write_all(b"ping").await?;
    tls.flush().await?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::other("closed by the server")),
        Ok(Err(e)) => Err(e),
        _ => Ok(tls),
    }
}

fn east_client(pki: &Pki, cert: &GatewayCert, dialled: &str) -> rustls::ClientConfig {
    tls::client_config(
        pki.identity(cert, &format!("client-{}", rand_stem())),
        pki.trust(&["west", "mallory"]),
        tls::provider(),
        dialled,
    )
    .unwrap()
}

fn rand_stem() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn the_peer_cluster_comes_from_the_certificate() {
    let pki = Pki::new();
    let (addr, mut incoming, _) = west_listener(&pki).await;
    let east = pki.mesh.gateway("mesh.test", "east").unwrap();
    let _client = dial(addr, east_client(&pki, &east, "west")).await.unwrap();
    let conn = incoming.next().await.unwrap().unwrap();
    use tonic::transport::server::Connected as _;
    assert_eq!(conn.connect_info().name, "east");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let (addr, mut incoming, _) = west_listener(&pki).await;
    // Names east, but signed by a CA that is not east's MeshPeer caBundle.
    let forged = pki.wrong.gateway("mesh.test", "east").unwrap();
    assert!(
        dial(addr, east_client(&pki, &forged, "west"))
            .await
            .is_err()
    );
    // A valid certificate for a cluster without a MeshPeer is refused too.
    let stranger = pki.mesh.gateway("mesh.test", "stranger").unwrap();
    assert!(
        dial(addr, east_client(&pki, &stranger, "west"))
            .await
            .is_err()
    );
    // A certificate with no cluster URI, or two, is refused.
    let unnamed = pki
        .mesh
        .gateway_with_uris(&["https://east.example/".to_owned()])
        .unwrap();
    assert!(
        dial(addr, east_client(&pki, &unnamed, "west"))
            .await
            .is_err()
    );
    let two = pki
        .mesh
        .gateway_with_uris(&[
            "spiffe://mesh.test/cluster/east".to_owned(),
            "spiffe://mesh.test/cluster/west".to_owned(),
        ])
        .unwrap();
    assert!(dial(addr, east_client(&pki, &two, "west")).await.is_err());
    // None of them reached the service.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), incoming.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_peer_it_dialled() {
    let pki = Pki::new();
    let (addr, _incoming, _) = west_listener(&pki).await;
    let east = pki.mesh.gateway("mesh.test", "east").unwrap();
    // The listener's certificate names west; we pretend to dial mallory.
    let err = dial(addr, east_client(&pki, &east, "mallory"))
        .await
        .unwrap_err();
    assert!(
        tls::handshake_error(&err).contains("dialled mallory"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let pki = Pki::new();
    let (addr, mut incoming, _) = west_listener(&pki).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // An HTTP/2 (h2c) client preface, in clear.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !buf.windows(8).any(|w| w == b"HTTP/2.0"),
        "no HTTP answer in clear"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), incoming.next())
            .await
            .is_err()
    );
    // And a real gRPC client without TLS gets no service either.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = channel {
        let mut client = weir_proto::mesh::v1::mesh_link_client::MeshLinkClient::new(channel);
        let r = client
            .tunnel(futures::stream::empty::<weir_proto::mesh::v1::PacketBatch>())
            .await;
        assert!(r.is_err());
    }
}

#[tokio::test]
async fn a_tls12_client_is_refused() {
    let pki = Pki::new();
    let (addr, _incoming, _) = west_listener(&pki).await;
    let east = pki.mesh.gateway("mesh.test", "east").unwrap();
    let identity = pki.identity(&east, "east12");
    let provider = tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(tls::PeerVerifier::client_side(
            pki.trust(&["west"]),
            provider,
            "west",
        )))
        .with_client_cert_resolver(identity);
    let err = dial(addr, config).await.unwrap_err();
    assert!(
        tls::handshake_error(&err)
            .to_lowercase()
            .contains("version")
            || tls::handshake_error(&err).contains("ProtocolVersion"),
        "{}",
        tls::handshake_error(&err)
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_used_by_new_handshakes() {
    let pki = Pki::new();
    let (addr, mut incoming, west) = west_listener(&pki).await;
    let east = pki.mesh.gateway("mesh.test", "east").unwrap();
    let before = dial(addr, east_client(&pki, &east, "west")).await.unwrap();
    let _served = incoming.next().await.unwrap().unwrap();
    let first = before.get_ref().1.peer_certificates().unwrap()[0].clone();

    // Rotate west's certificate on disk (same paths) and reload.
    let (cert_path, _) = pki
        .mesh
        .gateway("mesh.test", "west")
        .unwrap()
        .write(pki.dir.path(), "west")
        .unwrap();
    assert!(west.reload_if_changed().unwrap());
    assert!(!west.reload_if_changed().unwrap(), "nothing changed since");
    let after = dial(addr, east_client(&pki, &east, "west")).await.unwrap();
    let second = after.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second);
    let on_disk = CertificateDer::pem_file_iter(&cert_path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(second, on_disk);
    // The connection made before the rotation still works.
    let mut before = before;
    before.write_all(b"still here").await.unwrap();

    // A half-written rotation (garbage) keeps the last good pair.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\ngarbage").unwrap();
    assert!(west.reload_if_changed().is_err());
    let again = dial(addr, east_client(&pki, &east, "west")).await.unwrap();
    assert_eq!(again.get_ref().1.peer_certificates().unwrap()[0], second);
}

/// Writes a rotation of `stem`'s pair with a modification time of its own (two writes in the
/// same clock tick must still count as two rotations).
fn rotate_to(pki: &Pki, cert: &GatewayCert, stem: &str, tick: u64) {
    let (c, k) = cert.write(pki.dir.path(), stem).unwrap();
    let at = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000 + tick);
    for path in [c, k] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }
}

#[tokio::test]
async fn a_rotation_to_another_ca_or_another_cluster_is_refused_and_the_pair_kept() {
    let pki = Pki::new();
    let ca = pki.dir.path().join("mesh-ca.pem");
    std::fs::write(&ca, pki.mesh.pem()).unwrap();
    let good = pki.mesh.gateway("mesh.test", "east").unwrap();
    let (c, k) = good.write(pki.dir.path(), "east").unwrap();
    let east = ReloadingIdentity::load(&c, &k, tls::provider())
        .unwrap()
        .with_anchors(&ca)
        .unwrap();
    let first = east.current().cert[0].clone();
    let rotations = east.subscribe_rotations();

    // Another CA: refused, loudly, and not retried until the files change again.
    rotate_to(
        &pki,
        &pki.wrong.gateway("mesh.test", "east").unwrap(),
        "east",
        1,
    );
    let err = east.reload_if_changed().unwrap_err();
    assert!(err.is_refused_rotation(), "{err}");
    assert!(err.to_string().contains("does not chain"), "{err}");
    assert!(!east.reload_if_changed().unwrap(), "not retried");
    assert_eq!(east.current().cert[0], first, "the previous pair stays");

    // Another cluster's name, from the right CA: refused too.
    rotate_to(
        &pki,
        &pki.mesh.gateway("mesh.test", "west").unwrap(),
        "east",
        2,
    );
    let err = east.reload_if_changed().unwrap_err();
    assert!(err.is_refused_rotation(), "{err}");
    assert!(err.to_string().contains("names cluster west"), "{err}");
    assert_eq!(east.current().cert[0], first, "the previous pair stays");
    assert_eq!(
        east.refused_rotations
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert!(!rotations.has_changed().unwrap());

    // A good rotation is applied and announced.
    let next = pki.mesh.gateway("mesh.test", "east").unwrap();
    rotate_to(&pki, &next, "east", 3);
    assert!(east.reload_if_changed().unwrap());
    assert_ne!(east.current().cert[0], first);
    assert!(rotations.has_changed().unwrap());
    assert_eq!(east.rotations.load(std::sync::atomic::Ordering::Relaxed), 1);

    // At start, a certificate from another CA is refused outright.
    let (c, k) = pki
        .wrong
        .gateway("mesh.test", "east")
        .unwrap()
        .write(pki.dir.path(), "stray")
        .unwrap();
    let err = ReloadingIdentity::load(&c, &k, tls::provider())
        .unwrap()
        .with_anchors(&ca)
        .unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
}
