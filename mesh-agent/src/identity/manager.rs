//! Holds the certificates of the workloads on this node: mints them for the service accounts
//! of local pods, renews them at half life, drops them when no pod needs them.
//!
//! Credentials are built off the data path and published as `Arc`s; a handshake reads the
//! latest one, and connections already established keep the one they were made with.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{crypto::CryptoProvider, pki_types::CertificateDer, sign::CertifiedKey};
use tracing::{info, warn};

use super::{
    ca::{self, CertificateAuthority},
    Identity,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mint(#[from] ca::Error),
    #[error("loading the minted key for {identity}: {source}")]
    Key {
        identity: Identity,
        #[source]
        source: Box<rustls::Error>,
    },
}

/// One workload certificate and its key, ready for rustls.
#[derive(Debug)]
pub struct Credential {
    pub identity: Identity,
    pub certified_key: Arc<CertifiedKey>,
    pub serial: String,
    pub issued: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject of the issuer that signed it.
    pub issuer: Arc<str>,
}

impl Credential {
    /// Renewal is due at half of the lifetime, counted from issuance (not from the
    /// backdated `not_before`, which would make short lifetimes renew at once).
    fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued)
            .unwrap_or_default();
        self.issued + life / 2
    }

    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.certified_key.cert.first()
    }
}

/// What the admin endpoint shows of a credential.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateInfo {
    pub identity: String,
    pub serial: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub seconds_to_expiry: i64,
    pub issuer: String,
}

