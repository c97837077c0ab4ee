//! Turns benchmark runs into the report: medians and ranges per scenario, ratios to direct
//! computed within each repetition, targets met or not, a markdown table and an SVG plot.

use std::{fmt::Write as _, time::Duration};

use serde_json::{json, Value};

use super::Scenario;

fn num(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

fn stats(values: &[f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!({"median": median, "min": v[0], "max": v[v.len() - 1], "n": v.len()})
}

/// A short line for the console while the benchmark runs.
pub fn one_line(run: &Value) -> String {
    let mut s = String::new();
    if let Some(lat) = run["latency"].as_object() {
        for (rate, l) in lat {
            let _ = write!(
                s,
                "@{rate}/s p50 {:.0}µs p99 {:.0}µs; ",
                l["p50_us"].as_f64().unwrap_or(0.0),
                l["p99_us"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let _ = write!(
        s,
        "{:.0} req/s; bulk {:.2} Gbit/s; {:.0} conn/s",
        run["rps"].as_f64().unwrap_or(0.0),
        run["bulk_gbps"].as_f64().unwrap_or(0.0),
        run["connections_per_sec"].as_f64().unwrap_or(0.0)
    );
    s
}

fn figures(plan: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rate in plan["rates"].as_array().into_iter().flatten() {
        for p in ["p50", "p90", "p99"] {
            out.push((
                format!("{p} at {rate} req/s (µs)"),
                format!("/latency/{rate}/{p}_us"),
            ));
        }
    }
    for (name, ptr) in [
        ("max req/s (wrk -t2 -c16)", "/rps"),
        ("one TCP stream (Gbit/s)", "/bulk_gbps"),
        ("new connections/s", "/connections_per_sec"),
        ("agent CPU µs/request, n1", "/agent_cpu_us_per_request/n1"),
        ("agent CPU µs/request, n2", "/agent_cpu_us_per_request/n2"),
        (
            "agent context switches/request, n1",
            "/agent_switches_per_request/n1/total",
        ),
        (
            "agent context switches/request, n2",
            "/agent_switches_per_request/n2/total",
        ),
        (
            "agent system calls/request, n1 (--profile)",
            "/profiled_syscalls_per_request/n1",
        ),
        (
            "agent system calls/request, n2 (--profile)",
            "/profiled_syscalls_per_request/n2",
        ),
        (
            "agent allocations/request, n1 (--profile)",
            "/profiled_allocations_per_request/n1",
        ),
        (
            "agent allocations/request, n2 (--profile)",
            "/profiled_allocations_per_request/n2",
        ),
        ("agent RSS idle KiB, n1", "/agent_memory/n1/idle_kib"),
        (
            "agent RSS idle, anonymous KiB, n1",
            "/agent_memory/n1/idle_anon_kib",
        ),
        (
            "agent RSS idle, file-backed KiB, n1",
            "/agent_memory/n1/idle_file_kib",
        ),
        (
            "agent RSS start-up peak KiB, n1",
            "/agent_memory/n1/startup_peak_kib",
        ),
        (
            "agent RSS peak under load KiB, n1",
            "/agent_memory/n1/peak_kib",
        ),
        (
            "agent RSS peak under load KiB, n2",
            "/agent_memory/n2/peak_kib",
        ),
    ] {
        out.push((name.to_owned(), ptr.to_owned()));
    }
    out
}

/// Which baseline a scenario is compared with.
fn baseline(s: Scenario) -> Option<Scenario> {
    match s {
        Scenario::MeshCross
        | Scenario::MeshCrossL4
        | Scenario::MeshCrossRouted
        | Scenario::MeshCrossPolicy
        | Scenario::SidecarCross => Some(Scenario::DirectCross),
        Scenario::MeshSame => Some(Scenario::DirectSame),
        _ => None,
    }
}

pub fn build(
    plan: &Value,
    runs: &[(Scenario, usize, Value)],
    idle: Value,
    ebpf: Value,
    sidecar_verified: bool,
    took: Duration,
) -> Value {
    let figs = figures(plan);
    let mut summary = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    for s in Scenario::ALL {
        let mine: Vec<&(Scenario, usize, Value)> = runs.iter().filter(|r| r.0 == s).collect();
        let mut per = serde_json::Map::new();
        for (name, ptr) in &figs {
            let vals: Vec<f64> = mine.iter().filter_map(|r| num(&r.2, ptr)).collect();
            if !vals.is_empty() {
                per.insert(name.clone(), stats(&vals));
            }
        }
        summary.insert(s.key().to_owned(), Value::Object(per));
        let Some(base) = baseline(s) else { continue };
        let mut rel = serde_json::Map::new();
        for (name, ptr) in &figs {
            let latency = ptr.starts_with("/latency");
            let relative = matches!(ptr.as_str(), "/rps" | "/bulk_gbps" | "/connections_per_sec");
            if !latency && !relative {
                continue;
            }
            let mut vals = Vec::new();
            for (_, rep, run) in &mine {
                let Some(b) = runs.iter().find(|r| r.0 == base && r.1 == *rep) else {
                    continue;
                };
                if let (Some(x), Some(d)) = (num(run, ptr), num(&b.2, ptr)) {
                    vals.push(if latency {
                        x - d
                    } else if d > 0.0 {
                        x / d
                    } else {
                        0.0
                    });
                }
            }
            let label = if latency {
                format!("added {name}")
            } else {
                format!("{name} ratio")
            };
            rel.insert(label, stats(&vals));
        }
        ratios.insert(format!("{}_vs_{}", s.key(), base.key()), Value::Object(rel));
    }
    let machine = json!({
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "context_switch_ns": super::context_switch_ns(),
    });
    let mut report = json!({
        "machine": machine,
        "plan": plan,
        "took_secs": took.as_secs(),
        "sidecar_mtls_verified_by_refused_plaintext": sidecar_verified,
        "summary": summary,
        "ratios": ratios,
        "idle_connections": idle,
        "ebpf_programs": ebpf,
        "runs": runs.iter().map(|(s, rep, v)| json!({"scenario": s.key(), "rep": rep, "result": v})).collect::<Vec<_>>(),
    });
    report["targets"] = targets(&report);
    report
}

/// `scenario` minus unrouted (L7) cross-node p50 at 1000 req/s, within each repetition; the
/// median.
fn extra_p50(r: &Value, scenario: &str) -> Option<f64> {
    let runs = r["runs"].as_array()?;
    let p50 = |key: &str, rep: &Value| {
        runs.iter()
            .find(|x| x["scenario"] == key && x["rep"] == *rep)
            .and_then(|x| x["result"]["latency"]["1000"]["p50_us"].as_f64())
    };
    let mut diffs: Vec<f64> = runs
        .iter()
        .filter(|x| x["scenario"] == scenario)
        .filter_map(|x| Some(p50(scenario, &x["rep"])? - p50("mesh_cross", &x["rep"])?))
        .collect();
    diffs.sort_by(f64::total_cmp);
    diffs.get(diffs.len() / 2).copied()
}

/// What the kernel's policy decision adds to a packet it lets through: the slowest SYN passed
/// (allowed by source on a policed pod, or on a pod without policy), less the same program
/// passing a packet of an established connection (the parsing every packet pays). A refused
/// SYN also pays its drop count; it is reported beside, not here: it reaches nobody.
fn kernel_worst(r: &Value) -> Option<f64> {
    let k = r["runs"]
        .as_array()?
        .iter()
        .find_map(|x| x["result"]["kernel_policy"].as_object())?;
    let ns = |name: &str| k.get(name).and_then(|v| v["ns"].as_f64());
    let worst = ns("syn_allowed_by_source")?.max(ns("syn_no_policy")?);
    Some(worst - ns("ack")?)
}

/// Adds the policy-evaluation micro-benchmark and its target to the report.
pub fn add_policy_evaluation(report: &mut Value, evaluation: Value) {
    let worst = evaluation
        .as_object()
        .and_then(|o| o.values().filter_map(|v| v.as_f64()).reduce(f64::max));
    if let Some(targets) = report["targets"].as_array_mut() {
        targets.push(json!({
            "target": "policy evaluation, 50 rules < 5 µs per decision (worst case, ns)",
            "value": worst,
            "met": worst.map(|ns| ns < 5000.0),
        }));
    }
    report["policy_evaluation_ns"] = evaluation;
}

/// Adds the route-selection micro-benchmark and its target to the report.
pub fn add_route_selection(report: &mut Value, selection: Value) {
    // Ordinary requests; the adversarial path is reported beside them.
    let worst = selection.as_object().and_then(|o| {
        o.iter()
            .filter(|(k, _)| !k.starts_with("adversarial"))
            .filter_map(|(_, v)| v.as_f64())
            .reduce(f64::max)
    });
    if let Some(targets) = report["targets"].as_array_mut() {
        targets.push(json!({
            "target": "route selection among 1,000 routes < 5 µs (worst case, ns)",
            "value": worst,
            "met": worst.map(|ns| ns < 5000.0),
        }));
    }
    report["route_selection_ns"] = selection;
}

fn median(report: &Value, pointer: &str) -> Option<f64> {
    report.pointer(pointer)?.get("median")?.as_f64()
}

/// The targets of the benchmark method and of the benchmark issue, each met or not.
fn targets(r: &Value) -> Value {
    let esc = |s: &str| s.replace('/', "~1");
    let added = |fig: &str| {
        median(
            r,
            &format!(
                "/ratios/mesh_cross_vs_direct_cross/{}",
                esc(&format!("added {fig}"))
            ),
        )
    };
    let ratio = |key: &str, fig: &str| {
        median(
            r,
            &format!("/ratios/{key}/{}", esc(&format!("{fig} ratio"))),
        )
    };
    let sidecar_added = median(
        r,
        &format!(
            "/ratios/sidecar_cross_vs_direct_cross/{}",
            esc("added p50 at 1000 req/s (µs)")
        ),
    );
    let fig = |scenario: &str, name: &str| median(r, &format!("/summary/{scenario}/{}", esc(name)));
    let p50 = added("p50 at 1000 req/s (µs)");
    let p99 = added("p99 at 1000 req/s (µs)");
    // The worse of the two nodes' agents.
    let worst = |per_node: &dyn Fn(&str) -> Option<f64>| {
        let (a, b) = (per_node("n1"), per_node("n2"));
        a.zip(b).map(|(a, b)| a.max(b)).or(a).or(b)
    };
    let idle_rss = worst(&|n| r["idle_connections"][format!("{n}_rss_kib")].as_f64());
    let peak = worst(&|n| fig("mesh_cross", &format!("agent RSS peak under load KiB, {n}")));
    let cpu = worst(&|n| fig("mesh_cross", &format!("agent CPU µs/request, {n}")));
    let check = |name: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| json!({"target": name, "value": value, "met": value.map(ok)});
    json!([
        check(
            "routed (10 rules, split) p50 at 1000 req/s within 10 µs of unrouted L7",
            extra_p50(r, "mesh_cross_routed"),
            &|v| v <= 10.0
        ),
        check(
            "policy (50 rules) p50 at 1000 req/s ≤ 5 µs over no policy",
            extra_p50(r, "mesh_cross_policy"),
            &|v| v <= 5.0
        ),
        check(
            "kernel policy decision adds ≤ 100 ns to a packet it passes (worst passed SYN − established packet, BPF_PROG_TEST_RUN, ns)",
            kernel_worst(r),
            &|v| v <= 100.0
        ),
        check("cross-node added p50 at 1000 req/s < 150 µs", p50, &|v| v
            < 150.0),
        check(
            "cross-node added p50 at 1000 req/s below the sidecar baseline's",
            p50,
            &|v| sidecar_added.is_some_and(|s| v < s)
        ),
        check(
            "cross-node added p50 at 1000 req/s ≤ 100 µs (method)",
            p50,
            &|v| v <= 100.0
        ),
        check(
            "cross-node added p99 at 1000 req/s ≤ 170 µs (method)",
            p99,
            &|v| v <= 170.0
        ),
        check(
            "max req/s ≥ 0.70× direct",
            ratio("mesh_cross_vs_direct_cross", "max req/s (wrk -t2 -c16)"),
            &|v| v >= 0.70
        ),
        check(
            "one stream ≥ 0.50× direct (issue) / 0.40× (method)",
            ratio("mesh_cross_vs_direct_cross", "one TCP stream (Gbit/s)"),
            &|v| v >= 0.50
        ),
        check(
            "same-node stream ≥ 0.90× direct",
            ratio("mesh_same_vs_direct_same", "one TCP stream (Gbit/s)"),
            &|v| v >= 0.90
        ),
        check(
            "agent RSS with 1000 idle connections < 40 MiB (KiB)",
            idle_rss,
            &|v| v < 40.0 * 1024.0
        ),
        check(
            "agent RSS idle ≤ 12 MB (KiB)",
            fig("mesh_cross", "agent RSS idle KiB, n1"),
            &|v| v <= 12_000.0
        ),
        check("agent RSS peak under load ≤ 20 MB (KiB)", peak, &|v| v
            <= 20_000.0),
        check("agent CPU per request ≤ 25 µs per side", cpu, &|v| v
            <= 25.0),
    ])
}

fn cell(v: &Value) -> String {
    match (
        v["median"].as_f64(),
        v["min"].as_f64(),
        v["max"].as_f64(),
        v["n"].as_u64(),
    ) {
        (Some(m), Some(lo), Some(hi), Some(n)) if n > 1 => {
            format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi))
        }
        (Some(m), ..) => fmt(m),
        _ => "–".to_owned(),
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "Machine: {} ({} cores), kernel {}, one context switch {} ns (two threads on one CPU, pipe ping-pong); {} repetition(s), scenarios alternating; took {} s.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        m["context_switch_ns"].as_f64().map_or("?".to_owned(), |v| format!("{v:.0}")),
        r["plan"]["repetitions"],
        r["took_secs"]
    );
    let _ = writeln!(s, "Median (min–max) over repetitions; ratios and added latency computed within each repetition.\n");
    let cols = [
        ("direct_cross", None),
        ("mesh_cross", Some("mesh_cross_vs_direct_cross")),
        ("mesh_cross_l4", Some("mesh_cross_l4_vs_direct_cross")),
        (
            "mesh_cross_routed",
            Some("mesh_cross_routed_vs_direct_cross"),
        ),
        (
            "mesh_cross_policy",
            Some("mesh_cross_policy_vs_direct_cross"),
        ),
        ("sidecar_cross", Some("sidecar_cross_vs_direct_cross")),
        ("direct_same", None),
        ("mesh_same", Some("mesh_same_vs_direct_same")),
    ];
    let _ = writeln!(s, "| figure | direct cross-node | mesh cross-node (HTTP) | mesh vs direct | mesh cross-node (opaque L4) | L4 vs direct | mesh cross-node (routed) | routed vs direct | mesh cross-node (policy, 50 rules) | policy vs direct | sidecar (nginx mTLS) | sidecar vs direct | direct same-node | mesh same-node | mesh vs direct |");
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, _) in figures(&r["plan"]) {
        let mut row = format!("| {name} ");
        let mut any = false;
        for (key, rel) in cols {
            let v = &r["summary"][key][&name];
            any |= !v.is_null();
            let _ = write!(row, "| {} ", cell(v));
            if let Some(rel) = rel {
                let lat = name.starts_with('p');
                let label = if lat {
                    format!("added {name}")
                } else {
                    format!("{name} ratio")
                };
                let rv = &r["ratios"][rel][&label];
                let text = if rv.is_null() {
                    "".to_owned()
                } else if lat {
                    let c = cell(rv);
                    if c.starts_with('-') {
                        c
                    } else {
                        format!("+{c}")
                    }
                } else {
                    let c = cell(rv);
                    match c.split_once(' ') {
                        Some((median, range)) => format!("{median}× {range}"),
                        None => format!("{c}×"),
                    }
                };
                let _ = write!(row, "| {text} ");
            }
        }
        if any {
            let _ = writeln!(s, "{row}|");
        }
    }
    if let Some(idle) = r["idle_connections"].as_object() {
        let _ = writeln!(
            s,
            "\nAgent RSS with {} idle proxied connections: n1 {} KiB, n2 {} KiB.",
            idle.get("connections").cloned().unwrap_or_default(),
            idle.get("n1_rss_kib").cloned().unwrap_or_default(),
            idle.get("n2_rss_kib").cloned().unwrap_or_default()
        );
    }
    if let Some(progs) = r["ebpf_programs"].as_object() {
        let list: Vec<String> = progs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} {:.0} ns × {}",
                    v["avg_ns"].as_f64().unwrap_or(0.0),
                    v["run_cnt"]
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "eBPF programs (average run time × runs, whole benchmark): {}.",
            list.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "Sidecar baseline carries mTLS (plaintext to its port refused): {}.\n",
        r["sidecar_mtls_verified_by_refused_plaintext"]
    );
    if let Some(e) = r["policy_evaluation_ns"].as_object() {
        let list: Vec<String> = e.iter().map(|(k, v)| format!("{k} {v} ns")).collect();
        let _ = writeln!(
            s,
            "Policy evaluation (one `authorize` call per request): {}.\n",
            list.join(", ")
        );
    }
    let kernel: Vec<String> = r["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["result"]["kernel_policy"].as_object())
        .flat_map(|o| {
            o.iter()
                .map(|(k, v)| {
                    format!(
                        "{k} {} ns ({})",
                        v["ns"],
                        v["verdict"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if !kernel.is_empty() {
        let _ = writeln!(
            s,
            "Kernel inbound policy per packet (BPF_PROG_TEST_RUN on pod b's veth, 1,000,000 runs each): {}.\n",
            kernel.join(", ")
        );
    }
    if let Some(sel) = r["route_selection_ns"].as_object() {
        let list: Vec<String> = sel.iter().map(|(k, v)| format!("{k} {v} ns")).collect();
        let _ = writeln!(
            s,
            "Route selection among 1,000 HTTPRoutes (3,000 rules) on one Service port: {}.\n",
            list.join(", ")
        );
    }
    let _ = writeln!(s, "| target | value | met |\n|---|---|---|");
    for t in r["targets"].as_array().into_iter().flatten() {
        let value = t["value"].as_f64().map_or("–".to_owned(), fmt);
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "–",
        };
        let _ = writeln!(
            s,
            "| {} | {value} | {met} |",
            t["target"].as_str().unwrap_or("?")
        );
    }
    s
}

/// Grouped bars: p50, p90, p99 at the middle rate for each scenario.
pub fn latency_svg(r: &Value) -> String {
    let rates: Vec<String> = r["plan"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    let rate = rates.get(rates.len() / 2).cloned().unwrap_or_default();
    let scenarios = [
        "direct_cross",
        "mesh_cross",
        "sidecar_cross",
        "direct_same",
        "mesh_same",
    ];
    let pcts = [("p50", "#4e79a7"), ("p90", "#f28e2b"), ("p99", "#e15759")];
    let value = |sc: &str, p: &str| {
        r["summary"][sc][format!("{p} at {rate} req/s (µs)")]["median"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let max = scenarios
        .iter()
        .flat_map(|sc| pcts.iter().map(move |(p, _)| value(sc, p)))
        .fold(1.0f64, f64::max);
    let (w, h, left, bottom, top) = (760.0, 360.0, 60.0, 50.0, 40.0);
    let plot_h = h - bottom - top;
    let group_w = (w - left - 20.0) / scenarios.len() as f64;
    let bar_w = group_w / 4.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">Latency at {rate} req/s (µs, median of repetitions)</text>\n"
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>", w - 20.0, left - 6.0, y + 4.0);
    }
    for (g, sc) in scenarios.iter().enumerate() {
        let x0 = left + g as f64 * group_w + bar_w / 2.0;
        for (k, (p, color)) in pcts.iter().enumerate() {
            let v = value(sc, p);
            let bh = plot_h * v / max;
            let x = x0 + k as f64 * bar_w;
            let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{sc} {p}: {v:.0} µs</title></rect>", top + plot_h - bh, bar_w - 2.0);
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + 1.5 * bar_w,
            h - bottom + 18.0,
            sc.replace('_', " ")
        );
    }
    for (k, (p, color)) in pcts.iter().enumerate() {
        let x = w - 200.0 + k as f64 * 60.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"21\">{p}</text>", x + 16.0);
    }
    s.push_str("</svg>\n");
    s
}
