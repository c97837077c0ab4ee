//! The desired state of the cluster as one typed, immutable snapshot.
//!
//! Sources (a manifest directory today, the Kubernetes API later) build a [`Snapshot`] and
//! publish it on a `watch` channel; the proxy and the reconcilers only read it. A connection
//! keeps the snapshot it started with.

pub mod manifest;
pub mod ports;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use manifest::{IntOrString, Located, ManifestError, Object, Problem};
use ports::{Declared, PortSet, OPAQUE_PORTS_ANNOTATION};

use crate::balance::EndpointLoad;

/// Annotation (on a Pod or its Namespace) that takes pods in or out of the mesh.
pub const INJECT_ANNOTATION: &str = "mesh-agent.io/inject";
/// Linkerd's equivalent, honoured so existing manifests keep their meaning.
pub const LINKERD_INJECT_ANNOTATION: &str = "linkerd.io/inject";

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
}

/// A Service port with its ready endpoints.
#[derive(Debug)]
pub struct ServiceTarget {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    /// The load of each endpoint (same order), for per-request balancing.
    pub loads: Box<[Arc<EndpointLoad>]>,
    /// The protocol the port declares (`appProtocol`, Istio port name, or the Service's
    /// opaque-ports annotation).
    pub declared: Option<Declared>,
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
}

