//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with its padding spelled out, so the kernel and user space agree
//! on the layout byte for byte. IPv4 addresses are in network byte order, stored as the `u32`
//! whose in-memory bytes are the four octets (what `struct sockaddr_in` holds); IPv6 addresses
//! as four such words (what `bpf_sock_addr.user_ip6` holds); ports are `u16` in network byte
//! order.
#![no_std]

/// Map names, as they appear in the object file.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const PROXY: &str = "PROXY";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_NETS: &str = "EXCLUDED_NETS";
    pub const REDIRECTS: &str = "REDIRECTS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const EXCLUDED_NETS6: &str = "EXCLUDED_NETS6";
    pub const REDIRECTS6: &str = "REDIRECTS6";
    pub const ORIG_DST6: &str = "ORIG_DST6";
    pub const SPOOF_GUARD: &str = "SPOOF_GUARD";
    pub const COUNTERS: &str = "COUNTERS";
    pub const POLICY_PODS: &str = "POLICY_PODS";
    pub const POLICY_PORTS: &str = "POLICY_PORTS";
    pub const POLICY_NETS: &str = "POLICY_NETS";
    pub const POLICY_NETS6: &str = "POLICY_NETS6";
    pub const POLICY_DROPS: &str = "POLICY_DROPS";
    pub const POLICY_CONFIG: &str = "POLICY_CONFIG";
    pub const LIVENESS: &str = "LIVENESS";
    pub const POD_SOCKS: &str = "POD_SOCKS";
    pub const AGENT_SOCKS: &str = "AGENT_SOCKS";
    pub const FLOWS: &str = "FLOWS";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const CONSUMED: &str = "CONSUMED";
}

/// Program names, as they appear in the object file.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const ANTI_SPOOF: &str = "mesh_anti_spoof";
    pub const INBOUND_POLICY: &str = "mesh_inbound_policy";
    pub const SK_MSG: &str = "mesh_sk_msg";
}

/// Socket marks the agent puts on the sockets it opens inside a pod's network namespace. The
/// capture programs leave marked sockets alone (the agent dialling on a pod's behalf must not be
/// captured again). Marks never leave the pod's namespace: the kernel clears them when a packet
/// crosses the veth.
pub mod marks {
    /// An outbound connection the proxy opens from the client pod's namespace.
    pub const OUTBOUND: u32 = 0x5a0;
    /// A connection the proxy delivers to a pod with the remote client's address as its source
    /// (transparent). Inside the pod, packets so marked route to the local stack, which is how
    /// the pod's replies to a remote address come back to the proxy's socket.
    pub const INBOUND: u32 = 0x5a1;
    /// A connection the proxy delivers to a pod from the node's own namespace (the client's
    /// address unknown or not usable): the inbound policy program lets it through, the agent
    /// having decided it. Only a process with CAP_NET_ADMIN on the node can set it, and the
    /// kernel clears marks when packets cross from a pod's namespace.
    pub const DELIVERED: u32 = 0x5a2;
    /// The bits the two marks differ in are outside this mask; the policy-routing rule matches
    /// `INBOUND` exactly under it.
    pub const MASK: u32 = 0xfff;
}

/// Capacity of the per-connection maps. They are LRU maps, so a burst beyond this evicts the
/// oldest entries instead of failing new connections.
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Capacity of the enrolled-pod and anti-spoofing maps.
pub const MAX_PODS: u32 = 1_024;
/// Capacity of the exclusion maps.
pub const MAX_EXCLUSIONS: u32 = 256;

/// An IPv4 socket address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddrV4 {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl SockAddrV4 {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// An IPv6 socket address: the 16 address bytes as four network-order words, port in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddrV6 {
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

impl SockAddrV6 {
    pub const fn new(ip: [u32; 4], port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// An enrolled pod network namespace (value of `ENROLLED`, keyed by netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address.
    pub ip: u32,
    /// [`pod_flags`].
    pub flags: u32,
}

/// What a pod asks of the datapath (`EnrolledPod::flags`, `PodAddrs::flags`).
pub mod pod_flags {
    /// While no agent serves the node (none running, or its heartbeat in `LIVENESS` lapsed, or
    /// it is draining), the pod's captured connections are refused instead of going directly,
    /// and plaintext connections to it are dropped (but those from the node's addresses, for
    /// probes, and from excluded networks).
    pub const FAIL_CLOSED: u32 = 1;
}

/// Where the node proxy listens (the only entry of `PROXY`). `ip == 0` means "not ready":
/// nothing is redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    pub outbound: SockAddrV4,
    /// The IPv6 outbound listener; all-zero when the node has no IPv6 address (native IPv6 is
    /// then not captured).
    pub outbound6: SockAddrV6,
    /// [`proxy_flags`].
    pub flags: u32,
    /// The network namespace cookie of the node (where the proxy's sockets live): only sockets
    /// of this namespace may be taken for the agent's in the socket maps.
    pub node_netns: u64,
}

