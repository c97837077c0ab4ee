//! Inbound policy where the proxy delivers to a pod of this node (the HBONE inbound side and
//! the same-node path): what applies to the pod, resolved once per snapshot and kept per
//! tunnel or connection; one [`crate::policy::authorize`] per connection or request; the
//! counters; the answer a denied request gets; and the watch that closes an open connection a
//! policy change denies.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hyper::{header::HeaderValue, Request, Response, StatusCode};
use prometheus::IntCounter;
use tokio::sync::watch;
use tracing::{debug, info};

use super::http::Body;
use crate::{
    identity::Identity,
    metrics::{authz::Client, Metrics},
    policy::{self, Defaults, Http, Inbound, PodPolicy, Verdict},
    route::Head,
    state::Snapshot,
};

/// The header a denial names its policy in (Linkerd's error header).
pub const DENIED_HEADER: &str = "l5d-proxy-error";

/// The policy of one pod port for one client: a tunnel's, or a same-node connection's.
pub struct PolicyCheck {
    target: SocketAddr,
    target_addr: String,
    client: Option<policy::Client>,
    ip: Option<IpAddr>,
    state: watch::Receiver<Arc<Snapshot>>,
    defaults: Defaults,
    metrics: Arc<Metrics>,
    /// The pod's policy as of a snapshot version.
    cached: Mutex<Option<(u64, Arc<PodPolicy>)>>,
    /// Counters of the decisions made so far (one per authorization and route, few).
    counters: Mutex<Vec<(CounterKey, IntCounter)>>,
}

/// Allowed or not, HTTP or not, by whom, on which route.
type CounterKey = (bool, bool, &'static str, Arc<str>, Option<Arc<str>>);
const MAX_COUNTERS: usize = 32;

impl PolicyCheck {
    /// The check of traffic from `identity` (at `ip`) to the pod at `target`.
    pub fn new(
        target: SocketAddr,
        identity: Option<Identity>,
        ip: Option<IpAddr>,
        state: watch::Receiver<Arc<Snapshot>>,
        defaults: Defaults,
        metrics: Arc<Metrics>,
    ) -> PolicyCheck {
        PolicyCheck {
            target,
            target_addr: target.to_string(),
            client: identity.map(policy::Client::new),
            ip,
            state,
            defaults,
            metrics,
            cached: Mutex::default(),
            counters: Mutex::default(),
        }
    }

    /// The client's Linkerd identity, empty for plaintext.
    fn client_id(&self) -> &str {
        self.client.as_ref().map_or("", |c| c.linkerd.as_str())
    }

    /// What applies to the pod now (re-resolved when the snapshot changed).
    fn policy(&self) -> Arc<PodPolicy> {
        let snapshot = self.state.borrow().clone();
        if let Ok(cached) = self.cached.lock() {
            if let Some((version, p)) = cached.as_ref() {
                if *version == snapshot.version {
                    return p.clone();
                }
            }
        }
        let resolved = Arc::new(resolve(&snapshot, self.target.ip(), &self.defaults));
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((snapshot.version, resolved.clone()));
        }
        resolved
    }

    /// Decides one connection (`http: None`) or request, counts it, and logs what an audit
    /// policy would have denied.
    pub fn check(&self, http: Option<Http>) -> Verdict {
        let verdict = self.decide(http);
        self.count(http.is_some(), &verdict);
        verdict
    }

    /// The decision under the policy in force now, uncounted.
    fn decide(&self, http: Option<Http>) -> Verdict {
        policy::authorize(
            &self.policy(),
            &Inbound {
                port: self.target.port(),
                client: self.client.as_ref(),
                ip: self.ip,
                http,
            },
        )
    }

    fn count(&self, http: bool, verdict: &Verdict) {
        let client = Client {
            target_addr: &self.target_addr,
            client_id: self.client_id(),
        };
        let key: CounterKey = (
            verdict.allowed,
            http,
            verdict.authz.kind,
            verdict.authz.name.clone(),
            verdict.route.clone(),
        );
        let hit = self.counters.lock().ok().and_then(|c| {
            c.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, counter)| counter.clone())
        });
        let counter = match hit {
            Some(c) => c,
            None => {
                let c = self.metrics.authz.counter(http, verdict, &client);
                if let Ok(mut cache) = self.counters.lock() {
                    if cache.len() < MAX_COUNTERS {
                        cache.push((key, c.clone()));
                    }
                }
                c
            }
        };
        counter.inc();
        if let Some(audit) = &verdict.audit {
            self.metrics.authz.audited(http, verdict, audit, &client);
            info!(
                target_addr = %self.target_addr, client = %self.client_id(), client_ip = ?self.ip,
                policy = %format_args!("{} {}", audit.kind, audit.name),
                "audit: allowed what this policy would deny"
            );
        }
        if !verdict.allowed {
            debug!(
                target_addr = %self.target_addr, client = %self.client_id(), client_ip = ?self.ip,
                policy = %format_args!("{} {}", verdict.authz.kind, verdict.authz.name),
                "denied by policy"
            );
        }
    }

    /// Resolves when a policy change denies this connection (never, with
    /// `--keep-denied-connections`): the relay is then dropped, closing both ends.
    pub async fn until_denied(&self) {
        let mut state = self.state.clone();
        loop {
            if self.defaults.keep_denied_connections || state.changed().await.is_err() {
                return std::future::pending().await;
            }
            let verdict = self.decide(None);
            if !verdict.allowed {
                info!(
                    target_addr = %self.target_addr, client = %self.client_id(),
                    policy = %format_args!("{} {}", verdict.authz.kind, verdict.authz.name),
                    "closing an open connection the policy now denies"
                );
                self.count(false, &verdict);
                return;
            }
        }
    }
}

