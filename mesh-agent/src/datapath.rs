//! Loads the eBPF programs, attaches them, and owns their maps.
//!
//! The cgroup programs attach to the cgroup v2 root through BPF links, which always coexist with
//! other programs there (a CNI's): the kernel treats every cgroup link as multi-attach and
//! refuses the explicit `BPF_F_ALLOW_MULTI` flag on links, hence `CgroupAttachMode::Single`
//! below, which passes no flag. These links, and the TC links (TCX, Linux 6.6+), belong to this
//! process, so the kernel detaches everything when the agent exits, cleanly or not. A killed
//! agent therefore leaves no program redirecting into a dead listener; pods fall back to
//! direct connections (fail open).
//!
//! With `--pin-dir` the links, the maps the agent uses and the TC programs are pinned instead
//! (see [`crate::pinning`]) and outlive the agent, and the next agent of the same build adopts
//! them: then a heartbeat in `LIVENESS` tells the programs whether an agent still serves the
//! node. When it lapses, pods connect directly again, except fail-closed ones, which are
//! refused.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::{
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap,
        SockHash,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLinkId,
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkMsg, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use mesh_agent_common::{
    counters, maps, pod_flags, programs, proxy_flags, verdict, EnrolledPod, Net4, OrigDst,
    OrigDst6, PodAddrs, PodRules, PolicyConfig, PolicyKey, PolicyNet4, PolicyNet6, ProxyConfig,
    SockAddrV4 as RawAddr, SockAddrV6 as RawAddr6, SockKey, RULE_NETS, RULE_PORTS,
};

use crate::{
    pinning::{self, attach, PinDir},
    policy::kernel::{Plaintext, PortVerdict},
};

use crate::metrics::DatapathStats;

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-agent"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this binary was built without its eBPF programs (MESH_AGENT_EBPF_STUB was set); rebuild without it")]
    Stub,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 mount in /proc/self/mountinfo; mesh-agent needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")]
    NoCgroup2,
    #[error(transparent)]
    PinDir(#[from] pinning::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn prog(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Cgroup links are multi-attach by nature; see the module comment.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Converts an address to the in-kernel representation (network byte order in memory).
pub fn raw_addr(addr: SocketAddrV4) -> RawAddr {
    RawAddr::new(raw_ip(*addr.ip()), addr.port().to_be())
}

fn raw_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// An IPv6 address as the programs store it (four network-order words).
pub fn raw_ip6(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

pub fn raw_addr6(addr: SocketAddrV6) -> RawAddr6 {
    RawAddr6::new(raw_ip6(*addr.ip()), addr.port().to_be())
}

fn from_raw6(addr: RawAddr6) -> SocketAddrV6 {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddrV6::new(Ipv6Addr::from(octets), u16::from_be(addr.port), 0, 0)
}

fn from_raw(addr: RawAddr) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(addr.ip.to_ne_bytes()),
        u16::from_be(addr.port),
    )
}

/// What the programs must leave alone.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    pub ports: Vec<u16>,
    /// (network, prefix length)
    pub nets: Vec<(Ipv4Addr, u8)>,
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Cgroup {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    info.lines()
        .find_map(|line| {
            // "... mount_point ... - fstype source options"
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or(Error::NoCgroup2)
}

/// What the kernel recorded about a captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Captured {
    /// Where the application wanted to go.
    pub orig_dst: SocketAddr,
    /// The network namespace the application connected from: who the client is.
    pub netns_cookie: u64,
}

/// Whether pods' new connections are captured at all: the programs redirect nothing while the
/// proxy's address in `PROXY` is zero, or while the agent's heartbeat (pinned programs only)
/// has lapsed.
pub struct Capture {
    proxy: Array<MapData, ProxyConfig>,
    heartbeat: Option<Heartbeat>,
}

/// The thread that keeps renewing the agent's deadline in `LIVENESS`. A thread of its own, not
/// a task: a busy proxy must not look like a dead one.
struct Heartbeat {
    /// Dropped to stop it: it then marks the agent gone and returns.
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Heartbeat {
    fn start(mut liveness: Array<MapData, u64>, timeout: Duration) -> Result<Self, Error> {
        let renew = move |liveness: &mut Array<MapData, u64>| {
            let deadline = pinning::monotonic_ns()
                .saturating_add(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX));
            liveness.set(0, deadline, 0)
        };
        renew(&mut liveness).map_err(map_err(maps::LIVENESS))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let beat = pinning::beat(timeout);
        let thread = std::thread::Builder::new()
            .name("mesh-heartbeat".into())
            .spawn(move || loop {
                match stopped.recv_timeout(beat) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(e) = renew(&mut liveness) {
                            tracing::warn!("renewing the agent's heartbeat: {e}");
                        }
                    }
                    // Handed over: the successor renews it now.
                    Ok(()) => return,
                    // Leaving: a deadline in the past (0 would mean "no heartbeat needed").
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = liveness.set(0, 1, 0);
                        return;
                    }
                }
            })
            .map_err(|source| Error::Pin {
                what: "the heartbeat thread",
                path: PathBuf::new(),
                source,
            })?;
        Ok(Self { stop, thread })
    }
}

impl Capture {
    /// Stops capturing new connections (a drain): they go where the pod dialled, as when no
    /// agent runs (fail-closed pods' are refused). Connections already redirected are not
    /// touched.
    pub fn stop(&mut self) -> Result<(), Error> {
        self.proxy
            .set(0, ProxyConfig::default(), 0)
            .map_err(map_err(maps::PROXY))
    }

