//! The agent's lifecycle: graceful drain on SIGTERM, pinned programs across a kill. Real
//! agents, real pods, real signals. Run as root, serially (`cargo xtask test`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_agent_tests::{harness::*, serial, Agent, PodSpec};

/// HTTP requests the destination agent received (Linkerd's `request_total`, inbound).
fn inbound_requests(agent: &mesh_agent_tests::Agent) -> f64 {
    metric(agent, "request_total", &[("direction", "inbound")])
}

#[test]
fn sigterm_lets_requests_in_flight_finish_while_new_connections_go_directly() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("slow", 1, "slow")]);
    let mut server = bed.pod_command("slow", meshtest()).unwrap();
    server.args(["http", "8080", "slow"]);
    bed.spawn(server).unwrap();
    let (mut n1, n2) = agents(&bed);
    let slow = format!("{}:8080", bed.pod("slow").ip);
    let warm = fetch_from_pod(&bed, "client", &slow);
    assert_eq!(warm.status, 200);
    assert_eq!(
        inbound_requests(&n2),
        1.0,
        "the first request went through the mesh"
    );

    // 20 requests the server answers after 2 s, each on a connection of its own.
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let mut get = bed.pod_command("client", meshtest()).unwrap();
            get.args(["get", &slow, "/slow/2000"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            get.spawn().unwrap()
        })
        .collect();
    eventually("20 requests in flight through both agents", || {
        inbound_requests(&n2) == 21.0
    });
    let terminated = Instant::now();
    n1.terminate();
    // Not ready at once (the kubelet stops sending it work)...
    eventually_for("n1 to report not ready", Duration::from_secs(1), || {
        n1.get(15021, "/ready").is_ok_and(|r| r.status == 503)
    });
    // ...and a connection made now goes where the pod dialled, directly: it is answered, and
    // no agent carried it.
    let during = fetch_from_pod(&bed, "client", &slow);
    assert_eq!(during.status, 200);
    assert!(
        during.body.starts_with("hello from slow"),
        "{}",
        during.body
    );
    assert_eq!(
        inbound_requests(&n2),
        21.0,
        "the new request bypassed the mesh"
    );

    for request in requests {
        let out = request.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "a request in flight failed: {text}");
        assert!(text.starts_with("status=200\n"), "{text}");
        assert!(text.contains("hello from slow"), "{text}");
    }
    // The agent exits once they are answered, long before its 20 s drain timeout.
    let status = n1
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("n1 to exit once drained");
    assert!(status.success(), "{status}");
    let took = terminated.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(10),
        "n1 exited {took:?} after SIGTERM: it should wait for the slow answers, then stop"
    );
    assert!(n1.log_text().contains("drained"), "{}", n1.log_text());
}

#[test]
fn the_drain_timeout_bounds_how_long_a_connection_keeps_the_agent() {
    let _serial = serial();
    let bed = bed();
    let (mut n1, n2) = agents_with(&bed, &["--drain-timeout", "1s"]);
    let before = arrived_as(&n2, "client");
    // A long opaque connection to the echo port, through the mesh.
    let mut hold = bed.pod_command("client", meshtest()).unwrap();
    let echo = format!("{}:9090", bed.pod("web").ip);
    hold.args(["hold", &echo, "1", "60"]).stdout(Stdio::null());
    bed.spawn(hold).unwrap();
    eventually("the tunnel to arrive", || {
        arrived_as(&n2, "client") == before + 1.0
    });
    let terminated = Instant::now();
    n1.terminate();
    let status = n1
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("n1 to exit at its drain timeout");
    let took = terminated.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "n1 exited {took:?} after SIGTERM with --drain-timeout 1s"
    );
    assert!(n1.log_text().contains("drain timeout"), "{}", n1.log_text());
}

/// `meshtest syn ADDR MS` from `pod`: `connected`, `refused`, `timeout` or `denied` (EPERM).
fn syn_from(bed: &mesh_agent_tests::Testbed, pod: &str, addr: &str, ms: u64) -> String {
    let mut cmd = bed.pod_command(pod, meshtest()).unwrap();
    cmd.args(["syn", addr, &ms.to_string()]);
    must_succeed(cmd, &format!("syn {addr} from {pod}"))
        .trim()
        .to_owned()
}

