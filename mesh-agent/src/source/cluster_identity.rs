//! Identity material from the cluster, in Linkerd's layout: the trust anchors from the
//! ConfigMap `linkerd-identity-trust-roots` (key `ca-bundle.crt`), the issuer from the Secret
//! `linkerd-identity-issuer` (keys `tls.crt` and `tls.key`, or `crt.pem` and `key.pem`), both in one namespace (`linkerd`
//! unless told otherwise). Both are read at start-up and then watched (by name: the agent's
//! Role names exactly these two objects), so a rotated issuer or a new anchor bundle takes
//! effect without a restart.
//!
//! A change is put in force only if the issuer it leaves in force chains to the anchors it
//! leaves in force; otherwise it is refused with the object and field named, the material in
//! force stays, and the pair is tried again when either object changes (a rotation may update
//! the Secret before the ConfigMap). A new issuer re-issues every certificate the node holds.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    api::Api,
    runtime::{watcher, WatchStreamExt as _},
    Client,
};
use tracing::{error, info, warn};

use crate::{
    identity::{ca::CertificateAuthority, manager::IdentityManager},
    tls::TrustBundle,
};

pub const TRUST_ROOTS: &str = "linkerd-identity-trust-roots";
pub const TRUST_ROOTS_KEY: &str = "ca-bundle.crt";
pub const ISSUER: &str = "linkerd-identity-issuer";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {object}: {source}")]
    Get {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object}: {field}: {message}")]
    Field {
        object: String,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Issuer(#[from] crate::identity::ca::Error),
}

/// The PEM texts of the trust anchors and the issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub anchors: String,
    pub issuer_cert: String,
    pub issuer_key: String,
}

impl Material {
    /// The issuer, checked to be one (the anchors are checked where they are put in force).
    pub fn issuer(&self, namespace: &str) -> Result<CertificateAuthority, Error> {
        let what = format!("Secret {namespace}/{ISSUER}");
        Ok(CertificateAuthority::from_pem_text(
            &self.issuer_cert,
            &self.issuer_key,
            &what,
        )?)
    }
}

fn anchors_of(map: &ConfigMap, namespace: &str) -> Result<String, Error> {
    map.data
        .as_ref()
        .and_then(|d| d.get(TRUST_ROOTS_KEY))
        .cloned()
        .ok_or_else(|| Error::Field {
            object: format!("ConfigMap {namespace}/{TRUST_ROOTS}"),
            field: format!("data[\"{TRUST_ROOTS_KEY}\"]"),
            message: "missing".to_owned(),
        })
}

/// The issuer certificate and key: `tls.crt`/`tls.key` (a `kubernetes.io/tls` Secret, as
/// cert-manager writes it), else `crt.pem`/`key.pem` (as `linkerd install` writes it).
fn issuer_of(secret: &Secret, namespace: &str) -> Result<(String, String), Error> {
    let data = secret.data.as_ref();
    let has = |key: &str| data.is_some_and(|d| d.contains_key(key));
    let (cert, key_name) = match has("tls.crt") || !has("crt.pem") {
        true => ("tls.crt", "tls.key"),
        false => ("crt.pem", "key.pem"),
    };
    let key = |key: &str| {
        let field = Error::Field {
            object: format!("Secret {namespace}/{ISSUER}"),
            field: format!("data[\"{key}\"]"),
            message: "missing".to_owned(),
        };
        let bytes = data.and_then(|d| d.get(key)).ok_or(field)?;
        String::from_utf8(bytes.0.clone()).map_err(|_| Error::Field {
            object: format!("Secret {namespace}/{ISSUER}"),
            field: format!("data[\"{key}\"]"),
            message: "not PEM text".to_owned(),
        })
    };
    Ok((key(cert)?, key(key_name)?))
}

/// Reads both objects once (start-up).
pub async fn fetch(client: &Client, namespace: &str) -> Result<Material, Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let map = maps.get(TRUST_ROOTS).await.map_err(|source| Error::Get {
        object: format!("ConfigMap {namespace}/{TRUST_ROOTS}"),
        source,
    })?;
    let secret = secrets.get(ISSUER).await.map_err(|source| Error::Get {
        object: format!("Secret {namespace}/{ISSUER}"),
        source,
    })?;
    let (issuer_cert, issuer_key) = issuer_of(&secret, namespace)?;
    Ok(Material {
        anchors: anchors_of(&map, namespace)?,
        issuer_cert,
        issuer_key,
    })
}

