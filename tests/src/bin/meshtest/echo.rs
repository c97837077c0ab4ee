//! The echo app the Gateway API mesh conformance suite runs in its pods (Istio's echo server and
//! client), rebuilt to the behaviour the suite depends on (`tests/conformance/gamma/ECHO.md`):
//!
//! - the server answers HTTP (HTTP/1.1 and h2c) on 8080 and gRPC (`proto.EchoTestService/Echo`)
//!   on 7070 with what it received, one `Key=Value` per line, and `Hostname=` the pod's name;
//! - the client sends one request (or `--count` of them) from the pod, resolving the host as
//!   the pod resolves names, and prints one block per response in the echo client's format,
//!   which the conformance runner parses as upstream's `parse.go` does.
//!
//! Connections behave as upstream's: a new TCP connection per HTTP request (HTTP/1.1, no
//! keep-alive), one HTTP/2 connection shared by all calls of a gRPC invocation, no redirect
//! followed, 5 s for the whole invocation.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Bytes, Frame, Incoming},
    client::conn::{http1, http2},
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Request, Response, StatusCode,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};

use crate::l7::{block_on, frames, grpc_message};

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 7070;
const ECHO_METHOD: &str = "/proto.EchoTestService/Echo";
/// The echo client's default `--timeout`: it bounds the whole invocation.
const BUDGET: Duration = Duration::from_secs(5);
/// Requests of one `--count` batch in flight at once (the echo client's default QPS-less
/// concurrency).
const IN_FLIGHT: usize = 20;

type ResBody = BoxBody<Bytes, Infallible>;

/// `x-header-add` → `X-Header-Add`, as Go's `http.CanonicalHeaderKey` writes names.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
        upper = c == '-';
    }
    out
}

