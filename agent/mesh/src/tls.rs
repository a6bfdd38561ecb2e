//! Mutual TLS between gateways: rustls, TLS 1.3 only, ALPN `h2`, both sides authenticated.
//!
//! # Who a peer is
//! A gateway's certificate names its cluster in a URI SAN, `spiffe://<trust domain>/cluster/
//! <name>` (exactly one such URI; the trust domain is not interpreted). That name is the peer's
//! identity for everything after the handshake; no message can change it. A certificate is
//! accepted only if a MeshPeer of that name exists and the certificate chains to *that*
//! MeshPeer's CA bundle: a peer's CA cannot vouch for another cluster's name. As a client we
//! also require the name to be the peer we dialled.
//!
//! # Rotation
//! Our certificate and key are read from files and re-read when they change
//! ([`ReloadingIdentity::reload_if_changed`], polled by [`spawn_reloader`]); new handshakes use
//! the new pair, established connections keep theirs (the gateway then re-dials its peers, make
//! before break). A rotated certificate must name the same cluster and, with trust anchors
//! (`--mesh-ca`), chain to them; otherwise it is refused loudly and the previous pair stays in
//! use. CA bundles come from the MeshPeer objects and are replaced with [`TrustStore::set`].

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as RustlsError, RootCertStore, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

/// The URI SAN scheme and the path segment before the cluster name.
pub const SAN_SCHEME: &str = "spiffe://";
pub const SAN_CLUSTER_SEGMENT: &str = "/cluster/";

/// What went wrong reading or checking certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the private key in {path} cannot be used: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: RustlsError,
    },
    #[error("the certificate in {path} does not belong to the key in {key}: {source}")]
    KeyMismatch {
        path: PathBuf,
        key: PathBuf,
        #[source]
        source: RustlsError,
    },
    #[error("MeshPeer {peer}: caBundle: {reason}")]
    CaBundle { peer: String, reason: String },
    #[error("building the TLS configuration: {0}")]
    Config(#[source] RustlsError),
    #[error(
        "the certificate in {path} names cluster {got}, but this gateway is {expected}: refused, the previous certificate stays in use"
    )]
    RotationCluster {
        path: PathBuf,
        got: String,
        expected: String,
    },
    #[error(
        "the certificate in {path} does not chain to the mesh CA (--mesh-ca): {reason}: refused{}",
        if *.initial { "" } else { ", the previous certificate stays in use" }
    )]
    Untrusted {
        path: PathBuf,
        reason: String,
        initial: bool,
    },
    #[error("the certificate in {path}: {reason}")]
    Unnamed { path: PathBuf, reason: String },
    #[error("reading the mesh CA from {path}: {reason}")]
    Anchors { path: PathBuf, reason: String },
}

impl TlsError {
    /// A readable pair that may not replace ours (another cluster, another CA): not retried
    /// until the files change again.
    pub fn is_refused_rotation(&self) -> bool {
        matches!(
            self,
            TlsError::RotationCluster { .. }
                | TlsError::Untrusted { .. }
                | TlsError::Unnamed { .. }
        )
    }
}

/// The cluster named by a certificate: the one `spiffe://<domain>/cluster/<name>` URI SAN.
pub fn cluster_of(cert: &CertificateDer<'_>) -> Result<String, RustlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| RustlsError::General(format!("unreadable certificate: {e}")))?;
    let mut names = parsed.valid_uri_names().filter_map(cluster_from_uri);
    match (names.next(), names.next()) {
        (Some(name), None) => Ok(name),
        (None, _) => Err(RustlsError::General(format!(
            "the certificate has no URI SAN {SAN_SCHEME}<domain>{SAN_CLUSTER_SEGMENT}<name>"
        ))),
        (Some(_), Some(_)) => Err(RustlsError::General(
            "the certificate names more than one cluster".to_owned(),
        )),
    }
}

/// `spiffe://<domain>/cluster/<name>` → `<name>` (a DNS label, as MeshPeer names are).
pub fn cluster_from_uri(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix(SAN_SCHEME)?;
    let (domain, name) = rest.split_once(SAN_CLUSTER_SEGMENT)?;
    if domain.is_empty() || domain.contains('/') || !crate::confine::valid_namespace(name) {
        return None;
    }
    Some(name.to_owned())
}