    /// A successor serves the node: the heartbeat stops without marking the agent gone.
    pub fn hand_over(self) {
        if let Some(Heartbeat { stop, thread }) = self.heartbeat {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }

    /// The agent is leaving: pinned programs stop counting on it at once (pods connect
    /// directly, fail-closed ones are refused) instead of when its heartbeat would lapse.
    pub fn leave(self) {
        if let Some(Heartbeat { stop, thread }) = self.heartbeat {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Read side of the per-connection maps, shared with the proxy.
pub struct OrigDstTable {
    orig_dst: HashMap<MapData, RawAddr, OrigDst>,
    orig_dst6: HashMap<MapData, RawAddr6, OrigDst6>,
    counters: PerCpuArray<MapData, u64>,
    /// Entries the proxy has read and deleted.
    consumed: AtomicU64,
    /// `CONSUMED`: what the proxy has read from its sockets of the socket-map shortcut.
    agent_reads: MapData,
    /// Whether the shortcut is on (`--sockmap`).
    sockmap: bool,
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `bpf_attr` of the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes one entry in one syscall (aya 0.13 has no lookup-and-delete of its own).
fn lookup_and_delete<K: aya::Pod, V: aya::Pod + Default>(map: &MapData, key: &K) -> Option<V> {
    let mut value = V::default();
    let value_ptr = (&mut value as *mut V) as u64;
    elem_command(map, BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, value_ptr).then_some(value)
}

/// One element command on a map shared by many tasks (aya 0.13 wants `&mut` for updates and
/// deletes, the kernel does not). `value`: the address of a value of the map's value type
/// (read or written by the command), or 0 for commands that take none.
fn elem_command<K: aya::Pod>(map: &MapData, command: libc::c_long, key: &K, value: u64) -> bool {
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K) as u64,
        value,
        flags: 0,
    };
    // SAFETY: the attr points at a key of the map's key size and, where the command takes one,
    // a value of its value size (the callers pass the types the map was created with), both
    // alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    rc == 0
}

/// The proxy's end of a connection in the socket-map shortcut, as the kernel keys it.
pub fn sock_key(local: SocketAddrV4, remote: SocketAddrV4) -> SockKey {
    SockKey {
        local_ip: raw_ip(*local.ip()),
        remote_ip: raw_ip(*remote.ip()),
        local_port: local.port().to_be(),
        remote_port: remote.port().to_be(),
    }
}

impl OrigDstTable {
    /// Whether pods' sends may be queued straight onto the proxy's sockets (`--sockmap`): then
    /// the proxy reports what it reads from them ([`OrigDstTable::report_read`]).
    pub fn sockmap(&self) -> bool {
        self.sockmap
    }

    /// Tells the kernel the proxy has read `total` bytes from its socket `key`: the pod may
    /// have that much more in flight before its connection goes back to TCP.
    pub fn report_read(&self, key: &SockKey, total: u64) {
        let value = (&total as *const u64) as u64;
        elem_command(&self.agent_reads, BPF_MAP_UPDATE_ELEM, key, value);
    }

    /// The proxy is done with its socket `key`.
    pub fn forget_reads(&self, key: &SockKey) {
        elem_command(&self.agent_reads, BPF_MAP_DELETE_ELEM, key, 0);
    }

    /// What was recorded for the connection from `client`, removed from the map as it is read:
    /// the entry outlives the client socket, so a client that sent and closed before we
    /// accepted is still served.
    pub fn take(&self, client: SocketAddr) -> Option<Captured> {
        let captured = match client {
            SocketAddr::V4(c) => {
                let v: OrigDst = lookup_and_delete(self.orig_dst.map(), &raw_addr(c))?;
                Captured {
                    orig_dst: SocketAddr::V4(from_raw(v.dst)),
                    netns_cookie: v.netns_cookie,
                }
            }
            SocketAddr::V6(c) => {
                let v: OrigDst6 = lookup_and_delete(self.orig_dst6.map(), &raw_addr6(c))?;
                Captured {
                    orig_dst: SocketAddr::V6(from_raw6(v.dst)),
                    netns_cookie: v.netns_cookie,
                }
            }
        };
        self.consumed.fetch_add(1, Ordering::Relaxed);
        Some(captured)
    }

    fn sum(&self, counter: u32) -> u64 {
        self.counters
            .get(&counter, 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0)
    }

    /// The datapath's counters. Costs one read per counter, whatever the maps hold: entry
    /// counts are kept as entries come and go, never by walking a map.
    pub fn stats(&self) -> DatapathStats {
        let sum = |i: u32| self.sum(i);
        let redirected = sum(counters::REDIRECTED);
        DatapathStats {
            redirected,
            spoofed_dropped: sum(counters::SPOOFED_DROPPED),
            foreign_dropped: sum(counters::FOREIGN_DROPPED),
            orig_dst_publish_failed: sum(counters::ORIG_DST_PUBLISH_FAILED),
            fail_closed_refused: sum(counters::FAIL_CLOSED_REFUSED),
            sockmap_connections: sum(counters::SOCKMAP_FLOWS),
            sockmap_bytes: sum(counters::SOCKMAP_BYTES),
            sockmap_window_fallbacks: sum(counters::SOCKMAP_WINDOW_FALLBACKS),
            sockmap_peerless_fallbacks: sum(counters::SOCKMAP_PEERLESS_FALLBACKS),
            sockmap_flows_tracked: sum(counters::SOCKMAP_FLOWS)
                .saturating_sub(sum(counters::SOCKMAP_FLOWS_CLOSED)),
            redirects_tracked: redirected.saturating_sub(sum(counters::REDIRECT_CLOSED)),
            orig_dst_tracked: sum(counters::ORIG_DST_PUBLISHED)
                .saturating_sub(self.consumed.load(Ordering::Relaxed)),
        }
    }
}

/// A pod whose traffic the programs capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub netns_cookie: u64,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    /// The pod's veth on the node side.
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// Whether the TC anti-spoofing check guards the pod's interface (only on a veth of its
    /// own; see `podnet::is_veth`).
    pub anti_spoof: bool,
    /// Whether the pod's connections are refused while no agent serves it.
    pub fail_closed: bool,
}

/// The loaded programs and the maps the reconciler writes.
pub struct Datapath {
    /// The loaded object, unless the datapath was adopted from a previous agent's pins.
    ebpf: Option<Ebpf>,
    /// The TC programs of an adopted datapath.
    classifiers: Option<Classifiers>,
    /// Whether the maps came from a previous agent (entries of pods gone since may linger
    /// until [`Datapath::sweep`]).
    adopted: bool,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    spoof_guard: HashMap<MapData, u32, PodAddrs>,
    tc_links: StdHashMap<u32, TcLink>,
    policy: PolicyMaps,
    /// The inbound policy programs on pods' veths (egress), by ifindex.
    policy_links: StdHashMap<u32, TcLink>,
    /// Where links are pinned (`--pin-dir`), if they are.
    pins: Option<PinDir>,
    /// The pinned cgroup links (closing them does not detach them: their pins hold them).
    _cgroup_links: Vec<OwnedFd>,
}

/// A TC program on a pod's veth.
enum TcLink {
    /// Owned by the program's loader: detached with it.
    Owned(SchedClassifierLinkId),
    /// Pinned: attached until unpinned.
    Pinned(PinnedLink),
}

/// The inbound policy maps, and what each pod has in them.
struct PolicyMaps {
    pods: HashMap<MapData, u32, PodRules>,
    ports: HashMap<MapData, PolicyKey, u8>,
    nets: LpmTrie<MapData, PolicyNet4, u8>,
    nets6: LpmTrie<MapData, PolicyNet6, u8>,
    drops: PerCpuHashMap<MapData, PolicyKey, u64>,
    config: Array<MapData, PolicyConfig>,
    installed: StdHashMap<u32, Installed>,
}

/// The keys one pod holds in the policy maps.
#[derive(Default, PartialEq)]
struct Installed {
    /// Its entry in `POLICY_PODS` (`None`: plaintext unrestricted).
    pod: Option<PodRules>,
    /// A policy too large for [`PodRules`]: ports and IPv4 ranges in the fallback maps.
    ports: Vec<(PolicyKey, u8)>,
    nets: Vec<(u32, PolicyNet4, u8)>,
    nets6: Vec<(u32, PolicyNet6, u8)>,
}

impl Datapath {
    /// Loads and attaches everything. Returns the datapath and the read side for the proxy.
    ///
    /// With `pins`, the links, maps and TC programs are pinned there and the agent's heartbeat
    /// must reach the programs every `liveness_timeout`. If a previous agent of the same build
    /// (the same eBPF object) left its datapath pinned, it is adopted as it is: its programs
    /// never stop running, and the connections they redirected meanwhile are found in its
    /// maps. Another build's pins are removed first (its programs would run beside ours).
    ///
    /// With `sockmap`, pods' sends to the proxy skip TCP (see `mesh_agent_common::sockmap`).
    #[expect(clippy::too_many_arguments, reason = "start-up wiring, called once")]
    pub fn start(
        cgroup: &Path,
        outbound: SocketAddrV4,
        outbound6: Option<SocketAddrV6>,
        node_addrs: &[Ipv4Addr],
        node_addrs6: &[Ipv6Addr],
        exclusions: &Exclusions,
        pins: Option<PinDir>,
        liveness_timeout: Duration,
        sockmap: bool,
    ) -> Result<(Self, OrigDstTable, Capture), Error> {
        if OBJECT.is_empty() {
            return Err(Error::Stub);
        }
        let adopt = pins.as_ref().is_some_and(|p| p.complete(USER_MAPS));
        let mut ebpf = None;
        if let Some(pins) = &pins {
            if adopt {
                tracing::info!(dir = %pins.root().display(), "adopting the pinned datapath");
            } else {
                let removed = pins.clear()?;
                if removed > 0 {
                    tracing::info!(
                        removed, dir = %pins.root().display(),
                        "unpinned what a previous agent left"
                    );
                }
            }
        }
        if !adopt {
            // Our programs read only UAPI context structs (fixed layouts), so no CO-RE
            // relocation needs the kernel's BTF; not parsing vmlinux BTF saves ~13 MB of peak
            // memory.
            ebpf = Some(EbpfLoader::new().btf(None).load(OBJECT)?);
        }
        let mut take = |name: &'static str| -> Result<Map, Error> {
            match (&mut ebpf, &pins) {
                (Some(ebpf), pins) => {
                    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                    if let Some(pins) = pins {
                        let path = pins.map(name);
                        map.pin(&path).map_err(|e| Error::Pin {
                            what: name,
                            path,
                            source: std::io::Error::other(e.to_string()),
                        })?;
                    }
                    Ok(map)
                }
                (None, Some(pins)) => {
                    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name))?;
                    as_map(data).map_err(map_err(name))
                }
                (None, None) => Err(Error::MissingMap(name)),
            }
        };
        let mut proxy: Array<MapData, ProxyConfig> =
            Array::try_from(take(maps::PROXY)?).map_err(map_err(maps::PROXY))?;
        let liveness: Array<MapData, u64> =
            Array::try_from(take(maps::LIVENESS)?).map_err(map_err(maps::LIVENESS))?;
        let mut ports: HashMap<MapData, u16, u8> = HashMap::try_from(take(maps::EXCLUDED_PORTS)?)
            .map_err(map_err(maps::EXCLUDED_PORTS))?;
        let mut nets: LpmTrie<MapData, u32, u8> =
            LpmTrie::try_from(take(maps::EXCLUDED_NETS)?).map_err(map_err(maps::EXCLUDED_NETS))?;
        let mut nets6: LpmTrie<MapData, [u8; 16], u8> =
            LpmTrie::try_from(take(maps::EXCLUDED_NETS6)?)
                .map_err(map_err(maps::EXCLUDED_NETS6))?;
        let table = OrigDstTable {
            orig_dst: HashMap::try_from(take(maps::ORIG_DST)?).map_err(map_err(maps::ORIG_DST))?,
            orig_dst6: HashMap::try_from(take(maps::ORIG_DST6)?)
                .map_err(map_err(maps::ORIG_DST6))?,
            counters: PerCpuArray::try_from(take(maps::COUNTERS)?)
                .map_err(map_err(maps::COUNTERS))?,
            consumed: AtomicU64::new(0),
            agent_reads: match take(maps::CONSUMED)? {
                Map::LruHashMap(data) => data,
                _ => return Err(Error::MissingMap(maps::CONSUMED)),
            },
            sockmap,
        };
        if adopt {
            // The counters go on from the previous agent's; what it consumed is counted as
            // consumed (the few entries in flight at the handover are not worth a map walk).
            let published = table.sum(counters::ORIG_DST_PUBLISHED);
            table.consumed.store(published, Ordering::Relaxed);
        }
        let enrolled = HashMap::try_from(take(maps::ENROLLED)?).map_err(map_err(maps::ENROLLED))?;
        let spoof_guard =
            HashMap::try_from(take(maps::SPOOF_GUARD)?).map_err(map_err(maps::SPOOF_GUARD))?;
        let policy = PolicyMaps {
            pods: HashMap::try_from(take(maps::POLICY_PODS)?)
                .map_err(map_err(maps::POLICY_PODS))?,
            ports: HashMap::try_from(take(maps::POLICY_PORTS)?)
                .map_err(map_err(maps::POLICY_PORTS))?,
            nets: LpmTrie::try_from(take(maps::POLICY_NETS)?)
                .map_err(map_err(maps::POLICY_NETS))?,
            nets6: LpmTrie::try_from(take(maps::POLICY_NETS6)?)
                .map_err(map_err(maps::POLICY_NETS6))?,
            drops: PerCpuHashMap::try_from(take(maps::POLICY_DROPS)?)
                .map_err(map_err(maps::POLICY_DROPS))?,
            config: Array::try_from(take(maps::POLICY_CONFIG)?)
                .map_err(map_err(maps::POLICY_CONFIG))?,
            installed: StdHashMap::new(),
        };

