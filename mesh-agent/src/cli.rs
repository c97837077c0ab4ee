//! Command line of the `mesh-agent` binary.

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Parser, Subcommand};

/// Node-level service mesh agent: eBPF capture into one shared per-node proxy.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,mesh_agent=debug`); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for one node.
    Run(Box<RunArgs>),
    /// Identity helpers.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Read the desired state once, from a manifest directory or the API server, print what
    /// the agent would run with (object counts, time to the first snapshot, the memory it
    /// took) as JSON, and exit. No eBPF, no listeners: safe anywhere.
    State(StateArgs),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Write a development trust anchor and issuer (ca.crt, issuer.crt, issuer.key) for
    /// `run --trust-anchors/--issuer-cert/--issuer-key`, like Linkerd's install inputs.
    DevCa {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate from issuer files, for tools outside the mesh (a sidecar
    /// baseline, a test client): writes the chain (leaf, issuer) and the key as PEM.
    Issue {
        /// Directory holding issuer.crt and issuer.key (as written by `dev-ca`).
        #[arg(long)]
        ca: PathBuf,
        /// The identity, SPIFFE or Linkerd form.
        #[arg(long)]
        identity: crate::identity::Identity,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        lifetime: std::time::Duration,
        /// Where to write the certificate chain.
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the private key.
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The node whose pods count as local.
    #[arg(long, visible_alias = "node-name", env = "NODE_NAME")]
    pub node: String,
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    pub manifests: Option<PathBuf>,
    #[arg(long)]
    pub kube: bool,
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name: pods with this `spec.nodeName` are enrolled.
    #[arg(long, visible_alias = "node-name", env = "NODE_NAME")]
    pub node: String,
    /// Directory of Kubernetes YAML manifests (re-read when it changes).
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    pub manifests: Option<PathBuf>,
    /// A writable procfs (the host's, mounted into the agent's container: a container's own
    /// `/proc/sys` is read-only), for the sysctl set inside each pod's network namespace.
    #[arg(long, default_value = "/proc")]
    pub host_proc: PathBuf,
    /// Read the desired state from the Kubernetes API server (in-cluster service account,
    /// else `--kubeconfig`, `KUBECONFIG` or `~/.kube/config`).
    #[arg(long)]
    pub kube: bool,
    /// The kubeconfig file to reach the API server with (`--kube`).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// Which pods are enrolled: those that opt in, themselves or by their namespace
    /// (`mesh-agent.io/inject: enabled`, `linkerd.io/inject: enabled`, the label
    /// `istio.io/dataplane-mode: ambient`, ...), or all but those that opt out
    /// [default: opt-in with --kube, all with --manifests].
    #[arg(long, value_enum)]
    pub enrollment: Option<crate::app::Enrollment>,
    /// The node's address for the listeners [default: the first non-loopback IPv4 address].
    #[arg(long)]
    pub node_address: Option<Ipv4Addr>,
    /// The node's IPv6 address for the IPv6 outbound listener [default: the first global IPv6
    /// address, if any; without one, native IPv6 is not captured].
    #[arg(long)]
    pub node_address6: Option<std::net::Ipv6Addr>,
    /// cgroup v2 directory to attach to [default: the cgroup v2 root from /proc/self/mountinfo].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Outbound capture listener port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 15020)]
    pub metrics_port: u16,
    /// Readiness/liveness port.
    #[arg(long, default_value_t = 15021)]
    pub health_port: u16,
    /// HBONE (mTLS) inbound port.
    #[arg(long, default_value_t = 15008)]
    pub inbound_port: u16,
    /// Admin port (config dump, certificates), bound on 127.0.0.1.
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// PEM bundle of trust anchors (with --issuer-cert and --issuer-key).
    #[arg(long, requires_all = ["issuer_cert", "issuer_key"], conflicts_with = "dev_ca")]
    pub trust_anchors: Option<PathBuf>,
    /// Issuer certificate (PEM) that signs workload certificates.
    #[arg(long, requires = "trust_anchors")]
    pub issuer_cert: Option<PathBuf>,
    /// Issuer private key (PEM).
    #[arg(long, requires = "trust_anchors")]
    pub issuer_key: Option<PathBuf>,
    /// Generate a throwaway anchor and issuer; write the anchor (not the key) to DIR and trust
    /// every anchor there, so the agents of one testbed trust each other.
    #[arg(long, value_name = "DIR", conflicts_with = "identity_namespace")]
    pub dev_ca: Option<PathBuf>,
    /// With `--kube` and neither `--trust-anchors` nor `--dev-ca`: the namespace holding the
    /// identity material in Linkerd's layout (ConfigMap `linkerd-identity-trust-roots`, Secret
    /// `linkerd-identity-issuer`), watched for rotation.
    #[arg(long, default_value = "linkerd")]
    pub identity_namespace: String,
    /// Lifetime of workload certificates (renewed at half life): e.g. 24h, 30m, 20s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: std::time::Duration,
    /// Destination port never captured (repeatable).
    #[arg(long = "exclude-port")]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDR never captured, e.g. 10.0.0.0/8 (repeatable).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<(Ipv4Addr, u8)>,
    /// Linkerd's cluster-wide default inbound policy, for pods whose annotation and
    /// namespace's annotation (`config.linkerd.io/default-inbound-policy`) say nothing:
    /// all-unauthenticated, all-authenticated, cluster-authenticated, cluster-unauthenticated,
    /// deny or audit.
    #[arg(long, default_value = "all-unauthenticated", value_parser = |s: &str| s.parse::<crate::policy::DefaultPolicy>())]
    pub default_inbound_policy: crate::policy::DefaultPolicy,
    /// The cluster's networks (Linkerd's `clusterNetworks`), for the `cluster-*` default
    /// policies; comma-separated CIDRs.
    #[arg(long, value_delimiter = ',', default_value = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8", value_parser = |s: &str| s.parse::<crate::policy::Cidr>())]
    pub cluster_networks: Vec<crate::policy::Cidr>,
    /// Keep open connections that a policy change denies (by default they are closed).
    #[arg(long)]
    pub keep_denied_connections: bool,
    /// The kubelet's cgroup (v2 directory, e.g. /sys/fs/cgroup/system.slice/kubelet.service):
    /// its probes pass the kernel's inbound policy on probe ports. Without it, probes are told
    /// by the node's addresses (any process of the node's network then passes there).
    #[arg(long)]
    pub kubelet_cgroup: Option<PathBuf>,
    /// Connections one pod may hold through the node proxy at once; more are refused and
    /// counted in `mesh_outbound_refused_total{reason="connection_limit"}`.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: u32,
    /// Bytes of relay buffer the proxy may hold across all connections: a bulk connection
    /// grows its buffers only while this has room (else it keeps small ones and goes slower;
    /// `mesh_buffer_budget_refused_total` counts that).
    #[arg(long, default_value_t = 256 << 20)]
    pub max_buffered_bytes: usize,
    /// Manifest files larger than this many bytes are refused with an error naming the file
    /// (the last good state stays): parsing memory grows with the file.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_manifest_bytes: u64,
    /// Tunnels one HBONE connection carries at once: this agent opens another connection to a
    /// peer beyond it, and refuses more from a peer (`mesh_inbound_refused_total{reason=
    /// "stream_limit"}`). Every agent of a mesh should use the same value.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// The metrics, health and admin listeners drop a client whose request head has not fully
    /// arrived by then, and the HBONE port one whose TLS handshake has not (slowloris): e.g.
    /// 10s, 2s.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub head_timeout: std::time::Duration,
    /// How long the proxy waits for a client's first bytes to tell HTTP from other protocols
    /// on a port that declares none; then the connection is relayed as opaque TCP, every byte
    /// intact (server-speaks-first protocols wait this long for their banner).
    #[arg(long, default_value = "300ms", value_parser = parse_timeout)]
    pub detect_timeout: std::time::Duration,
    /// Threads of the proxy's runtime (named `mesh-proxy-N`) [default: the CPUs this process
    /// may run on]. The desired-state and Kubernetes threads are apart from these.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// On SIGTERM the agent stops capturing new connections (they go directly, as when no
    /// agent runs), stops accepting, asks HTTP clients and HBONE peers to go elsewhere, and
    /// waits this long at most for the connections it carries to end (a second signal ends
    /// it at once): e.g. 20s, 500ms.
    #[arg(long, default_value = "20s", value_parser = parse_timeout)]
    pub drain_timeout: std::time::Duration,
    /// Pin the eBPF links in this directory of a BPF file system (e.g. /sys/fs/bpf/mesh-agent)
    /// so they outlive the agent: pods annotated `mesh-agent.io/fail-closed: "true"` are then
    /// refused, not sent out in plaintext, while no agent runs. Without it, the programs
    /// detach when the agent exits and every pod connects directly.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// With --pin-dir: how long after the agent stops (crashed, killed, hung) its pinned
    /// programs stop steering pods into it.
    #[arg(long, default_value = "600ms", value_parser = parse_timeout)]
    pub liveness_timeout: std::time::Duration,
    /// With --pin-dir: a Unix socket where the running agent hands its listening sockets to
    /// the next one (a restart or an upgrade started while it runs): no connection is refused
    /// or reset, and the pinned programs never stop. A successor of another build (other map
    /// layouts) is refused: the running agent then drains and the successor starts once it
    /// is gone.
    #[arg(long, requires = "pin_dir")]
    pub handover_socket: Option<PathBuf>,
    /// After handing over and draining, wait for a termination signal instead of exiting:
    /// under Kubernetes an exited container is restarted, and the DaemonSet controller stops
    /// the old pod itself once the new one is available.
    #[arg(long, requires = "handover_socket")]
    pub linger_after_handover: bool,
    /// Experimental: pods' sends to the node proxy skip TCP. The kernel queues them straight
    /// onto the proxy's socket (sockmap and sk_msg) within a window the proxy's reads open, and
    /// a connection whose proxy falls behind goes back to TCP for good. Off by default: a pod
    /// socket in a socket map takes the kernel's sockmap receive path, where a *blocking* read
    /// can fail with EAGAIN while the same socket is being written (event-driven servers and
    /// clients, which wait for readiness, are unaffected); and it did not raise request rates
    /// in `cargo xtask bench` (see the README).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub sockmap: bool,
    /// Tests only: the build this agent claims to be (version skew), instead of its eBPF
    /// object's hash.
    #[arg(long, hide = true)]
    pub object_tag: Option<String>,
    /// Whose names the HTTP metrics use: Linkerd's (`request_total`, `response_total`,
    /// `response_latency_ms`), Istio's (`istio_requests_total`, ...), or both.
    #[arg(long, value_enum, default_value_t = crate::metrics::http::Dialect::Both)]
    pub metrics_dialect: crate::metrics::http::Dialect,
    /// A client that has not sent a whole HTTP request head this long after the previous
    /// request (or the connection's start) is closed; heads larger than 64 KiB get 431.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub http_head_timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 24h, 30m, 20s"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs < 2 {
        return Err(format!("{s:?}: lifetime must be at least 2s"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?}: expected e.g. 10s or 300ms");
    let duration = match s.strip_suffix("ms") {
        Some(ms) => std::time::Duration::from_millis(ms.parse().map_err(|_| bad())?),
        None => std::time::Duration::from_secs(
            s.strip_suffix('s')
                .unwrap_or(s)
                .parse()
                .map_err(|_| bad())?,
        ),
    };
    if duration.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(duration)
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?;
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_cidr("10.1.2.3"), Ok((Ipv4Addr::new(10, 1, 2, 3), 32)));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("x/8").is_err());
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("1s").is_err());
    }
}
