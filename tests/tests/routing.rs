//! Routing configuration users bring (`tests/examples/`, from the Faces demo and Istio and
//! Linkerd tutorials), applied as written where the testbed allows, in its Istio form and in
//! its Gateway API / Linkerd form, with the outcome each mesh gives it observed on real
//! requests. Also per-request balancing under a slow endpoint and outlier ejection. Run as
//! root, serially.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_agent_tests::{harness::*, serial, Agent, PodSpec, Testbed, TestbedSpec};

/// The YAML documents of `text` whose `name:` is `name` (the examples keep one object per
/// document).
fn documents(text: &str, name: &str) -> String {
    text.split("\n---")
        .filter(|d| d.contains(&format!("  name: {name}\n")))
        .map(|d| format!("---\n{}\n", d.trim_start_matches('\n')))
        .collect()
}

fn num(kv: &BTreeMap<String, String>, key: &str) -> u64 {
    kv.get(key).map_or(0, |v| v.parse().unwrap())
}

/// Starts `meshtest http 8080 POD [options]` in each pod.
fn serve(bed: &Testbed, pods: &[(&str, &[&str])]) {
    for (pod, options) in pods {
        let mut server = bed.pod_command(pod, meshtest()).unwrap();
        server.args(["http", "8080", pod]).args(*options);
        bed.spawn(server).expect("start the server");
    }
}

/// Writes `yaml` as the manifests file `file` and waits (at most 1 s: route changes apply
/// without restart within that) until `agent` has rules for `service` (its
/// `name.namespace.svc.cluster.local:port`) that `ready` accepts.
fn apply(
    bed: &Testbed,
    agent: &Agent,
    file: &str,
    yaml: &str,
    service: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) {
    std::fs::write(bed.manifests_dir().join(file), yaml).unwrap();
    let start = Instant::now();
    eventually_for(
        &format!("{file} in force for {service}"),
        Duration::from_secs(1),
        || {
            let Ok(dump) = agent.admin("/config_dump") else {
                return false;
            };
            let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
            ready(&dump["routes"][service])
        },
    );
    eprintln!("{file}: in force after {:?}", start.elapsed());
}

