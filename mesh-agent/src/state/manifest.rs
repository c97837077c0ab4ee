//! The Kubernetes object shapes mesh-agent reads from YAML, and their validation.
//!
//! Only the fields we use are declared; everything else a real manifest carries is ignored.
//! Each object is parsed through `serde_path_to_error`, so a bad value is reported with the
//! path of the field that holds it (`spec.ports[0].port`).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::{de::DeserializeOwned, Deserialize};

/// A manifest that could not be accepted, located by file, object and field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {object}: {problem}")]
pub struct ManifestError {
    pub file: String,
    /// `Kind namespace/name`, or the document number when the object has no name yet.
    pub object: String,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read the file: {0}")]
    Read(#[source] std::io::Error),
    #[error("not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    #[error("field {field}: {message}")]
    Field { field: String, message: String },
    #[error("duplicate object: also defined in {0}")]
    Duplicate(String),
    #[error("the file is {size} bytes, over the limit of {limit} (--max-manifest-bytes); split it into several files")]
    TooLarge { size: u64, limit: u64 },
    #[error("pod IP {ip} is also claimed by Pod {other} (in {other_file}); two live pods cannot share an address, so neither is trusted with it")]
    DuplicatePodIp {
        ip: IpAddr,
        other: String,
        other_file: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

/// Who owns an object (a Pod's ReplicaSet, StatefulSet, DaemonSet, Job).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// Labels or annotations: a few pairs per object, kept as a flat list (a `BTreeMap` node costs
/// half a kilobyte even for two entries, which at cluster scale is most of the parsed state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_unit<E>(self) -> Result<Labels, E> {
                Ok(Labels::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                // (YAML with a repeated key is already refused by the parser.)
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                pairs.shrink_to_fit();
                Ok(Labels(pairs))
            }
        }
        d.deserialize_any(Pairs)
    }
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    /// The node's address: where its agent's HBONE port is.
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<IpAddr>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown` (absent in hand-written
    /// manifests).
    #[serde(default)]
    pub phase: Option<String>,
    /// Every address of a dual-stack pod (`podIP` is the first).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: IpAddr,
}

impl PodStatus {
    /// Whether the pod has finished for good (`Succeeded` or `Failed`): its address is free
    /// for another pod, and nothing of it is captured.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.pod_ip
            .into_iter()
            .chain(self.pod_ips.iter().map(|p| p.ip))
    }

    /// The pod's IPv4 address.
    pub fn pod_ip4(&self) -> Option<Ipv4Addr> {
        self.ips().find_map(|ip| match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
    }

    /// The pod's IPv6 address, on a dual-stack (or IPv6) cluster.
    pub fn pod_ip6(&self) -> Option<Ipv6Addr> {
        self.ips().find_map(|ip| match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// An IP address, `None` (headless) or absent.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Every cluster IP of a dual-stack Service (`clusterIP` is the first).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointConditions {
    /// Absent means ready (Kubernetes semantics).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

/// One object of a kind we understand.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

/// An object read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub file: String,
    pub object: Object,
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<HeadMeta>,
}

#[derive(Deserialize)]
struct HeadMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses every YAML document of one file. Objects of kinds we do not use are skipped.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Located>, ManifestError> {
    let file = path.display().to_string();
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |object: String, problem| ManifestError {
            file: file.clone(),
            object,
            problem,
        };
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| fail(format!("document {}", index + 1), Problem::Yaml(e)))?;
        if value.is_null() {
            continue;
        }
        let head = Head::deserialize(&value)
            .map_err(|e| fail(format!("document {}", index + 1), Problem::Yaml(e)))?;
        let kind = head.kind.unwrap_or_default();
        let object = ObjectName {
            kind: &kind,
            namespace: head.metadata.as_ref().and_then(|m| m.namespace.as_deref()),
            name: head.metadata.as_ref().and_then(|m| m.name.as_deref()),
            index,
        }
        .to_string();
        let parsed = match kind.as_str() {
            "Namespace" => typed(value).map(Object::Namespace),
            "Pod" => typed(value).and_then(validate_pod).map(Object::Pod),
            "Service" => typed(value).and_then(validate_service).map(Object::Service),
            "EndpointSlice" => typed(value)
                .and_then(validate_slice)
                .map(Object::EndpointSlice),
            "" => Err(Problem::Field {
                field: "kind".to_owned(),
                message: "missing".to_owned(),
            }),
            _ => continue,
        };
        out.push(Located {
            file: file.clone(),
            object: parsed.map_err(|p| fail(object, p))?,
        });
    }
    Ok(out)
}

struct ObjectName<'a> {
    kind: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    index: usize,
}

impl fmt::Display for ObjectName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            self.kind
        };
        match self.name {
            Some(name) => write!(f, "{kind} {}/{name}", self.namespace.unwrap_or("default")),
            None => write!(f, "{kind} (document {})", self.index + 1),
        }
    }
}

fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| Problem::Field {
        field: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

fn field(field: &str, message: impl Into<String>) -> Problem {
    Problem::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn validate_name(meta: &ObjectMeta) -> Result<(), Problem> {
    if meta.name.is_empty() {
        return Err(field("metadata.name", "must not be empty"));
    }
    Ok(())
}

fn validate_pod(pod: Pod) -> Result<Pod, Problem> {
    validate_name(&pod.metadata)?;
    Ok(pod)
}

fn validate_service(svc: Service) -> Result<Service, Problem> {
    validate_name(&svc.metadata)?;
    let ips = svc
        .spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip));
    let more = svc
        .spec
        .cluster_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip));
    for (path, ip) in ips.chain(more) {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return Err(field(
                &path,
                format!("{ip:?} is neither an IP address nor \"None\""),
            ));
        }
    }
    for (i, port) in svc.spec.ports.iter().enumerate() {
        if port.port == 0 {
            return Err(field(&format!("spec.ports[{i}].port"), "must be 1-65535"));
        }
        if port.target_port == Some(IntOrString::Int(0)) {
            return Err(field(
                &format!("spec.ports[{i}].targetPort"),
                "must be 1-65535",
            ));
        }
    }
    Ok(svc)
}

fn validate_slice(slice: EndpointSlice) -> Result<EndpointSlice, Problem> {
    validate_name(&slice.metadata)?;
    if !slice
        .metadata
        .labels
        .contains_key("kubernetes.io/service-name")
    {
        return Err(field(
            "metadata.labels",
            "missing \"kubernetes.io/service-name\" (which Service this slice belongs to)",
        ));
    }
    let family_ok = |addr: &str| match slice.address_type.as_str() {
        "IPv4" => Some(addr.parse::<Ipv4Addr>().is_ok()),
        "IPv6" => Some(addr.parse::<Ipv6Addr>().is_ok()),
        _ => None,
    };
    for (i, ep) in slice.endpoints.iter().enumerate() {
        for (j, addr) in ep.addresses.iter().enumerate() {
            if family_ok(addr) == Some(false) {
                return Err(field(
                    &format!("endpoints[{i}].addresses[{j}]"),
                    format!("{addr:?} is not an {} address", slice.address_type),
                ));
            }
        }
    }
    Ok(slice)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn reports_file_object_and_field() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 99999\n";
        let err = parse_file(Path::new("svc.yaml"), yaml).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("svc.yaml: Service shop/web: field spec.ports[0].port:"),
            "{msg}"
        );
    }

    #[test]
    fn bad_cluster_ip_is_named() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: ten}\n";
        let msg = parse_file(Path::new("s.yaml"), yaml)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "s.yaml: Service default/web: field spec.clusterIP: \"ten\" is neither an IP address nor \"None\""
        );
    }

    #[test]
    fn bad_pod_ip_is_named() {
        let yaml = "kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.300}\n";
        let msg = parse_file(Path::new("p.yaml"), yaml)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("p.yaml: Pod default/a: field status.podIP:"),
            "{msg}"
        );
    }

    #[test]
    fn multi_document_and_unknown_kinds() {
        let yaml = "kind: Namespace\nmetadata: {name: shop}\n---\nkind: HTTPRoute\nmetadata: {name: r}\n---\n";
        let objs = parse_file(Path::new("x.yaml"), yaml).unwrap();
        assert_eq!(objs.len(), 1);
        assert!(matches!(objs[0].object, Object::Namespace(_)));
    }

    #[test]
    fn target_port_by_name_or_number() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - {port: 80, targetPort: http}\n  - {port: 81, targetPort: 8081}\n";
        let objs = parse_file(Path::new("x.yaml"), yaml).unwrap();
        let Object::Service(svc) = &objs[0].object else {
            panic!()
        };
        assert_eq!(
            svc.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(svc.spec.ports[1].target_port, Some(IntOrString::Int(8081)));
    }
}
