//! The outbound listener (:15001): accepts redirected pod connections, finds where they were
//! going, picks an endpoint and relays bytes both ways (half-close included).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    hbone::HboneConnector, inbound::Baggage, relay::relay_recorded, ClientAddr, OrigDstAddr,
};
use crate::{
    datapath::OrigDstTable,
    identity::Identity,
    metrics::{ConnectionLabels, Metrics},
    state::{Destination, Snapshot},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection from {0} was not redirected by mesh-agent (no original destination recorded); refusing it")]
    NotRedirected(ClientAddr),
    #[error("connection from {0} is not IPv4; only IPv4 is captured")]
    NotIpv4(SocketAddr),
    #[error("{client} dialled the proxy's own listener {orig}; refusing to loop")]
    Loop {
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
        endpoint: SocketAddrV4,
        orig: OrigDstAddr,
        client: ClientAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HBONE to {endpoint} for {client} (dialled {orig}): {source}")]
    Hbone {
        endpoint: SocketAddrV4,
        orig: OrigDstAddr,
        client: ClientAddr,
        #[source]
        source: super::hbone::Error,
    },
    #[error("connecting to {endpoint} for {client} (dialled {orig}) timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        endpoint: SocketAddrV4,
        orig: OrigDstAddr,
        client: ClientAddr,
    },
}

/// Everything the outbound proxy reads.
pub struct ProxyInputs {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub orig_dst: Arc<OrigDstTable>,
    pub metrics: Arc<Metrics>,
    pub hbone: Arc<HboneConnector>,
    /// This node's name: endpoints elsewhere go through HBONE.
    pub node: String,
    pub trust_domain: String,
    /// The listener's own address (a connection dialling it would loop).
    pub listen: SocketAddrV4,
}

/// Accepts until the task is dropped.
pub async fn serve(listener: TcpListener, inputs: Arc<ProxyInputs>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("outbound accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let inputs = inputs.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_connection(&inputs, stream, peer).await {
                info!("outbound: {e}");
            }
        });
    }
}

async fn proxy_connection(
    inputs: &ProxyInputs,
    client_stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), Error> {
    let SocketAddr::V4(peer) = peer else {
        return Err(Error::NotIpv4(peer));
    };
    let client = ClientAddr(peer);
    let orig = OrigDstAddr(
        inputs
            .orig_dst
            .lookup(client.0)
            .ok_or(Error::NotRedirected(client))?,
    );
    if orig.0 == inputs.listen {
        return Err(Error::Loop { client, orig });
    }
    // The connection keeps this snapshot for its whole life.
    let snapshot = inputs.state.borrow().clone();
    let source = snapshot.pod_by_ip(*client.0.ip()).cloned();
    let mut labels = ConnectionLabels::unknown("source");
    if let Some(src) = &source {
        labels.source_workload = src.workload.clone();
        labels.source_namespace = src.namespace.clone();
        labels.source_principal = src.identity(&inputs.trust_domain).to_string();
    }
    let endpoint = match snapshot.resolve(orig.0) {
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
    let destination = snapshot.pod_by_ip(*endpoint.ip()).cloned();
    if let Some(dst) = &destination {
        labels.destination_workload = dst.workload.clone();
        labels.destination_namespace = dst.namespace.clone();
    }
    let route = match (&source, &destination) {
        (Some(src), Some(dst)) if dst.enrolled => {
            let dst_id = dst.identity(&inputs.trust_domain);
            labels.destination_principal = dst_id.to_string();
            let remote = dst.node.as_deref() != Some(inputs.node.as_str());
            match dst.node_ip {
                Some(node_ip) if remote => {
                    labels.connection_security_policy = "mutual_tls";
                    Route::Hbone {
                        source: src.identity(&inputs.trust_domain),
                        destination: dst_id,
                        node_ip,
                    }
                }
                None if remote => {
                    // Without the node's address there is no peer agent to tunnel to. Going
                    // direct keeps the pod reachable; the label and the log say it is plaintext.
                    warn!(pod = %dst.name, "destination pod on another node has no status.hostIP; connecting in plaintext");
                    labels.destination_principal = crate::metrics::UNKNOWN.into();
                    Route::Direct
                }
                _ => {
                    labels.connection_security_policy = "node_local";
                    Route::Direct
                }
            }
        }
        _ => Route::Direct,
    };
    debug!(
        %client, %orig, %endpoint,
        source = %labels.source_principal, destination = %labels.destination_principal,
        security = labels.connection_security_policy,
        "outbound connection"
    );
    let _ = client_stream.set_nodelay(true);

    let result = match route {
        Route::Hbone {
            source,
            destination,
            node_ip,
        } => {
            let baggage = Baggage::header(&labels.source_workload, &labels.source_namespace);
            match inputs
                .hbone
                .connect(&source, &destination, node_ip, endpoint, &baggage)
                .await
            {
                Ok(tunnel) => {
                    relay_recorded(&inputs.metrics, &labels, client_stream, tunnel).await;
                    Ok(())
                }
                Err(e) => Err(Error::Hbone {
                    endpoint,
                    orig,
                    client,
                    source: e,
                }),
            }
        }
        Route::Direct => match connect_direct(endpoint, orig, client).await {
            Ok(upstream) => {
                relay_recorded(&inputs.metrics, &labels, client_stream, upstream).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
    };
    if result.is_err() {
        inputs.metrics.connect_failed(&labels);
    }
    result
}

/// A plain TCP connection to `endpoint`, within [`CONNECT_TIMEOUT`].
async fn connect_direct(
    endpoint: SocketAddrV4,
    orig: OrigDstAddr,
    client: ClientAddr,
) -> Result<TcpStream, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
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

/// How a captured connection leaves the node.
enum Route {
    /// mTLS tunnel to the destination node's agent.
    Hbone {
        source: Identity,
        destination: Identity,
        node_ip: std::net::Ipv4Addr,
    },
    /// Plain TCP: a pod on this node (identity known in-process), or outside the mesh.
    Direct,
}
