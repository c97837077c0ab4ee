//! The socket-map shortcut (`--sockmap=true`, experimental, off by default): what pods send to
//! the node proxy is queued by the kernel straight onto the proxy's socket, within a window the
//! proxy's reads open. Every byte must arrive, in order, both ways, through half-closes,
//! resets, a proxy that falls behind (back to TCP) and a thousand connections at once; the
//! socket maps must empty when the connections end; without the flag everything is plain TCP,
//! blocking readers included. Real programs, real sockets, real agents. Run as root, serially
//! (`cargo xtask test`).
//!
//! The clients here read the way event-driven programs do (wait for readiness, then read): a
//! pod socket in a socket map takes the kernel's sockmap receive path, where a plain blocking
//! read can fail with EAGAIN (which is why the shortcut is off by default).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use mesh_agent_tests::{bpf, harness::*, serial, Agent, PodSpec, Testbed};

const MIB: u64 = 1 << 20;
const DIGEST_PORT: &str = "9393";
const SINK_PORT: &str = "9191";
const SOCKMAP: &[&str] = &["--sockmap=true"];

/// The standard scenario plus `local`, a pod on n1 (the client's node); both `web` (n2) and
/// `local` run the digest server.
fn digest_bed() -> Testbed {
    let bed = bed_with(vec![PodSpec::new("local", 0, "local")]);
    for pod in ["web", "local"] {
        let mut server = bed.pod_command(pod, meshtest()).unwrap();
        server.args(["digest-server", DIGEST_PORT]);
        bed.spawn(server).unwrap();
    }
    let mut sink = bed.pod_command("local", meshtest()).unwrap();
    sink.args(["sink", SINK_PORT]);
    bed.spawn(sink).unwrap();
    bed
}

fn digest_addr(bed: &Testbed, pod: &str) -> String {
    format!("{}:{DIGEST_PORT}", bed.pod(pod).ip)
}

/// Entries in every map of this name (both agents' maps).
fn entries(map: &str) -> u64 {
    bpf::maps_named(map)
        .unwrap()
        .iter()
        .map(|m| m.count().unwrap())
        .sum()
}

fn assert_maps_empty(n1: &Agent) {
    eventually("the shortcut's maps to empty", || {
        ["POD_SOCKS", "AGENT_SOCKS", "FLOWS", "CONSUMED"]
            .iter()
            .all(|m| entries(m) == 0)
    });
    assert_eq!(
        metric(n1, "mesh_ebpf_map_entries", &[("map", "sockmap_flows")]),
        0.0
    );
}

/// `conns` connections from the client pod to `to`'s digest server, each sending `up` bytes
/// and receiving `down`, checked by SHA-256 both ways; `reads`: `poll` or `blocking`.
fn transfer(bed: &Testbed, to: &str, up: u64, down: u64, conns: u32, reads: &str) {
    let out = meshtest_in(
        bed,
        "client",
        &[
            "digest",
            &digest_addr(bed, to),
            &up.to_string(),
            &down.to_string(),
            &conns.to_string(),
            reads,
        ],
    );
    assert_eq!(out["up.bytes"], up.to_string(), "{out:?}");
    assert_eq!(out["down.bytes"], down.to_string(), "{out:?}");
}

#[test]
fn bulk_transfers_arrive_intact_both_ways_with_the_sends_skipping_tcp() {
    let _serial = serial();
    let bed = digest_bed();
    let (n1, _n2) = agents_with(&bed, SOCKMAP);

    // 100 MiB each way at once, then a half-close (the server reads to EOF and still answers),
    // cross-node (through HBONE) and to a pod of the same node.
    for to in ["web", "local"] {
        transfer(&bed, to, 100 * MIB, 100 * MIB, 1, "poll");
    }
    // Both connections were set up for the shortcut and the kernel carried pod bytes onto the
    // proxy's sockets (how many depends on how far the proxy kept up: past the window the rest
    // goes by TCP).
    assert_eq!(metric(&n1, "mesh_ebpf_sockmap_connections_total", &[]), 2.0);
    let skipped = metric(&n1, "mesh_ebpf_sockmap_bytes_total", &[]);
    assert!(skipped >= MIB as f64, "only {skipped} bytes skipped TCP");
    assert_eq!(
        metric(
            &n1,
            "mesh_ebpf_sockmap_fallbacks_total",
            &[("reason", "peerless")]
        ),
        0.0,
        "the proxy's end was in the map before the pod's first send"
    );
    assert_maps_empty(&n1);
}

#[test]
fn a_proxy_that_falls_behind_sends_the_rest_by_tcp_in_order() {
    let _serial = serial();
    let bed = digest_bed();
    let (n1, _n2) = agents_with(&bed, SOCKMAP);

    // Four connections of 3,200 writes of 64 KiB each: at least once the sends outrun the
    // proxy's forwarding of them to the pod on the other node by the 1 MiB window, and from
    // then on that connection is TCP. The bytes queued before the switch are read first.
    let mut windows = 0.0;
    for attempt in 0..5 {
        transfer(&bed, "web", 200 * MIB, 0, 4, "poll");
        windows = metric(
            &n1,
            "mesh_ebpf_sockmap_fallbacks_total",
            &[("reason", "window")],
        );
        if windows > 0.0 {
            break;
        }
        eprintln!("attempt {attempt}: the proxy kept up with every send");
    }
    assert!(windows > 0.0, "no connection ever fell a window behind");
    assert_maps_empty(&n1);
}

#[test]
fn a_thousand_connections_at_once_and_resets_leave_the_maps_empty() {
    let _serial = serial();
    let bed = digest_bed();
    let (n1, _n2) = agents_with(&bed, SOCKMAP);

    transfer(&bed, "web", 64 << 10, 64 << 10, 1000, "poll");
    assert!(metric(&n1, "mesh_ebpf_sockmap_connections_total", &[]) >= 1000.0);
    assert_maps_empty(&n1);

    // A pod that resets its connection mid-transfer: the proxy's end goes too.
    let addr = format!("{}:{SINK_PORT}", bed.pod("local").ip);
    for _ in 0..10 {
        meshtest_in(&bed, "client", &["reset", &addr, &(4 * MIB).to_string()]);
    }
    assert_maps_empty(&n1);
    eventually("the proxy to close the reset connections", || {
        metric(
            &n1,
            "mesh_tcp_connections_closed_total",
            &[("reporter", "source"), ("destination_workload", "local")],
        ) == 10.0
    });
    // And the next connection is served as before.
    transfer(&bed, "local", MIB, MIB, 1, "poll");
}

#[test]
fn by_default_every_byte_goes_by_tcp_and_blocking_readers_are_untouched() {
    let _serial = serial();
    let bed = digest_bed();
    let (n1, _n2) = agents(&bed);

    // Full duplex with plain blocking reads, which the sockmap receive path can fail.
    for to in ["web", "local"] {
        transfer(&bed, to, 10 * MIB, 10 * MIB, 1, "blocking");
    }
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        2.0
    );
    assert_eq!(metric(&n1, "mesh_ebpf_sockmap_connections_total", &[]), 0.0);
    assert_eq!(metric(&n1, "mesh_ebpf_sockmap_bytes_total", &[]), 0.0);
    assert_eq!(entries("POD_SOCKS") + entries("AGENT_SOCKS"), 0);
}
