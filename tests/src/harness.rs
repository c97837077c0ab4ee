//! What the privileged integration tests share: the standard scenario, fetching from pods,
//! scraping agents, waiting for conditions. Failures panic with a message: these run inside
//! tests only.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test harness: a failure is a test failure, reported by panicking"
)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{agent::workspace_binary, Agent, PodSpec, ServiceSpec, Testbed, TestbedSpec};

pub const WEB_SVC: &str = "10.96.0.10:80";
pub const WEB_POD: &str = "10.1.2.2:8080";
pub const READY: Duration = Duration::from_secs(20);

/// n1: client (enrolled), outsider (opted out), then `extra` pods; n2: web behind Service
/// web (10.96.0.10:80), serving HTTP on 8080 and echo on 9090.
pub fn bed_with(extra: Vec<PodSpec>) -> Testbed {
    bed_of(extra, false)
}

/// The standard scenario on a dual-stack testbed (see `TestbedSpec::dual_stack`).
pub fn dual_stack_bed() -> Testbed {
    bed_of(Vec::new(), true)
}

fn bed_of(extra: Vec<PodSpec>, dual_stack: bool) -> Testbed {
    let mut pods = vec![
        PodSpec::new("client", 0, "client"),
        PodSpec::new("outsider", 0, "outsider").annotate("mesh-agent.io/inject", "disabled"),
        PodSpec::new("web", 1, "web"),
    ];
    pods.extend(extra);
    let spec = TestbedSpec {
        nodes: 2,
        pods,
        services: vec![ServiceSpec::web()],
        dual_stack,
    };
    let bed = Testbed::up(&spec).expect("testbed up");
    assert_eq!(bed.pod("web").ip.to_string() + ":8080", WEB_POD);
    let mut web = bed.pod_command("web", meshtest()).expect("web command");
    web.args(["serve", "8080", "web"]);
    bed.spawn(web).expect("start web server");
    let mut echo = bed.pod_command("web", meshtest()).expect("echo command");
    echo.args(["echo", "9090"]);
    bed.spawn(echo).expect("start echo server");
    bed
}

/// The standard scenario.
pub fn bed() -> Testbed {
    bed_with(Vec::new())
}

pub fn meshtest() -> std::path::PathBuf {
    workspace_binary("meshtest").expect("meshtest binary")
}

/// One agent per node, ready.
pub fn agents(bed: &Testbed) -> (Agent, Agent) {
    agents_with(bed, &[])
}

/// One agent per node with extra arguments, ready.
pub fn agents_with(bed: &Testbed, args: &[&str]) -> (Agent, Agent) {
    let mut n1 = Agent::start(bed, "n1", args).expect("start agent n1");
    let mut n2 = Agent::start(bed, "n2", args).expect("start agent n2");
    n1.wait_ready(READY).expect("n1 ready");
    n2.wait_ready(READY).expect("n2 ready");
    (n1, n2)
}

pub fn output(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run command")
}

/// What `meshtest get` printed, parsed.
pub struct Fetch {
    pub status: u16,
    /// getpeername() on the client socket.
    pub peer: String,
    pub body: String,
}

impl Fetch {
    /// The address the server saw the connection come from (without the port).
    pub fn server_saw(&self) -> &str {
        let line = self
            .body
            .lines()
            .find_map(|l| l.strip_prefix("client="))
            .unwrap_or_else(|| panic!("no client= line in {:?}", self.body));
        line.rsplit_once(':').map_or(line, |(ip, _)| ip)
    }
}

pub fn fetch(cmd: Command, addr: &str) -> Fetch {
    fetch_path(cmd, addr, "/")
}

/// `meshtest get ADDR PATH` run by `cmd`.
pub fn fetch_path(mut cmd: Command, addr: &str, path: &str) -> Fetch {
    cmd.args(["get", addr, path]);
    let stdout = must_succeed(cmd, &format!("GET {addr}"));
    let (head, body) = stdout.split_once("\n\n").expect("meshtest output");
    let field = |k: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {head:?}"))
            .to_owned()
    };
    Fetch {
        status: field("status=").parse().expect("status"),
        peer: field("peer="),
        body: body.to_owned(),
    }
}

pub fn fetch_from_pod(bed: &Testbed, pod: &str, addr: &str) -> Fetch {
    fetch(bed.pod_command(pod, meshtest()).expect("pod command"), addr)
}

/// Polls until `f` returns true, or panics with `what`.
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_for(what, Duration::from_secs(10), f)
}

