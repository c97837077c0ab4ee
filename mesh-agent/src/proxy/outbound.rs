//! The outbound listener (:15001): accepts redirected pod connections, finds where they were
//! going and which pod made them, picks an endpoint and relays bytes both ways (half-close
//! included). What it dials directly, it dials from the client pod's own network namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_agent_common::marks;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    detect::{self, Prefixed, Protocol},
    hbone::{HboneConnector, Tunnel, TunnelRequest},
    http::pool::Pool,
    inbound::Baggage,
    relay::relay_recorded,
    sockmap::Reporting,
    ClientAddr, OrigDstAddr,
};

/// A captured client connection, as the proxy serves it: the bytes detection read first, then
/// the socket's (whose reads the socket-map shortcut is told of).
pub type ClientIo = Prefixed<Reporting<TcpStream>>;
use crate::{
    datapath::OrigDstTable,
    enrolled::{EnrolledPod, EnrolledPods},
    limits::ByteBudget,
    metrics::{ConnectionLabels, Metrics},
    podnet::PodNetns,
    state::{
        ports::{Declared, DEFAULT_OPAQUE_PORTS},
        Destination, Snapshot, Workload,
    },
};

use super::CONNECT_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection from {0} was not redirected by mesh-agent (no original destination recorded); refusing it")]
    NotRedirected(ClientAddr),
    #[error("connection from {client} (dialled {orig}) came from a network namespace that is no longer enrolled; refusing it")]
    UnknownSource {
        client: ClientAddr,
        orig: OrigDstAddr,
    },
    #[error("{client} dialled {orig}, an address of the node itself or a local range; the proxy never dials those for a pod")]
    NodeAddress {
        client: ClientAddr,
        orig: OrigDstAddr,
    },
    #[error("pod {pod} already holds {limit} proxied connections (--max-connections-per-pod); refusing {client} -> {orig}")]
    ConnectionLimit {
        pod: String,
        limit: usize,
        client: ClientAddr,
        orig: OrigDstAddr,
    },
    #[error("service {service} has no ready endpoints (dialled {orig} from {client})")]
    NoEndpoints {
        service: String,
        orig: OrigDstAddr,
        client: ClientAddr,
    },
    #[error("connecting to {endpoint} for {client} (dialled {orig}): {source}")]
    Connect {
        endpoint: SocketAddr,
        orig: OrigDstAddr,
        client: ClientAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HBONE to {endpoint} for {client} (dialled {orig}): {source}")]
    Hbone {
        endpoint: SocketAddr,
        orig: OrigDstAddr,
        client: ClientAddr,
        #[source]
        source: super::hbone::Error,
    },
    #[error("connecting to {endpoint} for {client} (dialled {orig}) timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        endpoint: SocketAddr,
        orig: OrigDstAddr,
        client: ClientAddr,
    },
    #[error("{client} to {endpoint} (dialled {orig}) denied by the pod's policy: {by}")]
    Denied {
        endpoint: SocketAddr,
        orig: OrigDstAddr,
        client: ClientAddr,
        by: String,
    },
}

impl Error {
    /// The `reason` label of `mesh_outbound_refused_total`, for refusals by policy of the proxy
    /// (as opposed to failures to connect onwards).
    fn refusal(&self) -> Option<&'static str> {
        match self {
            Error::NotRedirected(_) => Some("not_redirected"),
            Error::UnknownSource { .. } => Some("unknown_source"),
            Error::NodeAddress { .. } => Some("node_address"),
            Error::ConnectionLimit { .. } => Some("connection_limit"),
            Error::Denied { .. } => Some("policy"),
            _ => None,
        }
    }
}

