//! Wiring: bind every listener first (a bind error stops start-up), load and attach the
//! datapath, then run until SIGINT/SIGTERM and detach everything on the way out.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hyper::StatusCode;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::{
    admin,
    datapath::{self, Datapath, Exclusions},
    drain::Drain,
    enrolled::EnrolledPods,
    handover,
    identity::{
        ca::{self, CertificateAuthority, DevCa},
        manager::IdentityManager,
    },
    limits::ByteBudget,
    metrics::Metrics,
    podnet,
    proxy::{
        hbone::HboneConnector,
        http::pool::{Pool, SWEEP_EVERY},
        inbound::{self, InboundInputs},
        outbound::{self, ProxyInputs},
    },
    reconcile::Reconciler,
    source::{
        cluster_identity::{self, Material},
        files::ManifestDir,
        kube::{KubeRuntime, KubeSource},
    },
    state::manifest::ManifestError,
    tls::{self, AnchorSource, MeshTls, TrustBundle},
};

/// Everything the agent is configured with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node: String,
    /// Where the desired state comes from.
    pub source: Source,
    /// Which pods are enrolled (the source's default if not given).
    pub enrollment: Option<Enrollment>,
    /// The node's address; the listeners bind here.
    pub node_address: Ipv4Addr,
    /// The node's IPv6 address, if it has one: the IPv6 outbound listener binds here and native
    /// IPv6 is captured.
    pub node_address6: Option<Ipv6Addr>,
    /// Where the cgroup programs attach (the cgroup v2 root unless overridden).
    pub cgroup: PathBuf,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub metrics_port: u16,
    pub health_port: u16,
    /// The admin port, bound on 127.0.0.1 only.
    pub admin_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<(Ipv4Addr, u8)>,
    pub max_connections_per_pod: usize,
    /// Relay buffer bytes the proxy may hold across all connections.
    pub max_buffered_bytes: usize,
    /// Manifest files larger than this are refused.
    pub max_manifest_bytes: u64,
    /// Tunnels one HBONE connection carries at once (both directions agree on it).
    pub max_streams_per_connection: usize,
    /// Every HTTP listener of the agent drops a client whose request head is not complete by
    /// then.
    pub head_timeout: Duration,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// How long a SIGTERM waits for the connections in flight (see [`crate::drain`]).
    pub drain_timeout: Duration,
    /// Where the eBPF links are pinned to outlive the agent (see [`crate::pinning`]).
    pub pin_dir: Option<PathBuf>,
    /// How soon pinned programs give up on an agent whose heartbeat stopped.
    pub liveness_timeout: Duration,
    /// Whether pods' sends to the proxy skip TCP (`--sockmap`).
    pub sockmap: bool,
    /// Where a running agent hands its listening sockets to its successor (see
    /// [`crate::handover`]).
    pub handover_socket: Option<PathBuf>,
    /// After a handover, wait for a signal instead of exiting (a container that exits is
    /// restarted).
    pub linger_after_handover: bool,
    /// Which build this agent says it is (tests of version skew); the eBPF object's own tag
    /// if `None`.
    pub object_tag: Option<String>,
    /// An HTTP client's request head must arrive within this.
    pub http_head_timeout: Duration,
    pub metrics_dialect: crate::metrics::http::Dialect,
    pub trust_domain: String,
    pub identity: IdentitySource,
    /// Lifetime of the workload certificates the agent mints.
    pub cert_lifetime: Duration,
    /// What inbound policy falls back on.
    pub policy: crate::policy::Defaults,
    /// The kubelet's cgroup, whose probes the kernel lets through on probe ports.
    pub kubelet_cgroup: Option<PathBuf>,
}

