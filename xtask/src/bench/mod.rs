//! `cargo xtask bench`: what the mesh costs, measured the way `BENCHMARK-METHOD.md` describes,
//! side by side with no mesh and with a sidecar pair, in one run, as ratios.
//!
//! Topology: pod a (client) and pod c (server) on n1, pod b (server) on n2. Everything of n1
//! runs on CPU0, everything of n2 on CPU1. Servers: nginx (1 worker, 1 KiB body, keep-alive)
//! and iperf3. Scenarios alternate within each repetition.

pub mod instructions;
pub mod kube_scale;
mod report;
pub mod scale;
pub mod soak;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use mesh_agent_tests::{netns, Agent, PodSpec, Testbed, TestbedSpec};
use serde_json::{json, Value};

/// How long and how hard each figure is measured.
struct Plan {
    rates: Vec<u32>,
    connections: u32,
    latency_secs: u32,
    warmup_secs: u32,
    reps: usize,
    wrk_secs: u32,
    iperf_secs: u32,
    churn: u32,
    idle_connections: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                rates: vec![1000],
                connections: 4,
                latency_secs: 4,
                warmup_secs: 1,
                reps: 1,
                wrk_secs: 4,
                iperf_secs: 3,
                churn: 300,
                idle_connections: 1000,
            }
        } else {
            Plan {
                rates: vec![500, 1000, 2000],
                connections: 4,
                latency_secs: 8,
                warmup_secs: 1,
                reps: 3,
                wrk_secs: 10,
                iperf_secs: 5,
                churn: 1000,
                idle_connections: 1000,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    DirectCross,
    MeshCross,
    /// The mesh with the server's port declared opaque: today's L4 relay, for comparison with
    /// the HTTP-aware path.
    MeshCrossL4,
    /// HTTP to a Service routed by an HTTPRoute of 10 rules, the last a 2-backend split.
    MeshCrossRouted,
    /// HTTP to pod b under an Istio ALLOW policy of 50 rules, the request matching the last.
    MeshCrossPolicy,
    SidecarCross,
    DirectSame,
    MeshSame,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::DirectCross,
        Scenario::MeshCross,
        Scenario::MeshCrossL4,
        Scenario::MeshCrossRouted,
        Scenario::MeshCrossPolicy,
        Scenario::SidecarCross,
        Scenario::DirectSame,
        Scenario::MeshSame,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::DirectCross => "direct cross-node",
            Scenario::MeshCross => "mesh cross-node",
            Scenario::MeshCrossL4 => "mesh cross-node, opaque (L4)",
            Scenario::MeshCrossRouted => {
                "mesh cross-node, routed (HTTPRoute: 10 rules, 2-backend split)"
            }
            Scenario::MeshCrossPolicy => "mesh cross-node, authorized (Istio ALLOW, 50 rules)",
            Scenario::SidecarCross => "sidecar cross-node",
            Scenario::DirectSame => "direct same-node",
            Scenario::MeshSame => "mesh same-node",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Scenario::DirectCross => "direct_cross",
            Scenario::MeshCross => "mesh_cross",
            Scenario::MeshCrossL4 => "mesh_cross_l4",
            Scenario::MeshCrossRouted => "mesh_cross_routed",
            Scenario::MeshCrossPolicy => "mesh_cross_policy",
            Scenario::SidecarCross => "sidecar_cross",
            Scenario::DirectSame => "direct_same",
            Scenario::MeshSame => "mesh_same",
        }
    }

    fn mesh(self) -> bool {
        matches!(
            self,
            Scenario::MeshCross
                | Scenario::MeshCrossL4
                | Scenario::MeshCrossRouted
                | Scenario::MeshCrossPolicy
                | Scenario::MeshSame
        )
    }
}

const NODE_CPU: [usize; 2] = [0, 1];
const BODY_BYTES: usize = 1024;
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns kernel BPF run-time statistics on for the run and restores the setting after.
struct BpfStats(Option<String>);

impl BpfStats {
    fn enable() -> Self {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        BpfStats(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(v) = &self.0 {
            let _ = std::fs::write(BPF_STATS, v.trim());
        }
    }
}

struct Bench {
    /// Where `--profile` writes the agents' profiles.
    profile: Option<PathBuf>,
    bed: Testbed,
    plan: Plan,
    meshtest: PathBuf,
    b: String,
    c: String,
}

fn check_tools() -> anyhow::Result<()> {
    for tool in ["nginx", "wrk", "iperf3", "bpftool"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is missing (cargo xtask setup --bench installs it)");
        }
    }
    Ok(())
}

pub fn run(quick: bool, profile: bool, root: &Path) -> anyhow::Result<()> {
    let (mut bench, agent_bin) = Bench::up(quick, profile, root)?;
    let started = Instant::now();
    let _stats = BpfStats::enable();
    bench.start_servers(&agent_bin)?;
    let sidecar_verified = bench.verify_sidecar_mtls()?;

    let mut runs: Vec<(Scenario, usize, Value)> = Vec::new();
    let mut idle = Value::Null;
    for rep in 0..bench.plan.reps {
        for scenario in Scenario::ALL {
            println!(
                "==> rep {}/{}: {}",
                rep + 1,
                bench.plan.reps,
                scenario.name()
            );
            let run = bench.scenario(scenario, rep == 0, &mut idle)?;
            println!("    {}", report::one_line(&run));
            runs.push((scenario, rep, run));
        }
    }
    let ebpf = total_ebpf(&runs);
    println!("==> route selection among 1,000 routes");
    let selection = route_selection(root)?;
    println!("    ns per selection: {selection}");
    let mut report = report::build(
        &bench.plan_json(),
        &runs,
        idle,
        ebpf,
        sidecar_verified,
        started.elapsed(),
    );
    report::add_route_selection(&mut report, selection);
    println!("==> policy evaluation, 50 rules");
    let evaluation = policy_evaluation(root)?;
    println!("    ns per decision: {evaluation}");
    report::add_policy_evaluation(&mut report, evaluation);
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let markdown = report::markdown(&report);
    std::fs::write(dir.join("report.md"), &markdown)?;
    std::fs::write(dir.join("latency.svg"), report::latency_svg(&report))?;
    println!("\n{markdown}");
    println!(
        "wrote {0}/report.json, {0}/report.md, {0}/latency.svg",
        dir.display()
    );
    drop(bench);
    Ok(())
}

