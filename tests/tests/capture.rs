//! Transparent capture into the node proxy, end to end: real eBPF programs in the real kernel,
//! real processes in simulated pods, real agents. Run as root, serially (`cargo xtask test`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use mesh_agent_tests::{harness::*, serial, Agent, PodSpec};

#[test]
fn cross_node_by_service_and_pod_ip_through_the_proxy() {
    let _serial = serial();
    let bed = bed();
    let (n1, n2) = agents(&bed);

    let by_service = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(by_service.status, 200);
    assert!(
        by_service.body.starts_with("hello from web\n"),
        "{}",
        by_service.body
    );
    assert_eq!(
        by_service.peer, WEB_SVC,
        "getpeername() must return the dialled address"
    );
    // n2's agent made the last hop out of the HBONE tunnel, from inside the server pod with the
    // client pod's address: the server sees the client, as it would with a sidecar.
    let client_ip = bed.pod("client").ip.to_string();
    assert_eq!(by_service.server_saw(), client_ip);

    let by_pod = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(by_pod.status, 200);
    assert!(by_pod.body.starts_with("hello from web\n"));
    assert_eq!(by_pod.peer, WEB_POD);
    assert_eq!(by_pod.server_saw(), client_ip);
    eventually("n2 to record both tunnels", || {
        arrived_as(&n2, "client") == 2.0
    });

    let svc = [
        ("source_workload", "client"),
        ("source_namespace", "default"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_workload", "web"),
        ("destination_namespace", "default"),
    ];
    let pod = [
        ("source_workload", "client"),
        ("destination_service", "unknown"),
        ("destination_workload", "web"),
    ];
    eventually("both connections closed", || {
        metric(&n1, "mesh_tcp_connections_closed_total", &source_side()) == 2.0
    });
    assert_eq!(metric(&n1, "mesh_tcp_connections_opened_total", &svc), 1.0);
    assert_eq!(metric(&n1, "mesh_tcp_connections_opened_total", &pod), 1.0);
    assert_eq!(
        metric(&n1, "mesh_tcp_connections_opened_total", &source_side()),
        2.0
    );
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        2.0
    );
    // Bytes: exactly the request the client wrote; the response came back.
    let request = format!("GET / HTTP/1.1\r\nHost: {WEB_SVC}\r\nConnection: close\r\n\r\n");
    assert_eq!(
        metric(&n1, "mesh_tcp_sent_bytes_total", &svc),
        request.len() as f64
    );
    assert!(metric(&n1, "mesh_tcp_received_bytes_total", &svc) > 100.0);
    // n2's pods made no connections of their own; n2 received both through HBONE.
    let source = [("reporter", "source")];
    let destination = [("reporter", "destination")];
    assert_eq!(
        metric(&n2, "mesh_tcp_connections_opened_total", &source),
        0.0
    );
    // Both were HTTP: n2 delivered them as requests, each recorded when its response ended.
    let delivered = [
        ("reporter", "destination"),
        ("response_code", "200"),
        ("destination_workload", "web"),
    ];
    eventually("n2 to record both requests answered", || {
        metric(&n2, "istio_requests_total", &delivered) == 2.0
    });
    assert_eq!(
        metric(&n2, "mesh_tcp_connections_opened_total", &destination),
        0.0,
        "HTTP travels as requests between agents, not as relayed connections"
    );
    assert_eq!(metric(&n1, "mesh_enrolled_pods", &[]), 1.0);
    assert_eq!(metric(&n2, "mesh_enrolled_pods", &[]), 1.0);
}

#[test]
fn host_network_and_unenrolled_pods_are_not_captured() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);

    // The node's own network namespace (hostNetwork) goes direct.
    let host = fetch(
        bed.node_command("n1", meshtest()).expect("node command"),
        WEB_POD,
    );
    assert_eq!(host.status, 200);
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        0.0
    );

    // A pod opted out of the mesh goes direct: the server sees the pod's own address.
    let outsider = fetch_from_pod(&bed, "outsider", WEB_POD);
    assert_eq!(outsider.status, 200);
    assert_eq!(outsider.server_saw(), bed.pod("outsider").ip.to_string());
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        0.0
    );
    assert_eq!(metric(&n1, "mesh_tcp_connections_opened_total", &[]), 0.0);

    // Control: the enrolled pod on the same node is captured, and still seen as itself.
    let client = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(client.server_saw(), bed.pod("client").ip.to_string());
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        1.0
    );
}