/// Everything the outbound proxy reads.
pub struct ProxyInputs {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub enrolled: watch::Receiver<Arc<EnrolledPods>>,
    pub orig_dst: Arc<OrigDstTable>,
    pub metrics: Arc<Metrics>,
    pub hbone: Arc<HboneConnector>,
    /// This node's name: endpoints elsewhere go through HBONE.
    pub node: String,
    pub trust_domain: String,
    /// The node's own addresses: never dialled on a pod's behalf.
    pub node_addrs: Vec<IpAddr>,
    /// Relay buffers of all connections.
    pub buffers: Arc<ByteBudget>,
    /// Connections one pod may hold through the proxy at once.
    pub max_connections_per_pod: usize,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// An HTTP client's request head must arrive within this.
    pub http_head_timeout: Duration,
    /// Concurrent streams one HTTP/2 client connection may open.
    pub max_streams: usize,
    /// Upstream HTTP connections.
    pub pool: Arc<Pool>,
    /// What inbound policy falls back on (for deliveries to pods of this node).
    pub policy: crate::policy::Defaults,
    /// Tells the listener and its connections that the agent drains.
    pub drain: crate::drain::Watch,
}

/// Whether a pod's original destination is the node itself or a range that only means
/// something on its own host: the capture programs never redirect these, and the proxy, which
/// runs in the node's namespace, refuses them should one arrive anyway.
pub fn is_node_local(ip: IpAddr, node_addrs: &[IpAddr]) -> bool {
    is_host_scoped(ip) || node_addrs.contains(&ip)
}

/// Addresses no Service endpoint may have. (A node address may: hostNetwork pods back
/// Services, and the proxy dials from the client pod's namespace, where the node's address is
/// only as reachable as it is to the pod itself.)
pub fn is_host_scoped(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_broadcast()
                || ip.is_multicast()
        }
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_host_scoped(IpAddr::V4(v4)),
            None => {
                ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_unicast_link_local()
                    || ip.is_multicast()
            }
        },
    }
}

/// Accepts until the task is dropped or the agent drains.
pub async fn serve(listener: TcpListener, inputs: Arc<ProxyInputs>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Draining: nothing new is captured any more; the listener closes.
            () = inputs.drain.draining() => return,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("outbound accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let inputs = inputs.clone();
        let held = inputs.drain.hold();
        tokio::spawn(async move {
            let _held = held;
            if let Err(e) = proxy_connection(&inputs, stream, peer).await {
                match e.refusal() {
                    // A pod can provoke these at will: counted, and logged only at debug so
                    // it cannot flood the node's logs.
                    Some(reason) => {
                        inputs
                            .metrics
                            .outbound_refused
                            .with_label_values(&[reason])
                            .inc();
                        debug!("outbound refused: {e}");
                    }
                    None => info!("outbound: {e}"),
                }
            }
        });
    }
}

