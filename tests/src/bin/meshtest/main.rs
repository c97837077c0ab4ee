//! `meshtest`: the workload the testbed runs inside pods.
//!
//! ```text
//! meshtest serve [IP:]PORT NAME     HTTP server; the body names the pod and the peer it saw;
//!                                   GET /stats answers `requests=N` (requests served before)
//! meshtest sink PORT                reads each connection to its end and counts; a connection
//!                                   that sends just `?` gets `conns=N bytes=M` back (the
//!                                   connections and bytes received before it)
//! meshtest blast ADDR BYTES COUNT   COUNT connections that each write BYTES and close at once
//! meshtest echo PORT                echoes every byte back on each connection
//! meshtest stream ADDR SECS         one long-lived connection to an echo server: a line every
//!                                   100 ms, each echo checked; prints `echoed=N`
//! meshtest get ADDR [PATH [NAME:VALUE]...]  one GET (with those headers); prints status,
//!                                   getpeername(), `header.NAME=VALUE` per response header
//!                                   and, after a blank line, the body
//! meshtest churn ADDR COUNT [MS]    COUNT sequential short connections, each a full GET (MS
//!                                   apart)
//! meshtest loop ADDR INTERVAL_MS    GET forever (demo clients); prints one line per request
//! meshtest load ADDR RATE CONNS SECS open-loop HTTP/1.1 keep-alive load at RATE req/s over
//!                                   CONNS connections; latency measured from each request's
//!                                   scheduled time (no coordinated omission); a connection
//!                                   the server closes (`Connection: close`) is replaced; prints
//!                                   one line `count= errors= closed= p50_us= p90_us= p99_us=
//!                                   p999_us= max_us= rate=`
//! meshtest hold ADDR N SECS         opens N idle connections and holds them for SECS
//! meshtest udp-listen PORT WAIT_MS  counts datagrams received until WAIT_MS of silence
//! meshtest udp-send FROM TO COUNT   sends COUNT datagrams from address FROM to TO
//! meshtest banner PORT TEXT         server-speaks-first TCP: writes `TEXT\n` on accept, then
//!                                   echoes until EOF
//! meshtest read-banner ADDR         reads the first line (10 s timeout); prints `banner=`, `ms=`
//!                                   (from connected to line received)
//! meshtest raw ADDR TEXT|@FILE      writes TEXT (`\r`, `\n`, `\t`, `\\` unescaped) or FILE's
//!                                   bytes, reads until EOF or 10 s; prints `status=` (code of
//!                                   the first line, or `none`), `closed=` (peer closed or reset
//!                                   it), `bytes=` (received)
//! meshtest trickle ADDR SECS        writes `GET / HTTP/1.1\r\nx-trickle: aaa...` one byte a
//!                                   second for SECS s or until the peer closes; prints
//!                                   `closed_after_ms=` (or `none`), `sent=`
//! ```
//!
//! `digest-server`, `digest` and `reset`: bulk transfers checked by SHA-256 (see `digest.rs`).
//!
//! HTTP/1.1 and HTTP/2 (hyper on a 2-thread tokio runtime; ADDR is `IP:PORT`). The counting
//! clients print `ok=` (2xx), `errors=` (other statuses and transport errors), `connects=`,
//! `from.NAME=` (bodies starting `hello from NAME`), `status.CODE=` (non-200 only, every code for
//! `status`) and `grpc_status.N=` (from trailers, or headers for trailers-only), sorted; on a
//! transport error they print the counts so far, then fail.
//!
//! ```text
//! meshtest http [IP:]PORT NAME      HTTP/1.1 and h2c (prior knowledge) on one port; by path:
//!     /status/N                     status N, body `NAME`
//!     /flaky/P                      503 for exactly P% of the requests to /flaky (evenly
//!                                   spread), else 200 `hello from NAME`
//!     /grpc/N                       gRPC: one message (`NAME`), trailers `grpc-status: N`
//!                                   (and `grpc-message: test` if N != 0)
//!     /grpc-trailers-only/N         gRPC trailers-only: `grpc-status: N` header, empty body
//!     /upload                       streams the body; answers `sha256=` and `bytes=`
//!     /chunks/N/MS                  N chunks `chunk I`, MS ms apart, streamed
//!     /slow/MS                      waits MS ms, then answers like `/`
//!     /headers                      the request headers as `name: value`, then `version=`
//!     /stats                        `requests=N` (requests served before)
//!     `upgrade: websocket` (any)    101, then echoes the upgraded connection until EOF
//!     anything else                 `hello from NAME`, `path=`, `client=` (as `serve`), `proto=`
//!   options after NAME: `delay=MS` (every answer but /stats waits MS first), `fail=P` (P% of
//!   them, evenly spread, are 503 `NAME failed`)
//! meshtest h1-many ADDR PATH COUNT  COUNT sequential GETs on one keep-alive connection; counts
//! meshtest h2-many ADDR PATH STREAMS  STREAMS concurrent GETs on one h2c connection; counts
//! meshtest status ADDR PATHS COUNT  like h1-many, PATHS comma-separated and used round-robin;
//!                                   prints `status.CODE=` for every code
//! meshtest upload ADDR BYTES        POST /upload, a streamed deterministic body; prints
//!                                   `server.sha256=`, `server.bytes=`, `local.sha256=`,
//!                                   `local.bytes=`; fails if they differ
//! meshtest chunks ADDR N MS         GET /chunks/N/MS; prints `first_ms=` (request sent to the
//!                                   first body bytes), `total_ms=`, `chunks=`
//! meshtest ws ADDR BYTES            websocket-style upgrade of GET /, then writes BYTES while
//!                                   checking the echo; prints `status=101`, `echoed=`
//! meshtest syn ADDR MS               one connection attempt with a timeout of MS; prints
//!                                   `connected`, `refused` or `timeout` (a dropped SYN)
//! meshtest matrix ADDR METHOD:PATH... one request each (a connection each); prints
//!                                   `METHOD PATH STATUS WHO` per request, WHO the server's
//!                                   name (`hello from NAME`) or the `l5d-proxy-error` header
//! ```
//!
//! The Gateway API mesh conformance suite's echo app (see `echo.rs`):
//!
//! ```text
//! meshtest echo-server NAME         HTTP/1.1 + h2c on 8080 and gRPC on 7070, answering what
//!                                   they received as `Key=Value` lines, `Hostname=NAME`
//! meshtest echo-client URL [--method=M] [-H NAME:VALUE]... [--count=N]
//!                                   http://HOST[:PORT]/PATH or grpc://HOST:PORT; HOST resolved
//!                                   as the pod resolves names; prints the echo client's blocks
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use mesh_agent_tests::http;

