//! The pods this node's agent captures, as the proxy needs them: by the network namespace a
//! connection came from (who the client is, as the kernel saw it at `connect()`) and by
//! address (where to deliver). The reconciler publishes a new table on every change.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use crate::{limits::Gauge, podnet::PodNetns, state::Workload};

#[derive(Debug)]
pub struct EnrolledPod {
    pub workload: Arc<Workload>,
    pub ip: Ipv4Addr,
    pub netns: Arc<PodNetns>,
    /// Whether the pod's namespace routes replies to a remote client back to the agent, so
    /// deliveries can keep the client's address (see `PodNetns::route_inbound_to_agent`).
    pub transparent: bool,
    /// Connections the proxy currently holds for this pod as a client (kept across updates
    /// of the pod's description).
    pub open: Gauge,
}

impl EnrolledPod {
    /// The pod's own address in `target`'s family: where its connections to `target` come
    /// from.
    pub fn address_for(&self, target: SocketAddr) -> Option<IpAddr> {
        match target {
            SocketAddr::V4(_) => Some(IpAddr::V4(self.ip)),
            SocketAddr::V6(_) => self.workload.ip6.map(IpAddr::V6),
        }
    }
}

#[derive(Debug, Default)]
pub struct EnrolledPods {
    by_netns: HashMap<u64, Arc<EnrolledPod>>,
    by_ip: HashMap<IpAddr, Arc<EnrolledPod>>,
}

impl EnrolledPods {
    pub fn new(pods: impl IntoIterator<Item = Arc<EnrolledPod>>) -> Self {
        let mut out = Self::default();
        for pod in pods {
            out.by_netns.insert(pod.netns.cookie, pod.clone());
            if let Some(ip6) = pod.workload.ip6 {
                out.by_ip.insert(IpAddr::V6(ip6), pod.clone());
            }
            out.by_ip.insert(IpAddr::V4(pod.ip), pod);
        }
        out
    }

    /// The pod whose network namespace has this cookie.
    pub fn by_netns(&self, cookie: u64) -> Option<&Arc<EnrolledPod>> {
        self.by_netns.get(&cookie)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<EnrolledPod>> {
        self.by_ip.get(&ip)
    }
}