/// The backends a rule table sends to, with their weights.
fn weights(rules: &serde_json::Value) -> Vec<(String, u64)> {
    rules[0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["service"].as_str().unwrap_or("").to_owned(),
                b["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// n1: client; faces (namespace `faces`): color and faces-gui on n1, color2 and smiley on n2.
fn faces_bed() -> Testbed {
    let faces = |name: &str, node, app: &str| PodSpec::new(name, node, app).in_namespace("faces");
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0, "client"),
            faces("color-a", 0, "color"),
            faces("color2-a", 1, "color2"),
            faces("smiley-a", 1, "smiley"),
            faces("faces-gui-a", 0, "faces-gui"),
        ],
        services: vec![
            service("color", "faces", "10.96.0.40", "color"),
            service("color2", "faces", "10.96.0.41", "color2"),
            service("smiley", "faces", "10.96.0.42", "smiley"),
            service("faces-gui", "faces", "10.96.0.43", "faces-gui"),
        ],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    serve(
        &bed,
        &[
            ("color-a", &[]),
            ("color2-a", &[]),
            ("smiley-a", &[]),
            ("faces-gui-a", &[]),
        ],
    );
    bed
}

const COLOR: &str = "10.96.0.40:80";
const SMILEY: &str = "10.96.0.42:80";
const GUI: &str = "10.96.0.43:80";
const COLOR_KEY: &str = "color.faces.svc.cluster.local:80";
const GUI_KEY: &str = "faces-gui.faces.svc.cluster.local:80";

/// 2,000 requests to `color` split within 45–55% between color and color2.
fn assert_even_color_split(bed: &Testbed) {
    let got = meshtest_in(bed, "client", &["h1-many", COLOR, "/", "2000"]);
    eprintln!("color split: {got:?}");
    assert_eq!(num(&got, "ok"), 2000, "{got:?}");
    for pod in ["color-a", "color2-a"] {
        let n = num(&got, &format!("from.{pod}"));
        assert!((900..=1100).contains(&n), "{pod}: {n} of 2000: {got:?}");
    }
}

/// `/gui/x` reaches faces-gui as `/x`.
fn assert_gui_rewrite(bed: &Testbed) {
    let mut cmd = bed.pod_command("client", meshtest()).unwrap();
    cmd.args(["get", GUI, "/gui/x"]);
    let out = must_succeed(cmd, "GET /gui/x");
    assert!(out.contains("hello from faces-gui-a"), "{out}");
    assert!(out.contains("path=/x\n"), "{out}");
}

#[test]
fn faces_split_rewrite_and_delay_as_istio_and_as_gateway_api() {
    let _serial = serial();
    let bed = faces_bed();
    let (n1, _n2) = agents(&bed);

    // Istio: the color split as written.
    let vs = example("faces/istio-virtualservices.yaml");
    apply(
        &bed,
        &n1,
        "faces.yaml",
        &documents(&vs, "color-split"),
        COLOR_KEY,
        |r| r[0]["kind"] == "VirtualService" && weights(r).len() == 2,
    );
    assert_even_color_split(&bed);
    // Gateway API: the guide's corrected GAMMA route, as written.
    let gamma = example("faces/expected-gateway-api.yaml");
    apply(
        &bed,
        &n1,
        "faces.yaml",
        &documents(&gamma, "color-split-idx-0"),
        COLOR_KEY,
        |r| r[0]["kind"] == "HTTPRoute",
    );
    assert_even_color_split(&bed);

    // The `/gui/` rewrite comes as ingress configuration (a Gateway parent, hosts `*`): the
    // testbed has no ingress gateway, so the same rule is attached to the faces-gui Service.
    let gui_vs = documents(&vs, "faces-gui").replace(
        "  - \"*\"\n  gateways:\n  - faces-gateway\n",
        "  - faces-gui\n",
    );
    assert_ne!(gui_vs, documents(&vs, "faces-gui"));
    apply(&bed, &n1, "faces.yaml", &gui_vs, GUI_KEY, |r| {
        r[0]["kind"] == "VirtualService"
    });
    assert_gui_rewrite(&bed);
    let gui_route = documents(&gamma, "faces-gui-idx-0-prefix-match").replace(
        "  - group: gateway.networking.k8s.io\n    kind: Gateway\n    name: faces-gateway\n",
        "  - group: \"\"\n    kind: Service\n    name: faces-gui\n",
    );
    apply(&bed, &n1, "faces.yaml", &gui_route, GUI_KEY, |r| {
        r[0]["kind"] == "HTTPRoute"
    });
    assert_gui_rewrite(&bed);

    // Istio: smiley delayed 5 s, every request (Gateway API and Linkerd have no fault
    // injection: the guide notes the translation drops it).
    apply(
        &bed,
        &n1,
        "faces.yaml",
        &documents(&vs, "smiley-delay"),
        "smiley.faces.svc.cluster.local:80",
        |r| r[0]["fault"]["delay"]["ms"] == 5000,
    );
    let got = meshtest_in(&bed, "client", &["h2-many", SMILEY, "/", "20"]);
    assert_eq!(num(&got, "ok"), 20, "{got:?}");
    assert_eq!(num(&got, "slow"), 20, "{got:?}");
    assert!(
        num(&got, "min_ms") >= 5000,
        "every request delayed 5 s: {got:?}"
    );
}

/// n1: client, my-service-v1-b; n2: my-service-v1-a, my-service-v2-a. Service my-service
/// selects all three; my-service-v1 and my-service-v2 (for the Gateway API form) one version.
fn my_service_bed() -> Testbed {
    let pod = |name: &str, node, version: &str| {
        PodSpec::new(name, node, "my-service").label("version", version)
    };
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0, "client"),
            pod("my-service-v1-a", 1, "v1"),
            pod("my-service-v1-b", 0, "v1"),
            pod("my-service-v2-a", 1, "v2"),
        ],
        services: vec![service("my-service", "default", "10.96.0.30", "my-service")],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    let versions = (1..=2)
        .map(|v| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: my-service-v{v}, namespace: default}}\nspec:\n  clusterIP: 10.96.0.3{v}\n  selector: {{app: my-service, version: v{v}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n")
        })
        .collect::<String>();
    std::fs::write(bed.manifests_dir().join("versions.yaml"), versions).unwrap();
    serve(
        &bed,
        &[
            ("my-service-v1-a", &[]),
            ("my-service-v1-b", &[]),
            ("my-service-v2-a", &[]),
        ],
    );
    bed
}

const MY_SERVICE: &str = "10.96.0.30:80";
const MY_KEY: &str = "my-service.default.svc.cluster.local:80";

/// The share (percent) of 2,000 requests to my-service that version 1 answered.
fn v1_share(bed: &Testbed) -> f64 {
    let got = meshtest_in(bed, "client", &["h1-many", MY_SERVICE, "/", "2000"]);
    eprintln!("my-service: {got:?}");
    assert_eq!(num(&got, "ok"), 2000, "{got:?}");
    let v1 = num(&got, "from.my-service-v1-a") + num(&got, "from.my-service-v1-b");
    let v2 = num(&got, "from.my-service-v2-a");
    assert_eq!(v1 + v2, 2000, "{got:?}");
    v1 as f64 / 20.0
}

