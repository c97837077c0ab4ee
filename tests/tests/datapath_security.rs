//! What a pod must not get from the agent, and what it must keep: no reach into the node, its
//! own address as the source everywhere, identity bound to its network namespace (also across
//! a sandbox restart), IPv6 sockets captured and IPv6 spoofing dropped, bounded connections,
//! and every byte of a connection that closes before the proxy accepts it.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use mesh_agent_tests::{harness::*, netns, serial, PodSpec};

#[test]
fn a_pod_cannot_reach_the_node_or_its_loopback_through_the_proxy() {
    let _serial = serial();
    let bed = bed();
    // A service of the node bound to its loopback only, as kubelet's and etcd's are.
    let mut secret = bed.node_command("n1", meshtest()).unwrap();
    secret.args(["serve", "127.0.0.1:7070", "node-secret"]);
    bed.spawn(secret).unwrap();
    let (n1, _n2) = agents(&bed);
    let on_node = || bed.node_command("n1", meshtest()).unwrap();
    eventually("the node's loopback service to listen", || {
        let mut c = on_node();
        c.args(["get", "127.0.0.1:7070", "/stats"]);
        output(c).status.success()
    });

    let node_ip = bed.node("n1").ip;
    for addr in [
        "0.0.0.0:15000".to_owned(),
        "127.0.0.1:15000".to_owned(),
        format!("{node_ip}:15000"),
        "127.0.0.1:7070".to_owned(),
        "0.0.0.0:7070".to_owned(),
        format!("{node_ip}:7070"),
    ] {
        let mut get = bed.pod_command("client", meshtest()).unwrap();
        get.args(["get", &addr, "/certs"]);
        let leaked = must_fail(get, &format!("GET {addr} from the client pod"));
        assert!(!leaked.contains("serial"), "{addr} leaked {leaked}");
        assert!(!leaked.contains("node-secret"), "{addr} leaked {leaked}");
    }
    // Nothing reached the node's service, nothing was redirected, nothing dialled.
    let stats = fetch_path(on_node(), "127.0.0.1:7070", "/stats");
    assert_eq!(stats.body.trim(), "requests=0");
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        0.0
    );
    assert_eq!(metric(&n1, "mesh_tcp_connections_opened_total", &[]), 0.0);
    assert_eq!(metric(&n1, "mesh_tcp_connect_failures_total", &[]), 0.0);
    // The admin port is there for the node itself (so the refusals above were not luck).
    assert_eq!(n1.admin("/certs").unwrap().status, 200);
    // Control: the same pod's mesh traffic is captured.
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        1.0
    );
}

#[test]
fn a_destination_outside_the_mesh_sees_the_pod_not_the_node() {
    let _serial = serial();
    let bed = bed();
    // A host-network server on the other node: not a pod, not in the mesh.
    let mut outside = bed.node_command("n2", meshtest()).unwrap();
    outside.args(["serve", "10.0.0.2:7071", "outside"]);
    bed.spawn(outside).unwrap();
    let (n1, _n2) = agents(&bed);
    eventually("the outside server to listen", || {
        let mut c = bed.node_command("n2", meshtest()).unwrap();
        c.args(["get", "10.0.0.2:7071", "/stats"]);
        output(c).status.success()
    });

    let got = fetch_from_pod(&bed, "client", "10.0.0.2:7071");
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with("hello from outside\n"), "{}", got.body);
    assert_eq!(got.server_saw(), bed.pod("client").ip.to_string());
    // It was captured (and passed through from the pod's own namespace), not missed.
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        1.0
    );
    eventually("the passthrough to be recorded", || {
        metric(
            &n1,
            "mesh_tcp_connections_closed_total",
            &[
                ("source_workload", "client"),
                ("destination_workload", "unknown"),
                ("connection_security_policy", "none"),
            ],
        ) == 1.0
    });
}

