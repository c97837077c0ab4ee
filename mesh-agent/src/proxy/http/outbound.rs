//! The source side of HTTP: serves a client pod's HTTP/1.x or HTTP/2 connection and forwards
//! each request on its own to an endpoint picked for it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue},
    Request, Response, Version,
};
use tracing::debug;

use super::{
    authority,
    body::Replay,
    connected, finish_failed, grpc_status,
    inbound::refused_by_policy,
    is_grpc, is_upgrade,
    pool::{BoxIo, Checkin, Key, Route, SendError},
    record, relay_response, respond, serve_connection, strip_agent_headers, strip_hop_by_hop, Body,
    Failure, ServeLimits, Upgrade, DST_CANONICAL_NAME,
};
use crate::{
    balance::InFlight,
    identity::Identity,
    metrics::{
        http::{Outcome, RequestLabels, RetryResult, RouteLabels, RouteSeries, Series},
        ConnectionLabels, Metrics,
    },
    proxy::{
        detect::Protocol,
        hbone::{HboneConnector, TunnelRequest},
        inbound::Baggage,
        outbound::{connect_from_pod, hop_to, is_host_scoped, ClientIo, Connection, Hop},
        relay::Metered,
    },
    route::{Abort, Head, PathMatch, Rewrite, Rule},
    state::{Admitted, Destination, ServiceTarget, Workload},
};

/// One client connection served as HTTP.
struct Client {
    conn: Connection,
    destination: Destination,
    /// Labels every request of this connection shares (the source, the Service).
    labels: RequestLabels,
    /// Bytes read from the client so far, and that count when the last response ended: equal
    /// while the connection sits idle between requests.
    read: Arc<AtomicU64>,
    read_at_last_response: Arc<AtomicU64>,
    /// What the HBONE requests of this client say about it (metric labels at the other end).
    baggage: String,
    /// The Service dialled, as `l5d-dst-canonical` tells the destination agent.
    canonical: Option<HeaderValue>,
    /// What this connection has resolved about each destination it sent requests to.
    destinations: Mutex<HashMap<SeriesKey, Arc<Resolved>>>,
    /// The route metrics of each rule its requests took (the rule kept, so that its address
    /// names it).
    routes: Mutex<Vec<(Arc<Rule>, Arc<RouteSeries>)>>,
    /// The client pod's identity, for its requests over HBONE.
    source_id: Arc<Identity>,
    /// The identities of the pods its requests went to over HBONE, made once.
    peer_ids: Mutex<Vec<Arc<Identity>>>,
}

/// One destination of a client connection, resolved once.
struct Resolved {
    series: Arc<Series>,
    /// This agent's inbound series when the destination is on this node.
    inbound_series: Option<Arc<Series>>,
    /// What a request over HBONE tells the destination agent.
    hbone_headers: Vec<(HeaderName, HeaderValue)>,
    /// The inbound policy of the destination when it is a pod of this node.
    policy: Option<crate::proxy::policy::PolicyCheck>,
}

