//! mesh-agent: a node-level, eBPF-accelerated service mesh agent.

pub mod admin;
pub mod app;
pub mod background;
pub mod balance;
pub mod cli;
pub mod datapath;
pub mod drain;
pub mod enrolled;
pub mod fuzzing;
pub mod handover;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod pinning;
pub mod podnet;
pub mod policy;
pub mod proxy;
pub mod reconcile;
pub mod retry;
pub mod route;
pub mod source;
pub mod state;
pub mod tls;
