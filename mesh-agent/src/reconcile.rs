//! Turns each snapshot into datapath state: enrolls this node's pods, releases those gone, and
//! notices a pod whose sandbox was replaced (new network namespace and veth, same IP), which
//! must be found and guarded again.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    datapath::{Datapath, Enrollment},
    enrolled::{EnrolledPod, EnrolledPods},
    identity::{manager::IdentityManager, Identity},
    limits::Gauge,
    metrics::Metrics,
    podnet::{self, PodNetns},
    state::{Snapshot, Workload},
};

/// How often enrolled pods are checked for a replaced sandbox, and pods not found yet are
/// looked for again: a replaced sandbox is guarded again within about twice this.
const CHECK: Duration = Duration::from_millis(500);
/// A pod with a UID whose sandbox its cgroup has not led to for this long (an unknown runtime
/// layout: the API server gives a pod its address once its sandbox is up) is looked for by
/// probing every namespace of the node...
const FALLBACK_AFTER: Duration = Duration::from_secs(2);
/// ...at most this often.
const FALLBACK_SCAN: Duration = Duration::from_secs(10);

/// One enrolled pod: what the datapath holds for it and the namespace handle.
struct Held {
    enrollment: Enrollment,
    pod: Arc<EnrolledPod>,
    /// Its kernel inbound policy is still to be installed.
    policy_pending: bool,
}

pub struct Reconciler {
    /// What inbound policy falls back on, and where kubelet probes come from when the kernel
    /// cannot tell them by cgroup (the node's addresses; empty when it can).
    pub policy: crate::policy::Defaults,
    pub probe_sources: Vec<crate::policy::Cidr>,
    pub node: String,
    pub trust_domain: String,
    pub datapath: Datapath,
    pub identities: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    /// Set while every local pod of the current snapshot is enrolled.
    pub ready: Arc<AtomicBool>,
    published: watch::Sender<Arc<EnrolledPods>>,
    enrolled: HashMap<Ipv4Addr, Held>,
    /// The snapshot whose workloads the metric series were last pruned against.
    pruned_for: Option<Arc<Snapshot>>,
    /// The snapshot the kernel's inbound policy was last compiled from.
    policy_for: Option<Arc<Snapshot>>,
    /// Drops last read from the kernel, per (ifindex, port).
    drops_seen: HashMap<(u32, u16), u64>,
    /// Finds pods' sandboxes by their cgroups (pods with a UID: from the API server).
    pub sandboxes: Arc<std::sync::Mutex<podnet::Sandboxes>>,
    /// Since when each pod not found yet has been looked for.
    pending_since: HashMap<Ipv4Addr, Instant>,
    /// When every namespace of the node was last probed for pods with a UID.
    last_fallback_scan: Option<Instant>,
}

impl Reconciler {
    pub fn new(
        node: String,
        trust_domain: String,
        datapath: Datapath,
        identities: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
        published: watch::Sender<Arc<EnrolledPods>>,
    ) -> Self {
        Self {
            policy: crate::policy::Defaults::default(),
            probe_sources: Vec::new(),
            node,
            trust_domain,
            datapath,
            identities,
            metrics,
            ready,
            published,
            enrolled: HashMap::new(),
            pruned_for: None,
            policy_for: None,
            drops_seen: HashMap::new(),
            sandboxes: Arc::new(std::sync::Mutex::new(podnet::Sandboxes::new(
                podnet::DEFAULT_CGROUP_ROOT,
            ))),
            pending_since: HashMap::new(),
            last_fallback_scan: None,
        }
    }

