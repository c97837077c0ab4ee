//! Golden HTTP metrics in Linkerd's names and in Istio's, side by side (`--metrics-dialect`).
//!
//! Linkerd: `request_total`, `response_total`, `response_latency_ms`,
//! `{inbound,outbound}_http_errors_total`. Istio: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`. No
//! label takes an unbounded value: authorities are Service names or addresses the mesh knows,
//! never paths.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use super::UNKNOWN;

/// Which metric names to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Linkerd,
    Istio,
    Both,
}

impl Dialect {
    fn linkerd(self) -> bool {
        matches!(self, Dialect::Linkerd | Dialect::Both)
    }

    fn istio(self) -> bool {
        matches!(self, Dialect::Istio | Dialect::Both)
    }
}

/// Who one HTTP request is between, as the reporting agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// `source` (the client's agent, Linkerd's `outbound`) or `destination` (`inbound`).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    /// The Service's `name.namespace.svc.cluster.local`, or `unknown`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    /// `deployment`, `statefulset`, `daemonset`… when the workload names an owner.
    pub destination_kind: Option<&'static str>,
    pub destination_principal: String,
    /// The identities in Linkerd's form (`sa.ns.serviceaccount.identity.linkerd.<domain>`),
    /// empty when unknown.
    pub client_id: String,
    pub server_id: String,
    /// The Service's `fqdn:port`, else the address dialled.
    pub authority: String,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// `mutual_tls`, `node_local` (same node, identities known in-process) or `none`.
    pub security: &'static str,
}

impl RequestLabels {
    pub fn unknown(reporter: &'static str) -> Self {
        Self {
            reporter,
            source_workload: UNKNOWN.into(),
            source_namespace: UNKNOWN.into(),
            source_principal: UNKNOWN.into(),
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            destination_workload: UNKNOWN.into(),
            destination_namespace: UNKNOWN.into(),
            destination_kind: None,
            destination_principal: UNKNOWN.into(),
            client_id: String::new(),
            server_id: String::new(),
            authority: UNKNOWN.into(),
            protocol: "http",
            security: "none",
        }
    }

    fn direction(&self) -> &'static str {
        match self.reporter {
            "source" => "outbound",
            _ => "inbound",
        }
    }

    fn tls(&self) -> &'static str {
        match self.security {
            "none" => "no_identity",
            _ => "true",
        }
    }

    fn linkerd(&self) -> [&str; 10] {
        let (client_id, server_id) = match self.reporter {
            "source" => ("", self.server_id.as_str()),
            _ => (self.client_id.as_str(), ""),
        };
        let kind = |k: &str| match self.destination_kind == Some(k) {
            true => self.destination_workload.as_str(),
            false => "",
        };
        [
            self.direction(),
            &self.authority,
            self.tls(),
            client_id,
            server_id,
            known(&self.destination_namespace),
            kind("deployment"),
            kind("statefulset"),
            kind("daemonset"),
            known(&self.destination_service_name),
        ]
    }

    fn istio(&self) -> [&str; 12] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            self.protocol,
            self.security,
        ]
    }
}

fn known(v: &str) -> &str {
    match v {
        UNKNOWN => "",
        v => v,
    }
}

const LINKERD: [&str; 10] = [
    "direction",
    "authority",
    "tls",
    "client_id",
    "server_id",
    "dst_namespace",
    "dst_deployment",
    "dst_statefulset",
    "dst_daemonset",
    "dst_service",
];
const ISTIO: [&str; 12] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "connection_security_policy",
];
/// Linkerd's `response_latency_ms` buckets.
const LINKERD_BUCKETS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];
/// Istio's `istio_request_duration_milliseconds` buckets.
const ISTIO_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's request and response size buckets.
const BYTE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// How one request ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    /// From the trailers, or the headers of a trailers-only response.
    pub grpc_status: Option<u32>,
    /// Istio's response flag (`-` when the request went through).
    pub flags: &'static str,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Outcome {
    /// Linkerd's classification: a gRPC status other than OK, or a 5xx, is a failure.
    pub fn success(&self) -> bool {
        match self.grpc_status {
            Some(code) => code == 0,
            None => self.status < 500,
        }
    }
}

/// Label sets remembered for pruning; beyond this, series still count but are no longer
/// removed when their workload leaves (a bound, not an expected size).
const MAX_SERIES: usize = 100_000;