/// The routed scenario's Service (`bench`, in front of pod b) and the two it splits to.
const ROUTED_SERVICE_IP: &str = "10.96.0.60";

/// Services `bench`, `bench-1` and `bench-2` (each selecting pod b, port 8080) and an HTTPRoute
/// on `bench` with 10 rules: 9 that a request for `/` does not match (prefixes, an exact path,
/// a header, a regular expression), ranked before the last, a `/` prefix split 1:1 between
/// `bench-1` and `bench-2`.
fn routed_manifests() -> String {
    let mut yaml = String::new();
    for (name, ip) in [
        ("bench", ROUTED_SERVICE_IP),
        ("bench-1", "10.96.0.61"),
        ("bench-2", "10.96.0.62"),
    ] {
        yaml += &format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: server}}\n  ports: [{{name: http, port: 8080, targetPort: 8080, appProtocol: http}}]\n");
    }
    let mut rules = String::new();
    for i in 1..=6 {
        rules += &format!("  - matches: [{{path: {{type: PathPrefix, value: /api/v{i}}}}}]\n    backendRefs: [{{name: bench-1, port: 8080}}]\n");
    }
    rules += "  - matches: [{path: {type: Exact, value: /healthz}}]\n    backendRefs: [{name: bench-2, port: 8080}]\n";
    rules += "  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: bench-2, port: 8080}]\n";
    rules += "  - matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]\n    backendRefs: [{name: bench-1, port: 8080}]\n";
    rules += "  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: bench-1, port: 8080, weight: 1}, {name: bench-2, port: 8080, weight: 1}]\n";
    yaml + &format!("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: bench, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: bench, port: 8080}}]\n  rules:\n{rules}")
}

/// The policy scenario's Istio AuthorizationPolicy on pod b (`app: server`): 50 ALLOW rules a
/// request from pod a (`loadgen`) for `GET /` goes through in order, matching only the last:
/// 10 by source range (10.200.N.0/24, which the kernel compiles for plaintext), 39 by
/// principal and operation, then a's principal with GET.
fn policy_manifests() -> String {
    let mut rules = String::new();
    for i in 0..10 {
        rules += &format!("  - from: [{{source: {{ipBlocks: [10.200.{i}.0/24]}}}}]\n");
    }
    for i in 10..49 {
        rules += &format!("  - from: [{{source: {{principals: [cluster.local/ns/default/sa/other-{i}]}}}}]\n    to: [{{operation: {{methods: [POST], paths: [/admin/{i}/*]}}}}]\n");
    }
    rules += "  - from: [{source: {principals: [cluster.local/ns/default/sa/loadgen]}}]\n    to: [{operation: {methods: [GET]}}]\n";
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: ALLOW\n  rules:\n{rules}")
}

/// An Ethernet/IPv4/TCP frame from `src` to `dst:port` with TCP `flags`, for BPF_PROG_TEST_RUN.
fn tcp_packet(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p
}

/// A `struct __sk_buff` for BPF_PROG_TEST_RUN with only `ifindex` (offset 40) set.
fn sk_buff_ctx(ifindex: u32) -> Vec<u8> {
    // The kernel accepts a context up to the struct's size; the fields after `ifindex` are
    // left zero.
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The policy-evaluation micro-benchmark (`mesh-agent/examples/authorize.rs`): nanoseconds per
/// decision, by case.
fn policy_evaluation(root: &Path) -> anyhow::Result<Value> {
    let out = output_text(Command::new(root.join("target/release/examples/authorize")))?;
    serde_json::from_str(out.trim()).context("authorize output")
}

/// The route-selection micro-benchmark (`mesh-agent/examples/route_select.rs`): nanoseconds
/// per selection among 1,000 routes, by case.
fn route_selection(root: &Path) -> anyhow::Result<Value> {
    let out = output_text(Command::new(
        root.join("target/release/examples/route_select"),
    ))?;
    serde_json::from_str(out.trim()).context("route_select output")
}

/// What `--profile` runs on one agent during one throughput run.
struct Profiling {
    node: &'static str,
    graph: std::process::Child,
    flat: std::process::Child,
    syscalls: std::process::Child,
    data: PathBuf,
    text: PathBuf,
    flat_data: PathBuf,
    flat_text: PathBuf,
    stat: PathBuf,
}

impl Profiling {
    /// Waits for the recordings and writes them as text; returns the node and its system
    /// calls per request (`requests` sent meanwhile).
    fn finish(mut self, requests: f64) -> anyhow::Result<(&'static str, f64)> {
        self.syscalls.wait()?;
        self.flat.wait()?;
        finish_profile(self.graph, &self.data, &self.text)?;
        // Self time by shared object, then by symbol.
        write_reports(
            &self.flat_data,
            &self.flat_text,
            &[
                "--no-children --sort dso --percent-limit 0.2",
                "--no-children --sort dso,symbol --percent-limit 0.2",
            ],
        )?;
        // `perf stat -x,`: the count is the first field of the event's line.
        let stat = std::fs::read_to_string(&self.stat)?;
        let count = stat
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.trim().parse::<f64>().ok())
            .with_context(|| format!("no system call count in {}", self.stat.display()))?;
        Ok((
            self.node,
            if requests > 0.0 {
                count / requests
            } else {
                0.0
            },
        ))
    }
}

