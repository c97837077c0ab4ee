//! HTTP in the node proxy, end to end: per-request balancing, HTTP/2 and gRPC, upgrades,
//! streaming, golden metrics in both dialects, refusals of bad input, protocol detection.
//! Real agents, real pods, real HTTP servers (`meshtest http`). Run as root, serially.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::collections::BTreeMap;

use mesh_agent_tests::{harness::*, serial, PodSpec, ServiceSpec, Testbed, TestbedSpec};

/// Service `api`: port 80 (named `http`) → 8080, two pods on n2 and one on n1.
const API_SVC: &str = "10.96.0.20:80";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const API_ID: &str = "spiffe://cluster.local/ns/default/sa/api";

/// n1: client, api-c; n2: api-a, api-b. Each api pod serves `meshtest http 8080 <name>`.
fn l7_bed() -> Testbed {
    l7_bed_with(Vec::new())
}

/// [`l7_bed`] with more pods.
fn l7_bed_with(extra: Vec<PodSpec>) -> Testbed {
    let mut pods = vec![
        PodSpec::new("client", 0, "client"),
        PodSpec::new("api-a", 1, "api"),
        PodSpec::new("api-b", 1, "api"),
        PodSpec::new("api-c", 0, "api"),
    ];
    pods.extend(extra);
    let spec = TestbedSpec {
        nodes: 2,
        pods,
        services: vec![ServiceSpec {
            name: "api".into(),
            namespace: "default".into(),
            cluster_ip: "10.96.0.20".parse().unwrap(),
            port: 80,
            target_port: 8080,
            app: "api".into(),
        }],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    for name in ["api-a", "api-b", "api-c"] {
        let mut server = bed.pod_command(name, meshtest()).unwrap();
        server.args(["http", "8080", name]);
        bed.spawn(server).expect("start api server");
    }
    bed
}

/// `api-a`'s address (on n2, the other node) at `port`.
fn remote_pod(bed: &Testbed, port: u16) -> String {
    format!("{}:{port}", bed.pod("api-a").ip)
}

fn num(kv: &BTreeMap<String, String>, key: &str) -> u64 {
    kv.get(key).map_or(0, |v| v.parse().unwrap())
}

#[test]
fn one_keep_alive_connection_spreads_its_requests_over_every_endpoint() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, n2) = agents(&bed);
    let got = meshtest_in(&bed, "client", &["h1-many", API_SVC, "/", "3000"]);
    assert_eq!((num(&got, "ok"), num(&got, "errors")), (3000, 0), "{got:?}");
    assert_eq!(num(&got, "connects"), 1, "one client connection");
    eprintln!("spread: {got:?}");
    for pod in ["api-a", "api-b", "api-c"] {
        let n = num(&got, &format!("from.{pod}"));
        assert!(
            (750..=1260).contains(&n),
            "{pod} served {n} of 3000 (want 25%..42%): {got:?}"
        );
    }
    // Every request counted once by the source, as sent to the Service.
    let to_api = [
        ("reporter", "source"),
        ("destination_service", "api.default.svc.cluster.local"),
        ("response_code", "200"),
    ];
    eventually("n1 to record 3000 requests", || {
        metric(&n1, "istio_requests_total", &to_api) == 3000.0
    });
    assert_eq!(
        metric(
            &n1,
            "request_total",
            &[
                ("direction", "outbound"),
                ("authority", "api.default.svc.cluster.local:80")
            ]
        ),
        3000.0
    );
    // n2 delivered what went to its two pods, over mTLS, as the client's identity.
    let remote = num(&got, "from.api-a") + num(&got, "from.api-b");
    let delivered = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("destination_service", "api.default.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    eventually("n2 to record its requests", || {
        metric(&n2, "istio_requests_total", &delivered) == remote as f64
    });
}

