//! The HTTP side of the node proxy: each request of a client connection is forwarded on its
//! own (per-request balancing, per-request metrics), over pooled upstream connections.
//!
//! Between agents, an HTTP/2 request travels as its own stream on the pooled HBONE connection
//! (`mesh-target` names the pod). An HTTP/1.x request travels as HTTP/1.1 on a pooled HBONE
//! tunnel (a CONNECT stream) to its endpoint, opened for the client pod and kept for its next
//! requests: no HTTP/2 stream, header compression or dispatch task per request (a third more
//! requests per second than one HTTP/2 stream each, `cargo xtask bench`). Either way the pod
//! sees the protocol its client spoke. Upgrades (WebSocket) and `CONNECT` take a
//! tunnel of their own for good. Requests marked `l5d-orig-proto` (HTTP/1 carried as HTTP/2,
//! as Linkerd does, and as agents before this one sent them) are still accepted.
//!
//! The request path is shaped so that a route decision and a policy decision can each be one
//! pure function call on the request head: [`outbound`] asks the snapshot where a request goes
//! before it picks an endpoint, and [`inbound`] knows the peer and the request before it
//! delivers.

pub mod body;
pub mod inbound;
pub mod outbound;
pub mod pool;

use std::time::{Duration, Instant};

use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
    upgrade::OnUpgrade,
    HeaderMap, Method, Request, Response, StatusCode, Version,
};
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

pub use body::Body;

use super::detect::Protocol;
use pool::{BoxIo, SendError};

use crate::metrics::{
    http::{Outcome, Series},
    Metrics,
};

/// Marks a request that its client sent as HTTP/1.x and that travels as HTTP/2 between agents.
pub const ORIG_PROTO: &str = "l5d-orig-proto";
/// Names the Service a request was sent to (`name.ns.svc.cluster.local:port`), so the
/// destination agent labels its metrics as the source did. A label only, checked against the
/// snapshot, never an authority.
pub const DST_CANONICAL: &str = "l5d-dst-canonical";
/// The names above, made once (a lookup by a string parses it first).
const ORIG_PROTO_NAME: HeaderName = HeaderName::from_static(ORIG_PROTO);
pub const DST_CANONICAL_NAME: HeaderName = HeaderName::from_static(DST_CANONICAL);
/// Set on responses the proxy made itself, saying why (as Linkerd's).
pub const PROXY_ERROR: &str = "l5d-proxy-error";
/// The largest request head the proxy accepts; larger gets 431.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The Service has no ready endpoint.
    NoEndpoints,
    /// The endpoint refused the connection, or could not be reached.
    Unavailable,
    /// The endpoint did not answer in time.
    Timeout,
    /// The connection to the endpoint broke before a response came.
    UpstreamReset,
    /// The request cannot be forwarded as it is.
    BadRequest,
    /// HTTPRoutes are attached to the Service and none of their rules matches the request.
    NoRoute,
    /// The rule's backend is not a Service port the mesh knows.
    NoBackend,
    /// The Service's limit on requests in flight (a DestinationRule's connection pool) is
    /// reached.
    Overflow,
    /// The destination pod's inbound policy denies the request (never retried).
    Denied,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::NoEndpoints | Failure::Unavailable | Failure::Overflow => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::UpstreamReset => StatusCode::BAD_GATEWAY,
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::Denied => StatusCode::FORBIDDEN,
        }
    }

    /// Envoy's (Istio's) response flag.
    pub fn flag(self) -> &'static str {
        match self {
            Failure::NoEndpoints => "UH",
            Failure::Unavailable => "UF",
            Failure::Timeout => "UT",
            Failure::UpstreamReset => "UC",
            Failure::BadRequest => "DPE",
            Failure::NoRoute => "NR",
            Failure::NoBackend => "NC",
            Failure::Overflow => "UO",
            // ztunnel's flag for a policy denial (Envoy's RBAC filter sets none).
            Failure::Denied => "DENY",
        }
    }

    /// Linkerd's error label.
    pub fn error(self) -> &'static str {
        match self {
            Failure::NoEndpoints => "no_endpoints",
            Failure::Unavailable => "unavailable",
            Failure::Timeout => "timeout",
            Failure::UpstreamReset => "upstream_reset",
            Failure::BadRequest => "bad_request",
            Failure::NoRoute => "no_route",
            Failure::NoBackend => "no_backend",
            Failure::Overflow => "overflow",
            Failure::Denied => "denied",
        }
    }
}

