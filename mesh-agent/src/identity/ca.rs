//! The issuer that mints workload certificates, from Linkerd-style files or generated for
//! development.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a usable issuer ({what}): {source}")]
    Issuer {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("minting a certificate for {identity}: {source}")]
    Mint {
        identity: Identity,
        #[source]
        source: rcgen::Error,
    },
    #[error("generating the development CA: {0}")]
    Generate(#[source] rcgen::Error),
    #[error(
        "the issuer expired; mint a new one (Linkerd: rotate the identity issuer certificate)"
    )]
    IssuerExpired,
}

/// A freshly minted workload certificate. The key lives only in memory.
pub struct Leaf {
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// When it was minted (`not_before` is backdated for clock skew).
    pub issued: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Mints leaves signed by one issuer.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: CertificateDer<'static>,
    /// Leaves never outlive their issuer.
    issuer_not_after: SystemTime,
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (a trust bundle may hold several).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// PEM texts of a development CA: a trust anchor and an issuer signed by it.
pub struct DevCa {
    pub anchor_pem: String,
    pub issuer_pem: String,
    pub issuer_key_pem: String,
}

fn ca_params(common_name: &str, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + lifetime;
    params
}

impl DevCa {
    /// A throwaway anchor and issuer (valid one year).
    pub fn generate(trust_domain: &str) -> Result<DevCa, Error> {
        let year = Duration::from_secs(365 * 24 * 3600);
        let anchor_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Generate)?;
        let anchor_params = ca_params(&format!("root.{trust_domain} (mesh-agent dev)"), year);
        let anchor = anchor_params
            .self_signed(&anchor_key)
            .map_err(Error::Generate)?;
        let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Generate)?;
        let issuer = ca_params(&format!("issuer.{trust_domain} (mesh-agent dev)"), year)
            .signed_by(&issuer_key, &Issuer::new(anchor_params, anchor_key))
            .map_err(Error::Generate)?;
        Ok(DevCa {
            anchor_pem: anchor.pem(),
            issuer_pem: issuer.pem(),
            issuer_key_pem: issuer_key.serialize_pem(),
        })
    }
}

impl CertificateAuthority {
    /// Linkerd's install model: the issuer certificate and key from files.
    pub fn from_files(issuer_cert: &Path, issuer_key: &Path) -> Result<Self, Error> {
        let issuer_der = read_certificates(issuer_cert)?.remove(0);
        Self::from_pem(
            &read(issuer_cert)?,
            &read(issuer_key)?,
            issuer_der,
            issuer_cert,
            issuer_key,
        )
    }

    /// From PEM texts held in memory (Linkerd's `linkerd-identity-issuer` Secret); `what`
    /// names where they came from in errors.
    pub fn from_pem_text(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, Error> {
        let what = Path::new(what);
        let issuer_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| {
            Error::NoCertificate {
                path: what.to_owned(),
            }
        })?;
        Self::from_pem(cert_pem, key_pem, issuer_der, what, what)
    }

    /// The issuer certificate's subject, as an operator reads it (`CN=identity.linkerd...`).
    pub fn subject(&self) -> String {
        x509_parser::parse_x509_certificate(self.issuer_der.as_ref())
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default()
    }

    pub fn from_dev(ca: &DevCa) -> Result<Self, Error> {
        let issuer_der =
            CertificateDer::from_pem_slice(ca.issuer_pem.as_bytes()).map_err(|_| {
                Error::NoCertificate {
                    path: "<dev issuer>".into(),
                }
            })?;
        let dev = Path::new("<dev issuer>");
        Self::from_pem(&ca.issuer_pem, &ca.issuer_key_pem, issuer_der, dev, dev)
    }

    fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        issuer_der: CertificateDer<'static>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| Error::Issuer {
            path: key_path.to_owned(),
            what: "private key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| Error::Issuer {
            path: cert_path.to_owned(),
            what: "certificate",
            source,
        })?;
        let issuer_not_after = x509_parser::parse_x509_certificate(issuer_der.as_ref())
            .ok()
            .and_then(|(_, c)| {
                let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            })
            .ok_or_else(|| Error::NoCertificate {
                path: cert_path.to_owned(),
            })?;
        Ok(Self {
            issuer,
            issuer_der,
            issuer_not_after,
        })
    }

    /// A new ECDSA P-256 leaf for `identity`, valid for `lifetime` (backdated a minute for
    /// clock skew), usable as TLS client and server.
    pub fn mint(&self, identity: &Identity, lifetime: Duration) -> Result<Leaf, Error> {
        let fail = |source| Error::Mint {
            identity: identity.clone(),
            source,
        };
        if SystemTime::now() >= self.issuer_not_after {
            return Err(Error::IssuerExpired);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_linkerd());
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().map_err(fail)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = (now + lifetime).min(self.issuer_not_after);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            issued: now,
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn issuer_must_chain_to_the_anchors() {
        let mine = DevCa::generate("cluster.local").unwrap();
        let other = DevCa::generate("cluster.local").unwrap();
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let anchors = dir.join("anchors.pem");
        std::fs::write(&anchors, &other.anchor_pem).unwrap();
        let bundle = crate::tls::TrustBundle::load(
            crate::tls::AnchorSource::File(anchors.clone()),
            crate::tls::provider(),
        )
        .unwrap();
        let ca = CertificateAuthority::from_dev(&mine).unwrap();
        let err = bundle.check_issuer(&ca, "cluster.local").unwrap_err();
        assert!(err.to_string().contains("would not be trusted"), "{err}");
        std::fs::write(&anchors, &mine.anchor_pem).unwrap();
        assert!(bundle.refresh());
        bundle.check_issuer(&ca, "cluster.local").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn minted_leaf_carries_the_spiffe_id() {
        let ca =
            CertificateAuthority::from_dev(&DevCa::generate("cluster.local").unwrap()).unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let leaf = ca.mint(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(leaf.chain.len(), 2);
        let uris = crate::tls::uri_sans(&leaf.chain[0]).unwrap();
        assert_eq!(
            uris,
            vec!["spiffe://cluster.local/ns/shop/sa/web".to_owned()]
        );
    }
}
