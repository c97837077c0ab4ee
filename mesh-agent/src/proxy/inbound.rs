//! The HBONE inbound listener (:15008): terminates mTLS with the destination workload's
//! certificate (chosen by SNI), accepts HTTP/2 CONNECT to this node's enrolled pods only, and
//! relays each stream to its pod, from the client pod's address when its agent vouches for it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{
    body::Incoming, server::conn::http2, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::{
    detect::Protocol,
    hbone::{self, TunnelRequest},
    http::{pool::Pool, Body},
    policy::PolicyCheck,
};
use crate::{
    enrolled::EnrolledPods,
    identity::Identity,
    limits::{ByteBudget, Gauge},
    metrics::{http::RequestLabels, ConnectionLabels, Metrics},
    state::Snapshot,
    tls,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The W3C `baggage` header Istio's HBONE uses to tell the destination about the source.
pub const BAGGAGE: &str = "baggage";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub workload: Option<String>,
    pub namespace: Option<String>,
}

impl Baggage {
    pub fn header(workload: &str, namespace: &str) -> String {
        format!("k8s.workload.name={workload},k8s.namespace.name={namespace}")
    }

    fn parse(headers: &hyper::HeaderMap, name: &str) -> Self {
        let mut out = Baggage::default();
        let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) else {
            return out;
        };
        for item in value.split(',') {
            // Label values come from the peer: only DNS-label-like values, as Kubernetes
            // names are, so a client cannot blow up metric cardinality with arbitrary text.
            let valid = |v: &str| {
                !v.is_empty()
                    && v.len() <= 63
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            };
            match item.trim().split_once('=') {
                Some(("k8s.workload.name", v)) if valid(v) => out.workload = Some(v.to_owned()),
                Some(("k8s.namespace.name", v)) if valid(v) => out.namespace = Some(v.to_owned()),
                _ => {}
            }
        }
        out
    }
}

pub struct InboundInputs {
    pub node: String,
    pub trust_domain: String,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub enrolled: watch::Receiver<Arc<EnrolledPods>>,
    pub metrics: Arc<Metrics>,
    pub acceptor: TlsAcceptor,
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Tunnels one HBONE connection may hold open at once.
    pub max_streams: usize,
    /// Relay buffers of all connections.
    pub buffers: Arc<ByteBudget>,
    /// Connections to local pods for the requests of HTTP tunnels.
    pub pool: Arc<Pool>,
    /// A request head inside an HTTP/1.1 tunnel must arrive within this.
    pub http_head_timeout: Duration,
    /// What inbound policy falls back on.
    pub policy: crate::policy::Defaults,
    /// Tells the listener and its connections that the agent drains.
    pub drain: crate::drain::Watch,
}

/// Who is on the other end of one inbound mTLS connection.
struct Peer {
    addr: SocketAddr,
    identity: Identity,
    /// The workload the client asked for (SNI).
    requested: Option<Identity>,
    /// Tunnels open on this connection.
    streams: Gauge,
    /// What the requests of this connection go to, by (pod, client, source workload), kept
    /// while the pod's enrollment and the snapshot stay the same: a request then costs no
    /// label building.
    destinations: Mutex<HashMap<DestinationKey, Arc<crate::proxy::http::inbound::Tunnel>>>,
}

type DestinationKey = (SocketAddr, Option<std::net::IpAddr>, String);
/// Destinations one peer connection keeps resolved.
const MAX_DESTINATIONS_PER_PEER: usize = 256;