/// The proxy's own answer to a request it could not forward: the status, an
/// `l5d-proxy-error` header and a one-line body naming the reason.
pub fn failure_response(failure: Failure, detail: &str) -> Response<Body> {
    let text = format!("{}: {detail}\n", failure.error());
    let mut resp = Response::new(Body::full(Bytes::from(text)));
    *resp.status_mut() = failure.status();
    // A header value cannot hold control characters; the detail is ours, but be safe.
    let value = HeaderValue::from_str(&format!("{}: {detail}", failure.error()))
        .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    resp.headers_mut()
        .insert(HeaderName::from_static(PROXY_ERROR), value);
    resp
}

/// The hop-by-hop headers [`strip_hop_by_hop`] removes whether `Connection` names them or not
/// (`upgrade` unless the request is being upgraded, when it stays whatever `Connection` says).
const ALWAYS_HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and every header it
/// names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` (unless the
/// request is being upgraded), and `TE` except `trailers` (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over their few names instead of a lookup of
    // each hop-by-hop header.
    let hop_by_hop = |name: &HeaderName| name == TE || ALWAYS_HOP_BY_HOP.contains(&name.as_str());
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    // The headers `Connection` names, but for those removed below anyway (or kept for an
    // upgrade): most often it names only `keep-alive`, and nothing is made or collected.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !ALWAYS_HOP_BY_HOP.iter().any(|h| n.eq_ignore_ascii_case(h)))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(TRANSFER_ENCODING);
    let te_trailers = headers
        .get(TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes from a pod's request what only agents may send each other: [`DST_CANONICAL`],
/// [`ORIG_PROTO`] and [`super::hbone::AGENT_HEADERS`].
pub fn strip_agent_headers(headers: &mut HeaderMap) {
    let agent_only = |name: &&HeaderName| {
        let name = name.as_str();
        name == DST_CANONICAL || name == ORIG_PROTO || super::hbone::AGENT_HEADERS.contains(&name)
    };
    // A pod seldom sends any: one pass over the names, and a lookup only for those found.
    let found: Vec<HeaderName> = headers.keys().filter(agent_only).cloned().collect();
    for name in found {
        headers.remove(&name);
    }
}

/// The client side of a request that asks to leave HTTP (see [`is_upgrade`]).
pub struct Upgrade {
    on: OnUpgrade,
    connect: bool,
}

impl Upgrade {
    /// Takes the client's side of the upgrade from `req`, if it asks for one.
    pub fn take(req: &mut Request<Body>) -> Option<Self> {
        is_upgrade(req).then(|| Upgrade {
            connect: req.method() == Method::CONNECT,
            on: hyper::upgrade::on(req),
        })
    }
}

/// Whether a request asks to leave HTTP (WebSocket and other `Upgrade`s, `CONNECT`): such a
/// request needs an HTTP/1.1 connection of its own all the way.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.version() <= Version::HTTP_11 && req.headers().contains_key(UPGRADE))
}

/// A request's authority: its URI's (HTTP/2, or an absolute-form target), else its `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

/// Prepares an HTTP/1.x request to travel as HTTP/2: absolute URI from its `Host`, marked
/// with [`ORIG_PROTO`]. (How agents before the pooled HTTP/1.1 tunnels sent it; kept so the
/// fuzzing and unit tests can make what [`downgrade_from_h2`] still accepts.)
pub fn upgrade_to_h2(req: &mut Request<Body>, fallback_authority: &str) {
    let authority = authority(req).unwrap_or_else(|| fallback_authority.to_owned());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = hyper::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    let orig = match req.version() {
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    req.headers_mut().remove(HOST);
    req.headers_mut().insert(
        HeaderName::from_static(ORIG_PROTO),
        HeaderValue::from_static(orig),
    );
    *req.version_mut() = Version::HTTP_2;
}

/// Undoes [`upgrade_to_h2`] at the destination: the pod gets HTTP/1.1 with its `Host` and an
/// origin-form target. Returns whether the request had been upgraded.
pub fn downgrade_from_h2(req: &mut Request<Body>) -> bool {
    if req.headers_mut().remove(&ORIG_PROTO_NAME).is_none() {
        return false;
    }
    to_http1(req);
    *req.version_mut() = Version::HTTP_11;
    true
}

/// A request for the pod as it arrived in HTTP/2 from a client that spoke HTTP/2: hyper's
/// HTTP/1 client needs an origin-form target and a `Host`.
pub fn to_http1(req: &mut Request<Body>) {
    if let Some(authority) = req.uri().authority().cloned() {
        if !req.headers().contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(HOST, v);
            }
        }
    }
    if req.uri().scheme().is_some() {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = path.parse() {
            *req.uri_mut() = uri;
        }
    }
}

