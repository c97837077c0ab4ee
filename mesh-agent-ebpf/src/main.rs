//! Kernel side of mesh-agent: steers enrolled pods' TCP connections into the node proxy.
//!
//! - `cgroup/connect4` rewrites a pod's `connect()` to the node proxy and remembers where the
//!   application wanted to go and who asked (its network namespace), keyed by socket cookie
//!   (`cgroup/connect6` does the same for IPv4-mapped destinations on IPv6 sockets);
//! - `sockops` publishes that original destination and the client's network namespace keyed by
//!   the client's (IP, port), which is what the proxy sees when it accepts; the proxy deletes
//!   it once read;
//! - `cgroup/getpeername4`/`6` show the application the address it dialled, not the proxy;
//! - a TC classifier on each pod's host-side veth drops packets with a forged source address.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, classifier, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};
use mesh_agent_common::{
    counters, marks, EnrolledPod, OrigDst, PodAddrs, ProxyConfig, Redirect, SockAddrV4,
    MAX_CONNECTIONS, MAX_EXCLUSIONS, MAX_PODS,
};

/// `connect()` and `getpeername()` programs must return 1 to let the call proceed.
const SOCK_ADDR_ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_HLEN: usize = 14;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as stored.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Enrolled pod network namespaces, keyed by netns cookie.
#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(MAX_PODS, 0);

/// The node proxy's outbound listener (index 0).
#[map]
static PROXY: Array<ProxyConfig> = Array::with_max_entries(1, 0);

/// Destination ports never redirected (network byte order).
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUSIONS, 0);

/// Destination networks never redirected: the node's own addresses, loopback, unspecified,
/// link-local, configured CIDRs.
#[map]
static EXCLUDED_NETS: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// Redirected sockets, keyed by socket cookie.
#[map]
static REDIRECTS: LruHashMap<u64, Redirect> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Original destinations keyed by the client's address as the proxy sees it on accept. The
/// proxy deletes each entry when it reads it, so a client that sends and closes before the
/// proxy accepts still has its destination waiting; entries nobody reads age out (LRU).
#[map]
static ORIG_DST: LruHashMap<SockAddrV4, OrigDst> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// The source addresses allowed out of each pod's host-side veth, keyed by ifindex.
#[map]
static SPOOF_GUARD: HashMap<u32, PodAddrs> = HashMap::with_max_entries(MAX_PODS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // Fail open: whatever goes wrong, the connection proceeds to where the app asked.
    let _ = try_connect4(&ctx);
    SOCK_ADDR_ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), ()> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = SockAddrV4::new(sa.user_ip4, sa.user_port as u16);
    let proxy = capture(ctx, dst)?;
    sa.user_ip4 = proxy.ip;
    sa.user_port = proxy.port as u32;
    Ok(())
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // Fail open, as connect4.
    let _ = try_connect6(&ctx);
    SOCK_ADDR_ALLOW
}

/// IPv6 sockets dialling an IPv4-mapped address (`::ffff:a.b.c.d`, Java's default for IPv4)
/// are IPv4 connections underneath: captured like connect4, sent to the proxy's mapped address.
fn try_connect6(ctx: &SockAddrContext) -> Result<(), ()> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip6[0] != 0 || sa.user_ip6[1] != 0 || sa.user_ip6[2] != V4_MAPPED {
        // Native IPv6 is not captured yet: it proceeds as dialled.
        return Ok(());
    }
    let dst = SockAddrV4::new(sa.user_ip6[3], sa.user_port as u16);
    let proxy = capture(ctx, dst)?;
    sa.user_ip6[3] = proxy.ip;
    sa.user_port = proxy.port as u32;
    Ok(())
}