async fn proxy_connection(
    inputs: &Arc<ProxyInputs>,
    client_stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), Error> {
    let client = ClientAddr(peer);
    let captured = inputs
        .orig_dst
        .take(client.0)
        .ok_or(Error::NotRedirected(client))?;
    let orig = OrigDstAddr(captured.orig_dst);
    // Who the client is comes from the network namespace it connected from, as the kernel saw
    // it: never from its address.
    let source = inputs
        .enrolled
        .borrow()
        .by_netns(captured.netns_cookie)
        .cloned()
        .ok_or(Error::UnknownSource { client, orig })?;
    if is_node_local(orig.0.ip(), &inputs.node_addrs) {
        return Err(Error::NodeAddress { client, orig });
    }
    let _slot = source
        .open
        .try_take(inputs.max_connections_per_pod)
        .ok_or_else(|| Error::ConnectionLimit {
            pod: format!("{}/{}", source.workload.namespace, source.workload.name),
            limit: inputs.max_connections_per_pod,
            client,
            orig,
        })?;
    // The connection keeps this snapshot for its whole life.
    let snapshot = inputs.state.borrow().clone();
    let destination = snapshot.resolve(orig.0);
    let _ = client_stream.set_nodelay(true);
    let mut client_stream = Reporting::new(client_stream, &inputs.orig_dst, peer);
    // Declared opaque: relayed at once, no detection delay. Otherwise the client's first
    // bytes tell (a server-speaks-first protocol waits out the detection timeout).
    // A port declared HTTP is served as HTTP whatever comes (garbage gets 400, a slow head
    // the head timeout); detection only tells HTTP/1 from prior-knowledge HTTP/2 there.
    let declared = declared_protocol(&destination, orig.0.port());
    let (protocol, prefix) = match declared {
        Some(Declared::Opaque) => (Protocol::Opaque, Default::default()),
        Some(Declared::Http2) => (Protocol::Http2, Default::default()),
        _ => match detect::sniff(&mut client_stream, inputs.detect_timeout).await {
            Ok((Protocol::Opaque, prefix)) if declared == Some(Declared::Http) => {
                (Protocol::Http1, prefix)
            }
            Ok(found) => found,
            Err(e) => {
                debug!(%client, %orig, "client connection failed during protocol detection: {e}");
                return Ok(());
            }
        },
    };
    let client_stream = Prefixed::new(prefix, client_stream);
    let conn = Connection {
        inputs: inputs.clone(),
        source,
        client,
        orig,
        snapshot,
    };
    match protocol {
        Protocol::Opaque => relay_opaque(&conn, &destination, client_stream).await,
        http => {
            super::http::outbound::serve(conn, destination, client_stream, http).await;
            Ok(())
        }
    }
}

/// What the users declared for where a connection goes: the Service port's protocol, else the
/// destination pod's opaque ports; an address outside the mesh only by Linkerd's default
/// opaque ports.
fn declared_protocol(destination: &Destination, port: u16) -> Option<Declared> {
    match destination {
        Destination::Service(svc) => svc.declared,
        Destination::Pod(pod) => pod.opaque_ports.contains(port).then_some(Declared::Opaque),
        Destination::Passthrough => DEFAULT_OPAQUE_PORTS
            .contains(&port)
            .then_some(Declared::Opaque),
    }
}

/// One captured connection, identified.
pub struct Connection {
    pub inputs: Arc<ProxyInputs>,
    pub source: Arc<EnrolledPod>,
    pub client: ClientAddr,
    pub orig: OrigDstAddr,
    pub snapshot: Arc<Snapshot>,
}

/// How traffic from `source` to `endpoint` leaves this node, and the identity of the
/// destination when it is in the mesh.
pub fn hop_to(
    inputs: &ProxyInputs,
    source: &EnrolledPod,
    endpoint: SocketAddr,
    destination: Option<&Arc<Workload>>,
) -> Hop {
    let Some(dst) = destination.filter(|d| d.enrolled) else {
        return Hop::Direct;
    };
    let remote = dst.node.as_deref() != Some(inputs.node.as_str());
    match dst.node_ip {
        Some(node_ip) if remote => Hop::Hbone {
            destination: dst.clone(),
            node_ip,
        },
        None if remote => {
            // Without the node's address there is no peer agent to tunnel to. Going direct
            // keeps the pod reachable; the label (`none`) says it is plaintext. (Logged at
            // debug: this runs per request, and a pod could flood the log with it.)
            debug!(pod = %dst.name, "destination pod on another node has no status.hostIP; connecting in plaintext");
            Hop::Direct
        }
        _ => {
            // Delivered inside the destination pod, from the client's address (as the HBONE
            // inbound side does): no veth to cross. Direct from the client pod if the
            // destination is not (yet) enrolled here.
            let local = inputs.enrolled.borrow().by_ip(endpoint.ip()).cloned();
            match (local, source.address_for(endpoint)) {
                (Some(pod), Some(client)) if pod.transparent => Hop::Local { pod, client },
                _ => Hop::LocalDirect,
            }
        }
    }
}