        for port in &exclusions.ports {
            ports
                .insert(port.to_be(), 1, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        // Never captured, so never dialled by the proxy on a pod's behalf: what a pod means by
        // these is inside its own namespace (0.0.0.0 and loopback) or its own link.
        let always = [
            (Ipv4Addr::UNSPECIFIED, 32u8),
            (Ipv4Addr::new(127, 0, 0, 0), 8),
            (Ipv4Addr::new(169, 254, 0, 0), 16),
        ];
        let own = node_addrs.iter().map(|ip| (*ip, 32u8));
        for (net, len) in always
            .into_iter()
            .chain(own)
            .chain(exclusions.nets.iter().copied())
        {
            let key = aya::maps::lpm_trie::Key::new(u32::from(len), raw_ip(net));
            nets.insert(&key, 1, 0)
                .map_err(map_err(maps::EXCLUDED_NETS))?;
        }
        let always6 = [
            (Ipv6Addr::UNSPECIFIED, 128u8),
            (Ipv6Addr::LOCALHOST, 128),
            (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
            (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
        ];
        let own6 = node_addrs6.iter().map(|ip| (*ip, 128u8));
        for (net, len) in always6.into_iter().chain(own6) {
            let key = aya::maps::lpm_trie::Key::new(u32::from(len), net.octets());
            nets6
                .insert(&key, 1, 0)
                .map_err(map_err(maps::EXCLUDED_NETS6))?;
        }
        let node_netns = crate::podnet::own_netns_cookie().map_err(|source| Error::Io {
            what: "reading the node's network namespace cookie",
            source,
        })?;
        // Written last: until PROXY is set, connect4/6 redirect nothing.
        proxy
            .set(
                0,
                ProxyConfig {
                    outbound: raw_addr(outbound),
                    outbound6: outbound6.map(raw_addr6).unwrap_or_default(),
                    flags: if sockmap { proxy_flags::SOCKMAP } else { 0 },
                    node_netns,
                },
                0,
            )
            .map_err(map_err(maps::PROXY))?;
        // Pinned programs outlive the agent: from before they attach, they wait for its
        // heartbeat.
        let heartbeat = match &pins {
            Some(_) => Some(Heartbeat::start(liveness, liveness_timeout)?),
            None => None,
        };

        let mut cgroup_links = Vec::new();
        let mut classifiers = None;
        match &mut ebpf {
            Some(ebpf) => attach_all(ebpf, cgroup, pins.as_ref(), &mut cgroup_links)?,
            None => {
                // The previous agent's programs stay attached; only the TC programs are needed,
                // for the pods enrolled from now on.
                let pins = pins
                    .as_ref()
                    .ok_or(Error::MissingProgram(programs::ANTI_SPOOF))?;
                let open = |name: &'static str| {
                    SchedClassifier::from_pin(pins.program(name)).map_err(prog(name))
                };
                classifiers = Some(Classifiers {
                    anti_spoof: open(programs::ANTI_SPOOF)?,
                    inbound_policy: open(programs::INBOUND_POLICY)?,
                });
            }
        }

        Ok((
            Self {
                ebpf,
                classifiers,
                enrolled,
                spoof_guard,
                tc_links: StdHashMap::new(),
                policy,
                policy_links: StdHashMap::new(),
                pins,
                _cgroup_links: cgroup_links,
                adopted: adopt,
            },
            table,
            Capture { proxy, heartbeat },
        ))
    }

    /// Lets kubelet probes (sockets of the cgroup with this id) through on probe ports.
    pub fn set_probe_cgroup(&mut self, id: u64) -> Result<(), Error> {
        self.policy
            .config
            .set(0, PolicyConfig { probe_cgroup: id }, 0)
            .map_err(map_err(maps::POLICY_CONFIG))
    }

    /// Installs what the kernel enforces for plaintext to the pod behind `ifindex` (replacing
    /// what it had): new entries first, then the old ones that are gone.
    pub fn set_policy(&mut self, ifindex: u32, plaintext: &Plaintext) -> Result<(), Error> {
        let mut next = Installed::default();
        for entry in &plaintext.ports {
            let key = PolicyKey {
                ifindex,
                port: entry.port,
                _pad: 0,
            };
            let code = match &entry.verdict {
                PortVerdict::Allow => verdict::ALLOW,
                PortVerdict::Deny => verdict::DENY,
                PortVerdict::BySource(list) => {
                    for (cidr, allowed) in list {
                        let value = u8::from(!*allowed);
                        let len = 64 + u32::from(cidr.len);
                        match cidr.addr {
                            std::net::IpAddr::V4(ip) => next.nets.push((
                                len,
                                PolicyNet4 {
                                    key,
                                    ip: raw_ip(ip),
                                },
                                value,
                            )),
                            std::net::IpAddr::V6(ip) => next.nets6.push((
                                len,
                                PolicyNet6 {
                                    key,
                                    ip: ip.octets(),
                                },
                                value,
                            )),
                        }
                    }
                    verdict::BY_SOURCE
                }
            };
            let probes = if entry.probes { verdict::PROBES } else { 0 };
            next.ports.push((key, code | probes));
        }
        if !plaintext.ports.is_empty() {
            next.pod = Some(match pod_rules(plaintext) {
                // It fits: the fallback maps hold only the IPv6 ranges.
                Some(rules) => {
                    next.ports.clear();
                    next.nets.clear();
                    rules
                }
                None => PodRules {
                    fallback: 1,
                    ..PodRules::default()
                },
            });
        }
        let old = self.policy.installed.remove(&ifindex).unwrap_or_default();
        if old == next {
            self.policy.installed.insert(ifindex, next);
            return Ok(());
        }
        let m = &mut self.policy;
        // Source ranges before the ports that consult them.
        for (len, data, value) in &next.nets {
            let key = aya::maps::lpm_trie::Key::new(*len, *data);
            m.nets
                .insert(&key, value, 0)
                .map_err(map_err(maps::POLICY_NETS))?;
        }
        for (len, data, value) in &next.nets6 {
            let key = aya::maps::lpm_trie::Key::new(*len, *data);
            m.nets6
                .insert(&key, value, 0)
                .map_err(map_err(maps::POLICY_NETS6))?;
        }
        for (key, code) in &next.ports {
            m.ports
                .insert(key, code, 0)
                .map_err(map_err(maps::POLICY_PORTS))?;
        }
        // The pod's entry last: it is what makes the program look at the others.
        match &next.pod {
            Some(rules) => m
                .pods
                .insert(ifindex, rules, 0)
                .map_err(map_err(maps::POLICY_PODS))?,
            None => {
                let _ = m.pods.remove(&ifindex);
            }
        }
        for (key, _) in old
            .ports
            .iter()
            .filter(|(k, _)| !next.ports.iter().any(|(n, _)| n == k))
        {
            let _ = m.ports.remove(key);
        }
        for (len, data, _) in &old.nets {
            if !next.nets.iter().any(|(l, d, _)| l == len && d == data) {
                let _ = m.nets.remove(&aya::maps::lpm_trie::Key::new(*len, *data));
            }
        }
        for (len, data, _) in &old.nets6 {
            if !next.nets6.iter().any(|(l, d, _)| l == len && d == data) {
                let _ = m.nets6.remove(&aya::maps::lpm_trie::Key::new(*len, *data));
            }
        }
        m.installed.insert(ifindex, next);
        Ok(())
    }

    /// SYNs the inbound policy dropped, per (ifindex, port), since the pod was enrolled.
    pub fn policy_drops(&self) -> Vec<(u32, u16, u64)> {
        self.policy
            .drops
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k.ifindex, k.port, per_cpu.iter().sum()))
            .collect()
    }

