//! Entry points of the fuzz targets (`fuzz/`, run by `cargo xtask fuzz`): each takes bytes as
//! a pod, a peer agent or a manifest author could send them, runs the code that reads them,
//! and must return without panicking, whatever they are. The seeds and every input that once
//! crashed (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) are replayed by the unit
//! test below, so CI keeps them without building the fuzzers.

use std::{path::Path, sync::Arc, sync::OnceLock};

use hyper::{HeaderMap, Method, Request, Uri};

use crate::{
    identity::Identity,
    policy::{self, Cidr, DefaultPolicy, Inbound},
    proxy::{detect, http, inbound::StreamHead, policy::http_of},
    route::{self, Head},
    state::{manifest, store},
};

/// One fuzz target: its name (its folder under `fuzz/`), and what it runs.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets: what `cargo xtask fuzz` runs and the replay test reads.
pub const TARGETS: [Target; 6] = [
    ("manifest", manifest),
    ("detect", detect),
    ("http_head", http_head),
    ("hbone_head", hbone_head),
    ("route", route),
    ("policy", policy),
];

/// A manifest file (YAML, any number of documents), and the same bytes as an object the
/// API server would send (JSON).
pub fn manifest(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = manifest::parse_file(Path::new("fuzz.yaml"), text);
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        if let (Some(kind), Some(api_version)) = (field("kind"), field("apiVersion")) {
            let _ = manifest::parse_api_object(&kind, &api_version, value, "fuzz");
        }
    }
}

/// A client's first bytes, as protocol detection sees them.
pub fn detect(data: &[u8]) {
    let _ = detect::classify(data);
}

/// An HTTP/1 request head from a pod, through what the proxy does to heads: hop-by-hop
/// headers, upgrades, the HTTP/2 round trip between agents, gRPC status, policy's view.
pub fn http_head(data: &[u8]) {
    let Some(mut req) = request_head(data) else {
        return;
    };
    let _ = http::is_grpc(&req);
    let _ = http::authority(&req);
    let _ = http::grpc_status(req.headers());
    let _ = http_of(&req);
    let upgrade = http::is_upgrade(&req);
    http::strip_hop_by_hop(req.headers_mut(), upgrade);
    let mut req = req.map(|()| http::Body::empty());
    http::upgrade_to_h2(&mut req, "10.96.0.1:80");
    assert!(
        http::downgrade_from_h2(&mut req),
        "a head upgraded to HTTP/2 comes back"
    );
    http::to_http1(&mut req);
}

/// A stream head from a peer agent (CONNECT, or a request naming its pod).
pub fn hbone_head(data: &[u8]) {
    let Some(req) = request_head(data) else {
        return;
    };
    if let Ok(head) = StreamHead::read(&req) {
        assert_eq!(head.tunnel, req.method() == Method::CONNECT);
    }
}

