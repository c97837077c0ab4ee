//! TLS for the mesh: TLS 1.3 only, ring crypto, SPIFFE identities checked after the chain.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor, ResolvesClientCert,
    },
    crypto::{verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject as _, CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tracing::info;

use crate::identity::{
    ca,
    manager::{Credential, IdentityManager},
    Identity,
};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} SPIFFE URI SANs; exactly one is allowed")]
    ManySpiffeIds(usize),
    #[error("bad SPIFFE ID in certificate: {0}")]
    BadSpiffeId(#[from] crate::identity::ParseError),
    #[error(transparent)]
    Ca(#[from] ca::Error),
    #[error("trust anchors: {0}")]
    Roots(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("certificates from this issuer would not be trusted by the mesh's trust anchors ({0}); is --trust-anchors the bundle that signed --issuer-cert?")]
    IssuerNotTrusted(rustls::Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Parse(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                out.push((*uri).to_owned());
            }
        }
    }
    Ok(out)
}

/// The serial number of a certificate, as hex.
pub fn serial(cert: &CertificateDer<'_>) -> Result<String, Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Parse(e.to_string()))?;
    Ok(x509.raw_serial_as_string().replace(':', ""))
}

/// The one SPIFFE identity a certificate proves.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let spiffe: Vec<String> = uri_sans(cert)?
        .into_iter()
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    match spiffe.as_slice() {
        [] => Err(Error::NoSpiffeId),
        [one] => Ok(Identity::from_spiffe(one)?),
        many => Err(Error::ManySpiffeIds(many.len())),
    }
}

/// Where trust anchors come from.
#[derive(Debug, Clone)]
pub enum AnchorSource {
    /// One PEM bundle (Linkerd's `--identity-trust-anchors-file`).
    File(PathBuf),
    /// Every `*.pem` in a directory, re-read when it changes (`--dev-ca`: each agent writes its
    /// own throwaway anchor there).
    Directory(PathBuf),
    /// A PEM bundle held in memory (from the cluster: Linkerd's `linkerd-identity-trust-roots`
    /// ConfigMap), replaced with [`TrustBundle::replace`] when it changes.
    Pem(String),
}

struct Anchors {
    fingerprint: Vec<(PathBuf, Option<SystemTime>)>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// The trust anchors both TLS sides verify against.
pub struct TrustBundle {
    source: AnchorSource,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Anchors>>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("source", &self.source)
            .finish()
    }
}

impl TrustBundle {
    pub fn load(source: AnchorSource, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let anchors = Self::read(&source, &provider)?;
        Ok(Self {
            source,
            provider,
            current: RwLock::new(Arc::new(anchors)),
        })
    }