    pub async fn run(mut self, mut state: watch::Receiver<Arc<Snapshot>>) {
        loop {
            let snapshot = state.borrow_and_update().clone();
            if !self
                .pruned_for
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &snapshot))
            {
                // Series of workloads that left the cluster go with them, and authorization
                // series of clients whose service account no pod has any more.
                self.metrics
                    .forget_workloads(|ns, workload| snapshot.has_workload(ns, workload));
                // (Both are lookups in the snapshot's own counts: this runs on the proxy's
                // workers, and a scan of a large cluster's pods here stalled requests.)
                if self.metrics.authz.has_clients() {
                    self.metrics.authz.forget_clients(|id| {
                        Identity::from_linkerd(id).is_ok_and(|id| match &id {
                            Identity::Spiffe {
                                namespace,
                                service_account,
                                ..
                            } => snapshot.has_service_account(namespace, service_account),
                        })
                    });
                }
                self.pruned_for = Some(snapshot.clone());
            }
            let complete = self.reconcile(&snapshot).await;
            self.enforce_policy(&snapshot);
            if complete && snapshot.version > 0 && self.datapath.needs_sweep() {
                // A datapath adopted from a previous agent: what it left for pods gone since.
                let cookies = self.enrolled.values().map(|h| h.enrollment.netns_cookie);
                let ifindexes = self.enrolled.values().map(|h| h.enrollment.host_ifindex);
                let removed = self
                    .datapath
                    .sweep(&cookies.collect(), &ifindexes.collect());
                if removed > 0 {
                    info!(
                        removed,
                        "removed what the previous agent left for pods gone since"
                    );
                }
            }
            // Version 0 is the empty state before a source published anything.
            let ready = complete && snapshot.version > 0;
            if ready && !self.ready.load(Ordering::Acquire) {
                // Start-up is over (the eBPF object loaded, the first pods enrolled): what it
                // freed goes back to the system instead of staying in the allocator's free
                // lists for good (about 1.5 MB of the idle agent's 3.8 MB anonymous memory).
                crate::background::release_freed_memory();
            }
            self.ready.store(ready, Ordering::Release);
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(CHECK) => {}
            }
        }
    }

    fn publish(&self) {
        let pods = self.enrolled.values().map(|h| h.pod.clone());
        self.published
            .send_replace(Arc::new(EnrolledPods::new(pods)));
    }

    fn release(&mut self, ip: Ipv4Addr, why: &str) -> Option<u64> {
        let held = self.enrolled.remove(&ip)?;
        let ifindex = held.enrollment.host_ifindex;
        self.drops_seen.retain(|(i, _), _| *i != ifindex);
        match self.datapath.unenroll(&held.enrollment) {
            Ok(()) => info!(pod_ip = %ip, reason = why, "pod released"),
            Err(err) => warn!(pod_ip = %ip, reason = why, "releasing pod: {err}"),
        }
        Some(held.enrollment.netns_cookie)
    }

    /// Whether the pod's sandbox is still the one we enrolled: its node-side interface is the
    /// same, and the namespace we hold still owns the IP.
    fn still_in_place(held: &Held) -> bool {
        let ip = held.enrollment.ip;
        let netns = &held.pod.netns;
        let same_interface =
            podnet::host_interface(netns, ip).is_ok_and(|(i, _)| i == held.enrollment.host_ifindex);
        same_interface && netns.owns(ip)
    }

    /// Compiles each enrolled pod's inbound policy for plaintext into the kernel (when the
    /// snapshot or the enrolled pods changed), and counts what the kernel dropped.
    fn enforce_policy(&mut self, snapshot: &Arc<Snapshot>) {
        let fresh = !self
            .policy_for
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, snapshot));
        for held in self.enrolled.values() {
            if !held.enrollment.anti_spoof || !(fresh || held.policy_pending) {
                continue;
            }
            let ip = std::net::IpAddr::V4(held.enrollment.ip);
            let policy = crate::proxy::policy::resolve(snapshot, ip, &self.policy);
            let compiled = crate::policy::kernel::plaintext(&policy, &self.probe_sources);
            if let Err(e) = self
                .datapath
                .set_policy(held.enrollment.host_ifindex, &compiled)
            {
                warn!(pod = %held.pod.workload.name, "installing inbound policy: {e}");
            }
        }
        for held in self.enrolled.values_mut() {
            held.policy_pending = false;
        }
        self.policy_for = Some(snapshot.clone());
        // Drops, per pod and port.
        let pods: HashMap<u32, &Arc<Workload>> = self
            .enrolled
            .values()
            .map(|h| (h.enrollment.host_ifindex, &h.pod.workload))
            .collect();
        for (ifindex, port, total) in self.datapath.policy_drops() {
            let seen = self.drops_seen.entry((ifindex, port)).or_insert(0);
            let new = total.saturating_sub(*seen);
            *seen = total;
            if let (Some(pod), true) = (pods.get(&ifindex), new > 0) {
                self.metrics
                    .policy_dropped
                    .with_label_values(&[&pod.namespace, &pod.name, &port.to_string()])
                    .inc_by(new);
            }
        }
    }

    /// Returns whether every local pod is enrolled.
    async fn reconcile(&mut self, snapshot: &Snapshot) -> bool {
        let wanted: HashMap<Ipv4Addr, Arc<Workload>> = snapshot
            .local_pods(&self.node)
            .filter_map(|p| Some((p.ip?, p.clone())))
            .collect();
        // Certificates first, so a pod's first captured connection finds its identity.
        let identities: HashSet<Identity> = wanted
            .values()
            .map(|p| p.identity(&self.trust_domain))
            .collect();
        self.identities.sync(&identities);

        let mut stale = HashSet::new();
        let mut changed = false;
        let held: Vec<Ipv4Addr> = self.enrolled.keys().copied().collect();
        for ip in held {
            let Some(h) = self.enrolled.get_mut(&ip) else {
                continue;
            };
            let why = match wanted.get(&ip) {
                None => "left the mesh",
                Some(w) if !w.same_pod(&h.pod.workload) => "another pod now has this address",
                // The guard on its interface must learn the new address.
                Some(w) if w.ip6 != h.enrollment.ip6 => "its IPv6 address changed",
                Some(w) if w.fail_closed != h.enrollment.fail_closed => {
                    "its fail-closed setting changed"
                }
                Some(_) if !Self::still_in_place(h) => {
                    "sandbox replaced (new network namespace or interface)"
                }
                Some(w) => {
                    if !Arc::ptr_eq(w, &h.pod.workload) {
                        // The same pod in a newer snapshot: keep its newest description.
                        h.pod = Arc::new(EnrolledPod {
                            workload: w.clone(),
                            ip,
                            netns: h.pod.netns.clone(),
                            transparent: h.pod.transparent,
                            open: h.pod.open.clone(),
                        });
                        changed = true;
                    }
                    continue;
                }
            };
            changed = true;
            if let Some(cookie) = self.release(ip, why) {
                stale.insert(cookie);
            }
        }
        if changed {
            self.publish();
        }

        let pending: Vec<Ipv4Addr> = wanted
            .keys()
            .filter(|ip| !self.enrolled.contains_key(ip))
            .copied()
            .collect();
        let now = Instant::now();
        self.pending_since.retain(|ip, _| pending.contains(ip));
        for ip in &pending {
            self.pending_since.entry(*ip).or_insert(now);
        }
        if !pending.is_empty() {
            // Pods with a UID by their cgroup; the others (a manifest directory's pods) by
            // probing every namespace, as do pods with a UID whose cgroup led nowhere for
            // a while (an unknown runtime layout), at most every FALLBACK_SCAN.
            let scan_due = self
                .last_fallback_scan
                .is_none_or(|at| now.duration_since(at) >= FALLBACK_SCAN);
            let lookups: Vec<(Ipv4Addr, Option<String>, bool)> = pending
                .iter()
                .filter_map(|ip| {
                    let uid = wanted.get(ip)?.uid.clone();
                    let overdue = self
                        .pending_since
                        .get(ip)
                        .is_some_and(|since| now.duration_since(*since) >= FALLBACK_AFTER);
                    Some((*ip, uid, overdue && scan_due))
                })
                .collect();
            if lookups
                .iter()
                .any(|(_, uid, fallback)| uid.is_some() && *fallback)
            {
                self.last_fallback_scan = Some(now);
            }
            let sandboxes = self.sandboxes.clone();
            let found = tokio::task::spawn_blocking(move || find(&sandboxes, &lookups, &stale));
            let mut found = match found.await {
                Ok((found, scanned)) => {
                    if scanned {
                        self.metrics.netns_scans.inc();
                    }
                    found
                }
                Err(e) => {
                    warn!("namespace probe task failed: {e}");
                    HashMap::new()
                }
            };
            for ip in pending {
                let Some(workload) = wanted.get(&ip) else {
                    continue;
                };
                let Some((netns, how)) = found.remove(&ip) else {
                    debug!(pod = %workload.name, %ip, "network namespace not found yet");
                    continue;
                };
                info!(pod = %workload.name, %ip, how, "pod network namespace found");
                self.metrics.sandboxes_found.with_label_values(&[how]).inc();
                self.pending_since.remove(&ip);
                self.enroll(ip, workload.clone(), netns);
            }
        }
        let enrolled = self.enrolled.len();
        self.metrics
            .enrolled_pods
            .set(i64::try_from(enrolled).unwrap_or(i64::MAX));
        self.metrics
            .pods_awaiting_enrollment
            .set(i64::try_from(wanted.len().saturating_sub(enrolled)).unwrap_or(i64::MAX));
        enrolled == wanted.len()
    }

    fn enroll(&mut self, ip: Ipv4Addr, workload: Arc<Workload>, netns: PodNetns) {
        let (host_ifindex, host_ifname) = match podnet::host_interface(&netns, ip) {
            Ok(i) => i,
            Err(e) => {
                warn!(pod = %workload.name, "{e}");
                return;
            }
        };
        // Anti-spoofing needs an interface of the pod's own: a veth nobody else uses.
        let shared = self
            .enrolled
            .values()
            .any(|h| h.enrollment.host_ifindex == host_ifindex);
        let anti_spoof = !shared && podnet::is_veth(&host_ifname).unwrap_or(false);
        if !anti_spoof {
            warn!(
                pod = %workload.name, interface = %host_ifname,
                "not a veth of the pod's own: no anti-spoofing for this pod"
            );
        }
        let transparent = match netns.route_inbound_to_agent() {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    pod = %workload.name,
                    "cannot set up transparent delivery in the pod's namespace ({e}); \
                     connections to it will come from the node's address"
                );
                false
            }
        };
        let enrollment = Enrollment {
            netns_cookie: netns.cookie,
            ip,
            ip6: workload.ip6,
            host_ifname,
            host_ifindex,
            anti_spoof,
            fail_closed: workload.fail_closed,
        };
        let pod = Arc::new(EnrolledPod {
            workload: workload.clone(),
            ip,
            netns: Arc::new(netns),
            transparent,
            open: Gauge::default(),
        });
        // Published before capture starts, so the proxy knows the pod of its first connection.
        self.enrolled.insert(
            ip,
            Held {
                enrollment: enrollment.clone(),
                pod,
                policy_pending: true,
            },
        );
        self.publish();
        match self.datapath.enroll(&enrollment) {
            Ok(()) => info!(
                pod = %format!("{}/{}", workload.namespace, workload.name), %ip,
                veth = %enrollment.host_ifname, netns_cookie = enrollment.netns_cookie,
                "pod enrolled"
            ),
            Err(e) => {
                warn!(pod = %workload.name, "enrolling: {e}");
                self.enrolled.remove(&ip);
                self.publish();
            }
        }
    }
}

