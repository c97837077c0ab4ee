//! Workload identities: SPIFFE IDs, their Linkerd-style names, and the certificates that
//! prove them.

pub mod ca;
pub mod manager;

use std::{fmt, str::FromStr};

/// The default trust domain (as in Linkerd and Istio).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Identity {
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`
    Spiffe {
        trust_domain: String,
        namespace: String,
        service_account: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is neither a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>) nor a Linkerd identity (<sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain>)")]
    Unrecognised(String),
    #[error("{0:?}: namespace, service account and trust domain must be non-empty DNS labels")]
    BadPart(String),
}

const LINKERD_INFIX: &str = ".serviceaccount.identity.linkerd.";

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn trust_domain_ok(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(dns_label)
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity::Spiffe {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        match self {
            Identity::Spiffe { trust_domain, .. } => trust_domain,
        }
    }

    /// Parses `spiffe://td/ns/<ns>/sa/<sa>`.
    pub fn from_spiffe(s: &str) -> Result<Self, ParseError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| ParseError::Unrecognised(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(ParseError::Unrecognised(s.to_owned()));
        };
        Self::checked(s, td, ns, sa)
    }

    /// Parses Linkerd's `<sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain>`.
    pub fn from_linkerd(s: &str) -> Result<Self, ParseError> {
        let (sa_ns, td) = s
            .split_once(LINKERD_INFIX)
            .ok_or_else(|| ParseError::Unrecognised(s.to_owned()))?;
        let (sa, ns) = sa_ns
            .split_once('.')
            .ok_or_else(|| ParseError::Unrecognised(s.to_owned()))?;
        Self::checked(s, td, ns, sa)
    }

    fn checked(input: &str, td: &str, ns: &str, sa: &str) -> Result<Self, ParseError> {
        if !(trust_domain_ok(td) && dns_label(ns) && sa_ok(sa)) {
            return Err(ParseError::BadPart(input.to_owned()));
        }
        Ok(Self::new(td, ns, sa))
    }

    /// The Linkerd-style DNS name of this identity; also the SNI that asks a node agent
    /// for this workload's certificate.
    pub fn to_linkerd(&self) -> String {
        match self {
            Identity::Spiffe {
                trust_domain,
                namespace,
                service_account,
            } => format!("{service_account}.{namespace}{LINKERD_INFIX}{trust_domain}"),
        }
    }
}

/// Service account names are DNS subdomains in Kubernetes, but a dot would make the Linkerd
/// form ambiguous; like Linkerd, we accept labels only.
fn sa_ok(s: &str) -> bool {
    dns_label(s)
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Spiffe {
                trust_domain,
                namespace,
                service_account,
            } => write!(
                f,
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            ),
        }
    }
}

impl FromStr for Identity {
    type Err = ParseError;

    /// Either form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("spiffe://") {
            Self::from_spiffe(s)
        } else {
            Self::from_linkerd(s)
        }
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn spiffe_and_linkerd_forms_are_one_identity() {
        let a: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let b: Identity = "web.shop.serviceaccount.identity.linkerd.cluster.local"
            .parse()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(a.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            a.to_linkerd(),
            "web.shop.serviceaccount.identity.linkerd.cluster.local"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe:///ns/shop/sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "web.shop.serviceaccount.identity.linkerd.",
            "web.serviceaccount.identity.linkerd.cluster.local",
            "example.com",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
    }
}