    fn files(source: &AnchorSource) -> Vec<PathBuf> {
        match source {
            AnchorSource::Pem(_) => Vec::new(),
            AnchorSource::File(p) => vec![p.clone()],
            AnchorSource::Directory(d) => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "pem"))
                    .collect();
                files.sort();
                files
            }
        }
    }

    fn fingerprint(source: &AnchorSource) -> Vec<(PathBuf, Option<SystemTime>)> {
        Self::files(source)
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
                (p, m)
            })
            .collect()
    }

    fn read(source: &AnchorSource, provider: &Arc<CryptoProvider>) -> Result<Anchors, Error> {
        let fingerprint = Self::fingerprint(source);
        let mut roots = RootCertStore::empty();
        for (file, _) in &fingerprint {
            for cert in ca::read_certificates(file)? {
                roots
                    .add(cert)
                    .map_err(|e| Error::Roots(format!("{}: {e}", file.display())))?;
            }
        }
        if let AnchorSource::Pem(pem) = source {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| Error::Roots(format!("not PEM: {e}")))?;
                roots.add(cert).map_err(|e| Error::Roots(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            let source = match source {
                AnchorSource::Pem(_) => "the PEM bundle".to_owned(),
                other => format!("{other:?}"),
            };
            return Err(Error::Roots(format!("no trust anchors in {source}")));
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| Error::Roots(e.to_string()))?;
        Ok(Anchors {
            fingerprint,
            roots,
            client_verifier,
        })
    }

    fn anchors(&self) -> Arc<Anchors> {
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the anchors if their files changed. Returns whether anything changed.
    pub fn refresh(&self) -> bool {
        let now = Self::fingerprint(&self.source);
        if now == self.anchors().fingerprint {
            return false;
        }
        match Self::read(&self.source, &self.provider) {
            Ok(anchors) => {
                info!(anchors = anchors.roots.len(), "trust anchors reloaded");
                if let Ok(mut slot) = self.current.write() {
                    *slot = Arc::new(anchors);
                }
                true
            }
            Err(e) => {
                tracing::warn!("keeping the previous trust anchors: {e}");
                false
            }
        }
    }

    /// Replaces the anchors with those of `pem` if `ca` (the issuer that will be in force)
    /// chains to them; else keeps the current ones.
    pub fn replace(
        &self,
        pem: &str,
        ca: &ca::CertificateAuthority,
        trust_domain: &str,
    ) -> Result<(), Error> {
        let candidate = Self::load(AnchorSource::Pem(pem.to_owned()), self.provider.clone())?;
        candidate.check_issuer(ca, trust_domain)?;
        let anchors = candidate.anchors();
        if let Ok(mut slot) = self.current.write() {
            *slot = anchors;
        }
        Ok(())
    }

    /// Start-up check: a certificate minted by `ca` verifies against these anchors.
    pub fn check_issuer(
        &self,
        ca: &ca::CertificateAuthority,
        trust_domain: &str,
    ) -> Result<(), Error> {
        let probe = Identity::new(trust_domain, "mesh-agent", "issuer-check");
        let leaf = ca.mint(&probe, std::time::Duration::from_secs(60))?;
        let (end_entity, intermediates) = leaf.chain.split_first().ok_or(Error::NoSpiffeId)?;
        self.verify_chain(end_entity, intermediates, UnixTime::now())
            .map_err(Error::IssuerNotTrusted)
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let algs = self.provider.signature_verification_algorithms.all;
        self.verify_with_refresh(|anchors| {
            verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &anchors.roots,
                intermediates,
                now,
                algs,
            )
        })
    }

    /// Runs `verify` against the current anchors; if the issuer is unknown and the anchors
    /// changed on disk (another agent's `--dev-ca` anchor appeared), once more with the new.
    fn verify_with_refresh<T>(
        &self,
        verify: impl Fn(&Anchors) -> Result<T, rustls::Error>,
    ) -> Result<T, rustls::Error> {
        match verify(&self.anchors()) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
                if self.refresh() =>
            {
                verify(&self.anchors())
            }
            other => other,
        }
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not allowed in the mesh".into())
}

fn identity_error(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Verifies a client: chain to the trust anchors (client auth usage), then a SPIFFE ID in our
/// trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle.verify_with_refresh(|anchors| {
            anchors
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now)
        })?;
        let id = peer_identity(end_entity).map_err(identity_error)?;
        if id.trust_domain() != self.trust_domain {
            return Err(rustls::Error::General(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.schemes()
    }
}

/// Verifies a server: chain to the trust anchors, then exactly the expected SPIFFE ID. The
/// DNS name in SNI only selects the certificate; the URI SAN is what is checked.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.bundle.verify_chain(end_entity, intermediates, now)?;
        let id = peer_identity(end_entity).map_err(identity_error)?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.schemes()
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Picks the certificate of the workload the client names in SNI (its Linkerd-style name).
#[derive(Debug)]
struct SniResolver(Arc<IdentityManager>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = Identity::from_linkerd(hello.server_name()?).ok()?;
        Some(self.0.get(&id)?.certified_key.clone())
    }
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityManager")
    }
}

/// Builds the TLS configurations of the node agent.
pub struct MeshTls {
    pub bundle: Arc<TrustBundle>,
    pub trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl MeshTls {
    pub fn new(bundle: Arc<TrustBundle>, trust_domain: String) -> Self {
        let provider = bundle.provider.clone();
        Self {
            bundle,
            trust_domain,
            provider,
        }
    }

    /// The inbound (:15008) configuration: mandatory client certificates, ALPN h2.
    pub fn server_config(&self, identities: Arc<IdentityManager>) -> Result<ServerConfig, Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                bundle: self.bundle.clone(),
                trust_domain: self.trust_domain.clone(),
            }))
            .with_cert_resolver(Arc::new(SniResolver(identities)));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }

    /// A client configuration presenting `source` and expecting `destination`.
    pub fn client_config(
        &self,
        source: &Credential,
        destination: &Identity,
    ) -> Result<ClientConfig, Error> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                bundle: self.bundle.clone(),
                expected: destination.clone(),
            }))
            .with_client_cert_resolver(Arc::new(FixedClientCert(source.certified_key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}
