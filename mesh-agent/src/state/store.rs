//! The incremental core of the desired state: objects in, snapshots out, one change at a time.
//!
//! A source (the manifest directory; the Kubernetes watchers later) hands [`Store::apply`] a
//! transaction of per-object changes. The store checks it against everything it holds (no
//! object defined twice, no address claimed twice) and either rejects it whole, changing
//! nothing, or applies it and rebuilds only what the changed objects feed: a Pod's workload, the
//! Service ports whose endpoints it can be, every pod of a changed Namespace. The snapshot is
//! built of [`SharedMap`]s, so publishing it copies pointers, and an untouched Service keeps
//! the very same `Arc` (and with it its balancer's load figures) from one snapshot to the next.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    manifest::{self, Kind, ManifestError, Object, ObjectKey, Problem},
    ports::{self, Declared, PortSet, OPAQUE_PORTS_ANNOTATION},
    shared::SharedMap,
    ServiceTarget, Snapshot, Workload,
};

/// One change of a transaction.
#[derive(Debug)]
pub enum Change {
    /// Creates or replaces the object (named by its kind, namespace and name), as defined in
    /// `source` (a file, or `kube` later).
    Put {
        source: Arc<str>,
        object: Parsed,
    },
    Remove(ObjectKey),
}

/// An object reduced to what the store keeps, as soon as it is parsed (on the thread that
/// parsed it): the full manifests of a large state are never all alive at once.
#[derive(Debug, Clone)]
pub struct Parsed {
    key: ObjectKey,
    hash: u64,
    facts: Facts,
}

impl Parsed {
    pub fn new(object: &Object) -> Parsed {
        Parsed {
            key: object.key(),
            hash: hash_of(object),
            facts: Facts::of(object),
        }
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }
}

impl Change {
    pub fn put(source: &Arc<str>, object: &Object) -> Change {
        Change::Put {
            source: source.clone(),
            object: Parsed::new(object),
        }
    }
}

/// What one transaction rebuilt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    /// Objects put or removed.
    pub objects: usize,
    /// Pods whose workload was rebuilt.
    pub pods_rebuilt: usize,
    /// Services whose ports were rebuilt.
    pub services_rebuilt: usize,
}

/// An object as the store keeps it: only what rebuilding needs, not the parsed manifest
/// (at cluster scale the manifests were most of the agent's memory).
#[derive(Debug)]
struct Stored {
    source: Arc<str>,
    /// Of the parsed object: putting an identical object again changes nothing.
    hash: u64,
    facts: Facts,
}

#[derive(Debug, Clone)]
enum Facts {
    Namespace(NamespaceFacts),
    Pod(Box<PodFacts>),
    Service(Box<ServiceFacts>),
    EndpointSlice(Box<SliceFacts>),
    HttpRoute(Arc<crate::route::HttpRoute>),
    /// Istio's DestinationRule (validated when parsed; `None` if it failed there).
    DestinationRule(Option<Arc<super::istio::CompiledRule>>),
    /// A policy object (validated when parsed; `None` if it failed there).
    Policy(Option<Arc<super::policy::Compiled>>),
}

/// What a Namespace decides for its pods.
#[derive(Debug, Clone, Default)]
struct NamespaceFacts {
    inject: Option<bool>,
    fail_closed: Option<bool>,
    opaque: Option<Arc<PortSet>>,
    default_policy: Option<crate::policy::DefaultPolicy>,
}

#[derive(Debug, Clone)]
struct PodFacts {
    /// As in the snapshot (`None` for a finished pod); what its namespace decides is filled in
    /// again whenever it is rebuilt.
    workload: Option<Arc<Workload>>,
    /// Its labels (for the selectors of Services without EndpointSlices, and of policies),
    /// its default inbound policy and named ports; shared with its workload.
    inbound: Arc<super::PodInbound>,
    v4: Option<std::net::Ipv4Addr>,
    v6: Option<std::net::Ipv6Addr>,
    terminal: bool,
    host_network: bool,
    /// The pod's own settings, which win over its namespace's.
    inject: Option<bool>,
    fail_closed: Option<bool>,
    opaque: Option<Arc<PortSet>>,
}

#[derive(Debug, Clone)]
struct ServiceFacts {
    cluster_ips: Vec<IpAddr>,
    /// TCP ports only.
    ports: Vec<PortFacts>,
    /// `None` when empty.
    selector: Option<std::collections::BTreeMap<String, String>>,
    /// What Linkerd's annotations on the Service ask of requests no route of its own covers:
    /// one catch-all rule sending to the Service itself with those retries and timeouts.
    default_route: Option<Arc<crate::route::HttpRoute>>,
}

#[derive(Debug, Clone)]
struct PortFacts {
    name: Option<String>,
    port: u16,
    target: Option<manifest::IntOrString>,
    declared: Option<Declared>,
}

#[derive(Debug, Clone)]
struct SliceFacts {
    service: Arc<str>,
    /// `None` for an FQDN slice (not used).
    ipv6: Option<bool>,
    /// (name, port) of its TCP ports.
    ports: Vec<(Option<String>, u16)>,
    /// Addresses of its ready endpoints.
    ready: Vec<IpAddr>,
}

impl Facts {
    fn of(object: &Object) -> Facts {
        match object {
            Object::Namespace(ns) => Facts::Namespace(NamespaceFacts {
                inject: inject_setting(&ns.metadata),
                fail_closed: fail_closed(&ns.metadata.annotations),
                opaque: opaque_ports(&ns.metadata.annotations),
                default_policy: ns
                    .metadata
                    .annotations
                    .get(crate::policy::DEFAULT_POLICY_ANNOTATION)
                    .and_then(|v| v.parse().ok()),
            }),
            Object::Pod(pod) => {
                let mut facts = PodFacts {
                    workload: None,
                    inbound: Arc::new(super::PodInbound {
                        labels: PackedLabels::new(&pod.metadata.labels),
                        default_policy: pod
                            .metadata
                            .annotations
                            .get(crate::policy::DEFAULT_POLICY_ANNOTATION)
                            .and_then(|v| v.parse().ok()),
                        named_ports: pod
                            .spec
                            .containers
                            .iter()
                            .flat_map(|c| c.ports.iter())
                            .filter(|p| p.protocol == "TCP")
                            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
                            .collect(),
                    }),
                    v4: pod.status.pod_ip4(),
                    v6: pod.status.pod_ip6(),
                    terminal: pod.status.is_terminal(),
                    host_network: pod.spec.host_network,
                    inject: inject_setting(&pod.metadata),
                    fail_closed: fail_closed(&pod.metadata.annotations),
                    opaque: opaque_ports(&pod.metadata.annotations),
                };
                // What its namespace decides is filled in when the store rebuilds it.
                if !facts.terminal {
                    let unknown = NamespaceFacts::default();
                    facts.workload = Some(Arc::new(workload(pod, &facts, &unknown)));
                }
                Facts::Pod(Box::new(facts))
            }
            Object::Service(svc) => {
                let svc_opaque = opaque_ports(&svc.metadata.annotations);
                let declared = |p: &manifest::ServicePort| match &svc_opaque {
                    Some(set) if set.contains(p.port) => Some(Declared::Opaque),
                    _ => ports::declared(p.app_protocol.as_deref(), p.name.as_deref()),
                };
                let tcp = svc.spec.ports.iter().filter(|p| p.protocol == "TCP");
                Facts::Service(Box::new(ServiceFacts {
                    cluster_ips: cluster_ips(svc),
                    ports: tcp
                        .map(|p| PortFacts {
                            name: p.name.clone(),
                            port: p.port,
                            target: p.target_port.clone(),
                            declared: declared(p),
                        })
                        .collect(),
                    selector: svc.spec.selector.clone().filter(|s| !s.is_empty()),
                    default_route: default_route(svc),
                }))
            }
            Object::HttpRoute(route) => route_facts(&route.metadata, route.compile()),
            Object::GrpcRoute(route) => route_facts(&route.metadata, route.compile()),
            Object::VirtualService(vs) => route_facts(&vs.metadata, vs.compile()),
            Object::DestinationRule(dr) => Facts::DestinationRule(dr.compile().ok().map(Arc::new)),
            Object::Policy(_, p) => Facts::Policy(p.compile().ok().map(Arc::new)),
            Object::EndpointSlice(slice) => Facts::EndpointSlice(Box::new(SliceFacts {
                service: service_of(slice).into(),
                ipv6: match slice.address_type.as_str() {
                    "IPv4" => Some(false),
                    "IPv6" => Some(true),
                    _ => None,
                },
                ports: slice
                    .ports
                    .iter()
                    .filter(|p| p.protocol == "TCP")
                    .filter_map(|p| Some((p.name.clone(), p.port?)))
                    .collect(),
                ready: slice
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.ready != Some(false))
                    .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
                    .collect(),
            })),
        }
    }
}