#[test]
fn h2c_streams_and_grpc_trailers_cross_node() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, n2) = agents(&bed);
    let pod = remote_pod(&bed, 8080);
    let got = meshtest_in(&bed, "client", &["h2-many", &pod, "/", "100"]);
    assert_eq!((num(&got, "ok"), num(&got, "errors")), (100, 0), "{got:?}");
    assert_eq!(num(&got, "from.api-a"), 100);

    let got = meshtest_in(&bed, "client", &["h2-many", &pod, "/grpc/0", "10"]);
    assert_eq!(num(&got, "grpc_status.0"), 10, "{got:?}");
    let got = meshtest_in(&bed, "client", &["h2-many", &pod, "/grpc/14", "5"]);
    assert_eq!(num(&got, "grpc_status.14"), 5, "{got:?}");
    let got = meshtest_in(
        &bed,
        "client",
        &["h2-many", &pod, "/grpc-trailers-only/14", "3"],
    );
    assert_eq!(num(&got, "grpc_status.14"), 3, "{got:?}");

    // UNAVAILABLE (14) is a failure though the HTTP status is 200, on both sides.
    for (agent, direction) in [(&n1, "outbound"), (&n2, "inbound")] {
        let grpc = |status: &str, classification: &str| {
            metric(
                agent,
                "response_total",
                &[
                    ("direction", direction),
                    ("status_code", "200"),
                    ("grpc_status", status),
                    ("classification", classification),
                ],
            )
        };
        eventually(&format!("{direction} gRPC responses"), || {
            grpc("14", "failure") == 8.0 && grpc("0", "success") == 10.0
        });
        assert_eq!(grpc("14", "success"), 0.0);
    }
    assert_eq!(
        metric(
            &n1,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "14")
            ]
        ),
        8.0
    );
}

#[test]
fn websocket_upgrade_and_streaming_bodies_cross_node() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, n2) = agents(&bed);
    let pod = remote_pod(&bed, 8080);

    let ws = meshtest_in(&bed, "client", &["ws", &pod, "1048576"]);
    assert_eq!(ws.get("status").map(String::as_str), Some("101"));
    assert_eq!(num(&ws, "echoed"), 1 << 20);

    // The first chunk arrives while the server is still writing the rest.
    let chunks = meshtest_in(&bed, "client", &["chunks", &pod, "5", "400"]);
    assert_eq!(num(&chunks, "chunks"), 5);
    assert!(
        num(&chunks, "first_ms") < 400 && num(&chunks, "total_ms") >= 1600,
        "{chunks:?}"
    );

    // 200 MiB up, streamed: equal at the other end, and neither agent holds it.
    let upload = meshtest_in(
        &bed,
        "client",
        &["upload", &pod, &(200u64 << 20).to_string()],
    );
    assert_eq!(
        upload["server.sha256"], upload["local.sha256"],
        "{upload:?}"
    );
    assert_eq!(num(&upload, "server.bytes"), 200 << 20);
    for agent in [&n1, &n2] {
        let rss = peak_rss(agent.pid().unwrap());
        assert!(rss < 40 << 20, "agent peak RSS {} MiB", rss >> 20);
    }
    // Counted as request bytes by the source (Istio's histogram sums them).
    eventually("the upload's bytes recorded", || {
        metric(
            &n1,
            "istio_request_bytes_sum",
            &[("reporter", "source"), ("destination_workload", "api")],
        ) >= (200u64 << 20) as f64
    });
}

