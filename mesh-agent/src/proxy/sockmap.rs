//! The proxy's part in the socket-map shortcut (`--sockmap`): pods' sends to the proxy are
//! queued by the kernel straight onto the proxy's socket, and the proxy tells the kernel how
//! much it has read, so what a pod can have queued and unread stays within
//! [`sockmap::WINDOW`] (see `mesh_agent_common::sockmap`). The proxy reads and writes its
//! sockets as ever: redirected bytes arrive through the same `read`.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use mesh_agent_common::{sockmap, SockKey};
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
};

use crate::datapath::{sock_key, OrigDstTable};

/// `io`, the proxy's end of a captured connection, with its reads reported to the kernel every
/// [`sockmap::REPORT_EVERY`] bytes.
pub struct Reporting<S> {
    io: S,
    report: Option<Report>,
}

struct Report {
    table: Arc<OrigDstTable>,
    key: SockKey,
    read: u64,
    reported: u64,
}

impl Reporting<TcpStream> {
    /// Reports the reads of the proxy's socket `io`, accepted from `peer`, if the shortcut is
    /// on (IPv4 only: the programs take no IPv6 connection into the socket maps). Off, this
    /// costs nothing, not even a `getsockname`.
    pub fn new(io: TcpStream, table: &Arc<OrigDstTable>, peer: SocketAddr) -> Self {
        let report = match (table.sockmap().then(|| io.local_addr()), peer) {
            (Some(Ok(SocketAddr::V4(local))), SocketAddr::V4(peer)) => Some(Report {
                table: table.clone(),
                key: sock_key(local, peer),
                read: 0,
                reported: 0,
            }),
            _ => None,
        };
        Self { io, report }
    }
}

impl<S> Drop for Reporting<S> {
    fn drop(&mut self) {
        if let Some(r) = &self.report {
            if r.reported > 0 {
                r.table.forget_reads(&r.key);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Reporting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(r)) = (&polled, &mut this.report) {
            r.read += (buf.filled().len() - before) as u64;
            if r.read - r.reported >= sockmap::REPORT_EVERY {
                r.table.report_read(&r.key, r.read);
                r.reported = r.read;
            }
        }
        polled
    }
}

super::forward_async_write!(Reporting);
