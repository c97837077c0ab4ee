//! The Kubernetes object shapes mesh-agent reads from YAML, and their validation.
//!
//! Only the fields we use are declared; everything else a real manifest carries is ignored.
//! Each object is parsed through `serde_path_to_error`, so a bad value is reported with the
//! path of the field that holds it (`spec.ports[0].port`).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::{de::DeserializeSeed as _, Deserialize};

use super::ports::{PortSet, OPAQUE_PORTS_ANNOTATION};

/// A manifest that could not be accepted, located by file, object and field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {object}: {problem}")]
pub struct ManifestError {
    pub file: String,
    /// `Kind namespace/name`, or the document number when the object has no name yet.
    pub object: String,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read the file: {0}")]
    Read(#[source] std::io::Error),
    #[error("not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    #[error("field {field}: {message}")]
    Field { field: String, message: String },
    #[error("duplicate object: also defined in {0}")]
    Duplicate(String),
    #[error("the file is {size} bytes, over the limit of {limit} (--max-manifest-bytes); split it into several files")]
    TooLarge { size: u64, limit: u64 },
    #[error("pod IP {ip} is also claimed by Pod {other} (in {other_file}); two live pods cannot share an address, so neither is trusted with it")]
    DuplicatePodIp {
        ip: IpAddr,
        other: String,
        other_file: String,
    },
    #[error("cluster IP {ip} is also claimed by Service {other} (in {other_file}); a cluster IP belongs to one Service")]
    DuplicateClusterIp {
        ip: IpAddr,
        other: String,
        other_file: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// Set by the API server: what the kubelet names a pod's cgroup after.
    #[serde(default)]
    pub uid: Option<String>,
}

/// Who owns an object (a Pod's ReplicaSet, StatefulSet, DaemonSet, Job).
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// Labels or annotations: a few pairs per object, kept as a flat list (a `BTreeMap` node costs
/// half a kilobyte even for two entries, which at cluster scale is most of the parsed state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_unit<E>(self) -> Result<Labels, E> {
                Ok(Labels::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                // (YAML with a repeated key is already refused by the parser.)
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                pairs.shrink_to_fit();
                Ok(Labels(pairs))
            }
        }
        d.deserialize_any(Pairs)
    }
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    /// The node's address: where its agent's HBONE port is.
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<IpAddr>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown` (absent in hand-written
    /// manifests).
    #[serde(default)]
    pub phase: Option<String>,
    /// Every address of a dual-stack pod (`podIP` is the first).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct PodIp {
    pub ip: IpAddr,
}

impl PodStatus {
    /// Whether the pod has finished for good (`Succeeded` or `Failed`): its address is free
    /// for another pod, and nothing of it is captured.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.pod_ip
            .into_iter()
            .chain(self.pod_ips.iter().map(|p| p.ip))
    }

    /// The pod's IPv4 address.
    pub fn pod_ip4(&self) -> Option<Ipv4Addr> {
        self.ips().find_map(|ip| match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
    }

    /// The pod's IPv6 address, on a dual-stack (or IPv6) cluster.
    pub fn pod_ip6(&self) -> Option<Ipv6Addr> {
        self.ips().find_map(|ip| match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// An IP address, `None` (headless) or absent.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Every cluster IP of a dual-stack Service (`clusterIP` is the first).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct EndpointConditions {
    /// Absent means ready (Kubernetes semantics).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

/// Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`); only routes whose parentRef is a
/// Service (the mesh profile, GAMMA) are used.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<RouteRef>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// A `parentRef` or a `backendRef`.
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct RouteRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

impl RouteRef {
    /// Whether it names a Service (group `""` or `core`, kind `Service`, the defaults of a
    /// backendRef).
    fn is_service(&self, default_kind: &str) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
            && self.kind.as_deref().unwrap_or(default_kind) == "Service"
    }
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RouteRef>,
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<TypedValue>,
    #[serde(default)]
    pub headers: Vec<TypedValue>,
    #[serde(default)]
    pub query_params: Vec<TypedValue>,
    #[serde(default)]
    pub method: Option<String>,
}