/// The CA bundle of every MeshPeer, by peer (cluster) name.
#[derive(Debug, Default)]
pub struct TrustStore {
    peers: RwLock<BTreeMap<String, Arc<RootCertStore>>>,
}

impl TrustStore {
    /// Replaces every peer's trust anchors. A peer whose bundle holds no usable certificate is
    /// left out (so its certificates are refused) and reported.
    pub fn set(&self, bundles: &BTreeMap<String, String>) -> Vec<TlsError> {
        let mut errors = Vec::new();
        let mut peers = BTreeMap::new();
        for (peer, pem) in bundles {
            match roots_from_pem(pem) {
                Ok(roots) => {
                    peers.insert(peer.clone(), Arc::new(roots));
                }
                Err(reason) => errors.push(TlsError::CaBundle {
                    peer: peer.clone(),
                    reason,
                }),
            }
        }
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
        errors
    }

    fn roots(&self, peer: &str) -> Option<Arc<RootCertStore>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }
}

fn roots_from_pem(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no certificate".to_owned());
    }
    Ok(roots)
}

/// Verifies a peer's certificate against the MeshPeer its SAN names.
#[derive(Debug)]
pub struct PeerVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    /// As a client: the peer we dialled; the certificate must name it.
    expected: Option<String>,
}

impl PeerVerifier {
    pub fn server_side(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            trust,
            provider,
            expected: None,
        }
    }

    pub fn client_side(
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
        peer: impl Into<String>,
    ) -> Self {
        Self {
            trust,
            provider,
            expected: Some(peer.into()),
        }
    }

    fn peer_roots(
        &self,
        end_entity: &CertificateDer<'_>,
    ) -> Result<Arc<RootCertStore>, RustlsError> {
        let cluster = cluster_of(end_entity)?;
        if let Some(expected) = &self.expected
            && &cluster != expected
        {
            return Err(RustlsError::General(format!(
                "the certificate names cluster {cluster}, but we dialled {expected}"
            )));
        }
        self.trust.roots(&cluster).ok_or_else(|| {
            RustlsError::General(format!(
                "no MeshPeer named {cluster} (from the certificate)"
            ))
        })
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let roots = self.peer_roots(end_entity)?;
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&self.provider))
            .build()
            .map_err(|e| RustlsError::General(format!("peer trust anchors: {e}")))?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        // The name checked is the cluster in the URI SAN (peer_roots), not a DNS name.
        let roots = self.peer_roots(end_entity)?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algorithms().all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

/// Our certificate and key, re-read from their files when they change.
#[derive(Debug)]
pub struct ReloadingIdentity {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: Mutex<FileStamps>,
    /// The mesh CA our certificates must chain to, if the operator named it.
    anchors: Option<Arc<RootCertStore>>,
    /// Rotations applied and refused since start.
    pub rotations: AtomicU64,
    pub refused_rotations: AtomicU64,
    /// Bumped by every applied rotation.
    rotated: tokio::sync::watch::Sender<u64>,
}

