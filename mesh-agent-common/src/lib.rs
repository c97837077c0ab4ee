//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with its padding spelled out, so the kernel and user space agree
//! on the layout byte for byte. Addresses are IPv4 in network byte order, stored as the `u32`
//! whose in-memory bytes are the four octets (what `struct sockaddr_in` holds); ports are `u16`
//! in network byte order.
#![no_std]

/// Map names, as they appear in the object file.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const PROXY: &str = "PROXY";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_NETS: &str = "EXCLUDED_NETS";
    pub const REDIRECTS: &str = "REDIRECTS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SPOOF_GUARD: &str = "SPOOF_GUARD";
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names, as they appear in the object file.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const ANTI_SPOOF: &str = "mesh_anti_spoof";
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

/// An enrolled pod network namespace (value of `ENROLLED`, keyed by netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address.
    pub ip: u32,
    pub _pad: u32,
}

/// Where the node proxy listens (the only entry of `PROXY`). `ip == 0` means "not ready":
/// nothing is redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    pub outbound: SockAddrV4,
}

/// A redirected connection (value of `REDIRECTS`, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// The address the application dialled.
    pub orig_dst: SockAddrV4,
    /// The client's own address once established (zero before).
    pub client: SockAddrV4,
}

/// Indexes into the `COUNTERS` per-CPU array.
pub mod counters {
    /// Connections rewritten to the node proxy by `connect4`.
    pub const REDIRECTED: u32 = 0;
    /// Packets from a pod whose source address is not the pod's own, dropped by TC.
    pub const SPOOFED_DROPPED: u32 = 1;
    /// Established redirected connections whose original destination could not be published.
    pub const ORIG_DST_PUBLISH_FAILED: u32 = 2;
    pub const LEN: u32 = 3;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit padding.
    unsafe impl aya::Pod for SockAddrV4 {}
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for ProxyConfig {}
    unsafe impl aya::Pod for Redirect {}
}
