//! Gateway API mesh conformance (GAMMA) on the testbed: every test and request case of the
//! upstream suite (`tests/conformance/gamma/cases.json`, its manifests and the echo app of
//! `ECHO.md`), run against real agents. Pods are named as a Deployment names them, both
//! namespaces are enrolled, Service names resolve inside the client pods, and each case is sent
//! by the echo client from the pod the case names, through the mesh. Run as root, serially.
//!
//! Stricter than upstream where the testbed allows it: a test's routes must be in force on both
//! agents (`/config_dump`) before its cases run; a case must then pass on its first attempts
//! and keep passing (upstream accepts any 3 consecutive passes within 30 s, which a route that
//! is ignored passes by chance when both backends answer); redirects are checked down to the
//! `Location` the spec gives (upstream checks only the status).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_agent_tests::{harness::*, serial, Agent, PodSpec, Testbed, TestbedSpec};
use serde_json::Value;

const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
/// One pod per Deployment, named as Kubernetes names them (`<deployment>-<hash>-<hash>`): the
/// suite tells backends apart by that name.
const ECHO_V1: &str = "echo-v1-6b7f9c8d4-x2k9q";
const ECHO_V2: &str = "echo-v2-5d8c7f6b9-p4m7z";
const CONSUMER_V1: &str = "echo-v1-7c9d8b6f5-h3j8w";
/// Cluster IPs for the suite's Services, which leave them to Kubernetes to allocate.
const CLUSTER_IPS: [(&str, &str); 3] = [
    ("echo-v1", "10.96.1.1"),
    ("echo-v2", "10.96.1.2"),
    ("echo", "10.96.1.3"),
];
/// Cases the testbed cannot express, with the reason. Empty: every case of the suite runs, and
/// a case skipped for any other reason fails the runner.
const SKIPPED: &[(&str, &str)] = &[];
/// How long a case may take to pass for the first time once its routes are in force.
const FIRST_PASS: Duration = Duration::from_secs(10);
/// Attempts after the first pass, every one of which must pass.
const KEEP_PASSING: usize = 3;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/gamma")
}

/// n1: echo-v1 (the client of most cases); n2: echo-v2 and the consumer namespace's echo-v1,
/// so that routes are exercised on the same node and across nodes.
fn conformance_bed() -> Testbed {
    let echo = |name: &str, node, ns: &str, version: &str| {
        PodSpec::new(name, node, "echo")
            .in_namespace(ns)
            .label("version", version)
    };
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            echo(ECHO_V1, 0, MESH, "v1"),
            echo(ECHO_V2, 1, MESH, "v2"),
            echo(CONSUMER_V1, 1, CONSUMER, "v1"),
        ],
        services: Vec::new(),
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    // The suite's base manifests (its Namespaces replace the testbed's), with the cluster IPs
    // Kubernetes would have allocated.
    std::fs::remove_file(bed.manifests_dir().join("namespaces.yaml")).unwrap();
    let base = std::fs::read_to_string(data().join("manifests/manifests.yaml")).unwrap();
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(&base) {
        let mut doc: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] == "Service" {
            let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
            let ip = CLUSTER_IPS.iter().find(|(n, _)| *n == name).unwrap().1;
            doc["spec"]["clusterIP"] = ip.into();
        }
        let _ = write!(out, "---\n{}", serde_yaml::to_string(&doc).unwrap());
    }
    std::fs::write(bed.manifests_dir().join("conformance-base.yaml"), out).unwrap();
    let names: Vec<(&str, &str, IpAddr)> = CLUSTER_IPS
        .iter()
        .map(|(name, ip)| (MESH, *name, ip.parse().unwrap()))
        .collect();
    bed.publish_names(&names).unwrap();
    for pod in [ECHO_V1, ECHO_V2, CONSUMER_V1] {
        let mut server = bed.pod_command(pod, meshtest()).unwrap();
        server.args(["echo-server", pod]);
        bed.spawn(server).expect("start the echo server");
    }
    bed
}

/// The pod a case sends from: the first pod matching the selector in the namespace.
fn client_pod(client: &Value) -> &'static str {
    match (
        client["namespace"].as_str().unwrap(),
        client["selector"].as_str().unwrap(),
    ) {
        (MESH, "app=echo,version=v1") => ECHO_V1,
        (MESH, "app=echo,version=v2") => ECHO_V2,
        (CONSUMER, "app=echo,version=v1") => CONSUMER_V1,
        other => panic!("no pod for client {other:?}"),
    }
}

/// The echo client's arguments for a request, with run-time references (a pod's IP) filled in.
fn client_args(bed: &Testbed, argv: &Value) -> Vec<String> {
    let v2_ip = format!("<pod-ip:{MESH}/app=echo,version=v2>");
    argv.as_array().unwrap()[1..]
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace(&v2_ip, &bed.pod(ECHO_V2).ip.to_string())
        })
        .collect()
}

