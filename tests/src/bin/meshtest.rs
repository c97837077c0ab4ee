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
//! meshtest get ADDR [PATH]          one GET; prints status, getpeername() and the body
//! meshtest churn ADDR COUNT         COUNT sequential short connections, each a full GET
//! meshtest loop ADDR INTERVAL_MS    GET forever (demo clients); prints one line per request
//! meshtest load ADDR RATE CONNS SECS open-loop HTTP/1.1 keep-alive load at RATE req/s over
//!                                   CONNS connections; latency measured from each request's
//!                                   scheduled time (no coordinated omission); prints one line
//!                                   `count= errors= p50_us= p90_us= p99_us= max_us= rate=`
//! meshtest hold ADDR N SECS         opens N idle connections and holds them for SECS
//! meshtest udp-listen PORT WAIT_MS  counts datagrams received until WAIT_MS of silence
//! meshtest udp-send FROM TO COUNT   sends COUNT datagrams from address FROM to TO
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use mesh_agent_tests::http;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port, name] => serve(port, name),
        ["sink", port] => sink(port),
        ["blast", addr, bytes, count] => blast(addr, bytes, count),
        ["echo", port] => echo(port),
        ["stream", addr, secs] => stream(addr, secs),
        ["get", addr] => get(addr, "/"),
        ["get", addr, path] => get(addr, path),
        ["churn", addr, count] => churn(addr, count),
        ["loop", addr, interval] => run_loop(addr, interval),
        ["load", addr, rate, conns, secs] => load(addr, rate, conns, secs),
        ["hold", addr, n, secs] => hold(addr, n, secs),
        ["udp-listen", port, wait] => udp_listen(port, wait),
        ["udp-send", from, to, count] => udp_send(from, to, count),
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

fn serve(port: &str, name: &str) -> Result<(), String> {
    // `[::]` takes IPv4 too (as IPv4-mapped addresses), and IPv6 where the pod has it.
    let addr: SocketAddr = match port.parse::<u16>() {
        Ok(port) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        Err(_) => parse("address", port)?,
    };
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

fn get(addr: &str, path: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let r = http::get(addr, path).map_err(|e| format!("GET {addr}{path}: {e}"))?;
    print!("status={}\npeer={}\n\n{}", r.status, r.peer, r.body);
    Ok(())
}

fn churn(addr: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let count: usize = parse("count", count)?;
    for i in 0..count {
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
fn keepalive_get(conn: &mut BufReader<TcpStream>, request: &[u8]) -> std::io::Result<()> {
    conn.get_mut().write_all(request)?;
    let mut length = None;
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
        }
    }
    let mut body = vec![0u8; length.ok_or(std::io::ErrorKind::InvalidData)?];
    std::io::Read::read_exact(conn, &mut body)
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
            move || -> Result<(Vec<u32>, u64), String> {
                let stream =
                    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                let _ = stream.set_nodelay(true);
                let mut conn = BufReader::new(stream);
                let mut latencies = Vec::new();
                let mut errors = 0;
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
                        Ok(()) => {
                            latencies.push(due.elapsed().as_micros().min(u32::MAX as u128) as u32)
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
                Ok((latencies, errors))
            },
        ));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().map_err(|_| "load thread panicked".to_owned())??;
        all.extend(l);
        errors += e;
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
        "count={} errors={errors} p50_us={} p90_us={} p99_us={} max_us={} rate={:.1}",
        all.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
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