/// The metric vectors, by index in [`Series::vec`].
#[derive(Clone, Copy)]
enum Vector {
    RequestTotal,
    ResponseTotal,
    ResponseLatency,
    IstioRequests,
    IstioDuration,
    IstioRequestBytes,
    IstioResponseBytes,
}

/// One series, remembered so it can be removed when a workload it names leaves.
struct Remembered {
    vec: Vector,
    values: Box<[String]>,
    /// Source namespace and workload, destination namespace and workload.
    workloads: [String; 4],
}

/// Labels of the route metrics, as Linkerd's `outbound_http_route_*`: the Service the request
/// was for (the route's parent) and the route that took it.
const ROUTE: [&str; 6] = [
    "parent_namespace",
    "parent_name",
    "parent_port",
    "route_kind",
    "route_namespace",
    "route_name",
];

#[derive(Debug, Clone, Default)]
pub struct RouteLabels {
    pub parent_namespace: String,
    pub parent_name: String,
    pub parent_port: String,
    pub route_kind: &'static str,
    pub route_namespace: String,
    pub route_name: String,
}

impl RouteLabels {
    fn values(&self) -> Vec<&str> {
        vec![
            &self.parent_namespace,
            &self.parent_name,
            &self.parent_port,
            self.route_kind,
            &self.route_namespace,
            &self.route_name,
        ]
    }
}

/// Buckets of `outbound_http_route_request_duration_seconds`.
const ROUTE_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Counters a [`RouteSeries`] keeps resolved, at most (statuses, backends).
const ROUTE_CACHE: usize = 16;

