//! Policy evaluation: the cost of the one authorization decision per request
//! (`policy::authorize`) under policies of 50 rules (`cargo xtask bench` runs this and reports
//! it).
//!
//! Cases: no policy (the default); an Istio ALLOW policy of 50 rules that a request goes
//! through in order and matches by the last (the bench scenario's policy); the same behind
//! an Istio DENY policy of 50 rules none matches; a Linkerd Server with 50 AuthorizationPolicies
//! whose last admits the client. Prints one JSON object: nanoseconds per decision.

#![allow(
    clippy::expect_used,
    reason = "a benchmark program: bad input is a bug here, reported by panicking"
)]

use std::{hint::black_box, path::Path, sync::Arc, time::Instant};

use mesh_agent::{
    identity::Identity,
    policy::{self, Cidr, DefaultPolicy, Http, Inbound},
    route::Head,
    state::{manifest::parse_file, store},
};

const POD: &str = "kind: Pod\nmetadata: {name: server-1, namespace: default, labels: {app: server}}\nspec: {nodeName: n2, serviceAccountName: server, containers: [{ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.1.2.2}\n";

fn istio(name: &str, action: &str, rules: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  rules:\n{rules}")
}

fn allow_50() -> String {
    let mut rules = String::new();
    for i in 0..10 {
        rules += &format!("  - from: [{{source: {{ipBlocks: [10.200.{i}.0/24]}}}}]\n");
    }
    for i in 10..49 {
        rules += &format!("  - from: [{{source: {{principals: [cluster.local/ns/default/sa/other-{i}]}}}}]\n    to: [{{operation: {{methods: [POST], paths: [/admin/{i}/*]}}}}]\n");
    }
    rules += "  - from: [{source: {principals: [cluster.local/ns/default/sa/loadgen]}}]\n    to: [{operation: {methods: [GET]}}]\n";
    istio("allow", "ALLOW", &rules)
}

fn deny_50() -> String {
    let mut rules = String::new();
    for i in 0..50 {
        rules += &format!("  - to: [{{operation: {{paths: [/blocked/{i}/*], methods: [DELETE]}}}}]\n    when: [{{key: \"request.headers[x-block]\", values: [v{i}]}}]\n");
    }
    istio("deny", "DENY", &rules)
}

fn linkerd_50() -> String {
    let mut yaml = "---\napiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: http, namespace: default}\nspec: {podSelector: {matchLabels: {app: server}}, port: http}\n".to_owned();
    for i in 0..50 {
        let sa = if i == 49 {
            "loadgen".to_owned()
        } else {
            format!("other-{i}")
        };
        yaml += &format!("---\napiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: m{i}, namespace: default}}\nspec: {{identities: [\"{sa}.default.serviceaccount.identity.linkerd.cluster.local\"]}}\n---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: a{i}, namespace: default}}\nspec:\n  targetRef: {{group: policy.linkerd.io, kind: Server, name: http}}\n  requiredAuthenticationRefs: [{{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: m{i}}}]\n");
    }
    yaml
}

fn pod_policy(yaml: &str) -> policy::PodPolicy {
    let source: Arc<str> = Arc::from("bench.yaml");
    let changes = parse_file(Path::new("bench.yaml"), &format!("{POD}{yaml}"))
        .expect("manifests parse")
        .iter()
        .map(|o| store::Change::put(&source, o))
        .collect();
    let mut store = store::Store::default();
    store.apply(changes).expect("manifests apply");
    let snapshot = store.snapshot();
    let pod = snapshot
        .pod_by_ip("10.1.2.2".parse().expect("ip"))
        .expect("the pod");
    let networks: Arc<[Cidr]> = policy::default_cluster_networks().into();
    snapshot
        .policy
        .for_pod(pod, DefaultPolicy::AllUnauthenticated, &networks)
}

fn main() {
    let client = policy::Client::new(Identity::new("cluster.local", "default", "loadgen"));
    let mut headers = hyper::HeaderMap::new();
    headers.insert("user-agent", "bench".parse().expect("header"));
    headers.insert("accept", "*/*".parse().expect("header"));
    let cases = [
        ("no_policy", String::new()),
        ("istio_allow_50_rules_last_matches", allow_50()),
        (
            "istio_deny_50_none_match_then_allow_50",
            format!("{}{}", deny_50(), allow_50()),
        ),
        (
            "linkerd_server_50_authorizations_last_matches",
            linkerd_50(),
        ),
    ];
    let mut out = serde_json::Map::new();
    for (name, yaml) in cases {
        let policy = pod_policy(&yaml);
        let req = Inbound {
            port: 8080,
            client: Some(&client),
            ip: Some("10.1.1.2".parse().expect("ip")),
            http: Some(Http {
                head: Head {
                    method: &hyper::Method::GET,
                    path: "/items/42",
                    query: None,
                    headers: &headers,
                },
                host: Some("server.default.svc.cluster.local"),
            }),
        };
        assert!(policy::authorize(&policy, &req).allowed, "{name}");
        let iterations = 200_000u32;
        let start = Instant::now();
        for _ in 0..iterations {
            black_box(policy::authorize(black_box(&policy), black_box(&req)));
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
        out.insert(
            name.to_owned(),
            serde_json::json!((ns * 10.0).round() / 10.0),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}
