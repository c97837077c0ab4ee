//! Finds a pod's network namespace (its netns cookie) and its veth on the node side.
//!
//! In local mode nothing tells the agent which namespace belongs to which pod, so it looks:
//! every named namespace (`/run/netns`) and every process's namespace are probed by binding a
//! socket to the pod's IP inside them; the namespace where that succeeds owns the address. The
//! host-side veth is the interface the node's route to the pod IP leaves through.
//!
//! The agent keeps each enrolled pod's namespace open and opens sockets inside it, so what it
//! dials for a pod leaves from the pod's own network position, never the node's.

mod netlink;
mod sandbox;

pub use sandbox::Sandboxes;

/// Where cgroup v2 is mounted on a node.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::File,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
    sync::OnceLock,
};

use mesh_agent_common::marks;

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

/// A pod's network namespace, held open: the agent creates sockets inside it (to dial on the
/// pod's behalf from the pod's own network position) and configures it. Dropping the handle
/// lets a deleted namespace go.
#[derive(Debug)]
pub struct PodNetns {
    pub cookie: u64,
    file: File,
}

/// Finds the namespace owning each of `ips`. Addresses not found (yet) are absent from the
/// result; namespaces whose cookie is in `skip` (a sandbox just released) are not taken.
pub fn find_namespaces(
    ips: &[Ipv4Addr],
    skip: &HashSet<u64>,
) -> Result<HashMap<Ipv4Addr, PodNetns>, Error> {
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
        let probe_file = file.try_clone().map_err(Error::Probe)?;
        // setns affects only the calling thread; a short-lived thread keeps ours untouched.
        let probe = std::thread::spawn(move || probe_namespace(&probe_file, &wanted));
        let hits = probe
            .join()
            .map_err(|_| Error::Probe(io::Error::other("probe thread panicked")))?;
        match hits {
            Ok(hits) => {
                for (ip, cookie) in hits {
                    if skip.contains(&cookie) {
                        continue;
                    }
                    let file = file.try_clone().map_err(Error::Probe)?;
                    found.insert(ip, PodNetns { cookie, file });
                }
            }
            // A namespace we cannot enter (gone meanwhile, or not ours to enter) holds no pod
            // of ours; one bad entry must not stop the scan.
            Err(e) => tracing::debug!(namespace = %ns.display(), "skipping: {e}"),
        }
    }
    Ok(found)
}

/// Where procfs is writable (`--host-proc`): a container's own `/proc/sys` is read-only.
static PROC_ROOT: OnceLock<String> = OnceLock::new();

/// Uses the procfs mounted at `path` for the sysctls set in pods' namespaces. Call at
/// start-up.
pub fn set_proc_root(path: &std::path::Path) {
    let _ = PROC_ROOT.set(path.display().to_string());
}

/// The agent's own network namespace, opened once so threads that visit a pod's namespace
/// can come back.
static AGENT_NETNS: OnceLock<Result<File, String>> = OnceLock::new();

/// Remembers the agent's own network namespace. Call at start-up, before any thread enters a
/// pod's namespace.
pub fn remember_agent_netns() -> io::Result<()> {
    match AGENT_NETNS.get_or_init(|| File::open("/proc/self/ns/net").map_err(|e| e.to_string())) {
        Ok(_) => Ok(()),
        Err(e) => Err(io::Error::other(format!("opening /proc/self/ns/net: {e}"))),
    }
}