/// How long a GET of `path` to my-service took, and its status.
fn timed_get(bed: &Testbed, path: &str) -> (Duration, String) {
    let mut cmd = bed.pod_command("client", meshtest()).unwrap();
    cmd.args(["get", MY_SERVICE, path]);
    let start = Instant::now();
    let out = must_succeed(cmd, "GET my-service");
    let status = key_values(&out).get("status").cloned().unwrap_or_default();
    (start.elapsed(), status)
}

#[test]
fn my_service_weights_canary_timeout_round_robin_and_fault() {
    let _serial = serial();
    let bed = my_service_bed();
    let (n1, _n2) = agents(&bed);

    // Istio: 80/20 between the DestinationRule's subsets, then the canary at 90/10.
    let routing = example("my-service/istio-routing.yaml");
    apply(&bed, &n1, "routing.yaml", &routing, MY_KEY, |r| {
        r[0]["kind"] == "VirtualService"
    });
    let share = v1_share(&bed);
    assert!((76.0..=84.0).contains(&share), "80/20: v1 got {share}%");
    let canary = routing
        .replace("weight: 80", "weight: 90")
        .replace("weight: 20", "weight: 10");
    apply(&bed, &n1, "routing.yaml", &canary, MY_KEY, |r| {
        r[0]["backends"][0]["weight"] == 90
    });
    let share = v1_share(&bed);
    assert!((86.0..=94.0).contains(&share), "90/10: v1 got {share}%");

    // Its ROUND_ROBIN DestinationRule: the two v1 pods strictly take turns.
    let mut v1_turns = Vec::new();
    for _ in 0..30 {
        let mut cmd = bed.pod_command("client", meshtest()).unwrap();
        cmd.args(["get", MY_SERVICE, "/"]);
        let out = must_succeed(cmd, "GET my-service");
        for pod in ["my-service-v1-a", "my-service-v1-b"] {
            if out.contains(&format!("hello from {pod}\n")) {
                v1_turns.push(pod);
            }
        }
    }
    assert!(v1_turns.len() >= 20, "{v1_turns:?}");
    assert!(
        v1_turns.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates: {v1_turns:?}"
    );

    // Gateway API: the same weights over per-version Services.
    let gamma = |v1: u32, v2: u32| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: my-service, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: my-service, port: 80}}]\n  rules:\n  - backendRefs: [{{name: my-service-v1, port: 80, weight: {v1}}}, {{name: my-service-v2, port: 80, weight: {v2}}}]\n")
    };
    std::fs::remove_file(bed.manifests_dir().join("routing.yaml")).unwrap();
    apply(&bed, &n1, "routing.yaml", &gamma(80, 20), MY_KEY, |r| {
        r[0]["kind"] == "HTTPRoute" && r[0]["backends"][0]["weight"] == 80
    });
    let share = v1_share(&bed);
    assert!((76.0..=84.0).contains(&share), "80/20: v1 got {share}%");
    apply(&bed, &n1, "routing.yaml", &gamma(90, 10), MY_KEY, |r| {
        r[0]["backends"][0]["weight"] == 90
    });
    let share = v1_share(&bed);
    assert!((86.0..=94.0).contains(&share), "90/10: v1 got {share}%");

    // An invalid route is refused and the last good one stays in force.
    std::fs::write(bed.manifests_dir().join("routing.yaml"), gamma(0, 0)).unwrap();
    eventually("the invalid route reported", || {
        n1.log_text().contains("every weight is 0")
    });
    let share = v1_share(&bed);
    assert!(
        (86.0..=94.0).contains(&share),
        "still 90/10: v1 got {share}%"
    );

    // The 3 s timeout, as Istio, Gateway API and Linkerd write it: 504 after 3 s.
    let faults = example("my-service/istio-fault-timeout.yaml");
    let gamma_timeout = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: my-service, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: my-service, port: 80}]\n  rules:\n  - backendRefs: [{name: my-service, port: 80}]\n    timeouts: {request: 3s}\n";
    let linkerd_timeout = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: my-service\n  namespace: default\n  annotations: {timeout.linkerd.io/request: 3s}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: my-service, port: 80}]\n  rules:\n  - backendRefs: [{name: my-service, port: 80}]\n";
    for (form, yaml) in [
        ("Istio", documents(&faults, "my-service-timeout")),
        ("Gateway API", gamma_timeout.to_owned()),
        ("Linkerd", linkerd_timeout.to_owned()),
    ] {
        apply(&bed, &n1, "routing.yaml", &yaml, MY_KEY, |r| {
            r[0]["timeout_ms"] == 3000
        });
        let (took, status) = timed_get(&bed, "/slow/5000");
        eprintln!("{form} timeout: {status} after {took:?}");
        assert_eq!(status, "504", "{form}: {status}");
        assert!(
            took >= Duration::from_millis(2700) && took <= Duration::from_millis(3300),
            "{form}: answered after {took:?}"
        );
        let (took, status) = timed_get(&bed, "/slow/100");
        assert_eq!(status, "200", "{form}: a quick request is not cut");
        assert!(took < Duration::from_secs(3), "{form}: {took:?}");
    }

    // Istio: half of the requests delayed 5 s.
    apply(
        &bed,
        &n1,
        "routing.yaml",
        &documents(&faults, "my-service-fault"),
        MY_KEY,
        |r| r[0]["fault"]["delay"]["percent"] == 50.0,
    );
    let got = meshtest_in(&bed, "client", &["h2-many", MY_SERVICE, "/", "200"]);
    assert_eq!(num(&got, "ok"), 200, "{got:?}");
    let delayed = num(&got, "slow");
    eprintln!("50% fault: {got:?}");
    assert!(
        (90..=110).contains(&delayed),
        "{delayed} of 200 delayed: {got:?}"
    );
    assert!(num(&got, "max_ms") >= 5000, "{got:?}");
}

