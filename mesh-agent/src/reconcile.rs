//! Turns each snapshot into datapath state: enrolls this node's pods, releases those gone.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    datapath::{Datapath, Enrollment},
    identity::{manager::IdentityManager, Identity},
    metrics::Metrics,
    podnet,
    state::Snapshot,
};

/// How often pods whose namespace was not found yet are looked for again.
const RETRY: Duration = Duration::from_millis(500);

pub struct Reconciler {
    pub node: String,
    pub trust_domain: String,
    pub datapath: Datapath,
    pub identities: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    /// Set while every local pod of the current snapshot is enrolled.
    pub ready: Arc<AtomicBool>,
    enrolled: HashMap<Ipv4Addr, Enrollment>,
}

impl Reconciler {
    pub fn new(
        node: String,
        trust_domain: String,
        datapath: Datapath,
        identities: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            node,
            trust_domain,
            datapath,
            identities,
            metrics,
            ready,
            enrolled: HashMap::new(),
        }
    }

    pub async fn run(mut self, mut state: watch::Receiver<Arc<Snapshot>>) {
        loop {
            let snapshot = state.borrow_and_update().clone();
            let complete = self.reconcile(&snapshot).await;
            self.ready.store(complete, Ordering::Release);
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY), if !complete => {}
            }
        }
    }

    /// Returns whether every local pod is enrolled.
    async fn reconcile(&mut self, snapshot: &Snapshot) -> bool {
        let wanted: HashMap<Ipv4Addr, _> = snapshot
            .local_pods(&self.node)
            .filter_map(|p| Some((p.ip?, p.clone())))
            .collect();
        // Certificates first, so a pod's first captured connection finds its identity.
        let identities: HashSet<Identity> = wanted
            .values()
            .map(|p| p.identity(&self.trust_domain))
            .collect();
        self.identities.sync(&identities);
        let gone: Vec<Ipv4Addr> = self
            .enrolled
            .keys()
            .filter(|ip| !wanted.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            if let Some(e) = self.enrolled.remove(&ip) {
                match self.datapath.unenroll(&e) {
                    Ok(()) => info!(pod_ip = %ip, "pod left the mesh"),
                    Err(err) => warn!(pod_ip = %ip, "releasing pod: {err}"),
                }
            }
        }
        let pending: Vec<Ipv4Addr> = wanted
            .keys()
            .filter(|ip| !self.enrolled.contains_key(ip))
            .copied()
            .collect();
        if !pending.is_empty() {
            let lookup = pending.clone();
            let found = tokio::task::spawn_blocking(move || podnet::find_namespaces(&lookup)).await;
            let found = match found {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    warn!("{e}");
                    HashMap::new()
                }
                Err(e) => {
                    warn!("namespace probe task failed: {e}");
                    HashMap::new()
                }
            };
            for ip in pending {
                let Some(pod) = wanted.get(&ip) else { continue };
                let Some(&netns_cookie) = found.get(&ip) else {
                    debug!(pod = %pod.name, %ip, "network namespace not found yet");
                    continue;
                };
                let (host_ifindex, host_ifname) = match podnet::route_interface(ip) {
                    Ok(i) => i,
                    Err(e) => {
                        warn!(pod = %pod.name, "{e}");
                        continue;
                    }
                };
                // Anti-spoofing needs an interface of the pod's own: a veth nobody else uses.
                let shared = self
                    .enrolled
                    .values()
                    .any(|e| e.host_ifindex == host_ifindex);
                let anti_spoof = !shared && podnet::is_veth(&host_ifname).unwrap_or(false);
                if !anti_spoof {
                    warn!(
                        pod = %pod.name, interface = %host_ifname,
                        "not a veth of the pod's own: no anti-spoofing for this pod"
                    );
                }
                let enrollment = Enrollment {
                    netns_cookie,
                    ip,
                    host_ifname,
                    host_ifindex,
                    anti_spoof,
                };
                match self.datapath.enroll(&enrollment) {
                    Ok(()) => {
                        info!(
                            pod = %format!("{}/{}", pod.namespace, pod.name), %ip,
                            veth = %enrollment.host_ifname, netns_cookie,
                            "pod enrolled"
                        );
                        self.enrolled.insert(ip, enrollment);
                    }
                    Err(e) => warn!(pod = %pod.name, "enrolling: {e}"),
                }
            }
        }
        self.metrics
            .enrolled_pods
            .set(i64::try_from(self.enrolled.len()).unwrap_or(i64::MAX));
        self.enrolled.len() == wanted.len()
    }
}