impl ServiceTarget {
    /// `name.namespace.svc.cluster.local`, as Istio labels metrics.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The endpoint for the next request, and its load (see [`crate::balance`]).
    pub fn pick_for_request(&self) -> Option<(SocketAddr, &Arc<EndpointLoad>)> {
        let i = crate::balance::pick(&self.loads)?;
        Some((*self.endpoints.get(i)?, self.loads.get(i)?))
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

#[derive(Debug, Default)]
pub struct Snapshot {
    pods: Vec<Arc<Workload>>,
    pods_by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<SocketAddr, Arc<ServiceTarget>>,
    /// The same, by `name.namespace.svc.cluster.local:port`.
    services_by_name: HashMap<String, Arc<ServiceTarget>>,
    /// Which snapshot this is, counting from 1 for the first one a source published.
    pub version: u64,
    /// When the source published it.
    pub applied_at: Option<std::time::SystemTime>,
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
}

impl Snapshot {
    /// Builds a snapshot from parsed objects, checking what only shows across objects.
    pub fn build(objects: Vec<Located>) -> Result<Self, ManifestError> {
        let mut seen: HashMap<(&'static str, String, String), String> = HashMap::new();
        let mut namespaces = HashMap::new();
        let mut pods = Vec::new();
        let mut pod_ips: HashMap<IpAddr, (String, String)> = HashMap::new();
        let mut services = Vec::new();
        let mut slices: HashMap<(String, String), Vec<manifest::EndpointSlice>> = HashMap::new();
        for Located { file, object } in objects {
            let (kind, meta) = match &object {
                Object::Namespace(o) => ("Namespace", &o.metadata),
                Object::Pod(o) => ("Pod", &o.metadata),
                Object::Service(o) => ("Service", &o.metadata),
                Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            };
            let ns = if kind == "Namespace" {
                ""
            } else {
                meta.namespace()
            };
            let key = (kind, ns.to_owned(), meta.name.clone());
            if let Some(first) = seen.get(&key) {
                return Err(ManifestError {
                    file,
                    object: format!("{kind} {ns}/{}", meta.name),
                    problem: Problem::Duplicate(first.clone()),
                });
            }
            seen.insert(key, file.clone());
            match object {
                Object::Namespace(o) => {
                    namespaces.insert(o.metadata.name.clone(), o.metadata);
                }
                Object::Pod(o) => {
                    // Only live pods hold an address; a finished pod's IP may be reused.
                    let live = !o.spec.host_network && !o.status.is_terminal();
                    let ips = [
                        o.status.pod_ip4().map(IpAddr::V4),
                        o.status.pod_ip6().map(IpAddr::V6),
                    ];
                    for ip in ips.into_iter().flatten().filter(|_| live) {
                        let this = format!("{}/{}", o.metadata.namespace(), o.metadata.name);
                        if let Some((other, other_file)) = pod_ips.get(&ip) {
                            return Err(ManifestError {
                                file,
                                object: format!("Pod {this}"),
                                problem: Problem::DuplicatePodIp {
                                    ip,
                                    other: other.clone(),
                                    other_file: other_file.clone(),
                                },
                            });
                        }
                        pod_ips.insert(ip, (this, file.clone()));
                    }
                    pods.push(o)
                }
                Object::Service(o) => services.push(o),
                Object::EndpointSlice(o) => {
                    let svc = o
                        .metadata
                        .labels
                        .get("kubernetes.io/service-name")
                        .cloned()
                        .unwrap_or_default();
                    slices
                        .entry((o.metadata.namespace().to_owned(), svc))
                        .or_default()
                        .push(o);
                }
            }
        }

        let mut snapshot = Snapshot::default();
        let defaults = Arc::new(PortSet::defaults());
        let mut ns_opaque: HashMap<&str, Arc<PortSet>> = HashMap::new();
        for ns in namespaces.values() {
            if let Some(set) = opaque_ports(&ns.annotations)
                .map_err(|e| located(&seen, "Namespace", "", &ns.name, e))?
            {
                ns_opaque.insert(&ns.name, Arc::new(set));
            }
        }
        for pod in pods.iter().filter(|p| !p.status.is_terminal()) {
            let meta = &pod.metadata;
            let ns_meta = namespaces.get(meta.namespace());
            let (workload, kind) = match owner_workload(&meta.owner_references) {
                Some((name, kind)) => (name, Some(kind)),
                None => (
                    workload_name(&meta.labels).unwrap_or(&meta.name).to_owned(),
                    None,
                ),
            };
            let opaque_ports = match opaque_ports(&meta.annotations)
                .map_err(|e| located(&seen, "Pod", meta.namespace(), &meta.name, e))?
            {
                Some(set) => Arc::new(set),
                None => ns_opaque.get(meta.namespace()).unwrap_or(&defaults).clone(),
            };
            let enrolled = !pod.spec.host_network
                && inject_setting(&meta.annotations)
                    .or_else(|| ns_meta.and_then(|n| inject_setting(&n.annotations)))
                    .unwrap_or(true);
            let workload = Arc::new(Workload {
                namespace: meta.namespace().to_owned(),
                name: meta.name.clone(),
                workload,
                kind,
                opaque_ports,
                service_account: pod
                    .spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                node: pod.spec.node_name.clone(),
                ip: pod.status.pod_ip4().filter(|_| !pod.spec.host_network),
                ip6: pod.status.pod_ip6().filter(|_| !pod.spec.host_network),
                node_ip: match pod.status.host_ip {
                    Some(IpAddr::V4(ip)) => Some(ip),
                    _ => None,
                },
                enrolled,
            });
            let ips = [workload.ip.map(IpAddr::V4), workload.ip6.map(IpAddr::V6)];
            for ip in ips.into_iter().flatten() {
                snapshot.pods_by_ip.insert(ip, workload.clone());
            }
            snapshot.pods.push(workload);
        }

        for svc in &services {
            // Every cluster IP of the Service (both families on a dual-stack cluster), each
            // with the endpoints of its own family.
            let mut cluster_ips: Vec<IpAddr> = svc
                .spec
                .cluster_ip
                .iter()
                .chain(svc.spec.cluster_ips.iter())
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .collect();
            cluster_ips.dedup();
            let ns = svc.metadata.namespace();
            let svc_opaque = opaque_ports(&svc.metadata.annotations)
                .map_err(|e| located(&seen, "Service", ns, &svc.metadata.name, e))?;
            let own_slices = slices.get(&(ns.to_owned(), svc.metadata.name.clone()));
            for cluster_ip in cluster_ips {
                for port in svc.spec.ports.iter().filter(|p| p.protocol == "TCP") {
                    let endpoints = match own_slices {
                        Some(slices) => {
                            slice_endpoints(slices, port.name.as_deref(), cluster_ip.is_ipv6())
                        }
                        None => selected_endpoints(
                            &pods,
                            ns,
                            svc.spec.selector.as_ref(),
                            port,
                            cluster_ip.is_ipv6(),
                        ),
                    };
                    let declared = match &svc_opaque {
                        Some(set) if set.contains(port.port) => Some(Declared::Opaque),
                        _ => ports::declared(port.app_protocol.as_deref(), port.name.as_deref()),
                    };
                    let target = Arc::new(ServiceTarget {
                        namespace: ns.to_owned(),
                        name: svc.metadata.name.clone(),
                        port: port.port,
                        loads: endpoints.iter().map(|_| Arc::default()).collect(),
                        endpoints,
                        declared,
                        next: AtomicUsize::new(0),
                    });
                    snapshot
                        .services_by_name
                        .entry(format!("{}:{}", target.fqdn(), target.port))
                        .or_insert_with(|| target.clone());
                    snapshot
                        .services
                        .insert(SocketAddr::new(cluster_ip, port.port), target);
                }
            }
        }
        Ok(snapshot)
    }

    pub fn summary(&self) -> StateSummary {
        StateSummary {
            version: self.version,
            applied_at_unix_ms: self
                .applied_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis()),
            pods: self.pods.len(),
            service_ports: self.services.len(),
            endpoints: self.services.values().map(|s| s.endpoints.len()).sum(),
        }
    }

    /// The (namespace, workload) of every pod of the snapshot.
    pub fn workloads(&self) -> std::collections::HashSet<(&str, &str)> {
        self.pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.workload.as_str()))
            .collect()
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.pods_by_ip.get(&ip)
    }