/// One response as upstream's `parse.go` reads the echo client's output.
#[derive(Debug, Default)]
struct Reply {
    status: Option<String>,
    hostname: Option<String>,
    /// What the backend received: lower-cased names, values in arrival order.
    request_headers: BTreeMap<String, Vec<String>>,
    /// Response headers, lower-cased names; the last value of a name wins.
    response_headers: BTreeMap<String, String>,
}

impl Reply {
    fn parse(block: &str) -> Reply {
        let mut reply = Reply::default();
        for line in block.lines() {
            // `[i] ` / `[i body] ` prefixes do not matter; the first match of a field wins.
            let text = line.split_once("] ").map_or(line, |(_, t)| t);
            if let Some(v) = text.strip_prefix("StatusCode=") {
                reply.status.get_or_insert_with(|| v.to_owned());
            } else if let Some(v) = text.strip_prefix("Hostname=") {
                reply.hostname.get_or_insert_with(|| v.to_owned());
            } else if let Some((name, value)) = text
                .strip_prefix("RequestHeader=")
                .and_then(|h| h.split_once(':'))
            {
                reply
                    .request_headers
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .push(value.to_owned());
            } else if let Some((name, value)) = text
                .strip_prefix("ResponseHeader=")
                .and_then(|h| h.split_once(':'))
            {
                reply
                    .response_headers
                    .insert(name.to_ascii_lowercase(), value.to_owned());
            }
        }
        reply
    }

    /// The Deployment that answered: the pod name without its last two `-` segments.
    fn backend(&self) -> Option<String> {
        let name = self.hostname.as_deref()?;
        let parts: Vec<&str> = name.split('-').collect();
        Some(match parts.len() {
            n if n >= 3 => parts[..n - 2].join("-"),
            _ => name.to_owned(),
        })
    }
}

