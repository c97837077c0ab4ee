//! What the kernel enforces for plaintext: a pod's policy compiled, per port, into allow, deny,
//! or a decision by source address (longest-prefix match), for clients outside the mesh (a
//! host-network process, an unenrolled pod, another node's process) that dial the pod
//! directly. The TC program on the pod's host-side veth applies it to each new TCP connection
//! (SYN); traffic the agent delivers is told apart by its socket mark, never by its address.
//!
//! The compilation is exact: every condition a policy puts on a plaintext client is membership
//! of its address in one of the policy's CIDRs, or of the port in one of its ports. Within a
//! port class, all addresses whose longest matching CIDR is the same one are decided alike,
//! so one [`super::authorize`] call per (port, CIDR), with a representative address of that
//! CIDR, decides them all.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{authorize, Cidr, ConditionKey, Inbound, PodPolicy, StrMatch};

/// The decision for plaintext on one port class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortVerdict {
    Allow,
    Deny,
    /// By the longest matching prefix (each allowed or not); a miss denies.
    BySource(Vec<(Cidr, bool)>),
}

/// One port's entry: `port` 0 stands for every port without an entry of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    pub port: u16,
    pub verdict: PortVerdict,
    /// Kubelet probes are let in on this port (no Server, or a Server without routes, as
    /// Linkerd authorizes them; Istio's ambient mode lets them bypass policy too).
    pub probes: bool,
}

/// What the kernel holds for one pod; empty when plaintext is allowed everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plaintext {
    pub ports: Vec<PortEntry>,
}

/// Compiles `policy` for plaintext clients. `probe_sources`: where kubelet probes come from
/// when the kernel cannot identify the kubelet by its cgroup (the node's addresses), allowed
/// on probe ports; empty when it can.
pub fn plaintext(policy: &PodPolicy, probe_sources: &[Cidr]) -> Plaintext {
    let mentioned = mentioned_ports(policy);
    // A port no policy names stands for all of them.
    let other = (1..=u16::MAX)
        .rev()
        .find(|p| !mentioned.contains(p))
        .unwrap_or(u16::MAX);
    let mut prefixes = prefixes(policy);
    prefixes.extend(probe_sources.iter().copied());
    prefixes.push(Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    });
    prefixes.push(Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    });
    prefixes.sort_by_key(|c| (c.addr.is_ipv6(), c.len, c.addr));
    prefixes.dedup();
    let decide = |port: u16| -> (PortVerdict, bool) {
        let probes = policy
            .server_for(port)
            .is_none_or(|server| server.routes.is_none());
        let mut decided = Vec::new();
        for prefix in &prefixes {
            let Some(ip) = representative(prefix, &prefixes) else {
                continue;
            };
            let probe = probes && probe_sources.iter().any(|s| s.contains(ip));
            let allowed = probe
                || authorize(
                    policy,
                    &Inbound {
                        port,
                        client: None,
                        ip: Some(ip),
                        http: None,
                    },
                )
                .allowed;
            decided.push((*prefix, allowed));
        }
        let decided = prune(decided);
        let verdict = match (
            decided.iter().all(|(_, a)| *a),
            decided.iter().all(|(_, a)| !*a),
        ) {
            (true, _) => PortVerdict::Allow,
            (_, true) => PortVerdict::Deny,
            _ => PortVerdict::BySource(decided),
        };
        (verdict, probes && probe_sources.is_empty())
    };
    let (verdict, probes) = decide(other);
    let mut ports = Vec::new();
    for port in mentioned {
        let (v, p) = decide(port);
        if v != verdict || p != probes {
            ports.push(PortEntry {
                port,
                verdict: v,
                probes: p,
            });
        }
    }
    if verdict != PortVerdict::Allow || !ports.is_empty() {
        ports.insert(
            0,
            PortEntry {
                port: 0,
                verdict,
                probes,
            },
        );
    }
    Plaintext { ports }
}

/// Leaves out each range decided as the nearest range enclosing it is: its addresses' longest
/// match then falls to that one, with the same outcome (fewer entries for the kernel to scan).
fn prune(decided: Vec<(Cidr, bool)>) -> Vec<(Cidr, bool)> {
    let parent = |c: &Cidr| {
        let (start, end) = range(c);
        decided
            .iter()
            .filter(|(p, _)| p.addr.is_ipv6() == c.addr.is_ipv6() && p.len < c.len)
            .filter(|(p, _)| {
                let (s, e) = range(p);
                s <= start && end <= e
            })
            .max_by_key(|(p, _)| p.len)
            .map(|(_, allowed)| *allowed)
    };
    decided
        .iter()
        .filter(|(c, allowed)| parent(c) != Some(*allowed))
        .copied()
        .collect()
}