    /// Enrolled pods with an address, scheduled on `node`.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.pods.iter().filter(move |p| p.is_enrolled_on(node))
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

fn inject_setting(annotations: &manifest::Labels) -> Option<bool> {
    [INJECT_ANNOTATION, LINKERD_INJECT_ANNOTATION]
        .iter()
        .find_map(|k| annotations.get(k))
        .map(|v| v != "disabled")
}

/// The opaque-ports annotation of an object, validated.
fn opaque_ports(annotations: &manifest::Labels) -> Result<Option<PortSet>, Problem> {
    annotations
        .get(OPAQUE_PORTS_ANNOTATION)
        .map(|v| PortSet::parse(v))
        .transpose()
        .map_err(|message| Problem::Field {
            field: format!("metadata.annotations[\"{OPAQUE_PORTS_ANNOTATION}\"]"),
            message,
        })
}

/// A [`ManifestError`] for an object found in `files`.
fn located(
    files: &HashMap<(&'static str, String, String), String>,
    kind: &'static str,
    namespace: &str,
    name: &str,
    problem: Problem,
) -> ManifestError {
    let key = (kind, namespace.to_owned(), name.to_owned());
    let object = match namespace {
        "" => format!("{kind} {name}"),
        ns => format!("{kind} {ns}/{name}"),
    };
    ManifestError {
        file: files.get(&key).cloned().unwrap_or_default(),
        object,
        problem,
    }
}

/// The workload a pod's owner names, and its kind: a ReplicaSet stands for the Deployment
/// whose pod-template hash it appends (`web-5d8f7c9b4` → `web`).
fn owner_workload(owners: &[manifest::OwnerReference]) -> Option<(String, &'static str)> {
    let owner = owners.first()?;
    let kind = match owner.kind.as_str() {
        "ReplicaSet" => {
            return Some(match owner.name.rsplit_once('-') {
                Some((deployment, hash))
                    if !deployment.is_empty()
                        && (5..=10).contains(&hash.len())
                        && hash.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    (deployment.to_owned(), "deployment")
                }
                _ => (owner.name.clone(), "replicaset"),
            })
        }
        "StatefulSet" => "statefulset",
        "DaemonSet" => "daemonset",
        "Job" => "job",
        "CronJob" => "cronjob",
        _ => return None,
    };
    Some((owner.name.clone(), kind))
}

fn workload_name(labels: &manifest::Labels) -> Option<&str> {
    labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .map(String::as_str)
}

fn slice_endpoints(
    slices: &[manifest::EndpointSlice],
    port_name: Option<&str>,
    ipv6: bool,
) -> Vec<SocketAddr> {
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| {
                p.protocol == "TCP" && p.name.as_deref().unwrap_or("") == port_name.unwrap_or("")
            })
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false))
        {
            out.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, port)),
            );
        }
    }
    out
}

/// Without an EndpointSlice, the pods the selector picks (a convenience for hand-written
/// manifests; a real cluster always has slices).
fn selected_endpoints(
    pods: &[manifest::Pod],
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    port: &manifest::ServicePort,
    ipv6: bool,
) -> Vec<SocketAddr> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let target = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(p)) => *p,
        // Named ports need the container spec, which we do not read.
        Some(IntOrString::String(_)) => return Vec::new(),
    };
    pods.iter()
        .filter(|p| p.metadata.namespace() == namespace && !p.status.is_terminal())
        .filter(|p| {
            selector
                .iter()
                .all(|(k, v)| p.metadata.labels.get(k) == Some(v))
        })
        .filter_map(|p| match ipv6 {
            true => p.status.pod_ip6().map(IpAddr::V6),
            false => p.status.pod_ip4().map(IpAddr::V4),
        })
        .map(|ip| SocketAddr::new(ip, target))
        .collect()
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::path::Path;

    use super::*;

    fn snapshot(yaml: &str) -> Result<Snapshot, ManifestError> {
        Snapshot::build(manifest::parse_file(Path::new("t.yaml"), yaml)?)
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
    fn duplicates_are_rejected() {
        let yaml = format!("{BASE}---\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n");
        let msg = snapshot(&yaml).unwrap_err().to_string();
        assert_eq!(
            msg,
            "t.yaml: Service shop/web: duplicate object: also defined in t.yaml"
        );
    }
}
