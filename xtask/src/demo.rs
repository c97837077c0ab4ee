//! `cargo xtask run`: the simulated two-node cluster with demo workloads and agents.

use std::{
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_agent_tests::{
    agent::workspace_binary, http::metric_value, Agent, PodSpec, ServiceSpec, Testbed, TestbedSpec,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// web-1 (n1) and web-2 (n2) behind Service web; a client on each node.
fn demo_spec() -> TestbedSpec {
    TestbedSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("web-1", 0, "web"),
            PodSpec::new("client-1", 0, "client"),
            PodSpec::new("web-2", 1, "web"),
            PodSpec::new("client-2", 1, "client"),
        ],
        services: vec![ServiceSpec::web()],
        dual_stack: false,
    }
}

fn describe(bed: &Testbed) {
    println!("testbed:");
    for node in &bed.nodes {
        println!("  node {} ({}) netns {}", node.name, node.ip, node.netns);
        for pod in bed
            .pods
            .iter()
            .filter(|p| bed.nodes[p.spec.node].name == node.name)
        {
            println!(
                "    pod {:<9} {:<10} netns {:<14} veth {}",
                pod.spec.name, pod.ip, pod.netns, pod.host_veth
            );
        }
    }
    for svc in &bed.services {
        println!(
            "  service {} {}:{} -> :{}",
            svc.name, svc.cluster_ip, svc.port, svc.target_port
        );
    }
    println!("  manifests: {}", bed.manifests_dir().display());
}

pub fn testbed_up() -> anyhow::Result<()> {
    let bed = Testbed::up(&demo_spec()).context("bringing the testbed up")?;
    describe(&bed);
    println!("left running; remove with `cargo xtask testbed down`");
    std::mem::forget(bed);
    Ok(())
}

pub fn run(duration: Option<u64>) -> anyhow::Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let meshtest = workspace_binary("meshtest")?;
    let bed = Testbed::up(&demo_spec()).context("bringing the testbed up")?;
    describe(&bed);

    for web in ["web-1", "web-2"] {
        let mut cmd = bed.pod_command(web, &meshtest)?;
        cmd.args(["serve", "8080", web]);
        bed.spawn(cmd)?;
    }
    let mut agents = Vec::new();
    for node in ["n1", "n2"] {
        let mut agent = Agent::start(&bed, node, &[])?;
        agent.wait_ready(Duration::from_secs(30))?;
        println!("agent {node}: ready (log {})", agent.log.display());
        agents.push(agent);
    }
    for client in ["client-1", "client-2"] {
        let mut cmd = bed.pod_command(client, &meshtest)?;
        cmd.args(["loop", "10.96.0.10:80", "200"])
            .stdout(Stdio::null());
        bed.spawn(cmd)?;
    }
    println!();
    println!("clients on both nodes call http://10.96.0.10:80 (Service web) every 200 ms;");
    println!("calls to the other node travel as mTLS (HBONE) between the agents, each pod with");
    println!("its own SPIFFE identity; same-node calls stay on the node (node_local).");
    println!("scrape an agent yourself:  ip netns exec mt-n1 curl -s 10.0.0.1:15020/metrics");
    println!("try a pod yourself:        ip netns exec mt-n1-client-1 curl -s 10.96.0.10");
    println!("certificates an agent holds: ip netns exec mt-n1 curl -s 127.0.0.1:15000/certs");
    println!("Ctrl-C stops everything and removes the testbed.");

    let started = Instant::now();
    let mut next_report = Instant::now() + Duration::from_secs(3);
    while !STOP.load(Ordering::SeqCst) {
        if duration.is_some_and(|d| started.elapsed() >= Duration::from_secs(d)) {
            break;
        }
        if Instant::now() >= next_report {
            report(&agents);
            next_report = Instant::now() + Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\nstopping agents and removing the testbed");
    for agent in &mut agents {
        let _ = agent.stop();
    }
    drop(bed);
    Ok(())
}

/// The value of label `key` in one exposition line.
fn label<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(&format!("{key}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("?")
}

/// Where requests went, from each agent's metrics (what the client side reported).
fn report(agents: &[Agent]) {
    println!(
        "\n{:<5} {:<8} {:<9} {:<9} {:<11} {:>5} {:>8}",
        "node", "source", "dest", "service", "security", "code", "requests"
    );
    for agent in agents {
        let Ok(text) = agent.metrics() else {
            println!("{:<5} (metrics unavailable)", agent.node);
            continue;
        };
        for line in text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\""))
        {
            let value = line.rsplit(' ').next().unwrap_or("?");
            println!(
                "{:<5} {:<8} {:<9} {:<9} {:<11} {:>5} {:>8}",
                agent.node,
                label(line, "source_workload"),
                label(line, "destination_workload"),
                label(line, "destination_service_name"),
                label(line, "connection_security_policy"),
                label(line, "response_code"),
                value,
            );
        }
        let redirected =
            metric_value(&text, "mesh_ebpf_redirected_connections_total", &[]).unwrap_or(0.0);
        let inbound = metric_value(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .unwrap_or(0.0);
        println!(
            "{:<5} eBPF redirected {redirected} connections; {inbound} requests arrived over mTLS (HBONE)",
            agent.node
        );
    }
}