/// Endpoint, the hop's security, gRPC or not.
type SeriesKey = (std::net::SocketAddr, &'static str, bool);
/// Destinations one connection keeps resolved series for.
const MAX_SERIES_PER_CONNECTION: usize = 256;
/// Route rules one connection keeps resolved route metrics for.
const MAX_ROUTES_PER_CONNECTION: usize = 32;
/// Destination identities one connection keeps made.
const MAX_PEER_IDS_PER_CONNECTION: usize = 16;

impl Client {
    /// The series of a request the proxy answers itself before a destination is known
    /// (refused, unrouted, redirected), labelled with the client's side only; the request is
    /// counted.
    fn answered_here(&self, grpc: bool) -> Arc<Series> {
        let metrics = &self.conn.inputs.metrics;
        let mut labels = self.labels.clone();
        if grpc {
            labels.protocol = "grpc";
        }
        let series = metrics.http.series(labels);
        metrics.http.request(&series);
        series
    }

    /// The proxy's own answer to a request refused before an endpoint answered it, counted
    /// on the client's side only.
    fn refused(
        &self,
        grpc: bool,
        failure: Failure,
        detail: &str,
        started: Instant,
    ) -> Response<Body> {
        let series = self.answered_here(grpc);
        finish_failed(&self.conn.inputs.metrics, &series, failure, detail, started)
    }

    /// The route metrics of requests `rule` takes on this connection (to the Service
    /// `parent` it dialled).
    fn route_series(&self, rule: &Arc<Rule>, parent: &ServiceTarget) -> Arc<RouteSeries> {
        if let Ok(cache) = self.routes.lock() {
            if let Some((_, s)) = cache.iter().find(|(r, _)| Arc::ptr_eq(r, rule)) {
                return s.clone();
            }
        }
        let series = self
            .conn
            .inputs
            .metrics
            .http
            .route_series(route_labels(rule, parent));
        if let Ok(mut cache) = self.routes.lock() {
            if cache.len() < MAX_ROUTES_PER_CONNECTION {
                cache.push((rule.clone(), series.clone()));
            }
        }
        series
    }

    /// The identities a request to the pod `dst` travels between over HBONE: the client
    /// pod's and `dst`'s. `dst`'s is made once per connection and reused for every pod of the
    /// same trust domain, namespace and service account, compared whole each time (a pod's
    /// address may pass to another pod while the connection lasts).
    fn hbone_identities(&self, dst: &Workload) -> (Arc<Identity>, Arc<Identity>) {
        let trust_domain = &self.conn.inputs.trust_domain;
        let mut known = self.peer_ids.lock().ok();
        let found = known
            .as_ref()
            .and_then(|ids| ids.iter().find(|id| dst.has_identity(id, trust_domain)))
            .cloned();
        let destination = found.unwrap_or_else(|| {
            let id = Arc::new(dst.identity(trust_domain));
            if let Some(ids) = known
                .as_mut()
                .filter(|ids| ids.len() < MAX_PEER_IDS_PER_CONNECTION)
            {
                ids.push(id.clone());
            }
            id
        });
        (self.source_id.clone(), destination)
    }

    /// What requests to `endpoint` (the pod `dst`, if known) over a hop of `security` are
    /// labelled with and send along.
    fn destination_for(
        &self,
        endpoint: std::net::SocketAddr,
        dst: Option<&Arc<Workload>>,
        security: &'static str,
        grpc: bool,
    ) -> Arc<Resolved> {
        let key = (endpoint, security, grpc);
        if let Some(hit) = self
            .destinations
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return hit;
        }
        let metrics = &self.conn.inputs.metrics;
        let mut labels = self.labels.clone();
        if grpc {
            labels.protocol = "grpc";
        }
        destination_labels(&mut labels, dst, &self.conn.inputs.trust_domain);
        labels.security = security;
        let inbound = (security == "node_local").then(|| {
            let mut l = labels.clone();
            l.reporter = "destination";
            metrics.http.series(l)
        });
        let tunnel = TunnelRequest {
            baggage: self.baggage.clone(),
            forwarded_for: self.conn.source.address_for(endpoint),
            protocol: Protocol::Http2,
        };
        let policy = match dst {
            Some(d) if d.enrolled && inbound.is_some() => {
                Some(crate::proxy::outbound::local_policy(
                    &self.conn.inputs,
                    &self.conn.source,
                    endpoint,
                ))
            }
            _ => None,
        };
        let found = Arc::new(Resolved {
            series: metrics.http.series(labels),
            policy,
            inbound_series: inbound,
            hbone_headers: HboneConnector::request_headers(endpoint, &tunnel),
        });
        if let Ok(mut m) = self.destinations.lock() {
            if m.len() < MAX_SERIES_PER_CONNECTION {
                m.insert(key, found.clone());
            }
        }
        found
    }
}