/// The route metrics of one rule for one parent (see [`HttpMetrics::route_series`]).
pub struct RouteSeries {
    labels: RouteLabels,
    duration: Histogram,
    statuses: Mutex<Vec<((u16, &'static str), IntCounter)>>,
    backends: Mutex<Vec<(BackendKey, IntCounter)>>,
}

/// A backend Service port: namespace, name, port.
type BackendKey = (String, String, u16);

/// What became of a retry a route asked for.
#[derive(Debug, Clone, Copy)]
pub enum RetryResult {
    Retried = 0,
    LimitExceeded = 1,
    Overflow = 2,
}

pub struct HttpMetrics {
    dialect: Dialect,
    request_total: IntCounterVec,
    response_total: IntCounterVec,
    response_latency: HistogramVec,
    istio_requests: IntCounterVec,
    istio_duration: HistogramVec,
    istio_request_bytes: HistogramVec,
    istio_response_bytes: HistogramVec,
    /// Linkerd's `outbound_http_errors_total` and `inbound_http_errors_total`, by `error`.
    errors: [IntCounterVec; 2],
    /// Per route (Linkerd's `outbound_http_route_*`): statuses answered, requests per backend,
    /// retries made, retries refused by the limit and by the budget.
    route_statuses: IntCounterVec,
    route_durations: HistogramVec,
    route_backend_requests: IntCounterVec,
    route_retries: [IntCounterVec; 3],
    ejections: IntCounterVec,
    series: Mutex<HashMap<u64, Remembered>>,
    hasher: std::hash::RandomState,
}

impl HttpMetrics {
    pub fn new(registry: &Registry, dialect: Dialect) -> Result<Self, prometheus::Error> {
        let linkerd_response: Vec<&str> = LINKERD
            .iter()
            .copied()
            .chain(["classification", "status_code", "grpc_status"])
            .collect();
        let linkerd_latency: Vec<&str> = LINKERD.iter().copied().chain(["status_code"]).collect();
        let istio: Vec<&str> = ISTIO
            .iter()
            .copied()
            .chain(["response_code", "grpc_response_status", "response_flags"])
            .collect();
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
        };
        let m = Self {
            dialect,
            request_total: IntCounterVec::new(
                Opts::new("request_total", "HTTP requests (Linkerd)."),
                &LINKERD,
            )?,
            response_total: IntCounterVec::new(
                Opts::new(
                    "response_total",
                    "HTTP responses, by classification (Linkerd).",
                ),
                &linkerd_response,
            )?,
            response_latency: histogram(
                "response_latency_ms",
                "From a request's head to its response's end, in ms (Linkerd).",
                &LINKERD_BUCKETS,
                &linkerd_latency,
            )?,
            istio_requests: IntCounterVec::new(
                Opts::new("istio_requests_total", "HTTP requests (Istio)."),
                &istio,
            )?,
            istio_duration: histogram(
                "istio_request_duration_milliseconds",
                "Request duration in ms (Istio).",
                &ISTIO_BUCKETS,
                &istio,
            )?,
            istio_request_bytes: histogram(
                "istio_request_bytes",
                "Request body sizes (Istio).",
                &BYTE_BUCKETS,
                &istio,
            )?,
            istio_response_bytes: histogram(
                "istio_response_bytes",
                "Response body sizes (Istio).",
                &BYTE_BUCKETS,
                &istio,
            )?,
            errors: [
                IntCounterVec::new(
                    Opts::new(
                        "outbound_http_errors_total",
                        "HTTP requests the outbound proxy failed or refused itself, by error.",
                    ),
                    &["error"],
                )?,
                IntCounterVec::new(
                    Opts::new(
                        "inbound_http_errors_total",
                        "HTTP requests the inbound proxy failed or refused itself, by error.",
                    ),
                    &["error"],
                )?,
            ],
            route_durations: histogram(
                "outbound_http_route_request_duration_seconds",
                "From a routed request's head to its response's end, in seconds (Linkerd).",
                &ROUTE_BUCKETS,
                &ROUTE,
            )?,
            route_statuses: IntCounterVec::new(
                Opts::new(
                    "outbound_http_route_request_statuses_total",
                    "Requests routed by a route, by the status answered.",
                ),
                &ROUTE.iter().copied().chain(["http_status", "error"]).collect::<Vec<_>>(),
            )?,
            route_backend_requests: IntCounterVec::new(
                Opts::new(
                    "outbound_http_route_backend_requests_total",
                    "Requests (attempts) a route sent to each of its backends.",
                ),
                &ROUTE
                    .iter()
                    .copied()
                    .chain(["backend_namespace", "backend_name", "backend_port"])
                    .collect::<Vec<_>>(),
            )?,
            route_retries: [
                ("outbound_http_route_retry_requests_total", "Retries a route made."),
                (
                    "outbound_http_route_retry_limit_exceeded_total",
                    "Requests a route would have retried again but for the retry limit.",
                ),
                (
                    "outbound_http_route_retry_overflow_total",
                    "Requests a route would have retried but for the retry budget (or a body too large to replay).",
                ),
            ]
            .map(|(name, help)| IntCounterVec::new(Opts::new(name, help), &ROUTE))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .try_into()
            .map_err(|_| prometheus::Error::Msg("three retry counters".into()))?,
            ejections: IntCounterVec::new(
                Opts::new(
                    "outbound_http_outlier_ejections_total",
                    "Endpoints outlier detection ejected (Istio DestinationRule).",
                ),
                &["service_namespace", "service_name"],
            )?,
            series: Mutex::default(),
            hasher: std::hash::RandomState::new(),
        };
        registry.register(Box::new(m.ejections.clone()))?;
        registry.register(Box::new(m.route_statuses.clone()))?;
        registry.register(Box::new(m.route_durations.clone()))?;
        registry.register(Box::new(m.route_backend_requests.clone()))?;
        for c in &m.route_retries {
            registry.register(Box::new(c.clone()))?;
        }
        if dialect.linkerd() {
            registry.register(Box::new(m.request_total.clone()))?;
            registry.register(Box::new(m.response_total.clone()))?;
            registry.register(Box::new(m.response_latency.clone()))?;
            for e in &m.errors {
                registry.register(Box::new(e.clone()))?;
            }
        }
        if dialect.istio() {
            registry.register(Box::new(m.istio_requests.clone()))?;
            registry.register(Box::new(m.istio_duration.clone()))?;
            registry.register(Box::new(m.istio_request_bytes.clone()))?;
            registry.register(Box::new(m.istio_response_bytes.clone()))?;
        }
        Ok(m)
    }

    /// Remembers the series `values` of `vec` for pruning.
    fn remember(&self, vec: Vector, values: &[&str], labels: &RequestLabels) {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        (vec as u8).hash(&mut h);
        values.hash(&mut h);
        let key = h.finish();
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        if series.len() >= MAX_SERIES || series.contains_key(&key) {
            return;
        }
        series.insert(
            key,
            Remembered {
                vec,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
                workloads: [
                    labels.source_namespace.clone(),
                    labels.source_workload.clone(),
                    labels.destination_namespace.clone(),
                    labels.destination_workload.clone(),
                ],
            },
        );
    }

    /// The series of requests labelled `labels`, resolved once: a connection keeps it for
    /// every request to the same destination, so a request costs a few atomic increments.
    pub fn series(&self, labels: RequestLabels) -> Arc<Series> {
        let request_total = self.dialect.linkerd().then(|| {
            let values = labels.linkerd();
            self.remember(Vector::RequestTotal, &values, &labels);
            self.request_total.with_label_values(&values)
        });
        Arc::new(Series {
            labels,
            request_total,
            responses: Mutex::default(),
        })
    }

    /// The route metrics of one route rule for one parent, resolved as they are used: a
    /// connection keeps it for every request the rule takes.
    pub fn route_series(&self, labels: RouteLabels) -> Arc<RouteSeries> {
        Arc::new(RouteSeries {
            duration: self.route_durations.with_label_values(&labels.values()),
            labels,
            statuses: Mutex::default(),
            backends: Mutex::default(),
        })
    }

    /// A routed request's answer (its status, or the proxy's own error).
    pub fn route_status(&self, route: &RouteSeries, status: u16, error: &'static str) {
        let key = (status, error);
        if let Ok(mut cache) = route.statuses.lock() {
            if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
                c.inc();
                return;
            }
            let mut values = route.labels.values();
            let code = status.to_string();
            values.extend([code.as_str(), error]);
            let counter = self.route_statuses.with_label_values(&values);
            counter.inc();
            if cache.len() < ROUTE_CACHE {
                cache.push((key, counter));
            }
        }
    }

