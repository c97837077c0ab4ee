//! Istio's traffic resources (`networking.istio.io` `VirtualService` and `DestinationRule`) for
//! mesh hosts, compiled into the same routes and Service policies as Gateway API and Linkerd
//! configuration.
//!
//! A VirtualService's `http` rules become a route (kind `VirtualService`) attached to the
//! Services its `hosts` name, tried in the order written, as Istio does. Fields this proxy does
//! not implement are refused with their name rather than ignored.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::manifest::{
    anchored, field, header_name, header_value, parse_duration, redirect_status, ObjectMeta,
    Problem,
};
use crate::route as r;

/// A number that hashes by its bits (for the change detection every object goes through).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(transparent)]
pub struct Number(pub f64);

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl std::hash::Hash for Number {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Option<serde_yaml::Value>,
    #[serde(default)]
    pub tls: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub mirror: Option<serde_yaml::Value>,
    #[serde(default)]
    pub mirror_percentage: Option<serde_yaml::Value>,
    #[serde(default)]
    pub mirrors: Option<serde_yaml::Value>,
    #[serde(default)]
    pub cors_policy: Option<serde_yaml::Value>,
    #[serde(default)]
    pub delegate: Option<serde_yaml::Value>,
    #[serde(default)]
    pub direct_response: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: Option<bool>,
    #[serde(default)]
    pub without_headers: Option<serde_yaml::Value>,
    #[serde(default)]
    pub source_labels: Option<serde_yaml::Value>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub gateways: Option<serde_yaml::Value>,
    #[serde(default)]
    pub authority: Option<serde_yaml::Value>,
    #[serde(default)]
    pub scheme: Option<serde_yaml::Value>,
}

