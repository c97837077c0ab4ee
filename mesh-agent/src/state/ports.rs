//! What protocol a port speaks, as users declare it: Kubernetes `appProtocol`, Istio's port-name
//! prefixes and Linkerd's opaque-ports annotation.

use std::fmt;

/// Linkerd's annotation (on a Pod, Service or Namespace) listing ports whose traffic is never
/// inspected.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.linkerd.io/opaque-ports";

/// Linkerd's default opaque ports (SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch,
/// memcached): server-speaks-first protocols that detection would only delay.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// A protocol declared for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP/1.1 (it may still turn out to be prior-knowledge HTTP/2: detection tells).
    Http,
    /// HTTP/2 with prior knowledge (`kubernetes.io/h2c`, `grpc`, `http2-`, `grpc-`).
    Http2,
    /// Never inspected: relayed as bytes at once.
    Opaque,
}

/// The protocol a Service port declares by `appProtocol`, else by an Istio name prefix.
pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Option<Declared> {
    let by_app = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" => Some(Declared::Http),
        "kubernetes.io/h2c" | "http2" | "grpc" | "h2c" => Some(Declared::Http2),
        "tcp" | "tls" | "https" | "kubernetes.io/ws" | "kubernetes.io/wss" | "mysql" | "mongo"
        | "redis" => Some(Declared::Opaque),
        _ => None,
    };
    if let Some(d) = app_protocol.and_then(by_app) {
        return Some(d);
    }
    // Istio: `<protocol>[-<suffix>]`.
    let name = port_name?;
    by_app(name.split_once('-').map_or(name, |(p, _)| p))
}

/// A set of ports and port ranges, as the opaque-ports annotation writes them
/// (`3306,5432,8000-8100`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    pub fn defaults() -> Self {
        PortSet(DEFAULT_OPAQUE_PORTS.iter().map(|&p| (p, p)).collect())
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    /// Parses the annotation's value; the error says what is wrong with which item.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let port = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{item:?} is not a port (1-65535) or a range lo-hi"))
            };
            let range = match item.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => (port(item)?, port(item)?),
            };
            if range.0 > range.1 {
                return Err(format!("range {item:?} ends before it starts"));
            }
            out.push(range);
        }
        Ok(PortSet(out))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            match lo == hi {
                true => write!(f, "{sep}{lo}")?,
                false => write!(f, "{sep}{lo}-{hi}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn declared_by_app_protocol_then_name() {
        assert_eq!(
            declared(Some("kubernetes.io/h2c"), None),
            Some(Declared::Http2)
        );
        assert_eq!(declared(Some("grpc"), Some("tcp-x")), Some(Declared::Http2));
        assert_eq!(declared(Some("tcp"), Some("http")), Some(Declared::Opaque));
        assert_eq!(declared(None, Some("http-web")), Some(Declared::Http));
        assert_eq!(declared(None, Some("http2")), Some(Declared::Http2));
        assert_eq!(declared(None, Some("grpc-api")), Some(Declared::Http2));
        for name in ["tcp-db", "tls", "mysql-main", "mongo-x", "redis"] {
            assert_eq!(declared(None, Some(name)), Some(Declared::Opaque), "{name}");
        }
        assert_eq!(declared(None, Some("web")), None);
        assert_eq!(declared(Some("example.com/custom"), None), None);
        assert_eq!(declared(None, None), None);
    }

    #[test]
    fn port_sets() {
        let s = PortSet::parse("3306, 8000-8100,25").unwrap();
        assert!(s.contains(3306) && s.contains(8000) && s.contains(8050) && s.contains(25));
        assert!(!s.contains(80) && !s.contains(8101));
        assert_eq!(s.to_string(), "3306,8000-8100,25");
        assert!(PortSet::parse("").unwrap().0.is_empty());
        assert!(PortSet::defaults().contains(5432));
        assert_eq!(
            PortSet::parse("80,http").unwrap_err(),
            "\"http\" is not a port (1-65535) or a range lo-hi"
        );
        assert!(PortSet::parse("0").is_err());
        assert!(PortSet::parse("90-80").is_err());
    }
}