/// Looks for each pending pod's namespace: (address, UID, whether a pod with a UID may be
/// probed for). The namespace found, and how (`cgroup` or `scan`); whether the node's
/// namespaces were scanned.
fn find(
    sandboxes: &std::sync::Mutex<podnet::Sandboxes>,
    lookups: &[(Ipv4Addr, Option<String>, bool)],
    skip: &HashSet<u64>,
) -> (HashMap<Ipv4Addr, (PodNetns, &'static str)>, bool) {
    let mut found = HashMap::new();
    let mut scan = Vec::new();
    {
        // (A panic while it was held leaves nothing half-changed worth refusing over.)
        let mut sandboxes = sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, uid, fallback) in lookups {
            match uid {
                Some(uid) => match sandboxes.find(uid, *ip, skip) {
                    Some(netns) => {
                        found.insert(*ip, (netns, "cgroup"));
                    }
                    None if *fallback => scan.push(*ip),
                    None => {}
                },
                None => scan.push(*ip),
            }
        }
    }
    if !scan.is_empty() {
        match podnet::find_namespaces(&scan, skip) {
            Ok(by_scan) => found.extend(by_scan.into_iter().map(|(ip, ns)| (ip, (ns, "scan")))),
            Err(e) => warn!("{e}"),
        }
    }
    (found, !scan.is_empty())
}