/// The C allocator's entry points `--profile` counts calls of (Rust's global allocator is
/// libc's), as uprobes named `probe_libc:<function>`.
const ALLOCATOR: [&str; 4] = ["malloc", "calloc", "realloc", "posix_memalign"];

/// Calls of the allocator counted on each agent (`perf stat` of the uprobes) for the length of
/// one throughput run. Each call traps into the kernel, so the run is one of its own.
struct AllocCount {
    counts: Vec<(&'static str, std::process::Child, PathBuf)>,
}

impl AllocCount {
    /// Puts uprobes on the allocator of the agents' libc (replacing any a crashed run left)
    /// and starts counting; the stat files go to `dir`.
    fn start(agents: &[Agent], dir: &Path, scenario: Scenario, secs: u32) -> anyhow::Result<Self> {
        let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
        let libc = pids
            .first()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok())
            .and_then(|maps| {
                maps.lines()
                    .filter_map(|l| l.split_whitespace().nth(5))
                    .find(|p| p.ends_with("/libc.so.6"))
                    .map(str::to_owned)
            })
            .context("no libc.so.6 mapped in the agent")?;
        remove_allocator_probes();
        for function in ALLOCATOR {
            let mut add = Command::new("perf");
            add.args(["probe", "-q", "-x", &libc, "--add", function]);
            output_text(add).with_context(|| format!("adding a uprobe on {libc}:{function}"))?;
        }
        let events = ALLOCATOR.map(|f| format!("probe_libc:{f}")).join(",");
        let mut counts = Vec::new();
        for (pid, node) in pids.into_iter().zip(["n1", "n2"]) {
            let out = dir.join(format!("allocations-{}-{node}.txt", scenario.key()));
            let child = Command::new("perf")
                .args([
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    &events,
                    "-p",
                    &pid.to_string(),
                    "-o",
                ])
                .arg(&out)
                .args(["--", "sleep", &secs.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf stat")?;
            counts.push((node, child, out));
        }
        Ok(Self { counts })
    }

    /// Waits for the counts and removes the uprobes; returns each node's allocations per
    /// request (`requests` sent meanwhile).
    fn finish(self, requests: f64) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let mut per_request = Vec::new();
        let mut failed = None;
        for (node, mut child, out) in self.counts {
            let counted = child.wait().map_err(anyhow::Error::from).and_then(|_| {
                let stat = std::fs::read_to_string(&out)?;
                // `perf stat -x,`: the count is the first field of each event's line.
                let counts: Vec<f64> = stat
                    .lines()
                    .filter(|l| l.contains("probe_libc:"))
                    .filter_map(|l| l.split(',').next()?.trim().parse().ok())
                    .collect();
                anyhow::ensure!(
                    counts.len() == ALLOCATOR.len(),
                    "{} counts of {} in {}",
                    counts.len(),
                    ALLOCATOR.len(),
                    out.display()
                );
                Ok(counts.iter().sum::<f64>())
            });
            match counted {
                Ok(n) if requests > 0.0 => per_request.push((node, n / requests)),
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        }
        remove_allocator_probes();
        match failed {
            Some(e) => Err(e),
            None => Ok(per_request),
        }
    }
}

/// Removes the uprobes [`AllocCount`] adds (none there is not an error).
fn remove_allocator_probes() {
    for function in ALLOCATOR {
        let _ = Command::new("perf")
            .args(["probe", "-q", "-d", &format!("probe_libc:{function}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The requests a `wrk` run reports having sent.
fn wrk_requests(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().split_once(" requests in"))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Waits for `perf record` and writes, as text, where the time goes including callees (by
/// symbol), then the flat profile (self time).
fn finish_profile(mut child: std::process::Child, data: &Path, text: &Path) -> anyhow::Result<()> {
    child.wait()?;
    write_reports(
        data,
        text,
        &[
            "--children --sort dso,symbol -g none --percent-limit 0.5",
            "--no-children --sort dso,symbol -g none --percent-limit 0.5",
        ],
    )
}

/// Writes to `text` one `perf report --stdio` of `data` per line of arguments (separated by
/// spaces), one after another.
fn write_reports(data: &Path, text: &Path, reports: &[&str]) -> anyhow::Result<()> {
    let mut out = String::new();
    for args in reports {
        let mut report = Command::new("perf");
        report
            .args(["report", "--stdio"])
            .args(args.split_whitespace())
            .arg("-i")
            .arg(data);
        out.push_str(&output_text(report)?);
    }
    std::fs::write(text, out)?;
    println!("    profile: {}", text.display());
    Ok(())
}

/// The testbed of `--scale` and `--soak`, run with the release binaries: pod client on n1,
/// pod web on n2 behind Service web. Returns it and the `meshtest` binary.
fn client_web_testbed(root: &Path) -> anyhow::Result<(Testbed, PathBuf)> {
    let release = root.join("target/release");
    // SAFETY (edition 2021: safe): set before any thread of ours starts.
    std::env::set_var("MESH_AGENT_BIN", release.join("mesh-agent"));
    let spec = TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0, "client"),
            PodSpec::new("web", 1, "web"),
        ],
        services: vec![mesh_agent_tests::ServiceSpec::web()],
        dual_stack: false,
    };
    let bed = Testbed::up(&spec).context("bringing the testbed up")?;
    Ok((bed, release.join("meshtest")))
}

fn output_text(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// utime + stime of a process, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // SAFETY: plain sysconf call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks * 1_000_000 / hz
}

/// Context switches of all a process's threads so far: (voluntary, involuntary).
fn switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total.0 += status_field(&status, "voluntary_ctxt_switches:");
        total.1 += status_field(&status, "nonvoluntary_ctxt_switches:");
    }
    total
}

/// The number after `key` in a `/proc/.../status` text (a size's unit ignored), 0 if absent.
fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one context switch costs on this machine, in ns: two threads pinned to CPU 0 hand a
/// byte back and forth over pipes, each hand-over one switch (as `perf bench sched pipe`).
pub fn context_switch_ns() -> Option<f64> {
    use std::io::{Read as _, Write as _};
    const ROUNDS: u32 = 50_000;
    fn pin_to_cpu0() {
        // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let (mut there_r, mut there_w) = std::io::pipe().ok()?;
    let (mut back_r, mut back_w) = std::io::pipe().ok()?;
    let peer = std::thread::spawn(move || -> std::io::Result<()> {
        pin_to_cpu0();
        let mut b = [0u8];
        for _ in 0..ROUNDS {
            there_r.read_exact(&mut b)?;
            back_w.write_all(&b)?;
        }
        Ok(())
    });
    let timer = std::thread::spawn(move || -> std::io::Result<Duration> {
        pin_to_cpu0();
        let mut b = [0u8];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            there_w.write_all(&b)?;
            back_r.read_exact(&mut b)?;
        }
        Ok(start.elapsed())
    });
    let took = timer.join().ok()?.ok()?;
    peer.join().ok()?.ok()?;
    Some(took.as_nanos() as f64 / f64::from(2 * ROUNDS))
}

/// A `/proc/<pid>/status` figure in KiB, for each of `keys`.
fn status_kib<const N: usize>(pid: u32, keys: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    keys.map(|k| status_field(&status, k))
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let [rss, hwm] = status_kib(pid, ["VmRSS:", "VmHWM:"]);
    (rss, hwm)
}

/// Sums the per-scenario eBPF figures of all mesh runs.
fn total_ebpf(runs: &[(Scenario, usize, Value)]) -> Value {
    let mut total = serde_json::Map::new();
    for (_, _, run) in runs {
        for (name, v) in run["ebpf"].as_object().into_iter().flatten() {
            let e = total
                .entry(name.clone())
                .or_insert_with(|| json!({"run_time_ns": 0, "run_cnt": 0}));
            for k in ["run_time_ns", "run_cnt"] {
                e[k] = json!(e[k].as_u64().unwrap_or(0) + v[k].as_u64().unwrap_or(0));
            }
        }
    }
    for v in total.values_mut() {
        let (ns, cnt) = (
            v["run_time_ns"].as_u64().unwrap_or(0),
            v["run_cnt"].as_u64().unwrap_or(0),
        );
        v["avg_ns"] = json!(if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 });
    }
    Value::Object(total)
}

fn ebpf_run_times() -> Value {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
    else {
        return Value::Null;
    };
    let Ok(progs) = serde_json::from_slice::<Vec<Value>>(&out.stdout) else {
        return Value::Null;
    };
    let mut result = serde_json::Map::new();
    for prog in progs {
        let name = prog["name"].as_str().unwrap_or_default();
        if !name.starts_with("mesh_") {
            continue;
        }
        let (ns, cnt) = (
            prog["run_time_ns"].as_u64().unwrap_or(0),
            prog["run_cnt"].as_u64().unwrap_or(0),
        );
        let entry = result
            .entry(name.to_owned())
            .or_insert_with(|| json!({"run_time_ns": 0, "run_cnt": 0}));
        entry["run_time_ns"] = json!(entry["run_time_ns"].as_u64().unwrap_or(0) + ns);
        entry["run_cnt"] = json!(entry["run_cnt"].as_u64().unwrap_or(0) + cnt);
    }
    Value::Object(result)
}

impl Bench {
    /// The testbed of the benchmark (load generator and local server on n1, server on n2);
    /// returns it with the agent binary benched.
    fn up(quick: bool, profile: bool, root: &Path) -> anyhow::Result<(Self, PathBuf)> {
        check_tools()?;
        let release = root.join("target/release");
        // `MESH_AGENT_BIN` benches another build of the agent (an A/B of two commits or
        // profiles).
        let agent_bin = std::env::var_os("MESH_AGENT_BIN")
            .map_or_else(|| release.join("mesh-agent"), PathBuf::from);
        // SAFETY (edition 2021: safe): set before any thread of ours starts.
        std::env::set_var("MESH_AGENT_BIN", &agent_bin);
        let spec = TestbedSpec {
            nodes: 2,
            pods: vec![
                PodSpec::new("a", 0, "loadgen"),
                PodSpec::new("c", 0, "local-server"),
                PodSpec::new("b", 1, "server"),
            ],
            services: Vec::new(),
            dual_stack: false,
        };
        let bed = Testbed::up(&spec).context("bringing the testbed up")?;
        let b = bed.pod("b").ip.to_string();
        let c = bed.pod("c").ip.to_string();
        let bench = Bench {
            profile: profile.then(|| root.join("target/bench")),
            bed,
            plan: Plan::new(quick),
            meshtest: release.join("meshtest"),
            b,
            c,
        };
        Ok((bench, agent_bin))
    }

