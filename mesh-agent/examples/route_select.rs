//! Route selection among 1,000 routes: the cost of the one routing decision per request when a
//! Service carries a thousand HTTPRoutes (`cargo xtask bench` runs this and reports it).
//!
//! 1,000 routes of 3 rules each (a path prefix, an exact path with a header, a regular
//! expression), all attached to one Service port; requests that match the first entry, one
//! in the middle, the last, and none. Prints one JSON object: nanoseconds per selection.

#![allow(
    clippy::expect_used,
    reason = "a benchmark program: bad input is a bug here, reported by panicking"
)]

use std::{hint::black_box, sync::Arc, time::Instant};

use mesh_agent::state::manifest::{parse_file, Object};

fn main() {
    let mut yaml = String::new();
    for i in 0..1000 {
        yaml += &format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: web, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /api/v{i}}}}}]\n    backendRefs: [{{name: web-a, port: 80, weight: 1}}, {{name: web-b, port: 80, weight: 1}}]\n  - matches: [{{path: {{type: Exact, value: /exact/{i}}}, headers: [{{name: x-tenant, value: t{i}}}]}}]\n    backendRefs: [{{name: web-a, port: 80}}]\n  - matches: [{{path: {{type: RegularExpression, value: \"/re/{i}/[0-9]+\"}}}}]\n    backendRefs: [{{name: web-b, port: 80}}]\n"
        );
    }
    let objects = parse_file(std::path::Path::new("routes.yaml"), &yaml).expect("routes parse");
    let routes: Vec<Arc<mesh_agent::route::HttpRoute>> = objects
        .iter()
        .filter_map(|o| match o {
            Object::HttpRoute(r) => Some(Arc::new(r.compile().expect("route compiles"))),
            _ => None,
        })
        .collect();
    let table = mesh_agent::route::Table::new(&routes, 80);
    let adversarial = "/x".repeat(30_000);
    let cases = [
        ("exact_first", "/exact/0", "t0", true),
        ("exact_last", "/exact/999", "t999", true),
        ("prefix_middle", "/api/v500/items", "t1", true),
        ("regex_last", "/re/999/42", "t1", true),
        ("no_match", "/nothing/here", "t1", false),
        // What a hostile pod can send: a 60 KB path of 30,000 elements (under the 64 KiB
        // head limit). Reported apart from the target, which is for ordinary requests.
        ("adversarial_60k_path", adversarial.as_str(), "t1", false),
    ];
    let mut out = serde_json::Map::new();
    for (name, path, tenant, matches) in cases {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-tenant", tenant.parse().expect("header"));
        headers.insert("user-agent", "bench".parse().expect("header"));
        let head = mesh_agent::route::Head {
            method: &hyper::Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        assert_eq!(table.select(&head).is_some(), matches, "{name}");
        let iterations = 20_000u32;
        let start = Instant::now();
        for _ in 0..iterations {
            black_box(table.select(black_box(&head)));
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
        out.insert(
            name.to_owned(),
            serde_json::json!((ns * 10.0).round() / 10.0),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}
