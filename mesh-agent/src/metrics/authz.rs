//! Authorization metrics in Linkerd's names: `inbound_{http,tcp}_authz_{allow,deny}_total`,
//! labelled with the target, the Server, the route and the authorization that decided, and the
//! client's TLS identity; `inbound_authz_audit_total` for what an audit policy would have
//! denied.
//!
//! Unlike Linkerd, the deny counters also carry `authz_*`: the policy that denied (an Istio
//! DENY, an ALLOW that did not match, a PeerAuthentication, a default policy).

use std::{collections::HashSet, sync::Mutex};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::policy::{Authz, Verdict};

pub struct AuthzMetrics {
    http_allow: IntCounterVec,
    http_deny: IntCounterVec,
    tcp_allow: IntCounterVec,
    tcp_deny: IntCounterVec,
    audit: IntCounterVec,
    /// Every label set counted so far, by counter, so that a client's series can be removed
    /// when it leaves the cluster.
    series: Mutex<HashSet<(Which, Vec<String>)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Which {
    HttpAllow,
    HttpDeny,
    TcpAllow,
    TcpDeny,
    Audit,
}

const HTTP_LABELS: [&str; 10] = [
    "target_addr",
    "srv_group",
    "srv_kind",
    "srv_name",
    "route_name",
    "authz_group",
    "authz_kind",
    "authz_name",
    "tls",
    "client_id",
];
const TCP_LABELS: [&str; 9] = [
    "target_addr",
    "srv_group",
    "srv_kind",
    "srv_name",
    "authz_group",
    "authz_kind",
    "authz_name",
    "tls",
    "client_id",
];
const AUDIT_LABELS: [&str; 7] = [
    "protocol",
    "target_addr",
    "srv_name",
    "authz_group",
    "authz_kind",
    "authz_name",
    "client_id",
];

/// Who the client is, as the counters say it.
pub struct Client<'a> {
    /// `pod-ip:port`.
    pub target_addr: &'a str,
    /// Its Linkerd identity, empty for a plaintext client.
    pub client_id: &'a str,
}

impl AuthzMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(AuthzMetrics {
            http_allow: vec(
                "inbound_http_authz_allow_total",
                "HTTP requests to a pod of this node that inbound policy allowed.",
                &HTTP_LABELS,
            )?,
            http_deny: vec(
                "inbound_http_authz_deny_total",
                "HTTP requests to a pod of this node that inbound policy denied (403, or 404 when no route of the Server matched).",
                &HTTP_LABELS,
            )?,
            tcp_allow: vec(
                "inbound_tcp_authz_allow_total",
                "TCP connections to a pod of this node that inbound policy allowed.",
                &TCP_LABELS,
            )?,
            tcp_deny: vec(
                "inbound_tcp_authz_deny_total",
                "TCP connections to a pod of this node that inbound policy denied (closed before any byte reached the pod), and open connections closed by a policy change.",
                &TCP_LABELS,
            )?,
            audit: vec(
                "inbound_authz_audit_total",
                "Connections and requests an audit policy (Linkerd's audit, Istio's AUDIT) would have denied; they were allowed.",
                &AUDIT_LABELS,
            )?,
            series: Mutex::default(),
        })
    }

    fn vec(&self, which: Which) -> &IntCounterVec {
        match which {
            Which::HttpAllow => &self.http_allow,
            Which::HttpDeny => &self.http_deny,
            Which::TcpAllow => &self.tcp_allow,
            Which::TcpDeny => &self.tcp_deny,
            Which::Audit => &self.audit,
        }
    }

    fn series(&self, which: Which, labels: &[&str]) -> IntCounter {
        if let Ok(mut s) = self.series.lock() {
            s.insert((which, labels.iter().map(|l| (*l).to_owned()).collect()));
        }
        self.vec(which).with_label_values(labels)
    }

    /// Removes the series of clients (by Linkerd identity) that `live` no longer knows.
    pub fn forget_clients(&self, live: impl Fn(&str) -> bool) {
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        series.retain(|(which, labels)| {
            let client = labels.last().map(String::as_str).unwrap_or_default();
            let keep = client.is_empty() || live(client);
            if !keep {
                let values: Vec<&str> = labels.iter().map(String::as_str).collect();
                let _ = self.vec(*which).remove_label_values(&values);
            }
            keep
        });
    }

    /// Whether some series names a client (an authenticated one).
    pub fn has_clients(&self) -> bool {
        self.series.lock().is_ok_and(|s| {
            s.iter()
                .any(|(_, l)| l.last().is_some_and(|c| !c.is_empty()))
        })
    }

    /// The counter one decision goes to: `http` or TCP.
    pub fn counter(&self, http: bool, verdict: &Verdict, client: &Client) -> IntCounter {
        let srv_group = match verdict.server.kind {
            "server" => "policy.linkerd.io",
            _ => "",
        };
        let tls = if client.client_id.is_empty() {
            "no_identity"
        } else {
            "true"
        };
        let which = match (http, verdict.allowed) {
            (true, true) => Which::HttpAllow,
            (true, false) => Which::HttpDeny,
            (false, true) => Which::TcpAllow,
            (false, false) => Which::TcpDeny,
        };
        let a = &verdict.authz;
        // The TCP counters are the HTTP ones without `route_name`.
        let mut labels = vec![
            client.target_addr,
            srv_group,
            verdict.server.kind,
            &verdict.server.name,
        ];
        if http {
            labels.push(verdict.route.as_deref().unwrap_or("default"));
        }
        labels.extend([a.group, a.kind, &a.name, tls, client.client_id]);
        self.series(which, &labels)
    }

    /// Counts what an audit policy would have denied.
    pub fn audited(&self, http: bool, verdict: &Verdict, audit: &Authz, client: &Client) {
        self.series(
            Which::Audit,
            &[
                if http { "http" } else { "tcp" },
                client.target_addr,
                &verdict.server.name,
                audit.group,
                audit.kind,
                &audit.name,
                client.client_id,
            ],
        )
        .inc();
    }
}