async fn relay_opaque(
    conn: &Connection,
    destination: &Destination,
    client_stream: ClientIo,
) -> Result<(), Error> {
    let (inputs, source, client, orig) = (&*conn.inputs, &conn.source, conn.client, conn.orig);
    let src = &source.workload;
    let mut labels = ConnectionLabels::unknown("source");
    labels.source_workload = src.workload.clone();
    labels.source_namespace = src.namespace.clone();
    labels.source_principal = src.identity(&inputs.trust_domain).to_string();
    let endpoint = match destination {
        Destination::Service(svc) => {
            labels.destination_service = svc.fqdn();
            labels.destination_namespace = svc.namespace.clone();
            svc.pick().ok_or_else(|| Error::NoEndpoints {
                service: svc.fqdn(),
                orig,
                client,
            })?
        }
        Destination::Pod(_) | Destination::Passthrough => orig.0,
    };
    if is_host_scoped(endpoint.ip()) {
        return Err(Error::NodeAddress { client, orig });
    }
    let dst = conn.snapshot.pod_by_ip(endpoint.ip()).cloned();
    if let Some(dst) = &dst {
        labels.destination_workload = dst.workload.clone();
        labels.destination_namespace = dst.namespace.clone();
        if dst.enrolled {
            labels.destination_principal = dst.identity(&inputs.trust_domain).to_string();
        }
    }
    let hop = hop_to(inputs, source, endpoint, dst.as_ref());
    labels.connection_security_policy = hop.security();
    if matches!(hop, Hop::Direct) && dst.as_ref().is_some_and(|d| d.enrolled) {
        labels.destination_principal = crate::metrics::UNKNOWN.into();
    }
    debug!(
        %client, %orig, %endpoint,
        source = %labels.source_principal, destination = %labels.destination_principal,
        security = labels.connection_security_policy,
        "outbound connection"
    );

    // A pod of this node: its inbound policy is checked here, before any byte reaches it.
    let policy = match (&hop, &dst) {
        (Hop::Local { .. } | Hop::LocalDirect, Some(d)) if d.enrolled => {
            let check = local_policy(inputs, source, endpoint);
            let verdict = check.check(None);
            if !verdict.allowed {
                return Err(Error::Denied {
                    endpoint,
                    orig,
                    client,
                    by: format!("{} {}", verdict.authz.kind, verdict.authz.name),
                });
            }
            Some(check)
        }
        _ => None,
    };
    let upstream = match hop {
        Hop::Hbone {
            destination,
            node_ip,
        } => {
            let trust_domain = &inputs.trust_domain;
            let (source_id, destination) = (
                source.workload.identity(trust_domain),
                destination.identity(trust_domain),
            );
            let tunnel = TunnelRequest {
                baggage: Baggage::header(&labels.source_workload, &labels.source_namespace),
                forwarded_for: source.address_for(endpoint),
                protocol: Protocol::Opaque,
            };
            inputs
                .hbone
                .connect(&source_id, &destination, node_ip, endpoint, &tunnel)
                .await
                .map(Upstream::Tunnel)
                .map_err(|e| Error::Hbone {
                    endpoint,
                    orig,
                    client,
                    source: e,
                })
        }
        Hop::Local { pod, client: from } => {
            let connecting = super::deliver_in_pod(&pod, from, endpoint);
            timed_connect(connecting, endpoint, orig, client)
                .await
                .map(Upstream::Tcp)
        }
        Hop::LocalDirect | Hop::Direct => {
            let connecting = connect_from_pod(&source.netns, endpoint);
            timed_connect(connecting, endpoint, orig, client)
                .await
                .map(Upstream::Tcp)
        }
    };
    let (metrics, buffers) = (&inputs.metrics, &inputs.buffers);
    match upstream {
        Ok(Upstream::Tunnel(t)) => {
            relay_recorded(metrics, buffers, &labels, client_stream, t).await
        }
        Ok(Upstream::Tcp(s)) => {
            let relay = relay_recorded(metrics, buffers, &labels, client_stream, s);
            match &policy {
                // A policy change that denies it closes it.
                Some(check) => tokio::select! {
                    () = relay => {}
                    () = check.until_denied() => {}
                },
                None => relay.await,
            }
        }
        Err(e) => {
            metrics.connect_failed(&labels);
            return Err(e);
        }
    }
    Ok(())
}