/// `{type, name, value}` of path, header and query matches.
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct TypedValue {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewriteSpec>,
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct UrlRewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

fn path_modifier(
    spec: &Option<PathModifierSpec>,
    at: &str,
) -> Result<Option<crate::route::PathModifier>, Problem> {
    use crate::route::PathModifier;
    let Some(spec) = spec else { return Ok(None) };
    let (value, key, make): (_, _, fn(String) -> PathModifier) = match spec.kind.as_str() {
        "ReplaceFullPath" => (
            &spec.replace_full_path,
            "replaceFullPath",
            PathModifier::Full,
        ),
        "ReplacePrefixMatch" => (
            &spec.replace_prefix_match,
            "replacePrefixMatch",
            PathModifier::Prefix,
        ),
        other => {
            return Err(field(
                &format!("{at}.path.type"),
                format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
            ))
        }
    };
    let value = value
        .clone()
        .ok_or_else(|| field(&format!("{at}.path.{key}"), "missing"))?;
    if !value.starts_with('/') {
        return Err(field(
            &format!("{at}.path.{key}"),
            format!("{value:?} does not start with /"),
        ));
    }
    Ok(Some(make(value)))
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<TypedValue>,
    #[serde(default)]
    pub add: Vec<TypedValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

impl HttpRoute {
    /// The route as the proxy uses it; every error names its field.
    pub fn compile(&self) -> Result<crate::route::HttpRoute, Problem> {
        self.compile_as(crate::route::RouteKind::Http)
    }

    fn compile_as(
        &self,
        kind: crate::route::RouteKind,
    ) -> Result<crate::route::HttpRoute, Problem> {
        use crate::route::{self as r, PathMatch, ValueMatch};
        let ns = self.metadata.namespace();
        let id = format!("{ns}/{}", self.metadata.name);
        let linkerd = LinkerdPolicy::of(&self.metadata)?;
        let parents = self
            .spec
            .parent_refs
            .iter()
            .filter(|p| p.is_service("Gateway"))
            .map(|p| r::Parent {
                namespace: p.namespace.clone().unwrap_or_else(|| ns.to_owned()),
                name: p.name.clone(),
                port: p.port,
            })
            .collect();
        // Linkerd's Server parents (`policy.linkerd.io`): the route is for authorization.
        let servers = self
            .spec
            .parent_refs
            .iter()
            .filter(|p| p.kind.as_deref() == Some("Server"))
            .map(|p| p.name.clone())
            .collect();
        let mut rules = Vec::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            let mut matches = Vec::new();
            for (j, m) in rule.matches.iter().enumerate() {
                let at = |f: &str| at(&format!("matches[{j}].{f}"));
                let path = match &m.path {
                    None => PathMatch::default(),
                    Some(p) => {
                        let value = p.value.as_deref().unwrap_or("/");
                        if !value.starts_with('/') && p.kind.as_deref() != Some("RegularExpression")
                        {
                            return Err(field(
                                &at("path.value"),
                                format!("{value:?} does not start with /"),
                            ));
                        }
                        match p.kind.as_deref().unwrap_or("PathPrefix") {
                            "Exact" => PathMatch::Exact(value.to_owned()),
                            "PathPrefix" => {
                                PathMatch::Prefix(value.trim_end_matches('/').to_owned())
                            }
                            "RegularExpression" => PathMatch::Regex(
                                anchored(value).map_err(|e| field(&at("path.value"), e))?,
                            ),
                            other => {
                                return Err(field(
                                    &at("path.type"),
                                    format!(
                                        "{other:?} is not Exact, PathPrefix or RegularExpression"
                                    ),
                                ))
                            }
                        }
                    }
                };
                let value_match = |v: &TypedValue, at: String| -> Result<ValueMatch, Problem> {
                    let value = v.value.clone().unwrap_or_default();
                    match v.kind.as_deref().unwrap_or("Exact") {
                        "Exact" => Ok(ValueMatch::Exact(value)),
                        "RegularExpression" => anchored(&value)
                            .map(ValueMatch::Regex)
                            .map_err(|e| field(&format!("{at}.value"), e)),
                        other => Err(field(
                            &format!("{at}.type"),
                            format!("{other:?} is not Exact or RegularExpression"),
                        )),
                    }
                };
                let mut headers = Vec::new();
                for (k, h) in m.headers.iter().enumerate() {
                    let at = at(&format!("headers[{k}]"));
                    let name =
                        header_name(h.name.as_deref().unwrap_or_default(), &format!("{at}.name"))?;
                    headers.push(r::HeaderMatch {
                        name,
                        value: value_match(h, at)?,
                    });
                }
                let mut query = Vec::new();
                for (k, q) in m.query_params.iter().enumerate() {
                    let at = at(&format!("queryParams[{k}]"));
                    let name = q
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| field(&format!("{at}.name"), "missing"))?;
                    query.push(r::QueryMatch {
                        name,
                        value: value_match(q, at)?,
                    });
                }
                let method = match &m.method {
                    None => None,
                    Some(name) => {
                        Some(hyper::Method::from_bytes(name.as_bytes()).map_err(|_| {
                            field(&at("method"), format!("{name:?} is not a method"))
                        })?)
                    }
                };
                matches.push(r::Match {
                    path,
                    headers,
                    query,
                    method,
                });
            }
            // No matches: everything (a path prefix of "/").
            if matches.is_empty() {
                matches.push(r::Match::default());
            }
            let filters = compile_filters(&rule.filters, &at("filters"), false)?;
            if filters.rewrite.is_some() && filters.redirect.is_some() {
                return Err(field(
                    &at("filters"),
                    "URLRewrite and RequestRedirect cannot be used together",
                ));
            }
            let by_prefix = [
                filters.rewrite.as_ref().and_then(|r| r.path.as_ref()),
                filters.redirect.as_ref().and_then(|r| r.path.as_ref()),
            ];
            let replaces_prefix = by_prefix
                .iter()
                .any(|p| matches!(p, Some(crate::route::PathModifier::Prefix(_))));
            if replaces_prefix
                && !matches
                    .iter()
                    .all(|m| matches!(m.path, PathMatch::Prefix(_)))
            {
                return Err(field(
                    &at("filters"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                ));
            }
            let mut backends = Vec::new();
            for (k, b) in rule.backend_refs.iter().enumerate() {
                let at = at(&format!("backendRefs[{k}]"));
                if !b.is_service("Service") {
                    return Err(field(
                        &at,
                        format!(
                            "{}/{} is not a Service (only Services can be backends)",
                            b.group.as_deref().unwrap_or(""),
                            b.kind.as_deref().unwrap_or("Service")
                        ),
                    ));
                }
                backends.push(r::Backend {
                    service: format!(
                        "{}.{}.svc.cluster.local",
                        b.name,
                        b.namespace.as_deref().unwrap_or(ns)
                    ),
                    port: b.port,
                    weight: b.weight.unwrap_or(1),
                    filters: compile_filters(&b.filters, &format!("{at}.filters"), true)?,
                    subset: None,
                });
            }
            if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
                return Err(field(
                    &at("backendRefs"),
                    "every weight is 0: nothing could be sent anywhere",
                ));
            }
            let duration =
                |v: &Option<String>, f: &str| -> Result<Option<std::time::Duration>, Problem> {
                    v.as_deref()
                        .map(|d| parse_duration(d).map_err(|e| field(&at(f), e)))
                        .transpose()
                };
            // Linkerd's annotations win over the route's fields.
            let timeouts = r::Timeouts {
                request: linkerd.request.or(duration(
                    &rule.timeouts.as_ref().and_then(|t| t.request.clone()),
                    "timeouts.request",
                )?),
                backend_request: linkerd.response.or(duration(
                    &rule
                        .timeouts
                        .as_ref()
                        .and_then(|t| t.backend_request.clone()),
                    "timeouts.backendRequest",
                )?),
                idle: linkerd.idle,
            };
            rules.push(std::sync::Arc::new(
                r::Rule::new(
                    id.clone(),
                    rule.name.clone(),
                    matches,
                    filters,
                    backends,
                    timeouts,
                )
                .with_kind(kind)
                .with_retry(linkerd.retry()),
            ));
        }
        Ok(r::HttpRoute {
            kind,
            namespace: ns.to_owned(),
            name: self.metadata.name.clone(),
            created: self.metadata.creation_timestamp.clone(),
            parents,
            servers,
            rules,
        })
    }
}

/// Gateway API `GRPCRoute` (`gateway.networking.k8s.io/v1`) attached to Services: compiled into
/// the same rules as an HTTPRoute (a gRPC method is the path `/service/method` of an HTTP/2
/// POST), so one table and one decision serve both kinds.
#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct GrpcRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<RouteRef>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RouteRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<TypedValue>,
}

/// `{type, service, method}`: either may be left out (any service, any method), not both.
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

