//! A Kubernetes API server double that speaks the real list/watch protocol over HTTP/1.1:
//! lists with a `resourceVersion`, watches from one as chunked JSON lines (`ADDED`,
//! `MODIFIED`, `DELETED`, `BOOKMARK`), field selectors with the API server's semantics (an
//! object that stops matching is sent as `DELETED`, one that starts as `ADDED`), `410 Gone`
//! for a resourceVersion older than the last compaction, `404` for a kind not installed.
//! Tests change its objects directly and inject faults: a slow list, dropped watch
//! connections, compaction.
//!
//! Objects are JSON in the shape the API server returns them (list items without `kind` and
//! `apiVersion`, as a real list has them).

use std::{
    collections::{BTreeMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::{Bytes, Frame},
    Request, Response, StatusCode,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A resource the double serves: (group, version, plural, kind, namespaced).
type ResourceDef = (&'static str, &'static str, &'static str, &'static str, bool);

/// Every resource mesh-agent reads.
pub const RESOURCES: &[ResourceDef] = &[
    ("", "v1", "namespaces", "Namespace", false),
    ("", "v1", "pods", "Pod", true),
    ("", "v1", "services", "Service", true),
    ("", "v1", "configmaps", "ConfigMap", true),
    ("", "v1", "secrets", "Secret", true),
    (
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    (
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        true,
    ),
    (
        "gateway.networking.k8s.io",
        "v1",
        "grpcroutes",
        "GRPCRoute",
        true,
    ),
    (
        "networking.istio.io",
        "v1",
        "virtualservices",
        "VirtualService",
        true,
    ),
    (
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
        true,
    ),
    ("policy.linkerd.io", "v1beta3", "servers", "Server", true),
    (
        "policy.linkerd.io",
        "v1alpha1",
        "meshtlsauthentications",
        "MeshTLSAuthentication",
        true,
    ),
    (
        "policy.linkerd.io",
        "v1alpha1",
        "networkauthentications",
        "NetworkAuthentication",
        true,
    ),
    (
        "policy.linkerd.io",
        "v1alpha1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
    ),
    (
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
    ),
    (
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        true,
    ),
];

/// A resource by group and plural ("" for the core group).
type ResourceKey = (String, String);

/// (resource, namespace, name).
type ObjectId = (ResourceKey, String, String);

struct Change {
    rv: u64,
    resource: ResourceKey,
    old: Option<Value>,
    new: Option<Value>,
}

struct Watcher {
    resource: ResourceKey,
    namespace: Option<String>,
    selector: Vec<Term>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<ObjectId, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    watchers: Vec<Watcher>,
    /// Resources answered with 404 (their CRD "not installed").
    absent: HashSet<ResourceKey>,
    /// Delays of list responses, by plural.
    list_delay: BTreeMap<String, Duration>,
    /// List requests served, per resource.
    lists: BTreeMap<ResourceKey, usize>,
    /// Watch requests answered, per resource.
    watches: BTreeMap<ResourceKey, usize>,
    next_uid: u64,
}

/// A running double; stops when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn resource_of(api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    RESOURCES
        .iter()
        .find(|r| r.0 == group && r.1 == version && r.3 == kind)
}

/// The apiVersion and kind of a resource's objects.
fn type_of(resource: &ResourceKey) -> (String, &'static str) {
    let def = RESOURCES
        .iter()
        .find(|d| d.0 == resource.0 && d.2 == resource.1);
    match def {
        Some(("", v, _, k, _)) => (v.to_string(), k),
        Some((g, v, _, k, _)) => (format!("{g}/{v}"), k),
        None => (String::new(), ""),
    }
}

fn key_of(def: &ResourceDef) -> ResourceKey {
    (def.0.to_owned(), def.2.to_owned())
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .try_fold(value, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// One term of a field selector.
#[derive(Clone)]
struct Term {
    path: String,
    value: String,
    equal: bool,
}

fn parse_selector(selector: &str) -> Vec<Term> {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            if let Some((path, value)) = t.split_once("!=") {
                return Some(Term {
                    path: path.to_owned(),
                    value: value.to_owned(),
                    equal: false,
                });
            }
            let (path, value) = t.split_once("==").or_else(|| t.split_once('='))?;
            Some(Term {
                path: path.to_owned(),
                value: value.to_owned(),
                equal: true,
            })
        })
        .collect()
}

fn matches(selector: &[Term], namespace: Option<&str>, object: &Value) -> bool {
    namespace.is_none_or(|ns| text(object, "metadata.namespace") == ns)
        && selector
            .iter()
            .all(|t| (text(object, &t.path) == t.value) == t.equal)
}

/// A ConfigMap as the API server holds it.
pub fn config_map(namespace: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": namespace },
        "data": data,
    })
}

