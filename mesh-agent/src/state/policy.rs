//! The policy objects mesh-agent reads (Linkerd's `Server`, `AuthorizationPolicy`,
//! `MeshTLSAuthentication`, `NetworkAuthentication`; Istio's `AuthorizationPolicy` and
//! `PeerAuthentication`), validated and compiled into [`crate::policy`]'s model. Every error
//! names the field; fields we cannot enforce are refused by name, never ignored.

use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::manifest::{field, IntOrString, ObjectMeta, Problem};
use crate::policy::{self as p, Cidr, DefaultPolicy, IdentityMatch, LabelSelector, StrMatch};

/// A policy object as written; which model it belongs to is in its `apiVersion`.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct PolicyManifest {
    pub metadata: ObjectMeta,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Hash)]
pub enum PolicySpec {
    Server(ServerSpec),
    LinkerdAuthorization(AuthorizationPolicySpec),
    MeshTls(MeshTlsSpec),
    Network(NetworkSpec),
    IstioAuthorization(AuthorizationPolicySpec),
    PeerAuthentication(PeerAuthenticationSpec),
}

/// A compiled policy object, as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Compiled {
    Server(p::Server),
    LinkerdAuthorization(p::LinkerdAuthorization),
    /// Shared by every authorization that refers to it.
    Authentication(Arc<p::Authentication>),
    Istio(p::IstioPolicy),
    Peer(p::PeerAuthentication),
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<SelectorExpression>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct SelectorExpression {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    #[serde(default)]
    pub pod_selector: Option<Selector>,
    #[serde(default)]
    pub workload_selector: Option<Selector>,
    #[serde(default)]
    pub port: Option<IntOrString>,
    #[serde(default)]
    pub proxy_protocol: Option<String>,
    #[serde(default)]
    pub access_policy: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ref {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// The fields of both AuthorizationPolicy kinds (Linkerd's and Istio's share the kind name).
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub target_ref: Option<Ref>,
    #[serde(default)]
    pub required_authentication_refs: Option<Vec<Ref>>,
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub target_refs: Option<Vec<Ref>>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub provider: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<WhenSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct FromSpec {
    #[serde(default)]
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct ToSpec {
    #[serde(default)]
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationSpec {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WhenSpec {
    #[serde(default)]
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshTlsSpec {
    #[serde(default)]
    pub identities: Option<Vec<String>>,
    #[serde(default)]
    pub identity_refs: Option<Vec<Ref>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct NetworkSpec {
    #[serde(default)]
    pub networks: Vec<NetworkEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct NetworkEntry {
    #[serde(default)]
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<String, MtlsSpec>>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct MtlsSpec {
    #[serde(default)]
    pub mode: Option<String>,
}

impl PolicyManifest {
    /// The object compiled; every error names its field.
    pub fn compile(&self) -> Result<Compiled, Problem> {
        let ns: Arc<str> = self.metadata.namespace().into();
        let name: Arc<str> = self.metadata.name.as_str().into();
        let created = self.metadata.creation_timestamp.clone();
        Ok(match &self.spec {
            PolicySpec::Server(s) => Compiled::Server(server(s, ns, name, created)?),
            PolicySpec::LinkerdAuthorization(s) => {
                Compiled::LinkerdAuthorization(linkerd_authorization(s, ns, name)?)
            }
            PolicySpec::MeshTls(s) => Compiled::Authentication(Arc::new(mesh_tls(s, &ns)?)),
            PolicySpec::Network(s) => Compiled::Authentication(Arc::new(network(s)?)),
            PolicySpec::IstioAuthorization(s) => Compiled::Istio(istio_authorization(s, ns, name)?),
            PolicySpec::PeerAuthentication(s) => Compiled::Peer(peer(s, ns, name, created)?),
        })
    }
}

fn selector(s: &Selector, at: &str) -> Result<LabelSelector, Problem> {
    let mut expressions = Vec::new();
    for (i, e) in s.match_expressions.iter().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        let key = e.key.clone();
        expressions.push(match e.operator.as_str() {
            "In" => p::Expression::In(key, e.values.clone()),
            "NotIn" => p::Expression::NotIn(key, e.values.clone()),
            "Exists" => p::Expression::Exists(key),
            "DoesNotExist" => p::Expression::DoesNotExist(key),
            other => {
                return Err(field(
                    &format!("{at}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ))
            }
        });
    }
    Ok(LabelSelector {
        labels: s
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        expressions,
    })
}

fn default_policy(value: &str, at: &str) -> Result<DefaultPolicy, Problem> {
    value.parse().map_err(|e: String| field(at, e))
}

fn server(
    s: &ServerSpec,
    namespace: Arc<str>,
    name: Arc<str>,
    created: Option<String>,
) -> Result<p::Server, Problem> {
    if s.workload_selector.is_some() {
        return Err(field(
            "spec.workloadSelector",
            "external workloads are not supported; select pods with spec.podSelector",
        ));
    }
    let selector = match &s.pod_selector {
        Some(sel) => selector(sel, "spec.podSelector")?,
        None => return Err(field("spec.podSelector", "missing")),
    };
    let port = match &s.port {
        Some(IntOrString::Int(n)) if *n > 0 => p::PortRef::Number(*n),
        Some(IntOrString::Int(n)) => {
            return Err(field("spec.port", format!("{n} is not a port (1-65535)")))
        }
        Some(IntOrString::String(name)) if !name.is_empty() => p::PortRef::Name(name.clone()),
        _ => return Err(field("spec.port", "missing")),
    };
    const PROTOCOLS: [&str; 6] = ["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"];
    if let Some(proto) = &s.proxy_protocol {
        if !PROTOCOLS.contains(&proto.as_str()) {
            return Err(field(
                "spec.proxyProtocol",
                format!("{proto:?} is not one of {}", PROTOCOLS.join(", ")),
            ));
        }
    }
    let access = match &s.access_policy {
        Some(a) => default_policy(a, "spec.accessPolicy")?,
        None => DefaultPolicy::Deny,
    };
    Ok(p::Server {
        namespace,
        name,
        created,
        selector,
        port,
        proxy_protocol: s.proxy_protocol.clone(),
        access,
    })
}

fn is_core(group: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core"))
}

fn linkerd_authorization(
    s: &AuthorizationPolicySpec,
    namespace: Arc<str>,
    name: Arc<str>,
) -> Result<p::LinkerdAuthorization, Problem> {
    for (set, f) in [
        (s.selector.is_some(), "selector"),
        (s.target_refs.is_some(), "targetRefs"),
        (s.action.is_some(), "action"),
        (s.rules.is_some(), "rules"),
    ] {
        if set {
            return Err(field(
                &format!("spec.{f}"),
                "is an Istio field; a policy.linkerd.io AuthorizationPolicy has targetRef and requiredAuthenticationRefs",
            ));
        }
    }
    let Some(target) = &s.target_ref else {
        return Err(field("spec.targetRef", "missing"));
    };
    let kind = target.kind.as_deref().unwrap_or_default();
    let target = match kind {
        "Server" => p::LinkerdTarget::Server(target.name.clone()),
        "HTTPRoute" | "GRPCRoute" => p::LinkerdTarget::Route(target.name.clone()),
        "Namespace" if is_core(target.group.as_deref()) => {
            p::LinkerdTarget::Namespace(target.name.clone())
        }
        other => {
            return Err(field(
                "spec.targetRef.kind",
                format!("{other:?} is not Server, HTTPRoute, GRPCRoute or Namespace"),
            ))
        }
    };
    if let p::LinkerdTarget::Namespace(n) = &target {
        if **n != *namespace {
            return Err(field(
                "spec.targetRef.name",
                format!("{n:?}: a policy can only target its own namespace ({namespace:?})"),
            ));
        }
    }
    let mut required = Vec::new();
    for (i, r) in s.required_authentication_refs.iter().flatten().enumerate() {
        let at = format!("spec.requiredAuthenticationRefs[{i}]");
        let ns = r.namespace.clone().unwrap_or_else(|| namespace.to_string());
        let name = r.name.clone();
        if name.is_empty() {
            return Err(field(&format!("{at}.name"), "missing"));
        }
        required.push(match r.kind.as_deref().unwrap_or_default() {
            "MeshTLSAuthentication" => p::AuthnRef::MeshTls {
                namespace: ns,
                name,
            },
            "NetworkAuthentication" => p::AuthnRef::Network {
                namespace: ns,
                name,
            },
            "ServiceAccount" if is_core(r.group.as_deref()) => p::AuthnRef::ServiceAccount {
                namespace: ns,
                name,
            },
            other => {
                return Err(field(
                    &format!("{at}.kind"),
                    format!(
                        "{other:?} is not MeshTLSAuthentication, NetworkAuthentication or ServiceAccount"
                    ),
                ))
            }
        });
    }
    Ok(p::LinkerdAuthorization {
        namespace,
        name,
        target,
        required,
    })
}

fn mesh_tls(s: &MeshTlsSpec, namespace: &str) -> Result<p::Authentication, Problem> {
    let mut ids = Vec::new();
    for (i, id) in s.identities.iter().flatten().enumerate() {
        ids.push(IdentityMatch::parse(id).map_err(|e| field(&format!("spec.identities[{i}]"), e))?);
    }
    for (i, r) in s.identity_refs.iter().flatten().enumerate() {
        let at = format!("spec.identityRefs[{i}]");
        let ns = r.namespace.clone().unwrap_or_else(|| namespace.to_owned());
        ids.push(match r.kind.as_deref().unwrap_or_default() {
            "ServiceAccount" if r.name == "*" => IdentityMatch::Namespace(ns),
            "ServiceAccount" if !r.name.is_empty() => IdentityMatch::ServiceAccount {
                namespace: ns,
                name: r.name.clone(),
            },
            "ServiceAccount" => return Err(field(&format!("{at}.name"), "missing")),
            "Namespace" => IdentityMatch::Namespace(r.name.clone()),
            other => {
                return Err(field(
                    &format!("{at}.kind"),
                    format!("{other:?} is not ServiceAccount or Namespace"),
                ))
            }
        });
    }
    if ids.is_empty() {
        return Err(field(
            "spec.identities",
            "neither identities nor identityRefs names anyone",
        ));
    }
    Ok(p::Authentication::MeshTls(ids))
}

fn network(s: &NetworkSpec) -> Result<p::Authentication, Problem> {
    let mut nets = Vec::new();
    for (i, n) in s.networks.iter().enumerate() {
        let at = format!("spec.networks[{i}]");
        let cidr: Cidr = n
            .cidr
            .parse()
            .map_err(|e: String| field(&format!("{at}.cidr"), e))?;
        let mut except = Vec::new();
        for (j, e) in n.except.iter().enumerate() {
            except.push(
                e.parse::<Cidr>()
                    .map_err(|m| field(&format!("{at}.except[{j}]"), m))?,
            );
        }
        nets.push((cidr, except));
    }
    if nets.is_empty() {
        return Err(field("spec.networks", "missing"));
    }
    Ok(p::Authentication::Network(nets))
}

fn strings<T>(
    values: &Option<Vec<String>>,
    at: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, Problem> {
    values
        .as_ref()
        .map(|vs| {
            vs.iter()
                .enumerate()
                .map(|(i, v)| parse(v).map_err(|e| field(&format!("{at}[{i}]"), e)))
                .collect()
        })
        .transpose()
}

fn str_field(
    values: &Option<Vec<String>>,
    not: &Option<Vec<String>>,
    at: &str,
    not_at: &str,
) -> Result<p::Field<StrMatch>, Problem> {
    let parse = |s: &str| Ok::<_, String>(StrMatch::parse(s));
    Ok(p::Field {
        values: strings(values, at, parse)?,
        not: strings(not, not_at, parse)?,
    })
}

fn istio_authorization(
    s: &AuthorizationPolicySpec,
    namespace: Arc<str>,
    name: Arc<str>,
) -> Result<p::IstioPolicy, Problem> {
    if s.required_authentication_refs.is_some() {
        return Err(field(
            "spec.requiredAuthenticationRefs",
            "is a Linkerd field; a security.istio.io AuthorizationPolicy has selector, action and rules",
        ));
    }
    let action = match s.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => p::Action::Allow,
        "DENY" => p::Action::Deny,
        "AUDIT" => p::Action::Audit,
        "CUSTOM" => {
            return Err(field(
                "spec.action",
                "CUSTOM (an external authorizer) is not supported",
            ))
        }
        other => {
            return Err(field(
                "spec.action",
                format!("{other:?} is not ALLOW, DENY or AUDIT"),
            ))
        }
    };
    if s.provider.is_some() {
        return Err(field("spec.provider", "CUSTOM providers are not supported"));
    }
    let refs: Vec<(String, &Ref)> = match (&s.target_ref, &s.target_refs) {
        (Some(r), None) => vec![("spec.targetRef".to_owned(), r)],
        (None, Some(rs)) => rs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r))
            .collect(),
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(field(
                "spec.targetRef",
                "give targetRefs or targetRef, not both",
            ))
        }
    };
    let scope = match (&s.selector, refs.is_empty()) {
        (Some(_), false) => {
            return Err(field(
                "spec.selector",
                "give a selector or targetRefs, not both",
            ))
        }
        (Some(sel), true) => p::IstioScope::Selector(selector(sel, "spec.selector")?),
        (None, true) => p::IstioScope::All,
        (None, false) => {
            let mut services = Vec::new();
            for (at, r) in refs {
                if r.kind.as_deref() != Some("Service") || !is_core(r.group.as_deref()) {
                    return Err(field(
                        &format!("{at}.kind"),
                        format!(
                            "{:?}: only Services can be targeted (the node proxy enforces at the destination pod; there are no gateways or waypoints)",
                            r.kind.as_deref().unwrap_or_default()
                        ),
                    ));
                }
                services.push(r.name.clone());
            }
            p::IstioScope::Services(services)
        }
    };
    let mut rules = Vec::new();
    for (i, rule) in s.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            let at = format!("{at}.from[{j}].source");
            let src = &f.source;
            for (set, name) in [
                (src.request_principals.is_some(), "requestPrincipals"),
                (src.not_request_principals.is_some(), "notRequestPrincipals"),
                (src.remote_ip_blocks.is_some(), "remoteIpBlocks"),
                (src.not_remote_ip_blocks.is_some(), "notRemoteIpBlocks"),
            ] {
                if set {
                    return Err(field(
                        &format!("{at}.{name}"),
                        "is not supported (no request authentication, no proxy in front)",
                    ));
                }
            }
            let cidr = |s: &str| s.parse::<Cidr>();
            from.push(p::Source {
                principals: str_field(
                    &src.principals,
                    &src.not_principals,
                    &format!("{at}.principals"),
                    &format!("{at}.notPrincipals"),
                )?,
                namespaces: str_field(
                    &src.namespaces,
                    &src.not_namespaces,
                    &format!("{at}.namespaces"),
                    &format!("{at}.notNamespaces"),
                )?,
                ip_blocks: p::Field {
                    values: strings(&src.ip_blocks, &format!("{at}.ipBlocks"), cidr)?,
                    not: strings(&src.not_ip_blocks, &format!("{at}.notIpBlocks"), cidr)?,
                },
            });
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            let op = &t.operation;
            let port = |s: &str| match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{s:?} is not a port (1-65535)")),
            };
            to.push(p::Operation {
                hosts: str_field(
                    &op.hosts,
                    &op.not_hosts,
                    &format!("{at}.hosts"),
                    &format!("{at}.notHosts"),
                )?,
                ports: p::Field {
                    values: strings(&op.ports, &format!("{at}.ports"), port)?,
                    not: strings(&op.not_ports, &format!("{at}.notPorts"), port)?,
                },
                methods: str_field(
                    &op.methods,
                    &op.not_methods,
                    &format!("{at}.methods"),
                    &format!("{at}.notMethods"),
                )?,
                paths: str_field(
                    &op.paths,
                    &op.not_paths,
                    &format!("{at}.paths"),
                    &format!("{at}.notPaths"),
                )?,
            });
        }
        let mut when = Vec::new();
        for (j, w) in rule.when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            let key = match w.key.as_str() {
                "source.principal" => p::ConditionKey::SourcePrincipal,
                "source.namespace" => p::ConditionKey::SourceNamespace,
                "source.ip" => p::ConditionKey::SourceIp,
                "destination.port" => p::ConditionKey::DestinationPort,
                key => match key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    Some(h) => p::ConditionKey::Header(
                        hyper::header::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                            field(&format!("{at}.key"), format!("{h:?} is not a header name"))
                        })?,
                    ),
                    None => {
                        return Err(field(
                            &format!("{at}.key"),
                            format!(
                                "{key:?} is not supported (request.headers[...], source.principal, source.namespace, source.ip, destination.port)"
                            ),
                        ))
                    }
                },
            };
            if w.values.is_none() && w.not_values.is_none() {
                return Err(field(&format!("{at}.values"), "give values or notValues"));
            }
            when.push(p::Condition {
                key,
                values: str_field(
                    &w.values,
                    &w.not_values,
                    &format!("{at}.values"),
                    &format!("{at}.notValues"),
                )?,
            });
        }
        rules.push(p::IstioRule { from, to, when });
    }
    let label = match &*namespace {
        p::ISTIO_ROOT_NAMESPACE => format!("{namespace}/{name}").into(),
        _ => name.clone(),
    };
    Ok(p::IstioPolicy {
        namespace,
        name,
        label,
        action,
        scope,
        rules,
    })
}

fn peer_mode(m: &MtlsSpec, at: &str) -> Result<Option<p::PeerMode>, Problem> {
    Ok(match m.mode.as_deref() {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(p::PeerMode::Strict),
        Some("PERMISSIVE") => Some(p::PeerMode::Permissive),
        Some("DISABLE") => Some(p::PeerMode::Disable),
        Some(other) => {
            return Err(field(
                at,
                format!("{other:?} is not STRICT, PERMISSIVE, DISABLE or UNSET"),
            ))
        }
    })
}

fn peer(
    s: &PeerAuthenticationSpec,
    namespace: Arc<str>,
    name: Arc<str>,
    created: Option<String>,
) -> Result<p::PeerAuthentication, Problem> {
    let selector = s
        .selector
        .as_ref()
        .map(|sel| selector(sel, "spec.selector"))
        .transpose()?;
    let mode = match &s.mtls {
        Some(m) => peer_mode(m, "spec.mtls.mode")?,
        None => None,
    };
    let mut ports = Vec::new();
    for (port, m) in s.port_level_mtls.iter().flatten() {
        let at = format!("spec.portLevelMtls[{port:?}]");
        if selector.is_none() {
            return Err(field(
                &at,
                "port-level settings need a workload selector (as Istio)",
            ));
        }
        let number = match port.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(field(&at, format!("{port:?} is not a port (1-65535)"))),
        };
        ports.push((number, peer_mode(m, &format!("{at}.mode"))?));
    }
    let label = match &*namespace {
        p::ISTIO_ROOT_NAMESPACE => format!("{namespace}/{name}").into(),
        _ => name.clone(),
    };
    Ok(p::PeerAuthentication {
        namespace,
        name,
        label,
        created,
        selector,
        mode,
        ports,
    })
}