#[test]
fn golden_metrics_count_every_request_in_both_dialects() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, n2) = agents(&bed);
    let pod = remote_pod(&bed, 8080);
    let paths = "/,/,/,/,/,/,/,/,/,/status/503";
    let got = meshtest_in(&bed, "client", &["status", &pod, paths, "100"]);
    assert_eq!(
        (num(&got, "status.200"), num(&got, "status.503")),
        (90, 10),
        "{got:?}"
    );

    let linkerd = |direction: &'static str| {
        let mut l = vec![
            ("direction", direction),
            ("authority", pod.as_str()),
            ("tls", "true"),
            ("dst_namespace", "default"),
        ];
        match direction {
            "outbound" => l.push((
                "server_id",
                "api.default.serviceaccount.identity.linkerd.cluster.local",
            )),
            _ => l.push((
                "client_id",
                "client.default.serviceaccount.identity.linkerd.cluster.local",
            )),
        }
        l
    };
    let istio = |reporter: &'static str, code: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            ("source_principal", CLIENT_ID),
            ("destination_workload", "api"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", API_ID),
            ("destination_service", "unknown"),
            ("request_protocol", "http"),
            ("response_code", code),
            ("grpc_response_status", "-"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    for (agent, direction, reporter) in
        [(&n1, "outbound", "source"), (&n2, "inbound", "destination")]
    {
        eventually(&format!("{reporter} to record 100 responses"), || {
            metric(agent, "istio_requests_total", &[("reporter", reporter)]) == 100.0
        });
        let base = linkerd(direction);
        assert_eq!(metric(agent, "request_total", &base), 100.0, "{direction}");
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l = base.clone();
            l.extend_from_slice(extra);
            metric(agent, "response_total", &l)
        };
        assert_eq!(
            with(&[("classification", "success"), ("status_code", "200")]),
            90.0
        );
        assert_eq!(
            with(&[("classification", "failure"), ("status_code", "503")]),
            10.0
        );
        assert_eq!(metric(agent, "response_latency_ms_count", &base), 100.0);
        assert_eq!(
            metric(agent, "istio_requests_total", &istio(reporter, "200")),
            90.0
        );
        assert_eq!(
            metric(agent, "istio_requests_total", &istio(reporter, "503")),
            10.0
        );
        assert_eq!(
            metric(
                agent,
                "istio_request_duration_milliseconds_count",
                &[("reporter", reporter)]
            ),
            100.0
        );
        assert_eq!(
            metric(
                agent,
                "istio_response_bytes_count",
                &[("reporter", reporter)]
            ),
            100.0
        );
    }
}

