//! The compiled policy objects, what applies to one pod, and how each part matches.

use std::{collections::HashMap, net::IpAddr, str::FromStr, sync::Arc};

use super::{Client, Inbound};
use crate::{identity::Identity, route::Table, state::Workload};

/// Linkerd's default inbound policies (`config.linkerd.io/default-inbound-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultPolicy {
    #[default]
    AllUnauthenticated,
    AllAuthenticated,
    ClusterAuthenticated,
    ClusterUnauthenticated,
    Deny,
    /// Allows everything, flagging what `deny` would refuse.
    Audit,
}

pub const DEFAULT_POLICY_ANNOTATION: &str = "config.linkerd.io/default-inbound-policy";

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 6] = [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::ClusterUnauthenticated,
        DefaultPolicy::Deny,
        DefaultPolicy::Audit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    }

    /// Its name, shared (no allocation per decision).
    pub fn shared_name(self) -> Arc<str> {
        static NAMES: std::sync::OnceLock<Vec<Arc<str>>> = std::sync::OnceLock::new();
        let names =
            NAMES.get_or_init(|| DefaultPolicy::ALL.iter().map(|p| p.name().into()).collect());
        let i = DefaultPolicy::ALL
            .iter()
            .position(|p| *p == self)
            .unwrap_or(0);
        names.get(i).cloned().unwrap_or_else(|| self.name().into())
    }

    /// Whether this policy lets `req` in (from `cluster` networks, for the `cluster-` ones).
    pub fn admits(self, req: &Inbound, cluster: &[Cidr]) -> bool {
        let in_cluster = || {
            req.ip
                .is_some_and(|ip| cluster.iter().any(|c| c.contains(ip)))
        };
        match self {
            DefaultPolicy::AllUnauthenticated | DefaultPolicy::Audit => true,
            DefaultPolicy::AllAuthenticated => req.client.is_some(),
            DefaultPolicy::ClusterAuthenticated => req.client.is_some() && in_cluster(),
            DefaultPolicy::ClusterUnauthenticated => in_cluster(),
            DefaultPolicy::Deny => false,
        }
    }
}

impl FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        DefaultPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = DefaultPolicy::ALL.iter().map(|p| p.name()).collect();
                format!("{s:?} is not one of {}", names.join(", "))
            })
    }
}

/// An address range (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address or a CIDR range (10.0.0.0/8, fd00::/8)");
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Linkerd's default cluster networks (`clusterNetworks`).
pub fn default_cluster_networks() -> Vec<Cidr> {
    [
        "10.0.0.0/8",
        "100.64.0.0/10",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fd00::/8",
    ]
    .iter()
    .filter_map(|c| c.parse().ok())
    .collect()
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`); empty selects all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub labels: Vec<(String, String)>,
    pub expressions: Vec<Expression>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expression {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    /// Whether a pod whose label `key` is `get(key)` is selected.
    pub fn selects<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.labels.iter().all(|(k, v)| get(k) == Some(v.as_str()))
            && self.expressions.iter().all(|e| match e {
                Expression::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
                Expression::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
                Expression::Exists(k) => get(k).is_some(),
                Expression::DoesNotExist(k) => get(k).is_none(),
            })
    }
}

/// A Server's port: a number, or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// Linkerd's `Server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub created: Option<String>,
    pub selector: LabelSelector,
    pub port: PortRef,
    pub proxy_protocol: Option<String>,
    /// What applies when no authorization matches (`accessPolicy`, `deny` by default).
    pub access: DefaultPolicy,
}

/// Who a Linkerd identity pattern admits: `*`, `*.suffix` (whole DNS labels), or one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMatch {
    Any,
    /// `.suffix`, with its leading dot.
    Suffix(String),
    Exact(Identity),
    /// A Linkerd identity string that is not a workload identity we mint (kept for exact
    /// comparison against a peer's Linkerd form).
    Name(String),
    /// `identityRefs` of kind ServiceAccount: that account, whatever the trust domain.
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// `identityRefs` of kind Namespace: every service account of the namespace.
    Namespace(String),
}

