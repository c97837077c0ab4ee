//! The desired state of the cluster as one typed, immutable snapshot.
//!
//! Sources (a manifest directory today, the Kubernetes API later) build a [`Snapshot`] and
//! publish it on a `watch` channel; the proxy and the reconcilers only read it. A connection
//! keeps the snapshot it started with.

pub mod istio;
pub mod manifest;
pub mod policy;
pub mod ports;
pub mod shared;
pub mod store;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use ports::{Declared, PortSet};
use shared::SharedMap;
use store::Applied;

use crate::balance::EndpointLoad;

/// Annotation (on a Pod or its Namespace) that takes pods in or out of the mesh.
pub const INJECT_ANNOTATION: &str = "mesh-agent.io/inject";
/// Annotation (on a Pod or its Namespace, `"true"` or `"false"`): while no agent serves the
/// node, the pod's connections are refused in the kernel instead of going directly, in
/// plaintext (needs the agent's `--pin-dir`, which keeps the programs in place without it).
pub const FAIL_CLOSED_ANNOTATION: &str = "mesh-agent.io/fail-closed";
/// Linkerd's equivalent, honoured so existing manifests keep their meaning.
pub const LINKERD_INJECT_ANNOTATION: &str = "linkerd.io/inject";
/// Istio ambient's label (on a Namespace or Pod): `ambient` opts in, `none` out.
pub const ISTIO_DATAPLANE_LABEL: &str = "istio.io/dataplane-mode";

/// A pod as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// The workload the pod belongs to: its owning Deployment, StatefulSet or DaemonSet (a
    /// ReplicaSet's name without its pod-template hash), else its `app.kubernetes.io/name` or
    /// `app` label, else the pod name. What metrics are labelled with.
    pub workload: String,
    /// `deployment`, `statefulset`, `daemonset`, `job`, `cronjob` or `replicaset` when
    /// `workload` names an owner (Linkerd's `dst_<kind>` label), else `None`.
    pub kind: Option<&'static str>,
    /// Ports whose traffic to this pod is never inspected (Linkerd's opaque-ports annotation
    /// on the pod, else on its namespace, else Linkerd's defaults).
    pub opaque_ports: Arc<PortSet>,
    pub service_account: String,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address on a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// The address of the pod's node (`status.hostIP`).
    pub node_ip: Option<Ipv4Addr>,
    /// Whether the pod's traffic is captured (see [`INJECT_ANNOTATION`]).
    pub enrolled: bool,
    /// Whether its connections are refused while no agent serves it (see
    /// [`FAIL_CLOSED_ANNOTATION`]).
    pub fail_closed: bool,
    /// The pod's UID (from the API server): its sandbox is found by the cgroup the kubelet
    /// names after it.
    pub uid: Option<String>,
    /// What inbound policy reads of the pod.
    pub inbound: Arc<PodInbound>,
}

/// What policy needs of a pod: its labels, its own default inbound policy, its named ports.
#[derive(Debug, PartialEq, Eq)]
pub struct PodInbound {
    pub(crate) labels: store::PackedLabels,
    /// Its `config.linkerd.io/default-inbound-policy` annotation.
    pub default_policy: Option<crate::policy::DefaultPolicy>,
    /// Its containers' named TCP ports.
    pub named_ports: Vec<(String, u16)>,
}

impl PodInbound {
    /// The value of its label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key)
    }
}

/// A Service port with its ready endpoints.
#[derive(Debug)]
pub struct ServiceTarget {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    /// The load of each endpoint (same order), for per-request balancing.
    /// Made at the first request balanced over them: most Service ports of a large cluster are
    /// never called from a given node, and 50k load figures would be megabytes for nothing.
    loads: std::sync::OnceLock<Box<[Arc<EndpointLoad>]>>,
    /// The HTTPRoutes attached to this port, if any: requests are then routed by them, and
    /// one no rule matches gets 404.
    pub routes: Option<Arc<crate::route::Table>>,
    /// Consumer routes: per caller namespace, the HTTPRoutes of that namespace attached to this
    /// port, which replace the Service's own for callers there (GAMMA).
    pub consumer_routes: Vec<(String, Arc<crate::route::Table>)>,
    /// The protocol the port declares (`appProtocol`, Istio port name, or the Service's
    /// opaque-ports annotation).
    pub declared: Option<Declared>,
    /// What an Istio DestinationRule asks: balancing, outlier ejection, a request limit.
    pub traffic: istio::TrafficPolicy,
    /// Its Istio subsets, by name (each with the endpoints of its pods).
    pub subsets: Vec<(String, Arc<ServiceTarget>)>,
    /// Requests in flight, against `traffic.max_requests`.
    active: Arc<std::sync::atomic::AtomicU32>,
    next: AtomicUsize,
}

