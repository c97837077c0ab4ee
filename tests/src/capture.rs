//! Packet capture with an AF_PACKET socket inside a testbed namespace: what crossed a link,
//! byte for byte, for tests that assert what is (not) visible on the wire.

use std::{
    ffi::CString,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crate::netns;

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Vec<u8>>>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Starts capturing every frame on interface `ifname` of namespace `ns`. Returns once the
    /// socket is bound, so nothing sent afterwards is missed.
    pub fn start(ns: &str, ifname: &str) -> io::Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns_file = std::fs::File::open(netns::path(ns))?;
        let ifname = CString::new(ifname).map_err(io::Error::other)?;
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || -> io::Result<Vec<u8>> {
            let sock = match open(&ns_file, &ifname) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !stop_flag.load(Ordering::SeqCst) {
                // SAFETY: valid socket and buffer; a 100 ms receive timeout bounds each call.
                let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    out.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: we own the socket.
            unsafe { libc::close(sock) };
            Ok(out)
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("capture thread died"))??;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns every byte of every frame seen.
    pub fn finish(mut self) -> io::Result<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .ok_or_else(|| io::Error::other("capture already finished"))?
            .join()
            .map_err(|_| io::Error::other("capture thread panicked"))?
    }
}

fn open(ns: &std::fs::File, ifname: &CString) -> io::Result<i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on values we own; this thread only.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        );
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let ifindex = libc::if_nametoindex(ifname.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        if libc::bind(
            sock,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(sock)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