/// A 64-bit hash of a value (a file's text, an object), to tell an unchanged one.
pub fn hash_of<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher as _;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// `(namespace, name)` of a Pod or a Service.
pub type Name = (Arc<str>, Arc<str>);

/// Objects by kind, namespace and name (looked up by `&str`, no key built).
#[derive(Debug, Default)]
struct Objects([ByNamespace; Kind::COUNT]);

/// Objects of one kind: namespace → name → object.
type ByNamespace = HashMap<Arc<str>, HashMap<Arc<str>, Stored>>;

impl Objects {
    fn of(&self, kind: Kind) -> &ByNamespace {
        &self.0[kind as usize]
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Stored> {
        self.of(kind).get(namespace)?.get(name)
    }

    fn get_mut(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<&mut Stored> {
        self.0[kind as usize].get_mut(namespace)?.get_mut(name)
    }

    fn insert(&mut self, key: &ObjectKey, stored: Stored) {
        self.0[key.kind as usize]
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone(), stored);
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Stored> {
        let names = self.0[key.kind as usize].get_mut(&key.namespace)?;
        let stored = names.remove(&key.name);
        if names.is_empty() {
            self.0[key.kind as usize].remove(&key.namespace);
        }
        stored
    }
}

#[derive(Debug, Default)]
pub struct Store {
    objects: Objects,
    /// Every namespace name, once: keys share them.
    namespaces: HashSet<Arc<str>>,
    /// The objects each source (file) defines.
    by_source: HashMap<Arc<str>, Vec<ObjectKey>>,
    /// Pod names by namespace.
    pods_by_ns: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// Services with a selector, by namespace (their endpoints may be pods, when they have no
    /// EndpointSlice).
    selecting: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// EndpointSlice names by the Service they belong to (usually one).
    slices_of: HashMap<Name, Vec<Arc<str>>>,
    /// What attaches to each Service: HTTPRoutes, GRPCRoutes, VirtualServices (by their
    /// parents or hosts) and DestinationRules (by their host).
    routes_of: HashMap<Name, BTreeSet<ObjectKey>>,
    /// The live pod that holds each pod IP.
    pod_ips: HashMap<IpAddr, ObjectKey>,
    /// The Service that holds each cluster IP.
    cluster_ips: HashMap<IpAddr, ObjectKey>,
    /// The snapshot addresses each Service's ports are at.
    placed: HashMap<Name, Vec<SocketAddr>>,
    /// Services that Istio AuthorizationPolicies target (by `targetRefs`).
    policy_services: HashSet<Name>,
    /// Pods are enrolled only when they or their namespace opt in (Kubernetes mode), rather
    /// than unless they opt out (a manifest directory: everything in it is the mesh's).
    opt_in: bool,
    snapshot: Snapshot,
}

#[derive(Default)]
struct Dirty {
    pods: BTreeSet<Name>,
    services: BTreeSet<Name>,
    /// The policy index is rebuilt whole (policy objects are few).
    policy: bool,
}

impl Store {
    /// A store whose snapshots file the pods of `node` only (what its agent asks for), rather
    /// than every node's: the index costs memory per pod.
    pub fn for_node(mut self, node: &str) -> Store {
        self.snapshot.indexed_node = Some(node.into());
        self
    }

    /// A store that enrolls only the pods that opt in, themselves or by their namespace.
    pub fn opt_in() -> Store {
        Store {
            opt_in: true,
            ..Store::default()
        }
    }

    /// The snapshot as of the last transaction (cheap: the maps are shared).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }

    /// The objects `source` defines.
    pub fn keys_of(&self, source: &str) -> &[ObjectKey] {
        self.by_source.get(source).map_or(&[], Vec::as_slice)
    }

    /// `key` with its namespace shared with every other key of that namespace.
    fn interned(&mut self, mut key: ObjectKey) -> ObjectKey {
        match self.namespaces.get(&key.namespace) {
            Some(ns) => key.namespace = ns.clone(),
            None => {
                self.namespaces.insert(key.namespace.clone());
            }
        }
        key
    }

    fn forget_source(&mut self, source: &Arc<str>, key: &ObjectKey) {
        if let Some(keys) = self.by_source.get_mut(source) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_source.remove(source);
            }
        }
    }

