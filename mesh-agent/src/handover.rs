//! Hitless restart: the running agent hands its listening sockets to its successor over a Unix
//! socket (`SCM_RIGHTS`), keeps accepting until the successor serves, then drains what it
//! carries. The listening sockets never close, so no connection is refused; the pinned
//! programs never stop (see [`crate::pinning`]), so capture never lapses.
//!
//! The conversation, one line each way (the successor speaks first):
//! 1. successor: `mesh-agent-handover/1 <object tag>`;
//! 2. running agent: `refused <its tag>` if the builds differ (their map layouts may: it then
//!    drains as on SIGTERM, and the successor binds once it is gone), else
//!    `listeners <name>,<name>...` with the listening sockets attached, in that order;
//! 3. successor, once it accepts on them: `serving`;
//! 4. running agent: `bye`, and it stops accepting and drains.
//!
//! A successor that goes away before step 3 changes nothing: the running agent carries on.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

const HELLO: &str = "mesh-agent-handover/1";
/// More sockets than an agent has listeners: the rest of a message is refused.
const MAX_FDS: usize = 8;
/// The longest line either side reads (a tag, or the names of a few listeners).
const LINE_MAX: u64 = 512;
/// How long either side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the running agent answered.
pub enum Answer {
    /// No agent listens on the socket: bind afresh.
    Nobody,
    /// Its listening sockets, by name; tell it once we serve on them.
    Given(Vec<(String, std::net::TcpListener)>, Successor),
    /// It is another build (its tag): it drains, and its ports free up when it exits.
    Refused(String),
}

/// The successor's end of the conversation, kept until it serves.
pub struct Successor {
    stream: BufReader<UnixStream>,
}

impl Successor {
    /// Tells the running agent we accept on the sockets: it stops accepting and drains.
    pub fn serving(mut self) -> io::Result<()> {
        self.stream.get_mut().write_all(b"serving\n")?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        if line.trim() != "bye" {
            return Err(io::Error::other(format!(
                "the previous agent answered {line:?} to serving"
            )));
        }
        Ok(())
    }
}

/// Asks the agent listening on `path` (if any) for its listening sockets.
pub fn ask(path: &Path, tag: &str) -> io::Result<Answer> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Answer::Nobody);
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(format!("{HELLO} {tag}\n").as_bytes())?;
    let (line, fds) = recv_fds(stream.get_ref().as_raw_fd())?;
    let line = String::from_utf8_lossy(&line);
    let line = line.trim_end();
    if let Some(theirs) = line.strip_prefix("refused ") {
        return Ok(Answer::Refused(theirs.to_owned()));
    }
    let names = line
        .strip_prefix("listeners ")
        .ok_or_else(|| io::Error::other(format!("unexpected answer {line:?}")))?;
    let names: Vec<&str> = names.split(',').collect();
    if names.len() != fds.len() {
        return Err(io::Error::other(format!(
            "{} listener names for {} sockets",
            names.len(),
            fds.len()
        )));
    }
    let listeners = names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| (name.to_owned(), std::net::TcpListener::from(fd)))
        .collect();
    Ok(Answer::Given(listeners, Successor { stream }))
}

/// What happened on the running agent's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A successor serves on our listening sockets: stop accepting and drain, leaving the
    /// datapath to it.
    HandedOver,
    /// A successor of another build asked: drain as on SIGTERM so it can take over.
    Refused,
}