/// A Secret as the API server holds it (its data base64-encoded).
pub fn secret(namespace: &str, name: &str, kind: &str, data: &[(&str, &[u8])]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(base64(v))))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": kind,
        "metadata": { "name": name, "namespace": namespace },
        "data": data,
    })
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = ((n >> (18 - 6 * i)) & 63) as usize;
                out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'=')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| {
            bytes
                .get(j)
                .and_then(|c| (*c as char).to_digit(16))
                .map(|d| d as u8)
        };
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {}, "code": code,
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A watch response's body: the events, as they come.
struct Events(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The event a watcher with `selector` sees for a change from `old` to `new`, if any.
fn event_for(
    selector: &[Term],
    namespace: Option<&str>,
    old: Option<&Value>,
    new: Option<&Value>,
) -> Option<Bytes> {
    let was = old.is_some_and(|o| matches(selector, namespace, o));
    let is = new.is_some_and(|n| matches(selector, namespace, n));
    match (was, is, new) {
        (false, true, Some(n)) => Some(event_line("ADDED", n)),
        (true, true, Some(n)) => Some(event_line("MODIFIED", n)),
        // No longer matching: the state it was seen in, at the new resourceVersion, as
        // DELETED (as the API server's watch cache sends it).
        (true, false, Some(n)) => old.map(|o| {
            let mut last = o.clone();
            last["metadata"]["resourceVersion"] = n["metadata"]["resourceVersion"].clone();
            event_line("DELETED", &last)
        }),
        (true, false, None) => old.map(|o| event_line("DELETED", o)),
        _ => None,
    }
}

impl Inner {
    /// Records a change and sends it to the watchers it concerns.
    fn record(&mut self, resource: ResourceKey, old: Option<Value>, new: Option<Value>) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if w.resource != resource {
                return true;
            }
            match event_for(
                &w.selector,
                w.namespace.as_deref(),
                old.as_ref(),
                new.as_ref(),
            ) {
                Some(line) => w.tx.send(line).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push(Change {
            rv,
            resource,
            old,
            new,
        });
    }

    /// One page of a list: `limit` items (all if 0) from `skip`, and the token of the next
    /// page (`<resourceVersion>/<offset>`: pages show the state as it is when each is asked
    /// for, which a double may).
    fn list(
        &self,
        resource: &ResourceKey,
        namespace: Option<&str>,
        selector: &[Term],
        limit: usize,
        skip: usize,
        pinned: Option<u64>,
    ) -> Value {
        let matching = self
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, o)| o)
            .filter(|o| matches(selector, namespace, o));
        let total = matching.clone().count();
        let limit = if limit == 0 { usize::MAX } else { limit };
        let items: Vec<Value> = matching
            .skip(skip)
            .take(limit)
            .map(|o| {
                let mut item = o.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                item
            })
            .collect();
        let (api_version, kind) = type_of(resource);
        let next = skip.saturating_add(limit);
        // Every page claims the first page's resourceVersion (the client watches from the
        // last page's): a change made while a list is paged is then replayed by the watch.
        let rv = pinned.unwrap_or(self.rv);
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if next < total {
            metadata["continue"] = format!("{rv}/{next}").into();
        }
        json!({
            "apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": metadata,
            "items": items,
        })
    }
}

/// The requests counted for `plural`, whatever its group.
fn of_plural(counts: &BTreeMap<ResourceKey, usize>, plural: &str) -> usize {
    counts
        .iter()
        .filter(|(r, _)| r.1 == plural)
        .map(|(_, n)| n)
        .sum()
}

/// What a request path names: the resource, for a namespaced request the namespace, and for
/// a single object its name.
fn parse_path(path: &str) -> Option<(ResourceKey, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let resource = |plural: &str| (group.to_owned(), plural.to_owned());
    match rest {
        [plural] => Some((resource(plural), None, None)),
        ["namespaces", ns, plural] => Some((resource(plural), Some((*ns).to_owned()), None)),
        ["namespaces", ns, plural, name] => Some((
            resource(plural),
            Some((*ns).to_owned()),
            Some((*name).to_owned()),
        )),
        _ => None,
    }
}