    /// Applies `changes` as one transaction: all of them, or (with the error naming the file,
    /// object and problem) none.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<Applied, ManifestError> {
        self.check(&changes)?;
        let mut dirty = Dirty::default();
        let mut objects = 0;
        // Removals first: an object one source drops and another defines, in the same
        // transaction, moves rather than vanishes.
        let (removes, puts): (Vec<Change>, Vec<Change>) = changes
            .into_iter()
            .partition(|c| matches!(c, Change::Remove(_)));
        for change in removes.into_iter().chain(puts) {
            crate::background::checkpoint();
            match change {
                Change::Remove(key) => {
                    if let Some(old) = self.objects.remove(&key) {
                        self.forget_source(&old.source, &key);
                        self.unindex(&key, &old.facts, &mut dirty);
                        objects += 1;
                    }
                }
                Change::Put { source, object } => {
                    let Parsed { key, hash, facts } = object;
                    let key = self.interned(key);
                    // Rewritten as it was (the rest of its file changed): nothing to rebuild.
                    let same = |s: &Stored| s.source == source && s.hash == hash;
                    let old = self.objects.get(key.kind, &key.namespace, &key.name);
                    if old.is_some_and(same) {
                        continue;
                    }
                    objects += 1;
                    match self.objects.remove(&key) {
                        Some(old) => {
                            if old.source != source {
                                self.forget_source(&old.source, &key);
                                self.by_source
                                    .entry(source.clone())
                                    .or_default()
                                    .push(key.clone());
                            }
                            self.unindex(&key, &old.facts, &mut dirty);
                        }
                        None => self
                            .by_source
                            .entry(source.clone())
                            .or_default()
                            .push(key.clone()),
                    }
                    self.index(&key, &facts, &mut dirty);
                    let stored = Stored {
                        source,
                        hash,
                        facts,
                    };
                    self.objects.insert(&key, stored);
                }
            }
        }
        let applied = Applied {
            objects,
            pods_rebuilt: dirty.pods.len(),
            services_rebuilt: dirty.services.len(),
        };
        for pod in &dirty.pods {
            crate::background::checkpoint();
            self.rebuild_pod(pod);
        }
        for svc in &dirty.services {
            crate::background::checkpoint();
            self.rebuild_service(svc);
        }
        if dirty.policy {
            self.rebuild_policy();
        }
        Ok(applied)
    }

    /// Checks a transaction against the store without changing anything.
    fn check(&self, changes: &[Change]) -> Result<(), ManifestError> {
        let removed: HashSet<&ObjectKey> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Remove(key) => Some(key),
                Change::Put { .. } => None,
            })
            .collect();
        let puts: Vec<(&ObjectKey, &Arc<str>, &Facts)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put { source, object } => Some((&object.key, source, &object.facts)),
                Change::Remove(_) => None,
            })
            .collect();
        let fail = |source: &Arc<str>, key: &ObjectKey, problem| ManifestError {
            file: source.to_string(),
            object: key.to_string(),
            problem,
        };
        let mut put_by: HashMap<&ObjectKey, &Arc<str>> = HashMap::new();
        for &(key, source, _) in &puts {
            if let Some(first) = put_by.get(key) {
                return Err(fail(source, key, Problem::Duplicate(first.to_string())));
            }
            if let Some(stored) = self.objects.get(key.kind, &key.namespace, &key.name) {
                if stored.source != *source && !removed.contains(key) {
                    return Err(fail(
                        source,
                        key,
                        Problem::Duplicate(stored.source.to_string()),
                    ));
                }
            }
            put_by.insert(key, source);
        }
        // An address held by an object this transaction replaces or removes is free.
        let leaving = |owner: &ObjectKey| removed.contains(owner) || put_by.contains_key(owner);
        let mut claims: HashMap<(Kind, IpAddr), (&ObjectKey, &Arc<str>)> = HashMap::new();
        for &(key, source, object) in &puts {
            let (ips, held) = match object {
                Facts::Pod(pod) => (pod.live_ips(), &self.pod_ips),
                Facts::Service(svc) => (svc.cluster_ips.clone(), &self.cluster_ips),
                Facts::Namespace(_)
                | Facts::EndpointSlice(_)
                | Facts::HttpRoute(_)
                | Facts::DestinationRule(_)
                | Facts::Policy(_) => continue,
            };
            for ip in ips {
                let other = match claims.get(&(key.kind, ip)) {
                    Some((other, file)) if *other != key => {
                        Some(((*other).clone(), file.to_string()))
                    }
                    _ => held
                        .get(&ip)
                        .filter(|owner| *owner != key && !leaving(owner))
                        .map(|owner| {
                            let file = self
                                .objects
                                .get(owner.kind, &owner.namespace, &owner.name)
                                .map(|s| s.source.to_string());
                            (owner.clone(), file.unwrap_or_default())
                        }),
                };
                if let Some((other, other_file)) = other {
                    let other = format!("{}/{}", other.namespace, other.name);
                    let problem = match key.kind {
                        Kind::Pod => Problem::DuplicatePodIp {
                            ip,
                            other,
                            other_file,
                        },
                        _ => Problem::DuplicateClusterIp {
                            ip,
                            other,
                            other_file,
                        },
                    };
                    return Err(fail(source, key, problem));
                }
                claims.insert((key.kind, ip), (key, source));
            }
        }
        Ok(())
    }

    fn index(&mut self, key: &ObjectKey, facts: &Facts, dirty: &mut Dirty) {
        match facts {
            Facts::Namespace(_) | Facts::Policy(_) => {}
            Facts::Pod(pod) => {
                self.pods_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(key.name.clone());
                for ip in pod.live_ips() {
                    self.pod_ips.insert(ip, key.clone());
                }
            }
            Facts::Service(svc) => {
                if svc.selector.is_some() {
                    self.selecting
                        .entry(key.namespace.clone())
                        .or_default()
                        .insert(key.name.clone());
                }
                for ip in &svc.cluster_ips {
                    self.cluster_ips.insert(*ip, key.clone());
                }
            }
            Facts::HttpRoute(route) => {
                for parent in route_parents(route) {
                    self.routes_of
                        .entry(parent)
                        .or_default()
                        .insert(key.clone());
                }
            }
            Facts::DestinationRule(rule) => {
                for host in rule_host(rule) {
                    self.routes_of.entry(host).or_default().insert(key.clone());
                }
            }
            Facts::EndpointSlice(slice) => {
                let slices = self
                    .slices_of
                    .entry((key.namespace.clone(), slice.service.clone()))
                    .or_default();
                if !slices.contains(&key.name) {
                    slices.push(key.name.clone());
                }
            }
        }
        self.mark(key, facts, dirty);
    }

    fn unindex(&mut self, key: &ObjectKey, facts: &Facts, dirty: &mut Dirty) {
        self.mark(key, facts, dirty);
        let forget = |map: &mut HashMap<IpAddr, ObjectKey>, ip: IpAddr| {
            if map.get(&ip) == Some(key) {
                map.remove(&ip);
            }
        };
        match facts {
            Facts::Namespace(_) | Facts::Policy(_) => {}
            Facts::Pod(pod) => {
                remove_from(&mut self.pods_by_ns, &key.namespace, &key.name);
                for ip in pod.live_ips() {
                    forget(&mut self.pod_ips, ip);
                }
            }
            Facts::Service(svc) => {
                remove_from(&mut self.selecting, &key.namespace, &key.name);
                for ip in &svc.cluster_ips {
                    forget(&mut self.cluster_ips, *ip);
                }
            }
            Facts::HttpRoute(_) | Facts::DestinationRule(_) => {
                let attached: Vec<Name> = match facts {
                    Facts::HttpRoute(route) => route_parents(route).collect(),
                    Facts::DestinationRule(rule) => rule_host(rule).collect(),
                    _ => Vec::new(),
                };
                for parent in attached {
                    if let Some(routes) = self.routes_of.get_mut(&parent) {
                        routes.remove(key);
                        if routes.is_empty() {
                            self.routes_of.remove(&parent);
                        }
                    }
                }
            }
            Facts::EndpointSlice(slice) => {
                let of = (key.namespace.clone(), slice.service.clone());
                if let Some(slices) = self.slices_of.get_mut(&of) {
                    slices.retain(|s| *s != key.name);
                    if slices.is_empty() {
                        self.slices_of.remove(&of);
                    }
                }
            }
        }
    }

    /// Marks what an object (a version coming or going) feeds.
    fn mark(&self, key: &ObjectKey, facts: &Facts, dirty: &mut Dirty) {
        match facts {
            Facts::Namespace(_) => {
                for pod in self.pods_by_ns.get(&key.name).into_iter().flatten() {
                    dirty.pods.insert((key.name.clone(), pod.clone()));
                }
                dirty.policy = true;
            }
            Facts::Policy(_) => dirty.policy = true,
            Facts::Pod(pod) => {
                dirty.pods.insert((key.namespace.clone(), key.name.clone()));
                // Services that may count this pod among their endpoints.
                for svc in self.selecting.get(&key.namespace).into_iter().flatten() {
                    let picks = match self.get(Kind::Service, &key.namespace, svc) {
                        Some(Facts::Service(s)) => {
                            selects(s.selector.as_ref(), &pod.inbound.labels)
                        }
                        _ => false,
                    };
                    if picks {
                        dirty.services.insert((key.namespace.clone(), svc.clone()));
                    }
                }
            }
            Facts::Service(_) => {
                let name = (key.namespace.clone(), key.name.clone());
                // Istio policies that target it select the pods it selects.
                if self.policy_services.contains(&name) {
                    dirty.policy = true;
                }
                dirty.services.insert(name);
            }
            Facts::EndpointSlice(slice) => {
                dirty
                    .services
                    .insert((key.namespace.clone(), slice.service.clone()));
            }
            Facts::HttpRoute(route) => {
                dirty.policy |= !route.servers.is_empty();
                dirty.services.extend(route_parents(route));
            }
            Facts::DestinationRule(rule) => dirty.services.extend(rule_host(rule)),
        }
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Facts> {
        self.objects.get(kind, namespace, name).map(|s| &s.facts)
    }

    /// What the namespace `name` decides for its pods (nothing, if it is not defined).
    fn namespace(&self, name: &str) -> NamespaceFacts {
        match self.get(Kind::Namespace, "", name) {
            Some(Facts::Namespace(ns)) => ns.clone(),
            _ => NamespaceFacts::default(),
        }
    }

    fn rebuild_pod(&mut self, name: &Name) {
        let old = self.snapshot.pods.remove(name);
        if let Some(old) = &old {
            self.count_pod(name, old, false);
            for ip in ips_of(old) {
                if self
                    .snapshot
                    .pods_by_ip
                    .get(&ip)
                    .is_some_and(|w| Arc::ptr_eq(w, old))
                {
                    self.snapshot.pods_by_ip.remove(&ip);
                }
            }
        }
        let namespace = self.namespace(&name.0);
        let by_default = !self.opt_in;
        let Some(Stored {
            facts: Facts::Pod(pod),
            ..
        }) = self.objects.get_mut(Kind::Pod, &name.0, &name.1)
        else {
            return;
        };
        let Some(base) = &pod.workload else { return };
        // What the namespace decides may have changed since the pod was read.
        let enrolled = pod.enrolled(&namespace, by_default);
        let opaque_ports = pod.opaque_ports(&namespace);
        let fail_closed = pod.fail_closed(&namespace);
        let same = base.enrolled == enrolled
            && base.opaque_ports == opaque_ports
            && base.fail_closed == fail_closed;
        let fresh = match same {
            true => base.clone(),
            false => Arc::new(Workload {
                enrolled,
                opaque_ports,
                fail_closed,
                ..(**base).clone()
            }),
        };
        // Unchanged: the same Arc, so readers comparing pointers see no change.
        let workload = match old {
            Some(old) if *old == *fresh => old,
            _ => fresh,
        };
        pod.workload = Some(workload.clone());
        self.count_pod(name, &workload, true);
        for ip in ips_of(&workload) {
            self.snapshot.pods_by_ip.insert(ip, workload.clone());
        }
        self.snapshot.pods.insert(name.clone(), workload);
    }

    /// Counts a pod in (or out of) its workload and its service account, and files it under
    /// (or removes it from) its node.
    fn count_pod(&mut self, name: &Name, pod: &Arc<Workload>, add: bool) {
        let snapshot = &mut self.snapshot;
        count(
            &mut snapshot.workloads,
            (pod.namespace.clone(), pod.workload.clone()),
            add,
        );
        count(
            &mut snapshot.service_accounts,
            (pod.namespace.clone(), pod.service_account.clone()),
            add,
        );
        let Some(node) = pod.node.as_deref() else {
            return;
        };
        if snapshot
            .indexed_node
            .as_deref()
            .is_some_and(|local| local != node)
        {
            return;
        }
        // Taken out of the map while changed, so that only a set an older snapshot still
        // shares is copied (once per apply).
        let mut pods = snapshot.pods_by_node.remove(node).unwrap_or_default();
        let set = Arc::make_mut(&mut pods);
        match add {
            true => {
                set.insert(name.clone(), pod.clone());
            }
            false => {
                set.remove(name);
            }
        }
        if !set.is_empty() {
            snapshot.pods_by_node.insert(node.to_owned(), pods);
        }
    }

    /// Whether the live pod at `ip` carries every one of `labels`.
    fn pod_labels_match(&self, ip: IpAddr, labels: &BTreeMap<String, String>) -> bool {
        let Some(key) = self.pod_ips.get(&ip) else {
            return false;
        };
        match self.get(Kind::Pod, &key.namespace, &key.name) {
            Some(Facts::Pod(pod)) => selects(Some(labels), &pod.inbound.labels),
            _ => false,
        }
    }

    fn rebuild_service(&mut self, name: &Name) {
        let mut old: HashMap<SocketAddr, Arc<ServiceTarget>> = HashMap::new();
        for addr in self.placed.remove(name).unwrap_or_default() {
            let ours = |t: &Arc<ServiceTarget>| *t.namespace == *name.0 && *t.name == *name.1;
            if self.snapshot.services.get(&addr).is_some_and(ours) {
                if let Some(t) = self.snapshot.services.remove(&addr) {
                    self.snapshot.endpoints -= t.endpoints.len();
                    let by_name = t.name_key();
                    if self
                        .snapshot
                        .services_by_name
                        .get(&by_name)
                        .is_some_and(ours)
                    {
                        self.snapshot.services_by_name.remove(&by_name);
                    }
                    old.insert(addr, t);
                }
            }
        }
        let Some(Facts::Service(svc)) = self.get(Kind::Service, &name.0, &name.1) else {
            return;
        };
        let slices: Vec<&SliceFacts> = self
            .slices_of
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|s| match self.get(Kind::EndpointSlice, &name.0, s) {
                Some(Facts::EndpointSlice(s)) => Some(&**s),
                _ => None,
            })
            .collect();
        let pods: Vec<&PodFacts> = match slices.is_empty() {
            false => Vec::new(),
            true => self
                .pods_by_ns
                .get(&name.0)
                .into_iter()
                .flatten()
                .filter_map(|p| match self.get(Kind::Pod, &name.0, p) {
                    Some(Facts::Pod(p)) => Some(&**p),
                    _ => None,
                })
                .collect(),
        };
        // Producer routes are those in the Service's own namespace; a route in another
        // namespace is a consumer route, for callers in that namespace only.
        let mut by_namespace: BTreeMap<Arc<str>, Vec<Arc<crate::route::HttpRoute>>> =
            BTreeMap::new();
        // Istio's VirtualServices apply to every caller, whatever their namespace.
        let mut virtual_services = Vec::new();
        let mut rules: Vec<&Arc<super::istio::CompiledRule>> = Vec::new();
        for route in self.routes_of.get(name).into_iter().flatten() {
            match self.get(route.kind, &route.namespace, &route.name) {
                Some(Facts::DestinationRule(Some(rule))) => rules.push(rule),
                Some(Facts::HttpRoute(r)) if route.kind == Kind::VirtualService => {
                    virtual_services.push(r.clone());
                }
                Some(Facts::HttpRoute(r)) => by_namespace
                    .entry(route.namespace.clone())
                    .or_default()
                    .push(r.clone()),
                _ => {}
            }
        }
        let mut routes = by_namespace.remove(&name.0).unwrap_or_default();
        let routes = producer_routes(name, &mut routes, virtual_services, svc);
        // Of several DestinationRules for one Service, the oldest applies (as Istio).
        rules.sort_by(|a, b| {
            (a.created.as_deref(), &a.namespace, &a.name).cmp(&(
                b.created.as_deref(),
                &b.namespace,
                &b.name,
            ))
        });
        for later in rules.iter().skip(1) {
            tracing::warn!(
                service = %format_args!("{}/{}", name.0, name.1),
                rule = %format_args!("{}/{}", later.namespace, later.name),
                "DestinationRule not applied: an older one is for this Service"
            );
        }
        let rule = rules.first().copied();
        let traffic = rule.map(|r| r.policy.clone()).unwrap_or_default();
        let mut targets = Vec::new();
        for &cluster_ip in &svc.cluster_ips {
            for port in &svc.ports {
                let ipv6 = cluster_ip.is_ipv6();
                let endpoints = match slices.is_empty() {
                    false => slice_endpoints(&slices, port.name.as_deref(), ipv6),
                    true => selected_endpoints(&pods, svc.selector.as_ref(), port, ipv6),
                };
                let declared = port.declared;
                let addr = SocketAddr::new(cluster_ip, port.port);
                let table = crate::route::Table::new(&routes, port.port);
                let table = (!table.is_empty()).then(|| Arc::new(table));
                let consumer_routes: Vec<(String, Arc<crate::route::Table>)> = by_namespace
                    .iter()
                    .map(|(ns, r)| (ns.to_string(), crate::route::Table::new(r, port.port)))
                    .filter(|(_, t)| !t.is_empty())
                    .map(|(ns, t)| (ns, Arc::new(t)))
                    .collect();
                // Istio subsets: the endpoints whose pods carry the subset's labels.
                let subsets: Vec<(String, Arc<ServiceTarget>)> = rule
                    .map(|r| r.subsets.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|(subset, labels, policy)| {
                        let members = endpoints
                            .iter()
                            .filter(|e| self.pod_labels_match(e.ip(), labels))
                            .copied()
                            .collect();
                        let target =
                            ServiceTarget::new(name, port.port, members, declared, policy.clone());
                        (subset.clone(), Arc::new(target))
                    })
                    .collect();
                let target = match old.remove(&addr) {
                    Some(t)
                        if t.endpoints == endpoints
                            && t.declared == declared
                            && t.routes.is_none()
                            && table.is_none()
                            && t.consumer_routes.is_empty()
                            && consumer_routes.is_empty()
                            && t.traffic == traffic
                            && t.subsets.is_empty()
                            && subsets.is_empty() =>
                    {
                        t
                    }
                    _ => Arc::new(ServiceTarget {
                        routes: table,
                        consumer_routes,
                        subsets,
                        ..ServiceTarget::new(name, port.port, endpoints, declared, traffic.clone())
                    }),
                };
                targets.push((addr, target));
            }
        }
        let mut addrs = Vec::with_capacity(targets.len());
        for (addr, target) in targets {
            self.snapshot.endpoints += target.endpoints.len();
            let by_name = target.name_key();
            // Dual-stack: the name leads to the first family listed.
            if self.snapshot.services_by_name.get(&by_name).is_none() {
                self.snapshot
                    .services_by_name
                    .insert(by_name, target.clone());
            }
            self.snapshot.services.insert(addr, target);
            addrs.push(addr);
        }
        self.placed.insert(name.clone(), addrs);
    }
}