impl GrpcRoute {
    /// The route as the proxy uses it; every error names its field in GRPCRoute terms.
    pub fn compile(&self) -> Result<crate::route::HttpRoute, Problem> {
        let mut rules = Vec::with_capacity(self.spec.rules.len());
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            let mut matches = Vec::with_capacity(rule.matches.len());
            for (j, m) in rule.matches.iter().enumerate() {
                let path = m
                    .method
                    .as_ref()
                    .map(|method| grpc_path(method, &at(&format!("matches[{j}].method"))))
                    .transpose()?;
                matches.push(RouteMatch {
                    path,
                    headers: m.headers.clone(),
                    query_params: Vec::new(),
                    method: None,
                });
            }
            let gateway_filters = |filters: &[RouteFilter], at: String| {
                filters.iter().enumerate().try_for_each(|(k, f)| match f.kind.as_str() {
                    "RequestHeaderModifier" | "ResponseHeaderModifier" => Ok(()),
                    other => Err(field(
                        &format!("{at}[{k}].type"),
                        format!("{other:?} is not supported for a GRPCRoute (RequestHeaderModifier and ResponseHeaderModifier are); the route is refused rather than applied without it"),
                    )),
                })
            };
            gateway_filters(&rule.filters, at("filters"))?;
            for (k, b) in rule.backend_refs.iter().enumerate() {
                gateway_filters(&b.filters, at(&format!("backendRefs[{k}].filters")))?;
            }
            rules.push(RouteRule {
                name: rule.name.clone(),
                matches,
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                timeouts: None,
            });
        }
        let as_http = HttpRoute {
            metadata: self.metadata.clone(),
            spec: HttpRouteSpec {
                parent_refs: self.spec.parent_refs.clone(),
                rules,
            },
        };
        as_http.compile_as(crate::route::RouteKind::Grpc)
    }
}

/// The HTTP/2 path match of a gRPC method match: `/service/method` exactly, `/service/` as a
/// prefix, or a regular expression over the whole path.
fn grpc_path(m: &GrpcMethodMatch, at: &str) -> Result<TypedValue, Problem> {
    let (service, method) = (m.service.as_deref(), m.method.as_deref());
    if service.is_none() && method.is_none() {
        return Err(field(at, "neither service nor method is given"));
    }
    let typed = |kind: &str, value: String| TypedValue {
        kind: Some(kind.to_owned()),
        name: None,
        value: Some(value),
    };
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            for (name, value) in [("service", service), ("method", method)] {
                if let Some(v) = value.filter(|v| v.is_empty() || v.contains('/')) {
                    return Err(field(
                        &format!("{at}.{name}"),
                        format!("{v:?} is not a gRPC {name} name"),
                    ));
                }
            }
            Ok(match (service, method) {
                (Some(s), Some(m)) => typed("Exact", format!("/{s}/{m}")),
                (Some(s), None) => typed("PathPrefix", format!("/{s}")),
                (None, m) => typed(
                    "RegularExpression",
                    format!("/[^/]+/{}", regex::escape(m.unwrap_or_default())),
                ),
            })
        }
        "RegularExpression" => {
            for (name, value) in [("service", service), ("method", method)] {
                if let Some(v) = value {
                    anchored(v).map_err(|e| field(&format!("{at}.{name}"), e))?;
                }
            }
            Ok(typed(
                "RegularExpression",
                format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or("[^/]+"),
                    method.unwrap_or("[^/]+")
                ),
            ))
        }
        other => Err(field(
            &format!("{at}.type"),
            format!("{other:?} is not Exact or RegularExpression"),
        )),
    }
}

/// What Linkerd's traffic annotations on a route or a Service ask for (`retry.linkerd.io/*`,
/// `timeout.linkerd.io/*`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LinkerdPolicy {
    pub retry_on: Option<crate::retry::RetryOn>,
    pub retry_limit: Option<u32>,
    pub retry_timeout: Option<std::time::Duration>,
    /// `timeout.linkerd.io/request`: the whole request.
    pub request: Option<std::time::Duration>,
    /// `timeout.linkerd.io/response`: each attempt's wait for its response.
    pub response: Option<std::time::Duration>,
    /// `timeout.linkerd.io/idle`: the longest a stream may go without data.
    pub idle: Option<std::time::Duration>,
}

impl LinkerdPolicy {
    /// Reads the annotations; an error names the annotation.
    pub fn of(meta: &ObjectMeta) -> Result<LinkerdPolicy, Problem> {
        let get = |key: &str| meta.annotations.get(key).map(String::as_str);
        let at = |key: &str| format!("metadata.annotations[\"{key}\"]");
        let duration = |key: &str| {
            get(key)
                .map(|v| parse_duration(v).map_err(|e| field(&at(key), e)))
                .transpose()
        };
        let http = get("retry.linkerd.io/http")
            .map(|v| {
                crate::retry::RetryOn::parse_http(v)
                    .map_err(|e| field(&at("retry.linkerd.io/http"), e))
            })
            .transpose()?;
        let grpc = get("retry.linkerd.io/grpc")
            .map(|v| {
                crate::retry::RetryOn::parse_grpc(v)
                    .map_err(|e| field(&at("retry.linkerd.io/grpc"), e))
            })
            .transpose()?;
        let retry_on = match (http, grpc) {
            (None, None) => None,
            (http, grpc) => {
                let mut on = http.unwrap_or(crate::retry::RetryOn {
                    connect_failure: true,
                    ..Default::default()
                });
                on.grpc = grpc.unwrap_or_default();
                Some(on)
            }
        };
        let retry_limit = get("retry.linkerd.io/limit")
            .map(|v| {
                v.trim().parse::<u32>().map_err(|_| {
                    field(
                        &at("retry.linkerd.io/limit"),
                        format!("{v:?} is not a number of retries"),
                    )
                })
            })
            .transpose()?;
        Ok(LinkerdPolicy {
            retry_on,
            retry_limit,
            retry_timeout: duration("retry.linkerd.io/timeout")?,
            request: duration("timeout.linkerd.io/request")?,
            response: duration("timeout.linkerd.io/response")?,
            idle: duration("timeout.linkerd.io/idle")?,
        })
    }