/// n1: client, api-c; n2: api-a, api-b — each `meshtest http` with `options`.
fn api_bed(options: [&[&str]; 3]) -> Testbed {
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0, "client"),
            PodSpec::new("api-a", 1, "api"),
            PodSpec::new("api-b", 1, "api"),
            PodSpec::new("api-c", 0, "api"),
        ],
        services: vec![service("api", "default", "10.96.0.20", "api")],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    serve(
        &bed,
        &[
            ("api-a", options[0]),
            ("api-b", options[1]),
            ("api-c", options[2]),
        ],
    );
    bed
}

const API: &str = "10.96.0.20:80";

/// Requests pod `pod` has served.
fn served(bed: &Testbed, pod: &str) -> u64 {
    let addr = format!("{}:8080", bed.pod(pod).ip);
    num(
        &meshtest_in(bed, "client", &["get", &addr, "/stats"]),
        "requests",
    )
}

#[test]
fn a_slow_endpoint_gets_few_requests_and_a_failing_one_is_ejected_and_readmitted() {
    let _serial = serial();
    // api-b adds 50 ms to every answer; api-c fails every request.
    let bed = api_bed([&[], &["delay=50"], &["fail=100"]]);
    let (n1, _n2) = agents(&bed);

    // Peak-EWMA (no DestinationRule): the slow endpoint gets under 10%. api-c fails, so only
    // the two others' answers count here; it is measured below.
    let got = meshtest_in(&bed, "client", &["h1-many", API, "/", "2000"]);
    let slow = num(&got, "from.api-b");
    eprintln!("peak-EWMA with a 50 ms endpoint: {got:?}");
    assert!(slow < 200, "the 50 ms endpoint got {slow} of 2000: {got:?}");

    // Istio's outlier detection: 3 consecutive 5xx eject for 3 s (then 6 s).
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api, namespace: default}\nspec:\n  host: api.default.svc.cluster.local\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50}\n";
    std::fs::write(bed.manifests_dir().join("dr.yaml"), dr).unwrap();
    eventually("the DestinationRule in force", || {
        n1.admin("/config_dump").is_ok_and(|d| {
            let dump: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            dump["traffic"]["api.default.svc.cluster.local:80"]["outlier"]["consecutive_5xx"] == 3
        })
    });
    let before = served(&bed, "api-c");
    let got = meshtest_in(&bed, "client", &["h1-many", API, "/", "300"]);
    let first = served(&bed, "api-c") - before;
    assert_eq!(first, 3, "ejected after its third failure: {got:?}");
    let ejected_at = Instant::now();
    assert_eq!(
        metric(
            &n1,
            "outbound_http_outlier_ejections_total",
            &[("service_name", "api")]
        ),
        1.0
    );
    // While ejected it receives nothing.
    let got = meshtest_in(&bed, "client", &["h1-many", API, "/", "300"]);
    assert!(
        ejected_at.elapsed() < Duration::from_secs(3),
        "the check ran late"
    );
    assert_eq!(
        served(&bed, "api-c") - before,
        3,
        "nothing while ejected: {got:?}"
    );
    assert_eq!(num(&got, "ok"), 300, "{got:?}");
    // Readmitted after 3 s, it fails three times again and is ejected again.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(ejected_at.elapsed()));
    let got = meshtest_in(&bed, "client", &["h1-many", API, "/", "300"]);
    assert_eq!(
        served(&bed, "api-c") - before,
        6,
        "readmitted, then ejected: {got:?}"
    );
    assert_eq!(
        metric(
            &n1,
            "outbound_http_outlier_ejections_total",
            &[("service_name", "api")]
        ),
        2.0
    );
}