/// What the proxy asks of the programs (`ProxyConfig::flags`).
pub mod proxy_flags {
    /// Pods' sends to the agent skip TCP: the pod's socket and the agent's end of each captured
    /// (or delivered) connection go into the socket maps, and what the pod sends is queued
    /// straight onto the agent's socket (see [`crate::sockmap`]). Off: plain TCP, as before.
    pub const SOCKMAP: u32 = 1;
}

/// The socket-map shortcut between pods and the agent.
///
/// Only the direction whose reader is the agent is redirected (pod → agent): the agent reports
/// how much it has read (`CONSUMED`), so the bytes queued on its socket stay under [`WINDOW`].
/// A redirect into a socket bypasses that socket's receive buffer and the sender never blocks;
/// without the report nothing would bound the queue of a reader that stopped reading. Past the
/// window, or when the agent's end is not in `AGENT_SOCKS`, the direction goes back to TCP for
/// the rest of the connection: the kernel hands the reader the redirected bytes before any it
/// receives by TCP, so switching that way keeps the order (the other way round could not).
/// The agent → pod direction always stays TCP: nothing tells the agent what a pod has read.
pub mod sockmap {
    /// Bytes a pod may have redirected and the agent not yet read, per connection.
    pub const WINDOW: u64 = 1 << 20;
    /// The agent updates `CONSUMED` each time it has read this much more.
    pub const REPORT_EVERY: u64 = 128 << 10;
    /// [`super::Flow::state`]: sends are redirected.
    pub const REDIRECT: u32 = 0;
    /// [`super::Flow::state`]: back on TCP for good.
    pub const TCP: u32 = 1;
}

/// A TCP connection as one of its sockets sees it: its own address, then its peer's (keys of
/// the socket maps and of `FLOWS`/`CONSUMED`). The two sockets of a connection have reversed
/// keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockKey {
    /// The key of the other end of the connection.
    pub const fn reversed(self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// A pod socket whose sends may be redirected (value of `FLOWS`, keyed by its [`SockKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes redirected so far.
    pub redirected: u64,
    /// [`sockmap::REDIRECT`] or [`sockmap::TCP`].
    pub state: u32,
    pub _pad: u32,
}

/// A redirected connection (value of `REDIRECTS`, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// The address the application dialled.
    pub orig_dst: SockAddrV4,
    /// The client's own address once established (zero before).
    pub client: SockAddrV4,
    /// The network namespace the connecting socket lives in, as the kernel saw it at
    /// `connect()`: who the client is.
    pub netns_cookie: u64,
}

/// A redirected IPv6 connection (value of `REDIRECTS6`, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect6 {
    pub orig_dst: SockAddrV6,
    pub client: SockAddrV6,
    pub netns_cookie: u64,
}

/// [`OrigDst`] for IPv6 clients (value of `ORIG_DST6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst6 {
    pub dst: SockAddrV6,
    pub _pad: u32,
    pub netns_cookie: u64,
}

/// What the proxy learns about an accepted connection (value of `ORIG_DST`, keyed by the
/// client's address as the proxy sees it). The proxy deletes the entry once read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub dst: SockAddrV4,
    pub netns_cookie: u64,
}

/// The addresses a pod may send from (value of `SPOOF_GUARD`, keyed by the ifindex of its
/// host-side veth). An all-zero `ip6` means the pod has no IPv6 address: only link-local and
/// unspecified IPv6 sources pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    pub ip4: u32,
    /// [`pod_flags`].
    pub flags: u32,
    /// Network byte order, as in the IPv6 header.
    pub ip6: [u8; 16],
}