/// The gRPC status in a header map (trailers, or the headers of a trailers-only response).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    // A name made once: looked up by a string, it would be parsed for every response.
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a request is gRPC (for the `request_protocol` label).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// How a server side (a client pod's connection, or a tunnel from a peer agent) is served.
pub struct ServeLimits {
    /// An HTTP/1 request head must arrive within this.
    pub head_timeout: std::time::Duration,
    /// Concurrent HTTP/2 streams.
    pub max_streams: usize,
    /// The largest HTTP/2 frame accepted, if not the protocol's default.
    pub max_frame: Option<u32>,
    /// When the agent drains, the connection finishes the requests it is on and closes
    /// (HTTP/1: after the response in flight; HTTP/2: GOAWAY).
    pub drain: crate::drain::Watch,
}

/// Serves `io` as `protocol` (HTTP/1.x with upgrades, or HTTP/2) with `service` until the
/// peer closes it or the agent drains; heads over [`MAX_HEAD_BYTES`] are refused.
pub async fn serve_connection<I, S, F>(
    io: I,
    protocol: Protocol,
    service: S,
    limits: ServeLimits,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let service = std::sync::Arc::new(service);
    let drain = limits.drain.clone();
    let http1 = protocol != Protocol::Http2;
    let service = service_fn(move |req| {
        let service = service.clone();
        let drain = drain.clone();
        async move {
            let mut resp = service(req).await;
            if http1 && drain.is_draining() {
                // The client learns with this response not to send another on the connection
                // (hyper closes it after): no request races the close.
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let io = TokioIo::new(io);
    match protocol {
        Protocol::Http2 => {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(u32::try_from(limits.max_streams).unwrap_or(u32::MAX))
                .max_header_list_size(MAX_HEAD_BYTES as u32)
                .initial_stream_window_size(super::hbone::STREAM_WINDOW)
                .initial_connection_window_size(super::hbone::CONNECTION_WINDOW);
            if let Some(frame) = limits.max_frame {
                builder.max_frame_size(frame);
            }
            let conn = std::pin::pin!(builder.serve_connection(io, service));
            until_drained(conn, &limits.drain, Duration::ZERO, |c| {
                c.graceful_shutdown()
            })
            .await
        }
        _ => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(io, service)
                .with_upgrades();
            until_drained(
                std::pin::pin!(conn),
                &limits.drain,
                HTTP1_DRAIN_GRACE,
                |c| c.graceful_shutdown(),
            )
            .await
        }
    }
}

/// How long a draining agent keeps an HTTP/1 keep-alive connection open for its client's next
/// request (answered with `Connection: close`) before closing it idle: closing a connection a
/// client may be sending on races its request, so busy clients are told instead.
const HTTP1_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Drives `conn` to its end; once the agent drains (and `grace` later, if the connection has
/// not ended by then), `shutdown` asks it to finish what it is on first.
pub async fn until_drained<C, T>(
    mut conn: std::pin::Pin<&mut C>,
    drain: &crate::drain::Watch,
    grace: Duration,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> T
where
    C: std::future::Future<Output = T>,
{
    tokio::select! {
        done = conn.as_mut() => return done,
        () = drain.draining() => {}
    }
    if !grace.is_zero() {
        tokio::select! {
            done = conn.as_mut() => return done,
            () = tokio::time::sleep(grace) => {}
        }
    }
    shutdown(conn.as_mut());
    conn.await
}

/// Arranges for an upgrade the upstream accepted (101, or 2xx to a `CONNECT`) to be relayed
/// between the client and the upstream once both sides have switched.
pub fn relay_response(resp: &mut Response<Incoming>, client: Option<Upgrade>) {
    let Some(client) = client else { return };
    let accepted = match client.connect {
        true => resp.status().is_success(),
        false => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
    };
    if !accepted {
        return;
    }
    let client = client.on;
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((a, b)) => {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            }
            Err(e) => debug!("upgrade failed: {e}"),
        }
    });
}

/// The upstream's response as the client gets it: hop-by-hop headers removed, the body
/// streamed through and observed; `on_end` hears how it ended.
pub fn respond(
    resp: Response<Incoming>,
    on_end: impl FnOnce(StatusCode, body::Seen) + Send + Sync + 'static,
) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    let status = parts.status;
    strip_hop_by_hop(
        &mut parts.headers,
        status == StatusCode::SWITCHING_PROTOCOLS,
    );
    let body = body::with_header_grpc_status(Body::incoming(incoming), grpc_status(&parts.headers))
        .on_end(move |seen| on_end(status, seen));
    Response::from_parts(parts, body)
}

/// A connection attempt within the connect timeout, as a pooled connection's transport.
pub async fn connected(
    connecting: impl std::future::Future<Output = std::io::Result<TcpStream>>,
    endpoint: std::net::SocketAddr,
) -> Result<BoxIo, SendError> {
    match tokio::time::timeout(super::CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Ok(Err(e)) => Err(SendError::new(
            Failure::Unavailable,
            format!("connecting to {endpoint}: {e}"),
        )),
        Err(_) => Err(SendError::new(
            Failure::Unavailable,
            format!("connecting to {endpoint} timed out"),
        )),
    }
}

/// The proxy's own answer, recorded.
pub fn finish_failed(
    metrics: &Metrics,
    series: &Series,
    failure: Failure,
    detail: &str,
    started: Instant,
) -> Response<Body> {
    let labels = series.labels();
    debug!(reporter = labels.reporter, authority = %labels.authority, "HTTP request failed: {}: {detail}", failure.error());
    metrics.http.error(labels.reporter, failure.error());
    let resp = failure_response(failure, detail);
    record(
        metrics,
        series,
        resp.status(),
        None,
        failure.flag(),
        started,
        0,
        0,
    );
    resp
}

#[expect(clippy::too_many_arguments, reason = "one record, its parts")]
pub fn record(
    metrics: &Metrics,
    series: &Series,
    status: StatusCode,
    grpc_status: Option<u32>,
    flags: &'static str,
    started: Instant,
    request_bytes: u64,
    response_bytes: u64,
) {
    metrics.http.response(
        series,
        &Outcome {
            status: status.as_u16(),
            grpc_status,
            flags,
            duration: started.elapsed(),
            request_bytes,
            response_bytes,
        },
    );
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A header map of `pairs`, in order (a name may repeat).
    fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    /// The names left in `h`, sorted.
    fn names(h: &HeaderMap) -> Vec<String> {
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        left
    }

    #[test]
    fn what_only_agents_send_each_other_is_dropped_from_a_pods_request() {
        let mut h = header_map(&[
            ("l5d-dst-canonical", "a.b.svc.cluster.local:80"),
            ("l5d-dst-canonical", "twice"),
            ("l5d-orig-proto", "HTTP/1.1"),
            ("mesh-target", "10.1.2.3:80"),
            ("mesh-baggage", "k8s.namespace.name=x"),
            ("mesh-forwarded", "for=10.0.0.1"),
            ("x-kept", "yes"),
            ("host", "web"),
        ]);
        strip_agent_headers(&mut h);
        assert_eq!(names(&h), ["host", "x-kept"]);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = header_map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
            ("host", "web"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "te", "x-kept"]);
        assert_eq!(h.get(TE).unwrap(), "trailers");

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(CONNECTION).unwrap(), "Upgrade");
    }

    #[test]
    fn http1_travels_as_h2_and_comes_back() {
        let mut req = Request::builder()
            .uri("/a/b?c=d")
            .header(HOST, "web.default:80")
            .body(Body::empty())
            .unwrap();
        upgrade_to_h2(&mut req, "10.96.0.10:80");
        assert_eq!(req.uri().to_string(), "http://web.default:80/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get(HOST).is_none());
        assert!(downgrade_from_h2(&mut req));
        assert_eq!(req.uri().to_string(), "/a/b?c=d");
        assert_eq!(req.headers().get(HOST).unwrap(), "web.default:80");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(!downgrade_from_h2(&mut req));
    }

    #[test]
    fn failures_name_their_reason() {
        let r = failure_response(Failure::NoEndpoints, "service web.default has none");
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers().get(PROXY_ERROR).unwrap(),
            "no_endpoints: service web.default has none"
        );
        assert_eq!(Failure::Timeout.status(), 504);
    }
}
