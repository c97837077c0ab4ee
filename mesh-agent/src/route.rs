//! HTTP routing, as Gateway API's mesh profile (GAMMA) defines it: the rules of the HTTPRoutes
//! attached to a Service port, and the one pure decision per request of which rule applies.
//!
//! A [`Table`] holds every match of every rule attached to one Service port, sorted once by the
//! spec's precedence; [`Table::select`] walks it and returns the first rule whose match the
//! request head satisfies. Nothing here does I/O: the proxy calls `select`, then acts on the
//! rule (backend, filters).

use std::{
    cmp::Reverse,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method,
};

/// An HTTPRoute or a GRPCRoute attached to Services, compiled.
#[derive(Debug)]
pub struct HttpRoute {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as text): older routes win ties.
    pub created: Option<String>,
    pub parents: Vec<Parent>,
    /// Linkerd `Server`s (in the route's namespace) it attaches to: the route then selects
    /// requests for authorization, not for routing.
    pub servers: Vec<String>,
    pub rules: Vec<Arc<Rule>>,
}

/// A Service a route attaches to (`parentRefs` of kind Service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub namespace: String,
    pub name: String,
    /// Only this port of the Service, or all of them.
    pub port: Option<u16>,
}

/// Which Gateway API kind a route was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteKind {
    #[default]
    Http,
    Grpc,
    /// The catch-all route of a Service whose own annotations ask for retries or timeouts.
    Default,
    /// Istio's `VirtualService`: rules tried in the order written.
    VirtualService,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::Default => "default",
            RouteKind::VirtualService => "VirtualService",
        }
    }
}

#[derive(Debug)]
pub struct Rule {
    /// The route's kind and `namespace/name`, for metrics and errors.
    pub kind: RouteKind,
    pub route: String,
    pub name: Option<String>,
    pub matches: Vec<Match>,
    pub filters: Filters,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    /// Retries (Linkerd annotations, Istio `retries`), with their budget.
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Istio's fault injection.
    pub fault: Option<Fault>,
    /// Spreads requests over the backends by weight (see [`Rule::backend`]).
    next: AtomicU64,
    /// The backends' total weight, and the multiplier that scrambles [`Rule::next`] over it:
    /// fixed when the rule is made, not worked out per request.
    total_weight: u64,
    step: u64,
}

#[derive(Debug, Default)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    pub method: Option<Method>,
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// On path elements: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. Stored
    /// without a trailing slash.
    Prefix(String),
    /// A plain string prefix (Istio's `uri.prefix`): `/gui/` matches `/gui/x`, not `/gui`.
    StringPrefix(String),
    Regex(regex::Regex),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix(String::new())
    }
}

#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    /// Istio's `prefix`.
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

/// A Service port a rule sends to.
#[derive(Debug)]
pub struct Backend {
    /// `name.namespace.svc.cluster.local`.
    pub service: String,
    /// The Service's port; the port the route is attached on when not given.
    pub port: Option<u16>,
    pub weight: u32,
    pub filters: Filters,
    /// An Istio subset of the Service's endpoints (a DestinationRule's `subsets`).
    pub subset: Option<String>,
}

impl Backend {
    /// `name.namespace.svc.cluster.local:port`, as the snapshot looks Service ports up, for a
    /// request that came to `parent_port`.
    pub fn key(&self, parent_port: u16) -> String {
        format!("{}:{}", self.service, self.port.unwrap_or(parent_port))
    }
}

/// What a rule's (or a backend's) filters do.
#[derive(Debug, Default)]
pub struct Filters {
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    /// `URLRewrite`.
    pub rewrite: Option<Rewrite>,
    /// `RequestRedirect`: the proxy answers itself.
    pub redirect: Option<Redirect>,
}

/// `URLRewrite`: what the backend sees instead of the request's host and path.
#[derive(Debug, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// `RequestRedirect`.
#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug)]
pub enum PathModifier {
    /// `ReplaceFullPath`.
    Full(String),
    /// `ReplacePrefixMatch` (the rule's matches are all path prefixes).
    Prefix(String),
}