impl Workload {
    /// Whether this pod's traffic is captured on `node` (and it has an address).
    pub fn is_enrolled_on(&self, node: &str) -> bool {
        self.enrolled && self.ip.is_some() && self.node.as_deref() == Some(node)
    }

    /// Whether `other` describes the same pod with the same identity (labels may differ).
    pub fn same_pod(&self, other: &Workload) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && self.service_account == other.service_account
    }

    pub fn identity(&self, trust_domain: &str) -> crate::identity::Identity {
        crate::identity::Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether `id` is this pod's identity in `trust_domain` (what [`Workload::identity`]
    /// makes, without making it).
    pub fn has_identity(&self, id: &crate::identity::Identity, trust_domain: &str) -> bool {
        match id {
            crate::identity::Identity::Spiffe {
                trust_domain: domain,
                namespace,
                service_account,
            } => {
                domain == trust_domain
                    && *namespace == self.namespace
                    && *service_account == self.service_account
            }
        }
    }
}

impl ServiceTarget {
    /// `name.namespace.svc.cluster.local`, as Istio labels metrics.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The routes for a caller in `namespace`: its namespace's consumer routes if it has any,
    /// else the Service's own.
    pub fn routes_for(&self, namespace: &str) -> Option<&Arc<crate::route::Table>> {
        self.consumer_routes
            .iter()
            .find(|(ns, _)| ns == namespace)
            .map(|(_, t)| t)
            .or(self.routes.as_ref())
    }

    /// `name.namespace.svc.cluster.local:port`, what [`Snapshot::service_named`] looks up.
    fn name_key(&self) -> String {
        format!("{}:{}", self.fqdn(), self.port)
    }

    /// A Service port with no routes, subsets or traffic policy of its own yet.
    pub fn new(
        name: &store::Name,
        port: u16,
        endpoints: Vec<SocketAddr>,
        declared: Option<Declared>,
        traffic: istio::TrafficPolicy,
    ) -> ServiceTarget {
        ServiceTarget {
            namespace: name.0.to_string(),
            name: name.1.to_string(),
            port,
            endpoints,
            loads: Default::default(),
            routes: None,
            consumer_routes: Vec::new(),
            declared,
            traffic,
            subsets: Vec::new(),
            active: Arc::default(),
            next: AtomicUsize::new(0),
        }
    }

    fn loads(&self) -> &[Arc<EndpointLoad>] {
        self.loads
            .get_or_init(|| self.endpoints.iter().map(|_| Arc::default()).collect())
    }

    /// The endpoint for the next request, and its load (see [`crate::balance`]), by the
    /// DestinationRule's policy (P2C over peak-EWMA without one), leaving out ejected
    /// endpoints.
    pub fn pick_for_request(&self) -> Option<(SocketAddr, &Arc<EndpointLoad>)> {
        let loads = self.loads();
        let outliers = self.traffic.outlier.is_some();
        let i = crate::balance::pick_with(self.traffic.balance, loads, &self.next, outliers)?;
        Some((*self.endpoints.get(i)?, loads.get(i)?))
    }

    /// Records the answer `load`'s endpoint gave (a status, or the proxy's own for a failure
    /// to answer), for outlier detection; `true` when it was ejected for it.
    pub fn observe(&self, load: &Arc<EndpointLoad>, status: u16) -> bool {
        let Some(outlier) = &self.traffic.outlier else {
            return false;
        };
        let loads = self.loads();
        let Some(i) = loads.iter().position(|l| Arc::ptr_eq(l, load)) else {
            return false;
        };
        crate::balance::observe_outcome(loads, i, status, outlier, std::time::Instant::now())
    }

