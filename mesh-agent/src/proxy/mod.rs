//! The node proxy: where captured pod connections land.

/// `impl AsyncWrite for $wrapper<S>` by `S`, its field `io`: for wrappers that only watch reads.
macro_rules! forward_async_write {
    ($wrapper:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use forward_async_write;

pub mod detect;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod policy;
pub mod relay;
pub mod sockmap;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use mesh_agent_common::marks;
use tokio::net::{TcpSocket, TcpStream};

use crate::enrolled::EnrolledPod;

/// How long the proxy waits for a TCP connection to an endpoint.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the application wanted to go (recovered from the eBPF maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// Who connected to the proxy (a pod's address and ephemeral port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Connects to `target`, a port of `pod` (enrolled on this node), from inside the pod's network
/// namespace with `client` as the source address: the pod sees the real client, as it would
/// with a sidecar, and nothing crosses its veth. The pod must be prepared for it
/// (`EnrolledPod::transparent`).
/// A connection to a pod of this node from the node's own namespace (the client's address
/// unknown or not usable), marked as the agent's delivery: the kernel's inbound policy, which
/// refuses plaintext the pod's policy does not allow, lets it through (the agent decided it).
pub async fn deliver_from_node(target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = crate::podnet::marked_tcp_socket(mesh_agent_common::marks::DELIVERED, target)?;
    TcpSocket::from_std_stream(socket).connect(target).await
}

pub async fn deliver_in_pod(
    pod: &EnrolledPod,
    client: IpAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = pod.netns.tcp_socket(marks::INBOUND, target, Some(client))?;
    TcpSocket::from_std_stream(socket).connect(target).await
}