pub async fn serve(listener: TcpListener, inputs: Arc<InboundInputs>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Draining: the listener closes; peers dial elsewhere or get refused.
            () = inputs.drain.draining() => return,
        };
        let Ok((tcp, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let inputs = inputs.clone();
        let held = inputs.drain.hold();
        tokio::spawn(async move {
            let _held = held;
            let _ = tcp.set_nodelay(true);
            let accepted =
                tokio::time::timeout(inputs.handshake_timeout, inputs.acceptor.accept(tcp)).await;
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                failed => {
                    match failed {
                        Ok(Err(e)) => info!(client = %addr, "inbound mTLS handshake refused: {e}"),
                        _ => info!(client = %addr, "inbound mTLS handshake timed out"),
                    }
                    inputs
                        .metrics
                        .inbound_refused
                        .with_label_values(&["handshake"])
                        .inc();
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let requested = session
                .server_name()
                .and_then(|n| Identity::from_linkerd(n).ok());
            let identity = match session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(tls::peer_identity)
            {
                Some(Ok(id)) => id,
                _ => {
                    // The verifier already insists on a SPIFFE ID; this is belt and braces.
                    inputs
                        .metrics
                        .inbound_refused
                        .with_label_values(&["identity"])
                        .inc();
                    return;
                }
            };
            let serial = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tls::serial(c).ok())
                .unwrap_or_default();
            debug!(client = %addr, client_identity = %identity, client_cert_serial = %serial, "inbound HBONE connection");
            let peer = Arc::new(Peer {
                addr,
                identity,
                requested,
                streams: Gauge::default(),
                destinations: Mutex::default(),
            });
            let max_streams =
                u32::try_from(inputs.max_streams.saturating_add(1)).unwrap_or(u32::MAX);
            let inputs_drain = inputs.drain.clone();
            let service = service_fn(move |req| {
                let inputs = inputs.clone();
                let peer = peer.clone();
                async move { Ok::<_, std::convert::Infallible>(connect(&inputs, &peer, req).await) }
            });
            let drain = inputs_drain;
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                // One above our own cap: a stream beyond it is answered (503, counted) rather
                // than queued unseen by HTTP/2 flow control.
                .max_concurrent_streams(max_streams)
                .initial_stream_window_size(hbone::STREAM_WINDOW)
                .initial_connection_window_size(hbone::CONNECTION_WINDOW)
                .max_frame_size(hbone::MAX_FRAME)
                .serve_connection(TokioIo::new(tls), service);
            // Draining: GOAWAY, and the tunnels open carry on until they end.
            let conn = std::pin::pin!(conn);
            let served =
                crate::proxy::http::until_drained(conn, &drain, std::time::Duration::ZERO, |c| {
                    c.graceful_shutdown()
                })
                .await;
            if let Err(e) = served {
                debug!(client = %addr, "inbound HBONE connection ended: {e}");
            }
        });
    }
}

fn refuse(
    inputs: &InboundInputs,
    peer: &Peer,
    status: StatusCode,
    reason: &str,
    why: String,
) -> Response<Body> {
    info!(client = %peer.addr, "inbound CONNECT refused ({status}): {why}");
    inputs
        .metrics
        .inbound_refused
        .with_label_values(&[reason])
        .inc();
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// The policy of the pod at `target` for the peer's client (at `source`, else the peer).
fn policy_check(
    inputs: &InboundInputs,
    peer: &Peer,
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> PolicyCheck {
    PolicyCheck::new(
        target,
        Some(peer.identity.clone()),
        Some(source.unwrap_or(peer.addr.ip())),
        inputs.state.clone(),
        inputs.policy.clone(),
        inputs.metrics.clone(),
    )
}

/// What the head of a stream from a peer agent asks for, read before anything is decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamHead {
    /// A CONNECT tunnel (else one HTTP request, its pod named in `mesh-target`).
    pub tunnel: bool,
    /// The pod address and port.
    pub target: SocketAddr,
    /// The client address the peer claims to connect for (checked against its identity).
    pub forwarded: Option<std::net::IpAddr>,
    /// The client's workload and namespace, as labels.
    pub baggage: Baggage,
    /// What the tunnel carries (requests are HTTP/2).
    pub protocol: Protocol,
}

/// Why a stream head is refused before its target is looked at.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadRefusal {
    /// Neither CONNECT nor a request naming its pod.
    Method,
    /// The target is not an address and port.
    Target,
}

impl StreamHead {
    /// Reads a peer's stream head: only what the bytes say, nothing looked up.
    pub fn read<B>(req: &Request<B>) -> Result<StreamHead, HeadRefusal> {
        let tunnel = req.method() == Method::CONNECT;
        if !tunnel && !req.headers().contains_key(hbone::TARGET) {
            return Err(HeadRefusal::Method);
        }
        let named = match tunnel {
            true => req.uri().authority().map(|a| a.as_str()),
            false => req
                .headers()
                .get(hbone::TARGET)
                .and_then(|v| v.to_str().ok()),
        };
        let target = named
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or(HeadRefusal::Target)?;
        let headers = req.headers();
        let (forwarded, baggage, protocol) = match tunnel {
            true => (
                TunnelRequest::parse_forwarded_for(headers),
                Baggage::parse(headers, BAGGAGE),
                headers
                    .get(hbone::PROTOCOL)
                    .and_then(|v| Protocol::from_header(v.as_bytes()))
                    .unwrap_or(Protocol::Opaque),
            ),
            false => (
                TunnelRequest::forwarded_in(headers, hbone::REQUEST_FORWARDED),
                Baggage::parse(headers, hbone::REQUEST_BAGGAGE),
                Protocol::Http2,
            ),
        };
        Ok(StreamHead {
            tunnel,
            target,
            forwarded,
            baggage,
            protocol,
        })
    }
}

