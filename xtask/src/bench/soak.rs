//! `cargo xtask bench --soak SECS`: a long run through the mesh at ~1000 req/s, mixed, with
//! each agent's memory, descriptors, threads and eBPF map entries sampled every 10 s, to show
//! that nothing grows with time.
//!
//! Traffic, from the client pod (n1) to the web pod (n2), all through both agents: 700 req/s
//! over 7 keep-alive connections, ~200 req/s on a new connection each (sequential, 3 ms
//! apart), and 10 echo streams of a line every 100 ms. Writes `target/bench/soak.json` and a
//! plot, `target/bench/soak.svg`.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use mesh_agent_tests::Agent;
use serde_json::{json, Value};

use super::{field, rss_kib};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const KEEPALIVE_RATE: u32 = 700;
const KEEPALIVE_CONNS: u32 = 7;
const STREAMS: usize = 10;
/// New connections per `churn` process before it is replaced (its count is its report).
const CHURN_BATCH: u32 = 2000;
const WEB: &str = "10.1.2.2:8080";
const ECHO: &str = "10.1.2.2:9090";

/// One sample of one agent.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
    /// `mesh_ebpf_map_entries`, all maps.
    map_entries: f64,
}

fn sample(agent: &Agent) -> Sample {
    let Some(pid) = agent.pid() else {
        return Sample::default();
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let map_entries = agent
        .metrics()
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("mesh_ebpf_map_entries{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(f64::NAN);
    Sample {
        rss_kib: rss_kib(pid).0,
        fds,
        threads,
        map_entries,
    }
}

pub fn run(root: &Path, secs: u64) -> anyhow::Result<()> {
    if secs < 60 {
        bail!("--soak needs at least 60 seconds to say anything about growth");
    }
    let (bed, meshtest) = super::client_web_testbed(root)?;
    for args in [&["http", "8080", "web"][..], &["echo", "9090"]] {
        let mut server = bed.pod_command("web", &meshtest)?;
        server.args(args).stdout(Stdio::null());
        bed.spawn(server)?;
    }
    let mut n1 = Agent::start(&bed, "n1", &["--log-level", "warn"])?;
    let mut n2 = Agent::start(&bed, "n2", &["--log-level", "warn"])?;
    n1.wait_ready(Duration::from_secs(60))?;
    n2.wait_ready(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));

    let client = |args: &[&str]| -> anyhow::Result<Child> {
        let mut cmd = bed.pod_command("client", &meshtest)?;
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd.spawn()?)
    };
    let secs_arg = secs.to_string();
    println!(
        "soak: {secs} s at ~{} req/s (keep-alive {KEEPALIVE_RATE}, new connections ~200, \
         {STREAMS} streams x 10 lines/s); a sample every {} s",
        KEEPALIVE_RATE + 200 + STREAMS as u32 * 10,
        SAMPLE_EVERY.as_secs()
    );
    let keepalive = client(&[
        "load",
        WEB,
        &KEEPALIVE_RATE.to_string(),
        &KEEPALIVE_CONNS.to_string(),
        &secs_arg,
    ])?;
    let streams = (0..STREAMS)
        .map(|_| client(&["stream", ECHO, &secs_arg]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let churn_batch = CHURN_BATCH.to_string();
    let mut churn = client(&["churn", WEB, &churn_batch, "3"])?;
    let mut churned = 0u64;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut samples: Vec<(f64, Sample, Sample)> = Vec::new();
    let mut next_sample = started;
    while Instant::now() < deadline {
        if Instant::now() >= next_sample {
            let t = started.elapsed().as_secs_f64();
            let (a, b) = (sample(&n1), sample(&n2));
            println!(
                "  t={t:>6.0}s  n1: rss {:.1} MiB, fds {}, threads {}, map entries {}  |  n2: rss {:.1} MiB, fds {}, threads {}, map entries {}",
                a.rss_kib as f64 / 1024.0,
                a.fds,
                a.threads,
                a.map_entries,
                b.rss_kib as f64 / 1024.0,
                b.fds,
                b.threads,
                b.map_entries
            );
            samples.push((t, a, b));
            next_sample += SAMPLE_EVERY;
        }
        if churn.try_wait()?.is_some() {
            let out = churn.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "new-connection load failed: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            churned += field(&text, "ok").unwrap_or(0.0) as u64;
            churn = client(&["churn", WEB, &churn_batch, "3"])?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = churn.kill();
    let _ = churn.wait();

    let text = |child: Child, what: &str| -> anyhow::Result<String> {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{what} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    };
    let load = text(keepalive, "keep-alive load")?;
    let mut echoed = 0.0;
    for s in streams {
        echoed += field(&text(s, "a stream")?, "echoed").unwrap_or(0.0);
    }
    let total = field(&load, "count").unwrap_or(0.0) + churned as f64 + echoed;
    println!(
        "traffic: keep-alive {}; new connections {churned} ok; streams {echoed} lines echoed; \
         {:.0} req/s overall",
        load.trim(),
        total / secs as f64
    );

    let report = verdict(&samples);
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let json = json!({
        "seconds": secs,
        "keepalive": load.trim(),
        "new_connections_ok": churned,
        "stream_lines_echoed": echoed,
        "requests_per_second": total / secs as f64,
        "samples": samples.iter().map(|(t, a, b)| json!({
            "t": t,
            "n1": {"rss_kib": a.rss_kib, "fds": a.fds, "threads": a.threads, "map_entries": a.map_entries},
            "n2": {"rss_kib": b.rss_kib, "fds": b.fds, "threads": b.threads, "map_entries": b.map_entries},
        })).collect::<Vec<_>>(),
        "verdict": report,
    });
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(dir.join("soak.svg"), plot(&samples))?;
    println!("{}", serde_json::to_string_pretty(&json["verdict"])?);
    println!(
        "wrote {} and {}",
        dir.join("soak.json").display(),
        dir.join("soak.svg").display()
    );
    n1.stop()?;
    n2.stop()?;
    Ok(())
}

/// Growth between the second quarter of the run (after warm-up) and the last: flat if RSS
/// grew by less than 1 MiB or 5%, descriptors and threads by at most 8, map entries by at
/// most 64.
fn verdict(samples: &[(f64, Sample, Sample)]) -> Value {
    let n = samples.len();
    let quarter = |q: usize| &samples[n * q / 4..(n * (q + 1) / 4).max(n * q / 4 + 1).min(n)];
    let mean = |s: &[(f64, Sample, Sample)], f: &dyn Fn(&(f64, Sample, Sample)) -> f64| {
        s.iter().map(f).sum::<f64>() / s.len().max(1) as f64
    };
    let mut out = serde_json::Map::new();
    let mut flat = true;
    type Get = fn(&(f64, Sample, Sample)) -> f64;
    let figures: [(&str, Get, Get, f64, f64); 4] = [
        (
            "rss_mib",
            |s| s.1.rss_kib as f64 / 1024.0,
            |s| s.2.rss_kib as f64 / 1024.0,
            1.0,
            0.05,
        ),
        ("fds", |s| s.1.fds as f64, |s| s.2.fds as f64, 8.0, 0.0),
        (
            "threads",
            |s| s.1.threads as f64,
            |s| s.2.threads as f64,
            8.0,
            0.0,
        ),
        (
            "map_entries",
            |s| s.1.map_entries,
            |s| s.2.map_entries,
            64.0,
            0.0,
        ),
    ];
    for (name, n1, n2, abs, rel) in figures {
        for (node, get) in [("n1", n1), ("n2", n2)] {
            let early = mean(quarter(1), &get);
            let late = mean(quarter(3), &get);
            let grew = late - early;
            let ok = grew <= abs.max(early * rel);
            flat &= ok;
            out.insert(
                format!("{node}_{name}"),
                json!({"second_quarter": early, "last_quarter": late, "growth": grew, "flat": ok}),
            );
        }
    }
    out.insert("flat".into(), json!(flat));
    Value::Object(out)
}

/// Three panels (RSS, descriptors, map entries), n1 and n2 in each.
fn plot(samples: &[(f64, Sample, Sample)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    type Get = fn(&Sample) -> f64;
    let panels: [(&str, Get); 3] = [
        ("agent RSS (MiB)", |s| s.rss_kib as f64 / 1024.0),
        ("open descriptors", |s| s.fds as f64),
        ("eBPF map entries", |s| s.map_entries),
    ];
    let t_max = samples.last().map_or(1.0, |s| s.0).max(1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        W + 80.0,
        (H + 40.0) * panels.len() as f64 + 20.0
    );
    for (i, (title, get)) in panels.iter().enumerate() {
        let top = 20.0 + i as f64 * (H + 40.0);
        let values = samples.iter().flat_map(|s| [get(&s.1), get(&s.2)]);
        let max = values.filter(|v| v.is_finite()).fold(1.0f64, f64::max) * 1.1;
        let _ = writeln!(
            svg,
            "<text x=\"60\" y=\"{}\">{title} over {t_max:.0} s (n1 blue, n2 orange); top {max:.1}</text>",
            top - 6.0
        );
        let _ = writeln!(
            svg,
            "<rect x=\"60\" y=\"{top}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for (colour, node) in [("#1f77b4", 1), ("#ff7f0e", 2)] {
            let points: Vec<String> = samples
                .iter()
                .map(|s| {
                    let v = get(if node == 1 { &s.1 } else { &s.2 });
                    let x = 60.0 + s.0 / t_max * W;
                    let y = top + H - v.max(0.0) / max * H;
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
                points.join(" ")
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