impl IdentityMatch {
    pub fn parse(s: &str) -> Result<IdentityMatch, String> {
        if s == "*" {
            return Ok(IdentityMatch::Any);
        }
        if let Some(suffix) = s.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(format!(
                    "{s:?}: a wildcard is only `*` or `*.suffix` (a suffix of whole DNS labels)"
                ));
            }
            return Ok(IdentityMatch::Suffix(suffix.to_owned()));
        }
        if s.contains('*') {
            return Err(format!(
                "{s:?}: a wildcard is only `*` or `*.suffix` (a suffix of whole DNS labels)"
            ));
        }
        match s.parse::<Identity>() {
            Ok(id) => Ok(IdentityMatch::Exact(id)),
            Err(_) if !s.is_empty() && s.is_ascii() => Ok(IdentityMatch::Name(s.to_owned())),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn matches(&self, client: &Client) -> bool {
        let id = &client.identity;
        match self {
            IdentityMatch::Any => true,
            IdentityMatch::Suffix(suffix) => client.linkerd.ends_with(suffix.as_str()),
            IdentityMatch::Exact(exact) => exact == id,
            IdentityMatch::Name(name) => *name == client.linkerd,
            IdentityMatch::ServiceAccount { namespace, name } => match id {
                Identity::Spiffe {
                    namespace: ns,
                    service_account,
                    ..
                } => ns == namespace && service_account == name,
            },
            IdentityMatch::Namespace(namespace) => match id {
                Identity::Spiffe { namespace: ns, .. } => ns == namespace,
            },
        }
    }
}

/// What one of an AuthorizationPolicy's `requiredAuthenticationRefs` demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// `MeshTLSAuthentication` (or a `ServiceAccount` ref): mTLS from one of these identities.
    MeshTls(Vec<IdentityMatch>),
    /// `NetworkAuthentication`: from one of these networks, less their exceptions.
    Network(Vec<(Cidr, Vec<Cidr>)>),
}

impl Authentication {
    pub fn admits(&self, req: &Inbound) -> bool {
        match self {
            Authentication::MeshTls(ids) => {
                req.client.is_some_and(|c| ids.iter().any(|m| m.matches(c)))
            }
            Authentication::Network(nets) => req.ip.is_some_and(|ip| {
                nets.iter()
                    .any(|(net, except)| net.contains(ip) && !except.iter().any(|e| e.contains(ip)))
            }),
        }
    }
}

/// A Linkerd `AuthorizationPolicy`, its authentication references resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub name: Arc<str>,
    /// All of them must admit the client.
    pub required: Vec<Arc<Authentication>>,
}

impl Authorization {
    pub fn admits(&self, req: &Inbound) -> bool {
        self.required.iter().all(|a| a.admits(req))
    }
}

/// What an AuthorizationPolicy targets (`spec.targetRef`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkerdTarget {
    Server(String),
    /// An HTTPRoute or GRPCRoute (by name) whose parent is a Server.
    Route(String),
    Namespace(String),
}

/// An AuthorizationPolicy as written: references by name, resolved when the index is built
/// (an authorization that names an authentication which does not exist is ignored, as Linkerd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkerdAuthorization {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub target: LinkerdTarget,
    /// (kind, namespace, name) of each required authentication.
    pub required: Vec<AuthnRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthnRef {
    MeshTls { namespace: String, name: String },
    Network { namespace: String, name: String },
    ServiceAccount { namespace: String, name: String },
}

/// A Server of a pod, with what authorizes traffic to it.
#[derive(Debug)]
pub struct ServerPolicy {
    pub server: Arc<Server>,
    /// AuthorizationPolicies that target the Server itself.
    pub authorizations: Vec<Authorization>,
    /// AuthorizationPolicies that target the Server's namespace.
    pub namespace_authorizations: Vec<Authorization>,
    /// The HTTPRoutes whose parent is the Server, if any.
    pub routes: Option<Arc<Table>>,
    /// By route (`namespace/name`): the AuthorizationPolicies that target it.
    pub route_authorizations: Vec<(Arc<str>, Vec<Authorization>)>,
}

/// Istio's `AuthorizationPolicy` actions (CUSTOM is refused when parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Which pods an Istio policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IstioScope {
    /// No selector: every pod of its namespace (of the mesh, in the root namespace).
    All,
    Selector(LabelSelector),
    /// `targetRefs` of kind Service (by name, in the policy's namespace): the pods the Services
    /// select.
    Services(Vec<String>),
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present, non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    pub fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.to_owned())
        } else {
            StrMatch::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(v) => v == value,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
            StrMatch::Presence => !value.is_empty(),
        }
    }

    fn matches_ignoring_case(&self, value: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            StrMatch::Exact(v) => v.eq_ignore_ascii_case(value),
            StrMatch::Prefix(p) => lower(value).starts_with(&lower(p)),
            StrMatch::Suffix(s) => lower(value).ends_with(&lower(s)),
            StrMatch::Presence => !value.is_empty(),
        }
    }
}

