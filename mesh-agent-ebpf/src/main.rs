//! Kernel side of mesh-agent: steers enrolled pods' TCP connections into the node proxy.
//!
//! - `cgroup/connect4` rewrites a pod's `connect()` to the node proxy and remembers where the
//!   application wanted to go and who asked (its network namespace), keyed by socket cookie
//!   (`cgroup/connect6` does the same for IPv4-mapped destinations on IPv6 sockets);
//! - `sockops` publishes that original destination and the client's network namespace keyed by
//!   the client's (IP, port), which is what the proxy sees when it accepts; the proxy deletes
//!   it once read;
//! - `cgroup/getpeername4`/`6` show the application the address it dialled, not the proxy;
//! - a TC classifier on each pod's host-side veth drops packets with a forged source address;
//! - another, on the same veth's egress (towards the pod), applies the pod's inbound policy to
//!   new plaintext TCP connections (SYN): allow, deny, or by source address, per port; what
//!   the agent delivers itself carries a socket mark and passes;
//! - with the socket-map shortcut on, `sockops` also puts both ends of each captured connection
//!   into socket maps, and `sk_msg` queues what the pod sends straight onto the proxy's socket,
//!   within a window the proxy's reads open (see `mesh_agent_common::sockmap`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, classifier, map, sk_msg, sock_ops},
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash,
    },
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use mesh_agent_common::{
    counters, marks, pod_flags, proxy_flags, sockmap, verdict, EnrolledPod, Flow, OrigDst,
    OrigDst6, PodAddrs, PodRules, PolicyConfig, PolicyKey, PolicyNet4, PolicyNet6, ProxyConfig,
    Redirect, Redirect6, SockAddrV4, SockAddrV6, SockKey, MAX_CONNECTIONS, MAX_EXCLUSIONS,
    MAX_PODS, MAX_POLICY_ENTRIES, RULE_NETS, RULE_PORTS,
};

/// `connect()` and `getpeername()` programs must return 1 to let the call proceed.
const SOCK_ADDR_ALLOW: i32 = 1;
/// ... and 0 to fail it with `EPERM`.
const SOCK_ADDR_REFUSE: i32 = 0;
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

/// The IPv6 counterpart of `EXCLUDED_NETS`: unspecified, loopback, link-local, multicast, the
/// node's own addresses.
#[map]
static EXCLUDED_NETS6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// Redirected sockets with a native IPv6 destination, keyed by socket cookie.
#[map]
static REDIRECTS6: LruHashMap<u64, Redirect6> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// `ORIG_DST` for IPv6 clients.
#[map]
static ORIG_DST6: LruHashMap<SockAddrV6, OrigDst6> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

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

/// Inbound policy for plaintext, per pod veth. No entry: the pod's plaintext is not
/// restricted.
#[map]
static POLICY_PODS: HashMap<u32, PodRules> = HashMap::with_max_entries(MAX_PODS, BPF_F_NO_PREALLOC);

/// A policy too large for [`PodRules`], per (pod veth, port); port 0 for the pod's other
/// ports.
#[map]
static POLICY_PORTS: HashMap<PolicyKey, u8> =
    HashMap::with_max_entries(MAX_POLICY_ENTRIES, BPF_F_NO_PREALLOC);

/// Source ranges of `BY_SOURCE` ports (value 0: allowed).
#[map]
static POLICY_NETS: LpmTrie<PolicyNet4, u8> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static POLICY_NETS6: LpmTrie<PolicyNet6, u8> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, BPF_F_NO_PREALLOC);

/// SYNs dropped per (pod veth, port), per CPU.
#[map]
static POLICY_DROPS: LruPerCpuHashMap<PolicyKey, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map]
static POLICY_CONFIG: Array<PolicyConfig> = Array::with_max_entries(1, 0);

/// The agent's heartbeat: the `CLOCK_MONOTONIC` time (ns) until which it vouches that it serves
/// the node. 0: an agent whose links die with it, which needs no heartbeat.
#[map]
static LIVENESS: Array<u64> = Array::with_max_entries(1, 0);