#[test]
fn a_killed_agent_with_pinned_programs_fails_open_within_a_second_and_fail_closed_pods_stay_shut() {
    let _serial = serial();
    let bed = bed_with(vec![
        PodSpec::new("locked", 0, "locked").annotate("mesh-agent.io/fail-closed", "true")
    ]);
    let mut server = bed.pod_command("locked", meshtest()).unwrap();
    server.args(["serve", "8080", "locked"]);
    bed.spawn(server).unwrap();
    let pins = bed.bpffs().unwrap().join("n1");
    let pin_dir = pins.to_str().unwrap();
    let mut n1 = Agent::start(&bed, "n1", &["--pin-dir", pin_dir]).unwrap();
    let mut n2 = Agent::start(&bed, "n2", &[]).unwrap();
    n1.wait_ready(READY).unwrap();
    n2.wait_ready(READY).unwrap();
    let locked = format!("{}:8080", bed.pod("locked").ip);

    // Both pods go through the mesh while n1 runs; a plaintext client reaches the locked pod.
    for pod in ["client", "locked"] {
        let before = arrived_as(&n2, pod);
        assert_eq!(fetch_from_pod(&bed, pod, WEB_POD).status, 200);
        assert_eq!(arrived_as(&n2, pod), before + 1.0, "{pod} through the mesh");
    }
    assert_eq!(syn_from(&bed, "outsider", &locked, 2000), "connected");

    // kill -9: the programs stay (pinned); the heartbeat stops.
    n1.kill9().unwrap();
    let killed = Instant::now();
    // A fail-open pod connects directly once the heartbeat lapses (until then the programs
    // still steer it to the dead listener, which refuses).
    let mut refused = 0;
    let fail_open_after = loop {
        match syn_from(&bed, "client", WEB_POD, 500).as_str() {
            "connected" => break killed.elapsed(),
            "refused" => refused += 1,
            other => panic!("client's connection after kill -9: {other}"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "client never got through directly ({refused} refused)"
        );
    };
    eprintln!(
        "fail-open pod connected directly {fail_open_after:?} after kill -9 ({refused} refused \
         before)"
    );
    assert!(
        fail_open_after < Duration::from_secs(1),
        "fail-open took {fail_open_after:?} (liveness timeout 600 ms)"
    );
    let before = arrived_as(&n2, "client");
    let direct = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(direct.status, 200);
    assert!(direct.body.starts_with("hello from web"), "{}", direct.body);
    assert_eq!(arrived_as(&n2, "client"), before, "no agent carried it");

    // The fail-closed pod: connect() itself is refused, every time, so not one byte leaves
    // in plaintext; plaintext towards it is dropped, except from the node (kubelet probes).
    for _ in 0..3 {
        assert_eq!(syn_from(&bed, "locked", WEB_POD, 2000), "denied");
    }
    assert_eq!(syn_from(&bed, "outsider", &locked, 500), "timeout");
    let mut probe = bed.node_command("n1", meshtest()).unwrap();
    probe.args(["syn", &locked, "2000"]);
    assert_eq!(
        must_succeed(probe, "probe from the node").trim(),
        "connected"
    );

    // While no agent runs, the client's sandbox is replaced (new namespace, new veth).
    bed.recreate_pod("client").unwrap();

    // The next agent adopts the pinned programs and maps: both pods are meshed again, and
    // what the maps and pins held for the client's old sandbox is swept.
    let mut n1 = Agent::start(&bed, "n1", &["--pin-dir", pin_dir]).unwrap();
    n1.wait_ready(READY).unwrap();
    eventually("the old sandbox's entries to be swept", || {
        n1.log_text()
            .contains("removed what the previous agent left for pods gone since")
    });
    assert!(
        n1.log_text().contains("adopting the pinned datapath"),
        "{}",
        n1.log_text()
    );
    for pod in ["client", "locked"] {
        let before = arrived_as(&n2, pod);
        assert_eq!(fetch_from_pod(&bed, pod, WEB_POD).status, 200);
        assert_eq!(arrived_as(&n2, pod), before + 1.0, "{pod} meshed again");
    }
    assert_eq!(syn_from(&bed, "outsider", &locked, 2000), "connected");
    // The kernel counted what it refused while no agent ran (three connects, one SYN), and
    // the adopting agent reports it.
    assert_eq!(metric(&n1, "mesh_ebpf_fail_closed_refused_total", &[]), 4.0);
}

/// `node`'s arguments for a pinned agent that hands over to its successor.
fn pinned_args(bed: &mesh_agent_tests::Testbed, node: &str) -> Vec<String> {
    let pins = bed.bpffs().unwrap().join(node);
    let socket = bed.dir.join(format!("{node}-handover.sock"));
    vec![
        "--pin-dir".into(),
        pins.to_string_lossy().into_owned(),
        "--handover-socket".into(),
        socket.to_string_lossy().into_owned(),
    ]
}

fn spawn_output(bed: &mesh_agent_tests::Testbed, pod: &str, args: &[&str]) -> std::process::Child {
    let mut cmd = bed.pod_command(pod, meshtest()).unwrap();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn finished(child: std::process::Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn restarts_and_upgrades_under_load_refuse_nothing_reset_nothing_and_never_bypass_the_mesh() {
    let _serial = serial();
    let bed = bed();
    let args = pinned_args(&bed, "n1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut n1 = Agent::start(&bed, "n1", &args).unwrap();
    let mut n2 = Agent::start(&bed, "n2", &[]).unwrap();
    n1.wait_ready(READY).unwrap();
    n2.wait_ready(READY).unwrap();
    // The upgrade: the agent binary at another path (an image with a new build of the agent
    // whose eBPF object is the same).
    let upgraded = bed.dir.join("mesh-agent-upgraded");
    std::fs::copy(
        mesh_agent_tests::agent::workspace_binary("mesh-agent").unwrap(),
        &upgraded,
    )
    .unwrap();
    let before = arrived_as(&n2, "client");

    // 500 req/s for 14 s: 250 over 4 keep-alive connections, 250 on a new connection each;
    // and 10 echo streams (a line every 100 ms, each echo checked) for 14 s.
    const SECS: usize = 14;
    let keepalive = spawn_output(&bed, "client", &["load", WEB_POD, "250", "4", "14"]);
    let churn_count = (250 * SECS).to_string();
    let churn = spawn_output(&bed, "client", &["churn", WEB_POD, &churn_count, "3"]);
    let echo = format!("{}:9090", bed.pod("web").ip);
    let streams: Vec<_> = (0..10)
        .map(|_| spawn_output(&bed, "client", &["stream", &echo, "14"]))
        .collect();

    // Five restarts, 2 s apart: three of the same binary, then two upgrades.
    let mut previous = Vec::new();
    for i in 1..=5 {
        std::thread::sleep(Duration::from_secs(2));
        let next = if i <= 3 {
            Agent::start(&bed, "n1", &args).unwrap()
        } else {
            Agent::start_binary(&bed, "n1", &args, &upgraded).unwrap()
        };
        eventually_for(
            &format!("restart {i}: the next agent to serve"),
            Duration::from_secs(20),
            || {
                n1.log_text()
                    .matches("serving; the previous agent drains what it carries")
                    .count()
                    == i
            },
        );
        previous.push(std::mem::replace(&mut n1, next));
    }

    let load = key_values(&finished(keepalive, "keep-alive load").replace(' ', "\n"));
    let churned = finished(churn, "new-connection load");
    let mut echoed = 0;
    for stream in streams {
        let out = finished(stream, "a stream");
        echoed += key_values(&out)["echoed"].parse::<u64>().unwrap();
    }
    eprintln!("keep-alive: {load:?}; new connections: {churned}; streams echoed {echoed} lines");
    assert_eq!(load["errors"], "0", "{load:?}");
    assert_eq!(load["count"], (250 * SECS).to_string(), "{load:?}");
    assert_eq!(churned.trim(), format!("ok={churn_count}"));
    assert!(
        echoed > 10 * 10 * (SECS as u64 - 2),
        "{echoed} lines echoed"
    );

    // Capture never lapsed: every request and stream arrived at n2 through the mesh, as the
    // client (a connection that bypassed the agents would not be counted there).
    let total = 250.0 * SECS as f64 * 2.0 + 10.0;
    assert_eq!(
        arrived_as(&n2, "client") - before,
        total,
        "requests and streams that reached web as the client's mTLS identity"
    );
    // Each previous agent finished what it carried and left the datapath in place.
    for mut old in previous {
        let status = old
            .wait_exit(Duration::from_secs(25))
            .unwrap()
            .expect("a previous agent to exit once drained");
        assert!(status.success(), "{status}");
    }
    let log = n1.log_text();
    assert_eq!(
        log.matches("handed over to the next agent; bye").count(),
        5,
        "{log}"
    );
    assert_eq!(
        log.matches("adopting the pinned datapath").count(),
        5,
        "{log}"
    );
    let after = arrived_as(&n2, "client");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    assert_eq!(arrived_as(&n2, "client"), after + 1.0);
}

#[test]
fn a_successor_of_another_build_is_refused_and_takes_over_after_the_drain() {
    let _serial = serial();
    let bed = bed();
    let args = pinned_args(&bed, "n1");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--drain-timeout", "2s"]);
    let mut old = Agent::start(&bed, "n1", &args).unwrap();
    let mut n2 = Agent::start(&bed, "n2", &[]).unwrap();
    old.wait_ready(READY).unwrap();
    n2.wait_ready(READY).unwrap();
    let before = arrived_as(&n2, "client");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    assert_eq!(arrived_as(&n2, "client"), before + 1.0);

    // Another build (other map layouts): no handover; the running agent drains and exits,
    // and the newcomer replaces its pinned datapath with its own.
    args.extend(["--object-tag", "0123456789abcdef"]);
    let mut new = Agent::start(&bed, "n1", &args).unwrap();
    let status = old
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("the running agent to drain and exit");
    assert!(status.success(), "{status}");
    eventually("the newcomer to serve", || {
        new.get(15021, "/ready").is_ok_and(|r| r.status == 200)
    });
    let log = new.log_text();
    assert!(log.contains("refused, draining"), "{log}");
    assert!(log.contains("the running agent is another build"), "{log}");
    assert!(log.contains("unpinned what a previous agent left"), "{log}");
    let before = arrived_as(&n2, "client");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    assert_eq!(
        arrived_as(&n2, "client"),
        before + 1.0,
        "meshed by the newcomer"
    );
    assert!(new.wait_exit(Duration::from_millis(10)).unwrap().is_none());
}

#[test]
fn restarting_the_destination_agent_under_load_fails_no_request() {
    let _serial = serial();
    let bed = bed();
    let mut n1 = Agent::start(&bed, "n1", &[]).unwrap();
    let args = pinned_args(&bed, "n2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut n2 = Agent::start(&bed, "n2", &args).unwrap();
    n1.wait_ready(READY).unwrap();
    n2.wait_ready(READY).unwrap();
    // Warm n1's HBONE connections to n2, which the restarts then close (GOAWAY).
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);

    let keepalive = spawn_output(&bed, "client", &["load", WEB_POD, "250", "4", "8"]);
    let churn = spawn_output(&bed, "client", &["churn", WEB_POD, "2000", "3"]);
    let echo = format!("{}:9090", bed.pod("web").ip);
    let streams: Vec<_> = (0..5)
        .map(|_| spawn_output(&bed, "client", &["stream", &echo, "8"]))
        .collect();
    let mut previous = Vec::new();
    for i in 1..=2 {
        std::thread::sleep(Duration::from_secs(2));
        let next = Agent::start(&bed, "n2", &args).unwrap();
        eventually_for(
            &format!("restart {i}: the next agent to serve"),
            Duration::from_secs(20),
            || {
                n2.log_text()
                    .matches("serving; the previous agent drains what it carries")
                    .count()
                    == i
            },
        );
        previous.push(std::mem::replace(&mut n2, next));
    }
    let load = key_values(&finished(keepalive, "keep-alive load").replace(' ', "\n"));
    let churned = finished(churn, "new-connection load");
    for stream in streams {
        finished(stream, "a stream");
    }
    assert_eq!(load["errors"], "0", "{load:?}");
    assert_eq!(load["count"], "2000", "{load:?}");
    assert_eq!(churned.trim(), "ok=2000");
    let before = arrived_as(&n2, "client");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    assert_eq!(arrived_as(&n2, "client"), before + 1.0, "through the mesh");
    for mut old in previous {
        let status = old.wait_exit(Duration::from_secs(25)).unwrap();
        assert!(status.expect("the previous agent to exit").success());
    }
}

#[test]
fn a_signal_during_a_handover_waits_for_the_successor_instead_of_stopping_its_capture() {
    let _serial = serial();
    let bed = bed();
    let args = pinned_args(&bed, "n1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut old = Agent::start(&bed, "n1", &args).unwrap();
    let mut n2 = Agent::start(&bed, "n2", &[]).unwrap();
    old.wait_ready(READY).unwrap();
    n2.wait_ready(READY).unwrap();
    // The orchestrator stops the old agent as soon as the new one is started: the signal
    // lands while the successor holds the sockets but still enrolls the pods.
    let new = Agent::start(&bed, "n1", &args).unwrap();
    eventually_for(
        "the successor to hold the sockets",
        Duration::from_secs(10),
        || {
            old.log_text()
                .contains("took over the running agent's listening sockets")
        },
    );
    old.terminate();
    let status = old
        .wait_exit(Duration::from_secs(30))
        .unwrap()
        .expect("the old agent to exit");
    assert!(status.success(), "{status}");
    // The capture the two shared is the successor's now, and it still captures.
    let before = arrived_as(&n2, "client");
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);
    assert_eq!(
        arrived_as(&n2, "client"),
        before + 1.0,
        "through the mesh: {}",
        new.log_text()
    );
}
