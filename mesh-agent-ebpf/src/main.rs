//! Kernel side of mesh-agent: steers enrolled pods' TCP connections into the node proxy.
//!
//! - `cgroup/connect4` rewrites a pod's `connect()` to the node proxy and remembers where the
//!   application wanted to go, keyed by socket cookie;
//! - `sockops` publishes that original destination keyed by the client's (IP, port), which is
//!   what the proxy sees when it accepts, and forgets both entries when the socket closes;
//! - `cgroup/getpeername4` shows the application the address it dialled, not the proxy;
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
    counters, EnrolledPod, ProxyConfig, Redirect, SockAddrV4, MAX_CONNECTIONS, MAX_EXCLUSIONS,
    MAX_PODS,
};

/// `connect()` and `getpeername()` programs must return 1 to let the call proceed.
const SOCK_ADDR_ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_HLEN: usize = 14;

/// Enrolled pod network namespaces, keyed by netns cookie.
#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(MAX_PODS, 0);

/// The node proxy's outbound listener (index 0).
#[map]
static PROXY: Array<ProxyConfig> = Array::with_max_entries(1, 0);

/// Destination ports never redirected (network byte order).
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUSIONS, 0);

/// Destination networks never redirected: the node's own addresses, loopback, configured CIDRs.
#[map]
static EXCLUDED_NETS: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// Redirected sockets, keyed by socket cookie.
#[map]
static REDIRECTS: LruHashMap<u64, Redirect> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Original destinations keyed by the client's address as the proxy sees it on accept.
#[map]
static ORIG_DST: LruHashMap<SockAddrV4, SockAddrV4> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// The one source address allowed out of each pod's host-side veth, keyed by ifindex.
#[map]
static SPOOF_GUARD: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PODS, 0);

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
    if sa.protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return Ok(());
    }
    let proxy = PROXY.get(0).ok_or(())?.outbound;
    if proxy.ip == 0 {
        return Ok(());
    }
    let dst = SockAddrV4::new(sa.user_ip4, sa.user_port as u16);
    // SAFETY: read-only lookups.
    if unsafe { EXCLUDED_PORTS.get(&dst.port) }.is_some()
        || EXCLUDED_NETS.get(&Key::new(32, dst.ip)).is_some()
    {
        return Ok(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let redirect = Redirect {
        orig_dst: dst,
        client: SockAddrV4::default(),
    };
    // If we cannot remember where it was going, do not redirect it.
    REDIRECTS.insert(&cookie, &redirect, 0).map_err(|_| ())?;
    sa.user_ip4 = proxy.ip;
    sa.user_port = proxy.port as u32;
    count(counters::REDIRECTED);
    Ok(())
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
            // Ask for state changes so the entries go away when the socket closes.
            ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                .map_err(|_| ())?;
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // local_port is in host byte order; everything we store is network order.
            let client = SockAddrV4::new(ctx.local_ip4(), (ctx.local_port() as u16).to_be());
            // SAFETY: pointer from a successful lookup; LRU entries stay valid while we run.
            let orig_dst = unsafe {
                (*redirect).client = client;
                (*redirect).orig_dst
            };
            if ORIG_DST.insert(&client, &orig_dst, 0).is_err() {
                count(counters::ORIG_DST_PUBLISH_FAILED);
            }
        }
        _ => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // SAFETY: as above.
                let client = unsafe { (*redirect).client };
                let _ = ORIG_DST.remove(&client);
                let _ = REDIRECTS.remove(&cookie);
            }
        }
    }
    Ok(())
}

#[classifier]
pub fn mesh_anti_spoof(ctx: TcContext) -> i32 {
    match try_anti_spoof(&ctx) {
        Ok(action) => action,
        // Fail open: a packet we cannot parse is not evidence of spoofing.
        Err(()) => TC_ACT_OK,
    }
}

fn try_anti_spoof(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: valid skb for the duration of the call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup.
    let Some(&allowed) = (unsafe { SPOOF_GUARD.get(&ifindex) }) else {
        return Ok(TC_ACT_OK);
    };
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if ethertype != ETH_P_IP {
        // ARP and friends carry no IPv4 source to check.
        return Ok(TC_ACT_OK);
    }
    // Source address at offset 12 of the IPv4 header, kept in network byte order.
    let saddr = ctx.load::<u32>(ETH_HLEN + 12).map_err(|_| ())?;
    if saddr == allowed {
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