impl PathModifier {
    /// The new path of a request for `path` that `matched` took.
    pub fn apply(&self, matched: &PathMatch, path: &str) -> String {
        match (self, matched) {
            (PathModifier::Full(p), _) => p.clone(),
            (PathModifier::Prefix(p), PathMatch::Prefix(prefix)) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                let out = format!("{}{rest}", p.trim_end_matches('/'));
                if out.is_empty() {
                    "/".to_owned()
                } else {
                    out
                }
            }
            // Istio: the matched prefix replaced, as a plain string.
            (PathModifier::Prefix(p), PathMatch::StringPrefix(prefix)) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                let out = format!("{p}{rest}");
                if out.starts_with('/') {
                    out
                } else {
                    format!("/{out}")
                }
            }
            // Gateway API refuses this when the route is read; Istio means the whole path.
            (PathModifier::Prefix(p), _) => p.clone(),
        }
    }
}

impl Redirect {
    /// The `Location` for a request to `host` (the request's authority) on Service port
    /// `port`, for `path` and `query`, that `matched` took.
    pub fn location(
        &self,
        matched: &PathMatch,
        host: &str,
        port: u16,
        path: &str,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = match &self.hostname {
            Some(h) => h.as_str(),
            // Without the request's port: the redirect says its own.
            None => strip_port(host),
        };
        // An explicit port; else the scheme's own when the scheme changes; else the port the
        // request came to. Well-known ports are left out.
        let port = self
            .port
            .or(if self.scheme.is_some() {
                None
            } else {
                Some(port)
            })
            .filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = match &self.path {
            Some(m) => m.apply(matched, path),
            None => path.to_owned(),
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out += &format!(":{p}");
        }
        out += &path;
        if let Some(q) = query {
            out += &format!("?{q}");
        }
        out
    }
}

/// A host without its `:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (h.starts_with('[') || !h.contains(':')) =>
        {
            h
        }
        _ => host,
    }
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
    /// Linkerd's `timeout.linkerd.io/idle`: the longest a request's stream (either way) may go
    /// without data.
    pub idle: Option<Duration>,
}

/// Istio's `fault`: some requests delayed, some answered with an error instead of sent.
#[derive(Debug, Default)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

/// A share of requests, spread evenly: request `n` is in when `floor((n + 1) p)` steps up
/// past `floor(n p)`, so exactly `p` of any run of requests is, without randomness.
#[derive(Debug)]
pub struct Share {
    /// Parts per million.
    ppm: u64,
    next: AtomicU64,
}

impl Share {
    /// `percent` of requests (clamped to 0–100).
    pub fn percent(percent: f64) -> Share {
        Share {
            ppm: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u64,
            next: AtomicU64::new(0),
        }
    }

    pub fn percent_value(&self) -> f64 {
        self.ppm as f64 / 10_000.0
    }

    /// Whether the next request is in the share.
    pub fn hit(&self) -> bool {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let ppm = self.ppm;
        (n + 1).wrapping_mul(ppm) / 1_000_000 > n.wrapping_mul(ppm) / 1_000_000
    }
}

/// What routing needs of a request: its head.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the filter: set replaces, add appends, remove removes.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name, value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name, value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

impl Rule {
    pub fn new(
        route: String,
        name: Option<String>,
        matches: Vec<Match>,
        filters: Filters,
        backends: Vec<Backend>,
        timeouts: Timeouts,
    ) -> Rule {
        let total_weight: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        // An odd multiplier coprime with the total (the smallest of these primes that does not
        // divide it) permutes each round of `total_weight` requests.
        let step = [7919u64, 7927, 7933, 7937]
            .into_iter()
            .find(|p| !total_weight.is_multiple_of(*p))
            .unwrap_or(1);
        Rule {
            kind: RouteKind::Http,
            route,
            name,
            matches,
            filters,
            backends,
            timeouts,
            retry: None,
            fault: None,
            next: AtomicU64::new(0),
            total_weight,
            step,
        }
    }

    /// The rule as part of a route of `kind`.
    pub fn with_kind(mut self, kind: RouteKind) -> Rule {
        self.kind = kind;
        self
    }

    /// Faults injected into the rule's requests.
    pub fn with_fault(mut self, fault: Option<Fault>) -> Rule {
        self.fault = fault;
        self
    }

    /// The rule's requests retried as `retry` says.
    pub fn with_retry(mut self, retry: Option<crate::retry::RetryPolicy>) -> Rule {
        self.retry = retry;
        self
    }