/// Sends one case's request; `Err` says what differed from the expectation.
fn attempt(bed: &Testbed, case: &Value) -> Result<(), String> {
    let pod = client_pod(&case["client"]);
    let args = client_args(bed, &case["request"]["client_argv"]);
    let mut cmd = bed.pod_command(pod, meshtest()).unwrap();
    cmd.arg("echo-client").args(&args);
    let out = cmd.output().map_err(|e| format!("run echo-client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "echo-client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let reply = Reply::parse(&text);
    let expect = &case["expect"];
    let mut wrong = Vec::new();
    let statuses: Vec<String> = expect["status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap().to_string())
        .collect();
    if !reply.status.as_ref().is_some_and(|s| statuses.contains(s)) {
        wrong.push(format!(
            "status {:?}, want one of {statuses:?}",
            reply.status
        ));
    }
    if let Some(backend) = expect["backend"].as_str() {
        if !reply
            .hostname
            .as_deref()
            .is_some_and(|h| h.starts_with(backend))
        {
            wrong.push(format!("answered by {:?}, want {backend}", reply.hostname));
        }
    }
    let seen = &expect["request_seen_by_backend"];
    for (name, want) in seen["headers"].as_object().into_iter().flatten() {
        let got = reply
            .request_headers
            .get(&name.to_ascii_lowercase())
            .map(|v| v.join(","));
        if got.as_deref() != want.as_str() {
            wrong.push(format!("backend saw {name}: {got:?}, want {want}"));
        }
    }
    for name in seen["absent_headers"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap();
        if let Some(v) = reply.request_headers.get(&name.to_ascii_lowercase()) {
            wrong.push(format!("backend saw {name}: {v:?}, want it absent"));
        }
    }
    for (name, want) in expect["response_headers"].as_object().into_iter().flatten() {
        let got = reply.response_headers.get(&name.to_ascii_lowercase());
        if got.map(String::as_str) != want.as_str() {
            wrong.push(format!("response {name}: {got:?}, want {want}"));
        }
    }
    for name in expect["response_absent_headers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap();
        if let Some(v) = reply.response_headers.get(&name.to_ascii_lowercase()) {
            wrong.push(format!("response {name}: {v:?}, want it absent"));
        }
    }
    if let Some(location) = expect["redirect"]["location_per_spec"].as_str() {
        let got = reply.response_headers.get("location");
        if got.map(String::as_str) != Some(location) {
            wrong.push(format!("Location {got:?}, want {location}"));
        }
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(format!("{}\n--- client output:\n{text}", wrong.join("; "))),
    }
}

/// A case passes once within [`FIRST_PASS`], then [`KEEP_PASSING`] times more in a row.
fn run_case(bed: &Testbed, case: &Value) -> Result<usize, String> {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt(bed, case) {
            Ok(()) => break,
            Err(e) if start.elapsed() > FIRST_PASS => {
                return Err(format!("never passed in {tries} attempts; last: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    for i in 0..KEEP_PASSING {
        attempt(bed, case).map_err(|e| format!("passed, then failed attempt {}: {e}", i + 2))?;
    }
    Ok(tries)
}

/// A weighted-distribution check: `--count=500`, each backend within 5 points of its weight,
/// exactly the backends of non-zero weight seen; any of up to 10 attempts may pass (upstream).
fn run_distribution(bed: &Testbed, test: &Value) -> Result<String, String> {
    let dist = &test["distribution"];
    let case = &test["cases"][0];
    let pod = client_pod(&case["client"]);
    let want: BTreeMap<String, f64> = dist["weights"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let count = dist["requests_to_send"].as_u64().unwrap();
    let mut last = String::new();
    for _ in 0..dist["max_attempts"].as_u64().unwrap() {
        let args = client_args(bed, &dist["client_argv"]);
        let mut cmd = bed.pod_command(pod, meshtest()).unwrap();
        cmd.arg("echo-client").args(&args);
        let out = cmd.output().unwrap();
        if !out.status.success() {
            last = format!("client failed: {}", String::from_utf8_lossy(&out.stderr));
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let replies: Vec<Reply> = text
            .split("\n\n")
            .filter(|b| b.contains("Hostname=") || b.contains("StatusCode="))
            .map(Reply::parse)
            .collect();
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for r in &replies {
            *seen
                .entry(r.backend().unwrap_or_else(|| "<none>".into()))
                .or_default() += 1;
        }
        let within = want.iter().all(|(b, w)| {
            let got = seen.get(b).copied().unwrap_or(0) as f64 / count as f64;
            (got - w).abs() <= 0.05
        });
        let backends: BTreeSet<&String> = seen.keys().collect();
        let wanted: BTreeSet<&String> = want.keys().collect();
        last = format!("{} responses, {seen:?}", replies.len());
        if replies.len() as u64 == count && within && backends == wanted {
            return Ok(last);
        }
    }
    Err(format!(
        "no attempt within the weights {want:?}: last {last}"
    ))
}

/// The routes (`namespace/name`) the agent has in force, from `/config_dump`.
fn routes_in_force(agent: &Agent) -> BTreeSet<String> {
    let Ok(dump) = agent.admin("/config_dump") else {
        return BTreeSet::new();
    };
    let dump: Value = serde_json::from_str(&dump.body).unwrap_or_default();
    let mut out = BTreeSet::new();
    for table in dump["routes"].as_object().into_iter().flatten() {
        for entry in table.1.as_array().into_iter().flatten() {
            if let Some(route) = entry["route"].as_str() {
                out.insert(route.to_owned());
            }
        }
    }
    out
}

/// The routes (`namespace/name`) of a manifest file.
fn routes_of(text: &str) -> BTreeSet<String> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| {
            let doc: serde_yaml::Value = serde::Deserialize::deserialize(doc).ok()?;
            matches!(doc["kind"].as_str(), Some("HTTPRoute" | "GRPCRoute")).then(|| {
                format!(
                    "{}/{}",
                    doc["metadata"]["namespace"].as_str().unwrap_or("default"),
                    doc["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
        })
        .collect()
}

#[test]
fn gateway_api_mesh_conformance() {
    let _serial = serial();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap();
    let bed = conformance_bed();
    let (n1, n2) = agents(&bed);
    let tests = cases["tests"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut report = String::new();
    let (mut ran, mut skipped) = (0u64, Vec::new());
    for test in tests {
        let short = test["short_name"].as_str().unwrap();
        // This test's manifests, and nobody else's.
        let dir = bed.manifests_dir();
        for old in std::fs::read_dir(&dir).unwrap().flatten() {
            if old.file_name().to_string_lossy().starts_with("test-") {
                std::fs::remove_file(old.path()).unwrap();
            }
        }
        let mut routes = BTreeSet::new();
        for file in test["manifests"].as_array().unwrap() {
            let file = file.as_str().unwrap();
            let text = std::fs::read_to_string(data().join("manifests").join(file)).unwrap();
            routes.extend(routes_of(&text));
            std::fs::write(dir.join(format!("test-{file}")), text).unwrap();
        }
        let start = Instant::now();
        while routes_in_force(&n1) != routes || routes_in_force(&n2) != routes {
            if start.elapsed() > Duration::from_secs(10) {
                let log = n1.log_text();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                panic!(
                    "{short}: routes {routes:?} not in force after 10 s (n1 has {:?}); n1's log ends:\n{}",
                    routes_in_force(&n1),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for case in test["cases"].as_array().unwrap() {
            let id = case["id"].as_str().unwrap();
            if let Some((_, why)) = SKIPPED.iter().find(|(s, _)| *s == id) {
                skipped.push(format!("{id}: {why}"));
                continue;
            }
            ran += 1;
            match run_case(&bed, case) {
                Ok(tries) => {
                    let _ = writeln!(report, "pass {id} (first pass on attempt {tries})");
                }
                Err(e) => failures.push(format!("{id} ({}): {e}", case["name"])),
            }
        }
        if !test["distribution"].is_null() {
            match run_distribution(&bed, test) {
                Ok(seen) => {
                    let _ = writeln!(report, "pass {short} weights: {seen}");
                }
                Err(e) => failures.push(format!("{short} weights: {e}")),
            }
        }
    }
    eprintln!("{report}");
    let total = cases["summary"]["cases"].as_u64().unwrap();
    assert_eq!(
        ran + skipped.len() as u64,
        total,
        "every case either runs or is skipped with a reason"
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert_eq!(skipped.len(), SKIPPED.len(), "skips: {skipped:?}");
}