/// A field and its `not` form: `None` when the policy does not set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    pub values: Option<Vec<T>>,
    pub not: Option<Vec<T>>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            values: None,
            not: None,
        }
    }
}

impl<T> Field<T> {
    fn is_set(&self) -> bool {
        self.values.is_some() || self.not.is_some()
    }

    /// Whether a value `matches` it: one of `values` (if set) and none of `not` (if set).
    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        self.values.as_ref().is_none_or(|v| v.iter().any(&matches))
            && self.not.as_ref().is_none_or(|v| !v.iter().any(&matches))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Field<StrMatch>,
    pub namespaces: Field<StrMatch>,
    pub ip_blocks: Field<Cidr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Field<StrMatch>,
    pub ports: Field<u16>,
    pub methods: Field<StrMatch>,
    pub paths: Field<StrMatch>,
}

/// What a `when` condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    Header(hyper::header::HeaderName),
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    DestinationPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Field<StrMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioRule {
    /// Any of them (none: any source).
    pub from: Vec<Source>,
    /// Any of them (none: any operation).
    pub to: Vec<Operation>,
    /// All of them.
    pub when: Vec<Condition>,
}

/// Istio's `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioPolicy {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `name`, or `namespace/name` for a mesh-wide policy of the root namespace: what metrics
    /// and the denial header name it by.
    pub label: Arc<str>,
    pub action: Action,
    pub scope: IstioScope,
    /// Any of them; none matches nothing (an ALLOW policy without rules denies all).
    pub rules: Vec<IstioRule>,
}

impl IstioPolicy {
    /// Whether `req` matches one of its rules.
    ///
    /// For a TCP connection, a rule that needs the request (methods, paths, hosts, headers)
    /// never matches in an ALLOW policy, and those fields are left out in DENY and AUDIT, as
    /// Istio does: a TCP client can neither be let in nor slip through by them.
    pub fn matches(&self, req: &Inbound) -> bool {
        self.rules.iter().any(|r| r.matches(req, self.action))
    }
}

impl IstioRule {
    fn matches(&self, req: &Inbound, action: Action) -> bool {
        let principal = req.client.map_or("", |c| c.principal.as_str());
        let namespace = req.client.map_or("", Client::namespace);
        let tcp_only = req.http.is_none();
        let http_field = |set: bool| set && tcp_only;
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                s.principals.check(|m| m.matches(principal))
                    && s.namespaces.check(|m| m.matches(namespace))
                    && (!s.ip_blocks.is_set()
                        || req
                            .ip
                            .is_some_and(|ip| s.ip_blocks.check(|c| c.contains(ip))))
            });
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                let needs_http = o.hosts.is_set() || o.methods.is_set() || o.paths.is_set();
                if http_field(needs_http) && action == Action::Allow {
                    return false;
                }
                let http = req.http;
                o.ports.check(|p| *p == req.port)
                    && (http.is_none()
                        || http.is_some_and(|h| {
                            o.methods.check(|m| m.matches(h.head.method.as_str()))
                                && o.paths.check(|m| m.matches(h.head.path))
                                && o.hosts
                                    .check(|m| m.matches_ignoring_case(h.host.unwrap_or("")))
                        }))
            });
        let when = self.when.iter().all(|c| {
            let value: Option<std::borrow::Cow<str>> = match &c.key {
                ConditionKey::Header(name) => match req.http {
                    Some(h) => Some(
                        h.head
                            .headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .into(),
                    ),
                    // TCP: a header condition cannot let a connection in, nor keep one out.
                    None => return action != Action::Allow,
                },
                ConditionKey::SourcePrincipal => Some(principal.into()),
                ConditionKey::SourceNamespace => Some(namespace.into()),
                ConditionKey::SourceIp => req.ip.map(|ip| ip.to_string().into()),
                ConditionKey::DestinationPort => Some(req.port.to_string().into()),
            };
            let value = value.unwrap_or_default();
            match c.key {
                ConditionKey::SourceIp => c.values.check(|m| match m {
                    StrMatch::Exact(cidr) => cidr
                        .parse::<Cidr>()
                        .ok()
                        .zip(value.parse::<IpAddr>().ok())
                        .is_some_and(|(c, ip)| c.contains(ip)),
                    other => other.matches(&value),
                }),
                _ => c.values.check(|m| m.matches(&value)),
            }
        });
        from && to && when
    }
}

