//! Bulk transfers checked end to end, both ways at once, with a half-close in the middle:
//!
//! ```text
//! meshtest digest-server PORT        per connection: reads `DOWN n\n`, then at once writes n
//!                                    bytes of the test stream and reads the client's bytes to
//!                                    EOF; after both, writes `sha256=HEX bytes=N\n` of what it
//!                                    read and closes
//! meshtest digest ADDR UP DOWN [CONNS [poll|blocking]]  CONNS connections (default 1) at
//!                                    once, each sending UP bytes then shutting down its write
//!                                    side (half-close) and reading DOWN bytes and the server's
//!                                    line, with plain blocking reads or (`poll`, the default)
//!                                    reads the way event-driven programs make them; prints
//!                                    `conns= up.bytes= up.sha256= down.bytes= down.sha256=`
//!                                    (of the first connection) and fails if any connection's
//!                                    bytes differ either way, or a read fails
//! meshtest reset ADDR BYTES          sends BYTES, then closes with a reset (SO_LINGER 0);
//!                                    prints `sent=`
//! ```
//!
//! The test stream is xorshift64 output seeded by the direction, so a reordered or repeated
//! block changes the digest.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
};

use ring::digest;

use super::{listen_addr, parse};

const UP_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const DOWN_SEED: u64 = 0xd1b5_4a32_d192_ed03;

/// The deterministic stream of a direction, in blocks.
struct Stream {
    state: u64,
    left: u64,
}

impl Stream {
    fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed,
            left: len,
        }
    }

    /// The next block (empty at the end).
    fn next_block(&mut self, block: &mut Vec<u8>) {
        block.clear();
        let n = self.left.min(64 << 10);
        self.left -= n;
        while (block.len() as u64) < n {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            block.extend_from_slice(&self.state.to_le_bytes());
        }
        block.truncate(n as usize);
    }

    fn write_all(mut self, to: &mut impl Write) -> std::io::Result<()> {
        let mut block = Vec::with_capacity(64 << 10);
        loop {
            self.next_block(&mut block);
            if block.is_empty() {
                return Ok(());
            }
            to.write_all(&block)?;
        }
    }

    fn sha256(mut self) -> String {
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut block = Vec::new();
        loop {
            self.next_block(&mut block);
            if block.is_empty() {
                return hex(sha.finish().as_ref());
            }
            sha.update(&block);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A socket read the way event-driven programs read (nginx, Envoy, Go, tokio) when `poll`:
/// wait until poll(2) says readable, then read; "would block" means wait again. Otherwise a
/// plain blocking read, where "would block" is an error. (A blocking read can fail with EAGAIN
/// on a socket in a socket map: the kernel's sockmap receive path returns it when its wait is
/// woken without data, e.g. by the socket's own write side.)
struct Reads<R> {
    io: R,
    poll: bool,
}

impl<R: Read + AsRawFd> Read for Reads<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.io.read(buf) {
                Err(e) if self.poll && e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(self.io.as_raw_fd())?
                }
                other => return other,
            }
        }
    }
}

fn wait_readable(fd: RawFd) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `limit` bytes (all of `from` if `None`); returns their digest and count.
fn digest_of(from: &mut impl Read, limit: Option<u64>) -> std::io::Result<(String, u64)> {
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let want = match limit {
            Some(l) if l == total => break,
            Some(l) => buf.len().min((l - total) as usize),
            None => buf.len(),
        };
        let n = from.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(sha.finish().as_ref()), total))
}

pub fn server(port: &str) -> Result<(), String> {
    let addr = listen_addr(port)?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || serve_one(stream));
    }
    Ok(())
}

fn serve_one(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let down: u64 = line
        .strip_prefix("DOWN ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad request line {line:?}")))?;
    let mut writer = stream.try_clone()?;
    let sending = std::thread::spawn(move || Stream::new(DOWN_SEED, down).write_all(&mut writer));
    let (sha, bytes) = digest_of(&mut reader, None)?;
    sending
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    let mut stream = stream;
    writeln!(stream, "sha256={sha} bytes={bytes}")?;
    stream.shutdown(Shutdown::Write)
}

struct Outcome {
    up: (String, u64),
    down: (String, u64),
}

fn one(addr: SocketAddr, up: u64, down: u64, poll: bool) -> Result<Outcome, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        writeln!(writer, "DOWN {down}")?;
        Stream::new(UP_SEED, up).write_all(&mut writer)?;
        // Half-close: the server reads to EOF, then still answers.
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = BufReader::new(Reads { io: stream, poll });
    let got_down = digest_of(&mut reader, Some(down)).map_err(|e| format!("reading: {e}"))?;
    let mut tail = String::new();
    reader
        .read_to_string(&mut tail)
        .map_err(|e| format!("reading the server's digest: {e}"))?;
    sending
        .join()
        .map_err(|_| "writer panicked".to_owned())?
        .map_err(|e| format!("writing: {e}"))?;
    let kv = |key: &str| {
        tail.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {key} in the server's answer {tail:?}"))
    };
    let up_bytes: u64 = parse("bytes", &kv("bytes=")?)?;
    Ok(Outcome {
        up: (kv("sha256=")?, up_bytes),
        down: got_down,
    })
}

pub fn client(addr: &str, up: &str, down: &str, conns: &str, reads: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let up: u64 = parse("bytes", up)?;
    let down: u64 = parse("bytes", down)?;
    let conns: usize = parse("connections", conns)?;
    let poll = match reads {
        "poll" => true,
        "blocking" => false,
        other => return Err(format!("reads {other:?}: poll or blocking")),
    };
    let want_up = (Stream::new(UP_SEED, up).sha256(), up);
    let want_down = (Stream::new(DOWN_SEED, down).sha256(), down);
    let outcomes: Vec<Result<Outcome, String>> = (0..conns)
        .map(|_| std::thread::spawn(move || one(addr, up, down, poll)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("panicked".to_owned())))
        .collect();
    let mut first = None;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let o = outcome.map_err(|e| format!("connection {i}: {e}"))?;
        if o.up != want_up || o.down != want_down {
            return Err(format!(
                "connection {i}: up {:?} (want {want_up:?}), down {:?} (want {want_down:?})",
                o.up, o.down
            ));
        }
        first.get_or_insert(o);
    }
    if let Some(o) = first {
        println!(
            "conns={conns}\nup.bytes={}\nup.sha256={}\ndown.bytes={}\ndown.sha256={}",
            o.up.1, o.up.0, o.down.1, o.down.0
        );
    }
    Ok(())
}

pub fn reset(addr: &str, bytes: &str) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    let bytes: u64 = parse("bytes", bytes)?;
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    Stream::new(UP_SEED, bytes)
        .write_all(&mut stream)
        .map_err(|e| format!("writing: {e}"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_LINGER: {}", std::io::Error::last_os_error()));
    }
    drop(stream);
    println!("sent={bytes}");
    Ok(())
}
