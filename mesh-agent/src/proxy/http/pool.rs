//! Upstream HTTP connections, pooled per destination and per the client they speak for.
//!
//! HTTP/2 connections are shared by every request for their key (multiplexed); HTTP/1.1
//! connections are checked out for one request at a time and come back when their response
//! has been read. A key names where the bytes go and from whose address or identity, so a
//! pooled connection never carries one pod's request under another pod's identity.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{Body, Failure};
use crate::identity::Identity;

/// Anything a pooled connection can run over: a TCP stream or an HBONE tunnel.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// An HTTP/2 connection is replaced after this long (new requests go to a fresh one, so a
/// renewed workload certificate is used and a peer's state does not linger forever).
const H2_MAX_AGE: Duration = Duration::from_secs(300);
/// An idle HTTP/1.1 connection is not reused after this long.
const H1_IDLE: Duration = Duration::from_secs(30);
/// ...nor an idle HBONE tunnel after this share of the head timeout: the destination agent
/// closes a tunnel that brings no request head for `--http-head-timeout` (the agents of a
/// cluster share their flags), and a request sent just as it does would fail. Well inside
/// that, a tunnel is either reused or left to close.
const TUNNEL_IDLE_SHARE: u32 = 2;
/// Idle HTTP/1.1 connections kept per key, and in all.
const H1_IDLE_PER_KEY: usize = 64;
const H1_IDLE_TOTAL: usize = 16_384;
/// HTTP/2 PINGs find dead upstream connections.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How often [`Pool::sweep`] runs in the agent.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Where a pooled connection goes and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An HBONE tunnel to `endpoint` on the node at `node`, as `source`, for the client pod at
    /// `client` (sent as `forwarded`), carrying HTTP/1.1: pooled for HTTP/1.x requests, taken
    /// for good by an upgraded one (WebSocket, `CONNECT`). (HTTP/2 requests travel as streams
    /// of the HBONE connection itself.)
    Hbone {
        source: Arc<Identity>,
        destination: Arc<Identity>,
        node: Ipv4Addr,
        endpoint: SocketAddr,
        client: Option<IpAddr>,
    },
    /// A connection made inside a pod of this node to `endpoint`, from `client`'s address
    /// (`None`: from the node's).
    InPod {
        endpoint: SocketAddr,
        client: Option<IpAddr>,
    },
    /// A connection made from inside the client pod's own network namespace (a destination
    /// outside the mesh).
    FromPod { netns: u64, endpoint: SocketAddr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub route: Route,
    pub h2: bool,
}

/// A key is hashed by where its connections go and from which client, in one write (SipHash
/// costs about as much per write as per byte): the HBONE identities (six strings, hashed
/// twice per request, at checkout and checkin) are left to the equality check. Keys that
/// differ only in identity share a bucket, which only a peer's pods of several service
/// accounts at one address would make.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        fn put_ip(put: &mut impl FnMut(&[u8]), ip: Option<IpAddr>) {
            match ip {
                None => put(&[0]),
                Some(IpAddr::V4(v4)) => {
                    put(&[4]);
                    put(&v4.octets());
                }
                Some(IpAddr::V6(v6)) => {
                    put(&[6]);
                    put(&v6.octets());
                }
            }
        }
        // At most 42 bytes: h2, the route's kind, two addresses and a port.
        let mut buf = [0u8; 48];
        let mut len = 0;
        let mut put = |bytes: &[u8]| {
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        put(&[u8::from(self.h2)]);
        match &self.route {
            Route::Hbone {
                node,
                endpoint,
                client,
                ..
            } => {
                put(&[1]);
                put(&node.octets());
                put_ip(&mut put, Some(endpoint.ip()));
                put(&endpoint.port().to_be_bytes());
                put_ip(&mut put, *client);
            }
            Route::InPod { endpoint, client } => {
                put(&[2]);
                put_ip(&mut put, Some(endpoint.ip()));
                put(&endpoint.port().to_be_bytes());
                put_ip(&mut put, *client);
            }
            Route::FromPod { netns, endpoint } => {
                put(&[3]);
                put(&netns.to_le_bytes());
                put_ip(&mut put, Some(endpoint.ip()));
                put(&endpoint.port().to_be_bytes());
            }
        }
        state.write(&buf[..len]);
    }
}

