//! Authorization: Linkerd's and Istio's models, compiled, and the one pure decision per
//! connection or request ([`authorize`]).
//!
//! The store compiles policy objects into a [`PolicyIndex`] (per namespace). For a pod of this
//! node, [`PolicyIndex::for_pod`] picks what applies to it (its Servers, the Istio policies that
//! select it, its default policy) into a [`PodPolicy`], which the proxy keeps per tunnel or
//! connection. Each connection, and each request of HTTP, then costs one [`authorize`] call:
//! no I/O, and no allocation unless a `when` condition reads `source.ip` or
//! `destination.port`.
//!
//! How the two models combine on one workload is written down in `docs/policy.md`.

pub mod kernel;
pub mod model;

use std::{net::IpAddr, sync::Arc};

pub use model::*;

use crate::{identity::Identity, route::Head};

/// What the agent's flags say about policy.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Linkerd's cluster-wide default inbound policy.
    pub default: DefaultPolicy,
    /// The cluster's networks, for the `cluster-*` default policies.
    pub cluster_networks: Arc<[Cidr]>,
    /// Leave open connections a policy change denies.
    pub keep_denied_connections: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            default: DefaultPolicy::AllUnauthenticated,
            cluster_networks: default_cluster_networks().into(),
            keep_denied_connections: false,
        }
    }
}

impl serde::Serialize for Defaults {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({
            "default_inbound_policy": self.default.name(),
            "cluster_networks": self.cluster_networks.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "keep_denied_connections": self.keep_denied_connections,
        })
        .serialize(s)
    }
}

/// What is known of one inbound connection or request when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The pod's port the client connected to.
    pub port: u16,
    /// The client's verified identity (mTLS, or in-process on the same node); `None` for a
    /// plaintext client.
    pub client: Option<&'a Client>,
    /// The client's address, when known.
    pub ip: Option<IpAddr>,
    /// The request, for HTTP; `None` for a TCP connection.
    pub http: Option<Http<'a>>,
}

/// A verified client identity with the forms policies compare against, made once per
/// connection (not per rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub identity: Identity,
    /// Istio's principal: `cluster.local/ns/<ns>/sa/<sa>`.
    pub principal: String,
    /// Linkerd's identity: `<sa>.<ns>.serviceaccount.identity.linkerd.<trust domain>`.
    pub linkerd: String,
}

impl Client {
    pub fn new(identity: Identity) -> Client {
        Client {
            principal: istio_principal(&identity),
            linkerd: identity.to_linkerd(),
            identity,
        }
    }

    pub fn namespace(&self) -> &str {
        match &self.identity {
            Identity::Spiffe { namespace, .. } => namespace,
        }
    }
}

/// The parts of an HTTP request that policy reads.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub head: Head<'a>,
    /// `:authority` or `Host`, without the port.
    pub host: Option<&'a str>,
}

/// Who decided, as Linkerd's metrics name it (`authz_kind`, `authz_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    /// `default`, `authorizationpolicy`, `peerauthentication`, `route` (no route matched).
    pub kind: &'static str,
    /// `policy.linkerd.io`, `security.istio.io`, or empty for a default.
    pub group: &'static str,
    /// The policy's name (`namespace/name` for Istio policies of the root namespace), or the
    /// default policy's name.
    pub name: Arc<str>,
}

/// The Server (`srv_kind`, `srv_name`) the port falls under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLabel {
    /// `server` or `default`.
    pub kind: &'static str,
    pub name: Arc<str>,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The authorization that allowed it, or the policy that denied it.
    pub authz: Authz,
    pub server: ServerLabel,
    /// The Linkerd route (`namespace/name`) the request matched on its Server.
    pub route: Option<Arc<str>>,
    /// A policy in audit mode that would have denied this (it is allowed, logged and counted).
    pub audit: Option<Authz>,
    /// For a denial: the status an HTTP client gets (403, or 404 when no route of the Server
    /// matched, as Linkerd).
    pub status: u16,
}