/// A request head matched against HTTPRoutes of every match kind.
pub fn route(data: &[u8]) {
    let Some(req) = request_head(data) else {
        return;
    };
    let head = Head {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let _ = route_table().select(&head);
}

/// A request authorized against Istio DENY and ALLOW policies; the first byte picks the
/// client (mesh identity or plaintext) and its address.
pub fn policy(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Some(req) = request_head(rest) else {
        return;
    };
    let (policy, client) = pod_policy();
    let ip = std::net::IpAddr::from([10, 200, pick % 16, pick]);
    let inbound = Inbound {
        port: 8080,
        client: (pick & 1 == 0).then_some(client),
        ip: Some(ip),
        http: Some(http_of(&req)),
    };
    let _ = policy::authorize(policy, &inbound);
}

/// An HTTP/1 request head as hyper would hand it over: method, target and headers that
/// parse; `None` for bytes that are not one.
fn request_head(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(data).ok()?;
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let uri: Uri = parsed.path?.parse().ok()?;
    let mut map = HeaderMap::new();
    for h in parsed.headers.iter() {
        let name = hyper::header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = hyper::header::HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    let mut req = Request::builder().method(method).uri(uri).body(()).ok()?;
    *req.headers_mut() = map;
    Some(req)
}

const ROUTES: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: fuzz, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: \"\", name: web, port: 80}]
  rules:
  - matches: [{path: {type: Exact, value: /exact}, method: POST}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}, headers: [{name: x-tenant, value: t1}]}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: RegularExpression, value: \"/re/[0-9]+/.*\"}}]
    backendRefs: [{name: b, port: 80}]
  - matches: [{queryParams: [{name: v, type: RegularExpression, value: \"[a-z]{1,8}\"}]}]
    backendRefs: [{name: b, port: 80}]
  - matches: [{headers: [{name: x-canary, type: RegularExpression, value: \"^yes\"}]}]
    backendRefs: [{name: a, port: 80, weight: 1}, {name: b, port: 80, weight: 1}]
";

fn route_table() -> &'static route::Table {
    static TABLE: OnceLock<route::Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let routes: Vec<Arc<route::HttpRoute>> = manifest::parse_file(Path::new("r.yaml"), ROUTES)
            .unwrap_or_default()
            .iter()
            .filter_map(|o| match o {
                manifest::Object::HttpRoute(r) => r.compile().ok().map(Arc::new),
                _ => None,
            })
            .collect();
        assert!(!routes.is_empty(), "the fuzz routes compile");
        route::Table::new(&routes, 80)
    })
}

const POLICIES: &str = "\
kind: Pod
metadata: {name: server-1, namespace: default, labels: {app: server}}
spec: {nodeName: n2, serviceAccountName: server, containers: [{ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.2.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin/*], methods: [DELETE]}}]
    when: [{key: \"request.headers[x-block]\", values: [\"v*\"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {ipBlocks: [10.200.3.0/24]}}]
  - from: [{source: {principals: [cluster.local/ns/default/sa/loadgen]}}]
    to: [{operation: {methods: [GET], paths: [/items/*], hosts: [\"*.example.com\"]}}]
";

fn pod_policy() -> (&'static policy::PodPolicy, &'static policy::Client) {
    static POLICY: OnceLock<(policy::PodPolicy, policy::Client)> = OnceLock::new();
    let (p, c) = POLICY.get_or_init(|| {
        let source: Arc<str> = Arc::from("fuzz.yaml");
        let changes = manifest::parse_file(Path::new("fuzz.yaml"), POLICIES)
            .unwrap_or_default()
            .iter()
            .map(|o| store::Change::put(&source, o))
            .collect();
        let mut store = store::Store::default();
        assert!(store.apply(changes).is_ok(), "the fuzz policies apply");
        let snapshot = store.snapshot();
        let pod = snapshot
            .pod_by_ip([10, 1, 2, 2].into())
            .cloned()
            .unwrap_or_else(|| unreachable!("the fuzz pod is in the state"));
        let networks: Arc<[Cidr]> = policy::default_cluster_networks().into();
        let policy = snapshot
            .policy
            .for_pod(&pod, DefaultPolicy::AllUnauthenticated, &networks);
        let client = policy::Client::new(Identity::new("cluster.local", "default", "loadgen"));
        (policy, client)
    });
    (p, c)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::expect_used, reason = "tests")]
    use super::*;

    /// Every seed and every input that once crashed a target, replayed.
    #[test]
    fn seeds_and_regressions_replay_cleanly() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            for dir in ["seeds", "regressions"] {
                let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("dir entry").path();
                    // `.keep` holds an empty folder in git.
                    if path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    {
                        continue;
                    }
                    target(&std::fs::read(&path).expect("read input"));
                    replayed += 1;
                }
            }
        }
        assert!(
            replayed >= TARGETS.len(),
            "seeds for every target: {replayed}"
        );
    }

    /// The brief run of every target that `cargo xtask test` makes (libFuzzer's long runs are
    /// `cargo xtask fuzz`): 20,000 deterministic mutations of each target's seeds (bytes
    /// flipped, inserted, removed, duplicated, cut), each fed to the target, which must not
    /// panic.
    #[test]
    fn every_target_survives_mutations_of_its_seeds() {
        const RUNS: usize = 20_000;
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: usize| {
            // xorshift64: reproducible, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound.max(1) as u64) as usize
        };
        for (name, target) in TARGETS {
            let seeds: Vec<Vec<u8>> = std::fs::read_dir(fuzz.join(name))
                .expect("seeds")
                .map(|e| std::fs::read(e.expect("dir entry").path()).expect("read seed"))
                .collect();
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for run in 0..RUNS {
                let mut input = seeds[run % seeds.len()].clone();
                for _ in 0..=next(4) {
                    let at = next(input.len() + 1);
                    match next(5) {
                        0 if at < input.len() => input[at] ^= 1 << next(8),
                        1 => input.insert(at, next(256) as u8),
                        2 if at < input.len() => drop(input.remove(at)),
                        3 => {
                            let end = (at + next(16)).min(input.len());
                            let copy = input[at..end].to_vec();
                            input.splice(at..at, copy);
                        }
                        _ => input.truncate(at),
                    }
                }
                target(&input);
            }
        }
    }
}