/// `(name, value)` of every header, names as `name_of` writes them, sorted by name with the
/// values of one name in arrival order.
fn sorted_headers(headers: &HeaderMap, name_of: fn(&str) -> String) -> Vec<(String, String)> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        by_name
            .entry(name_of(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    by_name
        .into_iter()
        .flat_map(|(name, values)| values.into_iter().map(move |v| (name.clone(), v)))
        .collect()
}

// -------------------------------------------------------------------------------------------
// Server

pub fn server(name: &str) -> Result<(), String> {
    let name: Arc<str> = Arc::from(name);
    block_on(async move {
        let any = std::net::Ipv6Addr::UNSPECIFIED;
        let http = TcpListener::bind((any, HTTP_PORT))
            .await
            .map_err(|e| format!("bind {HTTP_PORT}: {e}"))?;
        let grpc = TcpListener::bind((any, GRPC_PORT))
            .await
            .map_err(|e| format!("bind {GRPC_PORT}: {e}"))?;
        tokio::spawn(accept(grpc, name.clone(), true));
        accept(http, name, false).await;
        Ok(())
    })
}

async fn accept(listener: TcpListener, name: Arc<str>, grpc: bool) {
    let builder = match grpc {
        true => auto::Builder::new(TokioExecutor::new()).http2_only(),
        false => auto::Builder::new(TokioExecutor::new()),
    };
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (builder, name) = (builder.clone(), name.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let name = name.clone();
                async move {
                    Ok::<_, Infallible>(match grpc {
                        true => echo_grpc(req, &name, peer).await,
                        false => echo_http(req, &name, peer).await,
                    })
                }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The Host header, or HTTP/2's `:authority`.
fn host_of<B>(req: &Request<B>) -> String {
    req.headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

/// Any method and path: 200 and what was received, in the echo server's order.
async fn echo_http(req: Request<Incoming>, name: &str, peer: SocketAddr) -> Response<ResBody> {
    let url = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let proto = match req.version() {
        hyper::Version::HTTP_2 => "HTTP/2.0",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let mut body = format!(
        "ServiceVersion=\nServicePort={HTTP_PORT}\nHost={}\nURL={url}\nMethod={}\nProto={proto}\nIP={}\n",
        host_of(&req),
        req.method(),
        peer.ip()
    );
    for (name, value) in sorted_headers(req.headers(), canonical) {
        if name != "Host" {
            let _ = writeln!(body, "RequestHeader={name}:{value}");
        }
    }
    let _ = writeln!(body, "Hostname={name}");
    // Read what was sent, so that the connection stays usable.
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/text"),
    );
    response
}

/// `proto.EchoTestService/Echo`: the reply's message lists what was received.
async fn echo_grpc(req: Request<Incoming>, name: &str, peer: SocketAddr) -> Response<ResBody> {
    if req.uri().path() != ECHO_METHOD {
        return grpc_reply(Err((12, format!("unknown method {}", req.uri().path()))));
    }
    let authority = host_of(&req);
    let mut text = format!("Host={authority}\nRequestHeader=:authority:{authority}\n");
    for (name, value) in sorted_headers(req.headers(), str::to_owned) {
        if !name.ends_with("-bin") && name != "host" {
            let _ = writeln!(text, "RequestHeader={name}:{value}");
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return grpc_reply(Err((13, format!("reading the request: {e}")))),
    };
    let message = match body
        .get(5..)
        .ok_or("short frame")
        .and_then(decode_string_field)
    {
        Ok(m) => m,
        Err(e) => return grpc_reply(Err((3, format!("EchoRequest: {e}")))),
    };
    let _ = write!(
        text,
        "StatusCode=200\nServiceVersion=\nServicePort={GRPC_PORT}\nIP={}\nProto=GRPC\nEcho={message}\nHostname={name}\n",
        peer.ip()
    );
    grpc_reply(Ok(encode_string_field(&text)))
}

/// A unary gRPC answer: the message and `grpc-status: 0`, or the error status alone.
fn grpc_reply(result: Result<Vec<u8>, (u32, String)>) -> Response<ResBody> {
    let (tx, body) = frames(2);
    let mut trailers = HeaderMap::new();
    match result {
        Ok(message) => {
            // Room for both: the channel cannot be full.
            let _ = tx.try_send(Frame::data(grpc_message(&message)));
            trailers.insert("grpc-status", HeaderValue::from(0));
        }
        Err((code, message)) => {
            trailers.insert("grpc-status", HeaderValue::from(code));
            if let Ok(v) = HeaderValue::from_str(&message) {
                trailers.insert("grpc-message", v);
            }
        }
    }
    let _ = tx.try_send(Frame::trailers(trailers));
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Protobuf: a message whose field 1 is the string `text` (`EchoRequest`, `EchoResponse`).
fn encode_string_field(text: &str) -> Vec<u8> {
    let mut out = vec![0x0a];
    let mut len = text.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(text.as_bytes());
    out
}

/// Field 1 (a string) of a protobuf message; other fields are skipped.
fn decode_string_field(mut buf: &[u8]) -> Result<String, &'static str> {
    fn varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long")
    }
    let mut found = String::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let len = match key & 7 {
            0 => {
                varint(&mut buf)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut buf)?).map_err(|_| "length")?,
            5 => 4,
            _ => return Err("unsupported wire type"),
        };
        let value = buf.get(..len).ok_or("truncated field")?;
        if key == 0x0a {
            found = String::from_utf8(value.to_vec()).map_err(|_| "field 1 is not UTF-8")?;
        }
        buf = buf.get(len..).unwrap_or_default();
    }
    Ok(found)
}

// -------------------------------------------------------------------------------------------
// Client

/// What one `echo-client` invocation asks for.
struct Invocation {
    url: String,
    grpc: bool,
    host: String,
    port: u16,
    path: String,
    /// The Host header (`:authority`): host[:port] from the URL unless `-H Host:` says.
    authority: String,
    method: String,
    headers: Vec<(String, String)>,
    count: usize,
}

impl Invocation {
    fn parse(args: &[&str]) -> Result<Invocation, String> {
        let usage = "usage: echo-client URL [--method=M] [-H NAME:VALUE]... [--count=N]";
        let (url, mut rest) = args.split_first().ok_or(usage)?;
        let (grpc, after) = if let Some(a) = url.strip_prefix("http://") {
            (false, a)
        } else if let Some(a) = url.strip_prefix("grpc://") {
            (true, a)
        } else {
            return Err(format!("{url}: not http:// or grpc://"));
        };
        let (authority, path) = match after.find(['/', '?']) {
            Some(i) => after.split_at(i),
            None => (after, ""),
        };
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                (h, p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?)
            }
            _ => (authority, if grpc { GRPC_PORT } else { 80 }),
        };
        let mut out = Invocation {
            url: (*url).to_owned(),
            grpc,
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            path,
            authority: match (grpc, port) {
                (false, 80) => host.to_owned(),
                _ => format!("{host}:{port}"),
            },
            method: "GET".to_owned(),
            headers: Vec::new(),
            count: 1,
        };
        while let Some((arg, more)) = rest.split_first() {
            rest = more;
            if let Some(m) = arg.strip_prefix("--method=") {
                out.method = m.to_owned();
            } else if let Some(n) = arg.strip_prefix("--count=") {
                out.count = n
                    .parse()
                    .map_err(|_| format!("--count={n}: not a number"))?;
            } else if *arg == "-H" {
                let (h, more) = rest.split_first().ok_or(usage)?;
                rest = more;
                let (name, value) = h
                    .split_once(':')
                    .ok_or_else(|| format!("-H {h}: not NAME:VALUE"))?;
                let value = value.trim().to_owned();
                if name.eq_ignore_ascii_case("host") {
                    out.authority = value;
                } else {
                    out.headers.push((name.to_owned(), value));
                }
            } else {
                return Err(format!("{arg}: unknown argument ({usage})"));
            }
        }
        Ok(out)
    }
}

