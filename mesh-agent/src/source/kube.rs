//! Desired state from the Kubernetes API server: one list-then-watch stream per kind, fed into
//! the same incremental [`Store`] as the manifest directory.
//!
//! - **What is watched.** Pods of this node (field selector `spec.nodeName=<node>`: enrolment,
//!   identities, netns) and, as a second stream, the other nodes' pods (their addresses, node
//!   and service account: what a connection to them is verified against); Namespaces,
//!   Services, EndpointSlices, and every kind the manifest directory accepts. kube-rs's
//!   watcher lists, then watches from the list's `resourceVersion` with bookmarks, resumes
//!   a dropped watch where it left off, relists after `410 Gone`, and backs off on errors.
//! - **Straight into the store.** Each object is parsed into the typed shape the manifests
//!   use (only the fields we read: `managedFields` and the rest are dropped on arrival) and
//!   reduced to what the store keeps; the watcher keeps no copy of its own.
//! - **Batches.** Events are gathered until none came for [`QUIET`] (or [`MAX_DELAY`] after
//!   the first) and applied as one transaction; a relist's objects that did not come back
//!   are removed when it completes. Nothing is published until every kind has been listed
//!   once (or found missing), so the first snapshot is the whole cluster, not a part of it.
//! - **Bad objects.** An object that fails validation is refused (logged with kind,
//!   namespace, name and field, and counted); its last good version stays in force. A
//!   transaction the store refuses (two pods claiming one IP) is retried object by object,
//!   and what is still refused is tried again with the next change.
//! - **Kinds not installed.** A custom kind the API server does not serve (its CRD is absent),
//!   the agent may not read, or that fails to list is logged once and does not hold the state
//!   back; the watcher keeps retrying with backoff and picks it up when it appears. The core
//!   kinds (Namespaces, Pods, Services, EndpointSlices) must be listed before anything is
//!   published: without them an RBAC hole would look like an empty cluster.
//!
//! It all runs on a runtime of its own, on its own thread: the proxy's workers never wait.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    marker::PhantomData,
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime},
};

use futures::{stream::BoxStream, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use kube::{
    api::Api,
    runtime::{watcher, WatchStreamExt as _},
    Client, Resource,
};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    metrics::Metrics,
    state::{
        manifest::{self, Kind, ManifestError, ObjectKey},
        store::{Applied, Change, Parsed, Store},
        LastApply, Snapshot,
    },
};

pub use super::files::{MAX_DELAY, QUIET};

/// Objects per page of an initial list (kube-rs's default). A page holds objects already
/// reduced to what the store keeps, so smaller pages save no memory: with 100, `cargo xtask
/// bench --kube-scale` measured the same RSS and twice the time to the first snapshot.
const PAGE_SIZE: u32 = 500;

/// What a ManifestError names as the file of an object from the API server.
const SOURCE: &str = "API server";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "finding the cluster's configuration (in-cluster service account, or KUBECONFIG): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("a Kubernetes client from the configuration: {0}")]
    Client(#[source] kube::Error),
    #[error("the desired-state runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// A client from `kubeconfig`, else from the environment (in-cluster service account, or
/// `KUBECONFIG`, or `~/.kube/config`). Must run on the runtime that will use the client.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?;
            let options = kube::config::KubeConfigOptions::default();
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// The Kubernetes client and the runtime it runs on: a thread of its own, niced, so that the
/// watchers never take a worker from the proxy.
pub struct KubeRuntime {
    pub client: Client,
    handle: tokio::runtime::Handle,
}

impl KubeRuntime {
    /// Starts the thread and builds the client there from `kubeconfig` (else the
    /// environment); an error doing so is returned here.
    pub async fn start(kubeconfig: Option<PathBuf>) -> Result<KubeRuntime, Error> {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("desired-state".to_owned())
            .spawn(move || {
                crate::background::enter();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started_tx.send(Err(Error::Runtime(e)));
                        return;
                    }
                };
                let handle = runtime.handle().clone();
                runtime.block_on(async move {
                    let client = client(kubeconfig.as_deref()).await;
                    let failed = client.is_err();
                    let _ = started_tx.send(client.map(|client| KubeRuntime { client, handle }));
                    if !failed {
                        // Runs what is spawned on the handle for as long as the agent does.
                        std::future::pending::<()>().await;
                    }
                });
            })
            .map_err(Error::Runtime)?;
        match started_rx.await {
            Ok(result) => result,
            Err(_) => Err(Error::Runtime(std::io::Error::other(
                "the desired-state thread stopped",
            ))),
        }
    }

    /// Runs `future` on the watchers' thread; its output is awaited from anywhere.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

