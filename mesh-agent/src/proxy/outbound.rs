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

use super::{ClientAddr, OrigDstAddr};
use crate::{
    datapath::OrigDstTable,
    metrics::{ConnectionLabels, Metrics, UNKNOWN},
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
    mut client_stream: TcpStream,
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
    let source = snapshot.pod_by_ip(*client.0.ip());
    let mut labels = ConnectionLabels {
        source_workload: source.map_or(UNKNOWN.into(), |p| p.workload.clone()),
        source_namespace: source.map_or(UNKNOWN.into(), |p| p.namespace.clone()),
        destination_service: UNKNOWN.into(),
        destination_workload: UNKNOWN.into(),
        destination_namespace: UNKNOWN.into(),
    };
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
    if let Some(pod) = snapshot.pod_by_ip(*endpoint.ip()) {
        labels.destination_workload = pod.workload.clone();
        labels.destination_namespace = pod.namespace.clone();
    }
    debug!(
        %client, %orig, %endpoint,
        source = %labels.source_workload, destination = %labels.destination_workload,
        "outbound connection"
    );

    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            inputs.metrics.connect_failed(&labels);
            return Err(Error::Connect {
                endpoint,
                orig,
                client,
                source,
            });
        }
        Err(_) => {
            inputs.metrics.connect_failed(&labels);
            return Err(Error::ConnectTimeout {
                endpoint,
                orig,
                client,
            });
        }
    };
    let _ = client_stream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let mut guard = inputs.metrics.open_connection(labels);
    // copy_bidirectional shuts down each write side when the other side's read ends, so
    // half-closed connections keep flowing in the other direction.
    match tokio::io::copy_bidirectional(&mut client_stream, &mut upstream).await {
        Ok((sent, received)) => {
            guard.sent = sent;
            guard.received = received;
        }
        Err(e) => debug!(%client, %endpoint, "relay ended with an error: {e}"),
    }
    Ok(())
}