#[test]
fn a_recreated_sandbox_is_captured_and_guarded_again() {
    let _serial = serial();
    let bed = bed();
    let (n1, n2) = agents(&bed);
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    eventually("n2 to see the client's identity", || {
        arrived_as(&n2, "client") == 1.0
    });

    // The runtime restarts the pod's sandbox: same Pod object, same IP, new namespace and veth.
    bed.remove_pod_network("client").unwrap();
    eventually_for("n1 to report the gap", Duration::from_secs(2), || {
        n1.get(15021, "/ready").is_ok_and(|r| r.status == 503)
            && metric(&n1, "mesh_pods_awaiting_enrollment", &[]) == 1.0
    });
    bed.restore_pod_network("client").unwrap();
    eventually_for(
        "the new sandbox to be enrolled",
        Duration::from_secs(2),
        || {
            metric(&n1, "mesh_pods_awaiting_enrollment", &[]) == 0.0
                && n1.get(15021, "/ready").is_ok_and(|r| r.status == 200)
        },
    );
    // Captured again: the server sees the client pod, and n2 saw its identity over mTLS.
    let again = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(again.status, 200);
    assert_eq!(again.server_saw(), bed.pod("client").ip.to_string());
    eventually("n2 to see the client's identity again", || {
        arrived_as(&n2, "client") == 2.0
    });
    // And the new veth is guarded.
    let received = udp_from_forged_source(&bed, "client", "10.99.0.1", 5, 3);
    assert_eq!(received, 3, "only the honest datagrams arrive");
    assert_eq!(
        metric(&n1, "mesh_ebpf_spoofed_packets_dropped_total", &[]),
        5.0
    );
}

/// Fetches `addr` from the client pod on an IPv6 socket and checks the answer came from web,
/// `getpeername()` shows `addr`, web saw `seen`, and the connection reached n2 over mTLS as the
/// client's identity (the `n`th such).
fn fetch_as_client(
    bed: &mesh_agent_tests::Testbed,
    n2: &mesh_agent_tests::Agent,
    addr: &str,
    seen: &str,
    n: f64,
) {
    let got = fetch_from_pod(bed, "client", addr);
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with("hello from web\n"), "{}", got.body);
    assert_eq!(got.peer, addr, "getpeername() on the IPv6 socket");
    assert_eq!(got.server_saw(), seen);
    eventually("n2 to see the client's identity", || {
        arrived_as(n2, "client") == n
    });
}

#[test]
fn ipv6_sockets_to_ipv4_mapped_addresses_are_captured_with_identity() {
    let _serial = serial();
    let bed = bed();
    let (n1, n2) = agents(&bed);
    let client_ip = bed.pod("client").ip.to_string();
    for (n, addr) in [
        (1.0, "[::ffff:10.96.0.10]:80"),
        (2.0, "[::ffff:10.1.2.2]:8080"),
    ] {
        fetch_as_client(&bed, &n2, addr, &client_ip, n);
    }
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        2.0
    );
}

