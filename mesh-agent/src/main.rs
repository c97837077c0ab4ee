//! The `mesh-agent` binary: parse the command line, set up logging, hand over to `app`.

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser as _;
use mesh_agent::{
    app,
    cli::{Cli, Command, IdentityCommand},
    datapath,
    identity::ca::{CertificateAuthority, DevCa},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .context("--log-level")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    raise_fd_limit();
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            let node_address = match args.node_address {
                Some(a) => a,
                None => app::local_ipv4_addresses()
                    .into_iter()
                    .find(|a| !a.is_loopback())
                    .context(
                        "no non-loopback IPv4 address in this namespace; pass --node-address",
                    )?,
            };
            let node_address6 = args
                .node_address6
                .or_else(|| app::global_ipv6_addresses().into_iter().next());
            let cgroup = match args.cgroup {
                Some(c) => c,
                None => datapath::cgroup2_root()?,
            };
            mesh_agent::podnet::set_proc_root(&args.host_proc);
            let config = app::Config {
                node: args.node,
                source: match (args.manifests, args.kube) {
                    (Some(dir), _) => app::Source::Manifests(dir),
                    (None, _) => app::Source::Kube {
                        kubeconfig: args.kubeconfig,
                    },
                },
                enrollment: args.enrollment,
                node_address,
                node_address6,
                cgroup,
                outbound_port: args.outbound_port,
                metrics_port: args.metrics_port,
                health_port: args.health_port,
                inbound_port: args.inbound_port,
                admin_port: args.admin_port,
                exclude_ports: args.exclude_ports,
                exclude_cidrs: args.exclude_cidrs,
                max_connections_per_pod: args.max_connections_per_pod as usize,
                head_timeout: args.head_timeout,
                detect_timeout: args.detect_timeout,
                drain_timeout: args.drain_timeout,
                pin_dir: args.pin_dir,
                liveness_timeout: args.liveness_timeout,
                sockmap: args.sockmap,
                handover_socket: args.handover_socket,
                linger_after_handover: args.linger_after_handover,
                object_tag: args.object_tag,
                http_head_timeout: args.http_head_timeout,
                metrics_dialect: args.metrics_dialect,
                max_manifest_bytes: args.max_manifest_bytes,
                max_buffered_bytes: args.max_buffered_bytes,
                max_streams_per_connection: args.max_streams_per_connection as usize,
                trust_domain: args.trust_domain,
                identity: match (
                    args.trust_anchors,
                    args.issuer_cert,
                    args.issuer_key,
                    args.dev_ca,
                ) {
                    (Some(trust_anchors), Some(issuer_cert), Some(issuer_key), None) => {
                        app::IdentitySource::Files {
                            trust_anchors,
                            issuer_cert,
                            issuer_key,
                        }
                    }
                    (None, None, None, Some(dir)) => app::IdentitySource::DevCa { dir },
                    (None, None, None, None) if args.kube => app::IdentitySource::Cluster {
                        namespace: args.identity_namespace,
                    },
                    _ => anyhow::bail!(
                        "give --trust-anchors, --issuer-cert and --issuer-key, or --dev-ca DIR, \
                         or (with --kube) read them from the cluster (--identity-namespace)"
                    ),
                },
                cert_lifetime: args.cert_lifetime,
                policy: mesh_agent::policy::Defaults {
                    default: args.default_inbound_policy,
                    cluster_networks: args.cluster_networks.into(),
                    keep_denied_connections: args.keep_denied_connections,
                },
                kubelet_cgroup: args.kubelet_cgroup,
            };
            let workers = args.worker_threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                usize::from,
            );
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name_fn(proxy_thread_name)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(app::run(config))?;
        }
        Command::State(args) => state(args)?,
        Command::Identity(IdentityCommand::DevCa { out, trust_domain }) => {
            let ca = DevCa::generate(&trust_domain)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (file, pem) in [
                ("ca.crt", &ca.anchor_pem),
                ("issuer.crt", &ca.issuer_pem),
                ("issuer.key", &ca.issuer_key_pem),
            ] {
                let path = out.join(file);
                std::fs::write(&path, pem)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        Command::Identity(IdentityCommand::Issue {
            ca,
            identity,
            lifetime,
            cert,
            key,
        }) => {
            let issuer =
                CertificateAuthority::from_files(&ca.join("issuer.crt"), &ca.join("issuer.key"))?;
            let leaf = issuer.mint(&identity, lifetime)?;
            let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der));
            let chain: String = leaf.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
            std::fs::write(&cert, chain).with_context(|| format!("writing {}", cert.display()))?;
            std::fs::write(&key, pem("PRIVATE KEY", leaf.key.secret_der()))
                .with_context(|| format!("writing {}", key.display()))?;
            println!(
                "issued {identity}: {} and {}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

/// `mesh-proxy-N`: the proxy runtime's threads, told apart in `top -H` and profiles (blocking
/// helpers the runtime starts take the next numbers).
fn proxy_thread_name() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("mesh-proxy-{n}")
}

/// One malloc arena per core (glibc's default allows eight per core). Each new thread that
/// allocates gets an arena of its own while it can; the desired-state thread and its parse
/// helpers then scatter a large state's parse garbage over arenas that the long-lived state
/// keeps pinned: at 10k Services that was a quarter of the agent's RSS. Threads beyond the
/// cores share, which their per-thread caches make cheap.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cores).unwrap_or(i32::MAX));
        }
    }
}

/// A node proxy holds two sockets per proxied connection: lift the soft descriptor limit to
/// the hard one, as Envoy and Linkerd do.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-file limit to {}", lim.rlim_max);
            }
        }
    }
}

/// `mesh-agent state`: the first snapshot of a source, summarised.
fn state(args: mesh_agent::cli::StateArgs) -> anyhow::Result<()> {
    use mesh_agent::{metrics::Metrics, source, state::Snapshot};
    use std::sync::Arc;
    let started = std::time::Instant::now();
    let metrics = Arc::new(Metrics::new(mesh_agent::metrics::http::Dialect::Both)?);
    let snapshot: Arc<Snapshot> = match args.manifests {
        Some(dir) => source::files::ManifestDir::new(&dir, u64::MAX, false).initial(&metrics)?,
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let client = source::kube::client(args.kubeconfig.as_deref()).await?;
                let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
                let follow = source::kube::KubeSource::new(true).follow(
                    client,
                    args.node.clone(),
                    tx,
                    metrics.clone(),
                );
                tokio::spawn(follow);
                let first = rx
                    .wait_for(|s| s.version > 0)
                    .await
                    .context("the watchers stopped before the first snapshot")?;
                anyhow::Ok(first.clone())
            })?
        }
    };
    let took = started.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let summary = snapshot.summary();
    let out = serde_json::json!({
        "first_snapshot_ms": took.as_millis() as u64,
        "version": summary.version,
        "pods": summary.pods,
        "local_enrolled_pods": snapshot.local_pods(&args.node).count(),
        "service_ports": summary.service_ports,
        "endpoints": summary.endpoints,
        "rss_kib": kib("VmRSS:"),
        "peak_rss_kib": kib("VmHWM:"),
    });
    println!("{out}");
    Ok(())
}