/// Istio's principal for an identity: `cluster.local/ns/<ns>/sa/<sa>`.
pub fn istio_principal(id: &Identity) -> String {
    match id {
        Identity::Spiffe {
            trust_domain,
            namespace,
            service_account,
        } => format!("{trust_domain}/ns/{namespace}/sa/{service_account}"),
    }
}

/// PeerAuthentication modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    Strict,
    Permissive,
    Disable,
}

/// Istio's `PeerAuthentication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub label: Arc<str>,
    pub created: Option<String>,
    /// `None`: namespace-wide (mesh-wide in the root namespace).
    pub selector: Option<LabelSelector>,
    /// `None`: UNSET (inherits).
    pub mode: Option<PeerMode>,
    pub ports: Vec<(u16, Option<PeerMode>)>,
}

/// Everything that applies to one pod.
#[derive(Debug)]
pub struct PodPolicy {
    /// Its default inbound policy (the pod's annotation, else its namespace's, else the
    /// agent's).
    pub default: DefaultPolicy,
    pub cluster_networks: Arc<[Cidr]>,
    /// Its Servers, oldest first, each with the port number it resolves to.
    pub servers: Vec<(u16, Arc<ServerPolicy>)>,
    /// The Istio AuthorizationPolicies that select it.
    pub istio: Vec<Arc<IstioPolicy>>,
    /// Its PeerAuthentication mode (and which policy set it), by port, then for the pod.
    pub peer_ports: Vec<(u16, PeerMode, Arc<str>)>,
    pub peer: Option<(PeerMode, Arc<str>)>,
}