/// Where the issuer comes from.
#[derive(Debug, Clone, Serialize)]
pub enum IdentitySource {
    /// Linkerd's install model: trust anchors, issuer certificate and key from files.
    Files {
        trust_anchors: PathBuf,
        issuer_cert: PathBuf,
        issuer_key: PathBuf,
    },
    /// A throwaway anchor and issuer generated at start; the anchor (never a key) is written
    /// to this directory, and every anchor found there is trusted.
    DevCa { dir: PathBuf },
    /// From the cluster, in Linkerd's layout (`--kube`): the ConfigMap
    /// `linkerd-identity-trust-roots` and the Secret `linkerd-identity-issuer` in `namespace`,
    /// watched.
    Cluster { namespace: String },
}

/// Where the desired state comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A directory of manifests.
    Manifests(PathBuf),
    /// The Kubernetes API server.
    Kube { kubeconfig: Option<PathBuf> },
}

/// Which pods are in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Enrollment {
    /// Pods that opt in, themselves or by their namespace.
    OptIn,
    /// Every pod but those that opt out.
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("initial manifests rejected: {0}")]
    Manifests(#[from] ManifestError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] crate::source::kube::Error),
    #[error("identity from the cluster: {0}")]
    ClusterIdentity(#[from] cluster_identity::Error),
    #[error("identity from the cluster needs --kube")]
    ClusterIdentityWithoutKube,
    #[error("binding {what} on {addr}: {source} (is another agent running in this namespace?)")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error("setting up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("keeping the listening sockets for a successor: {0}")]
    Handover(#[source] std::io::Error),
    #[error("identity: {0}")]
    Ca(#[from] ca::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tls::Error),
    #[error("{0}")]
    AgentNetns(#[source] std::io::Error),
    #[error("starting the desired-state thread: {0}")]
    StateThread(#[source] std::io::Error),
    #[error("--kubelet-cgroup {path}: {source}")]
    KubeletCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the dev trust anchor to {path}: {source}")]
    DevAnchor {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sets up the issuer and the trust bundle.
async fn identity(
    config: &Config,
    kube: Option<&KubeRuntime>,
) -> Result<(CertificateAuthority, AnchorSource, Option<Material>), Error> {
    let (ca, anchors) = match &config.identity {
        IdentitySource::Files {
            trust_anchors,
            issuer_cert,
            issuer_key,
        } => (
            CertificateAuthority::from_files(issuer_cert, issuer_key)?,
            AnchorSource::File(trust_anchors.clone()),
        ),
        IdentitySource::DevCa { dir } => {
            let dev = DevCa::generate(&config.trust_domain)?;
            let path = dir.join(format!("anchor-{}.pem", config.node));
            let tmp = dir.join(format!(".anchor-{}.pem.tmp", config.node));
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&tmp, &dev.anchor_pem))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|source| Error::DevAnchor {
                    path: path.clone(),
                    source,
                })?;
            info!(anchor = %path.display(), "--dev-ca: generated a throwaway trust anchor and issuer");
            (
                CertificateAuthority::from_dev(&dev)?,
                AnchorSource::Directory(dir.clone()),
            )
        }
        IdentitySource::Cluster { namespace } => {
            let kube = kube.ok_or(Error::ClusterIdentityWithoutKube)?;
            let client = kube.client.clone();
            let ns = namespace.clone();
            let material = kube
                .spawn(async move { cluster_identity::fetch(&client, &ns).await })
                .await
                .map_err(|e| Error::StateThread(std::io::Error::other(e)))??;
            let ca = material.issuer(namespace)?;
            info!(%namespace, issuer = %ca.subject(), "identity material read from the cluster");
            let anchors = AnchorSource::Pem(material.anchors.clone());
            return Ok((ca, anchors, Some(material)));
        }
    };
    Ok((ca, anchors, None))
}

/// How long a successor waits for its own enrollment before it serves on sockets it was
/// handed (the previous agent serves meanwhile).
const HANDOVER_READY: Duration = Duration::from_secs(30);

/// Where the listening sockets come from: handed over by the running agent, else bound.
#[derive(Default)]
struct Sockets {
    given: Vec<(String, std::net::TcpListener)>,
    /// How long to keep trying a bind that finds the port taken (a draining predecessor).
    patience: Duration,
}

impl Sockets {
    async fn take(
        &mut self,
        name: &str,
        what: &'static str,
        addr: impl Into<SocketAddr>,
    ) -> Result<TcpListener, Error> {
        let addr = addr.into();
        if let Some(i) = self.given.iter().position(|(n, _)| n == name) {
            let (_, listener) = self.given.swap_remove(i);
            let wrong = |source| Error::Bind { what, addr, source };
            let at = listener.local_addr().map_err(wrong)?;
            if at != addr {
                return Err(wrong(std::io::Error::other(format!(
                    "the running agent handed over a socket on {at}"
                ))));
            }
            listener.set_nonblocking(true).map_err(wrong)?;
            return TcpListener::from_std(listener).map_err(wrong);
        }
        let since = Instant::now();
        let mut waited = false;
        loop {
            match TcpListener::bind(addr).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && since.elapsed() < self.patience =>
                {
                    if !std::mem::replace(&mut waited, true) {
                        info!(%addr, "{what}: the port is taken, waiting for it (a draining agent?)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other.map_err(|source| Error::Bind { what, addr, source }),
            }
        }
    }
}

/// Runs the agent until a termination signal.
pub async fn run(config: Config) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    podnet::remember_agent_netns().map_err(Error::AgentNetns)?;

    let metrics = Arc::new(Metrics::new(config.metrics_dialect)?);
    // The Kubernetes client runs on a thread of its own (see `KubeRuntime`).
    let kube = match &config.source {
        Source::Kube { kubeconfig } => Some(KubeRuntime::start(kubeconfig.clone()).await?),
        Source::Manifests(_) => None,
    };
    // A manifest directory is loaded before anything starts (a bad one stops start-up); the
    // API server's state arrives once every kind is listed, and the agent is not ready until.
    let (initial, dir) = match &config.source {
        Source::Manifests(path) => {
            let opt_in = config.enrollment == Some(Enrollment::OptIn);
            let mut dir =
                ManifestDir::new(path, config.max_manifest_bytes, opt_in).for_node(&config.node);
            (dir.initial(&metrics)?, Some(dir))
        }
        Source::Kube { .. } => (Arc::new(crate::state::Snapshot::default()), None),
    };

    let provider = tls::provider();
    let (ca, anchors, material) = identity(&config, kube.as_ref()).await?;
    let bundle = Arc::new(TrustBundle::load(anchors, provider.clone())?);
    bundle.check_issuer(&ca, &config.trust_domain)?;
    let identities = Arc::new(IdentityManager::new(ca, config.cert_lifetime, provider));
    let mesh_tls = Arc::new(MeshTls::new(bundle.clone(), config.trust_domain.clone()));
    let server_config = mesh_tls.server_config(identities.clone())?;

    // A running agent of the same build hands its listening sockets over (hitless restart);
    // one of another build drains, and its ports are ours once it is gone.
    let tag = config
        .object_tag
        .clone()
        .unwrap_or_else(datapath::object_tag);
    let mut sockets = Sockets::default();
    let mut successor = None;
    if let Some(path) = config.handover_socket.clone() {
        // A predecessor that is draining already (it got its signal before we asked) holds
        // the ports until it is done.
        sockets.patience = config.drain_timeout + Duration::from_secs(10);
        let asked = {
            let tag = tag.clone();
            tokio::task::spawn_blocking(move || handover::ask(&path, &tag)).await
        };
        match asked {
            Ok(Ok(handover::Answer::Nobody)) => {}
            Ok(Ok(handover::Answer::Given(given, s))) => {
                info!(
                    listeners = given.len(),
                    "took over the running agent's listening sockets"
                );
                sockets.given = given;
                successor = Some(s);
            }
            Ok(Ok(handover::Answer::Refused(theirs))) => {
                info!(
                    theirs, ours = %tag,
                    "the running agent is another build: it drains; waiting for its ports"
                );
            }
            Ok(Err(e)) => warn!("asking the running agent for its listeners: {e}"),
            Err(e) => warn!("asking the running agent for its listeners: {e}"),
        }
    }
    let addr = |port| SocketAddrV4::new(config.node_address, port);
    let outbound_addr = addr(config.outbound_port);
    let outbound_listener = sockets
        .take("outbound", "the outbound listener", outbound_addr)
        .await?;
    let inbound_listener = sockets
        .take(
            "inbound",
            "the HBONE inbound listener",
            addr(config.inbound_port),
        )
        .await?;
    let admin_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, config.admin_port);
    let admin_listener = sockets
        .take("admin", "the admin listener", admin_addr)
        .await?;
    let metrics_listener = sockets
        .take("metrics", "the metrics listener", addr(config.metrics_port))
        .await?;
    let health_listener = sockets
        .take("health", "the health listener", addr(config.health_port))
        .await?;

    // Native IPv6 is captured where the node has an IPv6 address to listen on.
    let outbound6_addr = config
        .node_address6
        .map(|ip| SocketAddrV6::new(ip, config.outbound_port, 0, 0));
    let outbound6_listener = match outbound6_addr {
        Some(a) => Some(
            sockets
                .take("outbound6", "the IPv6 outbound listener", a)
                .await?,
        ),
        None => None,
    };
    // Copies for a successor (closed when this agent drains).
    let mut handed: Vec<(&'static str, std::os::fd::OwnedFd)> = Vec::new();
    {
        use std::os::fd::AsFd as _;
        let mut keep = |name: &'static str, l: &TcpListener| {
            l.as_fd()
                .try_clone_to_owned()
                .map(|fd| handed.push((name, fd)))
                .map_err(Error::Handover)
        };
        keep("outbound", &outbound_listener)?;
        keep("inbound", &inbound_listener)?;
        keep("admin", &admin_listener)?;
        keep("metrics", &metrics_listener)?;
        keep("health", &health_listener)?;
        if let Some(l) = &outbound6_listener {
            keep("outbound6", l)?;
        }
    }

    let node_addrs = local_addresses();
    let (node_addrs4, node_addrs6) = by_family(&node_addrs);
    let exclusions = Exclusions {
        ports: config.exclude_ports.clone(),
        nets: config.exclude_cidrs.clone(),
    };
    let pins = match &config.pin_dir {
        Some(dir) => Some(crate::pinning::PinDir::open(dir, &tag).map_err(datapath::Error::from)?),
        None => None,
    };
    let (datapath, orig_dst, mut capture) = Datapath::start(
        &config.cgroup,
        outbound_addr,
        outbound6_addr,
        &node_addrs4,
        &node_addrs6,
        &exclusions,
        pins,
        config.liveness_timeout,
        config.sockmap,
    )?;
    let orig_dst = Arc::new(orig_dst);
    info!(
        node = %config.node, cgroup = %config.cgroup.display(), outbound = %outbound_addr,
        outbound6 = ?outbound6_addr,
        "eBPF programs attached"
    );

    let (state_tx, state_rx) = watch::channel(initial);
    let (enrolled_tx, enrolled_rx) = watch::channel(Arc::new(EnrolledPods::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let (drain, drain_watch) = Drain::new();
    // Kubelet probes: by the kubelet's cgroup if given, else by the node's addresses.
    let mut datapath = datapath;
    let probe_sources = match &config.kubelet_cgroup {
        Some(path) => {
            use std::os::unix::fs::MetadataExt as _;
            // A cgroup v2 directory's inode number is the cgroup's id.
            let id = std::fs::metadata(path)
                .map_err(|source| Error::KubeletCgroup {
                    path: path.clone(),
                    source,
                })?
                .ino();
            datapath.set_probe_cgroup(id)?;
            Vec::new()
        }
        None => node_addrs4
            .iter()
            .map(|ip| crate::policy::Cidr {
                addr: (*ip).into(),
                len: 32,
            })
            .chain(node_addrs6.iter().map(|ip| crate::policy::Cidr {
                addr: (*ip).into(),
                len: 128,
            }))
            .collect(),
    };
    let mut reconciler = Reconciler::new(
        config.node.clone(),
        config.trust_domain.clone(),
        datapath,
        identities.clone(),
        metrics.clone(),
        ready.clone(),
        enrolled_tx,
    );
    reconciler.policy = config.policy.clone();
    reconciler.probe_sources = probe_sources;
    // Pods' sandboxes are found under the hierarchy the programs attach to.
    reconciler.sandboxes = Arc::new(std::sync::Mutex::new(podnet::Sandboxes::new(
        &config.cgroup,
    )));

    let buffers = Arc::new(ByteBudget::new(config.max_buffered_bytes));
    let pool = Arc::new(Pool::new(config.http_head_timeout));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pool.clone().sweep_every(SWEEP_EVERY));
    // Reading and building the desired state runs on a thread of its own, never on the
    // proxy's workers.
    if let Some(dir) = dir {
        dir.spawn_watch(state_tx, metrics.clone())
            .map_err(Error::StateThread)?;
    } else if let Some(kube) = &kube {
        let opt_in = config.enrollment != Some(Enrollment::All);
        let source = KubeSource::new(opt_in);
        let follow = source.follow(
            kube.client.clone(),
            config.node.clone(),
            state_tx,
            metrics.clone(),
        );
        drop(kube.spawn(follow));
        if let (Some(material), IdentitySource::Cluster { namespace }) =
            (material, &config.identity)
        {
            drop(kube.spawn(cluster_identity::follow(
                kube.client.clone(),
                namespace.clone(),
                material,
                bundle.clone(),
                identities.clone(),
                config.trust_domain.clone(),
            )));
        }
    }
    let reconciler = tasks.spawn(reconciler.run(state_rx.clone()));
    tasks.spawn(identities.clone().run_renewal());
    {
        let bundle = bundle.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                bundle.refresh();
            }
        });
    }
    if successor.is_some() {
        // The running agent keeps accepting until we know every pod we will be asked about.
        let since = Instant::now();
        while !ready.load(Ordering::Acquire) && since.elapsed() < HANDOVER_READY {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tasks.spawn(inbound::serve(
        inbound_listener,
        Arc::new(InboundInputs {
            node: config.node.clone(),
            trust_domain: config.trust_domain.clone(),
            state: state_rx.clone(),
            enrolled: enrolled_rx.clone(),
            metrics: metrics.clone(),
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            handshake_timeout: config.head_timeout,
            max_streams: config.max_streams_per_connection,
            buffers: buffers.clone(),
            pool: pool.clone(),
            http_head_timeout: config.http_head_timeout,
            policy: config.policy.clone(),
            drain: drain_watch.clone(),
        }),
    ));
    let health_draining = drain_watch.clone();
    let outbound_inputs = Arc::new(ProxyInputs {
        state: state_rx.clone(),
        enrolled: enrolled_rx,
        orig_dst: orig_dst.clone(),
        metrics: metrics.clone(),
        hbone: Arc::new(HboneConnector::new(
            mesh_tls,
            identities.clone(),
            config.inbound_port,
            config.max_streams_per_connection,
            tokio::runtime::Handle::current().metrics().num_workers(),
        )),
        node: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        node_addrs: node_addrs.clone(),
        buffers: buffers.clone(),
        max_connections_per_pod: config.max_connections_per_pod,
        detect_timeout: config.detect_timeout,
        http_head_timeout: config.http_head_timeout,
        max_streams: config.max_streams_per_connection,
        pool,
        policy: config.policy.clone(),
        drain: drain_watch.clone(),
    });
    tasks.spawn(outbound::serve(outbound_listener, outbound_inputs.clone()));
    if let Some(listener) = outbound6_listener {
        tasks.spawn(outbound::serve(listener, outbound_inputs));
    }
    let admin = {
        let identities = identities.clone();
        let config = config.clone();
        let state = state_rx.clone();
        Arc::new(move |path: &str| match path {
            "/certs" => json(&identities.list()),
            "/config_dump" => {
                let snapshot = state.borrow().clone();
                let mut routes = std::collections::BTreeMap::new();
                for (name, t) in snapshot.routed_services() {
                    if let Some(table) = &t.routes {
                        routes.insert(name.clone(), table.describe());
                    }
                    for (ns, table) in &t.consumer_routes {
                        routes.insert(format!("{name} (callers in {ns})"), table.describe());
                    }
                }
                let traffic: std::collections::BTreeMap<_, _> = snapshot
                    .policed_services()
                    .map(|(name, t)| (name.clone(), t.describe_traffic()))
                    .collect();
                // The effective inbound policy of each pod of this node.
                let policy: std::collections::BTreeMap<_, _> = snapshot
                    .local_pods(&config.node)
                    .map(|pod| {
                        let p = snapshot.policy.for_pod(
                            pod,
                            config.policy.default,
                            &config.policy.cluster_networks,
                        );
                        (format!("{}/{}", pod.namespace, pod.name), p.describe())
                    })
                    .collect();
                json(&serde_json::json!({
                    "config": config, "routes": routes, "traffic": traffic, "policy": policy,
                }))
            }
            "/state" => json(&state.borrow().summary()),
            _ => (
                StatusCode::NOT_FOUND,
                "try /certs, /config_dump or /state\n".to_owned(),
            ),
        })
    };
    let limits = |listener: &'static str| admin::Limits {
        head_timeout: config.head_timeout,
        over_capacity: metrics
            .endpoint_over_capacity
            .with_label_values(&[listener]),
        head_timeouts: metrics
            .endpoint_head_timeouts
            .with_label_values(&[listener]),
    };
    let mut endpoints = vec![tasks.spawn(admin::serve(admin_listener, admin, limits("admin")))];
    let scrape = {
        let metrics = metrics.clone();
        let buffers = buffers.clone();
        let orig_dst = orig_dst.clone();
        Arc::new(move |path: &str| match path {
            "/metrics" => {
                metrics.update_datapath(orig_dst.stats());
                metrics.update_buffers(buffers.used(), buffers.refused());
                (StatusCode::OK, metrics.encode())
            }
            _ => (StatusCode::NOT_FOUND, "try /metrics\n".to_owned()),
        })
    };
    endpoints.push(tasks.spawn(admin::serve(metrics_listener, scrape, limits("metrics"))));
    let health = Arc::new(move |path: &str| match path {
        "/live" => (StatusCode::OK, "live\n".to_owned()),
        "/ready" if health_draining.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining\n".to_owned(),
        ),
        "/ready" if ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: pods still being enrolled\n".to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, "try /ready or /live\n".to_owned()),
    });
    endpoints.push(tasks.spawn(admin::serve(health_listener, health, limits("health"))));
    info!(
        inbound = %addr(config.inbound_port), metrics = %addr(config.metrics_port),
        health = %addr(config.health_port), admin = %admin_addr,
        "agent running"
    );

    if let Some(successor) = successor {
        match tokio::task::spawn_blocking(move || successor.serving()).await {
            Ok(Ok(())) => info!("serving; the previous agent drains what it carries"),
            Ok(Err(e)) => warn!("telling the previous agent we serve: {e}"),
            Err(e) => warn!("telling the previous agent we serve: {e}"),
        }
    }
    // A successor's request ends this agent's run like a signal (nothing else does).
    let handing = Arc::new(AtomicBool::new(false));
    let handover = {
        let path = config.handover_socket.clone();
        let watch = drain_watch.clone();
        let handing = handing.clone();
        async move {
            let Some(path) = path else {
                drop(handed);
                return std::future::pending().await;
            };
            match handover::serve(path, tag, handed, watch, handing).await {
                Some(event) => event,
                None => std::future::pending().await,
            }
        }
    };
    let mut handover = Box::pin(handover);
    let mut handed_over = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: draining"); false }
        _ = sigint.recv() => { info!("SIGINT: draining"); false }
        event = &mut handover => event == handover::Event::HandedOver,
    };
    if !handed_over && handing.load(Ordering::Acquire) {
        // A successor holds our sockets and shares our datapath: stopping the capture now
        // would stop its too. It says within its enrollment time whether it serves.
        info!("a successor is taking over: waiting for it before draining");
        handed_over = tokio::time::timeout(HANDOVER_READY + Duration::from_secs(5), &mut handover)
            .await
            .is_ok_and(|event| event == handover::Event::HandedOver);
    }
    // Our copies of the listening sockets go now: a successor has its own, and nobody must
    // find a socket no one accepts on.
    drop(handover);
    if handed_over {
        // The successor accepts on the same sockets and runs the same programs: we stop
        // accepting, stop writing the maps, and finish what we carry.
        reconciler.abort();
        for task in &endpoints {
            task.abort();
        }
    } else if let Err(e) = capture.stop() {
        // Pods' new connections go directly (fail open, as when no agent runs).
        warn!("could not stop capturing new connections: {e}");
    }
    // The drain starts (not ready from then on, listeners closed), and what the proxy carries
    // gets until the drain timeout to end.
    drain.start();
    info!(
        in_flight = drain.in_flight(),
        timeout = ?config.drain_timeout,
        handed_over,
        "stopped accepting; waiting for the connections in flight"
    );
    // After a handover, the first signal (the orchestrator deleting our pod) changes nothing.
    let mut signals = u8::from(!handed_over);
    let timeout = tokio::time::sleep(config.drain_timeout);
    tokio::pin!(timeout);
    loop {
        tokio::select! {
            _ = drain.finished() => { info!("drained"); break }
            _ = &mut timeout => {
                info!(in_flight = drain.in_flight(), "drain timeout: closing what is left");
                break;
            }
            _ = sigterm.recv() => signals += 1,
            _ = sigint.recv() => signals += 1,
        }
        if signals >= 2 {
            info!("second signal: closing what is left");
            break;
        }
    }
    if handed_over {
        // The successor's heartbeat vouches for the node now.
        capture.hand_over();
        tasks.shutdown().await;
        if config.linger_after_handover && signals == 0 {
            info!("handed over to the next agent; waiting for the signal to stop");
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
        }
        info!("handed over to the next agent; bye");
        return Ok(());
    }
    // Pinned programs stop counting on this agent; dropping the tasks drops the reconciler
    // and with it the datapath: every link that is not pinned detaches.
    capture.leave();
    tasks.shutdown().await;
    match &config.pin_dir {
        Some(dir) => info!(
            dir = %dir.display(),
            "eBPF programs stay pinned for the next agent (pods connect directly meanwhile, \
             fail-closed ones are refused); bye"
        ),
        None => info!("eBPF programs detached; bye"),
    }
    Ok(())
}

fn json(value: &impl Serialize) -> (StatusCode, String) {
    match serde_json::to_string_pretty(value) {
        Ok(body) => (StatusCode::OK, body + "\n"),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The IPv4 addresses of the agent's network namespace.
pub fn local_ipv4_addresses() -> Vec<Ipv4Addr> {
    by_family(&local_addresses()).0
}

/// The global IPv6 addresses of the agent's network namespace (not loopback, not
/// link-local): where an IPv6 listener can be reached from pods.
pub fn global_ipv6_addresses() -> Vec<Ipv6Addr> {
    let mut v6 = by_family(&local_addresses()).1;
    v6.retain(|ip| !ip.is_loopback() && !ip.is_unicast_link_local());
    v6
}

/// `addrs` split into IPv4 and IPv6.
fn by_family(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in addrs {
        match ip {
            IpAddr::V4(ip) => v4.push(*ip),
            IpAddr::V6(ip) => v6.push(*ip),
        }
    }
    (v4, v6)
}

/// Every address of the agent's network namespace.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: non-null sockaddr; family checked before the cast.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(
                    sin.sin_addr.s_addr.to_ne_bytes(),
                )));
            } else if i32::from(family) == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}