    /// The retry policy it gives a rule (a budget of the rule's own), if it asks for retries.
    pub fn retry(&self) -> Option<crate::retry::RetryPolicy> {
        let on = self.retry_on.clone()?;
        Some(crate::retry::RetryPolicy {
            on,
            // Linkerd's default: one retry.
            limit: self.retry_limit.unwrap_or(1),
            per_try_timeout: self.retry_timeout,
            budget: crate::retry::Budget::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == LinkerdPolicy::default()
    }
}

/// A header name from a manifest; the error names field `at`.
pub(crate) fn header_name(name: &str, at: &str) -> Result<hyper::header::HeaderName, Problem> {
    hyper::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| field(at, format!("{name:?} is not a header name")))
}

/// A header value from a manifest; the error names field `at`.
pub(crate) fn header_value(value: &str, at: &str) -> Result<hyper::header::HeaderValue, Problem> {
    hyper::header::HeaderValue::from_str(value)
        .map_err(|_| field(at, format!("{value:?} is not a header value")))
}

/// A redirect's status, if it is one a redirect may have (Gateway API's and Istio's list).
pub(crate) fn redirect_status(status: u16, at: &str) -> Result<u16, Problem> {
    match status {
        301 | 302 | 303 | 307 | 308 => Ok(status),
        _ => Err(field(
            at,
            format!("{status} is not 301, 302, 303, 307 or 308"),
        )),
    }
}

/// A regular expression matching the whole value, as Gateway API means it.
pub(crate) fn anchored(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

/// A rule's filters (`backend`: a backendRef's, which cannot rewrite or redirect).
fn compile_filters(
    filters: &[RouteFilter],
    at: &str,
    backend: bool,
) -> Result<crate::route::Filters, Problem> {
    let mut out = crate::route::Filters::default();
    for (i, f) in filters.iter().enumerate() {
        let at = format!("{at}[{i}]");
        match f.kind.as_str() {
            "URLRewrite" | "RequestRedirect" if backend => {
                return Err(field(
                    &format!("{at}.type"),
                    format!(
                        "{:?} is only supported on a rule, not on a backendRef",
                        f.kind
                    ),
                ))
            }
            "URLRewrite" => {
                let spec = f
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| field(&format!("{at}.urlRewrite"), "missing"))?;
                out.rewrite = Some(crate::route::Rewrite {
                    hostname: spec.hostname.clone(),
                    path: path_modifier(&spec.path, &format!("{at}.urlRewrite"))?,
                });
                continue;
            }
            "RequestRedirect" => {
                let spec = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| field(&format!("{at}.requestRedirect"), "missing"))?;
                let at = format!("{at}.requestRedirect");
                if let Some(s) = spec
                    .scheme
                    .as_deref()
                    .filter(|s| !matches!(*s, "http" | "https"))
                {
                    return Err(field(
                        &format!("{at}.scheme"),
                        format!("{s:?} is not http or https"),
                    ));
                }
                let status =
                    redirect_status(spec.status_code.unwrap_or(302), &format!("{at}.statusCode"))?;
                out.redirect = Some(crate::route::Redirect {
                    scheme: spec.scheme.clone(),
                    hostname: spec.hostname.clone(),
                    path: path_modifier(&spec.path, &at)?,
                    port: spec.port,
                    status,
                });
                continue;
            }
            _ => {}
        }
        let (spec, slot, key) = match f.kind.as_str() {
            "RequestHeaderModifier" => (&f.request_header_modifier, &mut out.request_headers, "requestHeaderModifier"),
            "ResponseHeaderModifier" => (&f.response_header_modifier, &mut out.response_headers, "responseHeaderModifier"),
            other => return Err(field(&format!("{at}.type"), format!("{other:?} is not supported yet (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite and RequestRedirect are); the route is refused rather than applied without it"))),
        };
        let spec = spec
            .as_ref()
            .ok_or_else(|| field(&format!("{at}.{key}"), "missing"))?;
        let pair = |v: &TypedValue, at: String| -> Result<(hyper::header::HeaderName, hyper::header::HeaderValue), Problem> {
            let name = header_name(v.name.as_deref().unwrap_or_default(), &format!("{at}.name"))?;
            let value = header_value(v.value.as_deref().unwrap_or_default(), &format!("{at}.value"))?;
            Ok((name, value))
        };
        for (j, v) in spec.set.iter().enumerate() {
            slot.set.push(pair(v, format!("{at}.{key}.set[{j}]"))?);
        }
        for (j, v) in spec.add.iter().enumerate() {
            slot.add.push(pair(v, format!("{at}.{key}.add[{j}]"))?);
        }
        for (j, name) in spec.remove.iter().enumerate() {
            slot.remove
                .push(header_name(name, &format!("{at}.{key}.remove[{j}]"))?);
        }
    }
    Ok(out)
}

/// A Gateway API duration (`1h`, `30s`, `500ms`, `1h30m`...).
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 10s, 500ms or 1h30m");
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest
            .get(..digits)
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)?;
        rest = rest.get(digits..).unwrap_or_default();
        let (unit, len) = [("ms", 2), ("h", 1), ("m", 1), ("s", 1)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        let part = match unit {
            "ms" => std::time::Duration::from_millis(n),
            "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
            "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
            _ => std::time::Duration::from_secs(n),
        };
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(total)
}

fn tcp() -> String {
    "TCP".to_owned()
}

/// One object of a kind we understand.
#[derive(Debug, Clone, PartialEq, Hash)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    VirtualService(super::istio::VirtualService),
    DestinationRule(Box<super::istio::DestinationRule>),
    /// Linkerd's and Istio's policy objects (the kind says which).
    Policy(Kind, Box<super::policy::PolicyManifest>),
}

/// The kinds of [`Object`]; `PeerAuthentication` stays last (see [`Kind::COUNT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
    VirtualService,
    DestinationRule,
    Server,
    MeshTlsAuthentication,
    NetworkAuthentication,
    /// `policy.linkerd.io` AuthorizationPolicy.
    LinkerdAuthorizationPolicy,
    /// `security.istio.io` AuthorizationPolicy.
    IstioAuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    /// How many kinds there are (`kind as usize` indexes arrays of this length).
    pub const COUNT: usize = Kind::PeerAuthentication as usize + 1;

    fn from_name(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "HTTPRoute" => Kind::HttpRoute,
            "GRPCRoute" => Kind::GrpcRoute,
            "VirtualService" => Kind::VirtualService,
            "DestinationRule" => Kind::DestinationRule,
            "Server" => Kind::Server,
            "MeshTLSAuthentication" => Kind::MeshTlsAuthentication,
            "NetworkAuthentication" => Kind::NetworkAuthentication,
            // Linkerd's or Istio's: the apiVersion tells (see [`Parts::object`]).
            "AuthorizationPolicy" => Kind::IstioAuthorizationPolicy,
            "PeerAuthentication" => Kind::PeerAuthentication,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Server => "Server",
            Kind::MeshTlsAuthentication => "MeshTLSAuthentication",
            Kind::NetworkAuthentication => "NetworkAuthentication",
            Kind::LinkerdAuthorizationPolicy | Kind::IstioAuthorizationPolicy => {
                "AuthorizationPolicy"
            }
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }
}