#[test]
fn ipv6_packets_with_a_forged_source_are_dropped() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    // The client pod's root user turns IPv6 on, adds an address that is not its own, and
    // sends from it through its gateway.
    let ns = bed.pod("client").netns.clone();
    let run = |args: &[&str]| {
        let out = output({
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns]).args(args);
            c
        });
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.eth0.disable_ipv6=0",
    ]);
    run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:99::1/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    run(&[
        "ip",
        "-6",
        "neigh",
        "add",
        "fe80::1",
        "lladdr",
        "ee:ee:ee:ee:ee:ee",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    run(&[
        "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    let mut send = bed.pod_command("client", meshtest()).unwrap();
    send.args(["udp-send", "fd00:99::1", "[fd00:2::2]:9000", "5"]);
    let out = output(send);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the forged IPv6 packets to be dropped", || {
        metric(&n1, "mesh_ebpf_spoofed_packets_dropped_total", &[]) == 5.0
    });
    // Control: IPv4 from the pod's own address still flows.
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
}

#[test]
fn two_pods_claiming_one_ip_are_rejected_and_the_last_good_state_stays() {
    let _serial = serial();
    let bed = bed();
    let (n1, n2) = agents(&bed);
    let client_ip = bed.pod("client").ip;
    let dir = bed.manifests_dir();
    std::fs::write(
        dir.join("twin.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: twin\n  namespace: default\nspec:\n  nodeName: n1\n  serviceAccountName: twin\nstatus:\n  phase: Running\n  podIP: {client_ip}\n"
        ),
    )
    .unwrap();
    let expected = format!(
        "{}: Pod default/twin: pod IP {client_ip} is also claimed by Pod default/client (in {})",
        dir.join("twin.yaml").display(),
        dir.join("pods.yaml").display()
    );
    eventually("the rejection to be logged", || {
        n1.log_text().contains(&expected)
    });
    // The client keeps its own identity; the twin got nothing.
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    eventually("n2 to see the client's identity", || {
        arrived_as(&n2, "client") == 1.0
    });
    assert_eq!(arrived_as(&n2, "twin"), 0.0);
    assert!(!n1.admin("/certs").unwrap().body.contains("sa/twin"));
}

#[test]
fn a_pod_over_its_connection_cap_is_refused_while_others_are_served() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("client2", 0, "client2")]);
    let (n1, _n2) = agents_with(&bed, &["--max-connections-per-pod", "5"]);
    let mut hold = bed.pod_command("client", meshtest()).unwrap();
    hold.args(["hold", WEB_SVC, "5", "60"])
        .stdout(Stdio::null());
    bed.spawn(hold).unwrap();
    let held = [("source_workload", "client")];
    eventually("the five connections to be proxied", || {
        metric(&n1, "mesh_tcp_connections_opened_total", &held) == 5.0
    });

    let mut sixth = bed.pod_command("client", meshtest()).unwrap();
    sixth.args(["get", WEB_SVC]);
    must_fail(sixth, "a sixth connection from the client pod");
    eventually("the refusal to be counted", || {
        metric(
            &n1,
            "mesh_outbound_refused_total",
            &[("reason", "connection_limit")],
        ) == 1.0
    });
    assert_eq!(metric(&n1, "mesh_tcp_connections_opened_total", &held), 5.0);
    // Another pod of the node is not affected.
    let other = fetch_from_pod(&bed, "client2", WEB_SVC);
    assert_eq!(other.status, 200);
    assert!(other.body.starts_with("hello from web\n"));
}

/// What the `meshtest sink` at `target` (a pod of n2) received, asked directly from n2.
fn sink_stats(bed: &mesh_agent_tests::Testbed, target: &str) -> String {
    let addr: SocketAddr = target.parse().unwrap();
    netns::run_in(&bed.node("n2").netns, move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.write_all(b"?")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .unwrap()
    .unwrap()
}

#[test]
fn a_client_that_sends_and_closes_at_once_delivers_every_byte() {
    let _serial = serial();
    let bed = bed();
    let mut sink = bed.pod_command("web", meshtest()).unwrap();
    sink.args(["sink", "9191"]);
    bed.spawn(sink).unwrap();
    let (n1, _n2) = agents(&bed);
    const SIZE: u64 = 64 << 10;
    const COUNT: u64 = 1000;
    let target = format!("{}:9191", bed.pod("web").ip);

    let mut blast = bed.pod_command("client", meshtest()).unwrap();
    blast.args(["blast", &target, &SIZE.to_string(), &COUNT.to_string()]);
    let out = output(blast);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut last = String::new();
    eventually_for(
        "every connection to arrive",
        Duration::from_secs(60),
        || {
            last = sink_stats(&bed, &target);
            last.starts_with(&format!("conns={COUNT} "))
        },
    );
    assert_eq!(last, format!("conns={COUNT} bytes={}", COUNT * SIZE));
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        COUNT as f64
    );
}