impl Store {
    /// Compiles every policy object into a new index: Servers with their routes and resolved
    /// authorizations, Istio policies, PeerAuthentications, each namespace's default policy.
    fn rebuild_policy(&mut self) {
        use super::policy::Compiled;
        use crate::policy as p;
        let compiled = |kind: Kind| {
            self.objects.of(kind).values().flat_map(|names| {
                names.values().filter_map(|s| match &s.facts {
                    Facts::Policy(Some(c)) => Some(c.clone()),
                    _ => None,
                })
            })
        };
        let mut index = p::PolicyIndex {
            root_namespace: p::ISTIO_ROOT_NAMESPACE.into(),
            namespaces: HashMap::new(),
        };
        for (name, stored) in self
            .objects
            .of(Kind::Namespace)
            .get("")
            .into_iter()
            .flatten()
        {
            if let Facts::Namespace(ns) = &stored.facts {
                if ns.default_policy.is_some() {
                    index.namespaces.entry(name.clone()).or_default().default = ns.default_policy;
                }
            }
        }
        // Authentications by (kind, namespace, name).
        let authn = |kind: Kind, ns: &str, name: &str| match self.get(kind, ns, name) {
            Some(Facts::Policy(Some(c))) => match &**c {
                Compiled::Authentication(a) => Some(a.clone()),
                _ => None,
            },
            _ => None,
        };
        // An authorization naming an authentication that does not exist is ignored (Linkerd).
        let resolve = |a: &p::LinkerdAuthorization| -> Option<p::Authorization> {
            let mut required = Vec::new();
            for r in &a.required {
                required.push(match r {
                    p::AuthnRef::MeshTls { namespace, name } => {
                        authn(Kind::MeshTlsAuthentication, namespace, name)?
                    }
                    p::AuthnRef::Network { namespace, name } => {
                        authn(Kind::NetworkAuthentication, namespace, name)?
                    }
                    p::AuthnRef::ServiceAccount { namespace, name } => {
                        Arc::new(p::Authentication::MeshTls(vec![
                            p::IdentityMatch::ServiceAccount {
                                namespace: namespace.clone(),
                                name: name.clone(),
                            },
                        ]))
                    }
                });
            }
            if required.is_empty() {
                return None;
            }
            Some(p::Authorization {
                name: a.name.clone(),
                required,
            })
        };
        let authorizations: Vec<Arc<Compiled>> =
            compiled(Kind::LinkerdAuthorizationPolicy).collect();
        let linkerd = |c: &Arc<Compiled>| match &**c {
            Compiled::LinkerdAuthorization(a) => Some(a.clone()),
            _ => None,
        };
        // Routes whose parent is a Server, by (namespace, server).
        let mut server_routes: HashMap<(Arc<str>, String), Vec<Arc<crate::route::HttpRoute>>> =
            HashMap::new();
        for kind in [Kind::HttpRoute, Kind::GrpcRoute] {
            for (ns, names) in self.objects.of(kind) {
                for stored in names.values() {
                    let Facts::HttpRoute(route) = &stored.facts else {
                        continue;
                    };
                    for server in &route.servers {
                        // Attached to the Server (any port of it) for the table's sake.
                        let attached = crate::route::HttpRoute {
                            kind: route.kind,
                            namespace: route.namespace.clone(),
                            name: route.name.clone(),
                            created: route.created.clone(),
                            parents: vec![crate::route::Parent {
                                namespace: route.namespace.clone(),
                                name: server.clone(),
                                port: None,
                            }],
                            servers: route.servers.clone(),
                            rules: route.rules.clone(),
                        };
                        server_routes
                            .entry((ns.clone(), server.clone()))
                            .or_default()
                            .push(Arc::new(attached));
                    }
                }
            }
        }
        let mut servers: Vec<p::Server> = compiled(Kind::Server)
            .filter_map(|c| match &*c {
                Compiled::Server(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        servers
            .sort_by(|a, b| (a.created.as_deref(), &a.name).cmp(&(b.created.as_deref(), &b.name)));
        for server in servers {
            let ns = server.namespace.clone();
            let targets = |t: &p::LinkerdTarget| {
                authorizations
                    .iter()
                    .filter_map(linkerd)
                    .filter(|a| a.namespace == ns && a.target == *t)
                    .filter_map(|a| resolve(&a))
                    .collect::<Vec<_>>()
            };
            let routes = server_routes
                .remove(&(ns.clone(), server.name.to_string()))
                .unwrap_or_default();
            let route_authorizations = routes
                .iter()
                .map(|r| {
                    let id: Arc<str> = format!("{}/{}", r.namespace, r.name).into();
                    (id, targets(&p::LinkerdTarget::Route(r.name.clone())))
                })
                .collect();
            let table = crate::route::Table::new(&routes, 0);
            let entry = p::ServerPolicy {
                authorizations: targets(&p::LinkerdTarget::Server(server.name.to_string())),
                namespace_authorizations: targets(&p::LinkerdTarget::Namespace(ns.to_string())),
                routes: (!table.is_empty()).then(|| Arc::new(table)),
                route_authorizations,
                server: Arc::new(server),
            };
            index
                .namespaces
                .entry(ns)
                .or_default()
                .servers
                .push(Arc::new(entry));
        }
        self.policy_services.clear();
        for c in compiled(Kind::IstioAuthorizationPolicy) {
            let Compiled::Istio(policy) = &*c else {
                continue;
            };
            let ns = index
                .namespaces
                .entry(policy.namespace.clone())
                .or_default();
            if let p::IstioScope::Services(names) = &policy.scope {
                for name in names {
                    let key: Name = (policy.namespace.clone(), name.as_str().into());
                    if let Some(Facts::Service(svc)) = self.get(Kind::Service, &key.0, &key.1) {
                        let labels = svc.selector.iter().flatten();
                        ns.service_selectors.insert(
                            name.clone(),
                            p::LabelSelector {
                                labels: labels.map(|(k, v)| (k.clone(), v.clone())).collect(),
                                expressions: Vec::new(),
                            },
                        );
                    }
                    self.policy_services.insert(key);
                }
            }
            ns.istio.push(Arc::new(policy.clone()));
        }
        for c in compiled(Kind::PeerAuthentication) {
            let Compiled::Peer(peer) = &*c else { continue };
            index
                .namespaces
                .entry(peer.namespace.clone())
                .or_default()
                .peer
                .push(Arc::new(peer.clone()));
        }
        // Oldest first, as Istio and Linkerd resolve conflicts.
        for ns in index.namespaces.values_mut() {
            ns.istio.sort_by(|a, b| a.name.cmp(&b.name));
            ns.peer.sort_by(|a, b| {
                (a.created.as_deref(), &a.name).cmp(&(b.created.as_deref(), &b.name))
            });
        }
        self.snapshot.policy = Arc::new(index);
    }
}

/// The routes a Service's own callers get, by the documented rule for combining the three
/// sources: Gateway API routes in the Service's namespace win; without them, the oldest
/// VirtualService for the Service (then by namespace and name) applies; without either, the
/// Service's Linkerd annotations make a default route. A source that loses is reported.
fn producer_routes(
    name: &Name,
    gateway_api: &mut Vec<Arc<crate::route::HttpRoute>>,
    mut virtual_services: Vec<Arc<crate::route::HttpRoute>>,
    svc: &ServiceFacts,
) -> Vec<Arc<crate::route::HttpRoute>> {
    virtual_services.sort_by(|a, b| {
        (a.created.as_deref(), &a.namespace, &a.name).cmp(&(
            b.created.as_deref(),
            &b.namespace,
            &b.name,
        ))
    });
    let shadowed = |by: &str, routes: &[Arc<crate::route::HttpRoute>]| {
        for r in routes {
            tracing::warn!(
                service = %format_args!("{}/{}", name.0, name.1),
                route = %format_args!("{} {}/{}", r.kind.name(), r.namespace, r.name),
                "not applied: {by} already routes this Service"
            );
        }
    };
    if !gateway_api.is_empty() {
        shadowed("Gateway API routes", &virtual_services);
        return std::mem::take(gateway_api);
    }
    if !virtual_services.is_empty() {
        let first = virtual_services.remove(0);
        shadowed(
            &format!(
                "the older VirtualService {}/{}",
                first.namespace, first.name
            ),
            &virtual_services,
        );
        return vec![first];
    }
    svc.default_route.clone().into_iter().collect()
}

/// The Service's default route when Linkerd annotations on it ask for retries or timeouts.
fn default_route(svc: &manifest::Service) -> Option<Arc<crate::route::HttpRoute>> {
    use crate::route as r;
    // Validated when parsed.
    let policy = manifest::LinkerdPolicy::of(&svc.metadata).ok()?;
    if policy.is_empty() {
        return None;
    }
    let ns = svc.metadata.namespace();
    let name = &svc.metadata.name;
    let backend = r::Backend {
        service: format!("{name}.{ns}.svc.cluster.local"),
        port: None,
        weight: 1,
        filters: r::Filters::default(),
        subset: None,
    };
    let timeouts = r::Timeouts {
        request: policy.request,
        backend_request: policy.response,
        idle: policy.idle,
    };
    let rule = r::Rule::new(
        format!("{ns}/{name}"),
        None,
        vec![r::Match::default()],
        r::Filters::default(),
        vec![backend],
        timeouts,
    )
    .with_kind(r::RouteKind::Default)
    .with_retry(policy.retry());
    Some(Arc::new(r::HttpRoute {
        kind: r::RouteKind::Default,
        namespace: ns.to_owned(),
        name: name.clone(),
        created: None,
        servers: Vec::new(),
        parents: vec![r::Parent {
            namespace: ns.to_owned(),
            name: name.clone(),
            port: None,
        }],
        rules: vec![Arc::new(rule)],
    }))
}

/// What the store keeps of a route: the compiled route (validated when parsed, so an error
/// here leaves an empty route).
fn route_facts(
    meta: &manifest::ObjectMeta,
    compiled: Result<crate::route::HttpRoute, manifest::Problem>,
) -> Facts {
    Facts::HttpRoute(Arc::new(compiled.unwrap_or_else(|_| {
        crate::route::HttpRoute {
            kind: crate::route::RouteKind::Http,
            namespace: meta.namespace().to_owned(),
            name: meta.name.clone(),
            created: None,
            parents: Vec::new(),
            servers: Vec::new(),
            rules: Vec::new(),
        }
    })))
}

/// The Service a DestinationRule is for.
fn rule_host(rule: &Option<Arc<super::istio::CompiledRule>>) -> impl Iterator<Item = Name> + '_ {
    rule.iter()
        .filter_map(|r| r.host.as_ref())
        .map(|(ns, name)| (Arc::from(ns.as_str()), Arc::from(name.as_str())))
}

/// The Services a route attaches to.
fn route_parents(route: &crate::route::HttpRoute) -> impl Iterator<Item = Name> + '_ {
    route
        .parents
        .iter()
        .map(|p| (Arc::from(p.namespace.as_str()), Arc::from(p.name.as_str())))
}

fn remove_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, BTreeSet<Arc<str>>>,
    key: &K,
    name: &str,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// Counts one more (or one less) under `key`; a count of nothing is no entry.
fn count(counts: &mut SharedMap<(String, String), usize>, key: (String, String), add: bool) {
    let n = counts.get(&key).copied().unwrap_or(0);
    match (add, n) {
        (true, n) => {
            counts.insert(key, n + 1);
        }
        (false, 0 | 1) => {
            counts.remove(&key);
        }
        (false, n) => {
            counts.insert(key, n - 1);
        }
    }
}

fn ips_of(workload: &Workload) -> impl Iterator<Item = IpAddr> {
    let v4 = workload.ip.map(IpAddr::V4);
    let v6 = workload.ip6.map(IpAddr::V6);
    v4.into_iter().chain(v6)
}

/// Every cluster IP of a Service (both families on a dual-stack cluster).
fn cluster_ips(svc: &manifest::Service) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = svc
        .spec
        .cluster_ip
        .iter()
        .chain(svc.spec.cluster_ips.iter())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .collect();
    let mut seen = HashSet::new();
    ips.retain(|ip| seen.insert(*ip));
    ips
}