/// What names one object in the cluster: its kind, namespace (empty for a Namespace) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Namespace => write!(f, "Namespace {}", self.name),
            kind => write!(f, "{} {}/{}", kind.name(), self.namespace, self.name),
        }
    }
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::Policy(_, o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::Policy(kind, _) => *kind,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectKey {
            kind,
            namespace: match kind {
                Kind::Namespace => "".into(),
                _ => meta.namespace().into(),
            },
            name: meta.name.as_str().into(),
        }
    }
}

/// Parses every YAML document of one file straight into typed objects (no intermediate tree
/// per document: at cluster scale that tree was most of the parsing time and memory). Objects
/// of kinds we do not use are skipped.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let file = path.display().to_string();
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        crate::background::checkpoint();
        if let Some(object) = parse_document(doc, &file, index, Problem::Yaml)? {
            out.push(object);
        }
    }
    Ok(out)
}

/// One object as the API server serves it (a list's items leave out `kind` and `apiVersion`:
/// they are filled in from what was listed). `source` names where it came from in errors.
/// `Ok(None)` for a kind we do not use.
pub fn parse_api_object(
    kind: &str,
    api_version: &str,
    mut value: serde_json::Value,
    source: &str,
) -> Result<Option<Object>, ManifestError> {
    if let Some(map) = value.as_object_mut() {
        map.entry("kind").or_insert_with(|| kind.into());
        map.entry("apiVersion")
            .or_insert_with(|| api_version.into());
    }
    parse_document(&value, source, 0, |e| Problem::Field {
        field: "object".to_owned(),
        message: e.to_string(),
    })
}

/// Parses one document (`index` in `file`) and validates it; `syntax` turns an error that no
/// field can be blamed for into a problem.
fn parse_document<'de, D: serde::Deserializer<'de>>(
    doc: D,
    file: &str,
    index: usize,
    syntax: impl FnOnce(D::Error) -> Problem,
) -> Result<Option<Object>, ManifestError> {
    let mut seen = Seen::default();
    let mut track = serde_path_to_error::Track::new();
    let parsed = Document(&mut seen)
        .deserialize(serde_path_to_error::Deserializer::new(doc, &mut track))
        .map_err(|e| {
            let path = track.path().to_string();
            match seen.field.take() {
                Some((field, message)) => Problem::Field { field, message },
                None if path == "." || seen.kind.is_none() => syntax(e),
                None => Problem::Field {
                    field: path,
                    message: e.to_string(),
                },
            }
        })
        .and_then(|object| object.map(validate).transpose());
    parsed.map_err(|problem| {
        let object = ObjectName {
            kind: seen.kind.as_deref().unwrap_or(""),
            namespace: seen.namespace.as_deref(),
            name: seen.name.as_deref(),
            index,
        };
        ManifestError {
            file: file.to_owned(),
            object: object.to_string(),
            problem,
        }
    })
}

/// What is known of a document while it is parsed, to name it in an error.
#[derive(Default)]
struct Seen {
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    /// A field whose error the path tracker cannot locate (see [`Document::visit_map`]).
    field: Option<(String, String)>,
}

/// One YAML document, read in one pass: `Ok(None)` for an empty document or a kind we skip.
struct Document<'a>(&'a mut Seen);

/// The fields of an object, gathered as they come.
#[derive(Default)]
struct Parts {
    metadata: Option<ObjectMeta>,
    pod_spec: Option<PodSpec>,
    pod_status: Option<PodStatus>,
    service_spec: Option<ServiceSpec>,
    address_type: Option<String>,
    endpoints: Option<Vec<Endpoint>>,
    endpoint_ports: Option<Vec<EndpointPort>>,
    route_spec: Option<HttpRouteSpec>,
    grpc_route_spec: Option<GrpcRouteSpec>,
    virtual_service_spec: Option<super::istio::VirtualServiceSpec>,
    destination_rule_spec: Option<super::istio::DestinationRuleSpec>,
    server_spec: Option<super::policy::ServerSpec>,
    authorization_spec: Option<super::policy::AuthorizationPolicySpec>,
    mesh_tls_spec: Option<super::policy::MeshTlsSpec>,
    network_spec: Option<super::policy::NetworkSpec>,
    peer_spec: Option<super::policy::PeerAuthenticationSpec>,
    api_version: Option<String>,
}

/// Where a field's value is read from: the map being parsed, or a value kept aside.
trait FieldValue<'de> {
    type Error: serde::de::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, Self::Error>;
}

impl<'de, A: serde::de::MapAccess<'de>> FieldValue<'de> for &mut A {
    type Error = A::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, A::Error> {
        self.next_value()
    }
}

impl<'de, D: serde::Deserializer<'de>> FieldValue<'de> for Aside<D> {
    type Error = D::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, D::Error> {
        T::deserialize(self.0)
    }
}

/// A value that came before `kind`, as a deserializer.
struct Aside<D>(D);

