//! Kubernetes mode end to end on the testbed: both nodes' agents run `--kube` against the API
//! server double (listening on node 1's address, inside the testbed), and pods created,
//! opted in and deleted through it are enrolled, captured, mTLS'd and dropped exactly as
//! with manifests. Run as root, serially.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use mesh_agent_tests::{apiserver::ApiServer, harness::*, netns, serial, Agent};
use serde_json::json;

#[test]
fn pods_from_the_api_server_are_enrolled_captured_and_dropped() {
    let _serial = serial();
    let bed = bed();
    // The double listens on node 1's address: both agents reach it over the fabric, and
    // nothing leaves the testbed.
    let n1_ip = bed.node("n1").ip;
    let listener = netns::run_in(&bed.node("n1").netns, move || {
        std::net::TcpListener::bind((n1_ip, 0))
    })
    .unwrap()
    .unwrap();
    let api = ApiServer::start(listener).unwrap();
    for (_, yaml) in bed.manifests() {
        api.apply(&yaml);
    }
    let kubeconfig = bed.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let args = ["--kube", "--kubeconfig", kubeconfig];
    let mut n1 = Agent::start(&bed, "n1", &args).unwrap();
    let mut n2 = Agent::start(&bed, "n2", &args).unwrap();
    n1.wait_ready(READY).expect("n1 ready");
    n2.wait_ready(READY).expect("n2 ready");
    assert_eq!(
        api.lists("pods"),
        4,
        "each agent lists its own node's pods and the others'"
    );

    // Kubernetes mode enrols only what opts in: `default` has not, so client's request to
    // web's pod goes directly (the server sees it, but no agent delivered it; the testbed has
    // no kube-proxy, so a cluster IP only works through the mesh).
    let direct = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(direct.status, 200);
    assert_eq!(metric(&n1, "mesh_enrolled_pods", &[]), 0.0);
    assert_eq!(arrived_as(&n2, "client"), 0.0);

    // The namespace opts in (Linkerd's annotation): client (n1) and web (n2) are enrolled,
    // outsider keeps its own opt-out, and the same request now arrives over mTLS as
    // client's identity.
    api.modify("namespaces", "", "default", |o| {
        o["metadata"]["annotations"] = json!({"linkerd.io/inject": "enabled"});
    });
    eventually("client enrolled on n1", || {
        metric(&n1, "mesh_enrolled_pods", &[]) == 1.0
            && n1.get(15021, "/ready").is_ok_and(|r| r.status == 200)
    });
    eventually("web enrolled on n2", || {
        metric(&n2, "mesh_enrolled_pods", &[]) == 1.0
    });
    let client_id = spiffe("client");
    let serial_before = cert_serial(&n1, &client_id);
    let meshed = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(meshed.status, 200);
    assert!(
        meshed.body.starts_with("hello from web\n"),
        "{}",
        meshed.body
    );
    assert_eq!(meshed.server_saw(), bed.pod("client").ip.to_string());
    eventually("n2 to deliver client's request over mTLS", || {
        arrived_as(&n2, "client") == 1.0
    });

    // The pod deleted through the API: unenrolled, its certificate dropped, and its traffic
    // (the process still runs in the old sandbox) no longer captured.
    assert!(api.delete("pods", "default", "client"));
    eventually("client unenrolled on n1", || {
        metric(&n1, "mesh_enrolled_pods", &[]) == 0.0
    });
    eventually("client's certificate dropped", || {
        !n1.admin("/certs")
            .expect("admin /certs")
            .body
            .contains(&format!("\"{client_id}\""))
    });
    let after = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(after.status, 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // (The series of a workload that left the cluster are dropped with it; had the pod stayed
    // enrolled, they would count both requests.)
    assert_eq!(
        arrived_as(&n2, "client"),
        0.0,
        "a deleted pod's traffic is not captured"
    );
    assert!(!serial_before.is_empty());
    n1.stop().unwrap();
    n2.stop().unwrap();
}