pub fn client(args: &[&str]) -> Result<(), String> {
    let inv = Arc::new(Invocation::parse(args)?);
    block_on(async move {
        let out = tokio::time::timeout(BUDGET, run(inv))
            .await
            .map_err(|_| format!("not done within {} s", BUDGET.as_secs()))??;
        print!("{out}");
        Ok(())
    })
}

/// Every request of the invocation; the blocks in request order, or the first failure.
async fn run(inv: Arc<Invocation>) -> Result<String, String> {
    // Resolved as any program in the pod resolves names (getaddrinfo: /etc/hosts, DNS).
    let addr = tokio::net::lookup_host((inv.host.as_str(), inv.port))
        .await
        .map_err(|e| format!("resolving {}: {e}", inv.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", inv.host))?;
    let grpc = match inv.grpc {
        true => {
            let stream = connect(addr).await?;
            let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
            tokio::spawn(conn);
            Some(sender)
        }
        false => None,
    };
    let active = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(inv.count);
    for i in 0..inv.count {
        let (inv, active, grpc) = (inv.clone(), active.clone(), grpc.clone());
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            let result = match grpc {
                Some(sender) => grpc_call(&inv, i, sender, now).await,
                None => http_request(&inv, i, addr, now).await,
            };
            active.fetch_sub(1, Ordering::SeqCst);
            result
        }));
    }
    let mut out = String::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let block = task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("request {i}: {e}"))?;
        out.push_str(&block);
        out.push('\n');
    }
    Ok(out)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One HTTP/1.1 request on a connection of its own.