/// Serves `io` (a captured connection that speaks `protocol`) until the client closes it.
pub async fn serve(conn: Connection, destination: Destination, io: ClientIo, protocol: Protocol) {
    let inputs = conn.inputs.clone();
    let labels = client_labels(&conn, &destination);
    let tcp = connection_labels(&conn, &labels, &destination);
    let guard = inputs.metrics.open_connection(&tcp);
    let io = Metered::new(io, guard.sent.clone(), guard.received.clone());
    let canonical = match &destination {
        Destination::Service(svc) => {
            HeaderValue::from_str(&format!("{}:{}", svc.fqdn(), svc.port)).ok()
        }
        _ => None,
    };
    let source_id = Arc::new(conn.source.workload.identity(&inputs.trust_domain));
    let client = Arc::new(Client {
        canonical,
        baggage: Baggage::header(&labels.source_workload, &labels.source_namespace),
        conn,
        destination,
        labels,
        read: io.bytes_read(),
        read_at_last_response: Default::default(),
        destinations: Mutex::default(),
        routes: Mutex::default(),
        source_id,
        peer_ids: Mutex::default(),
    });
    let served = client.clone();
    let limits = ServeLimits {
        head_timeout: inputs.http_head_timeout,
        max_streams: inputs.max_streams,
        max_frame: None,
        drain: inputs.drain.clone(),
    };
    let forward_one = move |req| {
        let client = served.clone();
        async move { forward(&client, req).await }
    };
    let result = serve_connection(io, protocol, forward_one, limits).await;
    if let Err(e) = result {
        // The head timeout also ends a keep-alive connection left idle: not an error.
        let idle = client.read.load(Ordering::Relaxed)
            == client.read_at_last_response.load(Ordering::Relaxed);
        if !(e.is_timeout() && idle) {
            protocol_error(&inputs.metrics, &client.labels, &e);
        }
        debug!(client = %client.conn.client, orig = %client.conn.orig, "HTTP client connection ended: {e}");
    }
}

/// Records a client connection hyper gave up on (it answered 400 or 431 itself, or closed a
/// head that came too slowly).
pub fn protocol_error(metrics: &Metrics, labels: &RequestLabels, e: &hyper::Error) {
    let (status, error) = if e.is_parse_too_large() {
        (431, "head_too_large")
    } else if e.is_parse() {
        (400, "malformed")
    } else if e.is_timeout() {
        (408, "head_timeout")
    } else {
        return;
    };
    metrics.http.error(labels.reporter, error);
    metrics.http.response(
        &metrics.http.series(labels.clone()),
        &Outcome {
            status,
            grpc_status: None,
            flags: "DPE",
            duration: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
        },
    );
}

/// The labels of the client's side, and of the Service it dialled.
fn client_labels(conn: &Connection, destination: &Destination) -> RequestLabels {
    let inputs = &conn.inputs;
    let src = &conn.source.workload;
    let id = src.identity(&inputs.trust_domain);
    let mut l = RequestLabels::unknown("source");
    l.source_workload = src.workload.clone();
    l.source_namespace = src.namespace.clone();
    l.source_principal = id.to_string();
    l.client_id = id.to_linkerd();
    match destination {
        Destination::Service(svc) => {
            l.destination_service = svc.fqdn();
            l.destination_service_name = svc.name.clone();
            l.destination_service_namespace = svc.namespace.clone();
            l.authority = format!("{}:{}", svc.fqdn(), svc.port);
        }
        // A pod's address is bounded by the pods there are; anything else a pod dials is not.
        Destination::Pod(_) => l.authority = conn.orig.to_string(),
        Destination::Passthrough => {}
    }
    l
}

/// The TCP series of the client connection itself.
fn connection_labels(
    conn: &Connection,
    labels: &RequestLabels,
    destination: &Destination,
) -> ConnectionLabels {
    let mut tcp = ConnectionLabels::unknown("source");
    tcp.source_workload = labels.source_workload.clone();
    tcp.source_namespace = labels.source_namespace.clone();
    tcp.source_principal = labels.source_principal.clone();
    tcp.destination_service = labels.destination_service.clone();
    let first = match destination {
        Destination::Service(svc) => {
            tcp.destination_namespace = svc.namespace.clone();
            svc.endpoints.first().copied()
        }
        _ => Some(conn.orig.0),
    };
    // Requests may go to several endpoints; the connection is labelled with the first.
    if let Some(endpoint) = first {
        let dst = conn.snapshot.pod_by_ip(endpoint.ip());
        if let Some(d) = dst {
            tcp.destination_workload = d.workload.clone();
            tcp.destination_namespace = d.namespace.clone();
            if d.enrolled {
                tcp.destination_principal = d.identity(&conn.inputs.trust_domain).to_string();
            }
        }
        tcp.connection_security_policy =
            hop_to(&conn.inputs, &conn.source, endpoint, dst).security();
    }
    tcp
}