#[test]
fn a_slow_request_head_is_cut_while_scrapes_keep_working() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents_with(&bed, &["--head-timeout", "2s"]);
    let metrics_addr: SocketAddr = format!("{}:15020", bed.node("n1").ip).parse().unwrap();
    let pod_ns = bed.pod("client").netns.clone();
    // From a pod (pods reach the node's address): a request head at one byte per second.
    let slow = std::thread::spawn(move || {
        netns::run_in(
            &pod_ns,
            move || -> std::io::Result<(usize, &'static str)> {
                let mut s = TcpStream::connect_timeout(&metrics_addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
                for (i, b) in head.iter().enumerate() {
                    if s.write_all(&[*b]).is_err() {
                        return Ok((i, "cut"));
                    }
                    let mut buf = [0u8; 4096];
                    match s.read(&mut buf) {
                        Ok(0) => return Ok((i, "cut")),
                        Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408") => return Ok((i, "cut")),
                        Ok(_) => return Ok((i, "answered")),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                        Err(_) => return Ok((i, "cut")),
                    }
                }
                Ok((head.len(), "completed"))
            },
        )
        .unwrap()
    });
    // Scrapes meanwhile are served at once.
    for _ in 0..3 {
        assert!(n1.metrics().unwrap().contains("mesh_enrolled_pods 1"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let (sent, outcome) = slow.join().unwrap().unwrap();
    assert_eq!(outcome, "cut", "after {sent} bytes");
    assert!(
        sent < 6,
        "the head timeout (2s) let {sent} bytes through at 1 byte/s"
    );
    assert!(n1.metrics().unwrap().contains("mesh_enrolled_pods 1"));
    assert_eq!(
        metric(
            &n1,
            "mesh_endpoint_head_timeouts_total",
            &[("listener", "metrics")]
        ),
        1.0
    );
}

#[test]
fn the_series_of_a_pod_that_left_are_removed() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("batch", 0, "batch")]);
    let (n1, n2) = agents(&bed);
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    assert_eq!(fetch_from_pod(&bed, "batch", WEB_SVC).status, 200);
    let batch = [("source_workload", "batch")];
    let client = [("source_workload", "client")];
    // n1 proxied each pod's connection; n2 delivered each pod's request.
    eventually("both pods' traffic recorded", || {
        metric(&n2, "istio_requests_total", &batch) == 1.0
            && metric(
                &n2,
                "request_total",
                &[(
                    "client_id",
                    "batch.default.serviceaccount.identity.linkerd.cluster.local",
                )],
            ) == 1.0
            && metric(&n1, "mesh_tcp_connections_closed_total", &batch) == 1.0
            && metric(&n1, "istio_requests_total", &batch) == 1.0
    });

    // The batch pod is deleted.
    let pods = bed.manifests_dir().join("pods.yaml");
    let text = std::fs::read_to_string(&pods).unwrap();
    let kept: Vec<&str> = text
        .split("---\n")
        .filter(|doc| !doc.contains("name: batch\n"))
        .collect();
    std::fs::write(&pods, kept.join("---\n")).unwrap();
    let gone = |text: String| {
        !text.contains("source_workload=\"batch\"") && !text.contains("client_id=\"batch.")
    };
    eventually("batch's series to go on both nodes", || {
        gone(n1.metrics().unwrap()) && gone(n2.metrics().unwrap())
    });
    // The client's stay, with their counts.
    assert_eq!(
        metric(&n1, "mesh_tcp_connections_opened_total", &client),
        1.0
    );
    assert_eq!(metric(&n1, "istio_requests_total", &client), 1.0);
    assert_eq!(metric(&n2, "istio_requests_total", &client), 1.0);
}

#[test]
fn a_scrape_costs_the_same_with_60000_connections_tracked() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    // Both agents' per-connection maps filled as a node with 60,000 open connections would be.
    for name in ["ORIG_DST", "REDIRECTS"] {
        let maps = mesh_agent_tests::bpf::maps_named(name).unwrap();
        assert_eq!(maps.len(), 2, "one {name} map per agent");
        for map in maps {
            map.fill(60_000).unwrap();
        }
    }
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let text = n1.metrics().unwrap();
        took.push(start.elapsed());
        assert!(text.contains("mesh_ebpf_map_entries"), "{text}");
    }
    took.sort();
    let median = took[2];
    assert!(
        median < Duration::from_millis(50),
        "a scrape took {median:?} (all: {took:?})"
    );
}