/// One kind as the API server serves it.
pub trait Watched: Send + Sync + 'static {
    /// The kind in our model.
    const KIND: Kind;
    const GROUP: &'static str;
    const VERSION: &'static str;
    const PLURAL: &'static str;
}

macro_rules! watched {
    ($($ty:ident = $kind:ident, $group:literal, $version:literal, $plural:literal;)*) => {
        $(
            #[doc = concat!("`", $plural, "` of `", $group, "/", $version, "`.")]
            pub enum $ty {}
            impl Watched for $ty {
                const KIND: Kind = Kind::$kind;
                const GROUP: &'static str = $group;
                const VERSION: &'static str = $version;
                const PLURAL: &'static str = $plural;
            }
        )*
    };
}

watched! {
    Namespaces = Namespace, "", "v1", "namespaces";
    Pods = Pod, "", "v1", "pods";
    Services = Service, "", "v1", "services";
    EndpointSlices = EndpointSlice, "discovery.k8s.io", "v1", "endpointslices";
    HttpRoutes = HttpRoute, "gateway.networking.k8s.io", "v1", "httproutes";
    GrpcRoutes = GrpcRoute, "gateway.networking.k8s.io", "v1", "grpcroutes";
    VirtualServices = VirtualService, "networking.istio.io", "v1", "virtualservices";
    DestinationRules = DestinationRule, "networking.istio.io", "v1", "destinationrules";
    Servers = Server, "policy.linkerd.io", "v1beta3", "servers";
    MeshTlsAuthentications = MeshTlsAuthentication, "policy.linkerd.io", "v1alpha1", "meshtlsauthentications";
    NetworkAuthentications = NetworkAuthentication, "policy.linkerd.io", "v1alpha1", "networkauthentications";
    LinkerdAuthorizationPolicies = LinkerdAuthorizationPolicy, "policy.linkerd.io", "v1alpha1", "authorizationpolicies";
    IstioAuthorizationPolicies = IstioAuthorizationPolicy, "security.istio.io", "v1", "authorizationpolicies";
    PeerAuthentications = PeerAuthentication, "security.istio.io", "v1", "peerauthentications";
}

/// (API group, resource) of everything the watchers read, cluster-wide: what the agent's
/// ClusterRole must grant list and watch on (`deploy/clusterrole.yaml`, checked by a test).
pub const WATCHED: &[(&str, &str)] = &[
    (Namespaces::GROUP, Namespaces::PLURAL),
    (Pods::GROUP, Pods::PLURAL),
    (Services::GROUP, Services::PLURAL),
    (EndpointSlices::GROUP, EndpointSlices::PLURAL),
    (HttpRoutes::GROUP, HttpRoutes::PLURAL),
    (GrpcRoutes::GROUP, GrpcRoutes::PLURAL),
    (VirtualServices::GROUP, VirtualServices::PLURAL),
    (DestinationRules::GROUP, DestinationRules::PLURAL),
    (Servers::GROUP, Servers::PLURAL),
    (
        MeshTlsAuthentications::GROUP,
        MeshTlsAuthentications::PLURAL,
    ),
    (
        NetworkAuthentications::GROUP,
        NetworkAuthentications::PLURAL,
    ),
    (
        LinkerdAuthorizationPolicies::GROUP,
        LinkerdAuthorizationPolicies::PLURAL,
    ),
    (
        IstioAuthorizationPolicies::GROUP,
        IstioAuthorizationPolicies::PLURAL,
    ),
    (PeerAuthentications::GROUP, PeerAuthentications::PLURAL),
];