/// Fills in the destination pod of one request.
fn destination_labels(labels: &mut RequestLabels, dst: Option<&Arc<Workload>>, domain: &str) {
    let Some(dst) = dst else { return };
    labels.destination_workload = dst.workload.clone();
    labels.destination_namespace = dst.namespace.clone();
    labels.destination_kind = dst.kind;
    if dst.enrolled {
        let id = dst.identity(domain);
        labels.destination_principal = id.to_string();
        labels.server_id = id.to_linkerd();
    }
}

/// Applies a `URLRewrite`: the new path (the query kept) and host.
fn rewrite_request<B>(req: &mut Request<B>, rewrite: &Rewrite, matched: &PathMatch) {
    let mut parts = req.uri().clone().into_parts();
    if let Some(modifier) = &rewrite.path {
        let path = modifier.apply(matched, req.uri().path());
        let target = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        parts.path_and_query = target.parse().ok().or(parts.path_and_query);
    }
    if let Some(host) = &rewrite.hostname {
        if parts.authority.is_some() {
            parts.authority = host.parse().ok().or(parts.authority);
        }
        if let Ok(value) = HeaderValue::from_str(host) {
            req.headers_mut().insert(hyper::header::HOST, value);
        }
    }
    if let Ok(uri) = hyper::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The proxy's own answer to a request a route redirects: the status and `Location`.
fn answer(
    client: &Client,
    grpc: bool,
    started: Instant,
    status: u16,
    location: &str,
) -> Response<Body> {
    let metrics = &client.conn.inputs.metrics;
    let series = client.answered_here(grpc);
    let mut resp = Response::new(Body::full(hyper::body::Bytes::new()));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::FOUND);
    if let Ok(value) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(hyper::header::LOCATION, value);
    }
    record(metrics, &series, resp.status(), None, "-", started, 0, 0);
    resp
}

/// The labels of a request's route metrics: the Service dialled and the route's rule.
fn route_labels(rule: &Rule, parent: &ServiceTarget) -> RouteLabels {
    let (route_namespace, route_name) = rule.route.split_once('/').unwrap_or(("", &rule.route));
    RouteLabels {
        parent_namespace: parent.namespace.clone(),
        parent_name: parent.name.clone(),
        parent_port: parent.port.to_string(),
        route_kind: rule.kind.name(),
        route_namespace: route_namespace.to_owned(),
        route_name: route_name.to_owned(),
    }
}