async fn http_request(
    inv: &Invocation,
    i: usize,
    addr: SocketAddr,
    active: usize,
) -> Result<String, String> {
    let start = Instant::now();
    let stream = connect(addr).await?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/1.1 with {addr}: {e}"))?;
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(inv.method.as_str())
        .uri(inv.path.as_str())
        .header(header::HOST, inv.authority.as_str())
        .header(header::USER_AGENT, "Go-http-client/1.1");
    for (name, value) in &inv.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .header(header::ACCEPT_ENCODING, "gzip")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
    let mut out = format!("[{i}] Url={}\n", inv.url);
    for (name, value) in &inv.headers {
        let _ = writeln!(out, "[{i}] Header={name}:{value}");
    }
    let _ = write!(
        out,
        "[{i}] SourceIP={}\n[{i}] Latency={:?}\n[{i}] ActiveRequests={active}\n[{i}] StatusCode={}\n",
        local.ip().to_canonical(),
        start.elapsed(),
        status.as_u16()
    );
    for (name, value) in sorted_headers(&headers, canonical) {
        let _ = writeln!(out, "[{i}] ResponseHeader={name}:{value}");
    }
    for line in String::from_utf8_lossy(&body).lines() {
        if !line.is_empty() {
            let _ = writeln!(out, "[{i} body] {line}");
        }
    }
    Ok(out)
}

/// One unary `Echo` call on the invocation's shared HTTP/2 connection.
async fn grpc_call(
    inv: &Invocation,
    i: usize,
    mut sender: http2::SendRequest<Full<Bytes>>,
    active: usize,
) -> Result<String, String> {
    let start = Instant::now();
    let uri = format!("http://{}{ECHO_METHOD}", inv.authority);
    let mut request = Request::post(uri.as_str())
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "grpc-go/1.72.0");
    for (name, value) in &inv.headers {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("-H {name}: {e}"))?;
        request = request.header(name, value.as_str());
    }
    let request = request
        .body(Full::new(grpc_message(&encode_string_field("HelloWorld"))))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("call: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    let headers = response.headers().clone();
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reply body: {e}"))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or_else(|| headers.get("grpc-status"))
        .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned());
    if status.as_deref() != Some("0") {
        let message = trailers
            .get("grpc-message")
            .or_else(|| headers.get("grpc-message"))
            .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned());
        return Err(format!(
            "grpc-status {} {}",
            status.as_deref().unwrap_or("missing"),
            message.unwrap_or_default()
        ));
    }
    let bytes = collected.to_bytes();
    let message = bytes
        .get(5..)
        .ok_or("short frame")
        .and_then(decode_string_field)
        .map_err(|e| format!("EchoResponse: {e}"))?;
    let mut out = format!(
        "[{i}] Latency={:?}\n[{i}] ActiveRequests={active}\n",
        start.elapsed()
    );
    for line in message.lines().filter(|l| !l.is_empty()) {
        let _ = writeln!(out, "[{i} body] {line}");
    }
    for (name, value) in sorted_headers(&headers, str::to_owned) {
        let _ = writeln!(out, "[{i}] ResponseHeader={name}:{value}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn names_are_written_as_go_does() {
        assert_eq!(canonical("x-header-add"), "X-Header-Add");
        assert_eq!(canonical("SOME-other-HEADER"), "Some-Other-Header");
    }

    #[test]
    fn a_string_field_round_trips_past_one_byte_lengths() {
        let long = "x".repeat(300);
        for text in ["", "HelloWorld", long.as_str()] {
            assert_eq!(
                decode_string_field(&encode_string_field(text)).unwrap(),
                text
            );
        }
    }

    #[test]
    fn urls_and_headers_are_read_as_the_echo_client_does() {
        let inv = Invocation::parse(&["http://echo/?animal=whale", "-H", "Host: other "]).unwrap();
        assert_eq!((inv.host.as_str(), inv.port), ("echo", 80));
        assert_eq!(inv.path, "/?animal=whale");
        assert_eq!(inv.authority, "other");
        let inv = Invocation::parse(&["grpc://echo:7070", "-H", "X-Test:set"]).unwrap();
        assert!(inv.grpc);
        assert_eq!(inv.authority, "echo:7070");
        assert_eq!(inv.headers, [("X-Test".to_owned(), "set".to_owned())]);
        let inv = Invocation::parse(&["http://echo-v1:8080", "--count=500"]).unwrap();
        assert_eq!((inv.port, inv.count, inv.path.as_str()), (8080, 500, "/"));
        assert_eq!(inv.authority, "echo-v1:8080");
    }
}