fn service_of(slice: &manifest::EndpointSlice) -> &str {
    slice
        .metadata
        .labels
        .get("kubernetes.io/service-name")
        .map_or("", String::as_str)
}

fn selects(
    selector: Option<&std::collections::BTreeMap<String, String>>,
    labels: &PackedLabels,
) -> bool {
    selector
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v.as_str())))
}

/// A pod's labels in one allocation, `key\0value\0key\0value`: kept only to match Service
/// selectors, and a Vec of String pairs per pod was megabytes at cluster scale. Labels holding
/// a NUL (which Kubernetes does not allow) are left out rather than let them forge pairs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PackedLabels(Box<str>);

impl PackedLabels {
    pub(crate) fn new(labels: &manifest::Labels) -> Self {
        let mut packed = String::new();
        for (k, v) in labels
            .iter()
            .filter(|(k, v)| !k.contains('\0') && !v.contains('\0'))
        {
            packed.extend([k, "\0", v, "\0"]);
        }
        PackedLabels(packed.into_boxed_str())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let mut parts = self.0.split('\0');
        while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            if k == key {
                return Some(v);
            }
        }
        None
    }
}

impl PodFacts {
    /// The addresses the pod holds while it lives (a finished pod's IP may be reused).
    fn live_ips(&self) -> Vec<IpAddr> {
        if self.host_network || self.terminal {
            return Vec::new();
        }
        let v4 = self.v4.map(IpAddr::V4);
        v4.into_iter().chain(self.v6.map(IpAddr::V6)).collect()
    }