/// The one decision: may this connection (or request) reach the pod?
///
/// Both models apply and both must allow: Istio's DENY policies first, then Linkerd's Server
/// or default policy, then Istio's ALLOW policies; the first that denies names the denial.
/// AUDIT policies and Linkerd's `audit` never deny; a denial they would have made is returned
/// in [`Verdict::audit`].
pub fn authorize(policy: &PodPolicy, req: &Inbound) -> Verdict {
    let mut audit = None;
    // PeerAuthentication: STRICT refuses what is not mutual TLS.
    if req.client.is_none() {
        if let (PeerMode::Strict, Some(name)) = policy.peer_mode(req.port) {
            return policy.denied(req, Authz::istio("peerauthentication", name), None, 403);
        }
    }
    // Istio DENY.
    if let Some(p) = policy
        .istio
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(req))
    {
        return policy.denied(req, p.authz(), None, 403);
    }
    for p in policy.istio.iter().filter(|p| p.action == Action::Audit) {
        if audit.is_none() && p.matches(req) {
            audit = Some(p.authz());
        }
    }
    // Linkerd.
    let linkerd = policy.linkerd(req);
    if !linkerd.allowed {
        return linkerd;
    }
    let mut verdict = linkerd;
    if verdict.audit.is_none() {
        verdict.audit = audit;
    }
    // Istio ALLOW: once one selects the pod, a request must match one of them.
    let mut allows = policy
        .istio
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_some() {
        let mut first = None;
        let mut matched = None;
        for p in allows {
            first.get_or_insert(p);
            if p.matches(req) {
                matched = Some(p);
                break;
            }
        }
        match (matched, first) {
            (Some(p), _) => verdict.authz = p.authz(),
            (None, Some(p)) => {
                return Verdict {
                    audit: verdict.audit,
                    ..policy.denied(req, p.authz(), verdict.route.clone(), 403)
                };
            }
            (None, None) => {}
        }
    }
    verdict
}

impl PodPolicy {
    fn denied(&self, req: &Inbound, authz: Authz, route: Option<Arc<str>>, status: u16) -> Verdict {
        Verdict {
            allowed: false,
            authz,
            server: self.server_label(req.port),
            route,
            audit: None,
            status,
        }
    }

    /// Linkerd's decision: the port's Server and its authorizations, else the default policy.
    fn linkerd(&self, req: &Inbound) -> Verdict {
        let Some(server) = self.server_for(req.port) else {
            let default = self.default;
            let allowed = default.admits(req, &self.cluster_networks);
            let authz = Authz::default_policy(default);
            return Verdict {
                allowed,
                audit: (default == DefaultPolicy::Audit).then(|| authz.clone()),
                authz,
                server: ServerLabel {
                    kind: "default",
                    name: default.shared_name(),
                },
                route: None,
                status: 403,
            };
        };
        let label = ServerLabel {
            kind: "server",
            name: server.server.name.clone(),
        };
        // HTTP on a Server with routes: the request's route decides, and one no route matches
        // is not found (404), as Linkerd answers it.
        // A route's own authorizations, then the Server's (which apply to all its routes).
        let (authorizations, route) = match (&req.http, &server.routes) {
            (Some(http), Some(table)) => match table.select(&http.head) {
                Some((rule, _)) => {
                    let name: Arc<str> = rule.route.as_str().into();
                    let found = server
                        .route_authorizations
                        .iter()
                        .find(|(r, _)| **r == *name)
                        .map(|(_, a)| a.as_slice())
                        .unwrap_or_default();
                    (found, Some(name))
                }
                None => {
                    return Verdict {
                        allowed: false,
                        authz: Authz {
                            kind: "route",
                            group: "",
                            name: not_found(),
                        },
                        server: label,
                        route: None,
                        audit: None,
                        status: 404,
                    }
                }
            },
            _ => (server.authorizations.as_slice(), None),
        };
        let server_level = match route {
            Some(_) => server.authorizations.as_slice(),
            None => &[],
        };
        let found = authorizations
            .iter()
            .chain(server_level)
            .chain(server.namespace_authorizations.iter())
            .find(|a| a.admits(req));
        if let Some(a) = found {
            return Verdict {
                allowed: true,
                authz: Authz {
                    kind: "authorizationpolicy",
                    group: "policy.linkerd.io",
                    name: a.name.clone(),
                },
                server: label,
                route,
                audit: None,
                status: 403,
            };
        }
        // No authorization: the Server's access policy (deny unless it says otherwise).
        let access = server.server.access;
        let authz = Authz::default_policy(access);
        Verdict {
            allowed: access.admits(req, &self.cluster_networks),
            audit: (access == DefaultPolicy::Audit).then(|| authz.clone()),
            authz,
            server: label,
            route,
            status: 403,
        }
    }

    fn server_label(&self, port: u16) -> ServerLabel {
        match self.server_for(port) {
            Some(s) => ServerLabel {
                kind: "server",
                name: s.server.name.clone(),
            },
            None => ServerLabel {
                kind: "default",
                name: self.default.shared_name(),
            },
        }
    }
}

/// The name of a denial for want of a route, shared.
fn not_found() -> Arc<str> {
    static NAME: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| "not-found".into()).clone()
}

impl Authz {
    fn default_policy(policy: DefaultPolicy) -> Authz {
        Authz {
            kind: "default",
            group: "",
            name: policy.shared_name(),
        }
    }

    fn istio(kind: &'static str, name: &Arc<str>) -> Authz {
        Authz {
            kind,
            group: "security.istio.io",
            name: name.clone(),
        }
    }
}

impl IstioPolicy {
    fn authz(&self) -> Authz {
        Authz::istio("authorizationpolicy", &self.label)
    }
}

#[cfg(test)]
mod tests;
