//! The simulated cluster mesh-agent is developed and tested on, and helpers for the
//! privileged integration tests.
//!
//! Everything lives in network namespaces this crate creates (named `mt-*`) and in one cgroup
//! subtree (`<cgroup2>/mesh-testbed`); nothing is added to the host's own network namespace.

pub mod agent;
pub mod apiserver;
pub mod bpf;
pub mod capture;
pub mod harness;
pub mod http;
pub mod netns;
pub mod testbed;

pub use agent::Agent;
pub use testbed::{clean, PodSpec, ServiceSpec, Testbed, TestbedSpec};

use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Privileged tests share kernel state (cgroup root programs, namespace names): each holds
/// this for its whole run, so they are serial even without `--test-threads=1`. Also checks
/// that we run as root, with a clear message when not.
pub fn serial() -> MutexGuard<'static, ()> {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged integration tests need root (they create network namespaces and load eBPF); run `cargo xtask test` as root"
    );
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