    fn enrolled(&self, namespace: &NamespaceFacts, by_default: bool) -> bool {
        !self.host_network && self.inject.or(namespace.inject).unwrap_or(by_default)
    }

    fn fail_closed(&self, namespace: &NamespaceFacts) -> bool {
        self.fail_closed.or(namespace.fail_closed).unwrap_or(false)
    }

    fn opaque_ports(&self, namespace: &NamespaceFacts) -> Arc<PortSet> {
        self.opaque
            .clone()
            .or_else(|| namespace.opaque.clone())
            .unwrap_or_else(default_opaque_ports)
    }
}

/// A pod as the mesh sees it, given what its namespace decides.
fn workload(pod: &manifest::Pod, facts: &PodFacts, namespace: &NamespaceFacts) -> Workload {
    let meta = &pod.metadata;
    let (workload, kind) = match owner_workload(&meta.owner_references) {
        Some((name, kind)) => (name, Some(kind)),
        None => (
            workload_name(&meta.labels).unwrap_or(&meta.name).to_owned(),
            None,
        ),
    };
    Workload {
        namespace: meta.namespace().to_owned(),
        name: meta.name.clone(),
        workload,
        kind,
        opaque_ports: facts.opaque_ports(namespace),
        service_account: pod
            .spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        node: pod.spec.node_name.clone(),
        ip: facts.v4.filter(|_| !facts.host_network),
        ip6: facts.v6.filter(|_| !facts.host_network),
        node_ip: match pod.status.host_ip {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        },
        enrolled: facts.enrolled(namespace, true),
        fail_closed: facts.fail_closed(namespace),
        uid: meta.uid.clone(),
        inbound: facts.inbound.clone(),
    }
}

