//! Table-driven tests of the whole path a policy takes: YAML → validated objects → the store's
//! index → what applies to a pod → one decision.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{net::IpAddr, path::Path, sync::Arc};

use hyper::{HeaderMap, Method};

use super::*;
use crate::{
    route::Head,
    state::{manifest, store, Snapshot},
};

fn snapshot(yaml: &str) -> Result<Snapshot, String> {
    let source: Arc<str> = Arc::from("t.yaml");
    let changes = manifest::parse_file(Path::new("t.yaml"), yaml)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|object| store::Change::put(&source, &object))
        .collect();
    let mut store = store::Store::default();
    store.apply(changes).map_err(|e| e.to_string())?;
    Ok(store.snapshot())
}

/// Pods: `web` (app=web, SA web, port 8080 named http, 9090 named admin) in `shop`, `db` in
/// `data`.
const PODS: &str = r#"
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, tier: front}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9090}]}]
status: {podIP: 10.1.1.2}
---
kind: Pod
metadata: {name: db-1, namespace: data, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: db}
status: {podIP: 10.1.1.3}
---
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

/// A client: `ns/sa` with mTLS, or `-` for plaintext; from `ip`.
struct Call<'a> {
    client: &'a str,
    ip: &'a str,
    port: u16,
    /// `METHOD /path` (and `host`), or TCP.
    http: Option<(&'a str, &'a str)>,
    host: Option<&'a str>,
    headers: &'a [(&'a str, &'a str)],
}

fn call<'a>(client: &'a str, port: u16, http: Option<(&'a str, &'a str)>) -> Call<'a> {
    Call {
        client,
        ip: "10.1.2.7",
        port,
        http,
        host: None,
        headers: &[],
    }
}

fn decide_with(yaml: &str, pod: &str, c: &Call, default: DefaultPolicy) -> Verdict {
    let s = snapshot(&format!("{PODS}{yaml}")).unwrap();
    let ip: IpAddr = match pod {
        "web" => "10.1.1.2",
        _ => "10.1.1.3",
    }
    .parse()
    .unwrap();
    let workload = s.pod_by_ip(ip).unwrap();
    let networks: Arc<[Cidr]> = default_cluster_networks().into();
    let policy = s.policy.for_pod(workload, default, &networks);
    let client = match c.client {
        "-" => None,
        id => {
            let (ns, sa) = id.split_once('/').unwrap();
            Some(Client::new(crate::identity::Identity::new(
                "cluster.local",
                ns,
                sa,
            )))
        }
    };
    let method: Option<Method> = c.http.map(|(m, _)| m.parse().unwrap());
    let mut headers = HeaderMap::new();
    for (k, v) in c.headers {
        headers.insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let http = match (&method, c.http) {
        (Some(method), Some((_, path))) => Some(Http {
            head: Head {
                method,
                path,
                query: None,
                headers: &headers,
            },
            host: c.host,
        }),
        _ => None,
    };
    authorize(
        &policy,
        &Inbound {
            port: c.port,
            client: client.as_ref(),
            ip: Some(c.ip.parse().unwrap()),
            http,
        },
    )
}

fn decide(yaml: &str, c: &Call) -> Verdict {
    decide_with(yaml, "web", c, DefaultPolicy::AllUnauthenticated)
}

/// `allow`/`deny`, and who decided (`kind:name`).
fn outcome(v: &Verdict) -> String {
    let word = match (v.allowed, v.status) {
        (true, _) => "allow",
        (false, 404) => "notfound",
        (false, _) => "deny",
    };
    format!("{word} {}:{}", v.authz.kind, v.authz.name)
}

#[test]
fn default_policies_by_client() {
    // (policy, authenticated in-cluster, authenticated from outside, plaintext in-cluster,
    // plaintext from outside)
    let table = [
        ("all-unauthenticated", [true, true, true, true]),
        ("all-authenticated", [true, true, false, false]),
        ("cluster-authenticated", [true, false, false, false]),
        ("cluster-unauthenticated", [true, false, true, false]),
        ("deny", [false, false, false, false]),
        ("audit", [true, true, true, true]),
    ];
    for (name, expected) in table {
        let policy: DefaultPolicy = name.parse().unwrap();
        let clients = [
            ("shop/a", "10.1.2.7"),
            ("shop/a", "203.0.113.9"),
            ("-", "10.1.2.7"),
            ("-", "203.0.113.9"),
        ];
        for ((client, ip), want) in clients.into_iter().zip(expected) {
            let c = Call {
                ip,
                ..call(client, 8080, None)
            };
            let v = decide_with("", "web", &c, policy);
            assert_eq!(v.allowed, want, "{name} {client} {ip}");
            assert_eq!(
                (v.server.kind, &*v.server.name, v.authz.kind, &*v.authz.name),
                ("default", name, "default", name)
            );
            assert_eq!(v.audit.is_some(), policy == DefaultPolicy::Audit);
        }
    }
}

#[test]
fn the_pod_annotation_wins_over_the_namespace_which_wins_over_the_agent() {
    let ns = "---\nkind: Namespace\nmetadata: {name: data, annotations: {config.linkerd.io/default-inbound-policy: deny}}\n";
    let c = call("shop/web", 5432, None);
    assert!(!decide_with(ns, "db", &c, DefaultPolicy::AllUnauthenticated).allowed);
    // The agent's default applies where neither says.
    assert!(!decide_with("", "db", &c, DefaultPolicy::Deny).allowed);
    let pod = format!("{ns}---\nkind: Pod\nmetadata: {{name: db-2, namespace: data, annotations: {{config.linkerd.io/default-inbound-policy: all-authenticated}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.1.1.4}}\n");
    let s = snapshot(&format!("{PODS}{pod}")).unwrap();
    let w = s.pod_by_ip("10.1.1.4".parse().unwrap()).unwrap();
    let networks: Arc<[Cidr]> = default_cluster_networks().into();
    let p = s.policy.for_pod(w, DefaultPolicy::Deny, &networks);
    assert_eq!(p.default, DefaultPolicy::AllAuthenticated);
}

const SERVER: &str = r#"
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-http, namespace: shop}
spec: {podSelector: {matchLabels: {app: web}}, port: http, proxyProtocol: HTTP/1}
"#;