/// Every port the pod's policy names.
fn mentioned_ports(policy: &PodPolicy) -> Vec<u16> {
    let mut ports: Vec<u16> = policy.servers.iter().map(|(p, _)| *p).collect();
    ports.extend(policy.peer_ports.iter().map(|(p, ..)| *p));
    for p in &policy.istio {
        for rule in &p.rules {
            for op in &rule.to {
                for list in [&op.ports.values, &op.ports.not] {
                    ports.extend(list.iter().flatten().copied());
                }
            }
            for c in &rule.when {
                if c.key == ConditionKey::DestinationPort {
                    for list in [&c.values.values, &c.values.not] {
                        ports.extend(list.iter().flatten().filter_map(|m| match m {
                            StrMatch::Exact(v) => v.parse::<u16>().ok(),
                            _ => None,
                        }));
                    }
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports.retain(|p| *p != 0);
    ports
}

/// Every address range the pod's policy names.
fn prefixes(policy: &PodPolicy) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = policy.cluster_networks.to_vec();
    for (_, server) in &policy.servers {
        let all = server
            .authorizations
            .iter()
            .chain(&server.namespace_authorizations)
            .chain(server.route_authorizations.iter().flat_map(|(_, a)| a));
        for a in all {
            for authn in &a.required {
                if let super::Authentication::Network(nets) = &**authn {
                    for (net, except) in nets {
                        out.push(*net);
                        out.extend(except.iter().copied());
                    }
                }
            }
        }
    }
    for p in &policy.istio {
        for rule in &p.rules {
            for s in &rule.from {
                for list in [&s.ip_blocks.values, &s.ip_blocks.not] {
                    out.extend(list.iter().flatten().copied());
                }
            }
            for c in &rule.when {
                if c.key == ConditionKey::SourceIp {
                    for list in [&c.values.values, &c.values.not] {
                        out.extend(list.iter().flatten().filter_map(|m| match m {
                            StrMatch::Exact(v) => v.parse::<Cidr>().ok(),
                            _ => None,
                        }));
                    }
                }
            }
        }
    }
    // Canonical: the network address, so nesting can be compared.
    out.into_iter().map(canonical).collect()
}

fn canonical(c: Cidr) -> Cidr {
    let (start, _) = range(&c);
    Cidr {
        addr: from_bits(c.addr.is_ipv6(), start),
        len: c.len,
    }
}

/// The first and last address of `c`, as 128-bit numbers (IPv4 in the low 32 bits).
fn range(c: &Cidr) -> (u128, u128) {
    let (bits, value) = match c.addr {
        IpAddr::V4(ip) => (32u32, u128::from(u32::from(ip))),
        IpAddr::V6(ip) => (128, u128::from(ip)),
    };
    let host = bits - u32::from(c.len);
    let mask = match host {
        128 => u128::MAX,
        h => (1u128 << h) - 1,
    };
    (value & !mask, (value & !mask) | mask)
}

fn from_bits(v6: bool, value: u128) -> IpAddr {
    match v6 {
        true => IpAddr::V6(Ipv6Addr::from(value)),
        false => IpAddr::V4(Ipv4Addr::from(value as u32)),
    }
}

/// An address whose longest match among `all` is `prefix`, if any (a prefix wholly covered by
/// longer ones decides nothing).
fn representative(prefix: &Cidr, all: &[Cidr]) -> Option<IpAddr> {
    let v6 = prefix.addr.is_ipv6();
    let (start, end) = range(prefix);
    let inner: Vec<(u128, u128)> = all
        .iter()
        .filter(|c| c.addr.is_ipv6() == v6 && c.len > prefix.len)
        .map(range)
        .filter(|(s, e)| *s >= start && *e <= end)
        .collect();
    // An uncovered stretch starts at the prefix's start or right after an inner range.
    let candidates =
        std::iter::once(start).chain(inner.iter().filter(|(_, e)| *e < end).map(|(_, e)| e + 1));
    for x in candidates {
        if inner.iter().all(|(s, e)| x < *s || x > *e) {
            return Some(from_bits(v6, x));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn representatives_avoid_longer_prefixes() {
        let c = |s: &str| canonical(s.parse::<Cidr>().unwrap());
        let all = [
            c("10.0.0.0/8"),
            c("10.0.0.0/16"),
            c("10.1.0.0/16"),
            c("0.0.0.0/0"),
        ];
        assert_eq!(
            representative(&c("10.0.0.0/8"), &all),
            Some("10.2.0.0".parse().unwrap())
        );
        assert_eq!(
            representative(&c("0.0.0.0/0"), &all),
            Some("0.0.0.0".parse().unwrap())
        );
        // Wholly covered: nothing to decide.
        let halves = [c("10.0.0.0/8"), c("10.0.0.0/9"), c("10.128.0.0/9")];
        assert_eq!(representative(&c("10.0.0.0/8"), &halves), None);
        assert_eq!(
            representative(&c("10.128.0.0/9"), &halves),
            Some("10.128.0.0".parse().unwrap())
        );
        assert_eq!(c("10.1.2.3/8").addr, "10.0.0.0".parse::<IpAddr>().unwrap());
    }
}