#[test]
fn forged_source_addresses_are_dropped_and_counted() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    // The client pod's root user adds an address that is not its own and sends from it; the
    // same pod sending from its real address is the control.
    let received = udp_from_forged_source(&bed, "client", "10.99.0.1", 5, 3);
    assert_eq!(received, 3, "only the honest datagrams arrive");
    assert_eq!(
        metric(&n1, "mesh_ebpf_spoofed_packets_dropped_total", &[]),
        5.0
    );
}

#[test]
fn pods_reach_each_other_after_the_agent_stops_or_is_killed() {
    let _serial = serial();
    let bed = bed();
    let client_ip = bed.pod("client").ip.to_string();
    let (mut n1, n2) = agents(&bed);
    // Captured: the connection arrives at n2 over mTLS as the client's identity.
    assert_eq!(
        fetch_from_pod(&bed, "client", WEB_POD).server_saw(),
        client_ip
    );
    eventually("n2 to see the tunnel", || arrived_as(&n2, "client") == 1.0);

    // Clean stop: everything detached, the next connection goes direct.
    let status = n1.stop().expect("stop agent");
    assert!(
        status.success(),
        "agent exit status {status}; log:\n{}",
        n1.log_text()
    );
    let direct = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(direct.status, 200);
    assert_eq!(direct.server_saw(), client_ip);
    assert_eq!(
        arrived_as(&n2, "client"),
        1.0,
        "went direct, not through n2"
    );

    // Restart: captured again.
    let mut n1 = Agent::start(&bed, "n1", &[]).expect("restart n1");
    n1.wait_ready(READY).expect("n1 ready again");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    eventually("n2 to see the second tunnel", || {
        arrived_as(&n2, "client") == 2.0
    });

    // kill -9: no chance to clean up, yet nothing keeps redirecting into the dead listener.
    n1.kill9().expect("kill -9");
    let direct = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(direct.status, 200);
    assert_eq!(direct.server_saw(), client_ip);
    assert_eq!(
        arrived_as(&n2, "client"),
        2.0,
        "went direct, not through n2"
    );

    // A restart after the crash takes over cleanly.
    let mut n1 = Agent::start(&bed, "n1", &[]).expect("restart n1 after kill");
    n1.wait_ready(READY).expect("n1 ready after kill");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    eventually("n2 to see the third tunnel", || {
        arrived_as(&n2, "client") == 3.0
    });
    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        1.0
    );
}

#[test]
fn connection_churn_leaves_the_original_destination_maps_empty() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);

    let mut churn = bed
        .pod_command("client", meshtest())
        .expect("client command");
    churn.args(["churn", WEB_SVC, "1000"]);
    let out = output(churn);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok=1000");

    assert_eq!(
        metric(&n1, "mesh_ebpf_redirected_connections_total", &[]),
        1000.0
    );
    assert_eq!(
        metric(&n1, "mesh_tcp_connections_opened_total", &[]),
        1000.0
    );
    eventually("the per-connection maps to drain", || {
        metric(&n1, "mesh_ebpf_map_entries", &[("map", "orig_dst")]) == 0.0
            && metric(&n1, "mesh_ebpf_map_entries", &[("map", "redirects")]) == 0.0
    });
}