impl Parts {
    /// Reads the value of `key` for an object of `kind`; `Ok(false)` when this kind does not
    /// use the key (and the value is left unread).
    fn read<'de, V: FieldValue<'de>>(
        &mut self,
        kind: Kind,
        key: &str,
        value: V,
    ) -> Result<bool, V::Error> {
        fn put<'de, T: Deserialize<'de>, V: FieldValue<'de>>(
            slot: &mut Option<T>,
            value: V,
        ) -> Result<bool, V::Error> {
            *slot = Some(value.read()?);
            Ok(true)
        }
        match (kind, key) {
            (_, "metadata") => put(&mut self.metadata, value),
            (Kind::Pod, "spec") => put(&mut self.pod_spec, value),
            (Kind::Pod, "status") => put(&mut self.pod_status, value),
            (Kind::Service, "spec") => put(&mut self.service_spec, value),
            (Kind::EndpointSlice, "addressType") => put(&mut self.address_type, value),
            (Kind::EndpointSlice, "endpoints") => put(&mut self.endpoints, value),
            (Kind::EndpointSlice, "ports") => put(&mut self.endpoint_ports, value),
            (Kind::HttpRoute, "spec") => put(&mut self.route_spec, value),
            (Kind::GrpcRoute, "spec") => put(&mut self.grpc_route_spec, value),
            (Kind::VirtualService, "spec") => put(&mut self.virtual_service_spec, value),
            (Kind::DestinationRule, "spec") => put(&mut self.destination_rule_spec, value),
            (Kind::Server, "spec") => put(&mut self.server_spec, value),
            (Kind::LinkerdAuthorizationPolicy | Kind::IstioAuthorizationPolicy, "spec") => {
                put(&mut self.authorization_spec, value)
            }
            (Kind::MeshTlsAuthentication, "spec") => put(&mut self.mesh_tls_spec, value),
            (Kind::NetworkAuthentication, "spec") => put(&mut self.network_spec, value),
            (Kind::PeerAuthentication, "spec") => put(&mut self.peer_spec, value),
            (_, "apiVersion") => put(&mut self.api_version, value),
            _ => Ok(false),
        }
    }

    fn object(self, kind: Kind) -> Result<Object, Problem> {
        let metadata = self.metadata.ok_or_else(|| field("metadata", "missing"))?;
        Ok(match kind {
            Kind::Namespace => Object::Namespace(Namespace { metadata }),
            Kind::Pod => Object::Pod(Pod {
                metadata,
                spec: self.pod_spec.unwrap_or_default(),
                status: self.pod_status.unwrap_or_default(),
            }),
            Kind::Service => Object::Service(Service {
                metadata,
                spec: self.service_spec.unwrap_or_default(),
            }),
            Kind::EndpointSlice => Object::EndpointSlice(EndpointSlice {
                metadata,
                address_type: self
                    .address_type
                    .ok_or_else(|| field("addressType", "missing"))?,
                endpoints: self.endpoints.unwrap_or_default(),
                ports: self.endpoint_ports.unwrap_or_default(),
            }),
            Kind::HttpRoute => Object::HttpRoute(HttpRoute {
                metadata,
                spec: self.route_spec.unwrap_or_default(),
            }),
            Kind::GrpcRoute => Object::GrpcRoute(GrpcRoute {
                metadata,
                spec: self.grpc_route_spec.unwrap_or_default(),
            }),
            Kind::VirtualService => Object::VirtualService(super::istio::VirtualService {
                metadata,
                spec: self.virtual_service_spec.unwrap_or_default(),
            }),
            Kind::DestinationRule => {
                Object::DestinationRule(Box::new(super::istio::DestinationRule {
                    metadata,
                    spec: self.destination_rule_spec.unwrap_or_default(),
                }))
            }
            Kind::Server
            | Kind::MeshTlsAuthentication
            | Kind::NetworkAuthentication
            | Kind::LinkerdAuthorizationPolicy
            | Kind::IstioAuthorizationPolicy
            | Kind::PeerAuthentication => {
                use super::policy::PolicySpec as S;
                let linkerd = self
                    .api_version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("policy.linkerd.io/"));
                let (kind, spec) = match kind {
                    Kind::Server => (kind, S::Server(self.server_spec.unwrap_or_default())),
                    Kind::MeshTlsAuthentication => {
                        (kind, S::MeshTls(self.mesh_tls_spec.unwrap_or_default()))
                    }
                    Kind::NetworkAuthentication => {
                        (kind, S::Network(self.network_spec.unwrap_or_default()))
                    }
                    Kind::PeerAuthentication => (
                        kind,
                        S::PeerAuthentication(self.peer_spec.unwrap_or_default()),
                    ),
                    _ if linkerd => (
                        Kind::LinkerdAuthorizationPolicy,
                        S::LinkerdAuthorization(self.authorization_spec.unwrap_or_default()),
                    ),
                    _ => (
                        Kind::IstioAuthorizationPolicy,
                        S::IstioAuthorization(self.authorization_spec.unwrap_or_default()),
                    ),
                };
                Object::Policy(
                    kind,
                    Box::new(super::policy::PolicyManifest { metadata, spec }),
                )
            }
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Document<'_> {
    type Value = Option<Object>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Document<'_> {
    type Value = Option<Object>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object (a map with kind and metadata)")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    /// `kind` usually comes first, so every field is read straight into its type. Fields that
    /// come before `kind` are kept as YAML values and converted once the kind is known.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let seen = self.0;
        let mut kind: Option<Option<Kind>> = None;
        let mut parts = Parts::default();
        let mut early: Vec<(String, serde_yaml::Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match (key.as_str(), kind) {
                ("kind", None) => {
                    let name: String = map.next_value()?;
                    kind = Some(Kind::from_name(&name));
                    seen.kind = Some(name);
                }
                ("kind", Some(_)) => return Err(A::Error::duplicate_field("kind")),
                // A kind we skip: nothing more to read.
                (_, Some(None)) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (_, Some(Some(k))) => {
                    if !parts.read(k, &key, &mut map)? {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                (
                    "metadata" | "spec" | "status" | "addressType" | "endpoints" | "ports"
                    | "apiVersion",
                    None,
                ) => {
                    early.push((key, map.next_value()?));
                }
                (_, None) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if let Some(meta) = parts.metadata.as_ref().filter(|_| seen.name.is_none()) {
                seen.name = Some(meta.name.clone());
                seen.namespace = meta.namespace.clone();
            }
        }
        let kind = match kind {
            None => {
                seen.field = Some(("kind".to_owned(), "missing".to_owned()));
                return Err(A::Error::custom("kind is missing"));
            }
            Some(None) => return Ok(None),
            Some(Some(kind)) => kind,
        };
        for (key, value) in early {
            let mut track = serde_path_to_error::Track::new();
            let read = parts.read(
                kind,
                &key,
                Aside(serde_path_to_error::Deserializer::new(value, &mut track)),
            );
            if let Err(e) = read {
                let path = match track.path().to_string().as_str() {
                    "." => key,
                    inner => format!("{key}.{inner}"),
                };
                seen.field = Some((path, e.to_string()));
                return Err(A::Error::custom(e));
            }
            if let Some(meta) = parts.metadata.as_ref().filter(|_| seen.name.is_none()) {
                seen.name = Some(meta.name.clone());
                seen.namespace = meta.namespace.clone();
            }
        }
        match parts.object(kind) {
            Ok(object) => Ok(Some(object)),
            Err(Problem::Field { field, message }) => {
                seen.field = Some((field, message.clone()));
                Err(A::Error::custom(message))
            }
            Err(other) => Err(A::Error::custom(other)),
        }
    }
}

struct ObjectName<'a> {
    kind: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    index: usize,
}

impl fmt::Display for ObjectName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            self.kind
        };
        match self.name {
            Some(name) if kind == "Namespace" => write!(f, "{kind} {name}"),
            Some(name) => write!(f, "{kind} {}/{name}", self.namespace.unwrap_or("default")),
            None => write!(f, "{kind} (document {})", self.index + 1),
        }
    }
}

