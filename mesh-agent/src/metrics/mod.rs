//! Prometheus metrics of the agent, served node-locally at `:15020/metrics`.
//!
//! TCP names follow Istio's TCP metrics with a `mesh_` prefix and Istio's label names, so
//! existing dashboards and queries carry over with a rename; HTTP metrics ([`http`]) use
//! Linkerd's and Istio's own names.

pub mod authz;
pub mod http;

use std::{collections::HashSet, sync::Mutex};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// What a proxied connection is labelled with. Unknown values are `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// `source` (the client's node agent) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_namespace: String,
    /// The client's SPIFFE ID.
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    /// The server's SPIFFE ID.
    pub destination_principal: String,
    /// `mutual_tls` (HBONE between nodes), `node_local` (same node, identity known
    /// in-process, no TLS) or `none` (outside the mesh).
    pub connection_security_policy: &'static str,
}

impl ConnectionLabels {
    const NAMES: [&'static str; 9] = [
        "reporter",
        "source_workload",
        "source_namespace",
        "source_principal",
        "destination_service",
        "destination_workload",
        "destination_namespace",
        "destination_principal",
        "connection_security_policy",
    ];

    fn values(&self) -> [&str; 9] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_service,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            self.connection_security_policy,
        ]
    }

    /// All `unknown`, for `reporter`.
    pub fn unknown(reporter: &'static str) -> Self {
        Self {
            reporter,
            source_workload: UNKNOWN.into(),
            source_namespace: UNKNOWN.into(),
            source_principal: UNKNOWN.into(),
            destination_service: UNKNOWN.into(),
            destination_workload: UNKNOWN.into(),
            destination_namespace: UNKNOWN.into(),
            destination_principal: UNKNOWN.into(),
            connection_security_policy: "none",
        }
    }
}

pub const UNKNOWN: &str = "unknown";

/// Values read from the eBPF maps at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct DatapathStats {
    pub redirected: u64,
    pub spoofed_dropped: u64,
    pub foreign_dropped: u64,
    pub orig_dst_publish_failed: u64,
    pub fail_closed_refused: u64,
    pub sockmap_connections: u64,
    pub sockmap_bytes: u64,
    pub sockmap_window_fallbacks: u64,
    pub sockmap_peerless_fallbacks: u64,
    pub sockmap_flows_tracked: u64,
    pub redirects_tracked: u64,
    pub orig_dst_tracked: u64,
}

pub struct Metrics {
    registry: Registry,
    pub http: http::HttpMetrics,
    pub authz: authz::AuthzMetrics,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    connect_failures: IntCounterVec,
    /// Every label set the connection series exist for, so those of workloads gone from the
    /// cluster can be removed.
    series: Mutex<HashSet<ConnectionLabels>>,
    manifest_reloads: IntCounterVec,
    state_apply: Histogram,
    pub inbound_refused: IntCounterVec,
    pub outbound_refused: IntCounterVec,
    pub endpoint_over_capacity: IntCounterVec,
    pub endpoint_head_timeouts: IntCounterVec,
    pub enrolled_pods: IntGauge,
    pub pods_awaiting_enrollment: IntGauge,
    pub sandboxes_found: IntCounterVec,
    pub netns_scans: IntCounter,
    /// New plaintext TCP connections the kernel dropped by a pod's inbound policy.
    pub policy_dropped: IntCounterVec,
    redirected: IntCounter,
    spoofed_dropped: IntCounter,
    fail_closed_refused: IntCounter,
    sockmap_connections: IntCounter,
    sockmap_bytes: IntCounter,
    sockmap_fallbacks: IntCounterVec,
    foreign_dropped: IntCounter,
    publish_failed: IntCounter,
    map_entries: IntGaugeVec,
    buffered_bytes: IntGauge,
    buffer_refused: IntCounter,
}