#[test]
fn a_server_without_authorizations_denies_and_other_ports_keep_the_default() {
    let v = decide(SERVER, &call("shop/web", 8080, None));
    assert_eq!(outcome(&v), "deny default:deny");
    assert_eq!((v.server.kind, &*v.server.name), ("server", "web-http"));
    let v = decide(SERVER, &call("shop/web", 9090, None));
    assert_eq!(outcome(&v), "allow default:all-unauthenticated");
    // A selector that does not pick the pod: no Server on it.
    let other = SERVER.replace("app: web", "app: other");
    assert!(decide(&other, &call("shop/web", 8080, None)).allowed);
    // matchExpressions.
    let expr = SERVER.replace(
        "{matchLabels: {app: web}}",
        "{matchExpressions: [{key: tier, operator: In, values: [front, back]}]}",
    );
    assert!(!decide(&expr, &call("shop/web", 8080, None)).allowed);
    let expr = expr.replace("operator: In", "operator: NotIn");
    assert!(decide(&expr, &call("shop/web", 8080, None)).allowed);
    // The access policy replaces deny.
    let audit = SERVER.replace("proxyProtocol: HTTP/1", "accessPolicy: audit");
    let v = decide(&audit, &call("shop/web", 8080, None));
    assert_eq!(outcome(&v), "allow default:audit");
    assert_eq!(v.audit.map(|a| a.name.to_string()), Some("audit".into()));
}

fn authz(target_kind: &str, target: &str, refs: &[(&str, &str)]) -> String {
    let refs: Vec<String> = refs
        .iter()
        .map(|(kind, name)| format!("{{group: policy.linkerd.io, kind: {kind}, name: {name}}}"))
        .collect();
    format!(
        "---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: authz-{target}, namespace: shop}}\nspec:\n  targetRef: {{group: policy.linkerd.io, kind: {target_kind}, name: {target}}}\n  requiredAuthenticationRefs: [{}]\n",
        refs.join(", ")
    )
}

fn mesh_tls(name: &str, identities: &[&str]) -> String {
    let ids: Vec<String> = identities.iter().map(|i| format!("{i:?}")).collect();
    format!(
        "---\napiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{identities: [{}]}}\n",
        ids.join(", ")
    )
}