    /// A place among the requests in flight, if the DestinationRule's limit leaves one;
    /// without a limit, nothing is counted.
    pub fn admit(&self) -> Option<Admitted> {
        let Some(limit) = self.traffic.max_requests else {
            return Some(Admitted(None));
        };
        let now = self.active.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(Some(self.active.clone()));
        (now < limit).then_some(admitted)
    }

    /// Its DestinationRule's policy and subsets, as `/config_dump` shows them.
    pub fn describe_traffic(&self) -> serde_json::Value {
        let policy = |t: &istio::TrafficPolicy| {
            serde_json::json!({
                "balance": format!("{:?}", t.balance),
                "outlier": t.outlier.as_ref().map(|o| serde_json::json!({
                    "consecutive_5xx": o.consecutive_5xx,
                    "consecutive_gateway": o.consecutive_gateway,
                    "base_ejection_ms": o.base_ejection.as_millis(),
                    "max_ejection_percent": o.max_ejection_percent,
                })),
                "max_requests": t.max_requests,
            })
        };
        let mut out = policy(&self.traffic);
        out["subsets"] = self
            .subsets
            .iter()
            .map(|(name, t)| {
                let mut p = policy(&t.traffic);
                p["name"] = name.clone().into();
                p["endpoints"] = t.endpoints.iter().map(|e| e.to_string()).collect();
                p
            })
            .collect();
        out
    }

    /// Its subset `name`.
    pub fn subset(&self, name: &str) -> Option<&Arc<ServiceTarget>> {
        self.subsets.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The next endpoint for a connection, round robin.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i).copied()
    }
}

/// A request counted against a Service's limit until dropped.
#[derive(Debug)]
pub struct Admitted(Option<Arc<std::sync::atomic::AtomicU32>>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(active) = &self.0 {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where a captured connection goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// The app dialled a Service address.
    Service(Arc<ServiceTarget>),
    /// The app dialled a pod known to the mesh.
    Pod(Arc<Workload>),
    /// Anything else: forwarded as dialled.
    Passthrough,
}

/// The desired state at one moment, as the proxy and the reconcilers read it. Cloning it is
/// cheap and shares every map (see [`shared`]); [`store::Store`] makes the next one.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pods: SharedMap<store::Name, Arc<Workload>>,
    pods_by_ip: SharedMap<IpAddr, Arc<Workload>>,
    services: SharedMap<SocketAddr, Arc<ServiceTarget>>,
    /// The same, by `name.namespace.svc.cluster.local:port`.
    services_by_name: SharedMap<String, Arc<ServiceTarget>>,
    /// Pods per (namespace, workload).
    workloads: SharedMap<(String, String), usize>,
    /// Pods per (namespace, service account).
    service_accounts: SharedMap<(String, String), usize>,
    /// The pods scheduled on each node (on `indexed_node` only, if set), so that a node's
    /// agent finds its own without a scan of the cluster's.
    pods_by_node: SharedMap<String, Arc<std::collections::BTreeMap<store::Name, Arc<Workload>>>>,
    indexed_node: Option<Arc<str>>,
    /// Endpoints over every Service port.
    endpoints: usize,
    /// Every policy object, by namespace.
    pub policy: Arc<crate::policy::PolicyIndex>,
    /// Which snapshot this is, counting from 1 for the first one a source published.
    pub version: u64,
    /// When the source published it.
    pub applied_at: Option<std::time::SystemTime>,
    /// What the change that made it rebuilt, and how long it took.
    pub last_apply: Option<LastApply>,
}

/// The change that made a snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastApply {
    /// Files (or watch events) it read.
    pub files: usize,
    /// Bytes of them.
    pub bytes_read: usize,
    #[serde(flatten)]
    pub applied: Applied,
    /// From the first file read to the snapshot published.
    pub duration_us: u128,
}

/// What `/state` reports about the snapshot in force.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateSummary {
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub applied_at_unix_ms: Option<u128>,
    pub pods: usize,
    /// Service ports (one per cluster IP and port).
    pub service_ports: usize,
    pub endpoints: usize,
    pub last_apply: Option<LastApply>,
}