pub(crate) fn field(field: &str, message: impl Into<String>) -> Problem {
    Problem::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Checks what one object alone can get wrong.
fn validate(object: Object) -> Result<Object, Problem> {
    let meta = object.metadata();
    if meta.name.is_empty() {
        return Err(field("metadata.name", "must not be empty"));
    }
    if let Some(value) = meta.annotations.get(OPAQUE_PORTS_ANNOTATION) {
        PortSet::parse(value).map_err(|message| {
            field(
                &format!("metadata.annotations[\"{OPAQUE_PORTS_ANNOTATION}\"]"),
                message,
            )
        })?;
    }
    if let Some(value) = meta.annotations.get(super::FAIL_CLOSED_ANNOTATION) {
        value.parse::<bool>().map_err(|_| {
            field(
                &format!(
                    "metadata.annotations[\"{}\"]",
                    super::FAIL_CLOSED_ANNOTATION
                ),
                format!("{value:?} is neither \"true\" nor \"false\""),
            )
        })?;
    }
    if let Some(value) = meta
        .annotations
        .get(crate::policy::DEFAULT_POLICY_ANNOTATION)
    {
        value
            .parse::<crate::policy::DefaultPolicy>()
            .map_err(|message| {
                field(
                    &format!(
                        "metadata.annotations[\"{}\"]",
                        crate::policy::DEFAULT_POLICY_ANNOTATION
                    ),
                    message,
                )
            })?;
    }
    Ok(match object {
        Object::Namespace(_) | Object::Pod(_) => object,
        Object::Service(o) => Object::Service(validate_service(o)?),
        Object::EndpointSlice(o) => Object::EndpointSlice(validate_slice(o)?),
        Object::HttpRoute(o) => {
            o.compile()?;
            Object::HttpRoute(o)
        }
        Object::GrpcRoute(o) => {
            o.compile()?;
            Object::GrpcRoute(o)
        }
        Object::VirtualService(o) => {
            o.compile()?;
            Object::VirtualService(o)
        }
        Object::DestinationRule(o) => {
            o.compile()?;
            Object::DestinationRule(o)
        }
        Object::Policy(kind, o) => {
            o.compile()?;
            Object::Policy(kind, o)
        }
    })
}

fn validate_service(svc: Service) -> Result<Service, Problem> {
    LinkerdPolicy::of(&svc.metadata)?;
    let ips = svc
        .spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip));
    let more = svc
        .spec
        .cluster_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip));
    for (path, ip) in ips.chain(more) {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return Err(field(
                &path,
                format!("{ip:?} is neither an IP address nor \"None\""),
            ));
        }
    }
    for (i, port) in svc.spec.ports.iter().enumerate() {
        if port.port == 0 {
            return Err(field(&format!("spec.ports[{i}].port"), "must be 1-65535"));
        }
        if port.target_port == Some(IntOrString::Int(0)) {
            return Err(field(
                &format!("spec.ports[{i}].targetPort"),
                "must be 1-65535",
            ));
        }
    }
    Ok(svc)
}

fn validate_slice(slice: EndpointSlice) -> Result<EndpointSlice, Problem> {
    if !slice
        .metadata
        .labels
        .contains_key("kubernetes.io/service-name")
    {
        return Err(field(
            "metadata.labels",
            "missing \"kubernetes.io/service-name\" (which Service this slice belongs to)",
        ));
    }
    let family_ok = |addr: &str| match slice.address_type.as_str() {
        "IPv4" => Some(addr.parse::<Ipv4Addr>().is_ok()),
        "IPv6" => Some(addr.parse::<Ipv6Addr>().is_ok()),
        _ => None,
    };
    for (i, ep) in slice.endpoints.iter().enumerate() {
        for (j, addr) in ep.addresses.iter().enumerate() {
            if family_ok(addr) == Some(false) {
                return Err(field(
                    &format!("endpoints[{i}].addresses[{j}]"),
                    format!("{addr:?} is not an {} address", slice.address_type),
                ));
            }
        }
    }
    Ok(slice)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn reports_file_object_and_field() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 99999\n";
        let err = parse_file(Path::new("svc.yaml"), yaml).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("svc.yaml: Service shop/web: field spec.ports[0].port:"),
            "{msg}"
        );
    }

    #[test]
    fn bad_cluster_ip_is_named() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: ten}\n";
        let msg = parse_file(Path::new("s.yaml"), yaml)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "s.yaml: Service default/web: field spec.clusterIP: \"ten\" is neither an IP address nor \"None\""
        );
    }

    #[test]
    fn bad_pod_ip_is_named() {
        let yaml = "kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.300}\n";
        let msg = parse_file(Path::new("p.yaml"), yaml)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("p.yaml: Pod default/a: field status.podIP:"),
            "{msg}"
        );
    }

    #[test]
    fn multi_document_and_unknown_kinds() {
        let yaml = "kind: Namespace\nmetadata: {name: shop}\n---\nkind: ConfigMap\nmetadata: {name: r}\n---\n";
        let objs = parse_file(Path::new("x.yaml"), yaml).unwrap();
        assert_eq!(objs.len(), 1);
        assert!(matches!(objs[0], Object::Namespace(_)));
    }

    #[test]
    fn target_port_by_name_or_number() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - {port: 80, targetPort: http}\n  - {port: 81, targetPort: 8081}\n";
        let objs = parse_file(Path::new("x.yaml"), yaml).unwrap();
        let Object::Service(svc) = &objs[0] else {
            panic!()
        };
        assert_eq!(
            svc.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(svc.spec.ports[1].target_port, Some(IntOrString::Int(8081)));
    }
}