pub struct IdentityManager {
    /// The issuer in force, with its subject; replaced when the issuer rotates.
    ca: RwLock<(Arc<CertificateAuthority>, Arc<str>)>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    credentials: RwLock<HashMap<Identity, Arc<Credential>>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl IdentityManager {
    pub fn new(
        ca: CertificateAuthority,
        lifetime: Duration,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        let subject = ca.subject().into();
        Self {
            ca: RwLock::new((Arc::new(ca), subject)),
            lifetime,
            provider,
            credentials: RwLock::new(HashMap::new()),
        }
    }

    /// The current credential of `identity`, if this node holds it.
    pub fn get(&self, identity: &Identity) -> Option<Arc<Credential>> {
        self.credentials
            .read()
            .ok()
            .and_then(|c| c.get(identity).cloned())
    }

    /// The issuer in force.
    pub fn issuer(&self) -> Arc<CertificateAuthority> {
        match self.ca.read() {
            Ok(ca) => ca.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// Puts `ca` in force (a rotated issuer) and re-issues every credential held with it, so
    /// no certificate of the old issuer stays in use.
    pub fn set_issuer(&self, ca: Arc<CertificateAuthority>) {
        let subject: Arc<str> = ca.subject().into();
        info!(issuer = %subject, "issuer in force; re-issuing every certificate held");
        if let Ok(mut slot) = self.ca.write() {
            *slot = (ca, subject);
        }
        self.reissue(|_| true, "certificate re-issued by the new issuer");
    }

    fn mint(&self, identity: &Identity) -> Result<Arc<Credential>, Error> {
        let (ca, issuer) = match self.ca.read() {
            Ok(ca) => ca.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let leaf = ca.mint(identity, self.lifetime)?;
        let serial = crate::tls::serial(&leaf.chain[0]).unwrap_or_default();
        let certified_key =
            CertifiedKey::from_der(leaf.chain, leaf.key, &self.provider).map_err(|source| {
                Error::Key {
                    identity: identity.clone(),
                    source: Box::new(source),
                }
            })?;
        Ok(Arc::new(Credential {
            identity: identity.clone(),
            certified_key: Arc::new(certified_key),
            serial,
            issued: leaf.issued,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            issuer,
        }))
    }

    fn publish(&self, credential: Arc<Credential>) {
        if let Ok(mut map) = self.credentials.write() {
            map.insert(credential.identity.clone(), credential);
        }
    }

    /// Makes the held identities exactly `wanted`: mints what is missing, drops the rest.
    pub fn sync(&self, wanted: &HashSet<Identity>) {
        let held: HashSet<Identity> = self
            .credentials
            .read()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        for identity in wanted.difference(&held) {
            match self.mint(identity) {
                Ok(c) => {
                    info!(%identity, serial = %c.serial, "certificate issued");
                    self.publish(c);
                }
                Err(e) => warn!("{e}"),
            }
        }
        let gone: Vec<&Identity> = held.difference(wanted).collect();
        if !gone.is_empty() {
            if let Ok(mut map) = self.credentials.write() {
                for identity in gone {
                    map.remove(identity);
                    info!(%identity, "identity dropped: no pod on this node needs it");
                }
            }
        }
    }

    /// Renews every credential past half its life.
    pub fn renew_due(&self) {
        self.renew_due_at(SystemTime::now());
    }

    /// [`IdentityManager::renew_due`] as if the time were `now`.
    pub fn renew_due_at(&self, now: SystemTime) {
        self.reissue(|c| c.renew_at() <= now, "certificate renewed");
    }

    /// Mints anew every held credential `due` picks.
    fn reissue(&self, due: impl Fn(&Credential) -> bool, what: &str) {
        let due: Vec<Identity> = self
            .credentials
            .read()
            .map(|c| {
                c.values()
                    .filter(|c| due(c))
                    .map(|c| c.identity.clone())
                    .collect()
            })
            .unwrap_or_default();
        for identity in due {
            match self.mint(&identity) {
                Ok(c) => {
                    info!(%identity, serial = %c.serial, "{what}");
                    // Only if still wanted: sync may have dropped it meanwhile.
                    if let Ok(mut map) = self.credentials.write() {
                        if let Some(slot) = map.get_mut(&identity) {
                            *slot = c;
                        }
                    }
                }
                Err(e) => warn!("renewing: {e}"),
            }
        }
    }

    /// Renews credentials in the background, checking often enough for short lifetimes.
    pub async fn run_renewal(self: Arc<Self>) {
        let period =
            (self.lifetime / 20).clamp(Duration::from_millis(250), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            self.renew_due();
        }
    }

    pub fn list(&self) -> Vec<CertificateInfo> {
        let now = unix(SystemTime::now()) as i64;
        let mut out: Vec<CertificateInfo> = self
            .credentials
            .read()
            .map(|c| {
                c.values()
                    .map(|c| CertificateInfo {
                        identity: c.identity.to_string(),
                        serial: c.serial.clone(),
                        not_before_unix: unix(c.not_before),
                        not_after_unix: unix(c.not_after),
                        seconds_to_expiry: unix(c.not_after) as i64 - now,
                        issuer: c.issuer.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::identity::ca::DevCa;

    fn manager(lifetime: Duration) -> IdentityManager {
        let ca =
            CertificateAuthority::from_dev(&DevCa::generate("cluster.local").unwrap()).unwrap();
        IdentityManager::new(ca, lifetime, crate::tls::provider())
    }

    #[test]
    fn holds_exactly_the_wanted_identities() {
        let m = manager(Duration::from_secs(3600));
        let web = Identity::new("cluster.local", "shop", "web");
        let db = Identity::new("cluster.local", "shop", "db");
        m.sync(&[web.clone(), db.clone()].into_iter().collect());
        let first = m.get(&web).unwrap();
        assert!(m.get(&db).is_some());
        // The pod with db's service account left the node: its identity goes, web's stays.
        m.sync(&[web.clone()].into_iter().collect());
        assert!(m.get(&db).is_none());
        assert_eq!(
            m.get(&web).unwrap().serial,
            first.serial,
            "no needless re-issue"
        );
        assert_eq!(
            crate::tls::peer_identity(first.leaf().unwrap()).unwrap(),
            web
        );
    }

    #[test]
    fn renews_after_half_life_only() {
        let m = manager(Duration::from_secs(3600));
        let web = Identity::new("cluster.local", "shop", "web");
        m.sync(&[web.clone()].into_iter().collect());
        let old = m.get(&web).unwrap();
        let minute = Duration::from_secs(60);
        m.renew_due_at(old.issued + 29 * minute);
        assert_eq!(
            m.get(&web).unwrap().serial,
            old.serial,
            "renewed before half life"
        );
        m.renew_due_at(old.issued + 31 * minute);
        let new = m.get(&web).unwrap();
        assert_ne!(new.serial, old.serial, "not renewed after half life");
        assert!(new.not_after > old.not_after);
        // Whoever still holds the old credential keeps it intact.
        assert_eq!(crate::tls::peer_identity(old.leaf().unwrap()).unwrap(), web);
    }
}