/// Polls until `f` returns true, or panics with `what` after `limit`.
pub fn eventually_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The SPIFFE ID of service account `sa` in namespace `default`.
pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// Connections (opaque TCP) and requests (HTTP) `agent` delivered to its pods that arrived
/// over mTLS as `sa`'s identity (what the destination reporter records): how a test tells
/// captured traffic from direct traffic, now that the server sees the client pod's address
/// either way.
pub fn arrived_as(agent: &Agent, sa: &str) -> f64 {
    let by = [
        ("reporter", "destination"),
        ("source_principal", &spiffe(sa)),
        ("connection_security_policy", "mutual_tls"),
    ];
    metric(agent, "mesh_tcp_connections_opened_total", &by)
        + metric(agent, "istio_requests_total", &by)
}

pub fn source_side() -> [(&'static str, &'static str); 1] {
    [("reporter", "source")]
}

pub fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric(name, labels).expect("scrape metrics")
}

/// The serial of the certificate `agent` currently holds for `identity` (from `/certs`).
pub fn cert_serial(agent: &Agent, identity: &str) -> String {
    let certs = agent.admin("/certs").expect("admin /certs").body;
    let at = certs
        .find(&format!("\"{identity}\""))
        .unwrap_or_else(|| panic!("{identity} not in {certs}"));
    let rest = certs[at..]
        .split("\"serial\": \"")
        .nth(1)
        .expect("a serial after the identity");
    rest[..rest.find('"').expect("closing quote")].to_owned()
}

/// Sends `forged` datagrams from pod `from` with a source address that is not its own
/// (`forged_ip`, added to its interface as its root user could), then `honest` ones from its
/// real address of the same family, all to the `web` pod on port 9000. Returns how many
/// arrived.
pub fn udp_from_forged_source(
    bed: &Testbed,
    from: &str,
    forged_ip: &str,
    forged: usize,
    honest: usize,
) -> usize {
    let forged_addr: std::net::IpAddr = forged_ip.parse().expect("forged address");
    let (prefix, to, real) = match forged_addr {
        std::net::IpAddr::V4(_) => (
            format!("{forged_ip}/32"),
            format!("{}:9000", bed.pod("web").ip),
            bed.pod(from).ip.to_string(),
        ),
        std::net::IpAddr::V6(_) => (
            format!("{forged_ip}/128"),
            format!("[{}]:9000", bed.pod("web").ip6.expect("web has IPv6")),
            bed.pod(from).ip6.expect("pod has IPv6").to_string(),
        ),
    };
    let mut listen = bed.pod_command("web", meshtest()).expect("web command");
    listen
        .args(["udp-listen", "9000", "3000"])
        .stdout(Stdio::piped());
    let mut listener = listen.spawn().expect("udp listener");
    let mut lines = BufReader::new(listener.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "listening");

    let ns = bed.pod(from).netns.clone();
    let add = output({
        let mut c = Command::new("ip");
        c.args(["-n", &ns, "addr", "add", &prefix, "dev", "eth0"]);
        if forged_addr.is_ipv6() {
            // Usable at once, without duplicate address detection.
            c.arg("nodad");
        }
        c
    });
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    for (source, count) in [(forged_ip, forged), (real.as_str(), honest)] {
        let mut send = bed.pod_command(from, meshtest()).expect("pod command");
        send.args(["udp-send", source, &to, &count.to_string()]);
        assert!(output(send).status.success());
    }
    let received = lines.next().expect("line").expect("read");
    let _ = listener.wait();
    received
        .strip_prefix("received=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected listener output {received:?}"))
}

/// Runs `cmd` (a `meshtest` command) and expects it to fail: what a connection that must not
/// get through looks like. Returns its stdout, for checks on what leaked.
pub fn must_fail(mut cmd: Command, what: &str) -> String {
    cmd.stdin(Stdio::null());
    let out = cmd.output().expect("run command");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{what} succeeded: {stdout}");
    stdout
}

/// Runs `cmd` and returns its stdout; panics with its stderr and stdout if it fails.
pub fn must_succeed(cmd: Command, what: &str) -> String {
    let out = output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `VmHWM` (peak resident set) of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Runs `meshtest ARGS` in pod `pod` and returns its `key=value` lines; panics with its
/// output if it fails.
pub fn meshtest_in(
    bed: &Testbed,
    pod: &str,
    args: &[&str],
) -> std::collections::BTreeMap<String, String> {
    let mut cmd = bed.pod_command(pod, meshtest()).expect("pod command");
    cmd.args(args);
    key_values(&must_succeed(cmd, &format!("meshtest {args:?} in {pod}")))
}

/// The `key=value` lines of a tool's output.
pub fn key_values(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The text of `tests/examples/FILE` (configurations users bring).
pub fn example(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Service `name` in `namespace` at `ip`:80, to port 8080 of the pods labelled `app`.
pub fn service(name: &str, namespace: &str, ip: &str, app: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        namespace: namespace.into(),
        cluster_ip: ip.parse().expect("a cluster IP"),
        port: 80,
        target_port: 8080,
        app: app.into(),
    }
}