/// Why a request could not be sent: the proxy answers with [`super::failure_response`].
#[derive(Debug)]
pub struct SendError {
    pub failure: Failure,
    pub detail: String,
}

impl SendError {
    pub fn new(failure: Failure, detail: impl Into<String>) -> Self {
        Self {
            failure,
            detail: detail.into(),
        }
    }

    fn request(e: &hyper::Error) -> Self {
        let failure = match e.is_timeout() {
            true => Failure::Timeout,
            false => Failure::UpstreamReset,
        };
        Self::new(failure, e.to_string())
    }
}

struct IdleH1 {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

struct SharedH2 {
    sender: http2::SendRequest<Body>,
    born: Instant,
}

type H2Slot = Arc<tokio::sync::Mutex<Option<SharedH2>>>;

pub struct Pool {
    h1: Mutex<HashMap<Key, Vec<IdleH1>>>,
    h1_idle: AtomicUsize,
    h2: Mutex<HashMap<Key, H2Slot>>,
    /// How long an idle HBONE tunnel may be reused.
    tunnel_idle: Duration,
}

impl Pool {
    /// A pool whose peers close idle tunnels after `head_timeout`.
    pub fn new(head_timeout: Duration) -> Self {
        Self {
            h1: Mutex::default(),
            h1_idle: AtomicUsize::default(),
            h2: Mutex::default(),
            tunnel_idle: (head_timeout / TUNNEL_IDLE_SHARE).min(H1_IDLE),
        }
    }

    /// Sends `req` on a pooled connection for `key`, dialling with `dial` when there is none.
    /// An HTTP/1.1 connection comes back to the pool when the returned [`Checkin`] is dropped,
    /// which the caller does once the response has been read to its end.
    pub async fn send<D, F>(
        self: &Arc<Self>,
        key: &Key,
        dial: D,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Checkin), SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<BoxIo, SendError>>,
    {
        match key.h2 {
            true => Ok((self.send_h2(key, dial, req).await?, Checkin(None))),
            false => self.send_h1(key, dial, req).await,
        }
    }