impl Metrics {
    pub fn new(dialect: http::Dialect) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http = http::HttpMetrics::new(&registry, dialect)?;
        let conn = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &ConnectionLabels::NAMES)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let opened = conn(
            "mesh_tcp_connections_opened_total",
            "Connections accepted from a pod and proxied.",
        )?;
        let closed = conn(
            "mesh_tcp_connections_closed_total",
            "Proxied connections that have ended.",
        )?;
        let sent = conn(
            "mesh_tcp_sent_bytes_total",
            "Bytes sent by the client towards the destination.",
        )?;
        let received = conn(
            "mesh_tcp_received_bytes_total",
            "Bytes received by the client from the destination.",
        )?;
        let connect_failures = conn(
            "mesh_tcp_connect_failures_total",
            "Captured connections the proxy could not connect onwards.",
        )?;
        let manifest_reloads = IntCounterVec::new(
            Opts::new(
                "mesh_manifest_reloads_total",
                "Loads of the manifest directory, by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(manifest_reloads.clone()))?;
        let state_apply = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_state_apply_duration_seconds",
                "Time to read, validate and build the desired state for one accepted change.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        registry.register(Box::new(state_apply.clone()))?;
        let inbound_refused = IntCounterVec::new(
            Opts::new(
                "mesh_inbound_refused_total",
                "Connections or CONNECT requests refused at the HBONE port, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(inbound_refused.clone()))?;
        let outbound_refused = IntCounterVec::new(
            Opts::new(
                "mesh_outbound_refused_total",
                "Captured connections the outbound proxy refused, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(outbound_refused.clone()))?;
        let endpoint_over_capacity = IntCounterVec::new(
            Opts::new(
                "mesh_endpoint_connections_refused_total",
                "Connections to the agent's own HTTP endpoints closed at accept because too many \
                 were open, by listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(endpoint_over_capacity.clone()))?;
        let endpoint_head_timeouts = IntCounterVec::new(
            Opts::new(
                "mesh_endpoint_head_timeouts_total",
                "Connections to the agent's own HTTP endpoints cut because the request head did \
                 not arrive within --head-timeout, by listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(endpoint_head_timeouts.clone()))?;
        let enrolled_pods = IntGauge::new(
            "mesh_enrolled_pods",
            "Pods on this node whose traffic is captured.",
        )?;
        registry.register(Box::new(enrolled_pods.clone()))?;
        let pods_awaiting_enrollment = IntGauge::new(
            "mesh_pods_awaiting_enrollment",
            "Pods of this node that should be captured but are not (yet): their sandbox is not \
             found, or was replaced and is being re-discovered.",
        )?;
        registry.register(Box::new(pods_awaiting_enrollment.clone()))?;
        let sandboxes_found = IntCounterVec::new(
            Opts::new(
                "mesh_pod_sandboxes_found_total",
                "Pod network namespaces found, by how: cgroup (the kubelet's cgroup named after \
                 the pod's UID, then its processes) or scan (every namespace of the node probed \
                 for the pod's address: pods without a UID, or whose cgroup led nowhere).",
            ),
            &["method"],
        )?;
        registry.register(Box::new(sandboxes_found.clone()))?;
        let netns_scans = IntCounter::new(
            "mesh_pod_netns_scans_total",
            "Times every network namespace of the node was probed for pods not found otherwise.",
        )?;
        registry.register(Box::new(netns_scans.clone()))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let redirected = counter(
            "mesh_ebpf_redirected_connections_total",
            "Pod connections redirected to the node proxy by cgroup/connect4.",
        )?;
        let spoofed_dropped = counter(
            "mesh_ebpf_spoofed_packets_dropped_total",
            "Packets from pods with a source address not their own, dropped by TC.",
        )?;
        let foreign_dropped = counter(
            "mesh_ebpf_foreign_frames_dropped_total",
            "Frames from pods that are neither IPv4, IPv6 nor ARP, dropped by TC.",
        )?;
        let publish_failed = counter(
            "mesh_ebpf_orig_dst_publish_failures_total",
            "Redirected connections whose original destination could not be published.",
        )?;
        let fail_closed_refused = counter(
            "mesh_ebpf_fail_closed_refused_total",
            "Connections of fail-closed pods refused while no agent served the node: connect() \
             failed with EPERM, or a plaintext SYN towards the pod was dropped (with --pin-dir, \
             counted across agents).",
        )?;
        let sockmap_connections = counter(
            "mesh_ebpf_sockmap_connections_total",
            "Pod connections whose sends to the agent were set up to skip TCP (--sockmap).",
        )?;
        let sockmap_bytes = counter(
            "mesh_ebpf_sockmap_bytes_total",
            "Bytes pods sent that the kernel queued straight onto the agent's sockets instead \
             of carrying them over TCP.",
        )?;
        let sockmap_fallbacks = IntCounterVec::new(
            Opts::new(
                "mesh_ebpf_sockmap_fallbacks_total",
                "Pod connections that went back to TCP for the rest of their life: the agent \
                 fell a window behind reading (window), or its end was not in the socket map \
                 at the pod's first send (peerless).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(sockmap_fallbacks.clone()))?;
        let map_entries = IntGaugeVec::new(
            Opts::new(
                "mesh_ebpf_map_entries",
                "Entries currently held in the per-connection eBPF maps.",
            ),
            &["map"],
        )?;
        registry.register(Box::new(map_entries.clone()))?;
        let buffered_bytes = IntGauge::new(
            "mesh_buffered_bytes",
            "Relay buffer bytes held across all proxied connections (--max-buffered-bytes).",
        )?;
        registry.register(Box::new(buffered_bytes.clone()))?;
        let buffer_refused = counter(
            "mesh_buffer_budget_refused_total",
            "Times a bulk connection could not grow its relay buffers because the node-wide \
             budget was used up.",
        )?;
        let authz = authz::AuthzMetrics::new(&registry)?;
        let policy_dropped = IntCounterVec::new(
            Opts::new(
                "mesh_inbound_policy_dropped_total",
                "New plaintext TCP connections (SYNs) to a pod of this node that its inbound policy refused, dropped in the kernel before the pod saw them.",
            ),
            &["namespace", "pod", "port"],
        )?;
        registry.register(Box::new(policy_dropped.clone()))?;
        Ok(Self {
            registry,
            http,
            authz,
            opened,
            closed,
            sent,
            received,
            connect_failures,
            series: Mutex::default(),
            manifest_reloads,
            state_apply,
            inbound_refused,
            outbound_refused,
            endpoint_over_capacity,
            endpoint_head_timeouts,
            enrolled_pods,
            pods_awaiting_enrollment,
            sandboxes_found,
            netns_scans,
            policy_dropped,
            redirected,
            spoofed_dropped,
            fail_closed_refused,
            sockmap_connections,
            sockmap_bytes,
            sockmap_fallbacks,
            foreign_dropped,
            publish_failed,
            map_entries,
            buffered_bytes,
            buffer_refused,
        })
    }

    pub fn manifest_reload(&self, ok: bool) {
        self.manifest_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    fn remember(&self, labels: &ConnectionLabels) {
        if let Ok(mut series) = self.series.lock() {
            if !series.contains(labels) {
                series.insert(labels.clone());
            }
        }
    }

    /// Removes the connection series of every workload `live` does not know any more, so a
    /// node's exposition does not grow with every workload that ever ran. `live` gets a
    /// (namespace, workload) pair; `unknown` sides are kept.
    pub fn forget_workloads(&self, live: impl Fn(&str, &str) -> bool) {
        self.http.forget_workloads(&live);
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        let gone =
            |namespace: &str, workload: &str| workload != UNKNOWN && !live(namespace, workload);
        series.retain(|l| {
            let keep = !gone(&l.source_namespace, &l.source_workload)
                && !gone(&l.destination_namespace, &l.destination_workload);
            if !keep {
                let values = l.values();
                for vec in [
                    &self.opened,
                    &self.closed,
                    &self.sent,
                    &self.received,
                    &self.connect_failures,
                ] {
                    let _ = vec.remove_label_values(&values);
                }
            }
            keep
        });
    }

    /// Records how long an accepted change of the desired state took to build.
    pub fn state_applied(&self, took: std::time::Duration) {
        self.state_apply.observe(took.as_secs_f64());
    }

    /// Records a connection as opened; the guard counts its bytes and records its close.
    pub fn open_connection(&self, labels: &ConnectionLabels) -> ConnectionGuard {
        self.remember(labels);
        let values = labels.values();
        self.opened.with_label_values(&values).inc();
        ConnectionGuard {
            closed: self.closed.with_label_values(&values),
            sent: self.sent.with_label_values(&values),
            received: self.received.with_label_values(&values),
        }
    }

    pub fn connect_failed(&self, labels: &ConnectionLabels) {
        self.remember(labels);
        self.connect_failures
            .with_label_values(&labels.values())
            .inc();
    }

    /// Brings the eBPF-sourced series up to date (called before each scrape).
    pub fn update_datapath(&self, stats: DatapathStats) {
        let catch_up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        catch_up(&self.redirected, stats.redirected);
        catch_up(&self.spoofed_dropped, stats.spoofed_dropped);
        catch_up(&self.fail_closed_refused, stats.fail_closed_refused);
        catch_up(&self.sockmap_connections, stats.sockmap_connections);
        catch_up(&self.sockmap_bytes, stats.sockmap_bytes);
        for (reason, v) in [
            ("window", stats.sockmap_window_fallbacks),
            ("peerless", stats.sockmap_peerless_fallbacks),
        ] {
            catch_up(&self.sockmap_fallbacks.with_label_values(&[reason]), v);
        }
        catch_up(&self.foreign_dropped, stats.foreign_dropped);
        catch_up(&self.publish_failed, stats.orig_dst_publish_failed);
        let set = |map: &str, v: u64| {
            self.map_entries
                .with_label_values(&[map])
                .set(i64::try_from(v).unwrap_or(i64::MAX))
        };
        set("redirects", stats.redirects_tracked);
        set("orig_dst", stats.orig_dst_tracked);
        set("sockmap_flows", stats.sockmap_flows_tracked);
    }

    /// Brings the buffer budget's series up to date (called before each scrape).
    pub fn update_buffers(&self, used: usize, refused: u64) {
        self.buffered_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        self.buffer_refused
            .inc_by(refused.saturating_sub(self.buffer_refused.get()));
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// An open connection's series. Bytes are counted as they flow (live, like Istio's); the
/// close is recorded when the guard drops.
pub struct ConnectionGuard {
    closed: IntCounter,
    pub sent: IntCounter,
    pub received: IntCounter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn labels(source: &str, destination: &str) -> ConnectionLabels {
        ConnectionLabels {
            source_workload: source.into(),
            source_namespace: "default".into(),
            destination_workload: destination.into(),
            destination_namespace: "default".into(),
            ..ConnectionLabels::unknown("source")
        }
    }

    #[test]
    fn series_of_departed_workloads_are_removed() {
        let m = Metrics::new(http::Dialect::Both).unwrap();
        drop(m.open_connection(&labels("client", "web")));
        drop(m.open_connection(&labels("batch", "web")));
        m.connect_failed(&labels("batch", UNKNOWN));
        drop(m.open_connection(&labels("client", UNKNOWN)));
        m.forget_workloads(|_, w| w != "batch");
        let text = m.encode();
        let has = |pairs: &[&str]| {
            text.lines().any(|l| {
                l.starts_with("mesh_tcp_connections_opened_total")
                    && pairs.iter().all(|p| l.contains(p))
            })
        };
        assert!(!text.contains("source_workload=\"batch\""), "{text}");
        assert!(
            has(&["source_workload=\"client\"", "destination_workload=\"web\""]),
            "{text}"
        );
        assert!(
            has(&[
                "source_workload=\"client\"",
                "destination_workload=\"unknown\""
            ]),
            "{text}"
        );
    }
}