fn api_version<W: Watched>() -> String {
    match W::GROUP {
        "" => W::VERSION.to_owned(),
        group => format!("{group}/{}", W::VERSION),
    }
}

/// One object as it arrives: parsed on arrival into our shape and at once reduced to what the
/// store keeps (or refused, with why), plus the metadata the watcher tracks. A list's page
/// holds these, never whole objects.
pub struct Wire<W> {
    meta: KubeMeta,
    object: Arc<Result<Parsed, ManifestError>>,
    kind: PhantomData<fn() -> W>,
}

impl<W> Clone for Wire<W> {
    fn clone(&self) -> Self {
        Wire {
            meta: self.meta.clone(),
            object: self.object.clone(),
            kind: PhantomData,
        }
    }
}

impl<W> std::fmt::Debug for Wire<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("namespace", &self.meta.namespace)
            .field("name", &self.meta.name)
            .field("resource_version", &self.meta.resource_version)
            .finish_non_exhaustive()
    }
}

impl<'de, W: Watched> Deserialize<'de> for Wire<W> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // One object's tree at a time: a field of the wrong type then refuses this object
        // alone, not the page of the list it came in.
        crate::background::checkpoint();
        let value = serde_json::Value::deserialize(d)?;
        let meta = value.get("metadata");
        let text = |key: &str| {
            meta.and_then(|m| m.get(key))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let meta = KubeMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            uid: text("uid"),
            ..KubeMeta::default()
        };
        let kind = W::KIND.name();
        let object = match manifest::parse_api_object(kind, &api_version::<W>(), value, SOURCE) {
            Ok(Some(object)) => Ok(Parsed::new(&object)),
            Ok(None) => Err(ManifestError {
                file: SOURCE.to_owned(),
                object: kind.to_owned(),
                problem: manifest::Problem::Field {
                    field: "kind".to_owned(),
                    message: "not one mesh-agent reads".to_owned(),
                },
            }),
            Err(e) => Err(e),
        };
        Ok(Wire {
            meta,
            object: Arc::new(object),
            kind: PhantomData,
        })
    }
}

impl<W: Watched> Resource for Wire<W> {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        W::KIND.name().into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        W::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        W::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        W::PLURAL.into()
    }
    fn meta(&self) -> &KubeMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut KubeMeta {
        &mut self.meta
    }
}

/// An object of some kind, as the follower handles it.
#[derive(Clone)]
struct Item {
    key: ObjectKey,
    object: Arc<Result<Parsed, ManifestError>>,
}

impl<W: Watched> From<Wire<W>> for Item {
    fn from(wire: Wire<W>) -> Item {
        let namespace = match W::KIND {
            Kind::Namespace => String::new(),
            _ => wire.meta.namespace.unwrap_or_else(|| "default".to_owned()),
        };
        Item {
            key: ObjectKey {
                kind: W::KIND,
                namespace: namespace.into(),
                name: wire.meta.name.unwrap_or_default().into(),
            },
            object: wire.object,
        }
    }
}

fn item_event<W: Watched>(event: watcher::Event<Wire<W>>) -> watcher::Event<Item> {
    use watcher::Event as E;
    match event {
        E::Apply(o) => E::Apply(o.into()),
        E::Delete(o) => E::Delete(o.into()),
        E::Init => E::Init,
        E::InitApply(o) => E::InitApply(o.into()),
        E::InitDone => E::InitDone,
    }
}