#[test]
fn manifests_over_the_size_limit_are_refused_and_parsing_memory_is_bounded() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents_with(&bed, &["--max-manifest-bytes", "4000000"]);
    let dir = bed.manifests_dir();
    // Pods of a large cluster, elsewhere: about 3 MB of YAML.
    let mut big = String::new();
    for i in 0..10_000u32 {
        big += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: far-{i}\n  namespace: far\n  labels:\n    app: far-{}\n    tier: backend\nspec:\n  nodeName: n9\n  serviceAccountName: far\n  containers:\n  - name: app\n    image: registry.example/far:1.2.3\nstatus:\n  phase: Running\n  hostIP: 10.0.0.9\n  podIP: 10.9.{}.{}\n",
            i % 50,
            i / 250,
            i % 250 + 1
        );
    }
    let size = big.len() as u64;
    assert!(size > 2_500_000 && size < 4_000_000, "{size}");
    let pid = n1.pid().unwrap();
    let before = peak_rss(pid);
    // Written aside and renamed in, so the agent never reads half a file.
    let put = |text: &str| {
        std::fs::write(dir.join(".far.yaml.tmp"), text).unwrap();
        std::fs::rename(dir.join(".far.yaml.tmp"), dir.join("far.yaml")).unwrap();
    };
    put(&big);
    eventually("the large manifest to load", || {
        metric(&n1, "mesh_manifest_reloads_total", &[("result", "ok")]) == 2.0
    });
    let grew = peak_rss(pid).saturating_sub(before);
    eprintln!("manifest of {size} bytes: peak RSS grew by {grew} bytes");
    assert!(
        grew < 3 * size,
        "peak RSS grew by {grew} bytes for a {size}-byte manifest"
    );

    // Over the limit: refused, named, the last good state stays.
    big += &big.clone();
    put(&big);
    let expected = format!(
        "{}: file: the file is {} bytes, over the limit of 4000000 (--max-manifest-bytes); split it into several files",
        dir.join("far.yaml").display(),
        big.len()
    );
    eventually("the refusal to be logged", || {
        n1.log_text().contains(&expected)
    });
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
}

#[test]
fn a_spent_buffer_budget_slows_bulk_transfers_without_losing_bytes() {
    let _serial = serial();
    let bed = bed();
    let mut sink = bed.pod_command("web", meshtest()).unwrap();
    sink.args(["sink", "9191"]);
    bed.spawn(sink).unwrap();
    let (n1, _n2) = agents_with(&bed, &["--max-buffered-bytes", "0"]);
    let target = format!("{}:9191", bed.pod("web").ip);
    let mut blast = bed.pod_command("client", meshtest()).unwrap();
    blast.args(["blast", &target, &(4 << 20).to_string(), "1"]);
    let out = output(blast);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the bulk connection to end", || {
        metric(&n1, "mesh_tcp_connections_closed_total", &source_side()) == 1.0
    });
    assert_eq!(
        metric(&n1, "mesh_tcp_sent_bytes_total", &source_side()),
        f64::from(4u32 << 20)
    );
    assert_eq!(
        sink_stats(&bed, &target),
        format!("conns=1 bytes={}", 4 << 20)
    );
    assert!(metric(&n1, "mesh_buffer_budget_refused_total", &[]) >= 1.0);
    assert_eq!(metric(&n1, "mesh_buffered_bytes", &[]), 0.0);
}

#[test]
fn native_ipv6_is_captured_with_identity_and_guarded_on_a_dual_stack_testbed() {
    let _serial = serial();
    let bed = dual_stack_bed();
    let (n1, n2) = agents(&bed);
    let client6 = bed.pod("client").ip6.unwrap().to_string();
    let web6 = bed.pod("web").ip6.unwrap();
    let svc6 = format!(
        "[{}]:80",
        mesh_agent_tests::ServiceSpec::web().cluster_ip6()
    );
    let pod6 = format!("[{web6}]:8080");
    for (n, addr) in [(1.0, svc6.as_str()), (2.0, pod6.as_str())] {
        // The server sees the client pod's own IPv6 address, delivered over mTLS.
        fetch_as_client(&bed, &n2, addr, &format!("[{client6}]"), n);
    }
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        2.0
    );
    // IPv4 still works beside it.
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    eventually("n2 to see the IPv4 tunnel", || {
        arrived_as(&n2, "client") == 3.0
    });

    // IPv6 from the pod's own address passes the guard; from another address it is dropped.
    let received = udp_from_forged_source(&bed, "client", "fd00:99::1", 5, 3);
    assert_eq!(received, 3, "only the honest datagrams arrive");
    assert_eq!(
        metric(&n1, "mesh_ebpf_spoofed_packets_dropped_total", &[]),
        5.0
    );
}