/// Pods' ends of connections whose sends `mesh_sk_msg` may redirect (it is attached to this
/// map), by their own [`SockKey`].
#[map]
static POD_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

/// The agent's ends of those connections (sockets of the node's namespace), by their own key:
/// where the pods' sends are queued.
#[map]
static AGENT_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

/// How far each pod socket of `POD_SOCKS` has gone, by its key. Removed when it closes.
#[map]
static FLOWS: LruHashMap<SockKey, Flow> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Bytes the agent has read from each of its sockets of `AGENT_SOCKS` (written by the agent
/// every `sockmap::REPORT_EVERY`, removed when it is done with the connection).
#[map]
static CONSUMED: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Whether an agent serves the node now: pinned programs outlive their agent, and then pods
/// must not be steered into a listener nobody serves.
fn agent_alive() -> bool {
    match LIVENESS.get(0) {
        // SAFETY: plain helper.
        Some(&deadline) => deadline == 0 || unsafe { bpf_ktime_get_ns() } < deadline,
        None => true,
    }
}

/// What becomes of a `connect()` the programs looked at.
enum Steer<A> {
    /// To the node proxy, at this address.
    Proxy(A),
    /// Refused (`EPERM`): a fail-closed pod while no agent serves it.
    Refuse,
}

/// A capturable connection no agent can take: fail-closed pods are refused, the others go
/// where they dialled (`Err`).
fn unserved<A>(flags: u32) -> Result<Steer<A>, ()> {
    if flags & pod_flags::FAIL_CLOSED != 0 {
        count(counters::FAIL_CLOSED_REFUSED);
        Ok(Steer::Refuse)
    } else {
        Err(())
    }
}

fn count(index: u32) {
    add(index, 1);
}

fn add(index: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *c += n };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // Fail open: whatever goes wrong, the connection proceeds to where the app asked (unless
    // the pod chose fail-closed and no agent serves it).
    match try_connect4(&ctx) {
        Ok(Steer::Refuse) => SOCK_ADDR_REFUSE,
        _ => SOCK_ADDR_ALLOW,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<Steer<()>, ()> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = SockAddrV4::new(sa.user_ip4, sa.user_port as u16);
    let Steer::Proxy(proxy) = capture(ctx, dst)? else {
        return Ok(Steer::Refuse);
    };
    sa.user_ip4 = proxy.ip;
    sa.user_port = proxy.port as u32;
    Ok(Steer::Proxy(()))
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // Fail open, as connect4.
    match try_connect6(&ctx) {
        Ok(Steer::Refuse) => SOCK_ADDR_REFUSE,
        _ => SOCK_ADDR_ALLOW,
    }
}

/// IPv6 sockets dialling an IPv4-mapped address (`::ffff:a.b.c.d`, Java's default for IPv4)
/// are IPv4 connections underneath: captured like connect4, sent to the proxy's mapped address.
/// Native IPv6 destinations go to the proxy's IPv6 listener.
fn try_connect6(ctx: &SockAddrContext) -> Result<Steer<()>, ()> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip6;
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED {
        let dst = SockAddrV4::new(ip[3], sa.user_port as u16);
        let Steer::Proxy(proxy) = capture(ctx, dst)? else {
            return Ok(Steer::Refuse);
        };
        sa.user_ip6[3] = proxy.ip;
        sa.user_port = proxy.port as u32;
        return Ok(Steer::Proxy(()));
    }
    let (netns_cookie, flags) = capturable(ctx)?;
    let config = PROXY.get(0).ok_or(())?;
    let proxy = config.outbound6;
    let dst = SockAddrV6::new(ip, sa.user_port as u16);
    if EXCLUDED_NETS6.get(&Key::new(128, bytes6(&ip))).is_some() {
        return Err(());
    }
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(&dst.port) }.is_some() {
        return Err(());
    }
    if config.outbound.ip == 0 || !agent_alive() {
        return unserved(flags);
    }
    if proxy.port == 0 {
        // The node has no IPv6 listener: native IPv6 proceeds as dialled.
        return Err(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let redirect = Redirect6 {
        orig_dst: dst,
        client: SockAddrV6::default(),
        netns_cookie,
    };
    REDIRECTS6.insert(&cookie, &redirect, 0).map_err(|_| ())?;
    count(counters::REDIRECTED);
    set_user_ip6(sa, proxy.ip);
    sa.user_port = proxy.port as u32;
    Ok(Steer::Proxy(()))
}

/// Writes `user_ip6` one word at a time at fixed offsets from the context: the verifier
/// refuses a store through a context pointer that was moved first (what a whole-array copy
/// compiles to).
fn set_user_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: in-bounds fields of the context struct.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}

