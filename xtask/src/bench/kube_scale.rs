//! `cargo xtask bench --kube-scale`: what a large cluster's API server state costs the agent
//! in Kubernetes mode: 5,000 Pods (100 on this node), 2,000 Services and 10,000 endpoints,
//! served by the API server double (`meshtest apiserver`, its own process) over the real
//! list/watch protocol on loopback, read by `mesh-agent state --kube` (the agent's watchers
//! and store, without the datapath). Reports the time to the first snapshot and the memory.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

const PODS: u32 = 5_000;
const SERVICES: u32 = 2_000;
const ENDPOINTS: u32 = 10_000;
const RUNS: usize = 3;

pub fn run(root: &Path) -> anyhow::Result<()> {
    let bin = root.join("target/release");
    let mut double = Command::new(bin.join("meshtest"))
        .args(["apiserver", "127.0.0.1:0", "node-1"])
        .args([PODS, SERVICES, ENDPOINTS].map(|n| n.to_string()))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting meshtest apiserver")?;
    let addr = {
        let stdout = double.stdout.take().context("the double's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        line.trim()
            .strip_prefix("listening ")
            .context("the double did not say where it listens")?
            .to_owned()
    };
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let kubeconfig = out.join("kube-scale.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{addr}\nusers:\n- name: agent\n  user:\n    token: not-checked\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\ncurrent-context: double\n"
        ),
    )?;
    println!(
        "kube-scale: {PODS} pods, {SERVICES} services, {ENDPOINTS} endpoints at {addr}; {RUNS} runs of `mesh-agent state --kube`"
    );
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let result = Command::new(bin.join("mesh-agent"))
            .args([
                "--log-level",
                "warn",
                "state",
                "--kube",
                "--node",
                "node-1",
                "--kubeconfig",
            ])
            .arg(&kubeconfig)
            .output();
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                let _ = double.kill();
                bail!("running mesh-agent state: {e}");
            }
        };
        if !result.status.success() {
            let _ = double.kill();
            bail!(
                "mesh-agent state failed: {}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
        let summary: Value = match serde_json::from_slice(&result.stdout) {
            Ok(summary) => summary,
            Err(e) => {
                let _ = double.kill();
                bail!("mesh-agent state printed no summary: {e}");
            }
        };
        println!("kube-scale: {summary}");
        runs.push(summary);
    }
    let _ = double.kill();
    let _ = double.wait();
    let median = |key: &str| {
        let mut v: Vec<u64> = runs.iter().filter_map(|r| r[key].as_u64()).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let (ms, rss, peak) = (
        median("first_snapshot_ms"),
        median("rss_kib"),
        median("peak_rss_kib"),
    );
    let report = format!(
        "# kube-scale\n\n{PODS} pods / {SERVICES} services / {ENDPOINTS} endpoints, median of {RUNS}:\n\n| first snapshot | RSS after | peak RSS |\n|---|---|---|\n| {ms} ms | {:.1} MiB | {:.1} MiB |\n",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    std::fs::write(out.join("kube-scale.md"), &report)?;
    println!("{report}");
    Ok(())
}