#[test]
fn an_invalid_manifest_is_reported_and_the_last_good_state_stays() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);

    // One change moves the Service to port 81, another file is invalid: all or nothing. The
    // invalid file lands first, so no poll can see the port change alone.
    let dir = bed.manifests_dir();
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\nspec:\n  clusterIP: not-an-ip\n",
    )
    .expect("write");
    let services = std::fs::read_to_string(dir.join("services.yaml")).expect("read");
    std::fs::write(
        dir.join("services.yaml"),
        services.replace("port: 80\n", "port: 81\n"),
    )
    .expect("write");
    let expected = format!(
        "{}: Service default/broken: field spec.clusterIP: \"not-an-ip\" is neither an IP address nor \"None\"",
        dir.join("broken.yaml").display()
    );
    eventually("the rejection to be logged", || {
        n1.log_text().contains(&expected)
    });
    assert!(metric(&n1, "mesh_manifest_reloads_total", &[("result", "error")]) >= 1.0);

    // Port 80 still routes: the previous snapshot is in force.
    let still = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(still.status, 200);
    assert!(still.body.starts_with("hello from web\n"));

    // Fixing the directory applies the pending change.
    std::fs::remove_file(dir.join("broken.yaml")).expect("remove");
    eventually("the fixed manifests to load", || {
        metric(&n1, "mesh_manifest_reloads_total", &[("result", "ok")]) >= 2.0
    });
    let moved = fetch_from_pod(&bed, "client", "10.96.0.10:81");
    assert_eq!(moved.status, 200);
    assert_eq!(moved.peer, "10.96.0.10:81");
}

#[test]
fn same_node_traffic_is_captured_and_stays_on_the_node() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("near", 0, "near")]);
    let mut near = bed.pod_command("near", meshtest()).expect("near command");
    near.args(["serve", "8080", "near"]);
    bed.spawn(near).expect("start near");
    // The proxy runs on the threads asked for, named for `top -H` and profiles.
    let (n1, n2) = agents_with(&bed, &["--worker-threads", "3"]);
    let mut workers: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", n1.pid().unwrap()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("mesh-proxy-") || c.starts_with("tokio-runtime"))
        .collect();
    workers.sort();
    assert_eq!(
        workers[..3],
        ["mesh-proxy-0", "mesh-proxy-1", "mesh-proxy-2"]
    );
    assert!(!workers.iter().any(|c| c.starts_with("tokio-runtime")));

    let addr = format!("{}:8080", bed.pod("near").ip);
    let got = fetch_from_pod(&bed, "client", &addr);
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with("hello from near\n"), "{}", got.body);
    assert_eq!(got.peer, addr);
    // n1's proxy connected onwards itself, from inside the client pod's namespace: no tunnel,
    // no TLS, identities known in-process, and the server sees the client pod.
    assert_eq!(got.server_saw(), bed.pod("client").ip.to_string());
    eventually("the connection to close", || {
        metric(&n1, "mesh_tcp_connections_closed_total", &source_side()) == 1.0
    });
    assert_eq!(
        metric(
            &n1,
            "mesh_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/default/sa/client"
                ),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/near"
                ),
                ("destination_workload", "near"),
                ("connection_security_policy", "node_local"),
            ]
        ),
        1.0
    );
    assert_eq!(metric(&n2, "mesh_tcp_connections_opened_total", &[]), 0.0);
}

#[test]
fn the_state_endpoint_reports_the_snapshot_in_force() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    let state = || n1.admin("/state").expect("admin /state").body;
    let first = state();
    for expected in [
        "\"version\": 1,",
        "\"pods\": 3,",
        "\"service_ports\": 1,",
        "\"endpoints\": 1",
    ] {
        assert!(first.contains(expected), "{expected} not in {first}");
    }
    let applies =
        |n1: &mesh_agent_tests::Agent| metric(n1, "mesh_state_apply_duration_seconds_count", &[]);
    assert_eq!(applies(&n1), 1.0);

    // An accepted change is a new version, timed; a rejected one is neither.
    let dir = bed.manifests_dir();
    let services = std::fs::read_to_string(dir.join("services.yaml")).expect("read");
    std::fs::write(
        dir.join(".services.tmp"),
        services.replace("port: 80\n", "port: 81\n"),
    )
    .expect("write");
    std::fs::rename(dir.join(".services.tmp"), dir.join("services.yaml")).expect("rename");
    eventually("version 2", || state().contains("\"version\": 2,"));
    assert_eq!(applies(&n1), 2.0);
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: Service\nmetadata: {name: x}\nspec: {clusterIP: nope}\n",
    )
    .expect("write");
    eventually("the rejection", || {
        metric(&n1, "mesh_manifest_reloads_total", &[("result", "error")]) == 1.0
    });
    assert!(state().contains("\"version\": 2,"));
    assert_eq!(applies(&n1), 2.0);
    assert_eq!(fetch_from_pod(&bed, "client", "10.96.0.10:81").status, 200);
}