#[test]
fn bad_requests_are_refused_while_other_clients_keep_going() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, _n2) = agents_with(&bed, &["--http-head-timeout", "3s"]);
    // Another client's keep-alive requests run throughout.
    let mut steady = bed.pod_command("client", meshtest()).unwrap();
    steady
        .args(["h1-many", API_SVC, "/", "4000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let steady = steady.spawn().unwrap();

    let bad_line = meshtest_in(
        &bed,
        "client",
        &[
            "raw",
            API_SVC,
            "GET /a b HTTP/1.1\\r\\nHost: api\\r\\n\\r\\n",
        ],
    );
    assert_eq!(bad_line["status"], "400", "{bad_line:?}");
    assert_eq!(bad_line["closed"], "true");

    let big = bed.dir.join("big-head.txt");
    let head = format!(
        "GET / HTTP/1.1\r\nHost: api\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 << 10)
    );
    std::fs::write(&big, head).unwrap();
    let too_big = meshtest_in(
        &bed,
        "client",
        &["raw", API_SVC, &format!("@{}", big.display())],
    );
    assert_eq!(too_big["status"], "431", "{too_big:?}");

    // Idle keep-alive connections are closed by the same timeout, but that is no error.
    let mut idle = bed.pod_command("client", meshtest()).unwrap();
    idle.args(["hold", API_SVC, "2", "6"])
        .stdout(std::process::Stdio::null());
    bed.spawn(idle).unwrap();
    let slow = meshtest_in(&bed, "client", &["trickle", API_SVC, "20"]);
    let closed = num(&slow, "closed_after_ms");
    assert!(
        (2500..8000).contains(&closed),
        "a 1 byte/s head must be cut by the 3 s head timeout: {slow:?}"
    );

    let out = steady.wait_with_output().unwrap();
    let steady = key_values(&String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{steady:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((num(&steady, "ok"), num(&steady, "errors")), (4000, 0));

    for (error, code) in [
        ("malformed", "400"),
        ("head_too_large", "431"),
        ("head_timeout", "408"),
    ] {
        assert_eq!(
            metric(&n1, "outbound_http_errors_total", &[("error", error)]),
            1.0,
            "{error}"
        );
        assert_eq!(
            metric(
                &n1,
                "istio_requests_total",
                &[("response_code", code), ("response_flags", "DPE")]
            ),
            1.0,
            "{error}"
        );
    }
}

#[test]
fn unreachable_endpoints_and_empty_services_get_503_with_a_reason() {
    let _serial = serial();
    let bed = l7_bed();
    // A Service whose only endpoint is not ready.
    std::fs::write(
        bed.manifests_dir().join("empty.yaml"),
        "kind: Service\nmetadata: {name: empty, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\nkind: EndpointSlice\nmetadata: {name: empty-1, namespace: default, labels: {kubernetes.io/service-name: empty}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.2.3], conditions: {ready: false}}]\n",
    )
    .unwrap();
    let (n1, n2) = agents(&bed);
    let empty = meshtest_in(&bed, "client", &["status", "10.96.0.30:80", "/", "2"]);
    assert_eq!(num(&empty, "status.503"), 2, "{empty:?}");
    let no_endpoints = [
        ("reporter", "source"),
        ("destination_service", "empty.default.svc.cluster.local"),
        ("response_code", "503"),
        ("response_flags", "UH"),
    ];
    assert_eq!(metric(&n1, "istio_requests_total", &no_endpoints), 2.0);
    assert_eq!(
        metric(
            &n1,
            "outbound_http_errors_total",
            &[("error", "no_endpoints")]
        ),
        2.0
    );

    // Nothing listens on api-a:8081 (undeclared, detected as HTTP): n2, which delivers, is
    // refused, answers 503 itself and says why; n1 relays that answer.
    let refused = meshtest_in(
        &bed,
        "client",
        &["status", &remote_pod(&bed, 8081), "/", "1"],
    );
    assert_eq!(num(&refused, "status.503"), 1, "{refused:?}");
    let refusal = [
        ("reporter", "destination"),
        ("response_code", "503"),
        ("response_flags", "UF"),
    ];
    eventually("n2 to record the refusal", || {
        metric(&n2, "istio_requests_total", &refusal) == 1.0
    });
    assert_eq!(
        metric(
            &n2,
            "inbound_http_errors_total",
            &[("error", "unavailable")]
        ),
        1.0
    );
    let relayed = [
        ("reporter", "source"),
        ("response_code", "503"),
        ("response_flags", "-"),
    ];
    eventually("n1 to record the answer", || {
        metric(&n1, "istio_requests_total", &relayed) == 1.0
    });
    // The other requests keep working.
    let ok = meshtest_in(&bed, "client", &["status", API_SVC, "/", "20"]);
    assert_eq!(num(&ok, "status.200"), 20, "{ok:?}");
}

#[test]
fn server_speaks_first_waits_for_detection_only_on_undeclared_ports() {
    let _serial = serial();
    let bed = l7_bed();
    for port in ["2525", "3306"] {
        let mut banner = bed.pod_command("api-a", meshtest()).unwrap();
        banner.args(["banner", port, "220 ready"]);
        bed.spawn(banner).unwrap();
    }
    let (n1, _n2) = agents_with(&bed, &["--detect-timeout", "2s"]);
    // Undeclared: the proxy waits out detection, then relays as opaque TCP.
    let late = meshtest_in(&bed, "client", &["read-banner", &remote_pod(&bed, 2525)]);
    assert_eq!(late["banner"], "220 ready");
    let ms = num(&late, "ms");
    assert!((1900..4000).contains(&ms), "banner after {ms} ms: {late:?}");
    // 3306 is one of Linkerd's default opaque ports: no detection at all.
    let early = meshtest_in(&bed, "client", &["read-banner", &remote_pod(&bed, 3306)]);
    assert_eq!(early["banner"], "220 ready");
    assert!(num(&early, "ms") < 1000, "{early:?}");
    eventually("both relayed as TCP over mTLS", || {
        metric(
            &n1,
            "mesh_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) == 2.0
    });
    assert_eq!(metric(&n1, "istio_requests_total", &[]), 0.0);
}

#[test]
fn declared_opaque_annotation_and_app_protocol_are_honoured() {
    let _serial = serial();
    let bed = l7_bed();
    // Service `raw` in front of api-a declares `appProtocol: tcp`.
    std::fs::write(
        bed.manifests_dir().join("raw.yaml"),
        "kind: Service\nmetadata: {name: raw, namespace: default}\nspec:\n  clusterIP: 10.96.0.40\n  ports: [{name: web, port: 80, targetPort: 8080, appProtocol: tcp}]\n---\nkind: EndpointSlice\nmetadata: {name: raw-1, namespace: default, labels: {kubernetes.io/service-name: raw}}\naddressType: IPv4\nports: [{name: web, port: 8080}]\nendpoints: [{addresses: [10.1.2.2]}]\n",
    )
    .unwrap();
    let (n1, _n2) = agents(&bed);
    let requests = || metric(&n1, "istio_requests_total", &[("reporter", "source")]);
    let got = meshtest_in(&bed, "client", &["status", "10.96.0.40:80", "/", "3"]);
    assert_eq!(num(&got, "status.200"), 3, "{got:?}");
    let raw = [
        ("reporter", "source"),
        ("destination_service", "raw.default.svc.cluster.local"),
    ];
    eventually("one opaque connection to raw", || {
        metric(&n1, "mesh_tcp_connections_closed_total", &raw) == 1.0
    });
    assert_eq!(requests(), 0.0, "appProtocol tcp: no requests seen");
    // The same pod by its address is HTTP (detected).
    let pod = remote_pod(&bed, 8080);
    meshtest_in(&bed, "client", &["status", &pod, "/", "1"]);
    eventually("one request", || requests() == 1.0);

    // Linkerd's annotation on the namespace declares the pods' 8080 opaque.
    let state = || n1.admin("/state").expect("admin /state").body;
    let ns = bed.manifests_dir().join("namespaces.yaml");
    let text = std::fs::read_to_string(&ns).unwrap().replace(
        "name: default\n",
        "name: default\n  annotations:\n    config.linkerd.io/opaque-ports: \"8080\"\n",
    );
    std::fs::write(&ns, text).unwrap();
    eventually("the annotation applied", || {
        state().contains("\"version\": 2,")
    });
    let got = meshtest_in(&bed, "client", &["status", &pod, "/", "3"]);
    assert_eq!(num(&got, "status.200"), 3, "{got:?}");
    assert_eq!(requests(), 1.0, "opaque now: no more requests seen");

    // A bad annotation is refused with the field named; the last good state stays.
    let text = std::fs::read_to_string(&ns)
        .unwrap()
        .replace("\"8080\"", "\"80,http\"");
    std::fs::write(&ns, text).unwrap();
    eventually("the bad annotation reported", || {
        n1.log_text().contains(
            "Namespace default: field metadata.annotations[\"config.linkerd.io/opaque-ports\"]: \"http\" is not a port",
        )
    });
    let got = meshtest_in(&bed, "client", &["status", &pod, "/", "1"]);
    assert_eq!(num(&got, "status.200"), 1);
    assert_eq!(requests(), 1.0);
    assert!(state().contains("\"version\": 2,"));
}

#[test]
fn expect_100_continue_is_answered_through_the_mesh() {
    let _serial = serial();
    let bed = l7_bed();
    let (_n1, _n2) = agents(&bed);
    let body = bed.dir.join("upload.bin");
    std::fs::write(&body, vec![7u8; 100_000]).unwrap();
    // curl waits up to 20 s for `100 Continue` before sending the body: the request only
    // finishes quickly if the mesh lets it know promptly that the body is wanted.
    let mut curl = bed.pod_command("client", "curl").unwrap();
    curl.args([
        "-sS",
        "--expect100-timeout",
        "20",
        "-H",
        "Expect: 100-continue",
    ])
    .arg("--data-binary")
    .arg(format!("@{}", body.display()))
    .args(["-w", "\ntime=%{time_total}\n"])
    .arg(format!("http://{}/upload", remote_pod(&bed, 8080)));
    let text = must_succeed(curl, "curl with Expect: 100-continue");
    let kv = key_values(&text);
    assert_eq!(kv["bytes"], "100000", "{text}");
    let secs: f64 = kv["time"].parse().unwrap();
    assert!(secs < 10.0, "curl waited {secs} s for 100 Continue");
}

/// Services `api-a` (10.96.0.21) and `api-c` (10.96.0.22), one pod each, and an HTTPRoute on
/// `api`: `x-canary: yes` → api-c with header filters, `/split` → api-a 3 : api-c 1, exactly
/// `/` → `root` (api-a unless changed), `/gui/` rewritten to `/`, `/old` redirected to
/// example.org, `/slow` with a 300 ms timeout.
fn routes(bed: &Testbed, root: &str) -> String {
    let mut yaml = String::new();
    for (name, ip) in [("api-a", "10.96.0.21"), ("api-c", "10.96.0.22")] {
        yaml += &format!(
            "---\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{}]}}]\n",
            bed.pod(name).ip
        );
    }
    yaml + &format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api-routes, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: api, port: 80}}]\n  rules:\n  - matches: [{{headers: [{{name: x-canary, value: \"yes\"}}]}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-routed, value: canary}}]}}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {{add: [{{name: x-route, value: canary}}]}}\n    backendRefs: [{{name: api-c, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]\n    backendRefs: [{{name: api-a, port: 80, weight: 3}}, {{name: api-c, port: 80, weight: 1}}]\n  - matches: [{{path: {{type: Exact, value: /}}}}]\n    backendRefs: [{{name: {root}, port: 80}}]\n  - matches: [{{path: {{value: /gui/}}}}]\n    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}}}]\n    backendRefs: [{{name: api-a, port: 80}}]\n  - matches: [{{path: {{value: /old}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org, statusCode: 301}}}}]\n  - matches: [{{path: {{value: /slow}}}}]\n    timeouts: {{request: 300ms}}\n    backendRefs: [{{name: api-a, port: 80}}]\n"
    )
}

#[test]
fn an_httproute_on_a_service_routes_splits_filters_and_answers_404() {
    let _serial = serial();
    let bed = l7_bed();
    let file = bed.manifests_dir().join("routes.yaml");
    std::fs::write(&file, routes(&bed, "api-a")).unwrap();
    let (n1, _n2) = agents(&bed);
    let get = |path: &str, headers: &[&str]| {
        let mut cmd = bed.pod_command("client", meshtest()).unwrap();
        cmd.args(["get", API_SVC, path]).args(headers);
        must_succeed(cmd, "GET through the route")
    };

    // The routes in force, in the order requests try them.
    let dump = n1.admin("/config_dump").unwrap().body;
    let in_force = dump.split("\"routes\"").nth(1).expect("a routes section");
    assert!(
        in_force.contains("\"api.default.svc.cluster.local:80\": ["),
        "{in_force}"
    );
    let order: Vec<usize> = [
        "Exact /\"",
        "PathPrefix /split/",
        "PathPrefix /gui/",
        "PathPrefix /\"",
    ]
    .iter()
    .map(|p| {
        in_force
            .find(p)
            .unwrap_or_else(|| panic!("{p} not in {in_force}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{in_force}");

    // By header, to api-c, with the rule's request and response header filters. (At `/` the
    // exact path match would win: the spec ranks path before headers.)
    let canary = get("/c", &["x-canary:yes"]);
    assert!(canary.contains("hello from api-c"), "{canary}");
    assert!(canary.contains("header.x-route=canary\n"), "{canary}");
    let seen = get("/headers", &["x-canary:yes"]);
    assert!(seen.contains("x-routed: canary"), "{seen}");
    // By exact path, to api-a; by prefix, split 3 : 1 exactly over one keep-alive connection.
    assert!(get("/", &[]).contains("hello from api-a"));
    let split = meshtest_in(&bed, "client", &["h1-many", API_SVC, "/split/x", "400"]);
    assert_eq!(
        (num(&split, "from.api-a"), num(&split, "from.api-c")),
        (300, 100),
        "{split:?}"
    );
    // The prefix rewritten: the backend sees `/index.html`.
    let gui = get("/gui/index.html", &[]);
    assert!(gui.contains("path=/index.html\n"), "{gui}");
    // Redirected by the proxy itself.
    let moved = get("/old/page?x=1", &[]);
    assert!(moved.starts_with("status=301\n"), "{moved}");
    assert!(
        moved.contains("header.location=http://example.org/old/page?x=1\n"),
        "{moved}"
    );
    // A backend slower than the route's timeout: 504, flagged UT.
    let slow = get("/slow/3000", &[]);
    assert!(slow.starts_with("status=504\n"), "{slow}");
    let timed_out = [("response_code", "504"), ("response_flags", "UT")];
    assert_eq!(metric(&n1, "istio_requests_total", &timed_out), 1.0);

    // No rule takes it: 404 from the proxy, counted as such.
    let none = meshtest_in(&bed, "client", &["status", API_SVC, "/splitx", "2"]);
    assert_eq!(num(&none, "status.404"), 2, "{none:?}");
    let no_route = [("response_code", "404"), ("response_flags", "NR")];
    assert_eq!(metric(&n1, "istio_requests_total", &no_route), 2.0);

    // A broken route is refused and the routes in force stay.
    std::fs::write(
        bed.manifests_dir().join("broken-route.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: default}\nspec:\n  parentRefs: [{kind: Service, name: api}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/(\"}}]\n",
    )
    .unwrap();
    eventually("the broken route to be refused", || {
        n1.log_text()
            .contains("HTTPRoute default/broken: field spec.rules[0].matches[0].path.value")
    });
    assert!(get("/", &[]).contains("hello from api-a"));
    std::fs::remove_file(bed.manifests_dir().join("broken-route.yaml")).unwrap();

    // A changed route applies to new requests without a restart.
    std::fs::write(&file, routes(&bed, "api-c")).unwrap();
    eventually("the changed route", || {
        get("/", &[]).contains("hello from api-c")
    });
}

#[test]
fn a_consumer_route_applies_to_callers_in_its_namespace_only() {
    let _serial = serial();
    let consumer = PodSpec {
        namespace: "shop".into(),
        ..PodSpec::new("consumer", 0, "consumer")
    };
    let bed = l7_bed_with(vec![consumer]);
    // The producer's route sends `/` to api-a; the shop namespace's own route for `api` sends
    // everything to api-c and marks the response.
    std::fs::write(
        bed.manifests_dir().join("routes.yaml"),
        routes(&bed, "api-a")
            + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop-view, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: api, namespace: default, port: 80}]\n  rules:\n  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-view, value: shop}]}}]\n    backendRefs: [{name: api-c, namespace: default, port: 80}]\n",
    )
    .unwrap();
    let (n1, _n2) = agents(&bed);
    let get = |pod: &str, path: &str| {
        let mut cmd = bed.pod_command(pod, meshtest()).unwrap();
        cmd.args(["get", API_SVC, path]);
        must_succeed(cmd, "GET through the routes")
    };
    let producer_side = get("client", "/");
    assert!(
        producer_side.contains("hello from api-a"),
        "{producer_side}"
    );
    assert!(!producer_side.contains("header.x-view"), "{producer_side}");
    // For shop, its route replaces the producer's: even `/split` (the producer's 3 : 1 rule)
    // and `/nothing` (a 404 for others) go to api-c.
    for path in ["/", "/split", "/nothing"] {
        let shop_side = get("consumer", path);
        assert!(
            shop_side.contains("hello from api-c"),
            "{path}: {shop_side}"
        );
        assert!(
            shop_side.contains("header.x-view=shop\n"),
            "{path}: {shop_side}"
        );
    }
    let dump = n1.admin("/config_dump").unwrap().body;
    assert!(
        dump.contains("\"api.default.svc.cluster.local:80 (callers in shop)\": ["),
        "{dump}"
    );
}

/// Requests served by each api pod so far (their `/stats`), summed.
fn api_served(bed: &Testbed) -> u64 {
    ["api-a", "api-b", "api-c"]
        .iter()
        .map(|pod| {
            let stats = meshtest_in(bed, "client", &["get", &remote_stats(bed, pod), "/stats"]);
            num(&stats, "requests")
        })
        .sum()
}

fn remote_stats(bed: &Testbed, pod: &str) -> String {
    format!("{}:8080", bed.pod(pod).ip)
}

#[test]
fn linkerd_retry_annotations_retry_failures_within_the_budget() {
    let _serial = serial();
    let bed = l7_bed();
    let (n1, _n2) = agents(&bed);
    // Each api pod answers exactly every fifth `/flaky/20` request with 503.
    let run = |count: u64| {
        let before = api_served(&bed);
        let got = meshtest_in(
            &bed,
            "client",
            &["status", API_SVC, "/flaky/20", &count.to_string()],
        );
        (num(&got, "status.200"), api_served(&bed) - before, got)
    };
    let (ok, served, got) = run(1000);
    assert!(
        (780..=820).contains(&ok),
        "without retries ~80% succeed: {got:?}"
    );
    assert_eq!(served, 1000, "without retries each request is sent once");

    // The Service asks for retries of 5xx, up to 3 a request (Linkerd's annotations).
    let dir = bed.manifests_dir();
    let services = std::fs::read_to_string(dir.join("services.yaml")).unwrap();
    let annotated = services.replacen(
        "  name: api\n  namespace: default\n",
        "  name: api\n  namespace: default\n  annotations:\n    retry.linkerd.io/http: 5xx\n    retry.linkerd.io/limit: \"3\"\n",
        1,
    );
    assert_ne!(annotated, services);
    std::fs::write(dir.join("services.yaml"), annotated).unwrap();
    eventually("the Service's retry policy in force", || {
        let Ok(dump) = n1.admin("/config_dump") else {
            return false;
        };
        let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
        let rule = &dump["routes"]["api.default.svc.cluster.local:80"][0];
        rule["kind"] == "default" && rule["retry"]["limit"] == 3
    });
    let (ok, served, got) = run(1000);
    eprintln!("with retries: {ok} of 1000 succeeded, the backends received {served}: {got:?}");
    assert!(ok >= 990, "with retries >= 99% succeed: {got:?}");
    // A backend failing 20% of what it receives makes 1.25x the floor of any near-100%
    // success; each pod's 1-in-5 cycle may begin mid-way (one more failure each).
    assert!(
        served <= 1250 + 3,
        "the backends received {served} requests for 1000 (at most 1.25x)"
    );
    let retries = metric(
        &n1,
        "outbound_http_route_retry_requests_total",
        &[
            ("parent_name", "api"),
            ("route_kind", "default"),
            ("route_name", "api"),
        ],
    );
    assert_eq!(
        retries as u64,
        served - 1000,
        "every request beyond the first attempts is a counted retry"
    );
    let statuses = metric(
        &n1,
        "outbound_http_route_request_statuses_total",
        &[("parent_name", "api"), ("http_status", "200")],
    );
    assert_eq!(
        statuses as u64, ok,
        "the route counts the answers its callers got"
    );
    let timed = metric(
        &n1,
        "outbound_http_route_request_duration_seconds_count",
        &[("parent_name", "api"), ("route_kind", "default")],
    );
    assert_eq!(timed as u64, 1000, "and times each of them once");
}

#[test]
fn a_linkerd_idle_timeout_cuts_a_stream_that_goes_quiet() {
    let _serial = serial();
    let bed = l7_bed();
    // Every request to `api` goes to api-a, with a 1 s idle timeout (Linkerd's annotation).
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api-idle\n  namespace: default\n  annotations: {timeout.linkerd.io/idle: 1s}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api, port: 80}]\n  rules:\n  - backendRefs: [{name: api, port: 80}]\n";
    std::fs::write(bed.manifests_dir().join("routes.yaml"), route).unwrap();
    let (n1, _n2) = agents(&bed);
    eventually("the idle timeout in force", || {
        n1.admin("/config_dump").is_ok_and(|d| {
            let dump: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            dump["routes"]["api.default.svc.cluster.local:80"][0]["idle_timeout_ms"] == 1000
        })
    });
    // Chunks 300 ms apart keep the stream alive.
    let got = meshtest_in(&bed, "client", &["chunks", API_SVC, "4", "300"]);
    assert_eq!(num(&got, "chunks"), 4, "{got:?}");
    // 2.5 s of silence after the first chunk: the stream is cut, the client sees an error.
    let mut cmd = bed.pod_command("client", meshtest()).unwrap();
    cmd.args(["chunks", API_SVC, "2", "2500"]);
    let out = must_fail(cmd, "a stream quiet for longer than its idle timeout");
    assert!(!out.contains("chunks="), "{out}");
    // No response head for 2.5 s: 504.
    let mut cmd = bed.pod_command("client", meshtest()).unwrap();
    cmd.args(["get", API_SVC, "/slow/2500"]);
    let out = must_succeed(cmd, "GET /slow/2500");
    assert!(out.starts_with("status=504"), "{out}");
}