mod digest;
mod echo;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port, name] => serve(port, name),
        ["sink", port] => sink(port),
        ["blast", addr, bytes, count] => blast(addr, bytes, count),
        ["echo", port] => echo(port),
        ["stream", addr, secs] => stream(addr, secs),
        ["get", addr] => get(addr, "/", &[]),
        ["get", addr, path, headers @ ..] => get(addr, path, headers),
        ["churn", addr, count] => churn(addr, count, "0"),
        ["churn", addr, count, interval] => churn(addr, count, interval),
        ["loop", addr, interval] => run_loop(addr, interval),
        ["load", addr, rate, conns, secs] => load(addr, rate, conns, secs),
        ["hold", addr, n, secs] => hold(addr, n, secs),
        ["udp-listen", port, wait] => udp_listen(port, wait),
        ["udp-send", from, to, count] => udp_send(from, to, count),
        ["banner", port, text] => banner(port, text),
        ["read-banner", addr] => read_banner(addr),
        ["raw", addr, what] => raw(addr, what),
        ["trickle", addr, secs] => trickle(addr, secs),
        ["http", port, name, options @ ..] => l7::serve(port, name, options),
        ["h1-many", addr, path, count] => l7::h1_many(addr, path, count),
        ["h2-many", addr, path, streams] => l7::h2_many(addr, path, streams),
        ["status", addr, paths, count] => l7::status(addr, paths, count),
        ["upload", addr, bytes] => l7::upload(addr, bytes),
        ["chunks", addr, n, ms] => l7::chunks(addr, n, ms),
        ["ws", addr, bytes] => l7::ws(addr, bytes),
        ["matrix", addr, requests @ ..] => matrix(addr, requests),
        ["syn", addr, ms] => syn(addr, ms),
        ["echo-server", name] => echo::server(name),
        ["digest-server", port] => digest::server(port),
        ["digest", addr, up, down] => digest::client(addr, up, down, "1", "poll"),
        ["digest", addr, up, down, conns] => digest::client(addr, up, down, conns, "poll"),
        ["digest", addr, up, down, conns, reads] => digest::client(addr, up, down, conns, reads),
        ["reset", addr, bytes] => digest::reset(addr, bytes),
        ["apiserver", listen, node, pods, services, endpoints] => {
            apiserver(listen, node, pods, services, endpoints)
        }
        ["echo-client", args @ ..] => echo::client(args),
        _ => Err("usage: see `meshtest` source header".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshtest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| format!("{what} {s:?}: {e}"))
}

/// `PORT` (on `[::]`) or `IP:PORT`: where the servers listen.
fn listen_addr(port: &str) -> Result<SocketAddr, String> {
    // `[::]` takes IPv4 too (as IPv4-mapped addresses), and IPv6 where the pod has it.
    match port.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))),
        Err(_) => parse("address", port),
    }
}

fn serve(port: &str, name: &str) -> Result<(), String> {
    let addr = listen_addr(port)?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = answer(stream, &name);
        });
    }
    Ok(())
}

static SERVED: AtomicU64 = AtomicU64::new(0);
/// Requests to `/flaky/P` so far.
static FLAKY: AtomicU64 = AtomicU64::new(0);
/// Requests a `fail=P` server has considered failing so far.
static FAILED: AtomicU64 = AtomicU64::new(0);

fn sink(port: &str) -> Result<(), String> {
    static CONNS: AtomicU64 = AtomicU64::new(0);
    static BYTES: AtomicU64 = AtomicU64::new(0);
    let listener = listen(port)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut got = Vec::new();
            if std::io::Read::read_to_end(&mut stream, &mut got).is_err() {
                return;
            }
            if got == b"?" {
                let _ = write!(
                    stream,
                    "conns={} bytes={}",
                    CONNS.load(Ordering::SeqCst),
                    BYTES.load(Ordering::SeqCst)
                );
            } else {
                BYTES.fetch_add(got.len() as u64, Ordering::SeqCst);
                CONNS.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    Ok(())
}

fn blast(addr: &str, bytes: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let bytes: usize = parse("bytes", bytes)?;
    let count: usize = parse("count", count)?;
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    for i in 0..count {
        let mut conn =
            TcpStream::connect(addr).map_err(|e| format!("connection {i}: connect {addr}: {e}"))?;
        conn.write_all(&payload)
            .map_err(|e| format!("connection {i}: write: {e}"))?;
        // Dropped here: closed at once, before anyone has necessarily accepted it.
    }
    println!("sent={count}");
    Ok(())
}

/// A listener on 0.0.0.0:`port`.
fn listen(port: &str) -> Result<TcpListener, String> {
    let port: u16 = parse("port", port)?;
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind :{port}: {e}"))
}

fn echo(port: &str) -> Result<(), String> {
    let listener = listen(port)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let Ok(mut reader) = stream.try_clone() else {
                return;
            };
            let _ = std::io::copy(&mut reader, &mut stream);
        });
    }
    Ok(())
}

