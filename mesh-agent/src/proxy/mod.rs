//! The node proxy: where captured pod connections land.

pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod relay;

use std::{fmt, net::SocketAddrV4};

/// Where the application wanted to go (recovered from the eBPF maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddrV4);

/// Who connected to the proxy (a pod's address and ephemeral port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddrV4);

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