/// The bytes of an IPv6 address stored as four network-order words.
fn bytes6(ip: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = ip[i].to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

/// Whether the socket connecting is one to capture at all: TCP, not the agent's own, from an
/// enrolled pod's namespace. Returns that namespace's cookie and the pod's [`pod_flags`].
fn capturable(ctx: &SockAddrContext) -> Result<(u64, u32), ()> {
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
    let pod = unsafe { ENROLLED.get(&netns_cookie) }.ok_or(())?;
    Ok((netns_cookie, pod.flags))
}

/// Whether a `connect()` to IPv4 `dst` is captured. If so, remembers where it was going and
/// who made it (keyed by socket cookie) and returns the proxy's address to dial instead.
fn capture(ctx: &SockAddrContext, dst: SockAddrV4) -> Result<Steer<SockAddrV4>, ()> {
    let (netns_cookie, flags) = capturable(ctx)?;
    // SAFETY: read-only lookups.
    if unsafe { EXCLUDED_PORTS.get(&dst.port) }.is_some()
        || EXCLUDED_NETS.get(&Key::new(32, dst.ip)).is_some()
    {
        return Err(());
    }
    let proxy = PROXY.get(0).ok_or(())?.outbound;
    if proxy.ip == 0 || !agent_alive() {
        return unserved(flags);
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
    Ok(Steer::Proxy(proxy))
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
    // SAFETY: read-only lookups of plain-old-data values.
    if let Some(r) = unsafe { REDIRECTS.get(&cookie) } {
        // An IPv4-mapped destination.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_user_ip6(sa, [0, 0, V4_MAPPED, r.orig_dst.ip]);
        sa.user_port = r.orig_dst.port as u32;
    } else if let Some(r) = unsafe { REDIRECTS6.get(&cookie) } {
        let sa = unsafe { &mut *ctx.sock_addr };
        set_user_ip6(sa, r.orig_dst.ip);
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
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return agent_end(ctx);
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    // SAFETY: valid context for the duration of the call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    if let Some(redirect) = REDIRECTS.get_ptr_mut(&cookie) {
        match op {
            BPF_SOCK_OPS_TCP_CONNECT_CB => watch_state(ctx)?,
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                // local_port is in host byte order; everything we store is network order. For
                // an IPv6 socket on an IPv4-mapped connection local_ip4 holds the IPv4 source.
                let client = SockAddrV4::new(ctx.local_ip4(), (ctx.local_port() as u16).to_be());
                // SAFETY: pointer from a successful lookup; LRU entries stay valid while we run.
                let published = unsafe {
                    (*redirect).client = client;
                    OrigDst {
                        dst: (*redirect).orig_dst,
                        netns_cookie: (*redirect).netns_cookie,
                    }
                };
                count_published(ORIG_DST.insert(&client, &published, 0).is_ok());
                pod_end(ctx);
            }
            // The ORIG_DST entry stays: the proxy may not have accepted this connection yet
            // (a client that sends and closes at once), and deletes it when it reads it.
            _ if ctx.arg(1) == BPF_TCP_CLOSE && REDIRECTS.remove(&cookie).is_ok() => {
                count(counters::REDIRECT_CLOSED);
                if FLOWS.remove(&sock_key(ctx)).is_ok() {
                    count(counters::SOCKMAP_FLOWS_CLOSED);
                }
            }
            _ => {}
        }
    } else if let Some(redirect) = REDIRECTS6.get_ptr_mut(&cookie) {
        match op {
            BPF_SOCK_OPS_TCP_CONNECT_CB => watch_state(ctx)?,
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                let client = SockAddrV6::new(local_ip6(ctx), (ctx.local_port() as u16).to_be());
                // SAFETY: as above.
                let published = unsafe {
                    (*redirect).client = client;
                    OrigDst6 {
                        dst: (*redirect).orig_dst,
                        _pad: 0,
                        netns_cookie: (*redirect).netns_cookie,
                    }
                };
                count_published(ORIG_DST6.insert(&client, &published, 0).is_ok());
            }
            _ if ctx.arg(1) == BPF_TCP_CLOSE && REDIRECTS6.remove(&cookie).is_ok() => {
                count(counters::REDIRECT_CLOSED);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The socket-map shortcut, if the agent asked for it and serves the node.
fn sockmap_config() -> Option<&'static ProxyConfig> {
    let config = PROXY.get(0)?;
    (config.flags & proxy_flags::SOCKMAP != 0 && config.outbound.ip != 0 && agent_alive())
        .then_some(config)
}

/// A port as `bpf_sock_ops`/`sk_msg_md` give the remote one (network byte order, in the upper
/// half of the word on the kernels that shift it there), as stored in keys.
fn remote_port(raw: u32) -> u16 {
    if raw & 0xffff == 0 {
        (raw >> 16) as u16
    } else {
        raw as u16
    }
}

/// The connection as this socket sees it. (For an IPv6 socket on an IPv4-mapped connection the
/// IPv4 fields hold the addresses.)
fn sock_key(ctx: &SockOpsContext) -> SockKey {
    SockKey {
        local_ip: ctx.local_ip4(),
        remote_ip: ctx.remote_ip4(),
        local_port: (ctx.local_port() as u16).to_be(),
        remote_port: remote_port(ctx.remote_port()),
    }
}

/// A captured pod socket just connected to the proxy: its sends may skip TCP. Not when the
/// proxy's end is missing at the first send (see `mesh_sk_msg`).
fn pod_end(ctx: &SockOpsContext) {
    if sockmap_config().is_none() {
        return;
    }
    let mut key = sock_key(ctx);
    if FLOWS.insert(&key, &Flow::default(), 0).is_err() {
        return;
    }
    // SAFETY: the context is valid for the call.
    if POD_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, 0)
        .is_ok()
    {
        count(counters::SOCKMAP_FLOWS);
    } else {
        let _ = FLOWS.remove(&key);
    }
}

/// An accepted socket: if it is the proxy's end of a captured connection (the outbound
/// listener's address, in the node's namespace, so no pod can forge one), it is where that
/// pod's sends are queued.
fn agent_end(ctx: &SockOpsContext) -> Result<(), ()> {
    let config = sockmap_config().ok_or(())?;
    let mut key = sock_key(ctx);
    if key.local_ip != config.outbound.ip || key.local_port != config.outbound.port {
        return Ok(());
    }
    // SAFETY: helper valid for sock_ops programs (Linux 5.15+).
    if unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) } != config.node_netns {
        return Ok(());
    }
    // SAFETY: the context is valid for the call.
    AGENT_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, 0)
        .map_err(|_| ())
}