impl ApiServer {
    /// Serves on `listener` (already bound, possibly inside a test's network namespace).
    pub fn start(listener: std::net::TcpListener) -> std::io::Result<ApiServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            rv: 1000,
            ..Inner::default()
        }));
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("apiserver-double".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let stream = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => stream,
                                Err(_) => continue,
                            },
                            _ = &mut stop_rx => return,
                        };
                        let state = state.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(serve(&state, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                })
            })?;
        Ok(ApiServer {
            addr,
            inner,
            _stop: stop_tx,
        })
    }

    /// Serves on a fresh port of 127.0.0.1.
    pub fn on_loopback() -> std::io::Result<ApiServer> {
        Self::start(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kubeconfig that points at this double.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: not-checked\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\ncurrent-context: double\n",
            self.addr
        )
    }

    /// Creates or replaces every object of `yaml` (one or more documents), each as its own
    /// change with its own resourceVersion.
    pub fn apply(&self, yaml: &str) {
        use serde::Deserialize as _;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("test manifests must be valid YAML: {e}"));
            if !value.is_null() {
                self.put(value);
            }
        }
    }

    /// Creates or replaces one object.
    pub fn put(&self, mut object: Value) {
        let def = resource_of(text(&object, "apiVersion"), text(&object, "kind"))
            .unwrap_or_else(|| panic!("the double does not serve {object}"));
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let namespace = match def.4 {
            true => match text(&object, "metadata.namespace") {
                "" => "default".to_owned(),
                ns => ns.to_owned(),
            },
            false => String::new(),
        };
        let id = (
            key_of(def),
            namespace.clone(),
            text(&object, "metadata.name").to_owned(),
        );
        let old = inner.objects.get(&id).cloned();
        // Kept from the version it replaces; on creation, the one a fixture gives, else a new
        // one (as the API server assigns it).
        let uid = match (&old, text(&object, "metadata.uid")) {
            (Some(o), _) => text(o, "metadata.uid").to_owned(),
            (None, "") => {
                inner.next_uid += 1;
                format!("00000000-0000-0000-0000-{:012}", inner.next_uid)
            }
            (None, given) => given.to_owned(),
        };
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), rv.to_string().into());
            meta.insert("uid".into(), uid.into());
            // What a real server adds, and the agent must drop.
            meta.insert(
                "managedFields".into(),
                json!([{ "manager": "kubectl", "operation": "Apply", "fieldsV1": { "f:metadata": {} } }]),
            );
            if def.4 {
                meta.insert("namespace".into(), namespace.into());
            }
        }
        inner.objects.insert(id, object.clone());
        inner.record(key_of(def), old, Some(object));
    }

    /// The object `kind`/`namespace`/`name` (namespace "" for a Namespace), as stored.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.lock();
        inner
            .objects
            .iter()
            .find(|((r, ns, n), _)| r.1 == plural && ns == namespace && n == name)
            .map(|(_, o)| o.clone())
    }

    /// Changes one object with `f` and stores it as a new version.
    pub fn modify(&self, plural: &str, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut object = self
            .get(plural, namespace, name)
            .unwrap_or_else(|| panic!("no {plural} {namespace}/{name} in the double"));
        f(&mut object);
        self.put(object);
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> bool {
        let mut inner = self.lock();
        let id = inner
            .objects
            .keys()
            .find(|(r, ns, n)| r.1 == plural && ns == namespace && n == name)
            .cloned();
        let Some(id) = id else { return false };
        let Some(mut old) = inner.objects.remove(&id) else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        if let Some(meta) = old.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), rv.to_string().into());
        }
        inner.record(id.0, Some(old), None);
        true
    }

    /// A cluster of `pods` pods (one in fifty on `node`, the rest on fifty other nodes),
    /// `services` Services each with one EndpointSlice, `endpoints` ready endpoints spread
    /// over them, in twenty namespaces: for measuring what a large cluster costs the agent.
    pub fn generate(&self, node: &str, pods: usize, services: usize, endpoints: usize) {
        let namespaces = 20;
        for n in 0..namespaces {
            self.put(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("ns-{n}"), "annotations": {"mesh-agent.io/inject": "enabled"}}}));
        }
        let ip = |i: usize| format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
        for i in 0..pods {
            let on = match i % 50 {
                0 => node.to_owned(),
                k => format!("other-node-{k}"),
            };
            self.put(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % namespaces),
                    "uid": format!("00000000-0000-0000-0001-{i:012}"),
                    "labels": {"app": format!("app-{}", i % services.max(1)), "pod-template-hash": "5d8f7c9b4"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{}-5d8f7c9b4", i % services.max(1)), "uid": "x", "controller": true}]},
                "spec": {"nodeName": on, "serviceAccountName": format!("sa-{}", i % 100),
                    "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
                "status": {"phase": "Running", "qosClass": "Burstable", "hostIP": "10.0.0.1",
                    "podIP": ip(i), "podIPs": [{"ip": ip(i)}],
                    "conditions": [{"type": "Ready", "status": "True"}]}}));
        }
        let per = endpoints.checked_div(services).unwrap_or(0);
        for s in 0..services {
            let ns = format!("ns-{}", s % namespaces);
            let name = format!("svc-{s}");
            self.put(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": format!("10.96.{}.{}", s / 256, s % 256),
                    "selector": {"app": format!("app-{s}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}));
            let members: Vec<Value> = (0..per)
                .map(|e| {
                    let i = s * per + e;
                    json!({"addresses": [ip(i)], "conditions": {"ready": true},
                        "nodeName": format!("other-node-{}", i % 50), "targetRef": {"kind": "Pod", "name": format!("pod-{i}")}})
                })
                .collect();
            self.put(
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": members}),
            );
        }
    }

    /// Sends a BOOKMARK (at the current resourceVersion) to every watch that asked for them.
    pub fn bookmark(&self) {
        let mut inner = self.lock();
        let rv = inner.rv.to_string();
        inner.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let (api_version, kind) = type_of(&w.resource);
            let object = json!({
                "kind": kind, "apiVersion": api_version,
                "metadata": { "resourceVersion": rv },
            });
            w.tx.send(event_line("BOOKMARK", &object)).is_ok()
        });
    }

    /// Closes every open watch connection (the client must resume from where it was).
    pub fn drop_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Forgets the history: a watch from any resourceVersion seen so far gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.oldest = inner.rv + 1;
    }

    /// Delays every list response of `plural` (any group) by `delay`.
    pub fn slow_lists(&self, plural: &str, delay: Duration) {
        self.lock().list_delay.insert(plural.to_owned(), delay);
    }

    /// Answers requests for `plural` of `group` with 404 (`installed: false`) or serves it.
    pub fn set_installed(&self, group: &str, plural: &str, installed: bool) {
        let key = (group.to_owned(), plural.to_owned());
        let mut inner = self.lock();
        match installed {
            true => inner.absent.remove(&key),
            false => inner.absent.insert(key),
        };
    }

    /// List requests served for `plural` (any group).
    pub fn lists(&self, plural: &str) -> usize {
        of_plural(&self.lock().lists, plural)
    }

    /// Watch requests answered for `plural` (any group).
    pub fn watches(&self, plural: &str) -> usize {
        of_plural(&self.lock().watches, plural)
    }

    /// Open watch connections.
    pub fn open_watches(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|w| !w.tx.is_closed());
        inner.watchers.len()
    }
}