fn stream(addr: &str, secs: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let secs: u64 = parse("seconds", secs)?;
    let mut conn = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while std::time::Instant::now() < end {
        let line = format!("line {n}\n");
        conn.write_all(line.as_bytes())
            .map_err(|e| format!("write {n}: {e}"))?;
        let mut back = String::new();
        reader
            .read_line(&mut back)
            .map_err(|e| format!("read {n}: {e}"))?;
        if back != line {
            return Err(format!("echo {n}: sent {line:?}, got {back:?}"));
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("echoed={n}");
    Ok(())
}

fn answer(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    // An IPv4 client on the dual-stack socket shows as itself, not as ::ffff:a.b.c.d.
    let peer = stream.peer_addr()?;
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let body = if path == "/stats" {
        format!("requests={}\n", SERVED.load(Ordering::SeqCst))
    } else {
        SERVED.fetch_add(1, Ordering::SeqCst);
        format!("hello from {name}\npath={path}\nclient={peer}\n")
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn get(addr: &str, path: &str, headers: &[&str]) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let extra = headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .ok_or(format!("header {h:?} is not NAME:VALUE"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let r = http::get_with(addr, path, &extra).map_err(|e| format!("GET {addr}{path}: {e}"))?;
    let head: String = r
        .headers
        .iter()
        .map(|(k, v)| format!("header.{k}={v}\n"))
        .collect();
    print!("status={}\npeer={}\n{head}\n{}", r.status, r.peer, r.body);
    Ok(())
}

fn syn(addr: &str, ms: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let limit = Duration::from_millis(parse("milliseconds", ms)?);
    let outcome = match TcpStream::connect_timeout(&addr, limit) {
        Ok(_) => "connected",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
        // EPERM: a program in the kernel refused the connect() itself.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => "denied",
        Err(e) => return Err(format!("connect {addr}: {e}")),
    };
    println!("{outcome}");
    Ok(())
}

fn matrix(addr: &str, requests: &[&str]) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    for r in requests {
        let (method, path) = r
            .split_once(':')
            .ok_or(format!("{r:?} is not METHOD:PATH"))?;
        let who = match http::request(addr, method, path, &[]) {
            Ok(resp) => {
                let server = resp
                    .body
                    .lines()
                    .find_map(|l| l.strip_prefix("hello from "))
                    .map(str::to_owned);
                let error = resp
                    .headers
                    .iter()
                    .find(|(k, _)| k == "l5d-proxy-error")
                    .map(|(_, v)| v.clone());
                format!(
                    "{} {}",
                    resp.status,
                    server.or(error).unwrap_or_else(|| "-".into())
                )
            }
            Err(e) => format!("error {}", e.kind()),
        };
        println!("{method} {path} {who}");
    }
    Ok(())
}

fn churn(addr: &str, count: &str, interval: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let count: usize = parse("count", count)?;
    let interval = Duration::from_millis(parse("interval", interval)?);
    for i in 0..count {
        std::thread::sleep(interval);
        let r = http::get(addr, "/churn").map_err(|e| format!("connection {i}: {e}"))?;
        if r.status != 200 {
            return Err(format!("connection {i}: status {}", r.status));
        }
    }
    println!("ok={count}");
    Ok(())
}

fn run_loop(addr: &str, interval: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let interval = Duration::from_millis(parse("interval", interval)?);
    loop {
        match http::get(addr, "/") {
            Ok(r) => println!("{} {}", r.status, r.body.lines().next().unwrap_or("")),
            Err(e) => println!("error {e}"),
        }
        std::thread::sleep(interval);
    }
}

fn udp_listen(port: &str, wait: &str) -> Result<(), String> {
    let port: u16 = parse("port", port)?;
    let wait = Duration::from_millis(parse("wait", wait)?);
    let sock = UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
        .map_err(|e| format!("bind :{port}: {e}"))?;
    sock.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    // Tell whoever started us that we are listening.
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let mut received = 0;
    while sock.recv_from(&mut buf).is_ok() {
        received += 1;
    }
    println!("received={received}");
    Ok(())
}

fn udp_send(from: &str, to: &str, count: &str) -> Result<(), String> {
    let from = SocketAddr::new(parse::<std::net::IpAddr>("from", from)?, 0);
    let to: SocketAddr = parse("to", to)?;
    let count: usize = parse("count", count)?;
    let sock = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    for i in 0..count {
        sock.send_to(format!("datagram {i}").as_bytes(), to)
            .map_err(|e| format!("send to {to}: {e}"))?;
    }
    println!("sent={count}");
    Ok(())
}

/// One keep-alive request/response on `conn`; reads exactly the response (Content-Length).
/// One GET on a keep-alive connection. Whether the server asked to close it
/// (`Connection: close`): a client then opens a new one for its next request, as HTTP says.
fn keepalive_get(conn: &mut BufReader<TcpStream>, request: &[u8]) -> std::io::Result<bool> {
    conn.get_mut().write_all(request)?;
    let mut length = None;
    let mut close = false;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
            if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let mut body = vec![0u8; length.ok_or(std::io::ErrorKind::InvalidData)?];
    std::io::Read::read_exact(conn, &mut body)?;
    Ok(close)
}

fn load(addr: &str, rate: &str, conns: &str, secs: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let rate: f64 = parse("rate", rate)?;
    let conns: usize = parse("connections", conns)?;
    let secs: f64 = parse("seconds", secs)?;
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
    let start = std::time::Instant::now() + Duration::from_millis(100);
    let total = (rate * secs) as u64;
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let mut threads = Vec::new();
    for c in 0..conns {
        let request = request.clone();
        threads.push(std::thread::spawn(
            move || -> Result<(Vec<u32>, u64, u64), String> {
                let stream =
                    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                let _ = stream.set_nodelay(true);
                let mut conn = BufReader::new(stream);
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut closed = 0;
                // This connection's share of the schedule: requests c, c+conns, c+2*conns, ...
                let offset = Duration::from_secs_f64(c as f64 / rate);
                let mut k = 0u64;
                while k * conns as u64 + (c as u64) < total {
                    let due = start + offset + interval * k as u32;
                    let now = std::time::Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    match keepalive_get(&mut conn, &request) {
                        Ok(close) => {
                            latencies.push(due.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            if close {
                                closed += 1;
                                let stream = TcpStream::connect(addr)
                                    .map_err(|e| format!("reconnect: {e}"))?;
                                let _ = stream.set_nodelay(true);
                                conn = BufReader::new(stream);
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            let stream =
                                TcpStream::connect(addr).map_err(|e| format!("reconnect: {e}"))?;
                            let _ = stream.set_nodelay(true);
                            conn = BufReader::new(stream);
                        }
                    }
                    k += 1;
                }
                Ok((latencies, errors, closed))
            },
        ));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut closed = 0;
    for t in threads {
        let (l, e, c) = t.join().map_err(|_| "load thread panicked".to_owned())??;
        all.extend(l);
        errors += e;
        closed += c;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            return 0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i]
    };
    println!(
        "count={} errors={errors} closed={closed} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} rate={:.1}",
        all.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        all.last().copied().unwrap_or(0),
        all.len() as f64 / elapsed
    );
    Ok(())
}

fn hold(addr: &str, n: &str, secs: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let n: usize = parse("count", n)?;
    let secs: u64 = parse("seconds", secs)?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(TcpStream::connect(addr).map_err(|e| format!("connection {i}: {e}"))?);
    }
    println!("holding={n}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(secs));
    drop(held);
    Ok(())
}

fn banner(port: &str, text: &str) -> Result<(), String> {
    let addr = listen_addr(port)?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let line = format!("{text}\n");
        std::thread::spawn(move || -> std::io::Result<u64> {
            stream.write_all(line.as_bytes())?;
            let mut reader = stream.try_clone()?;
            std::io::copy(&mut reader, &mut stream)
        });
    }
    Ok(())
}

/// How long the raw-socket clients wait for the peer.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

fn read_banner(addr: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let conn = TcpStream::connect_timeout(&addr, RAW_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let connected = Instant::now();
    conn.set_read_timeout(Some(RAW_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("reading the banner: {e}"))?;
    let elapsed = connected.elapsed();
    if !line.ends_with('\n') {
        return Err(format!("connection closed before a full line: {line:?}"));
    }
    if elapsed > RAW_TIMEOUT {
        return Err(format!("banner took {} ms", elapsed.as_millis()));
    }
    println!("banner={}", line.trim_end_matches(['\r', '\n']));
    println!("ms={}", elapsed.as_millis());
    Ok(())
}

/// `\r`, `\n`, `\t` and `\\` in `s` as the characters they stand for; other text as is.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => out.extend(['\\', other]),
            None => out.push('\\'),
        }
    }
    out
}

/// Whether a read error means the peer is gone (rather than a timeout).
fn peer_gone(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn raw(addr: &str, what: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let payload = match what.strip_prefix('@') {
        Some(path) => std::fs::read(path).map_err(|e| format!("read {path}: {e}"))?,
        None => unescape(what).into_bytes(),
    };
    let mut conn = TcpStream::connect_timeout(&addr, RAW_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    if let Err(e) = conn.write_all(&payload) {
        // A server that rejects the request may close before taking all of it: its answer
        // is what matters.
        eprintln!("meshtest: write: {e}; reading the answer anyway");
    }
    let deadline = Instant::now() + RAW_TIMEOUT;
    let mut received = Vec::new();
    let mut closed = false;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        conn.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match conn.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                closed = peer_gone(&e);
                break;
            }
        }
    }
    let first_line = received.split(|&b| b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(first_line)
        .ok()
        .and_then(|line| {
            let mut words = line.split_whitespace();
            let version = words.next()?;
            let code = words.next()?;
            (version.starts_with("HTTP/") && code.parse::<u16>().is_ok()).then_some(code)
        })
        .unwrap_or("none");
    println!("status={status}");
    println!("closed={closed}");
    println!("bytes={}", received.len());
    Ok(())
}

fn trickle(addr: &str, secs: &str) -> Result<(), String> {
    /// What is trickled: an unfinished request head, then `a` for as long as it takes.
    const HEAD: &[u8] = b"GET / HTTP/1.1\r\nx-trickle: ";
    let addr: SocketAddr = parse("address", addr)?;
    let secs: u64 = parse("seconds", secs)?;
    let mut conn = TcpStream::connect_timeout(&addr, RAW_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let start = Instant::now();
    let mut sent = 0usize;
    let mut closed_after = None;
    let mut buf = [0u8; 4096];
    'seconds: for s in 1..=secs {
        let byte = HEAD.get(sent).copied().unwrap_or(b'a');
        if conn.write_all(&[byte]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        sent += 1;
        // Wait for the next second, watching for the peer closing meanwhile.
        let next = start + Duration::from_secs(s);
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            conn.set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match conn.read(&mut buf) {
                // An error response (e.g. 408) before the close: keep reading.
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if !peer_gone(&e) => break,
                Ok(_) | Err(_) => {
                    closed_after = Some(start.elapsed());
                    break 'seconds;
                }
            }
        }
    }
    match closed_after {
        Some(d) => println!("closed_after_ms={}", d.as_millis()),
        None => println!("closed_after_ms=none"),
    }
    println!("sent={sent}");
    Ok(())
}

/// The HTTP/1.1 and HTTP/2 subcommands: hyper on a tokio runtime of their own.
mod l7 {
    use std::{
        collections::BTreeMap,
        convert::Infallible,
        fmt::Write as _,
        future::Future,
        net::SocketAddr,
        pin::Pin,
        sync::{atomic::Ordering, Arc},
        task::{Context, Poll},
        time::{Duration, Instant},
    };

    use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
    use hyper::{
        body::{Body, Bytes, Frame, Incoming},
        client::conn::{http1, http2},
        header::{self, HeaderValue},
        HeaderMap, Request, Response, StatusCode,
    };
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
    };
    use ring::digest;
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };

    use super::{listen_addr, parse, FAILED, FLAKY, SERVED};

    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Limit on one request/response exchange of the counting clients, and on each read of
    /// the `ws` echo.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Size of the chunks `upload` and `ws` write.
    const CHUNK: usize = 64 * 1024;

    /// Runs `f` on a fresh 2-thread runtime.
    pub(crate) fn block_on(f: impl Future<Output = Result<(), String>>) -> Result<(), String> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?
            .block_on(f)
    }

    /// `f`, failing if it takes longer than [`REQUEST_TIMEOUT`].
    async fn within<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, f)
            .await
            .map_err(|_| format!("timed out after {} s", REQUEST_TIMEOUT.as_secs()))?
    }

    /// Bytes `offset..offset + len` of the deterministic test stream: byte `i` is
    /// `(7 i + i / 65536) mod 251`.
    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64)
            .map(|i| ((i * 7 + i / 65536) % 251) as u8)
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// A body fed frame by frame through a channel; it ends when the sender is dropped. Data
    /// produced on the fly (with backpressure: the channel is bounded), and trailers.
    pub(crate) struct Frames(mpsc::Receiver<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|frame| frame.map(Ok))
        }
    }

    pub(crate) fn frames(capacity: usize) -> (mpsc::Sender<Frame<Bytes>>, Frames) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Frames(rx))
    }

    // ---------------------------------------------------------------------------------------
    // Server

    type ResBody = BoxBody<Bytes, Infallible>;

    /// How a server misbehaves on purpose (`delay=MS`, `fail=P`).
    #[derive(Clone, Copy, Default)]
    struct Quirks {
        delay: Duration,
        fail_percent: u64,
    }

    pub fn serve(port: &str, name: &str, options: &[&str]) -> Result<(), String> {
        let addr = listen_addr(port)?;
        let name: Arc<str> = Arc::from(name);
        let mut quirks = Quirks::default();
        for option in options {
            match option.split_once('=') {
                Some(("delay", ms)) => quirks.delay = Duration::from_millis(parse("delay", ms)?),
                Some(("fail", p)) => quirks.fail_percent = parse("fail", p)?,
                _ => return Err(format!("{option}: not delay=MS or fail=P")),
            }
        }
        block_on(async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("bind {addr}: {e}"))?;
            // HTTP/1.1 (keep-alive, upgrades) and h2c with prior knowledge, told apart by the
            // HTTP/2 preface.
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // An IPv4 client on the dual-stack socket shows as itself, not as ::ffff:a.b.c.d.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let (builder, name) = (builder.clone(), name.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(handle(req, &name, peer, quirks).await) }
                    });
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }

    async fn handle(
        req: Request<Incoming>,
        name: &str,
        peer: SocketAddr,
        quirks: Quirks,
    ) -> Response<ResBody> {
        if req.uri().path() != "/stats" {
            if !quirks.delay.is_zero() {
                tokio::time::sleep(quirks.delay).await;
            }
            if quirks.fail_percent > 0 {
                let (n, p) = (FAILED.fetch_add(1, Ordering::SeqCst), quirks.fail_percent);
                if (n + 1) * p / 100 > n * p / 100 {
                    SERVED.fetch_add(1, Ordering::SeqCst);
                    return text(StatusCode::SERVICE_UNAVAILABLE, format!("{name} failed\n"));
                }
            }
        }
        respond(req, name, peer)
            .await
            .unwrap_or_else(|e| text(StatusCode::BAD_REQUEST, format!("error={e}\n")))
    }

    async fn respond(
        mut req: Request<Incoming>,
        name: &str,
        peer: SocketAddr,
    ) -> Result<Response<ResBody>, String> {
        let path = req.uri().path().to_owned();
        if path == "/stats" {
            let served = SERVED.load(Ordering::SeqCst);
            return Ok(text(StatusCode::OK, format!("requests={served}\n")));
        }
        SERVED.fetch_add(1, Ordering::SeqCst);
        if is_websocket(&req) {
            return Ok(upgrade_echo(&mut req));
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        Ok(match segments.as_slice() {
            ["status", code] => {
                let code = StatusCode::from_u16(parse("status", code)?)
                    .map_err(|e| format!("status {code}: {e}"))?;
                text(code, format!("{name}\n"))
            }
            ["flaky", percent] => {
                // The n-th flaky request fails when floor(n * P / 100) steps up: exactly P% of
                // them, evenly spread.
                let p: u64 = parse("percent", percent)?;
                let n = FLAKY.fetch_add(1, Ordering::SeqCst);
                match (n + 1) * p / 100 > n * p / 100 {
                    true => text(StatusCode::SERVICE_UNAVAILABLE, format!("{name} failed\n")),
                    false => text(StatusCode::OK, format!("hello from {name}\n")),
                }
            }
            ["grpc", code] => grpc(name, parse("grpc status", code)?),
            ["grpc-trailers-only", code] => grpc_trailers_only(parse("grpc status", code)?),
            ["upload"] => hash_upload(req.into_body()).await?,
            ["chunks", n, delay] => {
                chunk_stream(parse("chunks", n)?, parse("milliseconds", delay)?)
            }
            ["slow", delay] => {
                let delay = Duration::from_millis(parse("milliseconds", delay)?);
                tokio::time::sleep(delay).await;
                hello(&req, name, peer)
            }
            ["headers"] => headers(&req),
            _ => hello(&req, name, peer),
        })
    }

    /// A `text/plain` response; hyper gives it a content-length.
    fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResBody> {
        with_body(status, "text/plain", Full::new(body.into()).boxed())
    }

    fn with_body(
        status: StatusCode,
        content_type: &'static str,
        body: ResBody,
    ) -> Response<ResBody> {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }

    fn hello(req: &Request<Incoming>, name: &str, peer: SocketAddr) -> Response<ResBody> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let proto = req.version();
        text(
            StatusCode::OK,
            format!("hello from {name}\npath={path}\nclient={peer}\nproto={proto:?}\n"),
        )
    }

    fn headers(req: &Request<Incoming>) -> Response<ResBody> {
        let mut body = String::new();
        for (name, value) in req.headers() {
            let value = String::from_utf8_lossy(value.as_bytes());
            let _ = writeln!(body, "{}: {value}", name.as_str());
        }
        let _ = writeln!(body, "version={:?}", req.version());
        text(StatusCode::OK, body)
    }

    /// One gRPC message frame (uncompressed) carrying `payload`.
    pub(crate) fn grpc_message(payload: &[u8]) -> Bytes {
        let mut message = Vec::with_capacity(5 + payload.len());
        message.push(0);
        message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        message.extend_from_slice(payload);
        message.into()
    }

    fn grpc(name: &str, status: u32) -> Response<ResBody> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(status));
        if status != 0 {
            trailers.insert("grpc-message", HeaderValue::from_static("test"));
        }
        let (tx, body) = frames(2);
        // Room for both: the channel cannot be full.
        let _ = tx.try_send(Frame::data(grpc_message(name.as_bytes())));
        let _ = tx.try_send(Frame::trailers(trailers));
        let mut response = with_body(StatusCode::OK, "application/grpc", body.boxed());
        // HTTP/1.1 sends trailers only if announced (and asked for with `te: trailers`).
        response.headers_mut().insert(
            header::TRAILER,
            HeaderValue::from_static("grpc-status, grpc-message"),
        );
        response
    }

    fn grpc_trailers_only(status: u32) -> Response<ResBody> {
        let mut response = with_body(StatusCode::OK, "application/grpc", Empty::new().boxed());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from(status));
        response
    }

    /// Hashes the body as it streams in.
    async fn hash_upload(mut body: Incoming) -> Result<Response<ResBody>, String> {
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
            if let Some(data) = frame.data_ref() {
                sha.update(data);
                bytes += data.len() as u64;
            }
        }
        let sha = hex(sha.finish().as_ref());
        Ok(text(
            StatusCode::OK,
            format!("sha256={sha}\nbytes={bytes}\n"),
        ))
    }

    fn chunk_stream(n: u64, delay: u64) -> Response<ResBody> {
        let (tx, body) = frames(1);
        tokio::spawn(async move {
            for i in 0..n {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if tx
                    .send(Frame::data(format!("chunk {i}\n").into()))
                    .await
                    .is_err()
                {
                    break; // The client went away.
                }
            }
        });
        with_body(StatusCode::OK, "text/plain", body.boxed())
    }

    fn is_websocket<B>(req: &Request<B>) -> bool {
        req.headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    }

    /// 101, then an echo of the upgraded connection.
    fn upgrade_echo(req: &mut Request<Incoming>) -> Response<ResBody> {
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let _ = echo(TokioIo::new(upgraded)).await;
            }
        });
        let mut response = Response::new(Empty::new().boxed());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        response
    }

    /// Writes back everything read until EOF, then shuts the write side.
    async fn echo(mut io: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                return io.shutdown().await;
            }
            io.write_all(&buf[..n]).await?;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Clients

    async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect {addr}: timed out"))?
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    /// One HTTP/1.1 connection to `addr` (upgrades allowed), driven by a task of its own.
    async fn h1<B>(addr: SocketAddr) -> Result<http1::SendRequest<B>, String>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (sender, conn) = http1::handshake(connect(addr).await?)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// `request` on an HTTP/1.1 connection, once it is ready for one.
    async fn h1_send<B>(
        sender: &mut http1::SendRequest<B>,
        request: Request<B>,
    ) -> Result<Response<Incoming>, String>
    where
        B: Body + 'static,
    {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))
    }

    /// An HTTP/1.1 GET of `path` with `Host: host`.
    fn h1_get(host: &str, path: &str) -> Result<Request<Empty<Bytes>>, String> {
        Request::get(path)
            .header(header::HOST, host)
            .body(Empty::new())
            .map_err(|e| format!("GET {path}: {e}"))
    }

    /// A response read to its end.
    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
        /// From the request sent to the response's end.
        latency: Duration,
    }

    impl Reply {
        async fn read(response: Response<Incoming>) -> Result<Self, String> {
            let (parts, body) = response.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| format!("response body: {e}"))?;
            let trailers = collected.trailers().cloned();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
                latency: Duration::ZERO,
            })
        }

        /// `NAME` of a body starting with `hello from NAME`.
        fn hello_from(&self) -> Option<&str> {
            let first_line = self.body.split(|&b| b == b'\n').next()?;
            std::str::from_utf8(first_line)
                .ok()?
                .strip_prefix("hello from ")
        }

        /// `grpc-status`, from the trailers or else (trailers-only) the headers.
        fn grpc_status(&self) -> Option<String> {
            let value = self
                .trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| self.headers.get("grpc-status"))?;
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
    }

    /// What the counting clients count.
    #[derive(Default)]
    struct Tally {
        connects: u64,
        ok: u64,
        errors: u64,
        from: BTreeMap<String, u64>,
        status: BTreeMap<u16, u64>,
        grpc_status: BTreeMap<String, u64>,
        /// Replies that took a second or more, and the quickest and slowest.
        slow: u64,
        min_ms: Option<u128>,
        max_ms: u128,
    }

    impl Tally {
        fn record(&mut self, reply: &Reply) {
            let ms = reply.latency.as_millis();
            if reply.latency >= Duration::from_secs(1) {
                self.slow += 1;
            }
            self.min_ms = Some(self.min_ms.map_or(ms, |m| m.min(ms)));
            self.max_ms = self.max_ms.max(ms);
            if reply.status.is_success() {
                self.ok += 1;
            } else {
                self.errors += 1;
            }
            *self.status.entry(reply.status.as_u16()).or_default() += 1;
            if let Some(name) = reply.hello_from() {
                *self.from.entry(name.to_owned()).or_default() += 1;
            }
            if let Some(code) = reply.grpc_status() {
                *self.grpc_status.entry(code).or_default() += 1;
            }
        }

        /// Prints the counts; `status.200=` only if `all_statuses`.
        fn print(&self, all_statuses: bool) {
            println!("ok={}", self.ok);
            println!("errors={}", self.errors);
            println!("connects={}", self.connects);
            println!("slow={}", self.slow);
            println!("min_ms={}", self.min_ms.unwrap_or(0));
            println!("max_ms={}", self.max_ms);
            for (name, n) in &self.from {
                println!("from.{name}={n}");
            }
            for (code, n) in &self.status {
                if all_statuses || *code != 200 {
                    println!("status.{code}={n}");
                }
            }
            for (code, n) in &self.grpc_status {
                println!("grpc_status.{code}={n}");
            }
        }
    }

    /// `count` sequential GETs over one HTTP/1.1 keep-alive connection, `paths` round-robin;
    /// stops at the first transport error.
    async fn sequential(
        addr: SocketAddr,
        host: &str,
        paths: &[&str],
        count: usize,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let mut sender = h1(addr).await.inspect_err(|_| tally.errors += 1)?;
        tally.connects += 1;
        for (i, path) in paths.iter().cycle().take(count).enumerate() {
            let request = h1_get(host, path)?;
            let sent = Instant::now();
            let reply = within(async {
                let mut reply = Reply::read(h1_send(&mut sender, request).await?).await?;
                reply.latency = sent.elapsed();
                Ok(reply)
            });
            match reply.await {
                Ok(reply) => tally.record(&reply),
                Err(e) => {
                    tally.errors += 1;
                    return Err(format!("request {i} (GET {path}): {e}"));
                }
            }
        }
        Ok(())
    }

    /// [`sequential`], then the counts, whatever happened.
    fn counted(addr: &str, paths: &[&str], count: &str, all_statuses: bool) -> Result<(), String> {
        let target: SocketAddr = parse("address", addr)?;
        let count: usize = parse("count", count)?;
        block_on(async move {
            let mut tally = Tally::default();
            let result = sequential(target, addr, paths, count, &mut tally).await;
            tally.print(all_statuses);
            result
        })
    }

    pub fn h1_many(addr: &str, path: &str, count: &str) -> Result<(), String> {
        counted(addr, &[path], count, false)
    }

    pub fn status(addr: &str, paths: &str, count: &str) -> Result<(), String> {
        let paths: Vec<&str> = paths.split(',').collect();
        counted(addr, &paths, count, true)
    }

    pub fn h2_many(addr: &str, path: &str, streams: &str) -> Result<(), String> {
        let target: SocketAddr = parse("address", addr)?;
        let streams: usize = parse("streams", streams)?;
        let uri = format!("http://{addr}{path}");
        block_on(async move {
            let mut tally = Tally::default();
            let result = concurrent(target, &uri, streams, &mut tally).await;
            tally.print(false);
            result
        })
    }

    /// `streams` concurrent GETs of `uri` over one h2c connection; every stream is started
    /// before any answer is awaited. Reports the first transport error.
    async fn concurrent(
        addr: SocketAddr,
        uri: &str,
        streams: usize,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let handshake = async {
            http2::handshake(TokioExecutor::new(), connect(addr).await?)
                .await
                .map_err(|e| format!("h2c handshake with {addr}: {e}"))
        };
        let (sender, conn) = handshake.await.inspect_err(|_| tally.errors += 1)?;
        tally.connects += 1;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut tasks = Vec::with_capacity(streams);
        // Paths of the gRPC routes are asked as gRPC clients do.
        let grpc = uri.contains("/grpc");
        for _ in 0..streams {
            let mut request = Request::get(uri);
            if grpc {
                request = request
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("GET {uri}: {e}"))?;
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(within(async move {
                let sent = Instant::now();
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                let mut reply = Reply::read(response).await?;
                reply.latency = sent.elapsed();
                Ok(reply)
            })));
        }
        let mut first_error = None;
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(reply) => tally.record(&reply),
                Err(e) => {
                    tally.errors += 1;
                    first_error.get_or_insert(format!("stream {i}: {e}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn upload(addr: &str, bytes: &str) -> Result<(), String> {
        let target: SocketAddr = parse("address", addr)?;
        let total: u64 = parse("bytes", bytes)?;
        block_on(async move {
            let mut sender = h1(target).await?;
            // The body is made, and hashed, a chunk at a time as hyper takes it.
            let (tx, body) = frames(4);
            let producer = tokio::spawn(async move {
                let mut sha = digest::Context::new(&digest::SHA256);
                let mut offset = 0u64;
                while offset < total {
                    let len = (total - offset).min(CHUNK as u64) as usize;
                    let chunk = pattern(offset, len);
                    sha.update(&chunk);
                    if tx.send(Frame::data(chunk.into())).await.is_err() {
                        return Err(format!("the body was dropped after {offset} bytes"));
                    }
                    offset += len as u64;
                }
                Ok((hex(sha.finish().as_ref()), offset))
            });
            let request = Request::post("/upload")
                .header(header::HOST, addr)
                .body(body)
                .map_err(|e| format!("POST /upload: {e}"))?;
            let reply = Reply::read(h1_send(&mut sender, request).await?).await?;
            let (local_sha, local_bytes) = producer.await.map_err(|e| e.to_string())??;
            let answer = String::from_utf8_lossy(&reply.body);
            for line in answer.lines() {
                println!("server.{line}");
            }
            println!("local.sha256={local_sha}");
            println!("local.bytes={local_bytes}");
            if reply.status != StatusCode::OK {
                return Err(format!("status {}", reply.status));
            }
            let field = |key: &str| answer.lines().find_map(|l| l.strip_prefix(key));
            if field("sha256=") != Some(&local_sha)
                || field("bytes=") != Some(&local_bytes.to_string())
            {
                return Err("the server saw something else than was sent".to_owned());
            }
            Ok(())
        })
    }

    pub fn chunks(addr: &str, n: &str, delay: &str) -> Result<(), String> {
        let target: SocketAddr = parse("address", addr)?;
        let n: u64 = parse("chunks", n)?;
        let delay: u64 = parse("milliseconds", delay)?;
        block_on(async move {
            let mut sender = h1(target).await?;
            let request = h1_get(addr, &format!("/chunks/{n}/{delay}"))?;
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let start = Instant::now();
            let response = h1_send(&mut sender, request).await?;
            if !response.status().is_success() {
                return Err(format!("status {}", response.status()));
            }
            let mut body = response.into_body();
            let mut first = None;
            let mut received = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("response body: {e}"))?;
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    first.get_or_insert_with(|| start.elapsed());
                    received.extend_from_slice(data);
                }
            }
            let total = start.elapsed();
            let count = received
                .split(|&b| b == b'\n')
                .filter(|line| line.starts_with(b"chunk "))
                .count();
            match first {
                Some(first) => println!("first_ms={}", first.as_millis()),
                None => println!("first_ms=none"),
            }
            println!("total_ms={}", total.as_millis());
            println!("chunks={count}");
            Ok(())
        })
    }

    pub fn ws(addr: &str, bytes: &str) -> Result<(), String> {
        let target: SocketAddr = parse("address", addr)?;
        let total: u64 = parse("bytes", bytes)?;
        block_on(async move {
            let mut sender = h1(target).await?;
            let request = Request::get("/")
                .header(header::HOST, addr)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("GET /: {e}"))?;
            let response = within(h1_send(&mut sender, request)).await?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Err(format!("status {}, not 101", response.status()));
            }
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(|e| format!("upgrade: {e}"))?;
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            let write = async {
                let mut offset = 0u64;
                while offset < total {
                    let len = (total - offset).min(CHUNK as u64) as usize;
                    writer
                        .write_all(&pattern(offset, len))
                        .await
                        .map_err(|e| format!("write at {offset}: {e}"))?;
                    offset += len as u64;
                }
                writer
                    .shutdown()
                    .await
                    .map_err(|e| format!("shutdown: {e}"))
            };
            let read = async {
                let mut buf = vec![0u8; CHUNK];
                let mut echoed = 0u64;
                loop {
                    let n = tokio::time::timeout(REQUEST_TIMEOUT, reader.read(&mut buf))
                        .await
                        .map_err(|_| {
                            format!(
                                "no echo for {} s after {echoed} bytes",
                                REQUEST_TIMEOUT.as_secs()
                            )
                        })?
                        .map_err(|e| format!("read at {echoed}: {e}"))?;
                    if n == 0 {
                        return Ok(echoed);
                    }
                    let expected = pattern(echoed, n);
                    if let Some(i) = buf[..n].iter().zip(&expected).position(|(a, b)| a != b) {
                        return Err(format!("echo differs at byte {}", echoed + i as u64));
                    }
                    echoed += n as u64;
                    if echoed > total {
                        return Err(format!("echoed {echoed} bytes, more than the {total} sent"));
                    }
                }
            };
            let ((), echoed) = tokio::try_join!(write, read)?;
            println!("status=101");
            println!("echoed={echoed}");
            if echoed != total {
                return Err(format!("echoed {echoed} of {total} bytes"));
            }
            Ok(())
        })
    }
}

/// The API server double on `listen`, holding a generated cluster; prints its address and
/// serves until killed.
fn apiserver(
    listen: &str,
    node: &str,
    pods: &str,
    services: &str,
    endpoints: &str,
) -> Result<(), String> {
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let api = mesh_agent_tests::apiserver::ApiServer::start(listener).map_err(|e| e.to_string())?;
    api.generate(
        node,
        parse("pods", pods)?,
        parse("services", services)?,
        parse("endpoints", endpoints)?,
    );
    println!("listening {}", api.addr);
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