    fn forget_policy(&mut self, ifindex: u32) {
        let _ = self.set_policy(ifindex, &Plaintext::default());
        self.policy.installed.remove(&ifindex);
        let keys: Vec<PolicyKey> = self
            .policy
            .drops
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in keys {
            let _ = self.policy.drops.remove(&k);
        }
    }

    /// Starts capturing a pod: anti-spoofing on its veth first, then redirection. On failure
    /// nothing of the pod stays behind.
    pub fn enroll(&mut self, pod: &Enrollment) -> Result<(), Error> {
        let result = self.try_enroll(pod);
        if result.is_err() {
            let _ = self.unenroll(pod);
        }
        result
    }

    fn try_enroll(&mut self, pod: &Enrollment) -> Result<(), Error> {
        let flags = if pod.fail_closed {
            pod_flags::FAIL_CLOSED
        } else {
            0
        };
        if pod.anti_spoof {
            self.spoof_guard
                .insert(
                    pod.host_ifindex,
                    PodAddrs {
                        ip4: raw_ip(pod.ip),
                        flags,
                        ip6: pod.ip6.map(|ip| ip.octets()).unwrap_or_default(),
                    },
                    0,
                )
                .map_err(map_err(maps::SPOOF_GUARD))?;
            if !self.tc_links.contains_key(&pod.host_ifindex) {
                let link = self.attach_tc(pod, programs::ANTI_SPOOF, TcAttachType::Ingress)?;
                self.tc_links.insert(pod.host_ifindex, link);
            }
            // Inbound policy for plaintext, on the way into the pod (nothing is restricted
            // until the reconciler writes the pod's entries).
            if !self.policy_links.contains_key(&pod.host_ifindex) {
                let link = self.attach_tc(pod, programs::INBOUND_POLICY, TcAttachType::Egress)?;
                self.policy_links.insert(pod.host_ifindex, link);
            }
        }
        self.enrolled
            .insert(
                pod.netns_cookie,
                EnrolledPod {
                    ip: raw_ip(pod.ip),
                    flags,
                },
                0,
            )
            .map_err(map_err(maps::ENROLLED))
    }