impl PodNetns {
    /// Runs `f` on the calling thread inside this namespace, then returns the thread to the
    /// agent's namespace. `f` must not block or yield: it is meant for creating sockets and
    /// sending netlink requests.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(Ok(home)) = AGENT_NETNS.get() else {
            return Err(io::Error::other(
                "the agent's own network namespace was not remembered at start-up",
            ));
        };
        // SAFETY: plain syscall on a valid fd; affects only the calling thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let result = f();
        // SAFETY: as above, back to where the thread came from.
        if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // A runtime thread stranded in a pod's namespace would open the agent's own
            // connections from there: stopping is the only safe answer.
            tracing::error!(
                "cannot return a thread to the agent's network namespace: {}; aborting",
                io::Error::last_os_error()
            );
            std::process::abort();
        }
        result
    }

    /// Whether this namespace still owns `ip` (a replaced sandbox no longer does).
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.run(|| bound_to(ip)).is_ok_and(|s| s.is_some())
    }

    /// A non-blocking TCP socket created inside this namespace, of `target`'s address family,
    /// carrying `mark` so the capture programs leave it alone. With `transparent_source`, the
    /// socket is bound to that address although it is not local (`IP_TRANSPARENT`): the pod
    /// then sees the connection come from there.
    pub fn tcp_socket(
        &self,
        mark: u32,
        target: SocketAddr,
        transparent_source: Option<IpAddr>,
    ) -> io::Result<std::net::TcpStream> {
        let sock = self.run(|| new_tcp_socket(target))?;
        set_int(&sock, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
        if let Some(ip) = transparent_source {
            let rc = match ip {
                IpAddr::V4(ip) => {
                    set_int(&sock, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
                    let addr = sockaddr_in(ip);
                    // SAFETY: valid socket and a correctly sized sockaddr_in.
                    unsafe {
                        libc::bind(
                            sock.as_raw_fd(),
                            (&addr as *const libc::sockaddr_in).cast(),
                            size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        )
                    }
                }
                IpAddr::V6(ip) => {
                    set_int(&sock, libc::SOL_IPV6, IPV6_TRANSPARENT, 1)?;
                    let addr = sockaddr_in6(ip);
                    // SAFETY: valid socket and a correctly sized sockaddr_in6.
                    unsafe {
                        libc::bind(
                            sock.as_raw_fd(),
                            (&addr as *const libc::sockaddr_in6).cast(),
                            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                        )
                    }
                }
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(std::net::TcpStream::from(sock))
    }

    /// Prepares the namespace for transparent delivery ([`marks::INBOUND`] sockets): replies
    /// to a remote client's address must reach the agent's socket, not leave the pod. The
    /// pod's accepted sockets take the mark of the SYN that opened them
    /// (`net.ipv4.tcp_fwmark_accept`), and packets so marked route to the local stack (a rule
    /// and a `local 0.0.0.0/0` route in a table of our own). Idempotent.
    pub fn route_inbound_to_agent(&self) -> io::Result<()> {
        self.run(|| {
            // The sysctl covers IPv6 TCP too. (Network sysctls are those of the opening
            // thread's namespace, whichever procfs mount they are opened through.)
            let proc = PROC_ROOT.get().map_or("/proc", |p| p.as_str());
            std::fs::write(format!("{proc}/sys/net/ipv4/tcp_fwmark_accept"), "1")?;
            netlink::add_mark_rule(libc::AF_INET, marks::INBOUND, marks::MASK, INBOUND_TABLE)?;
            netlink::add_local_default_route(libc::AF_INET, INBOUND_TABLE)?;
            // The same for IPv6, where the pod has it: a pod with IPv6 turned off refuses
            // IPv6 routes, and needs none.
            let v6 =
                netlink::add_mark_rule(libc::AF_INET6, marks::INBOUND, marks::MASK, INBOUND_TABLE)
                    .and_then(|()| netlink::add_local_default_route(libc::AF_INET6, INBOUND_TABLE));
            if let Err(e) = v6 {
                tracing::debug!("no IPv6 transparent delivery in this pod: {e}");
            }
            Ok(())
        })
    }
}

/// The routing table (inside a pod) that sends [`marks::INBOUND`] packets to the local stack.
pub const INBOUND_TABLE: u32 = 0x5a1;

/// `IPV6_TRANSPARENT` from `<linux/in6.h>`.
const IPV6_TRANSPARENT: libc::c_int = 75;

fn sockaddr_in6(ip: Ipv6Addr) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: 0,
    }
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn set_int(
    sock: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid socket, pointer to an int of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn probe_namespace(ns: &File, ips: &[Ipv4Addr]) -> io::Result<Vec<(Ipv4Addr, u64)>> {
    // SAFETY: plain syscall on a valid fd; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for ip in ips {
        if let Some(sock) = bound_to(*ip)? {
            out.push((*ip, netns_cookie(&sock)?));
        }
    }
    Ok(out)
}

/// A UDP socket bound to `ip` in the current namespace, if the namespace owns that address.
fn bound_to(ip: Ipv4Addr) -> io::Result<Option<OwnedFd>> {
    let sock = udp_socket()?;
    let addr = sockaddr_in(ip);
    // SAFETY: valid socket and a correctly sized sockaddr_in.
    let bound = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } == 0;
    Ok(bound.then_some(sock))
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

/// The node-side interface (index, name) of the pod at `ip` whose namespace is `netns`: the
/// interface the node routes `ip` through when that is a veth (kindnet, Calico: a route per
/// pod); else (a bridge such as Flannel's `cni0`, or Cilium's `cilium_host`) the node's one
/// veth whose peer is in the pod's namespace. Told from the node's side only (the peer's
/// namespace as the kernel records it): nothing the pod's namespace says plays a part, so a
/// pod cannot name another pod's veth. Naming plays no part either.
pub fn host_interface(netns: &PodNetns, ip: Ipv4Addr) -> Result<(u32, String), Error> {
    let routed = route_interface(ip)?;
    if is_veth(&routed.1).unwrap_or(false) {
        return Ok(routed);
    }
    Ok(veth_into(netns).unwrap_or(routed))
}

/// The node's veth whose peer is in `netns`, if there is exactly one.
fn veth_into(netns: &PodNetns) -> Option<(u32, String)> {
    // The dump first: listing a veth gives its peer's namespace an id if it had none.
    let veths = netlink::veths().ok()?;
    let id = netlink::nsid_of(netns.file.as_raw_fd()).ok()??;
    let mut theirs = veths.into_iter().filter(|v| v.2 == Some(id));
    let (index, name, _) = theirs.next()?;
    theirs.next().is_none().then_some((index, name))
}

/// The interface (index, name) the current namespace routes `ip` through.
pub fn route_interface(ip: Ipv4Addr) -> Result<(u32, String), Error> {
    let oif = netlink::route_oif(ip).map_err(|source| Error::Route { ip, source })?;
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

/// A non-blocking TCP socket of `target`'s address family, in the calling thread's namespace.
fn new_tcp_socket(target: SocketAddr) -> io::Result<OwnedFd> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking TCP socket in the agent's own (the node's) namespace, carrying `mark`.
pub fn marked_tcp_socket(mark: u32, target: SocketAddr) -> io::Result<std::net::TcpStream> {
    let sock = new_tcp_socket(target)?;
    set_int(&sock, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    Ok(std::net::TcpStream::from(sock))
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