/// Linkerd's default opaque ports, one set shared by every pod that does not say otherwise.
fn default_opaque_ports() -> Arc<PortSet> {
    static DEFAULTS: std::sync::OnceLock<Arc<PortSet>> = std::sync::OnceLock::new();
    DEFAULTS
        .get_or_init(|| Arc::new(PortSet::defaults()))
        .clone()
}

/// Whether an object (a Pod or a Namespace) opts in or out of the mesh, by the first of these
/// it carries: our annotation, Linkerd's, Istio ambient's label, Istio's sidecar-injection
/// label (and annotation, on a pod).
fn inject_setting(meta: &manifest::ObjectMeta) -> Option<bool> {
    let (labels, annotations) = (&meta.labels, &meta.annotations);
    let setting = |value: Option<&String>, yes: &[&str], no: &[&str]| {
        let value = value?.as_str();
        match (yes.contains(&value), no.contains(&value)) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    };
    let enabled = ["enabled"];
    setting(
        annotations.get(super::INJECT_ANNOTATION),
        &enabled,
        &["disabled"],
    )
    .or_else(|| {
        setting(
            annotations.get(super::LINKERD_INJECT_ANNOTATION),
            &["enabled", "ingress"],
            &["disabled"],
        )
    })
    .or_else(|| {
        setting(
            labels.get(super::ISTIO_DATAPLANE_LABEL),
            &["ambient"],
            &["none"],
        )
    })
    .or_else(|| setting(labels.get("istio-injection"), &enabled, &["disabled"]))
    .or_else(|| {
        let sidecar = labels
            .get("sidecar.istio.io/inject")
            .or_else(|| annotations.get("sidecar.istio.io/inject"));
        setting(sidecar, &["true"], &["false"])
    })
}

/// The fail-closed annotation of an object (validated when the object was parsed).
fn fail_closed(annotations: &manifest::Labels) -> Option<bool> {
    annotations
        .get(super::FAIL_CLOSED_ANNOTATION)
        .and_then(|v| v.parse().ok())
}

/// The opaque-ports annotation of an object (validated when the object was parsed).
fn opaque_ports(annotations: &manifest::Labels) -> Option<Arc<PortSet>> {
    let value = annotations.get(OPAQUE_PORTS_ANNOTATION)?;
    PortSet::parse(value).ok().map(Arc::new)
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

fn slice_endpoints(slices: &[&SliceFacts], port_name: Option<&str>, ipv6: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.ipv6 == Some(ipv6)) {
        let wanted = port_name.unwrap_or("");
        let Some(&(_, port)) = slice
            .ports
            .iter()
            .find(|(name, _)| name.as_deref().unwrap_or("") == wanted)
        else {
            continue;
        };
        out.extend(slice.ready.iter().map(|ip| SocketAddr::new(*ip, port)));
    }
    out
}