/// One stream from a peer agent: a CONNECT tunnel to a pod, or an HTTP request for a pod
/// (named in `mesh-target`).
async fn connect(
    inputs: &InboundInputs,
    peer: &Peer,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let head = match StreamHead::read(&req) {
        Ok(head) => head,
        Err(HeadRefusal::Method) => {
            return refuse(
                inputs,
                peer,
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                format!(
                    "{} from {} is neither CONNECT nor a request naming its pod",
                    req.method(),
                    peer.identity
                ),
            )
        }
        Err(HeadRefusal::Target) => {
            return refuse(
                inputs,
                peer,
                StatusCode::BAD_REQUEST,
                "target",
                format!(
                    "{} asked for {:?}, not a pod address and port",
                    peer.identity,
                    req.uri().to_string()
                ),
            )
        }
    };
    let StreamHead {
        tunnel,
        target,
        forwarded,
        baggage,
        protocol,
    } = head;
    let Some(pod) = inputs.enrolled.borrow().by_ip(target.ip()).cloned() else {
        return refuse(
            inputs,
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "not_local",
            format!(
                "{} asked for {target}, which is not an enrolled pod of node {}",
                peer.identity, inputs.node
            ),
        );
    };
    let pod_identity = pod.workload.identity(&inputs.trust_domain);
    if peer.requested.as_ref() != Some(&pod_identity) {
        return refuse(
            inputs,
            peer,
            StatusCode::BAD_REQUEST,
            "identity_mismatch",
            format!(
                "{} connected for {:?} but asked for {target}, which is {pod_identity}",
                peer.identity,
                peer.requested.as_ref().map(ToString::to_string)
            ),
        );
    }
    let Some(slot) = peer.streams.try_take(inputs.max_streams) else {
        return refuse(
            inputs,
            peer,
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_limit",
            format!(
                "{} already holds {} tunnels on this connection (--max-streams-per-connection)",
                peer.identity, inputs.max_streams
            ),
        );
    };
    // The client's address, so the pod sees it as it would with a sidecar. The claim is only
    // taken from a peer whose certificate is that pod's identity.
    let snapshot = inputs.state.borrow().clone();
    let source: Option<std::net::IpAddr> = match forwarded {
        Some(ip) => match snapshot.pod_by_ip(ip) {
            Some(client) if client.identity(&inputs.trust_domain) == peer.identity => Some(ip),
            Some(client) => {
                return refuse(
                    inputs,
                    peer,
                    StatusCode::FORBIDDEN,
                    "forwarded_mismatch",
                    format!(
                        "{} claims to connect for {ip}, which is pod {}/{} of another identity",
                        peer.identity, client.namespace, client.name
                    ),
                )
            }
            None => {
                debug!(client = %peer.addr, claimed = %ip, "forwarded address is no pod we know; delivering from the node's address");
                None
            }
        },
        None => None,
    };
    // The peer is the client's node; who the client is comes from its certificate, and its
    // workload name from the baggage its agent sent (a label, never an authority).
    let source_namespace = match &peer.identity {
        Identity::Spiffe { namespace, .. } => namespace.clone(),
    };
    let source_workload = baggage
        .workload
        .unwrap_or_else(|| crate::metrics::UNKNOWN.into());
    if protocol != Protocol::Opaque {
        // Requests: each delivered on its own over pooled connections to the pod.
        let key = (target, source, source_workload);
        let cached = peer.destinations.lock().ok().and_then(|m| {
            m.get(&key)
                .filter(|t| Arc::ptr_eq(&t.pod, &pod) && Arc::ptr_eq(&t.snapshot, &snapshot))
                .cloned()
        });
        let requests = match cached {
            Some(t) => t,
            None => {
                let mut labels = RequestLabels::unknown("destination");
                labels.source_workload = key.2.clone();
                labels.source_namespace = source_namespace;
                labels.source_principal = peer.identity.to_string();
                labels.client_id = peer.identity.to_linkerd();
                labels.destination_workload = pod.workload.workload.clone();
                labels.destination_namespace = pod.workload.namespace.clone();
                labels.destination_kind = snapshot.pod_by_ip(target.ip()).and_then(|w| w.kind);
                labels.destination_principal = pod_identity.to_string();
                labels.server_id = pod_identity.to_linkerd();
                labels.security = "mutual_tls";
                let policy = policy_check(inputs, peer, target, source);
                let t = Arc::new(crate::proxy::http::inbound::Tunnel {
                    pod,
                    target,
                    policy,
                    client: source,
                    labels,
                    snapshot,
                    metrics: inputs.metrics.clone(),
                    pool: inputs.pool.clone(),
                    series: Mutex::default(),
                });
                if let Ok(mut m) = peer.destinations.lock() {
                    if m.len() >= MAX_DESTINATIONS_PER_PEER {
                        m.clear();
                    }
                    m.insert(key, t.clone());
                }
                t
            }
        };
        if !tunnel {
            // A request of its own: delivered now; its stream's place is held until the
            // response has been read.
            for name in hbone::AGENT_HEADERS {
                req.headers_mut().remove(name);
            }
            let resp = crate::proxy::http::inbound::deliver(&requests, req).await;
            return resp.map(|body| body.holding(slot));
        }
        let tunnel = requests;
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (head_timeout, max_streams) = (inputs.http_head_timeout, inputs.max_streams);
        let drain = inputs.drain.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match on_upgrade.await {
                Ok(io) => {
                    crate::proxy::http::inbound::serve(
                        tunnel,
                        TokioIo::new(io),
                        protocol,
                        head_timeout,
                        max_streams,
                        drain,
                    )
                    .await
                }
                Err(e) => debug!(%target, "CONNECT upgrade failed: {e}"),
            }
        });
        return Response::new(Body::empty());
    }
    // TCP: decided once, before any byte reaches the pod; a later change that denies it
    // closes it.
    let policy = policy_check(inputs, peer, target, source);
    let verdict = policy.check(None);
    if !verdict.allowed {
        // ztunnel answers a denied CONNECT 401: the source agent closes its client.
        return refuse(
            inputs,
            peer,
            StatusCode::UNAUTHORIZED,
            "policy",
            format!(
                "{} to {target} denied by {} {}",
                peer.identity, verdict.authz.kind, verdict.authz.name
            ),
        );
    }
    let delivered = tokio::time::timeout(CONNECT_TIMEOUT, async {
        // A claimed address of the other family cannot be the source of this connection.
        match source.filter(|ip| pod.transparent && ip.is_ipv6() == target.is_ipv6()) {
            Some(ip) => super::deliver_in_pod(&pod, ip, target).await,
            None => super::deliver_from_node(target).await,
        }
    })
    .await;
    let upstream = match delivered {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return refuse(
                inputs,
                peer,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream",
                format!("connecting to pod {target}: {e}"),
            )
        }
        Err(_) => {
            return refuse(
                inputs,
                peer,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream",
                format!("connecting to pod {target} timed out"),
            )
        }
    };
    let _ = upstream.set_nodelay(true);
    let labels = ConnectionLabels {
        reporter: "destination",
        source_workload,
        source_namespace,
        source_principal: peer.identity.to_string(),
        destination_service: crate::metrics::UNKNOWN.into(),
        destination_workload: pod.workload.workload.clone(),
        destination_namespace: pod.workload.namespace.clone(),
        destination_principal: pod_identity.to_string(),
        connection_security_policy: "mutual_tls",
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let metrics = inputs.metrics.clone();
    let buffers = inputs.buffers.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(%target, "CONNECT upgrade failed: {e}");
                return;
            }
        };
        // The tunnel carries what the client sent; the pod's answers are what it receives.
        let relay = super::relay::relay_recorded(
            &metrics,
            &buffers,
            &labels,
            TokioIo::new(upgraded),
            upstream,
        );
        tokio::select! {
            () = relay => {}
            () = policy.until_denied() => {}
        }
    });
    Response::new(Body::empty())
}