#[test]
fn a_storm_of_file_writes_ends_in_the_final_state_with_few_builds() {
    let _serial = serial();
    let bed = bed();
    let (n1, _n2) = agents(&bed);
    let dir = bed.manifests_dir();
    // 1,000 Services written one file at a time over about 5 seconds.
    for i in 0..1000u32 {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: storm-{i}\n  namespace: default\nspec:\n  clusterIP: 10.97.{}.{}\n  ports:\n  - port: 80\n",
            i / 250,
            i % 250 + 1
        );
        let tmp = dir.join(format!(".storm-{i}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, dir.join(format!("storm-{i}.yaml"))).expect("rename");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let state = || n1.admin("/state").expect("admin /state").body;
    eventually("all 1,000 Services in force", || {
        state().contains("\"service_ports\": 1001,")
    });
    let builds = metric(&n1, "mesh_state_apply_duration_seconds_count", &[]);
    assert!(
        builds < 100.0,
        "{builds} snapshot builds for 1,000 file writes"
    );
    assert_eq!(
        metric(&n1, "mesh_manifest_reloads_total", &[("result", "error")]),
        0.0
    );
}

/// Service `svc-{i}` at 10.100.x.y:80 with a slice of five endpoints elsewhere in the cluster,
/// or, given `to`, of that one endpoint.
fn scale_service(i: u32, to: Option<&str>) -> String {
    let endpoints: String = match to {
        Some(ip) => format!("- addresses: [{ip}]\n"),
        None => (0..5)
            .map(|k| format!("- addresses: [10.64.{}.{}]\n", i % 200, k + 1))
            .collect(),
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\nspec:\n  clusterIP: 10.100.{}.{}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x7k2p\n  namespace: scale\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}",
        i / 250,
        i % 250 + 1
    )
}

#[test]
fn one_service_changed_among_10k_is_applied_alone_and_routes() {
    let _serial = serial();
    let bed = bed();
    let dir = bed.manifests_dir();
    let file = |f: u32, to: Option<&str>| -> String {
        (f * 50..f * 50 + 50)
            .map(|i| scale_service(i, to.filter(|_| i == 4242)))
            .collect()
    };
    for f in 0..200 {
        std::fs::write(dir.join(format!("scale-{f:03}.yaml")), file(f, None)).expect("write");
    }
    let (n1, _n2) = agents(&bed);
    let state = || n1.admin("/state").expect("admin /state").body;
    assert!(state().contains("\"service_ports\": 10001,"), "{}", state());
    let svc = "10.100.16.243:80";
    assert_ne!(fetch_from_pod(&bed, "client", svc).status, 200);

    // svc-4242's endpoints become the web pod; its 49 neighbours in the file are rewritten as
    // they were.
    let web = bed.pod("web").ip.to_string();
    std::fs::write(dir.join(".scale.tmp"), file(84, Some(&web))).expect("write");
    std::fs::rename(dir.join(".scale.tmp"), dir.join("scale-084.yaml")).expect("rename");
    eventually("version 2", || state().contains("\"version\": 2,"));
    let applied = state();
    for expected in [
        "\"files\": 1,",
        "\"objects\": 1,",
        "\"pods_rebuilt\": 0,",
        "\"services_rebuilt\": 1,",
    ] {
        assert!(applied.contains(expected), "{expected} not in {applied}");
    }
    let got = fetch_from_pod(&bed, "client", svc);
    assert_eq!(got.status, 200);
    assert!(got.body.starts_with("hello from web\n"), "{}", got.body);
}