impl Snapshot {
    pub fn summary(&self) -> StateSummary {
        StateSummary {
            version: self.version,
            applied_at_unix_ms: self
                .applied_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis()),
            pods: self.pods.len(),
            service_ports: self.services.len(),
            endpoints: self.endpoints,
            last_apply: self.last_apply.clone(),
        }
    }

    /// Whether some pod of the snapshot belongs to this workload.
    pub fn has_workload(&self, namespace: &str, workload: &str) -> bool {
        self.workloads
            .get(&(namespace.to_owned(), workload.to_owned()))
            .is_some()
    }

    /// Every pod of the snapshot.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.pods.values()
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.pods_by_ip.get(&ip)
    }

    /// Enrolled pods with an address, scheduled on `node`.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        let indexed = self.indexed_node.as_deref().is_none_or(|n| n == node);
        let (filed, all) = match indexed {
            true => (self.pods_by_node.get(node), None),
            false => (None, Some(self.pods.values())),
        };
        filed
            .into_iter()
            .flat_map(|pods| pods.values())
            .chain(all.into_iter().flatten())
            .filter(move |p| p.is_enrolled_on(node))
    }

    /// Whether any pod runs as `service_account` of `namespace`.
    pub fn has_service_account(&self, namespace: &str, service_account: &str) -> bool {
        self.service_accounts
            .get(&(namespace.to_owned(), service_account.to_owned()))
            .is_some()
    }

    /// Service ports with HTTPRoutes attached, by `name.namespace.svc.cluster.local:port`.
    pub fn routed_services(&self) -> impl Iterator<Item = (&String, &Arc<ServiceTarget>)> {
        self.services_by_name
            .iter()
            .filter(|(_, t)| t.routes.is_some() || !t.consumer_routes.is_empty())
    }

    /// Service ports with an Istio DestinationRule in force (a traffic policy or subsets).
    pub fn policed_services(&self) -> impl Iterator<Item = (&String, &Arc<ServiceTarget>)> {
        self.services_by_name
            .iter()
            .filter(|(_, t)| t.traffic != istio::TrafficPolicy::default() || !t.subsets.is_empty())
    }

    /// The Service port named `name.namespace.svc.cluster.local:port`.
    pub fn service_named(&self, name: &str) -> Option<&Arc<ServiceTarget>> {
        self.services_by_name.get(name)
    }

    pub fn resolve(&self, dst: SocketAddr) -> Destination {
        if let Some(svc) = self.services.get(&dst) {
            return Destination::Service(svc.clone());
        }
        if let Some(pod) = self.pods_by_ip.get(&dst.ip()) {
            return Destination::Pod(pod.clone());
        }
        Destination::Passthrough
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::path::Path;

    use super::*;

    fn snapshot(yaml: &str) -> Result<Snapshot, manifest::ManifestError> {
        let source: Arc<str> = Arc::from("t.yaml");
        let changes = manifest::parse_file(Path::new("t.yaml"), yaml)?
            .into_iter()
            .map(|object| store::Change::put(&source, &object))
            .collect();
        let mut store = store::Store::default();
        store.apply(changes)?;
        Ok(store.snapshot())
    }

    const BASE: &str = r#"
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.1.2.2}
---
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.1.1.3}
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

    #[test]
    fn service_by_selector_round_robin() {
        let s = snapshot(BASE).unwrap();
        let Destination::Service(svc) = s.resolve("10.96.0.10:80".parse().unwrap()) else {
            panic!("not a service");
        };
        assert_eq!(svc.fqdn(), "web.shop.svc.cluster.local");
        let picks: Vec<_> = (0..4).map(|_| svc.pick().unwrap().to_string()).collect();
        assert_eq!(
            picks,
            [
                "10.1.2.2:8080",
                "10.1.1.3:8080",
                "10.1.2.2:8080",
                "10.1.1.3:8080"
            ]
        );
        assert!(matches!(
            s.resolve("10.96.0.10:81".parse().unwrap()),
            Destination::Passthrough
        ));
    }

    #[test]
    fn an_httproute_and_a_grpcroute_of_one_name_both_attach() {
        let route = |kind: &str, path: &str| {
            format!("---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: web}}]\n  rules: [{{matches: [{path}], backendRefs: [{{name: web}}]}}]\n")
        };
        let yaml = format!(
            "{BASE}{}{}",
            route("HTTPRoute", "{path: {type: Exact, value: /h}}"),
            route("GRPCRoute", "{method: {service: s, method: m}}")
        );
        let s = snapshot(&yaml).unwrap();
        let Destination::Service(svc) = s.resolve("10.96.0.10:80".parse().unwrap()) else {
            panic!("not a service");
        };
        let kinds: Vec<String> = svc
            .routes
            .as_ref()
            .unwrap()
            .describe()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap(),
                    e["path"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(kinds, ["GRPCRoute Exact /s/m", "HTTPRoute Exact /h"]);
    }

    #[test]
    fn endpoint_slices_win_and_unready_is_skipped() {
        let yaml = format!(
            "{BASE}---\nkind: EndpointSlice\nmetadata: {{name: web-x, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 9090}}]\nendpoints:\n- addresses: [10.1.2.2]\n- addresses: [10.1.1.3]\n  conditions: {{ready: false}}\n"
        );
        let s = snapshot(&yaml).unwrap();
        let Destination::Service(svc) = s.resolve("10.96.0.10:80".parse().unwrap()) else {
            panic!("not a service");
        };
        assert_eq!(svc.endpoints, vec!["10.1.2.2:9090".parse().unwrap()]);
    }

    #[test]
    fn pods_workload_and_enrollment() {
        let yaml = format!(
            "{BASE}---\nkind: Namespace\nmetadata: {{name: quiet, annotations: {{linkerd.io/inject: disabled}}}}\n---\nkind: Pod\nmetadata: {{name: c, namespace: quiet}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.1.1.9}}\n"
        );
        let s = snapshot(&yaml).unwrap();
        let web = s.pod_by_ip("10.1.2.2".parse().unwrap()).unwrap();
        assert_eq!(
            (web.workload.as_str(), web.service_account.as_str()),
            ("web", "web")
        );
        let local: Vec<_> = s.local_pods("n1").map(|p| p.name.as_str()).collect();
        assert_eq!(local, ["web-2"]);
    }

    #[test]
    fn a_pod_knows_its_identity_without_making_it() {
        let s = snapshot(BASE).unwrap();
        let web1 = s.pod_by_ip("10.1.2.2".parse().unwrap()).unwrap();
        let web2 = s.pod_by_ip("10.1.1.3".parse().unwrap()).unwrap();
        let own = web1.identity("cluster.local");
        assert!(web1.has_identity(&own, "cluster.local"));
        // Another trust domain, service account (web-2 runs as `default`) or namespace.
        assert!(!web1.has_identity(&own, "other.local"));
        assert!(!web2.has_identity(&own, "cluster.local"));
        let elsewhere = crate::identity::Identity::new("cluster.local", "shop2", "web");
        assert!(!web1.has_identity(&elsewhere, "cluster.local"));
    }

    #[test]
    fn two_live_pods_cannot_share_an_ip() {
        let twin = "---\nkind: Pod\nmetadata: {name: twin, namespace: other}\nspec: {nodeName: n1}\nstatus: {podIP: 10.1.2.2, phase: Running}\n";
        let msg = snapshot(&format!("{BASE}{twin}")).unwrap_err().to_string();
        assert_eq!(
            msg,
            "t.yaml: Pod other/twin: pod IP 10.1.2.2 is also claimed by Pod shop/web-1 (in t.yaml); two live pods cannot share an address, so neither is trusted with it"
        );
        // A finished pod gave its address back: no conflict, and it is not in the mesh.
        let done = twin.replace("Running", "Succeeded");
        let s = snapshot(&format!("{BASE}{done}")).unwrap();
        assert_eq!(
            s.pod_by_ip("10.1.2.2".parse().unwrap()).unwrap().name,
            "web-1"
        );
        assert!(s.local_pods("n1").all(|p| p.name != "twin"));
    }

    #[test]
    fn workloads_are_named_by_their_owner() {
        let owned = |kind: &str, name: &str| {
            let yaml = format!(
                "kind: Pod\nmetadata: {{name: p, namespace: shop, labels: {{app: label}}, ownerReferences: [{{kind: {kind}, name: {name}}}]}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.1.1.2}}\n"
            );
            let s = snapshot(&yaml).unwrap();
            let w = s.pod_by_ip("10.1.1.2".parse().unwrap()).unwrap().clone();
            (w.workload.clone(), w.kind)
        };
        assert_eq!(
            owned("ReplicaSet", "web-5d8f7c9b4"),
            ("web".into(), Some("deployment"))
        );
        assert_eq!(
            owned("ReplicaSet", "web"),
            ("web".into(), Some("replicaset"))
        );
        assert_eq!(
            owned("StatefulSet", "db"),
            ("db".into(), Some("statefulset"))
        );
        assert_eq!(
            owned("DaemonSet", "agent"),
            ("agent".into(), Some("daemonset"))
        );
        // Unknown owners: the label.
        assert_eq!(owned("Custom", "x"), ("label".into(), None));
    }

    #[test]
    fn declared_protocols_and_opaque_ports() {
        let yaml = format!(
            "{BASE}---\nkind: Service\nmetadata: {{name: db, namespace: shop, annotations: {{config.linkerd.io/opaque-ports: \"5000\"}}}}\nspec:\n  clusterIP: 10.96.0.11\n  selector: {{app: web}}\n  ports: [{{name: http, port: 5000}}, {{name: grpc-api, port: 9000}}, {{port: 81, appProtocol: kubernetes.io/h2c}}]\n"
        );
        let s = snapshot(&yaml).unwrap();
        let declared = |addr: &str| match s.resolve(addr.parse().unwrap()) {
            Destination::Service(svc) => svc.declared,
            _ => panic!("{addr} is not a service"),
        };
        // The annotation wins over the port's name.
        assert_eq!(declared("10.96.0.11:5000"), Some(Declared::Opaque));
        assert_eq!(declared("10.96.0.11:9000"), Some(Declared::Http2));
        assert_eq!(declared("10.96.0.11:81"), Some(Declared::Http2));
        assert_eq!(declared("10.96.0.10:80"), Some(Declared::Http));
        assert!(s.service_named("db.shop.svc.cluster.local:9000").is_some());
        // Pods: Linkerd's defaults unless annotated.
        let web = s.pod_by_ip("10.1.2.2".parse().unwrap()).unwrap();
        assert!(web.opaque_ports.contains(3306) && !web.opaque_ports.contains(8080));

        let bad = format!(
            "{BASE}---\nkind: Namespace\nmetadata: {{name: shop, annotations: {{config.linkerd.io/opaque-ports: \"99999\"}}}}\n"
        );
        assert_eq!(
            snapshot(&bad).unwrap_err().to_string(),
            "t.yaml: Namespace shop: field metadata.annotations[\"config.linkerd.io/opaque-ports\"]: \"99999\" is not a port (1-65535) or a range lo-hi"
        );
    }

    #[test]
    fn fail_closed_comes_from_the_pod_else_its_namespace() {
        let pod = |name: &str, ip: &str, annotation: &str| {
            format!("---\nkind: Pod\nmetadata: {{name: {name}, namespace: locked{annotation}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: {ip}}}\n")
        };
        let yaml = format!(
            "---\nkind: Namespace\nmetadata: {{name: locked, annotations: {{mesh-agent.io/fail-closed: \"true\"}}}}\n{}{}",
            pod("a", "10.1.1.7", ""),
            pod("b", "10.1.1.8", ", annotations: {mesh-agent.io/fail-closed: \"false\"}"),
        );
        let s = snapshot(&yaml).unwrap();
        let fail_closed = |ip: &str| s.pod_by_ip(ip.parse().unwrap()).unwrap().fail_closed;
        assert!(fail_closed("10.1.1.7"), "from its namespace");
        assert!(!fail_closed("10.1.1.8"), "its own annotation wins");
        let base = snapshot(BASE).unwrap();
        let web = base.pod_by_ip("10.1.2.2".parse().unwrap()).unwrap();
        assert!(!web.fail_closed, "fail open by default");

        let bad = "---\nkind: Namespace\nmetadata: {name: shop, annotations: {mesh-agent.io/fail-closed: \"yes\"}}\n";
        assert_eq!(
            snapshot(bad).unwrap_err().to_string(),
            "t.yaml: Namespace shop: field metadata.annotations[\"mesh-agent.io/fail-closed\"]: \"yes\" is neither \"true\" nor \"false\""
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let yaml = format!("{BASE}---\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n");
        let msg = snapshot(&yaml).unwrap_err().to_string();
        assert_eq!(
            msg,
            "t.yaml: Service shop/web: duplicate object: also defined in t.yaml"
        );
    }
}