/// `{exact|prefix|regex: value}`.
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub derive_port: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percentage>,
    /// The older integer form of `percentage`.
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub exponential_delay: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percentage>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct Percentage {
    #[serde(default)]
    pub value: Number,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// An Istio duration: `5s`, `0.5s`, `100ms`, `1h`.
fn duration(text: &str, at: &str) -> Result<Duration, Problem> {
    if let Some(secs) = text.strip_suffix('s').filter(|t| t.contains('.')) {
        if let Ok(v) = secs.parse::<f64>() {
            if (0.0..1e9).contains(&v) {
                return Ok(Duration::from_secs_f64(v));
            }
        }
    }
    parse_duration(text).map_err(|e| field(at, e))
}

/// The Service a host names, as `(namespace, name)`: a short name in the resource's own
/// namespace, or `name.namespace.svc[.cluster.local]`. `None` for wildcards and other hosts
/// (`name.namespace` alone is a host outside the cluster to Istio, as `example.com` is).
pub fn service_of_host(host: &str, namespace: &str) -> Option<(String, String)> {
    if host.contains('*') {
        return None;
    }
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] => Some((namespace.to_owned(), (*name).to_owned())),
        [name, ns, "svc"] | [name, ns, "svc", "cluster", "local"] => {
            Some(((*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

/// Refuses a field that is set but not implemented.
fn unsupported<T>(value: &Option<T>, at: &str) -> Result<(), Problem> {
    match value {
        Some(_) => Err(field(
            at,
            "is not supported yet; the object is refused rather than applied without it",
        )),
        None => Ok(()),
    }
}

fn value_match(m: &StringMatch, at: &str) -> Result<r::ValueMatch, Problem> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(r::ValueMatch::Exact(v.clone())),
        (None, Some(v), None) => Ok(r::ValueMatch::Prefix(v.clone())),
        (None, None, Some(v)) => anchored(v)
            .map(r::ValueMatch::Regex)
            .map_err(|e| field(&format!("{at}.regex"), e)),
        _ => Err(field(at, "needs exactly one of exact, prefix and regex")),
    }
}

fn header_modifier(ops: &Option<HeaderOperations>, at: &str) -> Result<r::HeaderModifier, Problem> {
    let mut out = r::HeaderModifier::default();
    let Some(ops) = ops else { return Ok(out) };
    for (n, v) in &ops.set {
        let at = format!("{at}.set[{n}]");
        out.set.push((header_name(n, &at)?, header_value(v, &at)?));
    }
    for (n, v) in &ops.add {
        let at = format!("{at}.add[{n}]");
        out.add.push((header_name(n, &at)?, header_value(v, &at)?));
    }
    for (i, n) in ops.remove.iter().enumerate() {
        out.remove
            .push(header_name(n, &format!("{at}.remove[{i}]"))?);
    }
    Ok(out)
}

fn percentage(p: &Option<Percentage>, percent: Option<u32>) -> r::Share {
    match (p, percent) {
        (Some(p), _) => r::Share::percent(p.value.0),
        (None, Some(n)) => r::Share::percent(f64::from(n)),
        // Istio: left out, no request is affected.
        (None, None) => r::Share::percent(0.0),
    }
}

/// Istio's `retryOn`, comma-separated: Envoy's conditions, status codes and gRPC status names.
fn retry_on(text: &str, at: &str) -> Result<crate::retry::RetryOn, Problem> {
    let mut on = crate::retry::RetryOn::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "5xx" => {
                on.statuses.push((500, 599));
                on.connect_failure = true;
            }
            "gateway-error" => on.statuses.push((502, 504)),
            "reset" | "connect-failure" | "refused-stream" => on.connect_failure = true,
            "retriable-4xx" => on.statuses.push((409, 409)),
            // Istio's default retriable status code.
            "retriable-status-codes" => on.statuses.push((503, 503)),
            other => {
                if let Ok(code) = other.parse::<u16>() {
                    on.statuses.push((code, code));
                } else if let Some(code) = crate::retry::grpc_code(other) {
                    on.grpc.push(code);
                } else {
                    return Err(field(at, format!("{other:?} is not a retry condition")));
                }
            }
        }
    }
    Ok(on)
}

impl VirtualService {
    /// Whether it configures the mesh (no `gateways`, or `mesh` among them) rather than only
    /// ingress gateways.
    pub fn for_mesh(&self) -> bool {
        self.spec.gateways.is_empty() || self.spec.gateways.iter().any(|g| g == "mesh")
    }

    /// The route as the proxy uses it; every error names its field.
    pub fn compile(&self) -> Result<r::HttpRoute, Problem> {
        let ns = self.metadata.namespace();
        let id = format!("{ns}/{}", self.metadata.name);
        unsupported(&self.spec.tcp, "spec.tcp")?;
        unsupported(&self.spec.tls, "spec.tls")?;
        let parents = match self.for_mesh() {
            true => self
                .spec
                .hosts
                .iter()
                .filter_map(|h| service_of_host(h, ns))
                .map(|(namespace, name)| r::Parent {
                    namespace,
                    name,
                    port: None,
                })
                .collect(),
            false => Vec::new(),
        };
        let mut rules = Vec::new();
        for (i, http) in self.spec.http.iter().enumerate() {
            let at = |f: &str| format!("spec.http[{i}].{f}");
            unsupported(&http.mirror, &at("mirror"))?;
            unsupported(&http.mirror_percentage, &at("mirrorPercentage"))?;
            unsupported(&http.mirrors, &at("mirrors"))?;
            unsupported(&http.cors_policy, &at("corsPolicy"))?;
            unsupported(&http.delegate, &at("delegate"))?;
            unsupported(&http.direct_response, &at("directResponse"))?;
            let mut matches = Vec::new();
            for (j, m) in http.matches.iter().enumerate() {
                let at = |f: &str| at(&format!("match[{j}].{f}"));
                unsupported(&m.ignore_uri_case.filter(|i| *i), &at("ignoreUriCase"))?;
                unsupported(&m.without_headers, &at("withoutHeaders"))?;
                unsupported(&m.source_labels, &at("sourceLabels"))?;
                unsupported(&m.source_namespace, &at("sourceNamespace"))?;
                unsupported(&m.port, &at("port"))?;
                unsupported(&m.gateways, &at("gateways"))?;
                unsupported(&m.authority, &at("authority"))?;
                unsupported(&m.scheme, &at("scheme"))?;
                let path = match &m.uri {
                    None => r::PathMatch::StringPrefix("/".into()),
                    Some(uri) => match value_match(uri, &at("uri"))? {
                        r::ValueMatch::Exact(p) => r::PathMatch::Exact(p),
                        r::ValueMatch::Prefix(p) => r::PathMatch::StringPrefix(p),
                        r::ValueMatch::Regex(re) => r::PathMatch::Regex(re),
                    },
                };
                let mut headers = Vec::new();
                for (name, v) in &m.headers {
                    let at = at(&format!("headers[{name}]"));
                    headers.push(r::HeaderMatch {
                        name: header_name(name, &at)?,
                        value: value_match(v, &at)?,
                    });
                }
                let mut query = Vec::new();
                for (name, v) in &m.query_params {
                    query.push(r::QueryMatch {
                        name: name.clone(),
                        value: value_match(v, &at(&format!("queryParams[{name}]")))?,
                    });
                }
                let method = match &m.method {
                    None => None,
                    Some(StringMatch {
                        exact: Some(name),
                        prefix: None,
                        regex: None,
                    }) => Some(hyper::Method::from_bytes(name.as_bytes()).map_err(|_| {
                        field(&at("method.exact"), format!("{name:?} is not a method"))
                    })?),
                    Some(_) => return Err(field(&at("method"), "only exact is supported")),
                };
                matches.push(r::Match {
                    path,
                    headers,
                    query,
                    method,
                });
            }
            if matches.is_empty() {
                matches.push(r::Match {
                    path: r::PathMatch::StringPrefix("/".into()),
                    ..r::Match::default()
                });
            }
            let mut filters = r::Filters {
                request_headers: header_modifier(
                    &http.headers.as_ref().and_then(|h| h.request.clone()),
                    &at("headers.request"),
                )?,
                response_headers: header_modifier(
                    &http.headers.as_ref().and_then(|h| h.response.clone()),
                    &at("headers.response"),
                )?,
                ..r::Filters::default()
            };
            if let Some(rw) = &http.rewrite {
                unsupported(&rw.uri_regex_rewrite, &at("rewrite.uriRegexRewrite"))?;
                filters.rewrite = Some(r::Rewrite {
                    hostname: rw.authority.clone(),
                    path: rw.uri.clone().map(r::PathModifier::Prefix),
                });
            }
            if let Some(rd) = &http.redirect {
                unsupported(&rd.derive_port, &at("redirect.derivePort"))?;
                let status = redirect_status(
                    rd.redirect_code.unwrap_or(301),
                    &at("redirect.redirectCode"),
                )?;
                filters.redirect = Some(r::Redirect {
                    scheme: rd.scheme.clone(),
                    hostname: rd.authority.clone(),
                    path: rd.uri.clone().map(r::PathModifier::Full),
                    port: rd.port,
                    status,
                });
            }
            if http.redirect.is_none() && http.route.is_empty() {
                return Err(field(&at("route"), "needs a destination (or a redirect)"));
            }
            if http.redirect.is_some() && !http.route.is_empty() {
                return Err(field(&at("redirect"), "cannot be used with route"));
            }
            let weighted = http.route.iter().any(|d| d.weight.is_some());
            let mut backends = Vec::new();
            for (k, d) in http.route.iter().enumerate() {
                let at = at(&format!("route[{k}]"));
                let (svc_ns, svc) = service_of_host(&d.destination.host, ns).ok_or_else(|| {
                    field(
                        &format!("{at}.destination.host"),
                        format!("{:?} is not a Service of this cluster", d.destination.host),
                    )
                })?;
                let headers = d.headers.as_ref();
                backends.push(r::Backend {
                    service: format!("{svc}.{svc_ns}.svc.cluster.local"),
                    port: d.destination.port.as_ref().map(|p| p.number),
                    // Without weights, an even split.
                    weight: match weighted {
                        true => d.weight.unwrap_or(0),
                        false => 1,
                    },
                    filters: r::Filters {
                        request_headers: header_modifier(
                            &headers.and_then(|h| h.request.clone()),
                            &format!("{at}.headers.request"),
                        )?,
                        response_headers: header_modifier(
                            &headers.and_then(|h| h.response.clone()),
                            &format!("{at}.headers.response"),
                        )?,
                        ..r::Filters::default()
                    },
                    subset: d.destination.subset.clone(),
                });
            }
            if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
                return Err(field(
                    &at("route"),
                    "every weight is 0: nothing could be sent anywhere",
                ));
            }
            let timeouts = r::Timeouts {
                request: http
                    .timeout
                    .as_deref()
                    .map(|t| duration(t, &at("timeout")))
                    .transpose()?
                    // Istio: 0s means none.
                    .filter(|d| !d.is_zero()),
                backend_request: None,
                idle: None,
            };
            let retry = match &http.retries {
                // Istio's default: two retries of connection failures, refused streams and
                // gRPC unavailable or cancelled, and of 503.
                None => Some(crate::retry::RetryPolicy {
                    on: retry_on(
                        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                        &at("retries.retryOn"),
                    )?,
                    limit: 2,
                    per_try_timeout: None,
                    budget: crate::retry::Budget::default(),
                }),
                Some(Retries {
                    attempts: Some(0), ..
                }) => None,
                Some(rt) => Some(crate::retry::RetryPolicy {
                    on: retry_on(
                        rt.retry_on
                            .as_deref()
                            .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"),
                        &at("retries.retryOn"),
                    )?,
                    limit: rt.attempts.unwrap_or(2),
                    per_try_timeout: rt
                        .per_try_timeout
                        .as_deref()
                        .map(|t| duration(t, &at("retries.perTryTimeout")))
                        .transpose()?,
                    budget: crate::retry::Budget::default(),
                }),
            };
            let fault = match &http.fault {
                None => None,
                Some(f) => {
                    let delay = match &f.delay {
                        None => None,
                        Some(d) => {
                            unsupported(&d.exponential_delay, &at("fault.delay.exponentialDelay"))?;
                            let fixed = d
                                .fixed_delay
                                .as_deref()
                                .ok_or_else(|| field(&at("fault.delay.fixedDelay"), "missing"))?;
                            Some((
                                duration(fixed, &at("fault.delay.fixedDelay"))?,
                                percentage(&d.percentage, d.percent),
                            ))
                        }
                    };
                    let abort = match &f.abort {
                        None => None,
                        Some(a) => {
                            let status = match (a.http_status, &a.grpc_status) {
                                (Some(code), None) if (200..=599).contains(&code) => {
                                    r::Abort::Http(code)
                                }
                                (None, Some(name)) => r::Abort::Grpc(
                                    crate::retry::grpc_code(name).ok_or_else(|| {
                                        field(
                                            &at("fault.abort.grpcStatus"),
                                            format!("{name:?} is not a gRPC status name"),
                                        )
                                    })?,
                                ),
                                _ => {
                                    return Err(field(
                                        &at("fault.abort"),
                                        "needs httpStatus (200-599) or grpcStatus",
                                    ))
                                }
                            };
                            Some((status, percentage(&a.percentage, None)))
                        }
                    };
                    Some(r::Fault { delay, abort })
                }
            };
            rules.push(std::sync::Arc::new(
                r::Rule::new(
                    id.clone(),
                    http.name.clone(),
                    matches,
                    filters,
                    backends,
                    timeouts,
                )
                .with_kind(r::RouteKind::VirtualService)
                .with_retry(retry)
                .with_fault(fault),
            ));
        }
        Ok(r::HttpRoute {
            servers: Vec::new(),
            kind: r::RouteKind::VirtualService,
            namespace: ns.to_owned(),
            name: self.metadata.name.clone(),
            created: self.metadata.creation_timestamp.clone(),
            parents,
            rules,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    #[serde(default)]
    pub workload_selector: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub tls: Option<TlsSpec>,
    #[serde(default)]
    pub port_level_settings: Option<serde_yaml::Value>,
    #[serde(default)]
    pub tunnel: Option<serde_yaml::Value>,
    #[serde(default)]
    pub proxy_protocol: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<serde_yaml::Value>,
    #[serde(default)]
    pub locality_lb_setting: Option<serde_yaml::Value>,
    #[serde(default)]
    pub warmup_duration_secs: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSpec {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// The older name of `consecutiveGatewayErrors`'s 5xx sibling.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub min_health_percent: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct ConnectionPoolSpec {
    #[serde(default)]
    pub tcp: Option<TcpPoolSpec>,
    #[serde(default)]
    pub http: Option<HttpPoolSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPoolSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub tcp_keepalive: Option<serde_yaml::Value>,
    #[serde(default)]
    pub max_connection_duration: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPoolSpec {
    #[serde(default, rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default, rename = "http2MaxRequests")]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct TlsSpec {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubsetSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicySpec>,
}

/// What a DestinationRule (or one of its subsets) asks of requests to its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub balance: crate::balance::Policy,
    pub outlier: Option<crate::balance::Outlier>,
    /// Requests in flight to the Service at most (`http2MaxRequests`, and `maxConnections` +
    /// `http1MaxPendingRequests`); more get 503 at once (Envoy's overflow, `UO`).
    pub max_requests: Option<u32>,
}

/// A DestinationRule, compiled: the Service it is for, its policy and its subsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
    /// `(namespace, name)` of the Service.
    pub host: Option<(String, String)>,
    pub policy: TrafficPolicy,
    /// Name, pod labels, and the subset's own policy (the rule's when it has none).
    pub subsets: Vec<(String, BTreeMap<String, String>, TrafficPolicy)>,
}

impl TrafficPolicySpec {
    fn compile(&self, at: &str) -> Result<TrafficPolicy, Problem> {
        let at = |f: &str| format!("{at}.{f}");
        unsupported(&self.port_level_settings, &at("portLevelSettings"))?;
        unsupported(&self.tunnel, &at("tunnel"))?;
        unsupported(&self.proxy_protocol, &at("proxyProtocol"))?;
        if let Some(mode) = self.tls.as_ref().and_then(|t| t.mode.as_deref()) {
            // Mesh traffic is mutual TLS between agents already.
            if !matches!(mode, "ISTIO_MUTUAL" | "DISABLE") {
                return Err(field(
                    &at("tls.mode"),
                    format!("{mode:?}: TLS origination to the backend is not supported yet (ISTIO_MUTUAL is what the mesh does)"),
                ));
            }
        }
        let mut out = TrafficPolicy::default();
        if let Some(lb) = &self.load_balancer {
            unsupported(&lb.consistent_hash, &at("loadBalancer.consistentHash"))?;
            unsupported(
                &lb.locality_lb_setting,
                &at("loadBalancer.localityLbSetting"),
            )?;
            unsupported(
                &lb.warmup_duration_secs,
                &at("loadBalancer.warmupDurationSecs"),
            )?;
            use crate::balance::Policy;
            out.balance = match lb.simple.as_deref() {
                None | Some("UNSPECIFIED") => Policy::PeakEwma,
                Some("ROUND_ROBIN") => Policy::RoundRobin,
                Some("LEAST_REQUEST" | "LEAST_CONN") => Policy::LeastRequest,
                Some("RANDOM") => Policy::Random,
                Some(other) => {
                    return Err(field(
                        &at("loadBalancer.simple"),
                        format!("{other:?} is not ROUND_ROBIN, LEAST_REQUEST or RANDOM"),
                    ))
                }
            };
        }
        if let Some(o) = &self.outlier_detection {
            unsupported(
                &o.min_health_percent,
                &at("outlierDetection.minHealthPercent"),
            )?;
            unsupported(
                &o.split_external_local_origin_errors.filter(|s| *s),
                &at("outlierDetection.splitExternalLocalOriginErrors"),
            )?;
            let defaults = crate::balance::Outlier::default();
            let percent = o
                .max_ejection_percent
                .unwrap_or(defaults.max_ejection_percent);
            if percent > 100 {
                return Err(field(
                    &at("outlierDetection.maxEjectionPercent"),
                    format!("{percent} is more than 100"),
                ));
            }
            if let Some(i) = &o.interval {
                duration(i, &at("outlierDetection.interval"))?;
            }
            out.outlier = Some(crate::balance::Outlier {
                consecutive_5xx: o
                    .consecutive_5xx_errors
                    .or(o.consecutive_errors)
                    .or(defaults.consecutive_5xx),
                consecutive_gateway: o.consecutive_gateway_errors,
                base_ejection: o
                    .base_ejection_time
                    .as_deref()
                    .map(|t| duration(t, &at("outlierDetection.baseEjectionTime")))
                    .transpose()?
                    .unwrap_or(defaults.base_ejection),
                max_ejection_percent: percent,
            });
        }
        if let Some(pool) = &self.connection_pool {
            let http = pool.http.clone().unwrap_or_default();
            let tcp = pool.tcp.clone().unwrap_or_default();
            unsupported(
                &tcp.connect_timeout,
                &at("connectionPool.tcp.connectTimeout"),
            )?;
            unsupported(&tcp.tcp_keepalive, &at("connectionPool.tcp.tcpKeepalive"))?;
            unsupported(
                &tcp.max_connection_duration,
                &at("connectionPool.tcp.maxConnectionDuration"),
            )?;
            unsupported(
                &http.max_requests_per_connection,
                &at("connectionPool.http.maxRequestsPerConnection"),
            )?;
            unsupported(&http.max_retries, &at("connectionPool.http.maxRetries"))?;
            unsupported(&http.idle_timeout, &at("connectionPool.http.idleTimeout"))?;
            unsupported(
                &http.max_concurrent_streams,
                &at("connectionPool.http.maxConcurrentStreams"),
            )?;
            let by_connections = tcp
                .max_connections
                .map(|c| c.saturating_add(http.http1_max_pending_requests.unwrap_or(0)));
            out.max_requests = match (http.http2_max_requests, by_connections) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(out)
    }
}

impl DestinationRule {
    /// The rule as the store uses it; every error names its field.
    pub fn compile(&self) -> Result<CompiledRule, Problem> {
        let ns = self.metadata.namespace();
        unsupported(&self.spec.workload_selector, "spec.workloadSelector")?;
        if self.spec.host.is_empty() {
            return Err(field("spec.host", "missing"));
        }
        let policy = match &self.spec.traffic_policy {
            Some(p) => p.compile("spec.trafficPolicy")?,
            None => TrafficPolicy::default(),
        };
        let mut subsets = Vec::new();
        for (i, s) in self.spec.subsets.iter().enumerate() {
            if s.name.is_empty() {
                return Err(field(&format!("spec.subsets[{i}].name"), "missing"));
            }
            if subsets.iter().any(|(n, _, _)| *n == s.name) {
                return Err(field(
                    &format!("spec.subsets[{i}].name"),
                    format!("{:?} is defined twice", s.name),
                ));
            }
            let own = match &s.traffic_policy {
                Some(p) => p.compile(&format!("spec.subsets[{i}].trafficPolicy"))?,
                None => policy.clone(),
            };
            subsets.push((s.name.clone(), s.labels.clone(), own));
        }
        Ok(CompiledRule {
            namespace: ns.to_owned(),
            name: self.metadata.name.clone(),
            created: self.metadata.creation_timestamp.clone(),
            host: service_of_host(&self.spec.host, ns),
            policy,
            subsets,
        })
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::path::Path;

    use super::*;
    use crate::state::manifest::{parse_file, Object};

    fn examples(file: &str) -> Vec<Object> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/examples")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        parse_file(&path, &text).unwrap()
    }

    fn virtual_service<'a>(objects: &'a [Object], name: &str) -> &'a VirtualService {
        objects
            .iter()
            .find_map(|o| match o {
                Object::VirtualService(vs) if vs.metadata.name == name => Some(vs),
                _ => None,
            })
            .unwrap()
    }

    fn get(table: &r::Table, path: &str) -> Option<(String, Option<String>)> {
        let headers = hyper::HeaderMap::new();
        let head = r::Head {
            method: &hyper::Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        table.select(&head).map(|(rule, m)| {
            let rewritten = rule
                .filters
                .rewrite
                .as_ref()
                .and_then(|rw| rw.path.as_ref())
                .map(|p| p.apply(&m.path, path));
            (
                rule.backends
                    .first()
                    .map(|b| b.service.clone())
                    .unwrap_or_default(),
                rewritten,
            )
        })
    }

    #[test]
    fn the_faces_virtual_services() {
        let objects = examples("faces/istio-virtualservices.yaml");
        // Ingress-only VirtualServices (their gateways leave out `mesh`) attach to nothing.
        let gui = virtual_service(&objects, "faces-gui");
        assert!(!gui.for_mesh());
        assert!(gui.compile().unwrap().parents.is_empty());
        // Its rewrite, were it attached: `/gui/` replaced by `/`, as a plain prefix.
        let table = r::Table::new(&[std::sync::Arc::new(gui.compile().unwrap())], 80);
        assert!(table.is_empty());
        let split = virtual_service(&objects, "color-split").compile().unwrap();
        assert_eq!(
            split.parents,
            [r::Parent {
                namespace: "faces".into(),
                name: "color".into(),
                port: None
            }]
        );
        let weights: Vec<(String, u32)> = split.rules[0]
            .backends
            .iter()
            .map(|b| (b.service.clone(), b.weight))
            .collect();
        assert_eq!(
            weights,
            [
                ("color.faces.svc.cluster.local".to_owned(), 50),
                ("color2.faces.svc.cluster.local".to_owned(), 50)
            ]
        );
        let delay = virtual_service(&objects, "smiley-delay").compile().unwrap();
        let fault = delay.rules[0].fault.as_ref().unwrap();
        let (d, share) = fault.delay.as_ref().unwrap();
        assert_eq!((*d, share.percent_value()), (Duration::from_secs(5), 100.0));
    }

    #[test]
    fn an_istio_prefix_rewrite_replaces_the_string_prefix() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: gui, namespace: faces}\nspec:\n  hosts: [faces-gui]\n  http:\n  - match: [{uri: {prefix: /gui/}}]\n    rewrite: {uri: /}\n    route: [{destination: {host: faces-gui}}]\n  - match: [{uri: {exact: /old}}]\n    redirect: {uri: /new, authority: example.org}\n  - route: [{destination: {host: faces-gui, subset: v2, port: {number: 8080}}}]\n";
        let objects = parse_file(Path::new("vs.yaml"), yaml).unwrap();
        let route = virtual_service(&objects, "gui").compile().unwrap();
        let table = r::Table::new(&[std::sync::Arc::new(route)], 80);
        let svc = "faces-gui.faces.svc.cluster.local".to_owned();
        assert_eq!(
            get(&table, "/gui/a/b"),
            Some((svc.clone(), Some("/a/b".into())))
        );
        assert_eq!(get(&table, "/gui/"), Some((svc.clone(), Some("/".into()))));
        // `/gui` does not start with `/gui/`: the catch-all rule (written last) takes it.
        assert_eq!(get(&table, "/gui"), Some((svc.clone(), None)));
        let (rule, _) = table
            .select(&r::Head {
                method: &hyper::Method::GET,
                path: "/old",
                query: None,
                headers: &hyper::HeaderMap::new(),
            })
            .unwrap();
        let redirect = rule.filters.redirect.as_ref().unwrap();
        assert_eq!(redirect.status, 301, "Istio's default redirect code");
        let last = table
            .select(&r::Head {
                method: &hyper::Method::GET,
                path: "/x",
                query: None,
                headers: &hyper::HeaderMap::new(),
            })
            .unwrap()
            .0;
        assert_eq!(last.backends[0].subset.as_deref(), Some("v2"));
        assert_eq!(
            last.backends[0].key(80),
            "faces-gui.faces.svc.cluster.local:8080"
        );
        // Istio's default retries apply when a rule sets none.
        assert_eq!(last.retry.as_ref().unwrap().limit, 2);
    }

    #[test]
    fn my_service_rules() {
        let routing = examples("my-service/istio-routing.yaml");
        let vs = virtual_service(&routing, "my-service").compile().unwrap();
        let backends: Vec<(Option<&str>, u32)> = vs.rules[0]
            .backends
            .iter()
            .map(|b| (b.subset.as_deref(), b.weight))
            .collect();
        assert_eq!(backends, [(Some("v1"), 80), (Some("v2"), 20)]);
        let Some(Object::DestinationRule(dr)) = routing
            .iter()
            .find(|o| matches!(o, Object::DestinationRule(_)))
        else {
            panic!("no DestinationRule")
        };
        let dr = dr.compile().unwrap();
        assert_eq!(dr.host, Some(("default".into(), "my-service".into())));
        assert_eq!(dr.policy.balance, crate::balance::Policy::RoundRobin);
        let names: Vec<&str> = dr.subsets.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["v1", "v2"]);
        assert_eq!(
            dr.subsets[1].1.get("version").map(String::as_str),
            Some("v2")
        );
        assert_eq!(dr.subsets[1].2.balance, crate::balance::Policy::RoundRobin);
        let faults = examples("my-service/istio-fault-timeout.yaml");
        let fault = virtual_service(&faults, "my-service-fault")
            .compile()
            .unwrap();
        let (d, share) = fault.rules[0]
            .fault
            .as_ref()
            .unwrap()
            .delay
            .as_ref()
            .unwrap();
        assert_eq!((*d, share.percent_value()), (Duration::from_secs(5), 50.0));
        let timeout = virtual_service(&faults, "my-service-timeout")
            .compile()
            .unwrap();
        assert_eq!(
            timeout.rules[0].timeouts.request,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn unsupported_and_invalid_fields_are_refused_by_name() {
        let vs = |http: &str| {
            let yaml = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: shop}}\nspec:\n  hosts: [web]\n  http:\n{http}");
            parse_file(Path::new("v.yaml"), &yaml).map_err(|e| e.to_string())
        };
        let cases = [
            ("  - mirror: {host: x}\n    route: [{destination: {host: web}}]\n", "field spec.http[0].mirror: is not supported yet"),
            ("  - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: web}}]\n", "field spec.http[0].match[0].uri.regex: \"(\" is not a regular expression"),
            ("  - route: [{destination: {host: web}, weight: 0}]\n", "field spec.http[0].route: every weight is 0"),
            ("  - timeout: -1s\n    route: [{destination: {host: web}}]\n", "field spec.http[0].timeout: \"-1s\" is not a duration"),
            ("  - retries: {attempts: 2, retryOn: sometimes}\n    route: [{destination: {host: web}}]\n", "field spec.http[0].retries.retryOn: \"sometimes\" is not a retry condition"),
            ("  - fault: {abort: {httpStatus: 42, percentage: {value: 10}}}\n    route: [{destination: {host: web}}]\n", "field spec.http[0].fault.abort: needs httpStatus"),
            ("  - route: [{destination: {host: example.com}}]\n", "field spec.http[0].route[0].destination.host: \"example.com\" is not a Service"),
            ("  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: web}}]\n", "field spec.http[0].match[0].uri: needs exactly one of exact, prefix and regex"),
        ];
        for (http, want) in cases {
            let err = vs(http).unwrap_err();
            assert!(
                err.starts_with(&format!("v.yaml: VirtualService shop/v: {want}")),
                "{err}"
            );
        }
        let dr = |spec: &str| {
            let yaml = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: shop}}\nspec:\n  host: web\n{spec}");
            parse_file(Path::new("d.yaml"), &yaml).map_err(|e| e.to_string())
        };
        for (spec, want) in [
            ("  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n", "field spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not ROUND_ROBIN"),
            ("  trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n", "field spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is more than 100"),
            ("  subsets: [{name: a, labels: {v: a}}, {name: a, labels: {v: b}}]\n", "field spec.subsets[1].name: \"a\" is defined twice"),
            ("  trafficPolicy: {tls: {mode: SIMPLE}}\n", "field spec.trafficPolicy.tls.mode: \"SIMPLE\": TLS origination"),
        ] {
            let err = dr(spec).unwrap_err();
            assert!(err.starts_with(&format!("d.yaml: DestinationRule shop/d: {want}")), "{err}");
        }
        // Mutual TLS is what the mesh does anyway: accepted.
        dr("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}, connectionPool: {http: {http2MaxRequests: 10}}}\n").unwrap();
    }
}