/// Runs on every send of a socket in `POD_SOCKS`: while the proxy keeps up (less than
/// `sockmap::WINDOW` redirected and not read) the bytes go straight onto the proxy's socket;
/// otherwise, or when the proxy's end is not in `AGENT_SOCKS`, they go by TCP, and so does the
/// rest of the connection (the only switch that keeps the byte order).
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is valid for the call.
    let md = unsafe { &*ctx.msg };
    let key = SockKey {
        local_ip: md.local_ip4,
        remote_ip: md.remote_ip4,
        local_port: (md.local_port as u16).to_be(),
        remote_port: remote_port(md.remote_port),
    };
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return SK_PASS;
    };
    // SAFETY: pointer from a successful lookup; only this socket's sends (serialised by the
    // socket lock) write its entry.
    let flow = unsafe { &mut *flow };
    if flow.state != sockmap::REDIRECT {
        return SK_PASS;
    }
    let mut peer = key.reversed();
    let size = u64::from(ctx.size());
    // SAFETY: read-only lookup of a plain value.
    let consumed = unsafe { CONSUMED.get(&peer) }.copied().unwrap_or(0);
    if flow.redirected.saturating_sub(consumed) + size > sockmap::WINDOW {
        flow.state = sockmap::TCP;
        count(counters::SOCKMAP_WINDOW_FALLBACKS);
        return SK_PASS;
    }
    if AGENT_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        flow.state = sockmap::TCP;
        count(counters::SOCKMAP_PEERLESS_FALLBACKS);
        return SK_PASS;
    }
    flow.redirected += size;
    add(counters::SOCKMAP_BYTES, size);
    SK_PASS
}