/// What applies to the pod at `ip` in `snapshot`; the agent's default alone if the pod is not
/// (or no longer) in it.
pub fn resolve(snapshot: &Snapshot, ip: IpAddr, defaults: &Defaults) -> PodPolicy {
    match snapshot.pod_by_ip(ip) {
        Some(pod) => snapshot
            .policy
            .for_pod(pod, defaults.default, &defaults.cluster_networks),
        None => PodPolicy {
            default: defaults.default,
            cluster_networks: defaults.cluster_networks.clone(),
            servers: Vec::new(),
            istio: Vec::new(),
            peer_ports: Vec::new(),
            peer: None,
        },
    }
}

/// The parts of `req` policy reads.
pub fn http_of<B>(req: &Request<B>) -> Http<'_> {
    let host = req.uri().authority().map(|a| a.host()).or_else(|| {
        req.headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.rsplit_once(':') {
                Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
                _ => h,
            })
    });
    Http {
        head: Head {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        },
        host,
    }
}

/// The answer to a denied request: 403 (404 when no route of the Server matched) with a body
/// and an `l5d-proxy-error` header naming the policy; for gRPC, `PERMISSION_DENIED` (7).
pub fn denied(verdict: &Verdict, grpc: bool) -> Response<Body> {
    let a = &verdict.authz;
    let what = match a.kind {
        "default" => format!("default policy {}", a.name),
        "route" => format!(
            "no route of Server {} matches the request",
            verdict.server.name
        ),
        "peerauthentication" => format!("PeerAuthentication {} ({})", a.name, a.group),
        _ => format!("AuthorizationPolicy {} ({})", a.name, a.group),
    };
    let message = match verdict.status {
        404 => format!("not found: {what}"),
        _ => format!("unauthorized request: denied by {what}"),
    };
    let header = HeaderValue::from_str(&message)
        .unwrap_or_else(|_| HeaderValue::from_static("unauthorized request"));
    let mut resp = match grpc {
        true => {
            let mut r = Response::new(Body::empty());
            let h = r.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(
                "grpc-status",
                HeaderValue::from(if verdict.status == 404 { 12 } else { 7 }),
            );
            h.insert("grpc-message", header.clone());
            r
        }
        false => {
            let mut r = Response::new(Body::full(hyper::body::Bytes::from(format!(
                "RBAC: access denied: {message}\n"
            ))));
            *r.status_mut() = StatusCode::from_u16(verdict.status).unwrap_or(StatusCode::FORBIDDEN);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            r
        }
    };
    resp.headers_mut().insert(DENIED_HEADER, header);
    resp
}