/// What the API server answers for a resource it does not serve.
fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    )
}

async fn serve(state: &Arc<Mutex<Inner>>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    if req.method() != hyper::Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "the double only lists and watches"),
        );
    }
    let Some((resource, namespace, name)) = parse_path(req.uri().path()) else {
        return not_found();
    };
    let known = RESOURCES
        .iter()
        .any(|d| d.0 == resource.0 && d.2 == resource.1);
    if !known || lock().absent.contains(&resource) {
        return not_found();
    }
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect();
    let selector = parse_selector(query.get("fieldSelector").map_or("", String::as_str));
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if let Some(name) = name {
        let inner = lock();
        let id = (resource, namespace.unwrap_or_default(), name);
        return match inner.objects.get(&id) {
            Some(object) => respond(StatusCode::OK, object),
            None => respond(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    &format!("{} \"{}\" not found", id.0 .1, id.2),
                ),
            ),
        };
    }
    if !watch {
        let delay = lock()
            .list_delay
            .get(&resource.1)
            .copied()
            .unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut inner = lock();
        *inner.lists.entry(resource.clone()).or_default() += 1;
        let limit = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
        let token = query.get("continue").and_then(|c| c.split_once('/'));
        let skip = token.and_then(|t| t.1.parse().ok()).unwrap_or(0);
        let pinned = token.and_then(|t| t.0.parse().ok());
        let list = inner.list(
            &resource,
            namespace.as_deref(),
            &selector,
            limit,
            skip,
            pinned,
        );
        return respond(StatusCode::OK, &list);
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut inner = lock();
        *inner.watches.entry(resource.clone()).or_default() += 1;
        // (A watch from 0 or none starts from now, and is never too old.)
        let from = if from == 0 { inner.rv } else { from };
        if from < inner.oldest {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", inner.oldest),
            );
            let _ = tx.send(event_line("ERROR", &gone));
            drop(tx);
        } else {
            // What happened since `from`, then live events, with nothing lost in between
            // (both under the lock).
            for change in inner.history.iter().filter(|c| c.rv > from) {
                if change.resource != resource {
                    continue;
                }
                let ns = namespace.as_deref();
                if let Some(line) =
                    event_for(&selector, ns, change.old.as_ref(), change.new.as_ref())
                {
                    let _ = tx.send(line);
                }
            }
            inner.watchers.push(Watcher {
                resource,
                namespace,
                selector,
                bookmarks,
                tx,
            });
        }
    }
    let mut response = Response::new(Events(rx).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