/// The socket's IPv6 address, read one word at a time at fixed offsets from the context (the
/// verifier refuses the moved context pointer a whole-array copy compiles to).
fn local_ip6(ctx: &SockOpsContext) -> [u32; 4] {
    // SAFETY: in-bounds fields of the context struct, valid for the call.
    unsafe {
        let ops = ctx.ops;
        [
            core::ptr::read_volatile(&(*ops).local_ip6[0]),
            core::ptr::read_volatile(&(*ops).local_ip6[1]),
            core::ptr::read_volatile(&(*ops).local_ip6[2]),
            core::ptr::read_volatile(&(*ops).local_ip6[3]),
        ]
    }
}

/// Asks for state changes so the entry goes away when the socket closes.
fn watch_state(ctx: &SockOpsContext) -> Result<(), ()> {
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .map_err(|_| ())
}

fn count_published(ok: bool) {
    count(if ok {
        counters::ORIG_DST_PUBLISHED
    } else {
        counters::ORIG_DST_PUBLISH_FAILED
    });
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
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let honest = match ethertype {
        // Source address at offset 12 of the IPv4 header, kept in network byte order.
        ETH_P_IP => read::<u32>(ctx, ETH_HLEN + 12)? == allowed.ip4,
        ETH_P_IPV6 => {
            // Source address at offset 8 of the IPv6 header.
            let src = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
            let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
            let unspecified = src == [0; 16];
            let own = allowed.ip6 != [0; 16] && src == allowed.ip6;
            own || link_local || unspecified
        }
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP: the sender protocol address follows the 8-byte header and
            // the 6-byte sender hardware address. 0.0.0.0 is an address probe (RFC 5227).
            let sender = read::<u32>(ctx, ETH_HLEN + 14)?;
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

#[classifier]
pub fn mesh_inbound_policy(ctx: TcContext) -> i32 {
    match try_inbound_policy(&ctx) {
        Ok(action) => action,
        // Not a packet policy reads (too short for its headers): the pod's stack drops a
        // truncated TCP header itself.
        Err(()) => TC_ACT_OK,
    }
}

const IPPROTO_TCP_U8: u8 = 6;
/// Where the TCP header starts behind an IPv4 header without options, and an IPv6 header
/// without extensions.
const V4_TCP: usize = ETH_HLEN + 20;
const V6_TCP: usize = ETH_HLEN + 40;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Where the TCP header of a packet towards a pod starts, if it carries the start of one.
enum Transport {
    Tcp(usize),
    /// A later fragment: no TCP header, harmless without the first fragment.
    Later,
    /// A fragment that would overwrite the first one's TCP header: never legitimate.
    Overlapping,
    Other,
}

/// A value at `offset` of the packet's linear data, read directly (no helper call), if the
/// data holds it.
#[inline(always)]
fn at<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    // SAFETY: bounds checked against data_end just above; unaligned read of plain bytes.
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// [`at`], falling back to a copy when the bytes are not in the linear data.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    match at(ctx, offset) {
        Ok(v) => Ok(v),
        Err(()) => ctx.load::<T>(offset).map_err(|_| ()),
    }
}