    fn plan_json(&self) -> Value {
        let p = &self.plan;
        json!({
            "rates": p.rates, "connections": p.connections, "latency_secs": p.latency_secs,
            "repetitions": p.reps, "wrk": format!("-t2 -c16 -d{}s", p.wrk_secs),
            "iperf_secs": p.iperf_secs, "churn_connections": p.churn,
            "idle_connections": p.idle_connections,
        })
    }

    /// Declares (or not) the servers' ports opaque with Linkerd's annotation on their pods, so
    /// the mesh relays them as TCP instead of serving HTTP.
    fn declare_opaque(&self, opaque: bool) -> anyhow::Result<()> {
        let pods = self.bed.manifests_dir().join("pods.yaml");
        let plain = self
            .bed
            .manifests()
            .into_iter()
            .find(|(f, _)| *f == "pods.yaml")
            .map(|(_, text)| text)
            .context("no pods.yaml in the testbed's manifests")?;
        let text = match opaque {
            true => plain.replace(
                "  annotations: {}\n",
                "  annotations:\n    config.linkerd.io/opaque-ports: \"8080,5201\"\n",
            ),
            false => plain,
        };
        std::fs::write(&pods, text)?;
        Ok(())
    }

    /// Writes (or removes) the policy scenario's AuthorizationPolicy.
    fn set_policy(&self, on: bool) -> anyhow::Result<()> {
        let path = self.bed.manifests_dir().join("policy.yaml");
        match on {
            true => std::fs::write(path, policy_manifests())?,
            false => {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// The kernel's inbound policy decision, timed by the kernel itself (`bpftool prog run`,
    /// BPF_PROG_TEST_RUN, 1,000,000 repetitions each) on pod b's veth, whose policy is the
    /// scenario's: a SYN whose source the policy's CIDRs allow, one they refuse, an ACK
    /// (every packet of an established connection), and a SYN to pod c (no policy).
    fn kernel_decisions(&self, agents: &[Agent]) -> anyhow::Result<Value> {
        let progs: Vec<Value> = serde_json::from_str(&output_text({
            let mut c = Command::new("bpftool");
            c.args(["prog", "show", "-j"]);
            c
        })?)?;
        let policy_progs: Vec<u64> = progs
            .iter()
            .filter(|p| p["name"] == "mesh_inbound_policy")
            .filter_map(|p| p["id"].as_u64())
            .collect();
        // Each agent loads its own program (and maps): the node's agent's, found by the
        // program descriptors it holds.
        let program_of = |node: usize| -> anyhow::Result<u64> {
            let pid = agents
                .get(node)
                .and_then(Agent::pid)
                .context("the node's agent is not running")?;
            let mut held = Vec::new();
            for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
                let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
                held.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("prog_id:"))
                        .filter_map(|v| v.trim().parse::<u64>().ok()),
                );
            }
            policy_progs
                .iter()
                .copied()
                .find(|id| held.contains(id))
                .context("the node's agent holds no inbound policy program")
        };
        let ifindex = |pod: &str| -> anyhow::Result<u32> {
            let veth = &self.bed.pod(pod).host_veth;
            // `ip` reads the node's namespace over netlink (its /sys is the host's).
            let node = &self.bed.nodes[self.bed.pod(pod).spec.node].name;
            let mut c = self.bed.node_command(node, "ip")?;
            c.args(["-o", "link", "show", "dev", veth]);
            let text = output_text(c)?;
            Ok(text.split(':').next().unwrap_or_default().trim().parse()?)
        };
        let dir = self.bed.dir.join("kernel-policy");
        std::fs::create_dir_all(&dir)?;
        let mut out = serde_json::Map::new();
        for (name, pod, src, flags) in [
            ("syn_allowed_by_source", "b", "10.200.7.9", 0x02u8),
            ("syn_refused", "b", "10.99.0.9", 0x02),
            ("ack", "b", "10.99.0.9", 0x10),
            ("syn_no_policy", "c", "10.99.0.9", 0x02),
        ] {
            let dst: std::net::Ipv4Addr = self.bed.pod(pod).ip;
            let src: std::net::Ipv4Addr = src.parse()?;
            let data = dir.join(format!("{name}.pkt"));
            std::fs::write(&data, tcp_packet(src, dst, 8080, flags))?;
            let ctx = dir.join(format!("{name}.ctx"));
            std::fs::write(&ctx, sk_buff_ctx(ifindex(pod)?))?;
            let node_index = self.bed.pod(pod).spec.node;
            let node = &self.bed.nodes[node_index].name;
            let id = program_of(node_index)?;
            let mut run = self.bed.node_command(node, "bpftool")?;
            run.args(["prog", "run", "id", &id.to_string(), "data_in"])
                .arg(&data)
                .arg("ctx_in")
                .arg(&ctx)
                .args(["repeat", "1000000"]);
            let text = output_text(run)?;
            let ret = text
                .split("Return value: ")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse::<i64>().ok());
            let ns = text
                .split("duration (average): ")
                .nth(1)
                .and_then(|t| t.split("ns").next())
                .and_then(|v| v.trim().parse::<f64>().ok());
            // TC_ACT_OK is 0, TC_ACT_SHOT 2.
            out.insert(name.to_owned(), json!({"ns": ns, "verdict": match ret { Some(0) => "pass", Some(2) => "drop", _ => "?" }}));
        }
        Ok(Value::Object(out))
    }

