//! The Kubernetes watchers (`mesh-agent run --kube`) against the API server double, in
//! process: real HTTP list/watch with resourceVersions, bookmarks, a dropped watch, `410
//! Gone`, a slow list, a kind not installed, refused objects. The snapshot the agent would
//! use is asserted after each step. Unprivileged.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::{
    metrics::{http::Dialect, Metrics},
    source::kube::{client, KubeSource},
    state::Snapshot,
};
use mesh_agent_tests::apiserver::ApiServer;
use serde_json::json;
use tokio::sync::watch;

const NODE: &str = "node-1";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {linkerd.io/inject: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: app, image: web}]}
status: {phase: Running, hostIP: 10.0.0.1, podIP: 10.1.1.10, podIPs: [{ip: 10.1.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2, serviceAccountName: web, containers: [{name: app, image: web}]}
status: {phase: Running, hostIP: 10.0.0.2, podIP: 10.1.2.10, podIPs: [{ip: 10.1.2.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: loner, namespace: plain, labels: {app: loner}}
spec: {nodeName: node-1, containers: [{name: app, image: loner}]}
status: {phase: Running, hostIP: 10.0.0.1, podIP: 10.1.1.20, podIPs: [{ip: 10.1.1.20}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.1.1.10], conditions: {ready: true}, nodeName: node-1, targetRef: {kind: Pod, name: web-1}}
- {addresses: [10.1.2.10], conditions: {ready: true}, nodeName: node-2, targetRef: {kind: Pod, name: web-2}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-route, namespace: shop}
spec:
  parentRefs: [{group: core, kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: web, port: 80}]
"#;

const WEB: &str = "web.shop.svc.cluster.local:80";

struct Follower {
    api: ApiServer,
    rx: watch::Receiver<Arc<Snapshot>>,
    _runtime: tokio::runtime::Runtime,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("mesh-kube-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("temp dir");
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Starts the agent's watchers (opt-in enrolment, node-1) against `api`.
fn follow(api: ApiServer, tag: &str) -> Follower {
    let dir = tempdir::Dir::new(tag);
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let metrics = Arc::new(Metrics::new(Dialect::Both).unwrap());
    let client = runtime
        .block_on(client(Some(&kubeconfig)))
        .expect("client from the double's kubeconfig");
    runtime.spawn(KubeSource::new(true).follow(client, NODE.to_owned(), tx, metrics));
    Follower {
        api,
        rx,
        _runtime: runtime,
        _dir: dir,
    }
}

impl Follower {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Waits until the snapshot satisfies `f`; returns it.
    fn until(&self, what: &str, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        self.until_for(what, Duration::from_secs(10), f)
    }

    fn until_for(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.snapshot();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; snapshot v{}: pods {:?}",
                s.version,
                pods(&s)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// (namespace/name, node, enrolled) of every pod.
fn pods(s: &Snapshot) -> Vec<(String, Option<String>, bool)> {
    let mut out: Vec<_> = s
        .pods()
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                p.node.clone(),
                p.enrolled,
            )
        })
        .collect();
    out.sort();
    out
}

fn pod<'a>(s: &'a Snapshot, name: &str) -> Option<&'a Arc<mesh_agent::state::Workload>> {
    s.pods()
        .find(|p| format!("{}/{}", p.namespace, p.name) == name)
}

fn local(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s
        .local_pods(NODE)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    out.sort();
    out
}

fn endpoints(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s
        .service_named(WEB)
        .map(|t| t.endpoints.iter().map(|e| e.to_string()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn pod_yaml(name: &str, ns: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: web}}}}\nspec: {{nodeName: {node}, serviceAccountName: web, containers: [{{name: app, image: web}}]}}\nstatus: {{phase: Running, hostIP: 10.0.0.1, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

#[test]
fn the_snapshot_follows_the_api_server_through_every_watch_event() {
    let api = ApiServer::on_loopback().unwrap();
    api.apply(CLUSTER);
    // Linkerd's CRDs are not installed (yet); listing pods is slow.
    for plural in ["servers", "authorizationpolicies"] {
        api.set_installed("policy.linkerd.io", plural, false);
    }
    // Only the pods' lists are slow: the first snapshot must wait for them.
    api.slow_lists("pods", Duration::from_millis(500));
    let f = follow(api, "events");

    // The first snapshot is the whole cluster, published once every kind was listed (or
    // found not installed): never a partial one.
    let s = f.until("the first snapshot", |s| s.version > 0);
    assert_eq!(s.version, 1, "one snapshot for the initial lists");
    assert_eq!(
        pods(&s),
        vec![
            ("plain/loner".into(), Some("node-1".into()), false),
            ("shop/web-1".into(), Some("node-1".into()), true),
            ("shop/web-2".into(), Some("node-2".into()), true),
        ],
        "this node's pods and the other nodes' (for their identities); `plain` did not opt in"
    );
    assert_eq!(local(&s), vec!["shop/web-1"]);
    assert_eq!(endpoints(&s), vec!["10.1.1.10:8080", "10.1.2.10:8080"]);
    assert!(
        s.service_named(WEB).unwrap().routes.is_some(),
        "the HTTPRoute attached"
    );
    let api = &f.api;
    assert_eq!(api.lists("pods"), 2, "one list per pod stream");
    api.slow_lists("pods", Duration::ZERO);

    // ADDED.
    api.apply(&pod_yaml("web-3", "shop", NODE, "10.1.1.11"));
    let s = f.until("web-3 added", |s| pod(s, "shop/web-3").is_some());
    assert_eq!(local(&s), vec!["shop/web-1", "shop/web-3"]);
    // MODIFIED: the pod opts out.
    api.modify("pods", "shop", "web-3", |o| {
        o["metadata"]["annotations"] = json!({"mesh-agent.io/inject": "disabled"});
    });
    let s = f.until("web-3 opted out", |s| {
        pod(s, "shop/web-3").is_some_and(|p| !p.enrolled)
    });
    assert_eq!(local(&s), vec!["shop/web-1"]);
    // A namespace opting in enrols its pods.
    api.modify("namespaces", "", "plain", |o| {
        o["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    });
    f.until(
        "loner enrolled by its namespace's Istio ambient label",
        |s| local(s) == ["plain/loner", "shop/web-1"],
    );
    // DELETED.
    assert!(api.delete("pods", "shop", "web-3"));
    f.until("web-3 deleted", |s| pod(s, "shop/web-3").is_none());

    // BOOKMARKs move the watch along without a change; the next change still arrives, and
    // nothing was relisted.
    let lists = api.lists("pods");
    api.bookmark();
    api.apply(&pod_yaml("web-4", "shop", NODE, "10.1.1.12"));
    f.until("web-4 added after a bookmark", |s| {
        pod(s, "shop/web-4").is_some()
    });
    assert_eq!(api.lists("pods"), lists, "a bookmark is not a relist");

    // A dropped watch connection: the watcher resumes from its resourceVersion, and what
    // changed meanwhile arrives without a relist.
    let watches = api.watches("pods");
    api.drop_watches();
    assert!(api.delete("pods", "shop", "web-4"));
    f.until("web-4's deletion seen through the resumed watch", |s| {
        pod(s, "shop/web-4").is_none()
    });
    assert!(api.watches("pods") > watches, "the watch was reopened");
    assert_eq!(api.lists("pods"), lists, "a resumed watch is not a relist");

    // 410 Gone: the history the watcher would resume from is compacted away while it is
    // disconnected. It must relist, and what was deleted meanwhile (no DELETED event will
    // ever come for it) must go when the relist completes.
    let pods_lists = api.lists("pods");
    api.compact();
    api.drop_watches();
    assert!(api.delete("pods", "shop", "web-2"));
    assert!(api.delete("endpointslices", "shop", "web-1"));
    // (Without its EndpointSlice, the Service's endpoints are the pods its selector picks.)
    let s = f.until("web-2 and the slice gone after the relist", |s| {
        pod(s, "shop/web-2").is_none() && endpoints(s) == ["10.1.1.10:8080"]
    });
    assert!(api.lists("pods") > pods_lists, "410 Gone made it relist");
    assert_eq!(local(&s), vec!["plain/loner", "shop/web-1"]);

    // A pod moved to another node: deleted from this node's stream and added to the other
    // nodes' one (in whichever order they come); gone from this node's pods.
    api.modify("pods", "shop", "web-1", |o| {
        o["spec"]["nodeName"] = json!("node-3");
    });
    let s = f.until("web-1 off this node", |s| {
        pod(s, "shop/web-1").is_some_and(|p| p.node.as_deref() == Some("node-3"))
    });
    assert_eq!(local(&s), vec!["plain/loner"], "web-1 left this node");

    // A kind whose CRD appears later is picked up (the watcher retries with backoff).
    api.set_installed("policy.linkerd.io", "servers", true);
    api.apply(
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: web-http, namespace: shop}\nspec: {podSelector: {matchLabels: {app: web}}, port: 8080, proxyProtocol: HTTP/1}\n",
    );
    f.until_for(
        "the Server once its CRD is installed",
        Duration::from_secs(40),
        |s| {
            s.policy
                .namespaces
                .get("shop")
                .is_some_and(|n| n.servers.len() == 1)
        },
    );
}

#[test]
fn refused_objects_leave_the_last_good_state_and_do_not_block_others() {
    let api = ApiServer::on_loopback().unwrap();
    api.apply(CLUSTER);
    let f = follow(api, "refused");
    let api = &f.api;
    let s = f.until("the first snapshot", |s| s.version > 0);
    let before = s.service_named(WEB).unwrap().routes.clone();

    // An invalid HTTPRoute (a regex that does not compile) is refused: the route in force
    // stays, and a valid change that came with it is applied.
    api.modify("httproutes", "shop", "web-route", |o| {
        o["spec"]["rules"][0]["matches"][0]["path"] =
            json!({"type": "RegularExpression", "value": "(unclosed"});
    });
    api.apply(&pod_yaml("web-5", "shop", NODE, "10.1.1.15"));
    let s = f.until("web-5 added", |s| pod(s, "shop/web-5").is_some());
    let table = s.service_named(WEB).unwrap().routes.clone();
    let describe =
        |t: &Option<Arc<mesh_agent::route::Table>>| t.as_ref().map(|t| t.describe().to_string());
    assert!(before.is_some());
    assert_eq!(
        describe(&table),
        describe(&before),
        "the last good route stays in force"
    );

    // Two live pods claiming one address: the second is refused (the first keeps it)...
    api.apply(&pod_yaml("twin", "shop", NODE, "10.1.1.15"));
    api.apply(&pod_yaml("web-6", "shop", NODE, "10.1.1.16"));
    let s = f.until("web-6 added", |s| pod(s, "shop/web-6").is_some());
    assert!(pod(&s, "shop/twin").is_none(), "the twin was refused");
    let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 15));
    assert_eq!(s.pod_by_ip(ip).map(|p| p.name.as_str()), Some("web-5"));
    // ...and taken once the address is free, with the next change.
    assert!(api.delete("pods", "shop", "web-5"));
    let s = f.until("the twin applied once web-5 freed the address", |s| {
        pod(s, "shop/twin").is_some()
    });
    assert_eq!(s.pod_by_ip(ip).map(|p| p.name.as_str()), Some("twin"));

    // The route fixed: applied.
    api.modify("httproutes", "shop", "web-route", |o| {
        o["spec"]["rules"][0]["matches"][0]["path"] =
            json!({"type": "PathPrefix", "value": "/fixed"});
    });
    f.until("the fixed route in force", |s| {
        s.service_named(WEB)
            .and_then(|t| t.routes.clone())
            .is_some_and(|r| r.describe().to_string().contains("/fixed"))
    });
    assert!(
        !table.unwrap().describe().to_string().contains("/fixed"),
        "(the route before the fix did not match /fixed)"
    );
}

#[test]
fn no_state_is_published_without_the_core_kinds() {
    // EndpointSlices not readable (as with a ClusterRole missing them): nothing is published,
    // since a state without endpoints would send every connection nowhere...
    let api = ApiServer::on_loopback().unwrap();
    api.apply(CLUSTER);
    api.set_installed("discovery.k8s.io", "endpointslices", false);
    // ...while an optional kind that is missing does not hold the state back.
    api.set_installed("security.istio.io", "peerauthentications", false);
    let f = follow(api, "core");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f.snapshot().version, 0, "published without EndpointSlices");
    // Once they can be read, the whole state is published at once.
    f.api
        .set_installed("discovery.k8s.io", "endpointslices", true);
    let s = f.until_for("the first snapshot", Duration::from_secs(40), |s| {
        s.version > 0
    });
    assert_eq!(s.version, 1);
    assert_eq!(endpoints(&s), vec!["10.1.1.10:8080", "10.1.2.10:8080"]);
}