/// Indexes into the `COUNTERS` per-CPU array.
pub mod counters {
    /// Connections rewritten to the node proxy by `connect4`/`connect6` (entries added to
    /// `REDIRECTS`).
    pub const REDIRECTED: u32 = 0;
    /// Packets from a pod whose source address is not the pod's own, dropped by TC.
    pub const SPOOFED_DROPPED: u32 = 1;
    /// Established redirected connections whose original destination could not be published.
    pub const ORIG_DST_PUBLISH_FAILED: u32 = 2;
    /// Redirected sockets that closed (entries removed from `REDIRECTS`).
    pub const REDIRECT_CLOSED: u32 = 3;
    /// Original destinations published to `ORIG_DST`.
    pub const ORIG_DST_PUBLISHED: u32 = 4;
    /// Frames from a pod of a kind a pod has no business sending (neither IPv4, IPv6 nor ARP),
    /// dropped by TC.
    pub const FOREIGN_DROPPED: u32 = 5;
    /// New TCP connections to a pod that its inbound policy refuses for plaintext, dropped by
    /// TC (per pod and port in `POLICY_DROPS`).
    pub const POLICY_DROPPED: u32 = 6;
    /// Connections of fail-closed pods refused while no agent served them: `connect()`s
    /// failed with `EPERM`, plaintext SYNs towards them dropped.
    pub const FAIL_CLOSED_REFUSED: u32 = 7;
    /// Pod connections set up for the socket-map shortcut (pod socket in `POD_SOCKS`).
    pub const SOCKMAP_FLOWS: u32 = 8;
    /// Bytes pods sent straight onto the agent's sockets.
    pub const SOCKMAP_BYTES: u32 = 9;
    /// Flows that went back to TCP because the agent fell a window behind.
    pub const SOCKMAP_WINDOW_FALLBACKS: u32 = 10;
    /// Flows that went back to TCP because the agent's end was not in `AGENT_SOCKS`.
    pub const SOCKMAP_PEERLESS_FALLBACKS: u32 = 11;
    /// Those pod sockets that closed (entries removed from `FLOWS`).
    pub const SOCKMAP_FLOWS_CLOSED: u32 = 12;
    pub const LEN: u32 = 13;
}

/// Entries of the inbound policy maps (pods × ports with a decision of their own).
pub const MAX_POLICY_ENTRIES: u32 = 16_384;

/// A pod's port in the inbound policy maps: the ifindex of the pod's host-side veth and the
/// destination port (host byte order; 0 stands for every port without an entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub ifindex: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `POLICY_NETS` key data: the port's key, then the IPv4 source (network byte order). The
/// LPM prefix length is 64 plus the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyNet4 {
    pub key: PolicyKey,
    pub ip: u32,
}

/// `POLICY_NETS6` key data: the port's key, then the IPv6 source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyNet6 {
    pub key: PolicyKey,
    pub ip: [u8; 16],
}

/// Ports with a decision of their own that fit in [`PodRules`].
pub const RULE_PORTS: usize = 8;
/// IPv4 source ranges per decision that fit in [`PodRules`].
pub const RULE_NETS: usize = 16;

/// An IPv4 range: network and mask, in network byte order as in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net4 {
    pub net: u32,
    pub mask: u32,
}

/// One pod's inbound policy for plaintext, found with one lookup (`POLICY_PODS`, keyed by the
/// ifindex of its host-side veth) and scanned: the ports with a decision of their own, the
/// decision for every other port, and for decisions by source, the IPv4 ranges longest first
/// (the first that holds the source decides). IPv6 sources are looked up in `POLICY_NETS6`.
/// A policy that does not fit is marked `fallback`: `POLICY_PORTS` and `POLICY_NETS` hold it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRules {
    pub fallback: u8,
    /// Slots of `ports` in use.
    pub nports: u8,
    pub _pad: [u8; 6],
    pub ports: [u16; RULE_PORTS],
    /// The decision (a `verdict` byte) of each port slot; the last: every other port.
    pub verdicts: [u8; RULE_PORTS + 1],
    /// Ranges in use per slot.
    pub nets_len: [u8; RULE_PORTS + 1],
    /// Bit `i`: range `i` of the slot allows.
    pub nets_allow: [u16; RULE_PORTS + 1],
    pub _pad2: [u8; 4],
    pub nets: [[Net4; RULE_NETS]; RULE_PORTS + 1],
}

/// What the inbound policy program is told once (`POLICY_CONFIG`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The cgroup v2 id of the kubelet, whose probes pass on probe ports; 0: none given.
    pub probe_cgroup: u64,
}

/// `POLICY_PORTS` values: a verdict, and whether kubelet probes pass.
pub mod verdict {
    pub const ALLOW: u8 = 0;
    pub const DENY: u8 = 1;
    /// By the source's longest match in `POLICY_NETS`/`POLICY_NETS6` (value 0 allows).
    pub const BY_SOURCE: u8 = 2;
    pub const MASK: u8 = 3;
    pub const PROBES: u8 = 4;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit padding.
    unsafe impl aya::Pod for SockAddrV4 {}
    unsafe impl aya::Pod for SockAddrV6 {}
    unsafe impl aya::Pod for Redirect6 {}
    unsafe impl aya::Pod for OrigDst6 {}
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for ProxyConfig {}
    unsafe impl aya::Pod for Redirect {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PodAddrs {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyNet4 {}
    unsafe impl aya::Pod for PolicyNet6 {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for PodRules {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for Flow {}
}
