//! The destination side of HTTP: serves the requests that arrive in an HBONE tunnel and
//! delivers each to the local pod over pooled connections, from the client pod's address.
//!
//! Each request is known here before it is delivered (the peer's verified identity, the pod,
//! the port, the method, path and headers): server-side metrics now, authorization next.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, Request, Response, Version};
use tracing::debug;

use super::{
    connected, downgrade_from_h2, finish_failed, is_grpc, is_upgrade,
    pool::{Io, Key, Pool, Route},
    record, relay_response, respond, serve_connection, strip_hop_by_hop, to_http1, Body,
    ServeLimits, Upgrade, DST_CANONICAL_NAME,
};
use crate::{
    enrolled::EnrolledPod,
    metrics::{
        http::{RequestLabels, Series},
        Metrics,
    },
    proxy::detect::Protocol,
    state::Snapshot,
};

/// One HBONE tunnel that carries HTTP to a pod of this node.
pub struct Tunnel {
    pub pod: Arc<EnrolledPod>,
    /// The pod's address and port the tunnel was opened for.
    pub target: SocketAddr,
    /// The client pod's address, verified against the peer's identity: requests are
    /// delivered from it. `None`: from the node's address.
    pub client: Option<IpAddr>,
    /// The pod's inbound policy for this client.
    pub policy: crate::proxy::policy::PolicyCheck,
    /// What every request of the tunnel is labelled with (the peer, the pod).
    pub labels: RequestLabels,
    pub snapshot: Arc<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    /// The series of requests by the Service the source named (`l5d-dst-canonical`) and
    /// whether they are gRPC: a few per tunnel, searched in order (no allocation or hashing
    /// per request).
    pub series: Mutex<Vec<ServiceSeries>>,
}

/// The Service the source named (if it did), gRPC or not, and the series of such requests.
type ServiceSeries = (Option<String>, bool, Arc<Series>);

/// Services one tunnel keeps resolved series for.
const MAX_SERIES_PER_TUNNEL: usize = 64;

impl Tunnel {
    /// The series of requests for `canonical` (the Service the source sent them to, as
    /// `name.ns.svc.cluster.local:port`: a label, taken only if the snapshot knows such a
    /// Service).
    fn series_for(&self, canonical: Option<&str>, grpc: bool) -> Arc<Series> {
        let cached = self.series.lock().ok().and_then(|m| {
            m.iter()
                .find(|(c, g, _)| *g == grpc && c.as_deref() == canonical)
                .map(|(_, _, s)| s.clone())
        });
        if let Some(hit) = cached {
            return hit;
        }
        let svc = canonical.and_then(|name| self.snapshot.service_named(name));
        let mut labels = self.labels.clone();
        if grpc {
            labels.protocol = "grpc";
        }
        match svc {
            Some(svc) => {
                labels.destination_service = svc.fqdn();
                labels.destination_service_name = svc.name.clone();
                labels.destination_service_namespace = svc.namespace.clone();
                labels.authority = format!("{}:{}", svc.fqdn(), svc.port);
            }
            None => labels.authority = self.target.to_string(),
        }
        let series = self.metrics.http.series(labels);
        if let Ok(mut m) = self.series.lock() {
            if m.len() < MAX_SERIES_PER_TUNNEL {
                m.push((canonical.map(str::to_owned), grpc, series.clone()));
            }
        }
        series
    }
}

/// Serves the requests of one tunnel until the source agent closes it.
pub async fn serve(
    tunnel: Arc<Tunnel>,
    io: impl Io,
    protocol: Protocol,
    head_timeout: Duration,
    max_streams: usize,
    drain: crate::drain::Watch,
) {
    let served = tunnel.clone();
    let limits = ServeLimits {
        head_timeout,
        max_streams,
        max_frame: Some(crate::proxy::hbone::MAX_FRAME),
        drain,
    };
    let deliver_one = move |req| {
        let tunnel = served.clone();
        async move { deliver(&tunnel, req).await }
    };
    let result = serve_connection(io, protocol, deliver_one, limits).await;
    if let Err(e) = result {
        // A tunnel that brought no request head for the head timeout is a pooled tunnel the
        // source agent stopped using (it times its own clients' heads): closed, not counted.
        if !e.is_timeout() {
            super::outbound::protocol_error(&tunnel.metrics, &tunnel.labels, &e);
        }
        debug!(target = %tunnel.target, "HTTP tunnel ended: {e}");
    }
}

/// Delivers one request of `tunnel` to its pod.
pub async fn deliver(tunnel: &Tunnel, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mut req = req.map(Body::incoming);
    let grpc = is_grpc(&req);
    let canonical = req.headers_mut().remove(&DST_CANONICAL_NAME);
    let series = tunnel.series_for(canonical.as_ref().and_then(|v| v.to_str().ok()), grpc);
    tunnel.metrics.http.request(&series);
    let verdict = tunnel
        .policy
        .check(Some(crate::proxy::policy::http_of(&req)));
    if !verdict.allowed {
        return refused_by_policy(&tunnel.metrics, &series, &verdict, grpc, started);
    }

    let upgrade = is_upgrade(&req);
    let client_upgrade = Upgrade::take(&mut req);
    let downgraded = downgrade_from_h2(&mut req);
    let h2 = !upgrade && !downgraded && req.version() == Version::HTTP_2;
    if !h2 && !downgraded {
        to_http1(&mut req);
    }
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let req = req.map(|b| b.counted(request_bytes.clone()));

    let (pod, target) = (&tunnel.pod, tunnel.target);
    // A claimed address of the other family cannot be the source of this connection.
    let from = tunnel
        .client
        .filter(|ip| pod.transparent && ip.is_ipv6() == target.is_ipv6());
    let key = Key {
        route: Route::InPod {
            endpoint: target,
            client: from,
        },
        h2,
    };
    let dial = move || async move {
        match from {
            Some(ip) => connected(crate::proxy::deliver_in_pod(pod, ip, target), target).await,
            None => connected(crate::proxy::deliver_from_node(target), target).await,
        }
    };
    let (mut resp, checkin) = match tunnel.pool.send(&key, dial, req).await {
        Ok(sent) => sent,
        Err(e) => return finish_failed(&tunnel.metrics, &series, e.failure, &e.detail, started),
    };
    relay_response(&mut resp, client_upgrade);
    let metrics = tunnel.metrics.clone();
    respond(resp, move |status, seen| {
        // The connection to the pod goes back to the pool with the response read.
        drop(checkin);
        let request_bytes = request_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let flags = if seen.complete { "-" } else { "UC" };
        record(
            &metrics,
            &series,
            status,
            seen.grpc_status,
            flags,
            started,
            request_bytes,
            seen.bytes,
        );
    })
}

/// The answer to a request the pod's policy denies, recorded (flag `DENY`).
pub fn refused_by_policy(
    metrics: &Metrics,
    series: &Series,
    verdict: &crate::policy::Verdict,
    grpc: bool,
    started: Instant,
) -> Response<Body> {
    let resp = crate::proxy::policy::denied(verdict, grpc);
    let grpc_status = grpc.then_some(if verdict.status == 404 { 12 } else { 7 });
    record(
        metrics,
        series,
        resp.status(),
        grpc_status,
        super::Failure::Denied.flag(),
        started,
        0,
        0,
    );
    resp
}