type FileStamps = (Option<(SystemTime, u64)>, Option<(SystemTime, u64)>);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl ReloadingIdentity {
    /// Reads the pair once; fails if it is not usable.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let stamps = (stamp(&cert_path), stamp(&key_path));
        let key = read_pair(&cert_path, &key_path, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Arc::new(key)),
            stamp: Mutex::new(stamps),
            anchors: None,
            rotations: AtomicU64::new(0),
            refused_rotations: AtomicU64::new(0),
            rotated: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Requires our certificate, now and after every rotation, to chain to the CA bundle in
    /// `ca_path` (PEM): a certificate from another CA is refused.
    pub fn with_anchors(mut self, ca_path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read_to_string(ca_path).map_err(|e| TlsError::Anchors {
            path: ca_path.to_owned(),
            reason: e.to_string(),
        })?;
        let roots = roots_from_pem(&pem).map_err(|reason| TlsError::Anchors {
            path: ca_path.to_owned(),
            reason,
        })?;
        self.anchors = Some(Arc::new(roots));
        self.check_chain(&self.current(), true)?;
        Ok(self)
    }

    fn check_chain(&self, key: &CertifiedKey, initial: bool) -> Result<(), TlsError> {
        let Some(anchors) = &self.anchors else {
            return Ok(());
        };
        let untrusted = |reason: String| TlsError::Untrusted {
            path: self.cert_path.clone(),
            reason,
            initial,
        };
        let (ee, intermediates) = key
            .cert
            .split_first()
            .ok_or_else(|| untrusted("no certificate".into()))?;
        let parsed = rustls::server::ParsedCertificate::try_from(ee)
            .map_err(|e| untrusted(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            anchors,
            intermediates,
            UnixTime::now(),
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| untrusted(e.to_string()))
    }

    /// Re-reads the files if either changed. A pair that does not load (a half-written
    /// rotation) keeps the previous one in use and is retried next time; a pair that loads but
    /// names another cluster or does not chain to the mesh CA is refused (and not retried until
    /// the files change again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == stamps {
            return Ok(false);
        }
        let key = read_pair(&self.cert_path, &self.key_path, &self.provider)?;
        let checked = self.check_rotation(&key);
        if let Err(e) = checked {
            *last = stamps;
            self.refused_rotations.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        *last = stamps;
        self.rotations.fetch_add(1, Ordering::Relaxed);
        self.rotated.send_modify(|v| *v += 1);
        Ok(true)
    }

    fn check_rotation(&self, key: &CertifiedKey) -> Result<(), TlsError> {
        let unnamed = |e: RustlsError| TlsError::Unnamed {
            path: self.cert_path.clone(),
            reason: e.to_string(),
        };
        let expected = self.cluster().map_err(unnamed)?;
        let got = key
            .cert
            .first()
            .ok_or_else(|| RustlsError::General("no certificate".into()))
            .and_then(cluster_of)
            .map_err(unnamed)?;
        if got != expected {
            return Err(TlsError::RotationCluster {
                path: self.cert_path.clone(),
                got,
                expected,
            });
        }
        self.check_chain(key, false)
    }

    /// Notified by every applied rotation.
    pub fn subscribe_rotations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rotated.subscribe()
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The cluster our own certificate names.
    pub fn cluster(&self) -> Result<String, RustlsError> {
        let key = self.current();
        let ee = key
            .cert
            .first()
            .ok_or_else(|| RustlsError::General("no certificate".into()))?;
        cluster_of(ee)
    }
}

fn read_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "certificates",
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Read {
        what: "a private key",
        path: key_path.to_owned(),
        source,
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::KeyMismatch {
            path: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        })?;
    Ok(certified)
}

impl ResolvesServerCert for ReloadingIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Polls the identity's files every `every` and reloads them when they change.
pub fn spawn_reloader(
    identity: Arc<ReloadingIdentity>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match identity.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %identity.cert_path.display(), "mesh certificate reloaded")
                }
                Ok(false) => {}
                Err(e) if e.is_refused_rotation() => {
                    tracing::error!(error = %e, "refused the rotated mesh certificate")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh certificate not reloaded (yet); keeping the previous one")
                }
            }
        }
    })
}

/// The crypto provider of every mesh connection (ring, as the rest of Weir).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: TLS 1.3 only, a client certificate required, ALPN h2.
pub fn server_config(
    identity: Arc<ReloadingIdentity>,
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(PeerVerifier::server_side(trust, provider)))
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The client side towards `peer`: TLS 1.3 only, our certificate offered, ALPN h2.
pub fn client_config(
    identity: Arc<ReloadingIdentity>,
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    peer: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier::client_side(
            trust, provider, peer,
        )))
        .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The SNI name we send; the server ignores it (names are checked in the URI SAN).
pub fn sni() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from("mesh.weir.invalid")
            .expect("a valid DNS name")
            .to_owned(),
    )
}

/// Maps an I/O error of a handshake to what it means, for logs.
pub fn handshake_error(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RustlsError>())
    {
        Some(tls) => format!("TLS: {tls}"),
        None => e.to_string(),
    }
}