    async fn send_h2<D, F>(
        &self,
        key: &Key,
        dial: D,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<BoxIo, SendError>>,
    {
        let slot = {
            let mut map = self
                .h2
                .lock()
                .map_err(|_| SendError::new(Failure::Unavailable, "pool lock poisoned"))?;
            // Keys whose connection is gone and that nobody is using are forgotten.
            if map.len() > 64 {
                map.retain(|_, s| h2_live(s));
            }
            map.entry(key.clone()).or_default().clone()
        };
        let mut sender = {
            // One dial at a time per key: concurrent requests share it.
            let mut shared = slot.lock().await;
            match &*shared {
                Some(c) if !c.sender.is_closed() && c.born.elapsed() < H2_MAX_AGE => {
                    c.sender.clone()
                }
                _ => {
                    // Boxed: the dial's future is large and rarely run; kept inline, every
                    // request's future would carry (and copy) its size.
                    let sender = Box::pin(Self::dial_h2(&dial, &key.route)).await?;
                    *shared = Some(SharedH2 {
                        sender: sender.clone(),
                        born: Instant::now(),
                    });
                    sender
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| SendError::new(Failure::UpstreamReset, e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::request(&e))
    }

    /// Drops the idle HTTP/1.1 connections of `route` that have closed or have been idle too
    /// long at `now` to be reused; returns how many.
    fn prune(&self, route: &Route, idle: &mut Vec<IdleH1>, now: Instant) -> usize {
        let limit = match route {
            Route::Hbone { .. } => self.tunnel_idle,
            Route::InPod { .. } | Route::FromPod { .. } => H1_IDLE,
        };
        let before = idle.len();
        // Idle since after the cutoff: one comparison per connection, no subtraction.
        let cutoff = now.checked_sub(limit);
        idle.retain(|c| !c.sender.is_closed() && cutoff.is_none_or(|cutoff| c.since > cutoff));
        before - idle.len()
    }

    /// Lets go of the idle HTTP/1.1 connections that have closed or may not be reused any
    /// more, and of the HTTP/2 connections that have closed and that no request is using.
    /// Without it such a connection stays until its key is next checked out (a client pod
    /// that left never is), counted toward the pool's total.
    pub fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut map) = self.h1.lock() {
            let mut dropped = 0;
            map.retain(|key, idle| {
                dropped += self.prune(&key.route, idle, now);
                !idle.is_empty()
            });
            self.h1_idle.fetch_sub(dropped, Ordering::Relaxed);
        }
        if let Ok(mut map) = self.h2.lock() {
            map.retain(|_, s| h2_live(s));
        }
    }

    /// Runs [`Pool::sweep`] every `period`, for good.
    pub async fn sweep_every(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Idle HTTP/1.1 connections kept, and the keys they are kept under.
    #[cfg(test)]
    fn idle_h1(&self) -> (usize, usize) {
        let keys = self.h1.lock().map_or(0, |m| m.len());
        (self.h1_idle.load(Ordering::Relaxed), keys)
    }

    /// An idle connection for `key` that can take a request now. Connections that are open
    /// but not ready yet (their last response has only just been read) stay for later.
    fn checkout_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut map = self.h1.lock().ok()?;
        let idle = map.get_mut(key)?;
        let pruned = self.prune(&key.route, idle, Instant::now());
        let found = idle.iter().rposition(|c| c.sender.is_ready());
        let taken = found.map(|i| idle.swap_remove(i).sender);
        self.h1_idle
            .fetch_sub(pruned + usize::from(taken.is_some()), Ordering::Relaxed);
        // A key left empty stays for the connection's return (no removal and insertion, and
        // their allocations, per request); the sweep forgets keys that stay empty.
        taken
    }

    fn checkin_h1(&self, key: Key, sender: http1::SendRequest<Body>) {
        if sender.is_closed() || self.h1_idle.load(Ordering::Relaxed) >= H1_IDLE_TOTAL {
            return;
        }
        let Ok(mut map) = self.h1.lock() else { return };
        let idle = map.entry(key).or_default();
        if idle.len() < H1_IDLE_PER_KEY {
            idle.push(IdleH1 {
                sender,
                since: Instant::now(),
            });
            self.h1_idle.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn dial_h2<D, F>(dial: &D, route: &Route) -> Result<http2::SendRequest<Body>, SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<BoxIo, SendError>>,
    {
        let io = dial().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(crate::proxy::hbone::STREAM_WINDOW)
            .initial_connection_window_size(crate::proxy::hbone::CONNECTION_WINDOW)
            .max_frame_size(crate::proxy::hbone::MAX_FRAME)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::new(Failure::Unavailable, format!("HTTP/2 handshake: {e}")))?;
        let route = route.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(?route, "upstream HTTP/2 connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn dial_h1<D, F>(dial: &D, upgrades: bool) -> Result<http1::SendRequest<Body>, SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<BoxIo, SendError>>,
    {
        let io = dial().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                SendError::new(Failure::Unavailable, format!("HTTP/1.1 handshake: {e}"))
            })?;
        tokio::spawn(async move {
            let ended = match upgrades {
                true => conn.with_upgrades().await,
                false => conn.await,
            };
            if let Err(e) = ended {
                debug!("upstream HTTP/1.1 connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn send_h1<D, F>(
        self: &Arc<Self>,
        key: &Key,
        dial: D,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Checkin), SendError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<BoxIo, SendError>>,
    {
        // An upgrade takes its connection for good: never pooled.
        if super::is_upgrade(&req) {
            let mut sender = Box::pin(Self::dial_h1(&dial, true)).await?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| SendError::request(&e))?;
            return Ok((resp, Checkin(None)));
        }
        let checkin = |sender| Checkin(Some((self.clone(), key.clone(), sender)));
        // A pooled connection the server closed meanwhile hands the request back: then it
        // goes on a fresh one.
        if let Some(mut sender) = self.checkout_h1(key) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, checkin(sender))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::request(&e.into_error())),
                },
            }
        }
        let mut sender = Box::pin(Self::dial_h1(&dial, false)).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::request(&e))?;
        Ok((resp, checkin(sender)))
    }
}

/// Whether a key's HTTP/2 slot is worth keeping: a request holds it, or its connection is
/// open (or being dialled).
fn h2_live(slot: &H2Slot) -> bool {
    Arc::strong_count(slot) > 1
        || slot
            .try_lock()
            .map(|g| g.as_ref().is_some_and(|c| !c.sender.is_closed()))
            .unwrap_or(true)
}

/// An HTTP/1.1 connection lent for one request: back to the pool when dropped (after the
/// response has been read; a connection whose response was abandoned closes itself and is
/// not kept).
pub struct Checkin(Option<(Arc<Pool>, Key, http1::SendRequest<Body>)>);

impl Drop for Checkin {
    fn drop(&mut self) {
        if let Some((pool, key, sender)) = self.0.take() {
            pool.checkin_h1(key, sender);
        }
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;
    use tokio::{net::TcpListener, task::JoinSet};

    use super::*;

    /// An HTTP/1.1 server on loopback answering every request `ok`; its connections end when
    /// the returned task is aborted.
    async fn server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, accept)
    }

