//! Authorization policy users bring, enforced where the agent delivers to a pod (the HBONE
//! inbound side and the same-node path), observed on real requests and connections: the
//! response each caller gets, the policy the denial names, and the exact counters. Run as
//! root, serially.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_agent_tests::{harness::*, serial, Agent, PodSpec, ServiceSpec, Testbed, TestbedSpec};

fn pod(name: &str, node: usize, app: &str, namespace: &str, sa: &str) -> PodSpec {
    PodSpec {
        service_account: sa.into(),
        ..PodSpec::new(name, node, app).in_namespace(namespace)
    }
}

/// Starts `meshtest http 8080 NAME` in each pod.
fn serve(bed: &Testbed, pods: &[&str]) {
    for pod in pods {
        let mut server = bed.pod_command(pod, meshtest()).unwrap();
        server.args(["http", "8080", pod]);
        bed.spawn(server).expect("start the server");
    }
}

/// Writes the manifests `files` (an empty text removes the file) and waits, at most 1 s
/// (policy changes apply without restart within that), until every agent's `/config_dump`
/// shows policy that `ready` accepts.
fn apply(
    bed: &Testbed,
    agents: &[&Agent],
    files: &[(&str, &str)],
    ready: impl Fn(&serde_json::Value) -> bool,
) {
    for (file, text) in files {
        let path = bed.manifests_dir().join(file);
        match text.is_empty() {
            true => {
                let _ = std::fs::remove_file(path);
            }
            false => std::fs::write(path, text).unwrap(),
        }
    }
    let start = Instant::now();
    eventually_for("the policy in force", Duration::from_secs(1), || {
        agents.iter().all(|a| {
            let Ok(dump) = a.admin("/config_dump") else {
                return false;
            };
            let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
            ready(&dump["policy"])
        })
    });
    eprintln!("policy in force after {:?}", start.elapsed());
}

/// The Istio policies `pod`'s dump lists.
fn istio_of(policy: &serde_json::Value, pod: &str) -> Vec<String> {
    policy[pod]["istio"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["policy"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// What `pod`'s dump says of `port` (the `*` entry if the port has nothing of its own).
fn port_of<'a>(policy: &'a serde_json::Value, pod: &str, port: u64) -> &'a serde_json::Value {
    let ports = policy[pod]["ports"].as_array();
    let find = |p: serde_json::Value| ports.into_iter().flatten().find(move |e| e["port"] == p);
    find(port.into())
        .or_else(|| find("*".into()))
        .unwrap_or(&serde_json::Value::Null)
}

// The Faces example: callers on n1 (the ingress gateway's service account in istio-system,
// faces/default, faces/other, default/outsider); destinations color (n1: the same-node path)
// and face (n2: HBONE).
const COLOR: &str = "10.96.0.51:80";
const FACE: &str = "10.96.0.50:80";
const CALLERS: [&str; 4] = ["ingress", "faces-client", "faces-other", "outsider"];
const REQUESTS: [&str; 4] = ["GET:/", "GET:/face", "POST:/", "POST:/face"];

fn faces_bed() -> Testbed {
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            pod(
                "ingress",
                0,
                "ingress",
                "istio-system",
                "istio-ingressgateway-service-account",
            ),
            pod("faces-client", 0, "faces-client", "faces", "default"),
            pod("faces-other", 0, "faces-other", "faces", "other"),
            pod("outsider", 0, "outsider", "default", "default"),
            pod("color-a", 0, "color", "faces", "color"),
            pod("face-a", 1, "face", "faces", "face"),
        ],
        services: vec![
            service("face", "faces", "10.96.0.50", "face"),
            service("color", "faces", "10.96.0.51", "color"),
        ],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    serve(&bed, &["color-a", "face-a"]);
    bed
}

