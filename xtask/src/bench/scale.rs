//! `cargo xtask bench --scale`: the desired state of a large cluster, fed to a real agent
//! through its manifests directory, and what that costs: time to apply, memory, idle CPU, and
//! the latency of requests through the mesh while the state churns.
//!
//! The state: 10,000 Services with an EndpointSlice of five endpoints each (50,000 endpoints),
//! over 20,000 Pods on other nodes, in 200 + 100 files, next to the testbed's own client → web
//! Service. Every figure is read from the agent (`/state`, `/proc`) or from the load generator.

use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use mesh_agent_tests::{Agent, Testbed};
use serde_json::{json, Value};

use super::{cpu_us, field, rss_kib};

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 5;
const PODS: u32 = 20_000;
const SERVICES_PER_FILE: u32 = 50;
const PODS_PER_FILE: u32 = 200;
/// One-object changes timed one by one.
const CHANGES: u32 = 20;
/// The open-loop load while the state churns.
const RATE: u32 = 200;
const LOAD_SECS: u32 = 20;
/// One change of the state this often during the load.
const CHURN_EVERY: Duration = Duration::from_millis(250);
const WEB_SVC: &str = "10.96.0.10:80";

fn pod_ip(i: u32) -> String {
    format!("10.64.{}.{}", i / 250, i % 250 + 1)
}

fn service_ip(i: u32) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

/// Service `svc-{i}` and its slice; `shift` moves its endpoints (a one-object change).
fn service_yaml(i: u32, shift: u32) -> String {
    let mut text = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: scale\n  labels: {{app: svc-{i}}}\nspec:\n  clusterIP: {}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x7k2p\n  namespace: scale\n  labels:\n    kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n",
        service_ip(i)
    );
    for k in 0..ENDPOINTS_PER_SERVICE {
        let pod = (i * ENDPOINTS_PER_SERVICE + k + shift) % PODS;
        let _ = write!(
            text,
            "- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: far-{}\n",
            pod_ip(pod),
            pod % 100
        );
    }
    text
}

fn pod_yaml(i: u32, generation: u32) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: far-{i}\n  namespace: scale\n  labels: {{app: far-{}, generation: \"{generation}\"}}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: ReplicaSet, name: far-{}-5d8f7c9b4}}\nspec:\n  nodeName: far-{}\n  serviceAccountName: far\nstatus:\n  phase: Running\n  hostIP: 10.0.1.{}\n  podIP: {}\n",
        i % 500,
        i % 500,
        i % 100,
        i % 100 + 1,
        pod_ip(i)
    )
}

fn services_file(f: u32, changed: Option<(u32, u32)>) -> String {
    (f * SERVICES_PER_FILE..(f + 1) * SERVICES_PER_FILE)
        .map(|i| match changed {
            Some((which, shift)) if which == i => service_yaml(i, shift),
            _ => service_yaml(i, 0),
        })
        .collect()
}

fn pods_file(f: u32, generation: u32) -> String {
    (f * PODS_PER_FILE..(f + 1) * PODS_PER_FILE)
        .map(|i| pod_yaml(i, generation))
        .collect()
}

/// Writes aside and renames into place (the convention the agent documents); returns when.
fn put(dir: &Path, name: &str, text: &str) -> anyhow::Result<SystemTime> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    let at = SystemTime::now();
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(at)
}