type Update = (usize, Result<watcher::Event<Item>, watcher::Error>);

/// One watch stream: a kind, maybe narrowed by a field selector.
struct StreamDef {
    /// For the log: "Pods on this node", "HTTPRoutes (gateway.networking.k8s.io/v1)".
    what: String,
    /// Core kinds (Namespaces, Pods, Services, EndpointSlices): without them there is no
    /// mesh to run, so the first snapshot waits for them whatever the error. The others (CRDs)
    /// may be absent, unreadable or broken: an error listing one does not hold the state back.
    required: bool,
    stream: BoxStream<'static, Update>,
}

fn stream<W: Watched>(
    client: &Client,
    index: usize,
    what: Option<&str>,
    fields: Option<String>,
) -> StreamDef {
    let mut config = watcher::Config::default().page_size(PAGE_SIZE);
    if let Some(fields) = &fields {
        config = config.fields(fields);
    }
    let api: Api<Wire<W>> = Api::all(client.clone());
    let stream = watcher(api, config)
        .default_backoff()
        .map(move |r| (index, r.map(item_event)))
        .boxed();
    let what = match what {
        Some(what) => what.to_owned(),
        None => format!("{} ({})", W::PLURAL, api_version::<W>()),
    };
    let required = matches!(
        W::KIND,
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice
    );
    StreamDef {
        what,
        required,
        stream,
    }
}

/// The streams of everything the agent reads, for `node`.
fn streams(client: &Client, node: &str) -> Vec<StreamDef> {
    let mut all = Vec::new();
    macro_rules! add {
        ($ty:ty) => {
            add!($ty, None, None)
        };
        ($ty:ty, $what:expr, $fields:expr) => {{
            let index = all.len();
            all.push(stream::<$ty>(client, index, $what, $fields));
        }};
    }
    add!(Namespaces);
    add!(
        Pods,
        Some("pods on this node"),
        Some(format!("spec.nodeName={node}"))
    );
    add!(
        Pods,
        Some("pods on other nodes"),
        Some(format!("spec.nodeName!={node}"))
    );
    add!(Services);
    add!(EndpointSlices);
    add!(HttpRoutes);
    add!(GrpcRoutes);
    add!(VirtualServices);
    add!(DestinationRules);
    add!(Servers);
    add!(MeshTlsAuthentications);
    add!(NetworkAuthentications);
    add!(LinkerdAuthorizationPolicies);
    add!(IstioAuthorizationPolicies);
    add!(PeerAuthentications);
    all
}

/// A change waiting for the next transaction.
#[derive(Clone)]
enum Pending {
    Put(Arc<Result<Parsed, ManifestError>>),
    Remove,
}

/// Where each stream stands.
#[derive(Default)]
struct StreamState {
    what: String,
    required: bool,
    /// Listed at least once, or not served: the first snapshot waits for every stream.
    synced: bool,
    /// The keys a relist in progress has returned (`None`: no relist in progress).
    listing: Option<HashSet<ObjectKey>>,
    /// An error was logged and nothing has succeeded since (one line per outage).
    failing: bool,
    /// The API server does not serve this kind, or the agent may not read it.
    absent: bool,
}

/// Follows the API server and publishes each new valid snapshot.
pub struct KubeSource {
    store: Store,
    version: u64,
    streams: Vec<StreamState>,
    /// Which stream each object in force (or pending) came from: a pod that moved to another
    /// node is deleted from one stream and added by another, in either order.
    owner: HashMap<ObjectKey, usize>,
    pending: BTreeMap<ObjectKey, Pending>,
    /// Changes the store refused, tried again with the next transaction.
    refused: BTreeMap<ObjectKey, Pending>,
    published: bool,
    started: Instant,
}