    /// The backend for the next request: each backend gets its weight's share, interleaved
    /// (a counter scrambled by an odd multiplier visits every slot of a round once). `None`
    /// when the rule has no backend of non-zero weight (the spec's 500).
    pub fn backend(&self) -> Option<(usize, &Backend)> {
        if self.total_weight == 0 {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slot = n.wrapping_mul(self.step) % self.total_weight;
        for (i, b) in self.backends.iter().enumerate() {
            let w = u64::from(b.weight);
            if slot < w {
                return Some((i, b));
            }
            slot -= w;
        }
        None
    }
}

impl Match {
    fn matches(&self, head: &Head) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => head.path == p,
            PathMatch::Prefix(p) => {
                head.path.starts_with(p.as_str())
                    && matches!(head.path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatch::StringPrefix(p) => head.path.starts_with(p.as_str()),
            PathMatch::Regex(re) => re.is_match(head.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == head.method)
            && self.headers.iter().all(|h| {
                head.headers
                    .get(&h.name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| h.value.matches(v))
            })
            && self
                .query
                .iter()
                .all(|q| query_value(head.query, &q.name).is_some_and(|v| q.value.matches(v)))
    }
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// The first value of a query parameter (names compare exactly, as the spec says).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// The matches of the routes attached to one Service port, in precedence order.
#[derive(Debug, Default)]
pub struct Table {
    entries: Vec<(Arc<Rule>, usize)>,
    /// For large tables, which entries a path can match at all.
    index: Option<Index>,
}

/// Tables with more entries than this are indexed; below it a scan is as fast.
const INDEX_FROM: usize = 16;

/// The entries of a table by what their path match needs: an exact path and a path prefix
/// are looked up, the regular expressions run as one set, and the rest (Istio's string
/// prefixes) are always candidates. A request is checked only against its candidates, in
/// precedence order, so selection among a thousand routes costs a few lookups.
#[derive(Debug)]
struct Index {
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    /// The lengths of the prefixes in `prefix`, ascending: a request's path is cut only at
    /// these, so its cost is bounded by the configuration, not by a path of many `/`.
    prefix_lengths: Vec<usize>,
    regex: Option<(regex::RegexSet, Vec<u32>)>,
    other: Vec<u32>,
}

impl Index {
    fn new(entries: &[(Arc<Rule>, usize)]) -> Index {
        let mut index = Index {
            exact: HashMap::new(),
            prefix: HashMap::new(),
            prefix_lengths: Vec::new(),
            regex: None,
            other: Vec::new(),
        };
        let mut patterns = Vec::new();
        let mut regex_entries = Vec::new();
        for (i, (rule, m)) in entries.iter().enumerate() {
            let i = i as u32;
            match rule.matches.get(*m).map(|m| &m.path) {
                Some(PathMatch::Exact(p)) => index.exact.entry(p.clone()).or_default().push(i),
                Some(PathMatch::Prefix(p)) => index.prefix.entry(p.clone()).or_default().push(i),
                Some(PathMatch::Regex(re)) => {
                    patterns.push(re.as_str().to_owned());
                    regex_entries.push(i);
                }
                _ => index.other.push(i),
            }
        }
        if !patterns.is_empty() {
            match regex::RegexSet::new(&patterns) {
                Ok(set) => index.regex = Some((set, regex_entries)),
                // Each compiled on its own already; should the set not build, check them one
                // by one.
                Err(_) => index.other.extend(regex_entries),
            }
        }
        index.other.sort_unstable();
        index.prefix_lengths = index.prefix.keys().map(String::len).collect();
        index.prefix_lengths.sort_unstable();
        index.prefix_lengths.dedup();
        index
    }

    /// The entries a request for `path` may match, in precedence order.
    fn candidates(&self, path: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(8);
        if let Some(hits) = self.exact.get(path) {
            out.extend_from_slice(hits);
        }
        // The path cut at each configured prefix length that falls on a path-element
        // boundary ("", "/a", "/a/b", ...).
        let bytes = path.as_bytes();
        for &end in &self.prefix_lengths {
            if end > bytes.len() {
                break;
            }
            let boundary = end == 0 || end == bytes.len() || bytes.get(end) == Some(&b'/');
            if let Some(hits) = path
                .get(..end)
                .filter(|_| boundary)
                .and_then(|p| self.prefix.get(p))
            {
                out.extend_from_slice(hits);
            }
        }
        if let Some((set, entries)) = &self.regex {
            out.extend(set.matches(path).iter().filter_map(|k| entries.get(k)));
        }
        out.extend_from_slice(&self.other);
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// How a match ranks (smaller first), from the spec: an exact path, then the longest prefix
/// (regular expressions after prefixes), then a method, then the most header matches, then
/// the most query matches; ties go to the oldest route, then by namespace/name, then rule and
/// match order.
type Rank<'a> = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    Option<&'a str>,
    &'a str,
    &'a str,
    usize,
    usize,
);

impl Table {
    /// The table of `port` of a Service, from the routes attached to it.
    pub fn new(routes: &[Arc<HttpRoute>], port: u16) -> Table {
        let mut ranked: Vec<(Rank, Arc<Rule>, usize)> = Vec::new();
        for route in routes {
            let attached = route
                .parents
                .iter()
                .any(|p| p.port.is_none_or(|p| p == port));
            if !attached {
                continue;
            }
            for (r, rule) in route.rules.iter().enumerate() {
                for (m, found) in rule.matches.iter().enumerate() {
                    let (kind, len) = match &found.path {
                        // Istio's rules are tried in the order written.
                        _ if route.kind == RouteKind::VirtualService => (0, 0),
                        PathMatch::Exact(p) => (0, p.len()),
                        PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => (1, p.len()),
                        PathMatch::Regex(_) => (2, 0),
                    };
                    let in_order = route.kind == RouteKind::VirtualService;
                    let rank = (
                        kind,
                        Reverse(len),
                        !in_order && found.method.is_none(),
                        Reverse(if in_order { 0 } else { found.headers.len() }),
                        Reverse(if in_order { 0 } else { found.query.len() }),
                        route.created.as_deref(),
                        route.namespace.as_str(),
                        route.name.as_str(),
                        r,
                        m,
                    );
                    ranked.push((rank, rule.clone(), m));
                }
            }
        }
        ranked.sort_by(|a, b| a.0.cmp(&b.0));
        let entries: Vec<(Arc<Rule>, usize)> =
            ranked.into_iter().map(|(_, rule, m)| (rule, m)).collect();
        Table {
            index: (entries.len() > INDEX_FROM).then(|| Index::new(&entries)),
            entries,
        }
    }

    /// Whether any route is attached: then a request no rule matches gets 404.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The table as `/config_dump` shows it: each match in the order requests are tried.
    pub fn describe(&self) -> serde_json::Value {
        let value = |v: &ValueMatch| match v {
            ValueMatch::Exact(v) => format!("= {v}"),
            ValueMatch::Prefix(v) => format!("^= {v}"),
            ValueMatch::Regex(re) => format!("~ {}", re.as_str()),
        };
        let filters = |f: &Filters| {
            let mut names = Vec::new();
            if !f.request_headers.is_empty() {
                names.push("RequestHeaderModifier");
            }
            if !f.response_headers.is_empty() {
                names.push("ResponseHeaderModifier");
            }
            if f.rewrite.is_some() {
                names.push("URLRewrite");
            }
            if f.redirect.is_some() {
                names.push("RequestRedirect");
            }
            names
        };
        let entries = self.entries.iter().filter_map(|(rule, m)| {
            let found = rule.matches.get(*m)?;
            let path = match &found.path {
                PathMatch::Exact(p) => format!("Exact {p}"),
                PathMatch::Prefix(p) => format!("PathPrefix {p}/"),
                PathMatch::StringPrefix(p) => format!("prefix {p}"),
                PathMatch::Regex(re) => format!("RegularExpression {}", re.as_str()),
            };
            Some(serde_json::json!({
                "kind": rule.kind.name(),
                "route": rule.route,
                "rule": rule.name,
                "path": path,
                "method": found.method.as_ref().map(Method::as_str),
                "headers": found.headers.iter().map(|h| format!("{} {}", h.name, value(&h.value))).collect::<Vec<_>>(),
                "query": found.query.iter().map(|q| format!("{} {}", q.name, value(&q.value))).collect::<Vec<_>>(),
                "filters": filters(&rule.filters),
                "backends": rule.backends.iter().map(|b| serde_json::json!({
                    "service": b.service, "port": b.port, "weight": b.weight, "filters": filters(&b.filters),
                })).collect::<Vec<_>>(),
                "timeout_ms": rule.timeouts.request.or(rule.timeouts.backend_request).map(|d| d.as_millis()),
                "idle_timeout_ms": rule.timeouts.idle.map(|d| d.as_millis()),
                "fault": rule.fault.as_ref().map(|f| serde_json::json!({
                    "delay": f.delay.as_ref().map(|(d, share)| serde_json::json!({"ms": d.as_millis(), "percent": share.percent_value()})),
                    "abort": f.abort.as_ref().map(|(a, share)| serde_json::json!({"status": format!("{a:?}"), "percent": share.percent_value()})),
                })),
                "retry": rule.retry.as_ref().map(|r| serde_json::json!({
                    "limit": r.limit,
                    "statuses": r.on.statuses.iter().map(|(lo, hi)| format!("{lo}-{hi}")).collect::<Vec<_>>(),
                    "grpc": r.on.grpc,
                    "per_try_timeout_ms": r.per_try_timeout.map(|d| d.as_millis()),
                })),
            }))
        });
        serde_json::Value::Array(entries.collect())
    }

    /// The rule for a request and the match that took it, or `None` when no match does.
    pub fn select(&self, head: &Head) -> Option<(&Arc<Rule>, &Match)> {
        fn check<'t>(
            entry: &'t (Arc<Rule>, usize),
            head: &Head,
        ) -> Option<(&'t Arc<Rule>, &'t Match)> {
            let (rule, m) = entry;
            let found = rule.matches.get(*m)?;
            found.matches(head).then_some((rule, found))
        }
        match &self.index {
            None => self.entries.iter().find_map(|e| check(e, head)),
            Some(index) => index
                .candidates(head.path)
                .into_iter()
                .find_map(|i| self.entries.get(i as usize).and_then(|e| check(e, head))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_index_of_a_large_table_selects_what_a_scan_selects() {
        let mut routes = Vec::new();
        for i in 0..40 {
            let mut exact = Match {
                path: PathMatch::Exact(format!("/e/{}", i % 7)),
                ..Match::default()
            };
            if i % 3 == 0 {
                exact = header(exact, "x-h", &format!("{}", i % 5));
            }
            let rules = vec![
                rule(
                    &format!("p{i}"),
                    vec![prefix(&format!("/p/{}", i % 9))],
                    &[("a", 1)],
                ),
                rule(&format!("e{i}"), vec![exact], &[("b", 1)]),
                rule(
                    &format!("r{i}"),
                    vec![Match {
                        path: PathMatch::Regex(
                            regex::Regex::new(&format!("^(?:/r/{}/[0-9]+)$", i % 4)).unwrap(),
                        ),
                        ..Match::default()
                    }],
                    &[("c", 1)],
                ),
                rule(
                    &format!("s{i}"),
                    vec![Match {
                        path: PathMatch::StringPrefix(format!("/s{}", i % 3)),
                        ..Match::default()
                    }],
                    &[("d", 1)],
                ),
            ];
            routes.push(route(&format!("r{i:02}"), None, rules));
        }
        let table = Table::new(&routes, 80);
        assert!(table.index.is_some());
        let paths = [
            "/", "/e/3", "/e/3/", "/p/4", "/p/4/x/y", "/p/45", "/r/2/77", "/r/2/x", "/s1",
            "/s10/x", "/p", "/nothing",
        ];
        for path in paths {
            for h in ["0", "1", "4", "none"] {
                let mut headers = HeaderMap::new();
                headers.insert("x-h", HeaderValue::from_str(h).unwrap());
                let head = Head {
                    method: &Method::GET,
                    path,
                    query: None,
                    headers: &headers,
                };
                let indexed = table
                    .select(&head)
                    .map(|(r, m)| (r.name.clone(), format!("{:?}", m.path)));
                let scanned = table.entries.iter().find_map(|(rule, m)| {
                    let found = rule.matches.get(*m)?;
                    found
                        .matches(&head)
                        .then(|| (rule.name.clone(), format!("{:?}", found.path)))
                });
                assert_eq!(indexed, scanned, "{path} x-h={h}");
            }
        }
    }

    #[test]
    fn a_share_takes_exactly_its_percentage_spread_out() {
        let half = Share::percent(50.0);
        let hits: Vec<bool> = (0..6).map(|_| half.hit()).collect();
        assert_eq!(hits, [false, true, false, true, false, true]);
        let fifth = Share::percent(20.0);
        assert_eq!((0..1000).filter(|_| fifth.hit()).count(), 200);
        let all = Share::percent(100.0);
        assert!((0..100).all(|_| all.hit()));
        let none = Share::percent(0.0);
        assert!(!(0..100).any(|_| none.hit()));
        let odd = Share::percent(0.1);
        assert_eq!((0..10_000).filter(|_| odd.hit()).count(), 10);
    }

    fn prefix(p: &str) -> Match {
        Match {
            path: PathMatch::Prefix(p.trim_end_matches('/').to_owned()),
            ..Match::default()
        }
    }

    fn header(mut m: Match, name: &'static str, value: &str) -> Match {
        m.headers.push(HeaderMatch {
            name: HeaderName::from_static(name),
            value: ValueMatch::Exact(value.to_owned()),
        });
        m
    }

    fn rule(name: &str, matches: Vec<Match>, backends: &[(&str, u32)]) -> Arc<Rule> {
        let backends = backends
            .iter()
            .map(|(s, w)| Backend {
                service: (*s).to_owned(),
                port: None,
                weight: *w,
                filters: Filters::default(),
                subset: None,
            })
            .collect();
        Arc::new(Rule::new(
            "ns/r".into(),
            Some(name.into()),
            matches,
            Filters::default(),
            backends,
            Timeouts::default(),
        ))
    }

    fn route(name: &str, created: Option<&str>, rules: Vec<Arc<Rule>>) -> Arc<HttpRoute> {
        Arc::new(HttpRoute {
            kind: RouteKind::Http,
            namespace: "ns".into(),
            name: name.into(),
            created: created.map(str::to_owned),
            servers: Vec::new(),
            parents: vec![Parent {
                namespace: "ns".into(),
                name: "echo".into(),
                port: Some(80),
            }],
            rules,
        })
    }

    fn pick<'a>(
        table: &'a Table,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let head = Head {
            method: &method,
            path,
            query,
            headers: &map,
        };
        table.select(&head).and_then(|(r, _)| r.name.as_deref())
    }

    #[test]
    fn precedence_follows_the_spec() {
        // The conformance suite's mesh-matching route, plus what each precedence step decides.
        let mut exact = Match {
            path: PathMatch::Exact("/v2/exact".into()),
            ..Match::default()
        };
        exact.method = None;
        let mut get = prefix("/v2");
        get.method = Some(Method::GET);
        let mut q = prefix("/");
        q.query.push(QueryMatch {
            name: "debug".into(),
            value: ValueMatch::Exact("1".into()),
        });
        let table = Table::new(
            &[route(
                "r",
                None,
                vec![
                    rule(
                        "v1",
                        vec![prefix("/"), header(prefix("/"), "version", "one")],
                        &[],
                    ),
                    rule(
                        "v2",
                        vec![prefix("/v2"), header(prefix("/"), "version", "two")],
                        &[],
                    ),
                    rule("exact", vec![exact], &[]),
                    rule("get", vec![get], &[]),
                    rule("query", vec![q], &[]),
                ],
            )],
            80,
        );
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            ("GET", "/", &[], Some("v1")),
            ("GET", "/", &[("version", "two")], Some("v2")),
            ("GET", "/v2", &[("version", "one")], Some("get")),
            ("POST", "/v2", &[("version", "one")], Some("v2")),
            ("POST", "/v2/x", &[], Some("v2")),
            // Prefixes match whole path elements.
            ("POST", "/v2x", &[], Some("v1")),
            ("GET", "/v2/exact", &[], Some("exact")),
            ("GET", "/?debug=1", &[], Some("query")),
            ("GET", "/?debug=2", &[], Some("v1")),
            // Header names are case-insensitive, values exact.
            ("GET", "/", &[("Version", "two")], Some("v2")),
            ("GET", "/", &[("version", "Two")], Some("v1")),
        ];
        for (method, target, headers, want) in cases {
            assert_eq!(
                pick(&table, method, target, headers),
                *want,
                "{method} {target} {headers:?}"
            );
        }
    }

    #[test]
    fn ties_go_to_the_oldest_route_then_by_name() {
        let a = route(
            "a",
            Some("2026-01-02T00:00:00Z"),
            vec![rule("a", vec![prefix("/")], &[])],
        );
        let b = route(
            "b",
            Some("2026-01-01T00:00:00Z"),
            vec![rule("b", vec![prefix("/")], &[])],
        );
        let c = route(
            "c",
            Some("2026-01-01T00:00:00Z"),
            vec![rule("c", vec![prefix("/")], &[])],
        );
        let table = Table::new(&[a, c, b], 80);
        assert_eq!(pick(&table, "GET", "/", &[]), Some("b"));
    }

    #[test]
    fn a_route_for_another_port_is_not_attached() {
        let r = route("r", None, vec![rule("r", vec![prefix("/")], &[])]);
        assert!(Table::new(std::slice::from_ref(&r), 8080).is_empty());
        assert!(!Table::new(&[r], 80).is_empty());
    }

    #[test]
    fn weights_split_exactly_and_interleaved() {
        let r = rule(
            "split",
            vec![prefix("/")],
            &[("a", 80), ("b", 20), ("never", 0)],
        );
        let picks: Vec<&str> = (0..2000)
            .map(|_| r.backend().unwrap().1.service.as_str())
            .collect();
        let a = picks.iter().filter(|s| **s == "a").count();
        assert_eq!((a, 2000 - a), (1600, 400));
        assert!(!picks.contains(&"never"));
        // Interleaved: no long runs of one backend.
        assert!(picks[..10].contains(&"b"), "{:?}", &picks[..10]);
        let none = rule("none", vec![prefix("/")], &[("a", 0)]);
        assert!(none.backend().is_none());
    }

    #[test]
    fn rewrites_and_redirects_as_the_conformance_suite_expects() {
        let prefix = |p: &str| PathMatch::Prefix(p.trim_end_matches('/').to_owned());
        let replace = |to: &str| PathModifier::Prefix(to.to_owned());
        // MeshHTTPRouteRewritePath.
        let cases = [
            (
                replace("/one"),
                "/prefix/one",
                "/prefix/one/two",
                "/one/two",
            ),
            (
                replace("/"),
                "/strip-prefix",
                "/strip-prefix/three",
                "/three",
            ),
            (replace("/"), "/strip-prefix", "/strip-prefix", "/"),
            (
                PathModifier::Full("/one".into()),
                "/full/one",
                "/full/one/two",
                "/one",
            ),
            // faces: /gui/ → /.
            (replace("/"), "/gui/", "/gui/index.html", "/index.html"),
        ];
        for (modifier, matched, path, want) in cases {
            assert_eq!(modifier.apply(&prefix(matched), path), want, "{path}");
        }
        // MeshHTTPRouteRedirect*.
        let redirect = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path: None,
            port,
            status: 302,
        };
        let at = |r: &Redirect, path: &str| r.location(&prefix("/"), "echo", 80, path, None);
        let plain = redirect(None, None, None);
        assert_eq!(at(&plain, "/redirect"), "http://echo/redirect");
        let host = redirect(None, Some("example.org"), None);
        assert_eq!(at(&host, "/h"), "http://example.org/h");
        let port = redirect(None, None, Some(8083));
        assert_eq!(at(&port, "/port"), "http://echo:8083/port");
        let scheme = redirect(Some("https"), None, None);
        assert_eq!(at(&scheme, "/scheme"), "https://echo/scheme");
        let path = Redirect {
            path: Some(replace("/replacement-prefix")),
            ..redirect(None, None, None)
        };
        let lemon = path.location(
            &prefix("/original-prefix"),
            "echo",
            80,
            "/original-prefix/lemon",
            None,
        );
        assert_eq!(lemon, "http://echo/replacement-prefix/lemon");
        // The request's port is left out of the host; a non-default Service port is kept.
        let kept = plain.location(&prefix("/"), "echo-v1:8080", 8080, "/x", Some("a=1"));
        assert_eq!(kept, "http://echo-v1:8080/x?a=1");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
    }

    #[test]
    fn header_modifiers_set_add_and_remove() {
        let m = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-set"),
                HeaderValue::from_static("s"),
            )],
            add: vec![(
                HeaderName::from_static("x-add"),
                HeaderValue::from_static("b"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        let mut h = HeaderMap::new();
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-add", HeaderValue::from_static("a"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        m.apply(&mut h);
        assert_eq!(h.get("x-set").unwrap(), "s");
        let added: Vec<_> = h.get_all("x-add").iter().collect();
        assert_eq!(added, ["a", "b"]);
        assert!(h.get("x-gone").is_none());
    }
}