/// Without an EndpointSlice, the pods the selector picks (a convenience for hand-written
/// manifests; a real cluster always has slices).
fn selected_endpoints(
    pods: &[&PodFacts],
    selector: Option<&std::collections::BTreeMap<String, String>>,
    port: &PortFacts,
    ipv6: bool,
) -> Vec<SocketAddr> {
    let target = match &port.target {
        None => port.port,
        Some(manifest::IntOrString::Int(p)) => *p,
        // Named ports need the container spec, which we do not read.
        Some(manifest::IntOrString::String(_)) => return Vec::new(),
    };
    pods.iter()
        .filter(|p| !p.terminal && selects(selector, &p.inbound.labels))
        .filter_map(|p| match ipv6 {
            true => p.v6.map(IpAddr::V6),
            false => p.v4.map(IpAddr::V4),
        })
        .map(|ip| SocketAddr::new(ip, target))
        .collect()
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::path::Path;

    use super::*;
    use crate::state::Destination;

    fn puts(source: &str, yaml: &str) -> Vec<Change> {
        let source: Arc<str> = Arc::from(source);
        manifest::parse_file(Path::new(&*source), yaml)
            .unwrap()
            .iter()
            .map(|o| Change::put(&source, o))
            .collect()
    }

    fn endpoints(store: &Store, addr: &str) -> Vec<String> {
        match store.snapshot().resolve(addr.parse().unwrap()) {
            Destination::Service(t) => t.endpoints.iter().map(ToString::to_string).collect(),
            _ => panic!("{addr} is not a service"),
        }
    }

    const PODS: &str = "kind: Pod\nmetadata: {name: a, namespace: shop, labels: {app: web}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.1.1.2}\n---\nkind: Pod\nmetadata: {name: b, namespace: shop, labels: {app: db}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.1.1.3}\n";
    const SVC: &str = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n";

    #[test]
    fn a_pod_relabelled_joins_the_service_that_selects_it() {
        let mut store = Store::default();
        store.apply(puts("pods.yaml", PODS)).unwrap();
        store.apply(puts("svc.yaml", SVC)).unwrap();
        assert_eq!(endpoints(&store, "10.96.0.10:80"), ["10.1.1.2:8080"]);
        let relabelled = PODS.replace("app: db", "app: web");
        let applied = store.apply(puts("pods.yaml", &relabelled)).unwrap();
        // Only b changed; the Service it now feeds was rebuilt with it.
        assert_eq!(
            applied,
            Applied {
                objects: 1,
                pods_rebuilt: 1,
                services_rebuilt: 1
            }
        );
        assert_eq!(
            endpoints(&store, "10.96.0.10:80"),
            ["10.1.1.2:8080", "10.1.1.3:8080"]
        );
    }

    #[test]
    fn a_node_finds_its_pods_and_accounts_are_counted_as_pods_move_and_go() {
        let local = |store: &Store, node: &str| -> Vec<String> {
            let s = store.snapshot();
            let mut names: Vec<String> = s.local_pods(node).map(|p| p.name.clone()).collect();
            names.sort();
            // The index (or, for a node not filed, the scan) says what a scan would.
            let mut scanned: Vec<String> = s
                .pods()
                .filter(|p| p.is_enrolled_on(node))
                .map(|p| p.name.clone())
                .collect();
            scanned.sort();
            assert_eq!(names, scanned);
            names
        };
        // Every node filed (a store of no particular node), and only n1's (an agent's).
        for mut store in [Store::default(), Store::default().for_node("n1")] {
            store.apply(puts("pods.yaml", PODS)).unwrap();
            let before = store.snapshot();
            assert_eq!(local(&store, "n1"), ["a", "b"]);
            assert!(before.has_service_account("shop", "default"));

            // b moves to n2: it leaves n1's pods; the older snapshot still sees it on n1.
            let moved = PODS.replacen(
                "nodeName: n1}\nstatus: {podIP: 10.1.1.3",
                "nodeName: n2}\nstatus: {podIP: 10.1.1.3",
                1,
            );
            assert_ne!(moved, PODS);
            store.apply(puts("pods.yaml", &moved)).unwrap();
            assert_eq!(local(&store, "n1"), ["a"]);
            assert_eq!(local(&store, "n2"), ["b"]);
            assert_eq!(before.local_pods("n1").count(), 2);

            // Both gone: no pods on either node, and nobody runs as the account any more.
            let pod = |name: &str| {
                Change::Remove(ObjectKey {
                    kind: Kind::Pod,
                    namespace: "shop".into(),
                    name: name.into(),
                })
            };
            store.apply(vec![pod("a"), pod("b")]).unwrap();
            assert!(local(&store, "n1").is_empty() && local(&store, "n2").is_empty());
            assert!(!store.snapshot().has_service_account("shop", "default"));
            assert!(before.has_service_account("shop", "default"));
        }
    }

    #[test]
    fn a_namespace_change_reaches_its_pods_and_only_them() {
        let mut store = Store::default();
        store.apply(puts("pods.yaml", PODS)).unwrap();
        let before = store.snapshot();
        let ns = "kind: Namespace\nmetadata: {name: shop, annotations: {linkerd.io/inject: disabled, config.linkerd.io/opaque-ports: \"8080\"}}\n";
        let applied = store.apply(puts("ns.yaml", ns)).unwrap();
        assert_eq!((applied.objects, applied.pods_rebuilt), (1, 2));
        let after = store.snapshot();
        let pod = after.pod_by_ip("10.1.1.2".parse().unwrap()).unwrap();
        assert!(!pod.enrolled && pod.opaque_ports.contains(8080));
        assert!(
            before
                .pod_by_ip("10.1.1.2".parse().unwrap())
                .unwrap()
                .enrolled
        );
        // Removing the Namespace gives the pods their defaults back.
        let key = ObjectKey {
            kind: Kind::Namespace,
            namespace: "".into(),
            name: "shop".into(),
        };
        store.apply(vec![Change::Remove(key)]).unwrap();
        let pod = store.snapshot();
        let pod = pod.pod_by_ip("10.1.1.2".parse().unwrap()).unwrap().clone();
        assert!(pod.enrolled && !pod.opaque_ports.contains(8080));
    }

    #[test]
    fn a_rejected_transaction_changes_nothing() {
        let mut store = Store::default();
        store.apply(puts("pods.yaml", PODS)).unwrap();
        store.apply(puts("svc.yaml", SVC)).unwrap();
        let mut changes = puts("svc.yaml", &SVC.replace("8080", "9090"));
        // ...together with a Service that takes web's cluster IP.
        changes.extend(puts("other.yaml", &SVC.replace("name: web", "name: thief")));
        let err = store.apply(changes).unwrap_err().to_string();
        assert_eq!(
            err,
            "other.yaml: Service shop/thief: cluster IP 10.96.0.10 is also claimed by Service shop/web (in svc.yaml); a cluster IP belongs to one Service"
        );
        assert_eq!(endpoints(&store, "10.96.0.10:80"), ["10.1.1.2:8080"]);
        assert_eq!(store.keys_of("other.yaml"), []);
    }

    #[test]
    fn an_object_moved_to_a_file_read_first_stays() {
        let mut store = Store::default();
        store.apply(puts("b.yaml", SVC)).unwrap();
        // a.yaml now defines the Service, and b.yaml no longer does: the file layer gives the
        // Put before the Remove, in file order.
        let mut changes = puts("a.yaml", SVC);
        changes.extend(store.keys_of("b.yaml").iter().cloned().map(Change::Remove));
        store.apply(changes).unwrap();
        assert_eq!(store.keys_of("a.yaml").len(), 1);
        assert_eq!(store.keys_of("b.yaml"), []);
        assert!(matches!(
            store.snapshot().resolve("10.96.0.10:80".parse().unwrap()),
            Destination::Service(_)
        ));
    }

    #[test]
    fn packed_labels_match_selectors_and_refuse_forged_pairs() {
        let yaml = "kind: Pod\nmetadata: {name: a, labels: {app: web, tier: \"x\\0app\\0db\"}}\n";
        let pod = manifest::parse_file(Path::new("p.yaml"), yaml).unwrap();
        let manifest::Object::Pod(pod) = &pod[0] else {
            panic!()
        };
        let packed = PackedLabels::new(&pod.metadata.labels);
        assert_eq!(packed.get("app"), Some("web"));
        assert_eq!(packed.get("tier"), None);
        let selector = |k: &str, v: &str| {
            let s: std::collections::BTreeMap<String, String> =
                [(k.to_owned(), v.to_owned())].into();
            selects(Some(&s), &packed)
        };
        assert!(selector("app", "web"));
        assert!(!selector("app", "db"));
        assert!(!selects(None, &packed));
    }
}