impl KubeSource {
    /// A source whose store enrolls only pods that opt in (`opt_in`), or every pod.
    pub fn new(opt_in: bool) -> KubeSource {
        KubeSource {
            store: if opt_in {
                Store::opt_in()
            } else {
                Store::default()
            },
            version: 0,
            streams: Vec::new(),
            owner: HashMap::new(),
            pending: BTreeMap::new(),
            refused: BTreeMap::new(),
            published: false,
            started: Instant::now(),
        }
    }

    /// Watches everything for `node` through `client` and publishes each new snapshot on
    /// `tx`, until `tx` has no receivers.
    pub async fn follow(
        mut self,
        client: Client,
        node: String,
        tx: watch::Sender<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
    ) {
        self.started = Instant::now();
        self.store = std::mem::take(&mut self.store).for_node(&node);
        let defs = streams(&client, &node);
        self.streams = defs
            .iter()
            .map(|d| StreamState {
                what: d.what.clone(),
                required: d.required,
                ..StreamState::default()
            })
            .collect();
        let mut events = futures::stream::select_all(defs.into_iter().map(|d| d.stream));
        // The first and the latest event of the batch being gathered.
        let mut batch: Option<(Instant, Instant)> = None;
        loop {
            let due = batch.map(|(first, last)| (last + QUIET).min(first + MAX_DELAY));
            let ready = self.streams.iter().all(|s| s.synced);
            tokio::select! {
                update = events.next() => {
                    let Some((index, update)) = update else { return };
                    if self.handle(index, update, &metrics) {
                        let now = Instant::now();
                        batch = Some((batch.map_or(now, |b| b.0), now));
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()),
                    if ready && (due.is_some() || !self.published) => {
                    batch = None;
                    if let Some(snapshot) = self.flush(&metrics) {
                        tx.send_replace(Arc::new(snapshot));
                    }
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// Takes in one event; returns whether it may change the state.
    fn handle(
        &mut self,
        index: usize,
        update: Result<watcher::Event<Item>, watcher::Error>,
        metrics: &Metrics,
    ) -> bool {
        let Some(stream) = self.streams.get_mut(index) else {
            return false;
        };
        let event = match update {
            Ok(event) => event,
            Err(e) => {
                let initial = matches!(e, watcher::Error::InitialListFailed(_));
                let unavailable = match &e {
                    watcher::Error::InitialListFailed(kube::Error::Api(status)) => {
                        matches!(status.code, 403 | 404)
                    }
                    _ => false,
                };
                let was_synced = stream.synced;
                if stream.required {
                    if !stream.failing {
                        error!(
                            "watching {}: {e}; retrying with backoff (no state is published \
                             before it is listed: check the agent's RBAC and the API server)",
                            stream.what
                        );
                    }
                } else if unavailable {
                    if !stream.absent {
                        info!(
                            "{}: not served by the API server or not readable by the agent \
                             ({e}); skipped, and picked up when it appears",
                            stream.what
                        );
                    }
                    stream.absent = true;
                    stream.synced = true;
                } else {
                    if !stream.failing {
                        warn!("watching {}: {e}; retrying with backoff", stream.what);
                    }
                    // A kind that cannot be listed does not hold the state back.
                    stream.synced |= initial;
                }
                stream.failing = true;
                // A first snapshot may now be due (the last stream turned out absent).
                return stream.synced && !was_synced;
            }
        };
        if stream.failing || stream.absent {
            info!("watching {}", stream.what);
            stream.failing = false;
            stream.absent = false;
        }
        match event {
            watcher::Event::Init => {
                stream.listing = Some(HashSet::new());
                false
            }
            watcher::Event::InitApply(item) | watcher::Event::Apply(item) => {
                if let Some(listing) = &mut stream.listing {
                    listing.insert(item.key.clone());
                }
                if let Err(e) = item.object.as_ref() {
                    error!(
                        "refused {}: {e}; its last good version stays in force",
                        item.key
                    );
                    metrics.manifest_reload(false);
                    return false;
                }
                self.owner.insert(item.key.clone(), index);
                self.pending.insert(item.key, Pending::Put(item.object));
                true
            }
            watcher::Event::Delete(item) => self.remove(item.key, index),
            watcher::Event::InitDone => {
                stream.synced = true;
                let listed = stream.listing.take().unwrap_or_default();
                let gone: Vec<ObjectKey> = self
                    .owner
                    .iter()
                    .filter(|(key, owner)| **owner == index && !listed.contains(*key))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in gone {
                    self.remove(key, index);
                }
                true
            }
        }
    }

    /// Removes `key` if the stream `index` is the one it came from.
    fn remove(&mut self, key: ObjectKey, index: usize) -> bool {
        if self.owner.get(&key) != Some(&index) {
            return false;
        }
        self.owner.remove(&key);
        self.refused.remove(&key);
        self.pending.insert(key, Pending::Remove);
        true
    }

    /// Applies what is pending as one transaction (object by object if the store refuses it
    /// whole); the new snapshot, if anything changed or none was published yet.
    fn flush(&mut self, metrics: &Metrics) -> Option<Snapshot> {
        let started = Instant::now();
        let mut batch = std::mem::take(&mut self.pending);
        for (key, change) in std::mem::take(&mut self.refused) {
            batch.entry(key).or_insert(change);
        }
        let count = batch.len();
        let source: Arc<str> = Arc::from(SOURCE);
        let change = |key: &ObjectKey, pending: &Pending| match pending {
            Pending::Remove => Change::Remove(key.clone()),
            Pending::Put(object) => match object.as_ref() {
                Ok(object) => Change::Put {
                    source: source.clone(),
                    object: object.clone(),
                },
                // (Refused on arrival; never pending.)
                Err(_) => Change::Remove(key.clone()),
            },
        };
        let whole: Vec<Change> = batch.iter().map(|(k, p)| change(k, p)).collect();
        let applied = match self.store.apply(whole) {
            Ok(applied) => applied,
            Err(e) => {
                warn!("{count} changes refused together ({e}); applying them one by one");
                let mut total = Applied::default();
                // Removals first: they free what puts may claim.
                let (removes, puts): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|(_, p)| matches!(p, Pending::Remove));
                for (key, pending) in removes.into_iter().chain(puts) {
                    match self.store.apply(vec![change(&key, &pending)]) {
                        Ok(applied) => {
                            total.objects += applied.objects;
                            total.pods_rebuilt += applied.pods_rebuilt;
                            total.services_rebuilt += applied.services_rebuilt;
                        }
                        Err(e) => {
                            error!("refused {key}: {e}; the last good state stays in force, and it is tried again with the next change");
                            metrics.manifest_reload(false);
                            self.refused.insert(key, pending);
                        }
                    }
                }
                total
            }
        };
        if applied.objects == 0 && self.published {
            return None;
        }
        metrics.manifest_reload(true);
        metrics.state_applied(started.elapsed());
        self.version += 1;
        let mut snapshot = self.store.snapshot();
        snapshot.version = self.version;
        snapshot.applied_at = Some(SystemTime::now());
        snapshot.last_apply = Some(LastApply {
            files: count,
            bytes_read: 0,
            applied,
            duration_us: started.elapsed().as_micros(),
        });
        if !self.published {
            let absent: Vec<&str> = self
                .streams
                .iter()
                .filter(|s| s.absent)
                .map(|s| s.what.as_str())
                .collect();
            info!(
                objects = applied.objects,
                pods = snapshot.summary().pods,
                took_ms = self.started.elapsed().as_millis() as u64,
                not_served = ?absent,
                "first state from the API server in force"
            );
            self.published = true;
            // The initial lists were the peak; hand what they freed back.
            crate::background::release_freed_memory();
        } else {
            info!(version = snapshot.version, changes = ?snapshot.last_apply, "cluster state changed; new state in force");
        }
        Some(snapshot)
    }
}