    /// Sends one request for `key` to `addr` and reads its answer; the connection goes back
    /// to the pool.
    async fn one_request(pool: &Arc<Pool>, key: &Key, addr: SocketAddr) {
        let dial = || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .map(|s| Box::new(s) as BoxIo)
                .map_err(|e| SendError::new(Failure::Unavailable, e.to_string()))
        };
        let (resp, checkin) = pool
            .send(key, dial, Request::new(Body::empty()))
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        drop(checkin);
    }

    #[test]
    fn a_key_hashes_where_it_goes_and_compares_whom_for() {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = |k: &Key| BuildHasherDefault::<DefaultHasher>::default().hash_one(k);
        let endpoint: SocketAddr = ([10, 1, 2, 3], 8080).into();
        let key = tunnel_key(endpoint);
        assert_eq!(hash(&key), hash(&key.clone()));
        // Another client pod's identity: another key in the same bucket.
        let mut other_source = key.clone();
        if let Route::Hbone { source, .. } = &mut other_source.route {
            *source = Arc::new(Identity::new("cluster.local", "shop", "other"));
        }
        assert_ne!(other_source, key);
        assert_eq!(hash(&other_source), hash(&key));
        // Anywhere else, or HTTP/2: another hash.
        let elsewhere = tunnel_key(([10, 1, 2, 4], 8080).into());
        let h2 = Key {
            h2: true,
            ..key.clone()
        };
        let in_pod = Key {
            route: Route::InPod {
                endpoint,
                client: Some(Ipv4Addr::new(10, 1, 1, 2).into()),
            },
            h2: false,
        };
        for other in [&elsewhere, &h2, &in_pod] {
            assert_ne!(hash(other), hash(&key));
        }
    }

    fn tunnel_key(endpoint: SocketAddr) -> Key {
        Key {
            route: Route::Hbone {
                source: Arc::new(Identity::new("cluster.local", "shop", "client")),
                destination: Arc::new(Identity::new("cluster.local", "shop", "web")),
                node: Ipv4Addr::new(10, 0, 0, 2),
                endpoint,
                client: Some(Ipv4Addr::new(10, 1, 1, 2).into()),
            },
            h2: false,
        }
    }

    #[tokio::test]
    async fn a_sweep_lets_go_of_expired_tunnels_and_keeps_live_connections() {
        let (addr, _server) = server().await;
        // Tunnels may idle for half the head timeout: 25 ms.
        let pool = Arc::new(Pool::new(Duration::from_millis(50)));
        let in_pod = Key {
            route: Route::InPod {
                endpoint: addr,
                client: None,
            },
            h2: false,
        };
        one_request(&pool, &tunnel_key(addr), addr).await;
        one_request(&pool, &in_pod, addr).await;
        assert_eq!(pool.idle_h1(), (2, 2));
        tokio::time::sleep(Duration::from_millis(60)).await;
        pool.sweep();
        // The tunnel is past its reuse limit; the pod connection (30 s) is not.
        assert_eq!(pool.idle_h1(), (1, 1));
        one_request(&pool, &in_pod, addr).await;
        assert_eq!(pool.idle_h1(), (1, 1), "the kept connection was reused");
    }

    #[tokio::test]
    async fn a_sweep_lets_go_of_connections_the_server_closed() {
        let (addr, server) = server().await;
        let pool = Arc::new(Pool::new(Duration::from_secs(60)));
        let key = Key {
            route: Route::FromPod {
                netns: 1,
                endpoint: addr,
            },
            h2: false,
        };
        one_request(&pool, &key, addr).await;
        assert_eq!(pool.idle_h1(), (1, 1));
        // The server goes away with its connections.
        server.abort();
        let _ = server.await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.idle_h1() != (0, 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            pool.sweep();
        }
        assert_eq!(pool.idle_h1(), (0, 0));
    }
}
