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

use serde::{de::DeserializeSeed as _, Deserialize};

use super::ports::{PortSet, OPAQUE_PORTS_ANNOTATION};

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
    #[error("cluster IP {ip} is also claimed by Service {other} (in {other_file}); a cluster IP belongs to one Service")]
    DuplicateClusterIp {
        ip: IpAddr,
        other: String,
        other_file: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// Labels or annotations: a few pairs per object, kept as a flat list (a `BTreeMap` node costs
/// half a kilobyte even for two entries, which at cluster scale is most of the parsed state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
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

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Hash, Deserialize)]
pub struct EndpointConditions {
    /// Absent means ready (Kubernetes semantics).
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Hash, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Hash)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

/// The kinds of [`Object`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
}

impl Kind {
    fn from_name(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// What names one object in the cluster: its kind, namespace (empty for a Namespace) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Namespace => write!(f, "Namespace {}", self.name),
            kind => write!(f, "{} {}/{}", kind.name(), self.namespace, self.name),
        }
    }
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectKey {
            kind,
            namespace: match kind {
                Kind::Namespace => "".into(),
                _ => meta.namespace().into(),
            },
            name: meta.name.as_str().into(),
        }
    }
}

/// Parses every YAML document of one file straight into typed objects (no intermediate tree
/// per document: at cluster scale that tree was most of the parsing time and memory). Objects
/// of kinds we do not use are skipped.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut seen = Seen::default();
        let mut track = serde_path_to_error::Track::new();
        let parsed = Document(&mut seen)
            .deserialize(serde_path_to_error::Deserializer::new(doc, &mut track))
            .map_err(|e| {
                let path = track.path().to_string();
                match seen.field.take() {
                    Some((field, message)) => Problem::Field { field, message },
                    None if path == "." || seen.kind.is_none() => Problem::Yaml(e),
                    None => Problem::Field {
                        field: path,
                        message: e.to_string(),
                    },
                }
            })
            .and_then(|object| object.map(validate).transpose());
        let object = ObjectName {
            kind: seen.kind.as_deref().unwrap_or(""),
            namespace: seen.namespace.as_deref(),
            name: seen.name.as_deref(),
            index,
        };
        match parsed {
            Ok(Some(o)) => out.push(o),
            Ok(None) => {}
            Err(problem) => {
                return Err(ManifestError {
                    file: path.display().to_string(),
                    object: object.to_string(),
                    problem,
                })
            }
        }
    }
    Ok(out)
}

/// What is known of a document while it is parsed, to name it in an error.
#[derive(Default)]
struct Seen {
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    /// A field whose error the path tracker cannot locate (see [`Document::visit_map`]).
    field: Option<(String, String)>,
}

/// One YAML document, read in one pass: `Ok(None)` for an empty document or a kind we skip.
struct Document<'a>(&'a mut Seen);

/// The fields of an object, gathered as they come.
#[derive(Default)]
struct Parts {
    metadata: Option<ObjectMeta>,
    pod_spec: Option<PodSpec>,
    pod_status: Option<PodStatus>,
    service_spec: Option<ServiceSpec>,
    address_type: Option<String>,
    endpoints: Option<Vec<Endpoint>>,
    endpoint_ports: Option<Vec<EndpointPort>>,
}

/// Where a field's value is read from: the map being parsed, or a value kept aside.
trait FieldValue<'de> {
    type Error: serde::de::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, Self::Error>;
}

impl<'de, A: serde::de::MapAccess<'de>> FieldValue<'de> for &mut A {
    type Error = A::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, A::Error> {
        self.next_value()
    }
}

impl<'de, D: serde::Deserializer<'de>> FieldValue<'de> for Aside<D> {
    type Error = D::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, D::Error> {
        T::deserialize(self.0)
    }
}

/// A value that came before `kind`, as a deserializer.
struct Aside<D>(D);