fn try_inbound_policy(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: valid skb for the duration of the call.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if mark == marks::DELIVERED {
        return Ok(TC_ACT_OK);
    }
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let (transport, v6) = match ethertype {
        ETH_P_IP => (ipv4_transport(ctx)?, false),
        ETH_P_IPV6 => (ipv6_transport(ctx)?, true),
        _ => return Ok(TC_ACT_OK),
    };
    let tcp = match transport {
        Transport::Tcp(at) => Some(at),
        Transport::Later | Transport::Other => return Ok(TC_ACT_OK),
        Transport::Overlapping => None,
    };
    let port = match tcp {
        Some(at) => {
            // Direct reads need offsets the verifier knows: the usual headers (IPv4 without
            // options, IPv6 without extensions); a copy for the others.
            let (flags, port) = match at {
                V4_TCP => (read::<u8>(ctx, V4_TCP + 13)?, read::<u16>(ctx, V4_TCP + 2)?),
                V6_TCP => (read::<u8>(ctx, V6_TCP + 13)?, read::<u16>(ctx, V6_TCP + 2)?),
                _ => (
                    ctx.load::<u8>(at + 13).map_err(|_| ())?,
                    ctx.load::<u16>(at + 2).map_err(|_| ())?,
                ),
            };
            if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
                return Ok(TC_ACT_OK);
            }
            u16::from_be(port)
        }
        None => 0,
    };
    if !agent_alive() {
        // No agent vouches for the pod's inbound policy: plaintext flows as without the mesh,
        // unless the pod is fail-closed (then only the node, for probes, and excluded networks
        // still reach it).
        // SAFETY: read-only lookup.
        let fail_closed = unsafe { SPOOF_GUARD.get(&ifindex) }
            .is_some_and(|pod| pod.flags & pod_flags::FAIL_CLOSED != 0);
        if !fail_closed || from_node(ctx, v6)? || is_kubelet(ctx) {
            return Ok(TC_ACT_OK);
        }
        count(counters::FAIL_CLOSED_REFUSED);
        return Ok(TC_ACT_SHOT);
    }
    // SAFETY: read-only lookups.
    let Some(rules) = (unsafe { POLICY_PODS.get(&ifindex) }) else {
        return Ok(TC_ACT_OK);
    };
    if tcp.is_none() {
        // A fragment overwriting a TCP header, or a header chain no stack sends.
        return Ok(drop_syn(ifindex, 0));
    }
    let mut key = PolicyKey {
        ifindex,
        port,
        _pad: 0,
    };
    let (decision, slot) = match rules.fallback {
        0 => {
            let mut slot = RULE_PORTS;
            for i in 0..RULE_PORTS {
                if i >= usize::from(rules.nports) {
                    break;
                }
                if rules.ports.get(i) == Some(&port) {
                    slot = i;
                    break;
                }
            }
            if slot == RULE_PORTS {
                key.port = 0;
            }
            (rules.verdicts.get(slot).copied().ok_or(())?, Some(slot))
        }
        // SAFETY: read-only lookups.
        _ => match unsafe { POLICY_PORTS.get(&key) } {
            Some(v) => (*v, None),
            None => {
                key.port = 0;
                match unsafe { POLICY_PORTS.get(&key) } {
                    Some(v) => (*v, None),
                    None => return Ok(TC_ACT_OK),
                }
            }
        },
    };
    if decision & verdict::PROBES != 0 && is_kubelet(ctx) {
        return Ok(TC_ACT_OK);
    }
    let allowed = match decision & verdict::MASK {
        verdict::ALLOW => true,
        verdict::BY_SOURCE if !v6 => {
            // Source address at offset 12 of the IPv4 header, network byte order.
            let ip = read::<u32>(ctx, ETH_HLEN + 12)?;
            match slot {
                Some(slot) => by_source4(rules, slot, ip),
                None => {
                    let lookup = Key::new(64 + 32, PolicyNet4 { key, ip });
                    POLICY_NETS.get(&lookup).is_some_and(|v| *v == 0)
                }
            }
        }
        verdict::BY_SOURCE => {
            let ip = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
            let lookup = Key::new(64 + 128, PolicyNet6 { key, ip });
            POLICY_NETS6.get(&lookup).is_some_and(|v| *v == 0)
        }
        _ => false,
    };
    if allowed {
        Ok(TC_ACT_OK)
    } else {
        Ok(drop_syn(ifindex, port))
    }
}