/// Whether a `connect()` to `dst` is captured. If so, remembers where it was going and who
/// made it (keyed by socket cookie) and returns the proxy's address to dial instead.
fn capture(ctx: &SockAddrContext, dst: SockAddrV4) -> Result<SockAddrV4, ()> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the call.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return Err(());
    }
    // SAFETY: `sk` is the socket being connected, valid for the call (PTR_TO_SOCKET).
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == marks::OUTBOUND || mark == marks::INBOUND {
        // The agent itself dialling from inside a pod's namespace.
        return Err(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if unsafe { ENROLLED.get(&netns_cookie) }.is_none() {
        return Err(());
    }
    let proxy = PROXY.get(0).ok_or(())?.outbound;
    if proxy.ip == 0 {
        return Err(());
    }
    // SAFETY: read-only lookups.
    if unsafe { EXCLUDED_PORTS.get(&dst.port) }.is_some()
        || EXCLUDED_NETS.get(&Key::new(32, dst.ip)).is_some()
    {
        return Err(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let redirect = Redirect {
        orig_dst: dst,
        client: SockAddrV4::default(),
        netns_cookie,
    };
    // If we cannot remember where it was going, do not redirect it.
    REDIRECTS.insert(&cookie, &redirect, 0).map_err(|_| ())?;
    count(counters::REDIRECTED);
    Ok(proxy)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if let Some(r) = unsafe { REDIRECTS.get(&cookie) } {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = r.orig_dst.ip;
        sa.user_port = r.orig_dst.port as u32;
    }
    SOCK_ADDR_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if let Some(r) = unsafe { REDIRECTS.get(&cookie) } {
        // Only IPv4-mapped destinations are captured on IPv6 sockets.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = V4_MAPPED;
        sa.user_ip6[3] = r.orig_dst.ip;
        sa.user_port = r.orig_dst.port as u32;
    }
    SOCK_ADDR_ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    // sockops return values are ignored for these callbacks; nothing here can block a socket.
    let _ = try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    // SAFETY: valid context for the duration of the call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    let redirect = REDIRECTS.get_ptr_mut(&cookie).ok_or(())?;
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state changes so the entry goes away when the socket closes.
            ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                .map_err(|_| ())?;
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // local_port is in host byte order; everything we store is network order. For an
            // IPv6 socket on an IPv4-mapped connection local_ip4 holds the IPv4 source.
            let client = SockAddrV4::new(ctx.local_ip4(), (ctx.local_port() as u16).to_be());
            // SAFETY: pointer from a successful lookup; LRU entries stay valid while we run.
            let published = unsafe {
                (*redirect).client = client;
                OrigDst {
                    dst: (*redirect).orig_dst,
                    netns_cookie: (*redirect).netns_cookie,
                }
            };
            if ORIG_DST.insert(&client, &published, 0).is_err() {
                count(counters::ORIG_DST_PUBLISH_FAILED);
            } else {
                count(counters::ORIG_DST_PUBLISHED);
            }
        }
        _ => {
            // The ORIG_DST entry stays: the proxy may not have accepted this connection yet
            // (a client that sends and closes at once), and deletes it when it reads it.
            if ctx.arg(1) == BPF_TCP_CLOSE && REDIRECTS.remove(&cookie).is_ok() {
                count(counters::REDIRECT_CLOSED);
            }
        }
    }
    Ok(())
}

#[classifier]
pub fn mesh_anti_spoof(ctx: TcContext) -> i32 {
    match try_anti_spoof(&ctx) {
        Ok(action) => action,
        // Fail open: a packet too short to parse carries no address the node would act on.
        Err(()) => TC_ACT_OK,
    }
}

/// A guarded pod may send IPv4 from its own address, IPv6 from its own, link-local or the
/// unspecified address (neighbour discovery), and ARP for its own address; nothing else.
fn try_anti_spoof(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: valid skb for the duration of the call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup.
    let Some(allowed) = (unsafe { SPOOF_GUARD.get(&ifindex) }) else {
        return Ok(TC_ACT_OK);
    };
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    let honest = match ethertype {
        // Source address at offset 12 of the IPv4 header, kept in network byte order.
        ETH_P_IP => ctx.load::<u32>(ETH_HLEN + 12).map_err(|_| ())? == allowed.ip4,
        ETH_P_IPV6 => {
            // Source address at offset 8 of the IPv6 header.
            let src = ctx.load::<[u8; 16]>(ETH_HLEN + 8).map_err(|_| ())?;
            let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
            let unspecified = src == [0; 16];
            let own = allowed.ip6 != [0; 16] && src == allowed.ip6;
            own || link_local || unspecified
        }
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP: the sender protocol address follows the 8-byte header and
            // the 6-byte sender hardware address. 0.0.0.0 is an address probe (RFC 5227).
            let sender = ctx.load::<u32>(ETH_HLEN + 14).map_err(|_| ())?;
            sender == allowed.ip4 || sender == 0
        }
        _ => {
            count(counters::FOREIGN_DROPPED);
            return Ok(TC_ACT_SHOT);
        }
    };
    if honest {
        Ok(TC_ACT_OK)
    } else {
        count(counters::SPOOFED_DROPPED);
        Ok(TC_ACT_SHOT)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