/// The inbound policy of the pod of this node at `endpoint`, for connections from `source`
/// (whose identity the agent knows in-process).
pub fn local_policy(
    inputs: &ProxyInputs,
    source: &EnrolledPod,
    endpoint: SocketAddr,
) -> super::policy::PolicyCheck {
    super::policy::PolicyCheck::new(
        endpoint,
        Some(source.workload.identity(&inputs.trust_domain)),
        source.address_for(endpoint),
        inputs.state.clone(),
        inputs.policy.clone(),
        inputs.metrics.clone(),
    )
}

/// Where a connection was connected onwards.
enum Upstream {
    Tunnel(Tunnel),
    Tcp(TcpStream),
}

/// A plain TCP connection to `endpoint` opened from inside the client pod's own network
/// namespace: the destination sees the pod's address, and the pod's network position (routes,
/// NetworkPolicy) applies, never the node's.
pub async fn connect_from_pod(
    netns: &PodNetns,
    endpoint: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = netns.tcp_socket(marks::OUTBOUND, endpoint, None)?;
    TcpSocket::from_std_stream(socket).connect(endpoint).await
}

/// `connecting`, within [`CONNECT_TIMEOUT`], with errors that say what was being connected.
pub async fn timed_connect(
    connecting: impl std::future::Future<Output = std::io::Result<TcpStream>>,
    endpoint: SocketAddr,
    orig: OrigDstAddr,
    client: ClientAddr,
) -> Result<TcpStream, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(Error::Connect {
            endpoint,
            orig,
            client,
            source,
        }),
        Err(_) => Err(Error::ConnectTimeout {
            endpoint,
            orig,
            client,
        }),
    }
}

/// How a captured connection (or request) leaves the node.
pub enum Hop {
    /// mTLS tunnel to the destination node's agent, as the source pod's identity to the
    /// `destination` pod's (the caller makes both: per connection, or cached per client).
    Hbone {
        destination: Arc<Workload>,
        node_ip: std::net::Ipv4Addr,
    },
    /// Plain TCP inside a pod of this node, from the client's address (identities known
    /// in-process).
    Local {
        pod: Arc<EnrolledPod>,
        client: IpAddr,
    },
    /// A mesh pod of this node that cannot (yet) be delivered to in its namespace: plain TCP
    /// from the client pod's namespace, identities still known in-process.
    LocalDirect,
    /// Plain TCP from the client pod's namespace: outside the mesh.
    Direct,
}

impl Hop {
    /// Istio's `connection_security_policy` for traffic on this hop.
    pub fn security(&self) -> &'static str {
        match self {
            Hop::Hbone { .. } => "mutual_tls",
            Hop::Local { .. } | Hop::LocalDirect => "node_local",
            Hop::Direct => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn node_local_destinations() {
        let node: [IpAddr; 2] = ["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "127.8.9.10",
            "169.254.169.254",
            "10.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_node_local(ip.parse().unwrap(), &node), "{ip}");
        }
        for ip in [
            "10.0.0.2",
            "10.1.1.2",
            "10.96.0.10",
            "8.8.8.8",
            "fd00::2",
            "fd00:96::10",
        ] {
            assert!(!is_node_local(ip.parse().unwrap(), &node), "{ip}");
        }
        // A Service endpoint may be a node (hostNetwork pods), never loopback.
        assert!(!is_host_scoped("10.0.0.1".parse().unwrap()));
        assert!(is_host_scoped("127.0.0.1".parse().unwrap()));
    }
}