impl Parts {
    /// Reads the value of `key` for an object of `kind`; `Ok(false)` when this kind does not
    /// use the key (and the value is left unread).
    fn read<'de, V: FieldValue<'de>>(
        &mut self,
        kind: Kind,
        key: &str,
        value: V,
    ) -> Result<bool, V::Error> {
        fn put<'de, T: Deserialize<'de>, V: FieldValue<'de>>(
            slot: &mut Option<T>,
            value: V,
        ) -> Result<bool, V::Error> {
            *slot = Some(value.read()?);
            Ok(true)
        }
        match (kind, key) {
            (_, "metadata") => put(&mut self.metadata, value),
            (Kind::Pod, "spec") => put(&mut self.pod_spec, value),
            (Kind::Pod, "status") => put(&mut self.pod_status, value),
            (Kind::Service, "spec") => put(&mut self.service_spec, value),
            (Kind::EndpointSlice, "addressType") => put(&mut self.address_type, value),
            (Kind::EndpointSlice, "endpoints") => put(&mut self.endpoints, value),
            (Kind::EndpointSlice, "ports") => put(&mut self.endpoint_ports, value),
            _ => Ok(false),
        }
    }

    fn object(self, kind: Kind) -> Result<Object, Problem> {
        let metadata = self.metadata.ok_or_else(|| field("metadata", "missing"))?;
        Ok(match kind {
            Kind::Namespace => Object::Namespace(Namespace { metadata }),
            Kind::Pod => Object::Pod(Pod {
                metadata,
                spec: self.pod_spec.unwrap_or_default(),
                status: self.pod_status.unwrap_or_default(),
            }),
            Kind::Service => Object::Service(Service {
                metadata,
                spec: self.service_spec.unwrap_or_default(),
            }),
            Kind::EndpointSlice => Object::EndpointSlice(EndpointSlice {
                metadata,
                address_type: self
                    .address_type
                    .ok_or_else(|| field("addressType", "missing"))?,
                endpoints: self.endpoints.unwrap_or_default(),
                ports: self.endpoint_ports.unwrap_or_default(),
            }),
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Document<'_> {
    type Value = Option<Object>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Document<'_> {
    type Value = Option<Object>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object (a map with kind and metadata)")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    /// `kind` usually comes first, so every field is read straight into its type. Fields that
    /// come before `kind` are kept as YAML values and converted once the kind is known.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::{Error, IgnoredAny};
        let seen = self.0;
        let mut kind: Option<Option<Kind>> = None;
        let mut parts = Parts::default();
        let mut early: Vec<(String, serde_yaml::Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match (key.as_str(), kind) {
                ("kind", None) => {
                    let name: String = map.next_value()?;
                    kind = Some(Kind::from_name(&name));
                    seen.kind = Some(name);
                }
                ("kind", Some(_)) => return Err(A::Error::duplicate_field("kind")),
                // A kind we skip: nothing more to read.
                (_, Some(None)) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (_, Some(Some(k))) => {
                    if !parts.read(k, &key, &mut map)? {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                ("metadata" | "spec" | "status" | "addressType" | "endpoints" | "ports", None) => {
                    early.push((key, map.next_value()?));
                }
                (_, None) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if let Some(meta) = parts.metadata.as_ref().filter(|_| seen.name.is_none()) {
                seen.name = Some(meta.name.clone());
                seen.namespace = meta.namespace.clone();
            }
        }
        let kind = match kind {
            None => {
                seen.field = Some(("kind".to_owned(), "missing".to_owned()));
                return Err(A::Error::custom("kind is missing"));
            }
            Some(None) => return Ok(None),
            Some(Some(kind)) => kind,
        };
        for (key, value) in early {
            let mut track = serde_path_to_error::Track::new();
            let read = parts.read(
                kind,
                &key,
                Aside(serde_path_to_error::Deserializer::new(value, &mut track)),
            );
            if let Err(e) = read {
                let path = match track.path().to_string().as_str() {
                    "." => key,
                    inner => format!("{key}.{inner}"),
                };
                seen.field = Some((path, e.to_string()));
                return Err(A::Error::custom(e));
            }
            if let Some(meta) = parts.metadata.as_ref().filter(|_| seen.name.is_none()) {
                seen.name = Some(meta.name.clone());
                seen.namespace = meta.namespace.clone();
            }
        }
        match parts.object(kind) {
            Ok(object) => Ok(Some(object)),
            Err(Problem::Field { field, message }) => {
                seen.field = Some((field, message.clone()));
                Err(A::Error::custom(message))
            }
            Err(other) => Err(A::Error::custom(other)),
        }
    }
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
            Some(name) if kind == "Namespace" => write!(f, "{kind} {name}"),
            Some(name) => write!(f, "{kind} {}/{name}", self.namespace.unwrap_or("default")),
            None => write!(f, "{kind} (document {})", self.index + 1),
        }
    }
}

fn field(field: &str, message: impl Into<String>) -> Problem {
    Problem::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Checks what one object alone can get wrong.
fn validate(object: Object) -> Result<Object, Problem> {
    let meta = object.metadata();
    if meta.name.is_empty() {
        return Err(field("metadata.name", "must not be empty"));
    }
    if let Some(value) = meta.annotations.get(OPAQUE_PORTS_ANNOTATION) {
        PortSet::parse(value).map_err(|message| {
            field(
                &format!("metadata.annotations[\"{OPAQUE_PORTS_ANNOTATION}\"]"),
                message,
            )
        })?;
    }
    Ok(match object {
        Object::Namespace(_) | Object::Pod(_) => object,
        Object::Service(o) => Object::Service(validate_service(o)?),
        Object::EndpointSlice(o) => Object::EndpointSlice(validate_slice(o)?),
    })
}

fn validate_service(svc: Service) -> Result<Service, Problem> {
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
        assert!(matches!(objs[0], Object::Namespace(_)));
    }

    #[test]
    fn target_port_by_name_or_number() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - {port: 80, targetPort: http}\n  - {port: 81, targetPort: 8081}\n";
        let objs = parse_file(Path::new("x.yaml"), yaml).unwrap();
        let Object::Service(svc) = &objs[0] else {
            panic!()
        };
        assert_eq!(
            svc.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(svc.spec.ports[1].target_port, Some(IntOrString::Int(8081)));
    }
}