/// (caller, destination, request) → `allow` (200 from the destination pod) or `deny BY`
/// (403, BY the policy the `l5d-proxy-error` header names).
type Matrix = BTreeMap<(String, &'static str, String), String>;

fn matrix(bed: &Testbed) -> Matrix {
    let mut out = Matrix::new();
    for caller in CALLERS {
        for (dest, addr, pod) in [("color", COLOR, "color-a"), ("face", FACE, "face-a")] {
            let mut cmd = bed.pod_command(caller, meshtest()).unwrap();
            cmd.args(["matrix", addr]).args(REQUESTS);
            let text = must_succeed(cmd, "matrix");
            for line in text.lines() {
                let mut parts = line.splitn(4, ' ');
                let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                let status = parts.next().unwrap_or("");
                let who = parts.next().unwrap_or("");
                let outcome = match status {
                    "200" if who == pod => "allow".to_owned(),
                    "403" => {
                        let by = who
                            .split(" denied by ")
                            .nth(1)
                            .unwrap_or_else(|| panic!("a denial names its policy: {line}"));
                        format!("deny {by}")
                    }
                    _ => panic!("{caller} → {dest}: unexpected {line:?}"),
                };
                out.insert(
                    (caller.to_owned(), dest, format!("{method} {path}")),
                    outcome,
                );
            }
        }
    }
    assert_eq!(out.len(), CALLERS.len() * 2 * REQUESTS.len());
    out
}

/// Allowed or not, per call (what a user observes, whichever model named the denial).
fn allowed(m: &Matrix) -> BTreeMap<String, bool> {
    m.iter()
        .map(|((c, d, r), o)| (format!("{c} → {d} {r}"), o == "allow"))
        .collect()
}

fn denials(m: &Matrix) -> usize {
    m.values().filter(|o| *o != "allow").count()
}

fn authz_denied(agent: &Agent, name: &str) -> f64 {
    metric(
        agent,
        "inbound_http_authz_deny_total",
        &[("authz_name", name)],
    )
}

#[test]
fn faces_restrict_policy_as_istio_and_as_linkerd_gives_the_same_matrix() {
    let _serial = serial();
    let bed = faces_bed();
    let (n1, n2) = agents(&bed);
    let both = [&n1, &n2];

    // Istio, as written: the ingress gateway's and faces/default's principals, GET only.
    let istio = example("faces/istio-authorizationpolicy.yaml");
    apply(&bed, &both, &[("policy.yaml", &istio)], |p| {
        istio_of(p, "faces/face-a") == ["restrict-faces"]
            || istio_of(p, "faces/color-a") == ["restrict-faces"]
    });
    let istio_matrix = matrix(&bed);
    eprintln!("Istio: {istio_matrix:#?}");
    for ((caller, _, request), outcome) in &istio_matrix {
        let allowed =
            ["ingress", "faces-client"].contains(&caller.as_str()) && request.starts_with("GET ");
        let expected = match allowed {
            true => "allow",
            false => "deny AuthorizationPolicy restrict-faces (security.istio.io)",
        };
        assert_eq!(outcome, expected, "{caller} {request}");
    }
    // Counted where enforced: color's denials on n1 (same node), face's on n2.
    let denied_at = |dest: &str| {
        istio_matrix
            .iter()
            .filter(|((_, d, _), o)| *d == dest && *o != "allow")
            .count() as f64
    };
    assert_eq!(authz_denied(&n1, "restrict-faces"), denied_at("color"));
    assert_eq!(authz_denied(&n2, "restrict-faces"), denied_at("face"));
    assert_eq!(
        metric(
            &n2,
            "inbound_http_authz_allow_total",
            &[
                ("authz_name", "restrict-faces"),
                (
                    "client_id",
                    "default.faces.serviceaccount.identity.linkerd.cluster.local"
                ),
            ]
        ),
        2.0,
        "faces/default's two GETs to face"
    );
    // Istio's view of the same denials.
    assert_eq!(
        metric(
            &n2,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "403"),
                ("response_flags", "DENY")
            ]
        ),
        denied_at("face")
    );

    // Linkerd, the guide's translation: namespace default deny, MeshTLSAuthentication of the
    // two callers, a namespace-targeted AuthorizationPolicy. The testbed's ingress runs as the
    // Istio gateway's service account, so its Linkerd identity is rewritten to that one.
    let linkerd = example("faces/expected-linkerd-policy.yaml").replace(
        "ingress-sa.ingress-ns.serviceaccount",
        "istio-ingressgateway-service-account.istio-system.serviceaccount",
    );
    let mut docs = linkerd.split("\n---\n");
    let namespace_doc = docs.next().unwrap();
    assert!(namespace_doc.contains("default-inbound-policy: deny"));
    let linkerd_rest: Vec<&str> = docs.collect();
    // The testbed writes the namespaces; faces gets the example's annotation.
    let namespaces_file = bed.manifests_dir().join("namespaces.yaml");
    let namespaces = std::fs::read_to_string(&namespaces_file).unwrap().replace(
        "  name: faces\n",
        "  name: faces\n  annotations:\n    config.linkerd.io/default-inbound-policy: deny\n",
    );
    let authn = linkerd_rest[0];
    let namespace_authz = linkerd_rest[1];
    assert!(authn.contains("kind: MeshTLSAuthentication"));
    assert!(namespace_authz.contains("kind: Namespace"));

    // As written, there is no Server: Linkerd's namespace-targeted policies cover Servers
    // only, so the namespace's default (deny) refuses every call.
    let as_written = format!("{authn}\n---\n{namespace_authz}\n");
    apply(
        &bed,
        &both,
        &[
            ("policy.yaml", &as_written),
            ("namespaces.yaml", &namespaces),
        ],
        |p| {
            port_of(p, "faces/face-a", 8080)["default_policy"] == "deny"
                || port_of(p, "faces/color-a", 8080)["default_policy"] == "deny"
        },
    );
    let none = matrix(&bed);
    assert!(
        none.values().all(|o| o == "deny default policy deny"),
        "{none:#?}"
    );

    // With a Server for the port, the namespace-targeted policy applies: the same callers as
    // Istio's, but (as the example's own comment says) every method.
    let server = "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata:\n  name: faces-http\n  namespace: faces\nspec:\n  podSelector: {}\n  port: 8080\n  proxyProtocol: HTTP/1\n";
    let with_server = format!("{as_written}---\n{server}");
    apply(&bed, &both, &[("policy.yaml", &with_server)], |p| {
        port_of(p, "faces/face-a", 8080)["namespace_authorizations"][0] == "ingress-or-faces"
            || port_of(p, "faces/color-a", 8080)["namespace_authorizations"][0]
                == "ingress-or-faces"
    });
    let any_method = matrix(&bed);
    for ((caller, _, request), outcome) in &any_method {
        let allowed = ["ingress", "faces-client"].contains(&caller.as_str());
        assert_eq!(outcome == "allow", allowed, "{caller} {request}: {outcome}");
        if !allowed {
            assert_eq!(outcome, "deny default policy deny", "{caller} {request}");
        }
    }

    // GET only, in Linkerd's terms: the Server's routes (a GET route the callers are
    // authorized on, and everything else on a route nobody is), the authorization moved from
    // the namespace to the GET route.
    let routes = "apiVersion: policy.linkerd.io/v1beta3\nkind: HTTPRoute\nmetadata:\n  name: faces-get\n  namespace: faces\nspec:\n  parentRefs:\n  - {group: policy.linkerd.io, kind: Server, name: faces-http}\n  rules:\n  - matches: [{method: GET}]\n---\napiVersion: policy.linkerd.io/v1beta3\nkind: HTTPRoute\nmetadata:\n  name: faces-other\n  namespace: faces\nspec:\n  parentRefs:\n  - {group: policy.linkerd.io, kind: Server, name: faces-http}\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}}]\n";
    let route_authz = namespace_authz.replace(
        "    kind: Namespace\n    name: faces\n",
        "    group: policy.linkerd.io\n    kind: HTTPRoute\n    name: faces-get\n",
    );
    assert_ne!(route_authz, namespace_authz);
    let get_only = format!("{authn}\n---\n{route_authz}\n---\n{server}---\n{routes}");
    apply(&bed, &both, &[("policy.yaml", &get_only)], |p| {
        let routes = |pod| {
            port_of(p, pod, 8080)["routes"]
                .as_array()
                .map_or(0, Vec::len)
        };
        routes("faces/face-a") == 2 || routes("faces/color-a") == 2
    });
    let linkerd_matrix = matrix(&bed);
    eprintln!("Linkerd: {linkerd_matrix:#?}");
    assert_eq!(allowed(&linkerd_matrix), allowed(&istio_matrix));
    assert_eq!(denials(&linkerd_matrix), 24);
    assert!(linkerd_matrix
        .values()
        .all(|o| o == "allow" || o == "deny default policy deny"));
}

