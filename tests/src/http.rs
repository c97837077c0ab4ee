//! A tiny HTTP/1.1 client over std sockets, enough to scrape an agent or fetch a page.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// What `getpeername()` returned on the client socket.
    pub peer: SocketAddr,
    /// The response's header lines, names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

/// `GET path` on `addr` with `Connection: close`; reads the response to EOF.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    get_with(addr, path, &[])
}

/// [`get`] with extra request headers.
pub fn get_with(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> io::Result<Response> {
    request(addr, "GET", path, extra)
}

/// `METHOD path` on `addr` (no body) with `Connection: close`; reads the response to EOF.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let length = match method {
        "GET" | "HEAD" => "",
        _ => "Content-Length: 0\r\n",
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}{length}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line in {head:?}"),
            )
        })?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        body: body.to_owned(),
        peer,
        headers,
    })
}

/// The value of one sample in a Prometheus text exposition, matched by metric name and a
/// set of `label="value"` pairs (all must be present). Sums if several series match.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_str) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_str.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lookup() {
        let text =
            "# HELP x y\nfoo_total{a=\"1\",b=\"2\"} 3\nfoo_total{a=\"1\",b=\"3\"} 4\nbar 7\n";
        assert_eq!(metric_value(text, "foo_total", &[("a", "1")]), Some(7.0));
        assert_eq!(metric_value(text, "foo_total", &[("b", "3")]), Some(4.0));
        assert_eq!(metric_value(text, "bar", &[]), Some(7.0));
        assert_eq!(metric_value(text, "foo_total", &[("a", "2")]), None);
    }
}