    /// A routed request ended (its response's end, or the proxy's own answer).
    pub fn route_duration(&self, route: &RouteSeries, took: std::time::Duration) {
        route.duration.observe(took.as_secs_f64());
    }

    /// An attempt of a routed request sent to a backend Service port.
    pub fn route_backend(&self, route: &RouteSeries, namespace: &str, name: &str, port: u16) {
        if let Ok(mut cache) = route.backends.lock() {
            let hit = cache
                .iter()
                .find(|((ns, n, p), _)| *p == port && ns == namespace && n == name);
            if let Some((_, c)) = hit {
                c.inc();
                return;
            }
            let mut values = route.labels.values();
            let port_text = port.to_string();
            values.extend([namespace, name, port_text.as_str()]);
            let counter = self.route_backend_requests.with_label_values(&values);
            counter.inc();
            if cache.len() < ROUTE_CACHE {
                cache.push(((namespace.to_owned(), name.to_owned(), port), counter));
            }
        }
    }

    /// Outlier detection ejected an endpoint of the Service.
    pub fn ejection(&self, namespace: &str, name: &str) {
        self.ejections.with_label_values(&[namespace, name]).inc();
    }

    /// What became of a routed request's retry.
    pub fn retry(&self, route: &RouteSeries, result: RetryResult) {
        self.route_retries[result as usize]
            .with_label_values(&route.labels.values())
            .inc();
    }

    /// A request's head was received and is being forwarded (Linkerd's `request_total`).
    pub fn request(&self, series: &Series) {
        if let Some(c) = &series.request_total {
            c.inc();
        }
    }

    /// A request ended: its response finished (or failed).
    pub fn response(&self, series: &Series, outcome: &Outcome) {
        let key = (outcome.status, outcome.grpc_status, outcome.flags);
        let cached = series
            .responses
            .lock()
            .ok()
            .and_then(|r| r.iter().find(|(k, _)| *k == key).map(|(_, h)| h.clone()));
        let handles = match cached {
            Some(h) => h,
            None => {
                let h = Arc::new(self.response_series(&series.labels, outcome));
                if let Ok(mut r) = series.responses.lock() {
                    if r.len() < MAX_OUTCOMES {
                        r.push((key, h.clone()));
                    }
                }
                h
            }
        };
        let ms = outcome.duration.as_secs_f64() * 1e3;
        if let Some(c) = &handles.response_total {
            c.inc();
        }
        if let Some(h) = &handles.latency {
            h.observe(ms);
        }
        if let Some((requests, duration, request_bytes, response_bytes)) = &handles.istio {
            requests.inc();
            duration.observe(ms);
            request_bytes.observe(outcome.request_bytes as f64);
            response_bytes.observe(outcome.response_bytes as f64);
        }
    }