/// n1: client (SA client), other (SA other), db-near (echo on 5432); n2: web (HTTP 8080),
/// db-far (echo on 5432). Service web → web.
fn flip_bed() -> Testbed {
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0, "client"),
            PodSpec::new("other", 0, "other"),
            PodSpec::new("db-near", 0, "db"),
            PodSpec::new("web", 1, "web"),
            PodSpec::new("db-far", 1, "db"),
        ],
        services: vec![ServiceSpec::web()],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    serve(&bed, &["web"]);
    for db in ["db-near", "db-far"] {
        let mut echo = bed.pod_command(db, meshtest()).unwrap();
        echo.args(["echo", "5432"]);
        bed.spawn(echo).unwrap();
    }
    bed
}

fn status_of(bed: &Testbed, from: &str, path: &str) -> u16 {
    let mut cmd = bed.pod_command(from, meshtest()).unwrap();
    cmd.args(["matrix", WEB_SVC, &format!("GET:{path}")]);
    let out = must_succeed(cmd, "GET web");
    out.split(' ').nth(2).unwrap().parse().unwrap()
}

/// A `meshtest stream` of `secs` seconds from `from` to `db`'s echo port, running.
fn stream(bed: &Testbed, from: &str, db: &str, secs: u32) -> std::process::Child {
    let addr = format!("{}:5432", bed.pod(db).ip);
    let mut cmd = bed.pod_command(from, meshtest()).unwrap();
    cmd.args(["stream", &addr, &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn istio_policy(name: &str, app: &str, action: &str, rules: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  selector:\n    matchLabels: {{app: {app}}}\n  action: {action}\n  rules:\n{rules}")
}

#[test]
fn policy_changes_apply_within_a_second_and_close_connections_they_deny() {
    let _serial = serial();
    let bed = flip_bed();
    let (n1, n2) = agents(&bed);
    let both = [&n1, &n2];
    assert_eq!(status_of(&bed, "client", "/"), 200);

    // Open TCP connections, one to each node, then a policy that denies the client.
    let mut near = stream(&bed, "client", "db-near", 30);
    let mut far = stream(&bed, "client", "db-far", 30);
    std::thread::sleep(Duration::from_millis(500));
    assert!(near.try_wait().unwrap().is_none() && far.try_wait().unwrap().is_none());
    let deny_client = istio_policy(
        "deny-client",
        "db",
        "DENY",
        "  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]\n",
    );
    let written = Instant::now();
    apply(&bed, &both, &[("db.yaml", &deny_client)], |p| {
        istio_of(p, "default/db-near") == ["deny-client"]
            || istio_of(p, "default/db-far") == ["deny-client"]
    });
    for (name, child) in [("same node", &mut near), ("other node", &mut far)] {
        let closed = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                written.elapsed() < Duration::from_secs(3),
                "{name}: the open connection is still up"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!("{name}: closed {:?} after the write", written.elapsed());
        assert!(!closed.success(), "{name}: the stream ended by an error");
    }
    let tcp_denied = |agent: &Agent| {
        metric(
            agent,
            "inbound_tcp_authz_deny_total",
            &[("authz_name", "deny-client")],
        )
    };
    assert_eq!(tcp_denied(&n1), 1.0, "n1 closed db-near's connection");
    assert_eq!(tcp_denied(&n2), 1.0, "n2 closed db-far's connection");
    // New connections: the client's refused, another pod's served.
    for db in ["db-near", "db-far"] {
        let out = stream(&bed, "client", db, 1).wait_with_output().unwrap();
        assert!(!out.status.success(), "client → {db} refused");
        let out = stream(&bed, "other", db, 1).wait_with_output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("echoed="),
            "other → {db}: {out:?}"
        );
    }
    assert_eq!(tcp_denied(&n1), 2.0);
    assert_eq!(tcp_denied(&n2), 2.0);
    // With --keep-denied-connections they would stay; the default is to close them.

    // HTTP: the next request flips within a second of the write, and back.
    let deny_get = istio_policy(
        "no-gets",
        "web",
        "DENY",
        "  - to: [{operation: {methods: [GET]}}]\n",
    );
    let flip = |yaml: &str, want: u16| {
        let path = bed.manifests_dir().join("web.yaml");
        let written = Instant::now();
        match yaml.is_empty() {
            true => std::fs::remove_file(path).unwrap(),
            false => std::fs::write(path, yaml).unwrap(),
        }
        loop {
            if status_of(&bed, "client", "/") == want {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(1),
                "no {want} within 1 s of the policy change"
            );
        }
        eprintln!("{want} after {:?}", written.elapsed());
    };
    flip(&deny_get, 403);
    flip("", 200);
}

#[test]
fn deny_beats_allow_audit_counts_and_linkerd_authentications() {
    let _serial = serial();
    let bed = flip_bed();
    let (_n1, n2) = agents(&bed);
    // The web pod is on n2: its agent's dump shows its policy.
    let web_node = [&n2];

    // Istio: ALLOW every meshed caller, DENY /admin*: DENY wins; AUDIT of POSTs denies
    // nothing and counts exactly what it matched.
    let policies = [
        istio_policy(
            "allow-mesh",
            "web",
            "ALLOW",
            "  - from: [{source: {principals: [\"*\"]}}]\n",
        ),
        istio_policy(
            "deny-admin",
            "web",
            "DENY",
            "  - to: [{operation: {paths: [/admin*]}}]\n",
        ),
        istio_policy(
            "audit-posts",
            "web",
            "AUDIT",
            "  - to: [{operation: {methods: [POST]}}]\n",
        ),
    ]
    .join("---\n");
    apply(&bed, &web_node, &[("web.yaml", &policies)], |p| {
        istio_of(p, "default/web").len() == 3
    });
    let run = |from: &str, requests: &[&str]| {
        let mut cmd = bed.pod_command(from, meshtest()).unwrap();
        cmd.args(["matrix", WEB_SVC]).args(requests);
        must_succeed(cmd, "matrix")
    };
    let out = run("client", &["GET:/", "GET:/admin/x", "POST:/", "POST:/x"]);
    assert_eq!(
        out,
        "GET / 200 web\nGET /admin/x 403 unauthorized request: denied by AuthorizationPolicy deny-admin (security.istio.io)\nPOST / 200 web\nPOST /x 200 web\n"
    );
    let audited = metric(
        &n2,
        "inbound_authz_audit_total",
        &[("authz_name", "audit-posts"), ("protocol", "http")],
    );
    assert_eq!(audited, 2.0, "both POSTs audited, none denied");

    // Linkerd: a Server without authorizations denies; `*.suffix` identities, and a
    // NetworkAuthentication whose `except` leaves the client out.
    let client_ip = bed.pod("client").ip;
    let server = "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata:\n  name: web-http\n  namespace: default\nspec:\n  podSelector: {matchLabels: {app: web}}\n  port: 8080\n";
    apply(&bed, &web_node, &[("web.yaml", server)], |p| {
        port_of(p, "default/web", 8080)["server"] == "web-http"
    });
    assert_eq!(
        run("client", &["GET:/"]),
        "GET / 403 unauthorized request: denied by default policy deny\n"
    );
    let authz = |authn_kind: &str| {
        format!("---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-authz\n  namespace: default\nspec:\n  targetRef: {{group: policy.linkerd.io, kind: Server, name: web-http}}\n  requiredAuthenticationRefs:\n  - {{group: policy.linkerd.io, kind: {authn_kind}, name: who}}\n")
    };
    let suffix = format!(
        "{server}{}---\napiVersion: policy.linkerd.io/v1alpha1\nkind: MeshTLSAuthentication\nmetadata:\n  name: who\n  namespace: default\nspec:\n  identities: [\"*.default.serviceaccount.identity.linkerd.cluster.local\"]\n",
        authz("MeshTLSAuthentication")
    );
    apply(&bed, &web_node, &[("web.yaml", &suffix)], |p| {
        port_of(p, "default/web", 8080)["authorizations"][0] == "web-authz"
    });
    assert_eq!(run("client", &["GET:/"]), "GET / 200 web\n");
    assert_eq!(
        metric(
            &n2,
            "inbound_http_authz_allow_total",
            &[
                ("authz_name", "web-authz"),
                ("srv_name", "web-http"),
                ("authz_kind", "authorizationpolicy")
            ]
        ),
        1.0
    );
    let network = format!(
        "{server}{}---\napiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata:\n  name: who\n  namespace: default\nspec:\n  networks:\n  - cidr: 10.0.0.0/8\n    except: [\"{client_ip}/32\"]\n",
        authz("NetworkAuthentication")
    );
    apply(&bed, &web_node, &[("web.yaml", &network)], |p| {
        port_of(p, "default/web", 8080)["authorizations"][0] == "web-authz"
    });
    // (The previous policy let the client in: its 403 says this one is in force.)
    eventually_for(
        "the NetworkAuthentication in force",
        Duration::from_secs(1),
        || {
            run("client", &["GET:/"])
                == "GET / 403 unauthorized request: denied by default policy deny\n"
        },
    );
    assert_eq!(run("other", &["GET:/"]), "GET / 200 web\n");

    // Linkerd's `audit` default: nothing denied, every call counted as audited.
    apply(&bed, &web_node, &[("web.yaml", "")], |p| {
        port_of(p, "default/web", 8080)["default_policy"] == "all-unauthenticated"
    });
    let file = bed.manifests_dir().join("pods.yaml");
    let pods = std::fs::read_to_string(&file).unwrap();
    let marked = pods.replacen(
        "  name: web\n  namespace: default\n  labels:\n    app: web\n  annotations: {}",
        "  name: web\n  namespace: default\n  labels:\n    app: web\n  annotations:\n    config.linkerd.io/default-inbound-policy: audit",
        1,
    );
    assert_ne!(
        marked, pods,
        "the web pod's manifest is where it was expected"
    );
    std::fs::write(file, marked).unwrap();
    eventually_for("the audit default in force", Duration::from_secs(1), || {
        let dump = n2.admin("/config_dump").unwrap().body;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        port_of(&dump["policy"], "default/web", 8080)["default_policy"] == "audit"
    });
    assert_eq!(
        run("client", &["GET:/", "POST:/"]),
        "GET / 200 web\nPOST / 200 web\n"
    );
    assert_eq!(
        metric(
            &n2,
            "inbound_authz_audit_total",
            &[("authz_name", "audit"), ("authz_kind", "default")]
        ),
        2.0
    );
}

/// `Tcp: ... PassiveOpens` of pod `name`'s network namespace: connections its stack accepted.
fn passive_opens(bed: &Testbed, name: &str) -> u64 {
    let mut cat = bed.pod_command(name, "cat").unwrap();
    cat.arg("/proc/net/snmp");
    let text = must_succeed(cat, "read /proc/net/snmp");
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// A connection attempt of 300 ms from `cmd`: `connected`, `refused` or `timeout`.
fn syn(mut cmd: std::process::Command, addr: &str) -> String {
    cmd.args(["syn", addr, "300"]);
    must_succeed(cmd, "syn").trim().to_owned()
}

#[test]
fn my_service_strict_and_single_caller_with_plaintext_refused_in_the_kernel() {
    let _serial = serial();
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            pod(
                "authorized",
                0,
                "authorized",
                "my-namespace",
                "authorized-service",
            ),
            pod("other", 0, "other", "my-namespace", "other"),
            PodSpec::new("unenrolled", 0, "unenrolled")
                .annotate("mesh-agent.io/inject", "disabled"),
            pod(
                "my-service-a",
                1,
                "my-service",
                "my-namespace",
                "my-service",
            ),
        ],
        services: vec![service(
            "my-service",
            "my-namespace",
            "10.96.0.60",
            "my-service",
        )],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    serve(&bed, &["my-service-a"]);
    let start = |node: &str| {
        let kubelet = bed.kubelet_cgroup(node).unwrap();
        let mut agent =
            Agent::start(&bed, node, &["--kubelet-cgroup", kubelet.to_str().unwrap()]).unwrap();
        agent.wait_ready(READY).unwrap();
        agent
    };
    let (_n1, n2) = (start("n1"), start("n2"));
    let pod_addr = format!("{}:8080", bed.pod("my-service-a").ip);
    let unenrolled = || bed.pod_command("unenrolled", meshtest()).unwrap();
    let host = || bed.node_command("n2", meshtest()).unwrap();
    let kubelet = || bed.kubelet_command("n2", meshtest()).unwrap();
    // Before any policy, plaintext reaches the pod.
    assert_eq!(syn(unenrolled(), &pod_addr), "connected");
    assert_eq!(syn(host(), &pod_addr), "connected");

    // The tutorial's STRICT PeerAuthentication, DestinationRule and single-caller policy, as
    // written.
    let security = example("my-service/istio-security.yaml");
    apply(&bed, &[&n2], &[("security.yaml", &security)], |p| {
        port_of(p, "my-namespace/my-service-a", 8080)["peer_authentication"]["mode"] == "STRICT"
            && istio_of(p, "my-namespace/my-service-a") == ["service-access-policy"]
    });
    let get = |from: &str| {
        let mut cmd = bed.pod_command(from, meshtest()).unwrap();
        cmd.args(["matrix", "10.96.0.60:80", "GET:/"]);
        must_succeed(cmd, "GET my-service")
    };
    assert_eq!(get("authorized"), "GET / 200 my-service-a\n");
    assert_eq!(
        get("other"),
        "GET / 403 unauthorized request: denied by AuthorizationPolicy service-access-policy (security.istio.io)\n"
    );

    // Plaintext from an unenrolled pod (another node) and from the node's host network: the
    // SYN is dropped on the way into the pod, which accepts nothing.
    let dropped = || {
        metric(
            &n2,
            "mesh_inbound_policy_dropped_total",
            &[("pod", "my-service-a"), ("port", "8080")],
        )
    };
    // (The kernel's entries follow the snapshot within a moment of the proxy's.)
    eventually_for(
        "the kernel's policy in force",
        Duration::from_secs(2),
        || syn(unenrolled(), &pod_addr) == "timeout",
    );
    let opened = passive_opens(&bed, "my-service-a");
    assert_eq!(syn(unenrolled(), &pod_addr), "timeout");
    assert_eq!(syn(host(), &pod_addr), "timeout");
    assert_eq!(
        passive_opens(&bed, "my-service-a"),
        opened,
        "no SYN reached the pod"
    );
    eventually("the drops counted", || dropped() >= 2.0);
    // The kubelet's probe (the node's address, the kubelet's cgroup) gets through.
    let mut probe = kubelet();
    probe.args(["matrix", &pod_addr, "GET:/healthz"]);
    assert_eq!(
        must_succeed(probe, "probe"),
        "GET /healthz 200 my-service-a\n"
    );
    assert_eq!(passive_opens(&bed, "my-service-a"), opened + 1);

    // A Linkerd Server on the port keeps the probe authorized; an HTTPRoute on it ends that.
    let server = "---\napiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata:\n  name: my-service-http\n  namespace: my-namespace\nspec:\n  podSelector: {matchLabels: {app: my-service}}\n  port: 8080\n";
    let with_server = format!("{security}{server}");
    apply(&bed, &[&n2], &[("security.yaml", &with_server)], |p| {
        port_of(p, "my-namespace/my-service-a", 8080)["server"] == "my-service-http"
    });
    assert_eq!(syn(kubelet(), &pod_addr), "connected");
    let route = "---\napiVersion: policy.linkerd.io/v1beta3\nkind: HTTPRoute\nmetadata:\n  name: api\n  namespace: my-namespace\nspec:\n  parentRefs: [{group: policy.linkerd.io, kind: Server, name: my-service-http}]\n  rules: [{matches: [{path: {type: PathPrefix, value: /api}}]}]\n";
    let with_route = format!("{with_server}{route}");
    apply(&bed, &[&n2], &[("security.yaml", &with_route)], |p| {
        port_of(p, "my-namespace/my-service-a", 8080)["routes"][0]["route"] == "my-namespace/api"
    });
    eventually_for("the probe no longer let in", Duration::from_secs(2), || {
        syn(kubelet(), &pod_addr) == "timeout"
    });

    // Decided by source in the kernel: a Server whose only authorization is a
    // NetworkAuthentication of the unenrolled pod's address (no STRICT any more).
    let unenrolled_ip = bed.pod("unenrolled").ip;
    let by_source = format!(
        "{server}---\napiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata:\n  name: one-pod\n  namespace: my-namespace\nspec:\n  networks: [{{cidr: \"{unenrolled_ip}/32\"}}]\n---\napiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: one-pod\n  namespace: my-namespace\nspec:\n  targetRef: {{group: policy.linkerd.io, kind: Server, name: my-service-http}}\n  requiredAuthenticationRefs: [{{group: policy.linkerd.io, kind: NetworkAuthentication, name: one-pod}}]\n"
    );
    apply(&bed, &[&n2], &[("security.yaml", &by_source)], |p| {
        port_of(p, "my-namespace/my-service-a", 8080)["authorizations"][0] == "one-pod"
    });
    eventually_for(
        "the unenrolled pod let in by its address",
        Duration::from_secs(2),
        || syn(unenrolled(), &pod_addr) == "connected",
    );
    assert_eq!(syn(host(), &pod_addr), "timeout");
}
