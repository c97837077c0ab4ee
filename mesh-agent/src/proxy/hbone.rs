//! HBONE client: mTLS (TLS 1.3, ALPN h2) to a peer node's :15008 as the source workload, then
//! one HTTP/2 CONNECT stream per proxied (opaque) connection, or one HTTP/2 stream per HTTP
//! request: a request travels as itself, naming its pod in [`TARGET`], so the destination
//! agent serves it without a second HTTP layer inside a tunnel.
//!
//! Connections are pooled per (source identity and certificate, destination node, destination
//! identity): the server certificate proves the destination workload, so streams to a
//! different workload on the same node get their own connection, and a renewed source
//! certificate starts a new connection while existing streams finish on the old one. A
//! connection carries at most `--max-streams-per-connection` tunnels (the peer refuses more);
//! beyond that a sibling connection is opened.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    body::Incoming,
    client::conn::http2,
    header::{HeaderName, HeaderValue},
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::{
    identity::{manager::IdentityManager, Identity},
    limits::{Gauge, Slot},
    proxy::http::Body,
    tls::MeshTls,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS and HTTP/2 set-up, and each CONNECT exchange, must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs on idle pooled connections find dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: credit, not buffers. The 64 KiB default caps one tunnel at
/// a window per round trip; node-to-node links deserve more.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame (the default is 16 KiB).
pub const MAX_FRAME: u32 = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {0} on this node yet")]
    NoCredential(Identity),
    #[error("TCP connection to {peer} timed out; is a NetworkPolicy blocking the HBONE port?")]
    Timeout { peer: SocketAddrV4 },
    #[error("TCP connection to {peer}: {source}")]
    Tcp {
        peer: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("mTLS handshake with {peer} as {source_id} expecting {destination}: {source}")]
    Handshake {
        peer: SocketAddrV4,
        source_id: Identity,
        destination: Identity,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 with {peer}: {source}")]
    Http2 {
        peer: SocketAddrV4,
        #[source]
        source: hyper::Error,
    },
    /// The connection would take no new stream (the peer is closing it); nothing was sent.
    #[error("HTTP/2 with {peer}, closing: {source}")]
    Unsent {
        peer: SocketAddrV4,
        #[source]
        source: hyper::Error,
    },
    #[error("{peer} refused CONNECT {target} with {status}")]
    Refused {
        peer: SocketAddrV4,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("{0:?} is not a valid SNI name")]
    Sni(String),
    #[error("{what} with {peer} timed out after {HANDSHAKE_TIMEOUT:?}; is the peer agent overloaded or gone?")]
    Stalled {
        peer: SocketAddrV4,
        what: &'static str,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    serial: String,
    node: SocketAddrV4,
    destination: Identity,
}

/// One pooled HBONE connection and the tunnels open on it.
struct Pooled {
    sender: http2::SendRequest<Body>,
    streams: Gauge,
}

/// How many connections a request the peer never saw is tried on.
const UNSENT_RETRIES: usize = 3;

/// The pod (`ip:port`) an HTTP request sent over HBONE is for (a CONNECT names it in its
/// authority instead).
pub const TARGET: &str = "mesh-target";
/// On an HTTP request sent over HBONE, what a CONNECT says in `baggage` and `forwarded`
/// (which on a request belong to the application and pass untouched).
pub const REQUEST_BAGGAGE: &str = "mesh-baggage";
pub const REQUEST_FORWARDED: &str = "mesh-forwarded";
/// Every header agents set between themselves on requests: stripped from what pods send,
/// and from what is delivered to them.
pub const AGENT_HEADERS: [&str; 3] = [TARGET, REQUEST_BAGGAGE, REQUEST_FORWARDED];

pub struct HboneConnector {
    tls: Arc<MeshTls>,
    identities: Arc<IdentityManager>,
    port: u16,
    /// Tunnels per connection: the peer refuses more, so a full connection gets a sibling.
    max_streams: usize,
    /// Connections per key that busy traffic is spread over (one connection's TLS and HTTP/2
    /// framing run on one task at a time, so one connection uses at most one core): a stream
    /// that finds every connection of its key busy dials another, up to this many.
    spread: usize,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// One dial at a time per key: connections opened together share the first dial instead
    /// of each opening an HBONE connection of its own.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// The tunnel for one proxied connection. It holds its place on the pooled connection until
/// dropped.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _slot: Slot,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The `forwarded` header (RFC 7239) Istio's HBONE uses to carry the client's address.
pub const FORWARDED: &str = "forwarded";

/// Tells the destination agent what a tunnel carries, so it neither has to detect it (which
/// would delay a server-speaks-first protocol) nor guess: `h2c` (HTTP/2 requests),
/// `http/1.1` (HTTP/1.x requests on a pooled tunnel, or an upgrade), `opaque`. A tunnel
/// without it is opaque.
pub const PROTOCOL: &str = "mesh-protocol";

/// What one CONNECT tells the destination agent about the client.
#[derive(Debug, Clone)]
pub struct TunnelRequest {
    /// The W3C baggage naming the client's workload (metric labels only).
    pub baggage: String,
    /// The client pod's address, so the destination pod sees it.
    pub forwarded_for: Option<IpAddr>,
    /// What the tunnel carries.
    pub protocol: super::detect::Protocol,
}

impl TunnelRequest {
    /// The `forwarded` header naming the client, if known.
    fn forwarded_header(&self) -> Option<String> {
        match self.forwarded_for? {
            IpAddr::V4(ip) => Some(format!("for={ip}")),
            IpAddr::V6(ip) => Some(format!("for=\"[{ip}]\"")),
        }
    }

    /// The client address in a `forwarded` header: `for=a.b.c.d` or `for="[v6]"` (RFC 7239).
    /// `None` when the header is absent or says something else.
    pub fn parse_forwarded_for(headers: &hyper::HeaderMap) -> Option<IpAddr> {
        Self::forwarded_in(headers, FORWARDED)
    }

    /// The client address in header `name`, written as `forwarded` is.
    pub fn forwarded_in(headers: &hyper::HeaderMap, name: &str) -> Option<IpAddr> {
        let value = headers.get(name)?.to_str().ok()?;
        value.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            if !k.eq_ignore_ascii_case("for") {
                return None;
            }
            v.trim_matches('"')
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
    }
}

impl HboneConnector {
    pub fn new(
        tls: Arc<MeshTls>,
        identities: Arc<IdentityManager>,
        port: u16,
        max_streams: usize,
        spread: usize,
    ) -> Self {
        Self {
            tls,
            identities,
            port,
            max_streams,
            spread: spread.max(1),
            pool: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a CONNECT stream to `target` (a pod on `node`) as `source`, expecting the node
    /// agent to present `destination`.
    pub async fn connect(
        &self,
        source: &Identity,
        destination: &Identity,
        node: Ipv4Addr,
        target: SocketAddr,
        request: &TunnelRequest,
    ) -> Result<Tunnel, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut sender, slot, peer) = self.stream(source, destination, node).await?;
            let opened = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                Self::open_stream(&mut sender, peer, target, request),
            )
            .await
            .map_err(|_| Error::Stalled {
                peer,
                what: "CONNECT",
            })?;
            match opened {
                Ok(io) => return Ok(Tunnel { io, _slot: slot }),
                // The connection is closing (GOAWAY): the CONNECT goes on another.
                Err(Error::Unsent { source, .. }) if attempt < UNSENT_RETRIES => {
                    self.forget(&slot);
                    debug!(%peer, "CONNECT not sent on a closing HBONE connection: {source}; on another");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A pooled connection to `node` as `source` for `destination`, with room for one more
    /// stream, and that room.
    async fn stream(
        &self,
        source: &Identity,
        destination: &Identity,
        node: Ipv4Addr,
    ) -> Result<(http2::SendRequest<Body>, Slot, SocketAddrV4), Error> {
        let peer = SocketAddrV4::new(node, self.port);
        let credential = self
            .identities
            .get(source)
            .ok_or_else(|| Error::NoCredential(source.clone()))?;
        let key = PoolKey {
            source: source.clone(),
            serial: credential.serial.clone(),
            node: peer,
            destination: destination.clone(),
        };
        let (sender, slot) = match self.pooled(&key) {
            Some((sender, slot, false)) => (sender, slot),
            // None yet, or every one busy while there may be more: dial (one at a time).
            // Boxed: the dial's future (mTLS and HTTP/2 set-up) is large and rarely run; kept
            // inline, every request's future would carry, and copy, its size.
            _ => tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                Box::pin(self.dial_once(&key, &credential)),
            )
            .await
            .map_err(|_| Error::Stalled {
                peer,
                what: "mTLS and HTTP/2 set-up",
            })??,
        };
        Ok((sender, slot, peer))
    }

    /// The headers that tell the destination agent about a request sent with
    /// [`HboneConnector::request`]: the pod it is for, and what a CONNECT would carry.
    pub fn request_headers(
        target: SocketAddr,
        tunnel: &TunnelRequest,
    ) -> Vec<(HeaderName, HeaderValue)> {
        // Addresses and Kubernetes names: always valid header values.
        let mut out = Vec::with_capacity(3);
        let mut set = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                out.push((HeaderName::from_static(name), v));
            }
        };
        set(TARGET, &target.to_string());
        set(REQUEST_BAGGAGE, &tunnel.baggage);
        if let Some(f) = tunnel.forwarded_header() {
            set(REQUEST_FORWARDED, &f);
        }
        out
    }

    /// Sends one HTTP request (already in HTTP/2 form, with [`HboneConnector::request_headers`])
    /// to a pod on `node`, as `source`: its own stream on a pooled connection. The slot holds
    /// the stream's place until the response has been read.
    pub async fn request(
        &self,
        source: &Identity,
        destination: &Identity,
        node: Ipv4Addr,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Slot), Error> {
        let mut req = req;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut sender, slot, peer) = self.stream(source, destination, node).await?;
            // A connection the peer is closing (GOAWAY: its agent drains, or restarts) takes
            // no new stream; a request it never saw goes on another connection.
            let unsent = match sender.ready().await {
                Err(source) => Err((source, req)),
                Ok(()) => match sender.try_send_request(req).await {
                    Ok(response) => return Ok((response, slot)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => Err((e.into_error(), unsent)),
                        None => Ok(e.into_error()),
                    },
                },
            };
            match unsent {
                Ok(source) => return Err(Error::Http2 { peer, source }),
                Err((source, unsent)) => {
                    self.forget(&slot);
                    if attempt >= UNSENT_RETRIES {
                        return Err(Error::Unsent { peer, source });
                    }
                    debug!(%peer, "request not sent on a closing HBONE connection: {source}; on another");
                    req = unsent;
                }
            }
        }
    }

    /// Takes the connection `slot` belongs to out of the pool (its streams carry on).
    fn forget(&self, slot: &Slot) {
        if let Ok(mut pool) = self.pool.lock() {
            for conns in pool.values_mut() {
                conns.retain(|c| !slot.of(&c.streams));
            }
            pool.retain(|_, conns| !conns.is_empty());
        }
    }

    async fn open_stream(
        sender: &mut http2::SendRequest<Body>,
        peer: SocketAddrV4,
        target: SocketAddr,
        tunnel: &TunnelRequest,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, Error> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(super::inbound::BAGGAGE, &tunnel.baggage)
            .header(PROTOCOL, tunnel.protocol.as_str());
        if let Some(f) = tunnel.forwarded_header() {
            request = request.header(FORWARDED, f);
        }
        let request = request
            .body(Body::empty())
            .map_err(|e| Error::Sni(e.to_string()))?;
        sender
            .ready()
            .await
            .map_err(|source| Error::Unsent { peer, source })?;
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let source = e.into_error();
                return Err(match unsent {
                    true => Error::Unsent { peer, source },
                    false => Error::Http2 { peer, source },
                });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(Error::Refused {
                peer,
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| Error::Http2 { peer, source })?;
        Ok(TokioIo::new(upgraded))
    }

    /// The least busy pooled connection for `key` with room for one more tunnel, that room,
    /// and whether the key is crowded: every connection had streams open, and there are fewer
    /// than `spread`.
    fn pooled(&self, key: &PoolKey) -> Option<(http2::SendRequest<Body>, Slot, bool)> {
        let mut pool = self.pool.lock().ok()?;
        let conns = pool.get_mut(key)?;
        conns.retain(|c| !c.sender.is_closed());
        let least = conns.iter().min_by_key(|c| c.streams.held())?;
        let crowded = least.streams.held() > 0 && conns.len() < self.spread;
        let slot = least.streams.try_take(self.max_streams)?;
        Some((least.sender.clone(), slot, crowded))
    }

    /// The lock that takes dials for `key` one at a time.
    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        match self.dialing.lock() {
            Ok(mut d) => {
                d.retain(|_, l| Arc::strong_count(l) > 1);
                d.entry(key.clone()).or_default().clone()
            }
            Err(_) => Arc::default(),
        }
    }

    /// Dials for `key` unless a dial that was already under way left room on a connection
    /// that is not crowded. A crowded key's extra connection is only a spread: when it cannot
    /// be dialled, the stream goes on a connection there is.
    async fn dial_once(
        &self,
        key: &PoolKey,
        credential: &crate::identity::manager::Credential,
    ) -> Result<(http2::SendRequest<Body>, Slot), Error> {
        let lock = self.dial_lock(key);
        let _turn = lock.lock().await;
        match self.pooled(key) {
            Some((sender, slot, false)) => Ok((sender, slot)),
            Some((sender, slot, true)) => match self.dial(key, credential).await {
                Ok(dialled) => Ok(dialled),
                Err(e) => {
                    debug!(peer = %key.node, "another HBONE connection to spread over: {e}");
                    Ok((sender, slot))
                }
            },
            None => self.dial(key, credential).await,
        }
    }

    async fn dial(
        &self,
        key: &PoolKey,
        credential: &crate::identity::manager::Credential,
    ) -> Result<(http2::SendRequest<Body>, Slot), Error> {
        let peer = key.node;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
            .await
            .map_err(|_| Error::Timeout { peer })?
            .map_err(|source| Error::Tcp { peer, source })?;
        let _ = tcp.set_nodelay(true);
        let config = self.tls.client_config(credential, &key.destination)?;
        let sni = key.destination.to_linkerd();
        let server_name = ServerName::try_from(sni.clone()).map_err(|_| Error::Sni(sni))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|source| Error::Handshake {
                peer,
                source_id: key.source.clone(),
                destination: key.destination.clone(),
                source,
            })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| Error::Http2 { peer, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, "HBONE connection ended: {e}");
            }
        });
        debug!(%peer, source = %key.source, destination = %key.destination, serial = %key.serial, "HBONE connection established");
        let streams = Gauge::default();
        // A fresh connection always has room for the tunnel it was dialled for.
        let slot = streams.take();
        if let Ok(mut pool) = self.pool.lock() {
            // Forget connections made with an older certificate; their streams carry on.
            pool.retain(|k, conns| {
                conns.retain(|c| !c.sender.is_closed());
                let superseded = k.source == key.source
                    && k.node == key.node
                    && k.destination == key.destination
                    && k.serial != key.serial;
                !conns.is_empty() && !superseded
            });
            pool.entry(key.clone()).or_default().push(Pooled {
                sender: sender.clone(),
                streams,
            });
        }
        Ok((sender, slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(value: &str) -> Option<IpAddr> {
        let mut headers = hyper::HeaderMap::new();
        if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
            headers.insert(FORWARDED, v);
        }
        TunnelRequest::parse_forwarded_for(&headers)
    }

    #[test]
    fn forwarded_for() {
        let v4 = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 1, 2)));
        assert_eq!(forwarded("for=10.1.1.2"), v4);
        assert_eq!(forwarded("proto=http; For=\"10.1.1.2\""), v4);
        let v6: std::net::Ipv6Addr = "fd00:1:1::2"
            .parse()
            .unwrap_or(std::net::Ipv6Addr::LOCALHOST);
        assert_eq!(forwarded("for=\"[fd00:1:1::2]\""), Some(IpAddr::V6(v6)));
        assert_eq!(forwarded("for=unknown"), None);
        assert_eq!(forwarded("by=10.1.1.2"), None);
        assert_eq!(
            TunnelRequest::parse_forwarded_for(&hyper::HeaderMap::new()),
            None
        );
    }
}