    fn pod_cmd(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut cmd = self.bed.pod_command(pod, program)?;
        let node = self.bed.pod(pod).spec.node;
        netns::pin(&mut cmd, NODE_CPU[node]);
        Ok(cmd)
    }

    fn nginx_conf(&self, pod: &str, server: &str) -> anyhow::Result<PathBuf> {
        let prefix = self.bed.dir.join(format!("nginx-{pod}"));
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let p = prefix.display();
        let conf = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nworker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp; uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n{server}}}\n"
        );
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf)?;
        Ok(path)
    }

    fn spawn_nginx(&self, pod: &str, server: &str) -> anyhow::Result<()> {
        let conf = self.nginx_conf(pod, server)?;
        let mut cmd = self.pod_cmd(pod, "nginx")?;
        cmd.arg("-c").arg(&conf).stderr(Stdio::null());
        self.bed.spawn(cmd)?;
        Ok(())
    }

    fn start_servers(&mut self, agent_bin: &Path) -> anyhow::Result<()> {
        let body = "x".repeat(BODY_BYTES);
        let app = format!(
            "  server {{ listen 8080 reuseport; location / {{ default_type text/plain; return 200 \"{body}\"; }} }}\n"
        );
        // Sidecar certificates, from the same kind of CA the mesh uses.
        let ca = Agent::ensure_ca(&self.bed, agent_bin)?;
        for (pod, sa) in [("a", "loadgen"), ("b", "server")] {
            let mut issue = Command::new(agent_bin);
            issue
                .args(["identity", "issue", "--ca"])
                .arg(&ca)
                .args([
                    "--identity",
                    &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
                ])
                .arg("--cert")
                .arg(self.bed.dir.join(format!("sidecar-{pod}.crt")))
                .arg("--key")
                .arg(self.bed.dir.join(format!("sidecar-{pod}.key")));
            output_text(issue)?;
        }
        let d = self.bed.dir.display();
        let b_sidecar = format!(
            "  upstream app {{ server 127.0.0.1:8080; keepalive 64; }}\n  server {{\n    listen 8443 ssl;\n    ssl_protocols TLSv1.3;\n    ssl_certificate {d}/sidecar-b.crt; ssl_certificate_key {d}/sidecar-b.key;\n    ssl_client_certificate {d}/ca/ca.crt; ssl_verify_client on; ssl_verify_depth 3;\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n"
        );
        let a_sidecar = format!(
            "  upstream remote {{ server {b}:8443; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:15001;\n    location / {{\n      proxy_pass https://remote; proxy_http_version 1.1; proxy_set_header Connection \"\";\n      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;\n      proxy_ssl_certificate {d}/sidecar-a.crt; proxy_ssl_certificate_key {d}/sidecar-a.key;\n      proxy_ssl_trusted_certificate {d}/ca/ca.crt; proxy_ssl_verify on; proxy_ssl_verify_depth 3;\n      proxy_ssl_name server.default.serviceaccount.identity.linkerd.cluster.local;\n    }}\n  }}\n",
            b = self.b
        );
        std::fs::write(
            self.bed.manifests_dir().join("routed.yaml"),
            routed_manifests(),
        )?;
        self.spawn_nginx("b", &format!("{app}{b_sidecar}"))?;
        self.spawn_nginx("c", &app)?;
        self.spawn_nginx("a", &a_sidecar)?;
        for pod in ["b", "c"] {
            let mut iperf = self.pod_cmd(pod, "iperf3")?;
            iperf.args(["-s", "-p", "5201"]).stdout(Stdio::null());
            self.bed.spawn(iperf)?;
        }
        // Wait until every server answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        for target in [
            format!("{}:8080", self.b),
            format!("{}:8080", self.c),
            "127.0.0.1:15001".to_owned(),
        ] {
            loop {
                let mut get = self.pod_cmd("a", &self.meshtest)?;
                get.args(["get", &target]);
                if output_text(get).is_ok_and(|o| o.starts_with("status=200")) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "server {target} did not come up (see {}/nginx-*/error.log)",
                        self.bed.dir.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The sidecar pair really carries mTLS: plaintext to the server sidecar is refused.
    fn verify_sidecar_mtls(&self) -> anyhow::Result<bool> {
        let mut plain = self.pod_cmd("a", &self.meshtest)?;
        plain.args(["get", &format!("{}:8443", self.b)]);
        let out = output_text(plain)?;
        let refused = out.starts_with("status=400");
        println!(
            "sidecar baseline: plaintext to {}:8443 answered {:?} (refused: {refused})",
            self.b,
            out.lines().next().unwrap_or("")
        );
        Ok(refused)
    }

    fn scenario(
        &self,
        scenario: Scenario,
        first_rep: bool,
        idle: &mut Value,
    ) -> anyhow::Result<Value> {
        let mut agents = Vec::new();
        self.declare_opaque(scenario == Scenario::MeshCrossL4)?;
        self.set_policy(scenario == Scenario::MeshCrossPolicy)?;
        if scenario.mesh() {
            for (i, node) in ["n1", "n2"].into_iter().enumerate() {
                // `MESH_AGENT_ARGS` (space-separated) adds agent flags: an A/B of one flag.
                let extra = std::env::var("MESH_AGENT_ARGS").unwrap_or_default();
                let mut args = vec!["--log-level", "warn"];
                args.extend(extra.split_whitespace());
                let mut agent = Agent::start_on(&self.bed, node, &args, Some(NODE_CPU[i]))?;
                agent.wait_ready(Duration::from_secs(30))?;
                agents.push(agent);
            }
        }
        let (http, iperf) = match scenario {
            Scenario::DirectCross
            | Scenario::MeshCross
            | Scenario::MeshCrossL4
            | Scenario::MeshCrossPolicy => (format!("{}:8080", self.b), Some(self.b.clone())),
            Scenario::DirectSame | Scenario::MeshSame => {
                (format!("{}:8080", self.c), Some(self.c.clone()))
            }
            // Through the Service and its route to pod b; no bulk stream (the same TCP path).
            Scenario::MeshCrossRouted => (format!("{ROUTED_SERVICE_IP}:8080"), None),
            Scenario::SidecarCross => ("127.0.0.1:15001".to_owned(), None),
        };
        let startup_peak: Vec<u64> = agents
            .iter()
            .filter_map(Agent::pid)
            .map(|p| rss_kib(p).1)
            .collect();
        // What the idle RSS is made of: anonymous memory, and pages of the binary (and other
        // files) mapped in.
        let idle_rss: Vec<[u64; 3]> = agents
            .iter()
            .filter_map(Agent::pid)
            .map(|p| status_kib(p, ["VmRSS:", "RssAnon:", "RssFile:"]))
            .collect();
        // From here VmHWM is the peak under load, not the start-up transient (aya parses the
        // kernel's BTF while loading): writing 5 to clear_refs resets it.
        for pid in agents.iter().filter_map(Agent::pid) {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        let mut result = json!({"scenario": scenario.key()});
        let mut expected_redirects = 0u64;

        let mut latency = serde_json::Map::new();
        for rate in &self.plan.rates {
            for (secs, record) in [
                (self.plan.warmup_secs, false),
                (self.plan.latency_secs, true),
            ] {
                let mut load = self.pod_cmd("a", &self.meshtest)?;
                load.args([
                    "load",
                    &http,
                    &rate.to_string(),
                    &self.plan.connections.to_string(),
                    &secs.to_string(),
                ]);
                let line = output_text(load)?;
                expected_redirects += u64::from(self.plan.connections);
                if record {
                    latency.insert(
                        rate.to_string(),
                        json!({
                            "p50_us": field(&line, "p50_us"), "p90_us": field(&line, "p90_us"),
                            "p99_us": field(&line, "p99_us"), "max_us": field(&line, "max_us"),
                            "errors": field(&line, "errors"), "achieved_rate": field(&line, "rate"),
                        }),
                    );
                }
            }
        }
        result["latency"] = Value::Object(latency);

        // Throughput, with the agents' CPU per request.
        let wrk = || -> anyhow::Result<String> {
            let mut wrk = self.pod_cmd("a", "wrk")?;
            wrk.args([
                "-t2",
                "-c16",
                &format!("-d{}s", self.plan.wrk_secs),
                &format!("http://{http}/"),
            ]);
            output_text(wrk)
        };
        let cpu_before: Vec<u64> = agents.iter().filter_map(Agent::pid).map(cpu_us).collect();
        let switches_before: Vec<(u64, u64)> =
            agents.iter().filter_map(Agent::pid).map(switches).collect();
        let out = wrk()?;
        expected_redirects += 16;
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let requests = wrk_requests(&out);
        result["rps"] = json!(rps);
        let cpu_after: Vec<u64> = agents.iter().filter_map(Agent::pid).map(cpu_us).collect();
        if !agents.is_empty() && requests > 0.0 {
            let per_req: Vec<f64> = cpu_before
                .iter()
                .zip(&cpu_after)
                .map(|(b, a)| (a - b) as f64 / requests)
                .collect();
            result["agent_cpu_us_per_request"] =
                json!({"n1": per_req.first(), "n2": per_req.get(1)});
            // What the CPU figure is made of: each switch costs what `machine.context_switch_ns`
            // says.
            let switched: Vec<Value> = switches_before
                .iter()
                .zip(agents.iter().filter_map(Agent::pid).map(switches))
                .map(|(b, a)| {
                    // A thread that ended during the run takes its count with it.
                    let vol = a.0.saturating_sub(b.0) as f64;
                    let invol = a.1.saturating_sub(b.1) as f64;
                    json!({
                        "total": (vol + invol) / requests,
                        "voluntary": vol / requests,
                        "involuntary": invol / requests,
                    })
                })
                .collect();
            result["agent_switches_per_request"] =
                json!({"n1": switched.first(), "n2": switched.get(1)});
        }
        // The profile comes from a second, unrecorded run: perf's DWARF stack copies cost the
        // sampled agent enough to halve the throughput of the run it watches.
        if let (Some(dir), Scenario::MeshCross | Scenario::MeshCrossL4, true) =
            (&self.profile, scenario, first_rep)
        {
            let profiling = self.start_profiles(dir, scenario, &agents)?;
            let out = wrk()?;
            expected_redirects += 16;
            let requests = wrk_requests(&out);
            let mut syscalls = serde_json::Map::new();
            for p in profiling {
                let (node, per_request) = p.finish(requests)?;
                println!("    {node}: {per_request:.2} system calls per request (profiled run)");
                syscalls.insert(node.to_owned(), json!(per_request));
            }
            result["profiled_syscalls_per_request"] = Value::Object(syscalls);
            // Allocations per request, in a run of their own: every counted call traps.
            match AllocCount::start(&agents, dir, scenario, self.plan.wrk_secs) {
                Ok(counting) => {
                    let out = wrk()?;
                    expected_redirects += 16;
                    let mut counted = serde_json::Map::new();
                    for (node, n) in counting.finish(wrk_requests(&out))? {
                        println!("    {node}: {n:.1} allocations per request (counted run)");
                        counted.insert(node.to_owned(), json!(n));
                    }
                    result["profiled_allocations_per_request"] = Value::Object(counted);
                }
                Err(e) => println!("    allocations not counted: {e:#}"),
            }
        }

        if let Some(ip) = iperf {
            let mut cmd = self.pod_cmd("a", "iperf3")?;
            cmd.args([
                "-c",
                &ip,
                "-p",
                "5201",
                "-t",
                &self.plan.iperf_secs.to_string(),
                "-J",
            ]);
            let out = output_text(cmd)?;
            expected_redirects += 2;
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            result["bulk_gbps"] = json!(
                v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .unwrap_or(0.0)
                    / 1e9
            );
        }

        let started = Instant::now();
        let mut churn = self.pod_cmd("a", &self.meshtest)?;
        churn.args(["churn", &http, &self.plan.churn.to_string()]);
        output_text(churn)?;
        expected_redirects += u64::from(self.plan.churn);
        result["connections_per_sec"] =
            json!(f64::from(self.plan.churn) / started.elapsed().as_secs_f64());

        if !agents.is_empty() {
            let rss: Vec<Value> = agents
                .iter()
                .filter_map(Agent::pid)
                .zip(idle_rss.iter().zip(&startup_peak))
                .map(|(p, ([idle, anon, file], startup))| {
                    let (rss, hwm) = rss_kib(p);
                    json!({
                        "idle_kib": idle, "idle_anon_kib": anon, "idle_file_kib": file,
                        "startup_peak_kib": startup, "rss_kib": rss, "peak_kib": hwm,
                    })
                })
                .collect();
            result["agent_memory"] = json!({"n1": rss.first(), "n2": rss.get(1)});
            // The mesh really carried it: n1 redirected every client connection we made.
            let redirected = agents[0]
                .metric("mesh_ebpf_redirected_connections_total", &[])
                .unwrap_or(0.0) as u64;
            result["redirected_connections"] = json!(redirected);
            result["expected_connections"] = json!(expected_redirects);
            if redirected < expected_redirects {
                bail!("{}: the mesh redirected {redirected} connections, expected at least {expected_redirects}", scenario.name());
            }
            if first_rep && scenario == Scenario::MeshCross {
                *idle = self.idle_connections(&agents)?;
            }
            // Cumulative kernel run time of our programs while these agents were attached.
            result["ebpf"] = ebpf_run_times();
            if first_rep && scenario == Scenario::MeshCrossPolicy {
                result["kernel_policy"] = self.kernel_decisions(&agents)?;
            }
        }
        for mut agent in agents {
            agent.stop()?;
        }
        Ok(result)
    }

    /// Starts, on each agent, for the length of one throughput run: a profile with call
    /// stacks, a flat one at a higher rate (DWARF stack copies limit the first to a few hundred
    /// samples), and a count of its system calls.
    fn start_profiles(
        &self,
        dir: &Path,
        scenario: Scenario,
        agents: &[Agent],
    ) -> anyhow::Result<Vec<Profiling>> {
        std::fs::create_dir_all(dir)?;
        let secs = self.plan.wrk_secs.to_string();
        let perf = |args: &[&str], pid: u32, out: &Path| {
            Command::new("perf")
                .args(args)
                .args(["-p", &pid.to_string(), "-o"])
                .arg(out)
                .args(["--", "sleep", &secs])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf")
        };
        let mut out = Vec::new();
        for (agent, node) in agents.iter().zip(["n1", "n2"]) {
            let Some(pid) = agent.pid() else { continue };
            let name =
                |what: &str, ext: &str| dir.join(format!("{what}-{}-{node}.{ext}", scenario.key()));
            let (data, flat_data, stat) = (
                name("perf", "data"),
                name("perf-flat", "data"),
                name("syscalls", "txt"),
            );
            out.push(Profiling {
                node,
                // DWARF unwinding: release binaries keep .eh_frame but no frame pointers.
                graph: perf(
                    &["record", "-F", "499", "--call-graph", "dwarf,16384"],
                    pid,
                    &data,
                )?,
                flat: perf(&["record", "-F", "2999"], pid, &flat_data)?,
                syscalls: perf(
                    &["stat", "-x", ",", "-e", "raw_syscalls:sys_enter"],
                    pid,
                    &stat,
                )?,
                text: name("profile", "txt"),
                flat_text: name("profile-flat", "txt"),
                data,
                flat_data,
                stat,
            });
        }
        Ok(out)
    }

    /// Agent memory with many idle proxied connections open.
    fn idle_connections(&self, agents: &[Agent]) -> anyhow::Result<Value> {
        let n = self.plan.idle_connections;
        let mut hold = self.pod_cmd("a", &self.meshtest)?;
        hold.args(["hold", &format!("{}:8080", self.b), &n.to_string(), "30"])
            .stdout(Stdio::piped());
        let mut child = hold.spawn()?;
        let stdout = child.stdout.take().context("hold stdout")?;
        let line = BufReader::new(stdout)
            .lines()
            .next()
            .transpose()?
            .unwrap_or_default();
        if line != format!("holding={n}") {
            let _ = child.kill();
            bail!("holding {n} connections failed: {line:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
        let rss: Vec<u64> = agents
            .iter()
            .filter_map(Agent::pid)
            .map(|p| rss_kib(p).0)
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        Ok(json!({"connections": n, "n1_rss_kib": rss.first(), "n2_rss_kib": rss.get(1)}))
    }
}
