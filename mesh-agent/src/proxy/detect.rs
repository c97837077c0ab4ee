//! Protocol detection: what a client speaks, from its first bytes, within a time limit.
//!
//! HTTP/1.x is recognised by a complete request line (`METHOD target HTTP/1.x`), HTTP/2 by the
//! prior-knowledge preface. Anything else (a TLS ClientHello, a database handshake, silence
//! from a server-speaks-first protocol) is opaque TCP, relayed with every byte it sent intact.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    /// The name the source agent tells the destination agent in the HBONE CONNECT.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2c",
            Protocol::Opaque => "opaque",
        }
    }

    pub fn from_header(value: &[u8]) -> Option<Self> {
        match value {
            b"http/1.1" => Some(Protocol::Http1),
            b"h2c" => Some(Protocol::Http2),
            b"opaque" => Some(Protocol::Opaque),
            _ => None,
        }
    }
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not worth waiting for: the connection is opaque (or, if
/// it was HTTP after all, its head would be refused as too large anyway).
const MAX_PEEK: usize = 8 << 10;

/// What `prefix` (everything the client has sent so far) is, or `None` while it could still
/// become either HTTP version.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // `METHOD SP`: a token of letters (methods are case-sensitive, in practice upper case).
    let method_len = prefix
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    match prefix.get(method_len) {
        None if method_len < 20 => return None,
        Some(b' ') if method_len > 0 => {}
        _ => return Some(Protocol::Opaque),
    }
    let Some(end) = prefix.windows(2).position(|w| w == b"\r\n") else {
        // The target may be long; a control byte or an endless line means opaque.
        let sane = prefix
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\r');
        return (!sane || prefix.len() >= MAX_PEEK).then_some(Protocol::Opaque);
    };
    let line = &prefix[..end];
    let http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Some(if http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// Reads from `io` until [`classify`] decides, the client stops sending, or `timeout` passes
/// (then: opaque). Returns the protocol and the bytes read, which the caller must replay.
pub async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf.into()));
        }
        if buf.len() >= MAX_PEEK {
            return Ok((Protocol::Opaque, buf.into()));
        }
        let mut chunk = [0u8; 2048];
        let want = chunk.len().min(MAX_PEEK - buf.len());
        let read = tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await;
        match read {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Opaque, buf.into())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `io` with `prefix` (bytes already read from it) read again first.
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Self { prefix, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

super::forward_async_write!(Prefixed);

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn classifies_by_first_bytes() {
        use Protocol::*;
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"G", None),
            (b"GET / HTTP/1.1", None),
            (b"GET / HTTP/1.1\r\n", Some(Http1)),
            (b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n", Some(Http1)),
            (b"M-SEARCH * HTTP/1.1\r\n", Some(Http1)),
            (b"PRI * HTTP/2", None),
            (H2_PREFACE, Some(Http2)),
            (b"GET / FTP/1.0\r\n", Some(Opaque)),
            (b"\x16\x03\x01\x02\x00", Some(Opaque)),
            (b"get / HTTP/1.1\r\n", Some(Opaque)),
            (b"EHLO example.com\r\n", Some(Opaque)),
            (b"SSH-2.0-OpenSSH\r\n", Some(Opaque)),
            (b"GET /\x00", Some(Opaque)),
            (b"\r\n", Some(Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [b"GET /".as_slice(), &[b'a'; MAX_PEEK]].concat();
        assert_eq!(classify(&long), Some(Opaque));
    }

    #[tokio::test]
    async fn sniffing_keeps_every_byte_and_gives_up_on_silence() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(b"GET / HT").await.unwrap();
        let sniffing = tokio::spawn(async move {
            let got = sniff(&mut server, Duration::from_secs(5)).await.unwrap();
            (got, server)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"TP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let ((proto, prefix), server) = sniffing.await.unwrap();
        assert_eq!(proto, Protocol::Http1);
        let mut replay = Prefixed::new(prefix, server);
        let want = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut head = vec![0u8; want.len()];
        replay.read_exact(&mut head).await.unwrap();
        assert_eq!(head, want);

        // A server-speaks-first client sends nothing: opaque after the timeout, nothing lost.
        let (mut quiet, _peer) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (proto, prefix) = sniff(&mut quiet, Duration::from_millis(50)).await.unwrap();
        assert_eq!((proto, prefix.len()), (Protocol::Opaque, 0));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