/// The shorter of two optional time limits (either alone if the other is `None`).
fn shorter(
    a: Option<std::time::Duration>,
    b: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Request bodies up to this size are kept to be sent again when a rule retries.
const REPLAY_LIMIT: usize = 64 * 1024;

/// One attempt's answer, with what must live until its body is relayed.
struct Sent {
    resp: Response<Incoming>,
    in_flight: Option<InFlight>,
    stream_slot: Option<crate::limits::Slot>,
    checkin: Option<Checkin>,
    series: Arc<Series>,
    inbound_series: Option<Arc<Series>>,
    request_bytes: Arc<AtomicU64>,
    /// Its place under the Service's limit on requests in flight.
    admitted: Option<Admitted>,
}

impl Sent {
    /// Counts an answer that is retried rather than relayed.
    fn record_dropped(self, metrics: &Metrics, started: Instant) {
        let status = self.resp.status();
        let grpc = grpc_status(self.resp.headers());
        let sent = self.request_bytes.load(Ordering::Relaxed);
        if let Some(f) = &self.in_flight {
            f.responded();
        }
        for l in std::iter::once(&self.series).chain(self.inbound_series.as_ref()) {
            record(metrics, l, status, grpc, "RT", started, sent, 0);
        }
    }
}

/// Sends `req` once: to an endpoint of `target` picked for it (or where the client dialled),
/// over the hop to that endpoint. A failure comes back as the answer the client would get,
/// already counted.
async fn attempt(
    client: &Client,
    target: Option<&Arc<ServiceTarget>>,
    req: Request<Body>,
    upgrade: bool,
    per_try: Option<std::time::Duration>,
) -> Result<Sent, (Failure, Response<Body>)> {
    let started = Instant::now();
    let conn = &client.conn;
    let inputs = &conn.inputs;
    let grpc = is_grpc(&req);
    // A DestinationRule's limit on requests in flight: more are refused at once.
    let admitted = match target.map(|t| t.admit()) {
        Some(None) => {
            let detail = "the Service's limit on requests in flight is reached";
            let failure = Failure::Overflow;
            return Err((failure, client.refused(grpc, failure, detail, started)));
        }
        Some(Some(a)) => Some(a),
        None => None,
    };
    let (endpoint, load) = match target {
        Some(svc) => match svc.pick_for_request() {
            Some((endpoint, load)) => (endpoint, Some(load.clone())),
            None => {
                let detail = format!("service {} has no ready endpoints", svc.fqdn());
                let failure = Failure::NoEndpoints;
                return Err((failure, client.refused(grpc, failure, &detail, started)));
            }
        },
        None => (conn.orig.0, None),
    };
    if is_host_scoped(endpoint.ip()) {
        let detail = format!("endpoint {endpoint} is a host-scoped address");
        let failure = Failure::Unavailable;
        return Err((failure, client.refused(grpc, failure, &detail, started)));
    }
    let dst = conn.snapshot.pod_by_ip(endpoint.ip());
    let hop = hop_to(inputs, &conn.source, endpoint, dst);
    let dest = client.destination_for(endpoint, dst, hop.security(), grpc);
    let (series, inbound_series) = (dest.series.clone(), dest.inbound_series.clone());
    inputs.metrics.http.request(&series);
    // A same-node delivery is this agent's inbound side too, and the pod's policy decides
    // here.
    if let Some(s) = &inbound_series {
        inputs.metrics.http.request(s);
    }
    if let Some(check) = &dest.policy {
        let verdict = check.check(Some(crate::proxy::policy::http_of(&req)));
        if !verdict.allowed {
            let resp = refused_by_policy(&inputs.metrics, &series, &verdict, grpc, started);
            if let Some(s) = &inbound_series {
                refused_by_policy(&inputs.metrics, s, &verdict, grpc, started);
            }
            return Err((Failure::Denied, resp));
        }
    }
    let request_bytes = Arc::new(AtomicU64::new(0));
    let mut req = req.map(|b| b.counted(request_bytes.clone()));
    let client_h2 = req.version() == Version::HTTP_2;
    let in_flight = load.as_ref().map(|l| l.start());

    let pool = &inputs.pool;
    // The place on an HBONE connection a request's stream holds until its response is read.
    let mut stream_slot = None;
    // An HTTP/1.1 connection lent for this request, back to its pool once the response has
    // been read.
    let mut checkin = None;
    let send = async {
        match hop {
            Hop::Hbone {
                destination,
                node_ip,
            } if client_h2 && !upgrade => {
                // A stream of its own on the pooled HBONE connection, HTTP/2 end to end.
                let (source, destination) = client.hbone_identities(&destination);
                for (name, value) in dest.hbone_headers.iter() {
                    req.headers_mut().insert(name, value.clone());
                }
                inputs
                    .hbone
                    .request(&source, &destination, node_ip, req)
                    .await
                    .map(|(resp, slot)| {
                        stream_slot = Some(slot);
                        resp
                    })
                    .map_err(|e| {
                        // A stream that broke after the connection was there is a reset (502);
                        // no connection to the peer agent is an unavailable endpoint (503).
                        let failure = match e {
                            crate::proxy::hbone::Error::Http2 { .. } => Failure::UpstreamReset,
                            _ => Failure::Unavailable,
                        };
                        SendError::new(failure, e.to_string())
                    })
            }
            Hop::Hbone {
                destination,
                node_ip,
            } => {
                // HTTP/1.1 in pooled tunnels to the endpoint (an upgrade takes one for good).
                let forwarded_for = conn.source.address_for(endpoint);
                let (source, destination) = client.hbone_identities(&destination);
                let key = Key {
                    route: Route::Hbone {
                        source: source.clone(),
                        destination: destination.clone(),
                        node: node_ip,
                        endpoint,
                        client: forwarded_for,
                    },
                    h2: false,
                };
                let (hbone, baggage, source, destination) =
                    (&inputs.hbone, &client.baggage, &*source, &*destination);
                // Run only when no idle tunnel can take the request.
                let dial = move || async move {
                    let tunnel = TunnelRequest {
                        baggage: baggage.clone(),
                        forwarded_for,
                        protocol: Protocol::Http1,
                    };
                    hbone
                        .connect(source, destination, node_ip, endpoint, &tunnel)
                        .await
                        .map(|t| Box::new(t) as BoxIo)
                        .map_err(|e| SendError::new(Failure::Unavailable, e.to_string()))
                };
                pool.send(&key, dial, req).await.map(|(resp, back)| {
                    checkin = Some(back);
                    resp
                })
            }
            Hop::Local { pod, client: from } => {
                let key = Key {
                    route: Route::InPod {
                        endpoint,
                        client: Some(from),
                    },
                    h2: client_h2 && !upgrade,
                };
                let pod = &pod;
                let dial = move || async move {
                    connected(crate::proxy::deliver_in_pod(pod, from, endpoint), endpoint).await
                };
                pool.send(&key, dial, req).await.map(|(resp, back)| {
                    checkin = Some(back);
                    resp
                })
            }
            Hop::LocalDirect | Hop::Direct => {
                let key = Key {
                    route: Route::FromPod {
                        netns: conn.source.netns.cookie,
                        endpoint,
                    },
                    h2: client_h2 && !upgrade,
                };
                let netns = &conn.source.netns;
                let dial = move || async move {
                    connected(connect_from_pod(netns, endpoint), endpoint).await
                };
                pool.send(&key, dial, req).await.map(|(resp, back)| {
                    checkin = Some(back);
                    resp
                })
            }
        }
    };

    let sent = match per_try {
        Some(limit) => match tokio::time::timeout(limit, send).await {
            Ok(sent) => sent,
            Err(_) => Err(SendError::new(
                Failure::Timeout,
                format!("no response within the attempt's timeout of {limit:?}"),
            )),
        },
        None => send.await,
    };
    // Outlier detection sees every answer, and every failure to answer.
    let status = match &sent {
        Ok(resp) => resp.status().as_u16(),
        Err(e) => e.failure.status().as_u16(),
    };
    if let (Some(svc), Some(load)) = (target, &load) {
        if svc.observe(load, status) {
            tracing::info!(service = %svc.fqdn(), %endpoint, status, "endpoint ejected (outlier detection)");
            inputs.metrics.http.ejection(&svc.namespace, &svc.name);
        }
    }
    match sent {
        Ok(resp) => {
            if let Some(f) = &in_flight {
                f.responded();
            }
            Ok(Sent {
                resp,
                in_flight,
                stream_slot,
                checkin,
                series,
                inbound_series,
                request_bytes,
                admitted,
            })
        }
        Err(e) => {
            drop(in_flight);
            let resp = finish_failed(&inputs.metrics, &series, e.failure, &e.detail, started);
            if let Some(l) = &inbound_series {
                record(
                    &inputs.metrics,
                    l,
                    resp.status(),
                    None,
                    e.failure.flag(),
                    started,
                    0,
                    0,
                );
            }
            Err((e.failure, resp))
        }
    }
}

/// The proxy's own answer to a request a fault aborts: the status (for gRPC, a trailers-only
/// answer with the gRPC status), flagged `FI` as Envoy does.
fn aborted(client: &Client, grpc: bool, started: Instant, abort: Abort) -> Response<Body> {
    let metrics = &client.conn.inputs.metrics;
    let series = client.answered_here(grpc);
    let mut resp = Response::new(Body::full(hyper::body::Bytes::from_static(
        b"fault filter abort\n",
    )));
    let grpc_code = match abort {
        Abort::Http(code) => {
            *resp.status_mut() =
                hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
            None
        }
        Abort::Grpc(code) => {
            *resp.body_mut() = Body::empty();
            let headers = resp.headers_mut();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            Some(code)
        }
    };
    record(
        metrics,
        &series,
        resp.status(),
        grpc_code,
        "FI",
        started,
        0,
        0,
    );
    resp
}

async fn forward(client: &Client, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let conn = &client.conn;
    let inputs = &conn.inputs;
    let mut req = req.map(Body::incoming);
    let grpc = is_grpc(&req);
    let upgrade = is_upgrade(&req);
    // Refused before a destination is known: rare, labelled with the client's side only.
    let fail = |failure: Failure, detail: String| client.refused(grpc, failure, &detail, started);
    if upgrade && req.version() == Version::HTTP_2 {
        return fail(
            Failure::BadRequest,
            "CONNECT over HTTP/2 is not supported".into(),
        );
    }
    // Where the request goes: the route decision, one pure call on the request head when
    // HTTPRoutes are attached to the Service, then the backend's endpoint for this request.
    let mut routed: Option<(Arc<Rule>, usize)> = None;
    let target = match &client.destination {
        Destination::Service(svc) => match svc.routes_for(&client.labels.source_namespace) {
            None => Some(svc.clone()),
            Some(table) => {
                let head = Head {
                    method: req.method(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    headers: req.headers(),
                };
                let Some((rule, matched)) = table.select(&head) else {
                    let detail = format!(
                        "no rule of the routes of {}:{} matches",
                        svc.fqdn(),
                        svc.port
                    );
                    return fail(Failure::NoRoute, detail);
                };
                let rule = rule.clone();
                if let Some(redirect) = &rule.filters.redirect {
                    let host = authority(&req).unwrap_or_default();
                    let uri = req.uri();
                    let location =
                        redirect.location(&matched.path, &host, svc.port, uri.path(), uri.query());
                    return answer(client, grpc, started, redirect.status, &location);
                }
                if let Some(fault) = &rule.fault {
                    if let Some((delay, share)) = &fault.delay {
                        if share.hit() {
                            tokio::time::sleep(*delay).await;
                        }
                    }
                    if let Some((abort, share)) = &fault.abort {
                        if share.hit() {
                            return aborted(client, grpc, started, *abort);
                        }
                    }
                }
                if let Some(rewrite) = &rule.filters.rewrite {
                    rewrite_request(&mut req, rewrite, &matched.path);
                }
                let Some((i, backend)) = rule.backend() else {
                    let detail = format!("route {} has no backend to send to", rule.route);
                    return fail(Failure::NoBackend, detail);
                };
                let key = backend.key(svc.port);
                let Some(service) = conn.snapshot.service_named(&key) else {
                    let detail =
                        format!("route {}: backend {key} is not a Service port", rule.route);
                    return fail(Failure::NoBackend, detail);
                };
                let target = match &backend.subset {
                    None => service.clone(),
                    Some(subset) => match service.subset(subset) {
                        Some(t) => t.clone(),
                        None => {
                            let detail = format!(
                                "route {}: no DestinationRule defines subset {subset} of {key}",
                                rule.route
                            );
                            return fail(Failure::NoBackend, detail);
                        }
                    },
                };
                rule.filters.request_headers.apply(req.headers_mut());
                backend.filters.request_headers.apply(req.headers_mut());
                routed = Some((rule, i));
                Some(target)
            }
        },
        _ => None,
    };
    let client_upgrade = Upgrade::take(&mut req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // Headers only agents may set between themselves: a pod's own are dropped.
    strip_agent_headers(req.headers_mut());
    if let Some(v) = &client.canonical {
        req.headers_mut().insert(DST_CANONICAL_NAME, v.clone());
    }
    // Route timeouts bound the wait for the response head (the body is not cut).
    let rule = routed.as_ref().map(|(rule, _)| rule.clone());
    let route = match (&rule, &client.destination) {
        (Some(rule), Destination::Service(parent)) => Some(client.route_series(rule, parent)),
        _ => None,
    };
    let timeouts = rule.as_ref().map(|r| r.timeouts).unwrap_or_default();
    let retry = rule
        .as_ref()
        .and_then(|r| r.retry.as_ref())
        .filter(|_| !upgrade);
    // Without retries the route's timeout bounds the one attempt; with them, `request`
    // bounds them all and `backendRequest` (or the retry timeout) each one.
    let (overall, per_try) = match retry {
        Some(r) => (
            timeouts.request,
            r.per_try_timeout.or(timeouts.backend_request),
        ),
        None => (None, shorter(timeouts.request, timeouts.backend_request)),
    };
    // An idle timeout bounds the wait for the head too: nothing comes on the stream then.
    let per_try = shorter(per_try, timeouts.idle);
    let (parts, body) = req.into_parts();
    // A request a rule retries keeps its head, and its body (up to REPLAY_LIMIT), to send
    // it again; any other is sent as it is, once.
    let (replay, mut once) = match retry {
        Some(r) => {
            r.budget.request(started);
            (Some((parts, Replay::new(body, REPLAY_LIMIT))), None)
        }
        None => (None, Some((parts, body))),
    };
    let attempts = async {
        let mut tries = 0u32;
        loop {
            tries += 1;
            let (parts, body) = match (&replay, once.take()) {
                (Some((head, r)), _) => (head.clone(), r.attempt()),
                (None, Some(request)) => request,
                (None, None) => unreachable!("one attempt without a retry policy"),
            };
            let body = match timeouts.idle {
                Some(limit) => body.idle_timeout(limit),
                None => body,
            };
            let req = Request::from_parts(parts, body);
            if let (Some(route), Some(backend)) = (&route, &target) {
                inputs.metrics.http.route_backend(
                    route,
                    &backend.namespace,
                    &backend.name,
                    backend.port,
                );
            }
            let result = attempt(client, target.as_ref(), req, upgrade, per_try).await;
            let Some(policy) = retry else {
                return (result, tries);
            };
            let again = match &result {
                Ok(sent) => policy.on.status(
                    sent.resp.status().as_u16(),
                    grpc_status(sent.resp.headers()),
                ),
                // A policy's answer is final.
                Err((Failure::Denied, _)) => false,
                Err((failure, _)) => {
                    policy.on.connect_failure || policy.on.status(failure.status().as_u16(), None)
                }
            };
            if !again {
                return (result, tries);
            }
            let metrics = &inputs.metrics.http;
            if tries > policy.limit {
                if let Some(route) = &route {
                    metrics.retry(route, RetryResult::LimitExceeded);
                }
                return (result, tries);
            }
            let replayable = replay.as_ref().is_some_and(|(_, r)| r.can_replay());
            if !replayable || !policy.budget.try_retry(Instant::now()) {
                if let Some(route) = &route {
                    metrics.retry(route, RetryResult::Overflow);
                }
                return (result, tries);
            }
            if let Some(route) = &route {
                metrics.retry(route, RetryResult::Retried);
            }
            // This attempt's answer is counted on its own series, and dropped.
            if let Ok(sent) = result {
                sent.record_dropped(&inputs.metrics, started);
            }
        }
    };
    let result = match overall {
        Some(limit) => match tokio::time::timeout(limit, attempts).await {
            Ok((result, _)) => result,
            Err(_) => {
                let detail = format!("no response within the route's timeout of {limit:?}");
                let failure = Failure::Timeout;
                Err((failure, client.refused(grpc, failure, &detail, started)))
            }
        },
        None => attempts.await.0,
    };
    if let Some(route) = &route {
        let (status, error) = match &result {
            Ok(sent) => (sent.resp.status().as_u16(), ""),
            Err((failure, resp)) => (resp.status().as_u16(), failure.error()),
        };
        inputs.metrics.http.route_status(route, status, error);
    }
    let Sent {
        mut resp,
        in_flight,
        stream_slot,
        checkin,
        series,
        inbound_series,
        request_bytes,
        admitted,
    } = match result {
        Ok(sent) => sent,
        Err((_, resp)) => {
            if let Some(route) = &route {
                inputs.metrics.http.route_duration(route, started.elapsed());
            }
            return resp;
        }
    };
    let metrics = inputs.metrics.clone();
    relay_response(&mut resp, client_upgrade);
    if let Some((rule, i)) = &routed {
        rule.filters.response_headers.apply(resp.headers_mut());
        if let Some(backend) = rule.backends.get(*i) {
            backend.filters.response_headers.apply(resp.headers_mut());
        }
    }
    let (read, read_at_last_response) = (client.read.clone(), client.read_at_last_response.clone());
    let resp = respond(resp, move |status, seen| {
        if let Some(route) = &route {
            metrics.http.route_duration(route, started.elapsed());
        }
        drop(in_flight);
        drop(stream_slot);
        drop(checkin);
        drop(admitted);
        read_at_last_response.store(read.load(Ordering::Relaxed), Ordering::Relaxed);
        let request_bytes = request_bytes.load(Ordering::Relaxed);
        let flags = if seen.complete { "-" } else { "UC" };
        for l in std::iter::once(&series).chain(inbound_series.as_ref()) {
            record(
                &metrics,
                l,
                status,
                seen.grpc_status,
                flags,
                started,
                request_bytes,
                seen.bytes,
            );
        }
    });
    match timeouts.idle {
        Some(limit) => resp.map(|b| b.idle_timeout(limit)),
        None => resp,
    }
}