/// The running agent's side: answers successors on `path` until one takes over, or until
/// `stop` (the agent drains on its own). `listeners` are duplicates of the listening sockets,
/// by name, dropped when this returns. `handing` is true while a successor holds our sockets
/// and has not said yet whether it serves: a signal then waits for it instead of draining
/// (which would stop the capture the successor shares).
pub async fn serve(
    path: PathBuf,
    tag: String,
    listeners: Vec<(&'static str, OwnedFd)>,
    stop: crate::drain::Watch,
    handing: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<Event> {
    // The previous agent's socket file, if any: its agent is gone or leaving.
    let _ = std::fs::remove_file(&path);
    let server = match tokio::net::UnixListener::bind(&path) {
        Ok(s) => s,
        Err(e) => {
            warn!(path = %path.display(), "no hitless restart: cannot listen for a successor: {e}");
            return None;
        }
    };
    loop {
        let conn = tokio::select! {
            _ = stop.draining() => return None,
            conn = server.accept() => conn,
        };
        let Ok((conn, _)) = conn else { continue };
        let answered =
            tokio::time::timeout(STEP_TIMEOUT, answer(conn, &tag, &listeners, &handing)).await;
        handing.store(false, std::sync::atomic::Ordering::Release);
        match answered {
            Ok(Ok(Some(event))) => return Some(event),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!("handover: {e}"),
            Err(_) => warn!("handover: the successor went quiet"),
        }
    }
}

/// One successor's request. `None`: it went away before serving.
async fn answer(
    conn: tokio::net::UnixStream,
    tag: &str,
    listeners: &[(&'static str, OwnedFd)],
    handing: &std::sync::atomic::AtomicBool,
) -> io::Result<Option<Event>> {
    let mut conn = tokio::io::BufReader::new(conn);
    let mut line = String::new();
    (&mut conn).take(LINE_MAX).read_line(&mut line).await?;
    let Some(theirs) = line.trim_end().strip_prefix(HELLO).map(str::trim) else {
        return Err(io::Error::other(format!("unexpected request {line:?}")));
    };
    if theirs != tag {
        info!(
            ours = tag,
            theirs, "a successor of another build asked for the listeners: refused, draining"
        );
        conn.get_mut()
            .write_all(format!("refused {tag}\n").as_bytes())
            .await?;
        return Ok(Some(Event::Refused));
    }
    let names: Vec<&str> = listeners.iter().map(|(n, _)| *n).collect();
    let head = format!("listeners {}\n", names.join(","));
    let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    conn.get_mut().writable().await?;
    send_fds(conn.get_ref().as_raw_fd(), head.as_bytes(), &fds)?;
    handing.store(true, std::sync::atomic::Ordering::Release);
    line.clear();
    if (&mut conn).take(LINE_MAX).read_line(&mut line).await? == 0 {
        info!("the successor went away before serving; carrying on");
        return Ok(None);
    }
    if line.trim_end() != "serving" {
        return Err(io::Error::other(format!("unexpected {line:?}")));
    }
    conn.get_mut().write_all(b"bye\n").await?;
    Ok(Some(Event::HandedOver))
}

/// Space for `MAX_FDS` descriptors in a control message.
fn cmsg_space() -> usize {
    // SAFETY: pure arithmetic macro.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `payload` with `fds` attached, in one message.
fn send_fds(socket: RawFd, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many sockets to hand over"));
    }
    let mut control = vec![0u8; cmsg_space()];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr zeroed then pointed at live buffers; the CMSG macros walk `control`,
    // which has room for MAX_FDS descriptors.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_controllen = libc::CMSG_SPACE(data_len) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr() as *const u8,
            libc::CMSG_DATA(cmsg),
            data_len as usize,
        );
        if libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (owned from here on).
fn recv_fds(socket: RawFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut payload = vec![0u8; 512];
    let mut control = vec![0u8; cmsg_space()];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: as in send_fds; every descriptor the kernel installed is taken into an OwnedFd.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("too many sockets handed over"));
        }
        n as usize
    };
    payload.truncate(n);
    Ok((payload, fds))
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// Real sockets, a real handover between two ends of a socket pair: the listening socket
    /// received accepts what is dialled to the one sent.
    #[test]
    fn listening_sockets_cross_a_unix_socket_and_keep_accepting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(
            a.as_raw_fd(),
            b"listeners outbound\n",
            &[listener.as_raw_fd()],
        )
        .unwrap();
        let (payload, fds) = recv_fds(b.as_raw_fd()).unwrap();
        assert_eq!(payload, b"listeners outbound\n");
        assert_eq!(fds.len(), 1);
        drop(listener);
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_conn, _) = received.accept().unwrap();
    }
}