enum Seen {
    Anchors(Result<String, Error>),
    Issuer(Result<(String, String), Error>),
}

/// Follows both objects from `in_force` (what [`fetch`] returned and the agent started with)
/// and puts each valid, consistent change in force. Runs until the agent stops.
pub async fn follow(
    client: Client,
    namespace: String,
    in_force: Material,
    bundle: Arc<TrustBundle>,
    identities: Arc<IdentityManager>,
    trust_domain: String,
) {
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let ns = namespace.clone();
    let maps = watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &namespace),
        by_name(TRUST_ROOTS),
    )
    .default_backoff()
    .applied_objects()
    .map(move |r| r.map(|m| Seen::Anchors(anchors_of(&m, &ns))));
    let ns = namespace.clone();
    let secrets = watcher(
        Api::<Secret>::namespaced(client, &namespace),
        by_name(ISSUER),
    )
    .default_backoff()
    .applied_objects()
    .map(move |r| r.map(|s| Seen::Issuer(issuer_of(&s, &ns))));
    let mut events = futures::stream::select(maps.boxed(), secrets.boxed());
    let mut seen = in_force.clone();
    let mut in_force = in_force;
    // The last refused pair, so that one bad pair is logged once.
    let mut refused: Option<Material> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Seen::Anchors(Ok(anchors))) => seen.anchors = anchors,
            Ok(Seen::Issuer(Ok((cert, key)))) => {
                seen.issuer_cert = cert;
                seen.issuer_key = key;
            }
            Ok(Seen::Anchors(Err(e)) | Seen::Issuer(Err(e))) => {
                error!("{e}; the identity material in force stays");
                continue;
            }
            Err(e) => {
                warn!("watching the identity material in {namespace}: {e}; retrying with backoff");
                continue;
            }
        }
        if seen == in_force || refused.as_ref() == Some(&seen) {
            continue;
        }
        match put_in_force(
            &seen,
            &in_force,
            &namespace,
            &bundle,
            &identities,
            &trust_domain,
        ) {
            Ok(()) => {
                in_force = seen.clone();
                refused = None;
            }
            Err(e) => {
                error!(
                    "identity material in {namespace} refused: {e}; the material in force stays, \
                     and it is tried again when either object changes"
                );
                refused = Some(seen.clone());
            }
        }
    }
}

/// Puts `next` in force over `current`: the anchors (checked against the issuer that will be
/// in force), then the issuer.
fn put_in_force(
    next: &Material,
    current: &Material,
    namespace: &str,
    bundle: &TrustBundle,
    identities: &IdentityManager,
    trust_domain: &str,
) -> Result<(), Error> {
    let new_issuer =
        match next.issuer_cert != current.issuer_cert || next.issuer_key != current.issuer_key {
            true => Some(Arc::new(next.issuer(namespace)?)),
            false => None,
        };
    let issuer = new_issuer.clone().unwrap_or_else(|| identities.issuer());
    if next.anchors != current.anchors {
        bundle
            .replace(&next.anchors, &issuer, trust_domain)
            .map_err(|e| Error::Field {
                object: format!("ConfigMap {namespace}/{TRUST_ROOTS}"),
                field: format!("data[\"{TRUST_ROOTS_KEY}\"]"),
                message: e.to_string(),
            })?;
        info!(
            namespace,
            "trust anchors replaced from ConfigMap {TRUST_ROOTS}"
        );
    } else if let Some(ca) = &new_issuer {
        bundle
            .check_issuer(ca, trust_domain)
            .map_err(|e| Error::Field {
                object: format!("Secret {namespace}/{ISSUER}"),
                field: "data (the issuer certificate)".to_owned(),
                message: e.to_string(),
            })?;
    }
    if let Some(ca) = new_issuer {
        identities.set_issuer(ca);
    }
    Ok(())
}
