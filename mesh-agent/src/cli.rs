//! Command line of the `mesh-agent` binary.

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Parser, Subcommand};

/// Node-level service mesh agent: eBPF capture into one shared per-node proxy.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,mesh_agent=debug`); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for one node.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name: pods with this `spec.nodeName` are enrolled.
    #[arg(long)]
    pub node: String,
    /// Directory of Kubernetes YAML manifests (re-read when it changes).
    #[arg(long)]
    pub manifests: PathBuf,
    /// The node's address for the listeners [default: the first non-loopback IPv4 address].
    #[arg(long)]
    pub node_address: Option<Ipv4Addr>,
    /// cgroup v2 directory to attach to [default: the cgroup v2 root from /proc/self/mountinfo].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Outbound capture listener port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 15020)]
    pub metrics_port: u16,
    /// Readiness/liveness port.
    #[arg(long, default_value_t = 15021)]
    pub health_port: u16,
    /// Destination port never captured (repeatable).
    #[arg(long = "exclude-port")]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDR never captured, e.g. 10.0.0.0/8 (repeatable).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<(Ipv4Addr, u8)>,
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?;
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_cidr("10.1.2.3"), Ok((Ipv4Addr::new(10, 1, 2, 3), 32)));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("x/8").is_err());
    }
}
