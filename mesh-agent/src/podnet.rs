//! Finds a pod's network namespace (its netns cookie) and its veth on the node side.
//!
//! In local mode nothing tells the agent which namespace belongs to which pod, so it looks:
//! every named namespace (`/run/netns`) and every process's namespace are probed by binding a
//! socket to the pod's IP inside them; the namespace where that succeeds owns the address. The
//! host-side veth is the interface the node's route to the pod IP leaves through.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::File,
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

/// `SO_NETNS_COOKIE` (Linux 5.14), not yet in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink route lookup for {ip}: {source}")]
    Route {
        ip: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("the node has no route to pod {0} through a local interface")]
    NoRoute(Ipv4Addr),
    #[error("probing network namespaces: {0}")]
    Probe(#[source] io::Error),
}

fn candidate_namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    if let Ok(own) = std::fs::metadata("/proc/self/ns/net") {
        seen.insert((own.dev(), own.ino()));
    }
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    named
        .chain(procs)
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

/// Finds the netns cookie of the namespace owning each of `ips`. Addresses not found (yet) are
/// absent from the result.
pub fn find_namespaces(ips: &[Ipv4Addr]) -> Result<HashMap<Ipv4Addr, u64>, Error> {
    let mut found = HashMap::new();
    if ips.is_empty() {
        return Ok(found);
    }
    for ns in candidate_namespaces() {
        let Ok(file) = File::open(&ns) else { continue };
        let wanted: Vec<Ipv4Addr> = ips
            .iter()
            .filter(|ip| !found.contains_key(*ip))
            .copied()
            .collect();
        if wanted.is_empty() {
            break;
        }
        // setns affects only the calling thread; a short-lived thread keeps ours untouched.
        let probe = std::thread::spawn(move || probe_namespace(&file, &wanted));
        let hits = probe
            .join()
            .map_err(|_| Error::Probe(io::Error::other("probe thread panicked")))?;
        match hits {
            Ok(hits) => found.extend(hits),
            // A namespace we cannot enter (gone meanwhile, or not ours to enter) holds no pod
            // of ours; one bad entry must not stop the scan.
            Err(e) => tracing::debug!(namespace = %ns.display(), "skipping: {e}"),
        }
    }
    Ok(found)
}

fn probe_namespace(ns: &File, ips: &[Ipv4Addr]) -> io::Result<Vec<(Ipv4Addr, u64)>> {
    // SAFETY: plain syscall on a valid fd; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for ip in ips {
        let sock = udp_socket()?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid socket and a correctly sized sockaddr_in.
        let bound = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        } == 0;
        if bound {
            out.push((*ip, netns_cookie(&sock)?));
        }
    }
    Ok(out)
}

fn udp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn netns_cookie(sock: &OwnedFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, buffer of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The netns cookie of the calling thread's namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    netns_cookie(&udp_socket()?)
}

/// The interface (index, name) the current namespace routes `ip` through.
pub fn route_interface(ip: Ipv4Addr) -> Result<(u32, String), Error> {
    let oif = route_oif(ip).map_err(|source| Error::Route { ip, source })?;
    let oif = oif.ok_or(Error::NoRoute(ip))?;
    let mut name = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(oif, name.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(Error::Route {
            ip,
            source: io::Error::last_os_error(),
        });
    }
    let name = CString::from_vec_with_nul(
        name.iter()
            .take_while(|b| **b != 0)
            .copied()
            .chain([0])
            .collect(),
    )
    .map_err(|e| Error::Route {
        ip,
        source: io::Error::other(e),
    })?;
    Ok((oif, name.to_string_lossy().into_owned()))
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo`: we only read the driver name.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    rest: [u8; 160],
}

/// Whether `ifname` (in the current namespace) is a veth: the only kind of interface where a
/// per-pod anti-spoofing check is sound (one pod behind it). A bridge such as `cni0` carries
/// many pods.
pub fn is_veth(ifname: &str) -> io::Result<bool> {
    let sock = udp_socket()?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: zeroed ifreq, name copied with a terminating NUL, data pointing at `info`,
    // which outlives the call.
    let rc = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    Ok(info.driver.get(..end) == Some(b"veth".as_slice()))
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// One RTM_GETROUTE request over rtnetlink (what `ip route get` does).
fn route_oif(ip: Ipv4Addr) -> io::Result<Option<u32>> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let total = NLMSG_HDRLEN + RTMSG_LEN + 8;
    let mut req = Vec::with_capacity(total);
    req.extend_from_slice(&(total as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
                                                // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    req.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    // rtattr RTA_DST
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&ip.octets());

    // SAFETY: valid socket and buffer.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: valid socket and buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_route_reply(buf.get(..n as usize).unwrap_or_default())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_route_reply(msg: &[u8]) -> io::Result<Option<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDRLEN).ok_or_else(bad)? as i32;
        return match errno {
            0 => Ok(None),
            e if e == -libc::ENETUNREACH || e == -libc::EHOSTUNREACH => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
    }
    if kind != RTM_NEWROUTE {
        return Ok(None);
    }
    let mut at = NLMSG_HDRLEN + RTMSG_LEN;
    let end = len.min(msg.len());
    while at + 4 <= end {
        let alen = u16_at(msg, at).ok_or_else(bad)? as usize;
        let atype = u16_at(msg, at + 2).ok_or_else(bad)?;
        if alen < 4 {
            break;
        }
        if atype == RTA_OIF {
            return Ok(u32_at(msg, at + 4));
        }
        at += (alen + 3) & !3;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn loopback_is_not_a_veth() {
        assert!(!is_veth("lo").unwrap_or(false));
    }

    #[test]
    fn loopback_routes_through_lo() {
        // Every namespace routes 127.0.0.1 via lo; this exercises the real netlink path.
        let (_, name) = route_interface(Ipv4Addr::LOCALHOST).unwrap();
        assert_eq!(name, "lo");
    }
}