#[test]
fn mesh_tls_identities_exact_wildcard_and_suffix() {
    let base = format!(
        "{SERVER}{}",
        authz("Server", "web-http", &[("MeshTLSAuthentication", "ids")])
    );
    // (identities, client, allowed)
    let table = [
        (
            vec!["web.shop.serviceaccount.identity.linkerd.cluster.local"],
            "shop/web",
            true,
        ),
        (
            vec!["web.shop.serviceaccount.identity.linkerd.cluster.local"],
            "shop/other",
            false,
        ),
        (
            vec!["spiffe://cluster.local/ns/shop/sa/other"],
            "shop/other",
            true,
        ),
        (vec!["*"], "data/db", true),
        (vec!["*"], "-", false),
        (
            vec!["*.shop.serviceaccount.identity.linkerd.cluster.local"],
            "shop/x",
            true,
        ),
        (
            vec!["*.shop.serviceaccount.identity.linkerd.cluster.local"],
            "data/x",
            false,
        ),
        // A suffix is of whole labels: `eshop` is not `shop`.
        (
            vec!["*.shop.serviceaccount.identity.linkerd.cluster.local"],
            "eshop/x",
            false,
        ),
        (vec!["*.cluster.local"], "eshop/x", true),
    ];
    for (ids, client, want) in table {
        let yaml = format!("{base}{}", mesh_tls("ids", &ids));
        let v = decide(&yaml, &call(client, 8080, None));
        assert_eq!(v.allowed, want, "{ids:?} {client}");
        if want {
            assert_eq!(outcome(&v), "allow authorizationpolicy:authz-web-http");
        }
    }
    // identityRefs: a ServiceAccount, or all of a namespace.
    let refs = "---\napiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: ids, namespace: shop}\nspec: {identityRefs: [{kind: ServiceAccount, name: web}, {kind: Namespace, name: data}]}\n";
    let yaml = format!("{base}{refs}");
    assert!(decide(&yaml, &call("shop/web", 8080, None)).allowed);
    assert!(decide(&yaml, &call("data/anyone", 8080, None)).allowed);
    assert!(!decide(&yaml, &call("shop/other", 8080, None)).allowed);
    // A ServiceAccount named directly in requiredAuthenticationRefs.
    let sa = format!(
        "{SERVER}---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: sa, namespace: shop}}\nspec:\n  targetRef: {{group: policy.linkerd.io, kind: Server, name: web-http}}\n  requiredAuthenticationRefs: [{{kind: ServiceAccount, name: web}}]\n"
    );
    assert!(decide(&sa, &call("shop/web", 8080, None)).allowed);
    assert!(!decide(&sa, &call("shop/db", 8080, None)).allowed);
}

#[test]
fn all_required_authentications_must_match_and_a_missing_one_voids_the_policy() {
    let net = "---\napiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata: {name: pods, namespace: shop}\nspec: {networks: [{cidr: 10.1.0.0/16, except: [10.1.9.0/24, 10.1.8.8]}]}\n";
    let both = format!(
        "{SERVER}{}{}{net}",
        authz(
            "Server",
            "web-http",
            &[
                ("MeshTLSAuthentication", "ids"),
                ("NetworkAuthentication", "pods")
            ]
        ),
        mesh_tls("ids", &["*"])
    );
    let from = |client, ip| Call {
        ip,
        ..call(client, 8080, None)
    };
    assert!(decide(&both, &from("shop/a", "10.1.2.7")).allowed);
    // The network alone is not enough, nor is the identity alone.
    assert!(!decide(&both, &from("-", "10.1.2.7")).allowed);
    assert!(!decide(&both, &from("shop/a", "10.2.0.1")).allowed);
    // `except`: a range and a single address.
    assert!(!decide(&both, &from("shop/a", "10.1.9.200")).allowed);
    assert!(!decide(&both, &from("shop/a", "10.1.8.8")).allowed);
    assert!(decide(&both, &from("shop/a", "10.1.8.9")).allowed);
    // A NetworkAuthentication alone admits plaintext from the network.
    let net_only = format!(
        "{SERVER}{}{net}",
        authz("Server", "web-http", &[("NetworkAuthentication", "pods")])
    );
    assert!(decide(&net_only, &from("-", "10.1.2.7")).allowed);
    // Referring to an authentication that does not exist: the policy is ignored.
    let missing = format!(
        "{SERVER}{}",
        authz("Server", "web-http", &[("MeshTLSAuthentication", "nobody")])
    );
    assert_eq!(
        outcome(&decide(&missing, &from("shop/a", "10.1.2.7"))),
        "deny default:deny"
    );
}