    /// Attaches TC program `name` to the pod's veth, pinned if the agent pins.
    fn attach_tc(
        &mut self,
        pod: &Enrollment,
        name: &'static str,
        side: TcAttachType,
    ) -> Result<TcLink, Error> {
        let ifname = pod.host_ifname.clone();
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.tc_link(pod.host_ifindex, side == TcAttachType::Ingress));
        if let Some(path) = &pin {
            // A previous agent's link on this interface: it stays.
            if let Ok(link) = PinnedLink::from_pin(path) {
                return Ok(TcLink::Pinned(link));
            }
        }
        let tc = self.classifier(name)?;
        let id = match tc.attach(&ifname, side) {
            Ok(link) => link,
            // Before Linux 6.6 (no TCX) aya attaches through netlink, which needs a clsact
            // qdisc on the interface.
            Err(_) => {
                let _ = aya::programs::tc::qdisc_add_clsact(&ifname);
                tc.attach(&ifname, side).map_err(prog(name))?
            }
        };
        let Some(path) = pin else {
            return Ok(TcLink::Owned(id));
        };
        let link = tc.take_link(id).map_err(prog(name))?;
        // Only TCX links are BPF links; a netlink filter (before 6.6) cannot be pinned and
        // goes with the agent.
        let fd = FdLink::try_from(link).map_err(|e| Error::Pin {
            what: name,
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let pinned = fd.pin(&path).map_err(|e| Error::Pin {
            what: name,
            path,
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(TcLink::Pinned(pinned))
    }

    /// TC program `name`: the loaded object's, or the adopted one.
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, Error> {
        if let Some(c) = &mut self.classifiers {
            return match name {
                programs::ANTI_SPOOF => Ok(&mut c.anti_spoof),
                _ => Ok(&mut c.inbound_policy),
            };
        }
        self.ebpf
            .as_mut()
            .and_then(|e| e.program_mut(name))
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(prog(name))
    }

    /// Detaches a TC link of `name`'s (an interface that is gone took it with it already).
    fn detach_tc(&mut self, name: &'static str, link: TcLink) -> Result<(), Error> {
        match link {
            TcLink::Owned(id) => {
                let _ = self.classifier(name)?.detach(id);
            }
            // Unpinned, the link is detached when its last descriptor (ours) closes.
            TcLink::Pinned(pinned) => drop(pinned.unpin()),
        }
        Ok(())
    }

    /// Whether the maps came from a previous agent and have not been swept yet.
    pub fn needs_sweep(&self) -> bool {
        self.adopted
    }

    /// Once an adopted datapath holds this agent's pods: removes what the previous agent left
    /// that this one did not write (pods gone while no agent ran, policy entries of a policy
    /// since changed). `cookies` and `ifindexes` are the enrolled pods'. Returns how many
    /// entries and pins went; a datapath this agent loaded itself has nothing to sweep.
    pub fn sweep(&mut self, cookies: &HashSet<u64>, ifindexes: &HashSet<u32>) -> usize {
        if !std::mem::take(&mut self.adopted) {
            return 0;
        }
        let mut removed = sweep_hash(&mut self.enrolled, |c| cookies.contains(c));
        removed += sweep_hash(&mut self.spoof_guard, |i| ifindexes.contains(i));
        let m = &mut self.policy;
        removed += sweep_hash(&mut m.pods, |i| {
            m.installed.get(i).is_some_and(|i| i.pod.is_some())
        });
        removed += sweep_hash(&mut m.ports, |key| {
            m.installed
                .get(&key.ifindex)
                .is_some_and(|i| i.ports.iter().any(|(k, _)| k == key))
        });
        removed += sweep_trie(&mut m.nets, |len, d| {
            m.installed
                .get(&d.key.ifindex)
                .is_some_and(|i| i.nets.iter().any(|(l, o, _)| *l == len && o == d))
        });
        removed += sweep_trie(&mut m.nets6, |len, d| {
            m.installed
                .get(&d.key.ifindex)
                .is_some_and(|i| i.nets6.iter().any(|(l, o, _)| *l == len && o == d))
        });
        let stale: Vec<PolicyKey> = m
            .drops
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !ifindexes.contains(&k.ifindex))
            .collect();
        for key in stale {
            removed += usize::from(m.drops.remove(&key).is_ok());
        }
        if let Some(pins) = &self.pins {
            for path in pins.stale_tc_links(&|i| ifindexes.contains(&i)) {
                removed += usize::from(std::fs::remove_file(path).is_ok());
            }
        }
        removed
    }

    /// Stops capturing a pod. Missing entries are not an error (the pod may be half gone).
    pub fn unenroll(&mut self, pod: &Enrollment) -> Result<(), Error> {
        let _ = self.enrolled.remove(&pod.netns_cookie);
        if !pod.anti_spoof {
            return Ok(());
        }
        let _ = self.spoof_guard.remove(&pod.host_ifindex);
        if let Some(link) = self.tc_links.remove(&pod.host_ifindex) {
            // The veth may already be gone, which detached the program with it.
            self.detach_tc(programs::ANTI_SPOOF, link)?;
        }
        if let Some(link) = self.policy_links.remove(&pod.host_ifindex) {
            self.detach_tc(programs::INBOUND_POLICY, link)?;
        }
        self.forget_policy(pod.host_ifindex);
        Ok(())
    }
}

/// The maps the agent reads or writes (pinned, so a successor can adopt them).
const USER_MAPS: &[&str] = &[
    maps::PROXY,
    maps::LIVENESS,
    maps::EXCLUDED_PORTS,
    maps::EXCLUDED_NETS,
    maps::EXCLUDED_NETS6,
    maps::ORIG_DST,
    maps::ORIG_DST6,
    maps::COUNTERS,
    maps::ENROLLED,
    maps::SPOOF_GUARD,
    maps::POLICY_PODS,
    maps::POLICY_PORTS,
    maps::POLICY_NETS,
    maps::POLICY_NETS6,
    maps::POLICY_DROPS,
    maps::POLICY_CONFIG,
    maps::CONSUMED,
];

/// Which build of the eBPF object this is (FNV-1a of its bytes): a successor adopts pinned
/// programs and maps only from the same build, whose map layouts are its own.
pub fn object_tag() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A pinned map, typed as the kernel says it is.
fn as_map(data: MapData) -> Result<Map, aya::maps::MapError> {
    use aya::maps::MapType;
    Ok(match data.info()?.map_type()? {
        MapType::Array => Map::Array(data),
        MapType::Hash => Map::HashMap(data),
        MapType::LruHash => Map::LruHashMap(data),
        MapType::LpmTrie => Map::LpmTrie(data),
        MapType::PerCpuArray => Map::PerCpuArray(data),
        MapType::PerCpuHash => Map::PerCpuHashMap(data),
        MapType::LruPerCpuHash => Map::PerCpuLruHashMap(data),
        _ => Map::Unsupported(data),
    })
}

/// Loads the freshly loaded object's programs and attaches the cgroup ones (pinned, with
/// `pins`); with `pins`, the TC programs are pinned too, for a successor to attach.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pins: Option<&PinDir>,
    cgroup_links: &mut Vec<OwnedFd>,
) -> Result<(), Error> {
    let cgroup_file = File::open(cgroup).map_err(|source| Error::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let mut pin_link = |name: &'static str, fd: std::os::fd::BorrowedFd<'_>, kind: u32| {
        let Some(pins) = pins else {
            return Ok(false);
        };
        let path = pins.link(name);
        let link =
            pinning::attach_pinned(fd, cgroup_file.as_fd(), kind, &path).map_err(|source| {
                Error::Pin {
                    what: name,
                    path,
                    source,
                }
            })?;
        cgroup_links.push(link);
        Ok::<_, Error>(true)
    };
    for (name, kind) in [
        (programs::CONNECT4, attach::CGROUP_INET4_CONNECT),
        (programs::CONNECT6, attach::CGROUP_INET6_CONNECT),
        (programs::GETPEERNAME4, attach::CGROUP_INET4_GETPEERNAME),
        (programs::GETPEERNAME6, attach::CGROUP_INET6_GETPEERNAME),
    ] {
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(prog(name))?;
        p.load().map_err(prog(name))?;
        if !pin_link(name, p.fd().map_err(prog(name))?.as_fd(), kind)? {
            p.attach(&cgroup_file, LINK_MODE).map_err(prog(name))?;
        }
    }
    let sockops: &mut SockOps = ebpf
        .program_mut(programs::SOCKOPS)
        .ok_or(Error::MissingProgram(programs::SOCKOPS))?
        .try_into()
        .map_err(prog(programs::SOCKOPS))?;
    sockops.load().map_err(prog(programs::SOCKOPS))?;
    let fd = sockops.fd().map_err(prog(programs::SOCKOPS))?.as_fd();
    if !pin_link(programs::SOCKOPS, fd, attach::CGROUP_SOCK_OPS)? {
        sockops
            .attach(&cgroup_file, LINK_MODE)
            .map_err(prog(programs::SOCKOPS))?;
    }
    // The shortcut's verdict program belongs to the pods' socket map, whatever `--sockmap` says
    // (off, no socket enters the map). Pinned, it stays attached for a successor: the
    // attachment lives as long as the map, which the pinned sockops program holds.
    let pod_socks = {
        let map = ebpf
            .map(maps::POD_SOCKS)
            .ok_or(Error::MissingMap(maps::POD_SOCKS))?;
        let socks: SockHash<&MapData, SockKey> =
            SockHash::try_from(map).map_err(map_err(maps::POD_SOCKS))?;
        socks.fd().try_clone().map_err(|source| Error::Io {
            what: "duplicating the POD_SOCKS map's descriptor",
            source,
        })?
    };
    let sk_msg: &mut SkMsg = ebpf
        .program_mut(programs::SK_MSG)
        .ok_or(Error::MissingProgram(programs::SK_MSG))?
        .try_into()
        .map_err(prog(programs::SK_MSG))?;
    sk_msg.load().map_err(prog(programs::SK_MSG))?;
    let link = sk_msg.attach(&pod_socks).map_err(prog(programs::SK_MSG))?;
    if pins.is_some() {
        let link = sk_msg.take_link(link).map_err(prog(programs::SK_MSG))?;
        std::mem::forget(link);
    }
    for name in [programs::ANTI_SPOOF, programs::INBOUND_POLICY] {
        let tc: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(prog(name))?;
        tc.load().map_err(prog(name))?;
        if let Some(pins) = pins {
            let path = pins.program(name);
            tc.pin(&path).map_err(|e| Error::Pin {
                what: name,
                path,
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    Ok(())
}

/// The TC programs of an adopted datapath (opened from their pins).
struct Classifiers {
    anti_spoof: SchedClassifier,
    inbound_policy: SchedClassifier,
}

/// Removes the entries of `map` whose key `ours` does not claim; how many went.
fn sweep_hash<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    ours: impl Fn(&K) -> bool,
) -> usize {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !ours(k))
        .collect();
    stale.iter().filter(|k| map.remove(k).is_ok()).count()
}

/// Removes the entries of `trie` that `ours` (prefix length, data) does not claim.
fn sweep_trie<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u8>,
    ours: impl Fn(u32, &K) -> bool,
) -> usize {
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !ours(k.prefix_len(), &k.data()))
        .collect();
    stale.iter().filter(|k| trie.remove(k).is_ok()).count()
}

/// `plaintext` as one [`PodRules`] entry, if it fits (at most [`RULE_PORTS`] ports of their
/// own, [`RULE_NETS`] IPv4 ranges per decision).
fn pod_rules(plaintext: &Plaintext) -> Option<PodRules> {
    let mut rules = PodRules::default();
    let own: Vec<_> = plaintext.ports.iter().filter(|e| e.port != 0).collect();
    let other = plaintext.ports.iter().find(|e| e.port == 0)?;
    if own.len() > RULE_PORTS {
        return None;
    }
    rules.nports = u8::try_from(own.len()).ok()?;
    for (slot, entry) in own
        .into_iter()
        .enumerate()
        .chain(std::iter::once((RULE_PORTS, other)))
    {
        if slot < RULE_PORTS {
            *rules.ports.get_mut(slot)? = entry.port;
        }
        let code = match &entry.verdict {
            PortVerdict::Allow => verdict::ALLOW,
            PortVerdict::Deny => verdict::DENY,
            PortVerdict::BySource(list) => {
                // Longest first: the first range that holds a source is its longest match.
                let mut v4: Vec<_> = list
                    .iter()
                    .filter_map(|(c, allowed)| match c.addr {
                        std::net::IpAddr::V4(ip) => Some((c.len, ip, *allowed)),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect();
                if v4.len() > RULE_NETS {
                    return None;
                }
                v4.sort_by_key(|v| std::cmp::Reverse(v.0));
                *rules.nets_len.get_mut(slot)? = u8::try_from(v4.len()).ok()?;
                for (i, (len, ip, allowed)) in v4.into_iter().enumerate() {
                    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                    *rules.nets.get_mut(slot)?.get_mut(i)? = Net4 {
                        net: (u32::from(ip) & mask).to_be(),
                        mask: mask.to_be(),
                    };
                    if allowed {
                        *rules.nets_allow.get_mut(slot)? |= 1 << i;
                    }
                }
                verdict::BY_SOURCE
            }
        };
        let probes = if entry.probes { verdict::PROBES } else { 0 };
        *rules.verdicts.get_mut(slot)? = code | probes;
    }
    Some(rules)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::policy::kernel::PortEntry;

    #[test]
    fn pod_rules_hold_small_policies_longest_range_first_and_refuse_large_ones() {
        let c = |s: &str| s.parse::<crate::policy::Cidr>().unwrap();
        let plaintext = Plaintext {
            ports: vec![
                PortEntry {
                    port: 0,
                    verdict: PortVerdict::Deny,
                    probes: true,
                },
                PortEntry {
                    port: 8080,
                    verdict: PortVerdict::BySource(vec![
                        (c("0.0.0.0/0"), false),
                        (c("10.1.0.0/16"), true),
                        (c("::/0"), false),
                    ]),
                    probes: false,
                },
            ],
        };
        let r = pod_rules(&plaintext).unwrap();
        assert_eq!((r.fallback, r.nports, r.ports[0]), (0, 1, 8080));
        assert_eq!(r.verdicts[RULE_PORTS], verdict::DENY | verdict::PROBES);
        assert_eq!(r.verdicts[0], verdict::BY_SOURCE);
        // IPv4 only (IPv6 goes to the trie), the /16 before the /0, as the packet holds them.
        assert_eq!(r.nets_len[0], 2);
        assert_eq!(
            r.nets[0][0],
            Net4 {
                net: u32::from_ne_bytes([10, 1, 0, 0]),
                mask: u32::from_ne_bytes([255, 255, 0, 0]),
            }
        );
        assert_eq!(r.nets[0][1], Net4::default());
        assert_eq!(r.nets_allow[0], 0b01);
        // More ports of their own than fit: the fallback maps.
        let many = Plaintext {
            ports: (0..=9)
                .map(|port| PortEntry {
                    port,
                    verdict: PortVerdict::Deny,
                    probes: false,
                })
                .collect(),
        };
        assert!(pod_rules(&many).is_none());
    }
}
