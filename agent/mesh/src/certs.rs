//! Certificates for labs, demos and tests: a mesh CA and gateway certificates naming a cluster
//! in the URI SAN the link expects. Production certificates come from the operator's PKI (for
//! example cert-manager); nothing in the agent calls this.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::tls::{SAN_CLUSTER_SEGMENT, SAN_SCHEME};

/// A certificate authority that signs gateway certificates.
pub struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A gateway's certificate and key, PEM.
#[derive(Clone, Debug)]
pub struct GatewayCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl MeshCa {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM: a MeshPeer's `caBundle`.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A gateway certificate for `cluster` in trust domain `domain`, usable as server and
    /// client (each gateway is both).
    pub fn gateway(&self, domain: &str, cluster: &str) -> Result<GatewayCert, rcgen::Error> {
        self.gateway_with_uris(&[format!(
            "{SAN_SCHEME}{domain}{SAN_CLUSTER_SEGMENT}{cluster}"
        )])
    }

    /// A gateway certificate with exactly these URI SANs (tests use odd ones).
    pub fn gateway_with_uris(&self, uris: &[String]) -> Result<GatewayCert, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "weir mesh gateway");
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(GatewayCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl GatewayCert {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir` (the key readable by its owner only);
    /// returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)?;
        std::io::Write::write_all(&mut f, self.key_pem.as_bytes())?;
        Ok((cert, key))
    }
}