fn state(agent: &Agent) -> anyhow::Result<Value> {
    let r = agent.admin("/state")?;
    Ok(serde_json::from_str(&r.body)?)
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Waits for a version after `version`; returns the new state.
fn next_version(agent: &Agent, version: u64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = state(agent)?;
        if s["version"].as_u64().unwrap_or(0) > version {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("no new state after version {version}: {s}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn start_agents(bed: &Testbed) -> anyhow::Result<(Agent, Agent, Duration)> {
    // One after the other: on a real cluster each agent has its node's cores to itself.
    let started = Instant::now();
    let mut n1 = Agent::start(bed, "n1", &["--log-level", "warn"])?;
    n1.wait_ready(Duration::from_secs(60))?;
    let ready = started.elapsed();
    let mut n2 = Agent::start(bed, "n2", &["--log-level", "warn"])?;
    n2.wait_ready(Duration::from_secs(60))?;
    Ok((n1, n2, ready))
}

/// RSS once the agent has handed freed memory back (it does half a second after the last
/// change).
fn settled_rss_mib(pid: u32) -> f64 {
    std::thread::sleep(Duration::from_secs(2));
    rss_kib(pid).0 as f64 / 1024.0
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let (bed, meshtest) = super::client_web_testbed(root)?;
    let mut web = bed.pod_command("web", &meshtest)?;
    web.args(["http", "8080", "web"]).stdout(Stdio::null());
    bed.spawn(web)?;
    let dir = bed.manifests_dir();

    let load = |target: &str| -> anyhow::Result<std::process::Child> {
        let mut cmd = bed.pod_command("client", &meshtest)?;
        let (rate, secs) = (RATE.to_string(), LOAD_SECS.to_string());
        cmd.args(["load", target, &rate, "4", &secs])
            .stdout(Stdio::piped());
        Ok(cmd.spawn()?)
    };
    let finish = |child: std::process::Child| -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&child.wait_with_output()?.stdout).into_owned())
    };

    // Baselines: the machine's own noise (no agents), then the agents with the testbed's few
    // objects.
    println!("==> baseline: {RATE} req/s for {LOAD_SECS} s, no agents, client -> web pod");
    let web_pod = format!("{}:8080", bed.pod("web").ip);
    let direct = finish(load(&web_pod)?)?;
    println!("==> baseline: the agents with the testbed's own 5 objects");
    let (mut n1, mut n2, _) = start_agents(&bed)?;
    let base_rss = settled_rss_mib(n1.pid().context("n1 pid")?);
    let small = finish(load(WEB_SVC)?)?;
    n1.stop()?;
    n2.stop()?;

    println!(
        "==> writing {SERVICES} Services / {} endpoints / {PODS} Pods",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    let mut bytes = 0;
    for f in 0..SERVICES / SERVICES_PER_FILE {
        let text = services_file(f, None);
        bytes += text.len();
        put(&dir, &format!("scale-svc-{f:03}.yaml"), &text)?;
    }
    for f in 0..PODS / PODS_PER_FILE {
        let text = pods_file(f, 0);
        bytes += text.len();
        put(&dir, &format!("scale-pods-{f:03}.yaml"), &text)?;
    }
    let objects = SERVICES * 2 + PODS;

    println!("==> initial apply");
    let (n1, _n2, ready) = start_agents(&bed)?;
    let pid = n1.pid().context("n1 pid")?;
    let first = state(&n1)?;
    if first["service_ports"].as_u64() != Some(u64::from(SERVICES) + 1) {
        bail!("the agent did not take the whole state: {first}");
    }
    let initial_apply_ms = first["last_apply"]["duration_us"].as_f64().unwrap_or(0.0) / 1000.0;
    let loaded_rss = settled_rss_mib(pid);

    println!("==> idle CPU over 10 s");
    let cpu0 = cpu_us(pid);
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu_pct = (cpu_us(pid) - cpu0) as f64 / 10e6 * 100.0;

    println!("==> {CHANGES} one-object changes, one at a time");
    let mut version = first["version"].as_u64().unwrap_or(0);
    let mut change_ms = Vec::new();
    let mut apply_ms = Vec::new();
    let mut rebuilt = Value::Null;
    for k in 0..CHANGES {
        let svc = k * 487 % SERVICES;
        let f = svc / SERVICES_PER_FILE;
        let written = put(
            &dir,
            &format!("scale-svc-{f:03}.yaml"),
            &services_file(f, Some((svc, k + 1))),
        )?;
        let s = next_version(&n1, version)?;
        version = s["version"].as_u64().unwrap_or(version);
        let applied_at = s["applied_at_unix_ms"].as_f64().unwrap_or(0.0);
        change_ms.push(applied_at - unix_ms(written));
        apply_ms.push(s["last_apply"]["duration_us"].as_f64().unwrap_or(0.0) / 1000.0);
        rebuilt = s["last_apply"].clone();
        // Put it back: the next change starts from the full state again.
        put(
            &dir,
            &format!("scale-svc-{f:03}.yaml"),
            &services_file(f, None),
        )?;
        version = next_version(&n1, version)?["version"]
            .as_u64()
            .unwrap_or(version);
    }
    let rss_after_reloads = settled_rss_mib(pid);

    println!("==> {RATE} req/s for {LOAD_SECS} s through the mesh, state quiet");
    let quiet = finish(load(WEB_SVC)?)?;

    println!(
        "==> {RATE} req/s for {LOAD_SECS} s through the mesh, state changing every {CHURN_EVERY:?}"
    );
    let applies_before = n1.metric("mesh_state_apply_duration_seconds_count", &[])?;
    let child = load(WEB_SVC)?;
    let until = Instant::now() + Duration::from_secs(u64::from(LOAD_SECS));
    let mut k = 0u32;
    while Instant::now() < until {
        // Alternately: one Service's endpoints, and a whole file of 200 Pods relabelled.
        if k.is_multiple_of(2) {
            let svc = k * 7919 % SERVICES;
            let f = svc / SERVICES_PER_FILE;
            put(
                &dir,
                &format!("scale-svc-{f:03}.yaml"),
                &services_file(f, Some((svc, k + 1))),
            )?;
        } else {
            let f = k % (PODS / PODS_PER_FILE);
            put(&dir, &format!("scale-pods-{f:03}.yaml"), &pods_file(f, k))?;
        }
        k += 1;
        std::thread::sleep(CHURN_EVERY);
    }
    let churned = finish(child)?;
    let applies = n1.metric("mesh_state_apply_duration_seconds_count", &[])? - applies_before;
    let rss_after_churn = settled_rss_mib(pid);

    let loads = |line: &str| {
        json!({
            "count": field(line, "count"), "errors": field(line, "errors"),
            "p50_us": field(line, "p50_us"), "p99_us": field(line, "p99_us"),
            "p999_us": field(line, "p999_us"), "max_us": field(line, "max_us"),
        })
    };
    let stats = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        json!({
            "median": v.get(v.len() / 2), "max": v.last(),
        })
    };
    let report = json!({
        "state": {
            "services": SERVICES, "endpoints": SERVICES * ENDPOINTS_PER_SERVICE, "pods": PODS,
            "objects": objects, "bytes": bytes,
        },
        "agent_ready_s": ready.as_secs_f64(),
        "initial_apply_ms": initial_apply_ms,
        "rss_mib": {
            "testbed_only": base_rss, "loaded": loaded_rss,
            "after_20_reloads": rss_after_reloads, "after_churn": rss_after_churn,
            "per_1k_objects": (loaded_rss - base_rss) / (f64::from(objects) / 1000.0),
        },
        "idle_cpu_pct": idle_cpu_pct,
        "one_object_change": {
            "written_to_in_force_ms": stats(&change_ms), "apply_ms": stats(&apply_ms),
            "last": rebuilt,
        },
        "load_direct": loads(&direct),
        "load_small_state": loads(&small),
        "load_quiet": loads(&quiet),
        "load_during_churn": { "changes_written": k, "snapshots_built": applies, "load": loads(&churned) },
    });
    let md = markdown(&report);
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("scale.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("scale.md"), &md)?;
    println!("\n{md}");
    println!("wrote {0}/scale.json, {0}/scale.md", out_dir.display());
    Ok(())
}

fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let ms = |v: &Value| f(v) / 1000.0;
    let check = |ok: bool| if ok { "met" } else { "**not met**" };
    let churn = &r["load_during_churn"]["load"];
    let quiet = &r["load_quiet"];
    let change = &r["one_object_change"]["written_to_in_force_ms"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Desired state at scale: {} Services / {} endpoints / {} Pods ({:.1} MB of YAML)\n",
        r["state"]["services"],
        r["state"]["endpoints"],
        r["state"]["pods"],
        f(&r["state"]["bytes"]) / 1e6
    );
    let _ = writeln!(s, "| figure | measured | target |\n|---|---|---|");
    let _ = writeln!(
        s,
        "| initial apply (read, parse, build) | {:.0} ms | < 1000 ms: {} |",
        f(&r["initial_apply_ms"]),
        check(f(&r["initial_apply_ms"]) < 1000.0)
    );
    let _ = writeln!(
        s,
        "| one-object change, file renamed in → in force (median / max of 20) | {:.1} / {:.1} ms | < 50 ms: {} |",
        f(&change["median"]),
        f(&change["max"]),
        check(f(&change["max"]) < 50.0)
    );
    let _ = writeln!(
        s,
        "| agent RSS: testbed only / loaded / after 20 reloads / after churn | {:.1} / {:.1} / {:.1} / {:.1} MiB | < 60 MiB after 20 reloads: {} |",
        f(&r["rss_mib"]["testbed_only"]),
        f(&r["rss_mib"]["loaded"]),
        f(&r["rss_mib"]["after_20_reloads"]),
        f(&r["rss_mib"]["after_churn"]),
        check(f(&r["rss_mib"]["after_20_reloads"]) < 60.0)
    );
    let _ = writeln!(
        s,
        "| memory per 1k objects | {:.2} MiB | |",
        f(&r["rss_mib"]["per_1k_objects"])
    );
    let _ = writeln!(
        s,
        "| idle CPU | {:.2} % of a core | < 1 %: {} |",
        f(&r["idle_cpu_pct"]),
        check(f(&r["idle_cpu_pct"]) < 1.0)
    );
    for (what, l) in [
        ("no agents (client -> web pod)", &r["load_direct"]),
        (
            "through the mesh, testbed state only",
            &r["load_small_state"],
        ),
    ] {
        let _ = writeln!(
            s,
            "| 200 req/s {what}: p50 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} ms ({} errors) | |",
            ms(&l["p50_us"]),
            ms(&l["p99_us"]),
            ms(&l["p999_us"]),
            ms(&l["max_us"]),
            l["errors"]
        );
    }
    let _ = writeln!(
        s,
        "| 200 req/s through the mesh, large state quiet: p50 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} ms ({} errors) | |",
        ms(&quiet["p50_us"]),
        ms(&quiet["p99_us"]),
        ms(&quiet["p999_us"]),
        ms(&quiet["max_us"]),
        quiet["errors"]
    );
    let _ = writeln!(
        s,
        "| the same while {} changes made {} snapshots: p50 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} ms ({} errors) | p99.9 < 5 ms: {} |",
        r["load_during_churn"]["changes_written"],
        r["load_during_churn"]["snapshots_built"],
        ms(&churn["p50_us"]),
        ms(&churn["p99_us"]),
        ms(&churn["p999_us"]),
        ms(&churn["max_us"]),
        churn["errors"],
        check(ms(&churn["p999_us"]) < 5.0)
    );
    s
}