/// The first of the slot's IPv4 ranges (longest first) that holds `ip` decides; none: denied.
#[inline(always)]
fn by_source4(rules: &PodRules, slot: usize, ip: u32) -> bool {
    let (Some(nets), Some(len), Some(allow)) = (
        rules.nets.get(slot),
        rules.nets_len.get(slot),
        rules.nets_allow.get(slot),
    ) else {
        return false;
    };
    for i in 0..RULE_NETS {
        if i >= usize::from(*len) {
            break;
        }
        let Some(n) = nets.get(i) else { break };
        if ip & n.mask == n.net {
            return allow & (1 << i) != 0;
        }
    }
    false
}

/// Whether the packet comes from an address the mesh never handles: one of the node's own (the
/// kubelet's probes), or a network the operator excluded (`--exclude-cidr`).
fn from_node(ctx: &TcContext, v6: bool) -> Result<bool, ()> {
    Ok(if v6 {
        let ip = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
        EXCLUDED_NETS6.get(&Key::new(128, ip)).is_some()
    } else {
        let ip = read::<u32>(ctx, ETH_HLEN + 12)?;
        EXCLUDED_NETS.get(&Key::new(32, ip)).is_some()
    })
}

/// Whether the packet's socket belongs to the kubelet (by its cgroup, as configured).
fn is_kubelet(ctx: &TcContext) -> bool {
    let Some(config) = POLICY_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: plain helper on the program's own skb.
    config.probe_cgroup != 0
        && unsafe { aya_ebpf::helpers::bpf_skb_cgroup_id(ctx.skb.skb) } == config.probe_cgroup
}

fn drop_syn(ifindex: u32, port: u16) -> i32 {
    count(counters::POLICY_DROPPED);
    let key = PolicyKey {
        ifindex,
        port,
        _pad: 0,
    };
    match POLICY_DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot; no other writer while we run.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = POLICY_DROPS.insert(&key, &1, 0);
        }
    }
    TC_ACT_SHOT
}

fn ipv4_transport(ctx: &TcContext) -> Result<Transport, ()> {
    let ver_ihl = read::<u8>(ctx, ETH_HLEN)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    let protocol = read::<u8>(ctx, ETH_HLEN + 9)?;
    if protocol != IPPROTO_TCP_U8 {
        return Ok(Transport::Other);
    }
    // Fragment offset, in 8-byte units.
    let offset = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & 0x1fff;
    Ok(match offset {
        0 => Transport::Tcp(ETH_HLEN + ihl),
        // The TCP flags are at byte 13 of the first fragment's payload.
        1 => Transport::Overlapping,
        _ => Transport::Later,
    })
}

/// Walks up to four IPv6 extension headers to the transport header.
fn ipv6_transport(ctx: &TcContext) -> Result<Transport, ()> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DEST_OPTS: u8 = 60;
    let mut next = read::<u8>(ctx, ETH_HLEN + 6)?;
    let mut at = ETH_HLEN + 40;
    for _ in 0..4 {
        match next {
            IPPROTO_TCP_U8 => return Ok(Transport::Tcp(at)),
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                next = ctx.load::<u8>(at).map_err(|_| ())?;
                let len = ctx.load::<u8>(at + 1).map_err(|_| ())?;
                at += (usize::from(len) + 1) * 8;
            }
            FRAGMENT => {
                let offset = u16::from_be(read::<u16>(ctx, at + 2)?) >> 3;
                next = ctx.load::<u8>(at).map_err(|_| ())?;
                at += 8;
                if offset != 0 {
                    return Ok(match (next, offset) {
                        (IPPROTO_TCP_U8, 1) => Transport::Overlapping,
                        _ => Transport::Later,
                    });
                }
            }
            _ => return Ok(Transport::Other),
        }
    }
    // More extension headers than any stack sends before TCP.
    Ok(Transport::Overlapping)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