impl PodPolicy {
    pub fn server_for(&self, port: u16) -> Option<&ServerPolicy> {
        self.servers
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, s)| &**s)
    }

    /// The PeerAuthentication mode on `port` (PERMISSIVE when none is set) and the policy that
    /// set it.
    pub fn peer_mode(&self, port: u16) -> (PeerMode, Option<&Arc<str>>) {
        if let Some((_, mode, name)) = self.peer_ports.iter().find(|(p, ..)| *p == port) {
            return (*mode, Some(name));
        }
        match &self.peer {
            Some((mode, name)) => (*mode, Some(name)),
            None => (PeerMode::Permissive, None),
        }
    }

    /// The effective policy as `/config_dump` shows it: per port with a Server or a
    /// PeerAuthentication setting of its own, then for every other port.
    pub fn describe(&self) -> serde_json::Value {
        let authorizations = |list: &[Authorization]| -> Vec<String> {
            list.iter().map(|a| a.name.to_string()).collect()
        };
        let peer = |port: Option<u16>| {
            let (mode, by) = match port {
                Some(p) => self.peer_mode(p),
                None => match &self.peer {
                    Some((m, by)) => (*m, Some(by)),
                    None => (PeerMode::Permissive, None),
                },
            };
            serde_json::json!({ "mode": format!("{mode:?}").to_uppercase(), "by": by.map(|b| b.to_string()) })
        };
        let mut ports: Vec<u16> = self.servers.iter().map(|(p, _)| *p).collect();
        ports.extend(self.peer_ports.iter().map(|(p, ..)| *p));
        ports.sort_unstable();
        ports.dedup();
        let mut out: Vec<serde_json::Value> = ports
            .into_iter()
            .map(|port| match self.server_for(port) {
                Some(s) => serde_json::json!({
                    "port": port,
                    "server": &*s.server.name,
                    "proxy_protocol": s.server.proxy_protocol,
                    "access_policy": s.server.access.name(),
                    "authorizations": authorizations(&s.authorizations),
                    "namespace_authorizations": authorizations(&s.namespace_authorizations),
                    "routes": s.route_authorizations.iter().map(|(r, a)| serde_json::json!({
                        "route": &**r, "authorizations": authorizations(a),
                    })).collect::<Vec<_>>(),
                    "peer_authentication": peer(Some(port)),
                }),
                None => serde_json::json!({
                    "port": port,
                    "default_policy": self.default.name(),
                    "peer_authentication": peer(Some(port)),
                }),
            })
            .collect();
        out.push(serde_json::json!({
            "port": "*",
            "default_policy": self.default.name(),
            "peer_authentication": peer(None),
        }));
        serde_json::json!({
            "ports": out,
            "istio": self.istio.iter().map(|p| serde_json::json!({
                "policy": &*p.label,
                "action": format!("{:?}", p.action).to_uppercase(),
                "rules": p.rules.len(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The policy objects of one namespace, compiled and resolved.
#[derive(Debug, Default)]
pub struct NamespacePolicy {
    pub default: Option<DefaultPolicy>,
    /// Oldest first (the oldest of two Servers on one pod port wins).
    pub servers: Vec<Arc<ServerPolicy>>,
    pub istio: Vec<Arc<IstioPolicy>>,
    pub peer: Vec<Arc<PeerAuthentication>>,
    /// Service selectors by name, for Istio `targetRefs` of kind Service.
    pub service_selectors: HashMap<String, LabelSelector>,
}

/// Every policy object of the cluster, by namespace.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    pub namespaces: HashMap<Arc<str>, NamespacePolicy>,
    /// Istio's root namespace: its policies without a selector apply to the whole mesh.
    pub root_namespace: Arc<str>,
}

pub const ISTIO_ROOT_NAMESPACE: &str = "istio-system";

impl PolicyIndex {
    /// What applies to `pod`, the agent's default policy and cluster networks given.
    pub fn for_pod(
        &self,
        pod: &Workload,
        agent_default: DefaultPolicy,
        cluster_networks: &Arc<[Cidr]>,
    ) -> PodPolicy {
        let ns = self.namespaces.get(pod.namespace.as_str());
        let root = match *pod.namespace == *self.root_namespace {
            true => None,
            false => self.namespaces.get(&self.root_namespace),
        };
        let label = |key: &str| pod.inbound.label(key);
        let mut servers: Vec<(u16, Arc<ServerPolicy>)> = Vec::new();
        for s in ns.map(|n| n.servers.as_slice()).unwrap_or_default() {
            if !s.server.selector.selects(label) {
                continue;
            }
            let port = match &s.server.port {
                PortRef::Number(p) => Some(*p),
                PortRef::Name(name) => pod
                    .inbound
                    .named_ports
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, p)| *p),
            };
            if let Some(port) = port {
                if servers.iter().all(|(p, _)| *p != port) {
                    servers.push((port, s.clone()));
                }
            }
        }
        let selected = |p: &IstioPolicy, own: &NamespacePolicy| match &p.scope {
            IstioScope::All => true,
            IstioScope::Selector(s) => s.selects(label),
            IstioScope::Services(names) => names.iter().any(|n| {
                own.service_selectors
                    .get(n)
                    .is_some_and(|s| !s.labels.is_empty() && s.selects(label))
            }),
        };
        let mut istio = Vec::new();
        for own in root.into_iter().chain(ns) {
            istio.extend(own.istio.iter().filter(|p| selected(p, own)).cloned());
        }
        // PeerAuthentication: the workload's own (with its port settings), else the
        // namespace's, else the mesh's; UNSET inherits.
        let mut peer_ports = Vec::new();
        let mut peer = None;
        let workload_peer = ns.and_then(|n| {
            n.peer
                .iter()
                .find(|p| p.selector.as_ref().is_some_and(|s| s.selects(label)))
        });
        if let Some(p) = workload_peer {
            for (port, mode) in &p.ports {
                if let Some(mode) = mode {
                    peer_ports.push((*port, *mode, p.label.clone()));
                }
            }
            peer = p.mode.map(|m| (m, p.label.clone()));
        }
        let wide = |n: Option<&NamespacePolicy>| {
            n.and_then(|n| n.peer.iter().find(|p| p.selector.is_none()))
                .and_then(|p| p.mode.map(|m| (m, p.label.clone())))
        };
        let peer =
            peer.or_else(|| wide(ns))
                .or_else(|| match *pod.namespace == *self.root_namespace {
                    true => None,
                    false => wide(self.namespaces.get(&self.root_namespace)),
                });
        PodPolicy {
            default: pod
                .inbound
                .default_policy
                .or(ns.and_then(|n| n.default))
                .unwrap_or(agent_default),
            cluster_networks: cluster_networks.clone(),
            servers,
            istio,
            peer_ports,
            peer,
        }
    }
}