#[test]
fn a_namespace_target_covers_its_servers_but_not_the_default_policy() {
    let ns_deny = "---\nkind: Namespace\nmetadata: {name: shop, annotations: {config.linkerd.io/default-inbound-policy: deny}}\n";
    let policy = format!(
        "{ns_deny}{}{}",
        authz("Namespace", "shop", &[("MeshTLSAuthentication", "ids")]).replace(
            "group: policy.linkerd.io, kind: Namespace",
            "group: core, kind: Namespace"
        ),
        mesh_tls("ids", &["*"])
    );
    // No Server: the default (deny) applies, as in Linkerd.
    assert_eq!(
        outcome(&decide(&policy, &call("shop/a", 8080, None))),
        "deny default:deny"
    );
    // With a Server, the namespace's authorization applies to it.
    let served = format!("{policy}{SERVER}");
    assert_eq!(
        outcome(&decide(&served, &call("shop/a", 8080, None))),
        "allow authorizationpolicy:authz-shop"
    );
}

const ROUTES: &str = r#"
---
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: reads, namespace: shop}
spec:
  parentRefs: [{group: policy.linkerd.io, kind: Server, name: web-http}]
  rules: [{matches: [{method: GET}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin, namespace: shop}
spec:
  parentRefs: [{group: policy.linkerd.io, kind: Server, name: web-http}]
  rules: [{matches: [{path: {type: PathPrefix, value: /admin}}]}]
"#;

#[test]
fn routes_of_a_server_authorize_requests_and_unmatched_requests_are_not_found() {
    let yaml = format!(
        "{SERVER}{ROUTES}{}{}{}",
        authz("HTTPRoute", "reads", &[("MeshTLSAuthentication", "anyone")]),
        authz("HTTPRoute", "admin", &[("MeshTLSAuthentication", "ops")]),
        mesh_tls("anyone", &["*"]),
    ) + &mesh_tls(
        "ops",
        &["ops.shop.serviceaccount.identity.linkerd.cluster.local"],
    );
    let v = decide(&yaml, &call("shop/a", 8080, Some(("GET", "/items"))));
    assert_eq!(outcome(&v), "allow authorizationpolicy:authz-reads");
    assert_eq!(v.route.as_deref(), Some("shop/reads"));
    // The more specific route (a path) wins over a method alone.
    let v = decide(&yaml, &call("shop/a", 8080, Some(("GET", "/admin/x"))));
    assert_eq!(outcome(&v), "deny default:deny");
    assert_eq!(v.route.as_deref(), Some("shop/admin"));
    assert!(decide(&yaml, &call("shop/ops", 8080, Some(("POST", "/admin/x")))).allowed);
    // No route matches: 404, as Linkerd.
    let v = decide(&yaml, &call("shop/ops", 8080, Some(("POST", "/items"))));
    assert_eq!(outcome(&v), "notfound route:not-found");
    // A Server-level authorization applies to every route.
    let server_wide = format!(
        "{yaml}{}",
        authz("Server", "web-http", &[("MeshTLSAuthentication", "ops")])
    );
    assert!(
        decide(
            &server_wide,
            &call("shop/ops", 8080, Some(("GET", "/items")))
        )
        .allowed
    );
    // TCP to the Server (no request): the Server's own authorizations only.
    assert!(!decide(&yaml, &call("shop/a", 8080, None)).allowed);
}

fn istio(name: &str, ns: &str, body: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
    )
}

#[test]
fn istio_deny_first_then_any_allow_makes_the_default_deny() {
    let allow_get = istio(
        "allow-get",
        "shop",
        "  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
    );
    let deny_admin = istio(
        "deny-admin",
        "shop",
        "  action: DENY\n  rules: [{to: [{operation: {paths: [/admin*]}}]}]\n",
    );
    let both = format!("{allow_get}{deny_admin}");
    let get = |path| call("shop/a", 8080, Some(("GET", path)));
    assert_eq!(
        outcome(&decide(&both, &get("/x"))),
        "allow authorizationpolicy:allow-get"
    );
    // DENY beats ALLOW.
    assert_eq!(
        outcome(&decide(&both, &get("/admin/x"))),
        "deny authorizationpolicy:deny-admin"
    );
    // An ALLOW policy exists: what it does not allow is denied.
    let post = call("shop/a", 8080, Some(("POST", "/x")));
    assert_eq!(
        outcome(&decide(&both, &post)),
        "deny authorizationpolicy:allow-get"
    );
    // Without policies, all is allowed; an ALLOW without rules denies all; `rules: [{}]` allows
    // all.
    assert!(decide("", &post).allowed);
    let none = istio("nothing", "shop", "  action: ALLOW\n");
    assert!(!decide(&none, &get("/x")).allowed);
    let all = istio("everything", "shop", "  rules: [{}]\n");
    assert!(decide(&all, &post).allowed);
    // A DENY without rules denies nothing.
    let deny_none = istio("deny-none", "shop", "  action: DENY\n");
    assert!(decide(&deny_none, &post).allowed);
}

#[test]
fn istio_audit_denies_nothing_and_is_reported() {
    let audit = istio(
        "audit-posts",
        "shop",
        "  action: AUDIT\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
    );
    let v = decide(&audit, &call("shop/a", 8080, Some(("POST", "/x"))));
    assert!(v.allowed);
    assert_eq!(
        v.audit.map(|a| a.name.to_string()),
        Some("audit-posts".into())
    );
    let v = decide(&audit, &call("shop/a", 8080, Some(("GET", "/x"))));
    assert!(v.allowed && v.audit.is_none());
}

#[test]
fn istio_rule_fields() {
    let allow = |rule: &str| istio("p", "shop", &format!("  rules:\n  - {rule}\n"));
    let get = |client, path| call(client, 8080, Some(("GET", path)));
    // (rule, call, allowed)
    let cases: Vec<(&str, Call, bool)> = vec![
        ("{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}", get("shop/a", "/"), true),
        ("{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}", get("shop/b", "/"), false),
        ("{from: [{source: {principals: [\"*/sa/a\"]}}]}", get("data/a", "/"), true),
        ("{from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]}", get("shop/z", "/"), true),
        ("{from: [{source: {principals: [\"*\"]}}]}", get("-", "/"), false),
        ("{from: [{source: {notPrincipals: [\"*\"]}}]}", get("-", "/"), true),
        ("{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/a]}}]}", get("shop/a", "/"), false),
        ("{from: [{source: {namespaces: [data]}}]}", get("data/x", "/"), true),
        ("{from: [{source: {namespaces: [data]}}]}", get("shop/x", "/"), false),
        ("{from: [{source: {notNamespaces: [data]}}]}", get("shop/x", "/"), true),
        ("{from: [{source: {ipBlocks: [10.1.2.0/24]}}]}", get("-", "/"), true),
        ("{from: [{source: {ipBlocks: [10.9.0.0/16]}}]}", get("-", "/"), false),
        ("{from: [{source: {notIpBlocks: [10.1.2.7]}}]}", get("-", "/"), false),
        // Fields of one source are ANDed; sources are ORed.
        ("{from: [{source: {namespaces: [shop], principals: [cluster.local/ns/shop/sa/a]}}]}", get("shop/b", "/"), false),
        ("{from: [{source: {namespaces: [data]}}, {source: {principals: [cluster.local/ns/shop/sa/b]}}]}", get("shop/b", "/"), true),
        ("{to: [{operation: {paths: [/api/*]}}]}", get("shop/a", "/api/x"), true),
        ("{to: [{operation: {paths: [/api/*]}}]}", get("shop/a", "/apix"), false),
        ("{to: [{operation: {paths: [\"*.png\"]}}]}", get("shop/a", "/a/b.png"), true),
        ("{to: [{operation: {paths: [/exact]}}]}", get("shop/a", "/exact/"), false),
        ("{to: [{operation: {notPaths: [/private*]}}]}", get("shop/a", "/private/x"), false),
        ("{to: [{operation: {methods: [GET, HEAD]}}]}", get("shop/a", "/"), true),
        ("{to: [{operation: {notMethods: [GET]}}]}", get("shop/a", "/"), false),
        ("{to: [{operation: {ports: [\"8080\"]}}]}", get("shop/a", "/"), true),
        ("{to: [{operation: {notPorts: [\"8080\"]}}]}", get("shop/a", "/"), false),
        ("{to: [{operation: {hosts: [Web.Shop.svc.cluster.local]}}]}", Call { host: Some("web.shop.svc.cluster.local"), ..get("shop/a", "/") }, true),
        ("{to: [{operation: {notHosts: [\"*.internal\"]}}]}", Call { host: Some("x.internal"), ..get("shop/a", "/") }, false),
        ("{when: [{key: \"request.headers[x-team]\", values: [blue]}]}", Call { headers: &[("x-team", "blue")], ..get("shop/a", "/") }, true),
        ("{when: [{key: \"request.headers[x-team]\", values: [blue]}]}", get("shop/a", "/"), false),
        ("{when: [{key: \"request.headers[x-team]\", notValues: [red]}]}", Call { headers: &[("x-team", "red")], ..get("shop/a", "/") }, false),
        ("{when: [{key: source.principal, values: [cluster.local/ns/shop/sa/a]}]}", get("shop/a", "/"), true),
        ("{when: [{key: source.principal, values: [cluster.local/ns/shop/sa/a]}]}", get("shop/b", "/"), false),
        ("{when: [{key: source.ip, values: [10.1.0.0/16]}]}", get("shop/b", "/"), true),
        ("{when: [{key: destination.port, values: [\"9090\"]}]}", get("shop/b", "/"), false),
        // TCP: a rule that needs the request never lets a connection in.
        ("{to: [{operation: {methods: [GET]}}]}", call("shop/a", 8080, None), false),
        ("{to: [{operation: {ports: [\"8080\"]}}]}", call("shop/a", 8080, None), true),
    ];
    for (rule, c, want) in cases {
        let v = decide(&allow(rule), &c);
        assert_eq!(v.allowed, want, "{rule} for {} {:?}", c.client, c.http);
    }
    // In a DENY policy, TCP leaves the request's fields out: the rule denies the connection.
    let deny = istio(
        "no-posts",
        "shop",
        "  action: DENY\n  rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]\n",
    );
    assert!(!decide(&deny, &call("shop/a", 8080, None)).allowed);
    assert!(decide(&deny, &call("shop/a", 9090, None)).allowed);
}

#[test]
fn istio_scope_selector_root_namespace_and_service_targets() {
    let rule = "  action: DENY\n  rules: [{}]\n";
    let c = call("shop/a", 8080, None);
    let selected = istio(
        "p",
        "shop",
        &format!("  selector: {{matchLabels: {{app: web}}}}\n{rule}"),
    );
    assert!(!decide(&selected, &c).allowed);
    let elsewhere = istio(
        "p",
        "shop",
        &format!("  selector: {{matchLabels: {{app: db}}}}\n{rule}"),
    );
    assert!(decide(&elsewhere, &c).allowed);
    // Another namespace's policy without a selector: not for this pod; the root namespace's:
    // for every pod, named with its namespace.
    assert!(decide(&istio("p", "data", rule), &c).allowed);
    let v = decide(&istio("mesh-wide", "istio-system", rule), &c);
    assert_eq!(
        outcome(&v),
        "deny authorizationpolicy:istio-system/mesh-wide"
    );
    // targetRefs of kind Service: the pods the Service selects.
    let target = istio(
        "svc",
        "shop",
        &format!("  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n{rule}"),
    );
    assert!(!decide(&target, &c).allowed);
    assert!(
        decide_with(
            &target,
            "db",
            &call("shop/a", 5432, None),
            DefaultPolicy::AllUnauthenticated
        )
        .allowed
    );
}

#[test]
fn peer_authentication_strict_refuses_plaintext_by_precedence() {
    let pa = |name: &str, ns: &str, body: &str| {
        format!("---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}")
    };
    let plain = call("-", 8080, None);
    let mtls = call("shop/a", 8080, None);
    let strict_ns = pa("default", "shop", "  mtls: {mode: STRICT}\n");
    let v = decide(&strict_ns, &plain);
    assert_eq!(outcome(&v), "deny peerauthentication:default");
    assert!(decide(&strict_ns, &mtls).allowed);
    // Mesh-wide STRICT, namespace PERMISSIVE: the namespace wins.
    let mesh = pa("default", "istio-system", "  mtls: {mode: STRICT}\n");
    assert!(!decide(&mesh, &plain).allowed);
    let permissive = pa("ns", "shop", "  mtls: {mode: PERMISSIVE}\n");
    assert!(decide(&format!("{mesh}{permissive}"), &plain).allowed);
    // The workload's own, with a port of its own; UNSET inherits.
    let workload = pa(
        "web",
        "shop",
        "  selector: {matchLabels: {app: web}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {\"9090\": {mode: DISABLE}}\n",
    );
    let yaml = format!("{strict_ns}{workload}");
    assert!(!decide(&yaml, &plain).allowed);
    assert!(decide(&yaml, &call("-", 9090, None)).allowed);
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let cases = [
        (
            istio("p", "shop", "  action: CUSTOM\n"),
            "AuthorizationPolicy shop/p: field spec.action: CUSTOM (an external authorizer) is not supported",
        ),
        (
            istio("p", "shop", "  rules: [{when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]\n"),
            "field spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not supported",
        ),
        (
            istio("p", "shop", "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n"),
            "field spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an address or a CIDR range",
        ),
        (
            istio("p", "shop", "  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n"),
            "field spec.rules[0].from[0].source.requestPrincipals: is not supported",
        ),
        (
            authz("Deployment", "web", &[("MeshTLSAuthentication", "x")]),
            "AuthorizationPolicy shop/authz-web: field spec.targetRef.kind: \"Deployment\" is not Server, HTTPRoute, GRPCRoute or Namespace",
        ),
        (
            "---\napiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata: {name: n, namespace: shop}\nspec: {networks: [{cidr: 10.0.0.0/8, except: [nope]}]}\n".to_owned(),
            "NetworkAuthentication shop/n: field spec.networks[0].except[0]: \"nope\" is not an address",
        ),
        (
            mesh_tls("m", &["web.*.serviceaccount"]),
            "MeshTLSAuthentication shop/m: field spec.identities[0]: \"web.*.serviceaccount\": a wildcard is only `*` or `*.suffix`",
        ),
        (
            SERVER.replace("port: http", "port: 0"),
            "Server shop/web-http: field spec.port: 0 is not a port (1-65535)",
        ),
        (
            "---\nkind: Namespace\nmetadata: {name: x, annotations: {config.linkerd.io/default-inbound-policy: closed}}\n".to_owned(),
            "Namespace x: field metadata.annotations[\"config.linkerd.io/default-inbound-policy\"]: \"closed\" is not one of all-unauthenticated, all-authenticated, cluster-authenticated, cluster-unauthenticated, deny, audit",
        ),
        (
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec: {portLevelMtls: {\"80\": {mode: STRICT}}}\n".to_owned(),
            "PeerAuthentication shop/p: field spec.portLevelMtls[\"80\"]: port-level settings need a workload selector",
        ),
    ];
    for (yaml, want) in cases {
        let err = snapshot(&yaml).unwrap_err();
        assert!(err.contains(want), "{err}\n  does not contain\n{want}");
        assert!(err.starts_with("t.yaml: "), "{err}");
    }
}

/// What the kernel gets for `web` under `yaml` (`probe_sources` as given).
fn kernel_for(yaml: &str, default: DefaultPolicy, probe_sources: &[&str]) -> kernel::Plaintext {
    let s = snapshot(&format!("{PODS}{yaml}")).unwrap();
    let workload = s.pod_by_ip("10.1.1.2".parse().unwrap()).unwrap();
    let networks: Arc<[Cidr]> = default_cluster_networks().into();
    let policy = s.policy.for_pod(workload, default, &networks);
    let sources: Vec<Cidr> = probe_sources.iter().map(|c| c.parse().unwrap()).collect();
    kernel::plaintext(&policy, &sources)
}

/// The kernel's decision for a SYN from `ip` to `port` under `p`, as the TC program takes it.
fn kernel_decides(p: &kernel::Plaintext, port: u16, ip: &str, kubelet: bool) -> bool {
    let ip: IpAddr = ip.parse().unwrap();
    let Some(entry) = p
        .ports
        .iter()
        .find(|e| e.port == port)
        .or_else(|| p.ports.iter().find(|e| e.port == 0))
    else {
        return true;
    };
    if entry.probes && kubelet {
        return true;
    }
    match &entry.verdict {
        kernel::PortVerdict::Allow => true,
        kernel::PortVerdict::Deny => false,
        kernel::PortVerdict::BySource(list) => list
            .iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.len)
            .is_some_and(|(_, allowed)| *allowed),
    }
}

#[test]
fn plaintext_compiles_exactly_for_the_kernel() {
    // Nothing restricts plaintext: nothing in the kernel.
    assert!(kernel_for("", DefaultPolicy::AllUnauthenticated, &[])
        .ports
        .is_empty());
    // Authenticated-only defaults refuse all plaintext; kubelet probes still pass.
    let p = kernel_for("", DefaultPolicy::AllAuthenticated, &[]);
    assert!(!kernel_decides(&p, 8080, "10.1.2.7", false));
    assert!(kernel_decides(&p, 8080, "10.1.2.7", true));
    // cluster-unauthenticated: the cluster networks.
    let p = kernel_for("", DefaultPolicy::ClusterUnauthenticated, &[]);
    assert!(kernel_decides(&p, 1, "172.20.0.1", false));
    assert!(!kernel_decides(&p, 1, "203.0.113.1", false));
    assert!(kernel_decides(&p, 1, "fd00::1", false));
    assert!(!kernel_decides(&p, 1, "2001:db8::1", false));
    // Without a kubelet cgroup, probes are told by the node's address.
    let p = kernel_for("", DefaultPolicy::Deny, &["192.0.2.10/32"]);
    assert!(kernel_decides(&p, 8080, "192.0.2.10", false));
    assert!(!kernel_decides(&p, 8080, "192.0.2.11", false));

    // A Server with a NetworkAuthentication (with exceptions) on one port; the default
    // elsewhere.
    let net = format!(
        "{SERVER}{}---\napiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata: {{name: pods, namespace: shop}}\nspec: {{networks: [{{cidr: 10.1.0.0/16, except: [10.1.9.0/24]}}]}}\n",
        authz("Server", "web-http", &[("NetworkAuthentication", "pods")])
    );
    let p = kernel_for(&net, DefaultPolicy::AllUnauthenticated, &[]);
    for (port, ip, want) in [
        (8080, "10.1.2.7", true),
        (8080, "10.1.9.7", false),
        (8080, "10.2.0.1", false),
        (9090, "10.2.0.1", true),
        (9090, "203.0.113.1", true),
    ] {
        assert_eq!(kernel_decides(&p, port, ip, false), want, "{port} {ip}");
    }
    // Probes stop being let in once the Server has routes.
    assert!(p.ports.iter().find(|e| e.port == 8080).unwrap().probes);
    let routed = format!("{net}{ROUTES}");
    let p = kernel_for(&routed, DefaultPolicy::AllUnauthenticated, &[]);
    assert!(!p.ports.iter().find(|e| e.port == 8080).unwrap().probes);
    assert!(!kernel_decides(&p, 8080, "10.2.0.1", true));

    // Istio: STRICT refuses plaintext (probes aside); ipBlocks in ALLOW and DENY.
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    let p = kernel_for(strict, DefaultPolicy::AllUnauthenticated, &[]);
    assert!(!kernel_decides(&p, 8080, "10.1.2.7", false));
    assert!(kernel_decides(&p, 8080, "10.1.2.7", true));
    let blocks = istio(
        "p",
        "shop",
        "  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.9.0.0/16]}}]\n    to: [{operation: {ports: [\"8080\"]}}]\n",
    );
    let p = kernel_for(&blocks, DefaultPolicy::AllUnauthenticated, &[]);
    for (port, ip, want) in [
        (8080, "10.1.0.1", true),
        (8080, "10.9.0.1", false),
        (8080, "11.0.0.1", false),
        // An ALLOW policy exists: other ports are denied.
        (9090, "10.1.0.1", false),
    ] {
        assert_eq!(kernel_decides(&p, port, ip, false), want, "{port} {ip}");
    }
}