    /// The response series of `labels` for an outcome like `outcome`.
    fn response_series(&self, labels: &RequestLabels, outcome: &Outcome) -> Responses {
        let status = outcome.status.to_string();
        let grpc = outcome.grpc_status.map(|g| g.to_string());
        let mut out = Responses::default();
        if self.dialect.linkerd() {
            let base = labels.linkerd();
            let classification = if outcome.success() {
                "success"
            } else {
                "failure"
            };
            let mut values: Vec<&str> = base.to_vec();
            values.extend([
                classification,
                status.as_str(),
                grpc.as_deref().unwrap_or(""),
            ]);
            self.remember(Vector::ResponseTotal, &values, labels);
            out.response_total = Some(self.response_total.with_label_values(&values));
            let mut values: Vec<&str> = base.to_vec();
            values.push(&status);
            self.remember(Vector::ResponseLatency, &values, labels);
            out.latency = Some(self.response_latency.with_label_values(&values));
        }
        if self.dialect.istio() {
            let mut values: Vec<&str> = labels.istio().to_vec();
            values.extend([
                status.as_str(),
                grpc.as_deref().unwrap_or("-"),
                outcome.flags,
            ]);
            for vec in [
                Vector::IstioRequests,
                Vector::IstioDuration,
                Vector::IstioRequestBytes,
                Vector::IstioResponseBytes,
            ] {
                self.remember(vec, &values, labels);
            }
            out.istio = Some((
                self.istio_requests.with_label_values(&values),
                self.istio_duration.with_label_values(&values),
                self.istio_request_bytes.with_label_values(&values),
                self.istio_response_bytes.with_label_values(&values),
            ));
        }
        out
    }

    /// A request the proxy failed or refused itself (Linkerd's `*_http_errors_total`); its
    /// response is recorded by [`HttpMetrics::response`] when there is one.
    pub fn error(&self, reporter: &'static str, error: &'static str) {
        if self.dialect.linkerd() {
            let i = usize::from(reporter != "source");
            if let Some(v) = self.errors.get(i) {
                v.with_label_values(&[error]).inc();
            }
        }
    }

    /// Removes the series naming a workload `live` does not know any more.
    pub fn forget_workloads(&self, live: &dyn Fn(&str, &str) -> bool) {
        let gone = |ns: &str, w: &str| w != UNKNOWN && !live(ns, w);
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        series.retain(|_, s| {
            let keep =
                !gone(&s.workloads[0], &s.workloads[1]) && !gone(&s.workloads[2], &s.workloads[3]);
            if !keep {
                let values: Vec<&str> = s.values.iter().map(String::as_str).collect();
                let _ = match s.vec {
                    Vector::RequestTotal => self.request_total.remove_label_values(&values),
                    Vector::ResponseTotal => self.response_total.remove_label_values(&values),
                    Vector::ResponseLatency => self.response_latency.remove_label_values(&values),
                    Vector::IstioRequests => self.istio_requests.remove_label_values(&values),
                    Vector::IstioDuration => self.istio_duration.remove_label_values(&values),
                    Vector::IstioRequestBytes => {
                        self.istio_request_bytes.remove_label_values(&values)
                    }
                    Vector::IstioResponseBytes => {
                        self.istio_response_bytes.remove_label_values(&values)
                    }
                };
            }
            keep
        });
    }
}

/// The series of one kind of request (who to whom), with the response series of the
/// outcomes seen so far. Series of a workload that left are removed from the exposition; a
/// connection still holding them counts into the void until it ends.
pub struct Series {
    labels: RequestLabels,
    request_total: Option<IntCounter>,
    responses: Mutex<Vec<(OutcomeKey, Arc<Responses>)>>,
}

/// Status, gRPC status, flag: what tells one response series of a [`Series`] from another.
type OutcomeKey = (u16, Option<u32>, &'static str);

impl Series {
    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }
}

/// Distinct outcomes (status, gRPC status, flag) one [`Series`] keeps resolved.
const MAX_OUTCOMES: usize = 32;

#[derive(Default)]
struct Responses {
    response_total: Option<IntCounter>,
    latency: Option<Histogram>,
    istio: Option<(IntCounter, Histogram, Histogram, Histogram)>,
}