#[cfg(test)]
mod route_tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn route(spec: &str) -> Result<Vec<Object>, String> {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n{spec}"
        );
        parse_file(Path::new("r.yaml"), &yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn an_httproute_compiles_with_its_defaults() {
        let objs = route("  rules:\n  - matches: [{headers: [{name: x-canary, value: \"yes\"}]}]\n    backendRefs: [{name: web-canary, port: 8080, weight: 3}, {name: web}]\n    timeouts: {request: 1m30s, backendRequest: 500ms}\n").unwrap();
        let Object::HttpRoute(r) = &objs[0] else {
            panic!("{objs:?}")
        };
        let r = r.compile().unwrap();
        assert_eq!(r.parents[0].namespace, "shop");
        let rule = &r.rules[0];
        assert_eq!(rule.route, "shop/r");
        assert_eq!(
            rule.backends[0].key(80),
            "web-canary.shop.svc.cluster.local:8080"
        );
        // No port: the one the route is attached on; no weight: 1.
        assert_eq!(rule.backends[1].key(80), "web.shop.svc.cluster.local:80");
        assert_eq!(rule.backends[1].weight, 1);
        assert_eq!(
            rule.timeouts.request,
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            rule.timeouts.backend_request,
            Some(std::time::Duration::from_millis(500))
        );
        // A rule without matches takes every request.
        let any = route("  rules:\n  - backendRefs: [{name: web}]\n").unwrap();
        let Object::HttpRoute(any) = &any[0] else {
            panic!()
        };
        assert_eq!(any.compile().unwrap().rules[0].matches.len(), 1);
    }

    #[test]
    fn a_bad_route_is_refused_naming_the_field() {
        let cases = [
            (
                "  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/(unclosed\"}}]\n",
                "field spec.rules[0].matches[0].path.value: \"/(unclosed\" is not a regular expression",
            ),
            (
                "  rules:\n  - backendRefs: [{name: a, weight: 0}, {name: b, weight: 0}]\n",
                "field spec.rules[0].backendRefs: every weight is 0",
            ),
            (
                "  rules:\n  - backendRefs: [{kind: ConfigMap, name: a}]\n",
                "field spec.rules[0].backendRefs[0]: /ConfigMap is not a Service",
            ),
            (
                "  rules:\n  - filters: [{type: RequestMirror}]\n",
                "field spec.rules[0].filters[0].type: \"RequestMirror\" is not supported yet",
            ),
            (
                "  rules:\n  - timeouts: {request: -1s}\n",
                "field spec.rules[0].timeouts.request: \"-1s\" is not a duration",
            ),
            (
                "  rules:\n  - timeouts: {request: 18446744073709551615h1h}\n",
                "field spec.rules[0].timeouts.request: \"18446744073709551615h1h\" is not a duration",
            ),
            (
                "  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]\n",
                "field spec.rules[0].filters[0].requestRedirect.statusCode: 304 is not 301, 302, 303, 307 or 308",
            ),
            (
                "  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n",
                "field spec.rules[0].filters: ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
            ),
            (
                "  rules:\n  - matches: [{path: {type: Exact, value: nope}}]\n",
                "field spec.rules[0].matches[0].path.value: \"nope\" does not start with /",
            ),
        ];
        for (spec, want) in cases {
            let err = route(spec).unwrap_err();
            assert!(
                err.starts_with(&format!("r.yaml: HTTPRoute shop/r: {want}")),
                "{err}"
            );
        }
    }

    fn grpc_route(spec: &str) -> Result<crate::route::HttpRoute, String> {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 7070}}]\n{spec}"
        );
        let objs = parse_file(Path::new("g.yaml"), &yaml).map_err(|e| e.to_string())?;
        let Object::GrpcRoute(r) = &objs[0] else {
            panic!("{objs:?}")
        };
        Ok(r.compile().unwrap())
    }

    /// A gRPC call as routing sees it: an HTTP/2 POST to `/service/method`.
    fn grpc_call(table: &crate::route::Table, path: &str, test_case: &str) -> Option<String> {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-test-case", test_case.parse().unwrap());
        let head = crate::route::Head {
            method: &hyper::Method::POST,
            path,
            query: None,
            headers: &headers,
        };
        table
            .select(&head)
            .map(|(rule, _)| rule.backends[0].service.clone())
    }

    #[test]
    fn a_grpcroute_routes_by_service_method_and_metadata() {
        let route = grpc_route(concat!(
            "  rules:\n",
            "  - matches: [{method: {service: proto.Echo, method: Echo}}]\n",
            "    backendRefs: [{name: exact, port: 7070}]\n",
            "  - matches: [{method: {service: proto.Echo}}]\n",
            "    backendRefs: [{name: service, port: 7070}]\n",
            "  - matches: [{method: {type: RegularExpression, service: \"proto\\\\..*\", method: \"Ping|Pong\"}}]\n",
            "    backendRefs: [{name: regex, port: 7070}]\n",
            "  - matches: [{headers: [{name: x-test-case, value: set}]}]\n",
            "    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-header-set, value: v}]}}]\n",
            "    backendRefs: [{name: metadata, port: 7070, weight: 70}, {name: none, port: 7070, weight: 0}]\n",
        ))
        .unwrap();
        assert_eq!(route.kind, crate::route::RouteKind::Grpc);
        assert_eq!(route.rules[0].kind.name(), "GRPCRoute");
        let table = crate::route::Table::new(&[std::sync::Arc::new(route)], 7070);
        let svc = |s: &str| Some(format!("{s}.shop.svc.cluster.local"));
        assert_eq!(grpc_call(&table, "/proto.Echo/Echo", ""), svc("exact"));
        assert_eq!(grpc_call(&table, "/proto.Echo/Other", ""), svc("service"));
        // `proto.Echoes` is another service, not a longer name of `proto.Echo`.
        assert_eq!(grpc_call(&table, "/proto.Echoes/Echo", ""), None);
        assert_eq!(grpc_call(&table, "/proto.Other/Pong", ""), svc("regex"));
        assert_eq!(grpc_call(&table, "/other.Svc/Pong", ""), None);
        assert_eq!(grpc_call(&table, "/other.Svc/Any", "set"), svc("metadata"));
        assert_eq!(grpc_call(&table, "/other.Svc/Any", "unset"), None);
    }

    #[test]
    fn a_bad_grpcroute_is_refused_naming_the_grpc_field() {
        let cases = [
            (
                "  rules:\n  - matches: [{method: {type: Exact}}]\n",
                "field spec.rules[0].matches[0].method: neither service nor method is given",
            ),
            (
                "  rules:\n  - matches: [{method: {service: a/b}}]\n",
                "field spec.rules[0].matches[0].method.service: \"a/b\" is not a gRPC service name",
            ),
            (
                "  rules:\n  - matches: [{method: {type: RegularExpression, method: \"(\"}}]\n",
                "field spec.rules[0].matches[0].method.method: \"(\" is not a regular expression",
            ),
            (
                "  rules:\n  - matches: [{method: {type: Prefix, service: a}}]\n",
                "field spec.rules[0].matches[0].method.type: \"Prefix\" is not Exact or RegularExpression",
            ),
            (
                "  rules:\n  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
                "field spec.rules[0].filters[0].type: \"URLRewrite\" is not supported for a GRPCRoute",
            ),
            (
                "  rules:\n  - backendRefs: [{name: a, filters: [{type: RequestMirror}]}]\n",
                "field spec.rules[0].backendRefs[0].filters[0].type: \"RequestMirror\" is not supported for a GRPCRoute",
            ),
        ];
        for (spec, want) in cases {
            let err = grpc_route(spec).unwrap_err();
            assert!(
                err.starts_with(&format!("g.yaml: GRPCRoute shop/g: {want}")),
                "{err}"
            );
        }
    }
}
