//! Kubernetes mode end to end on the testbed: both nodes' agents run `--kube` against the API
//! server double (listening on node 1's address, inside the testbed), and pods created,
//! opted in and deleted through it are enrolled, captured, mTLS'd and dropped exactly as
//! with manifests. Run as root, serially.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use mesh_agent_tests::{
    apiserver::{config_map, secret, ApiServer},
    harness::*,
    netns, serial, Agent, PodSpec, Testbed,
};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::json;

/// The double, listening on node 1's address: both agents reach it over the fabric, and
/// nothing leaves the testbed. Loaded with the testbed's objects.
fn double(bed: &Testbed) -> ApiServer {
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
    api
}

/// Both agents in Kubernetes mode against `api`, ready.
fn kube_agents(bed: &Testbed, api: &ApiServer, extra: &[&str]) -> (Agent, Agent) {
    let kubeconfig = bed.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut args = vec!["--kube", "--kubeconfig", kubeconfig.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut n1 = Agent::start(bed, "n1", &args).unwrap();
    let mut n2 = Agent::start(bed, "n2", &args).unwrap();
    n1.wait_ready(READY).expect("n1 ready");
    n2.wait_ready(READY).expect("n2 ready");
    (n1, n2)
}

#[test]
fn pods_from_the_api_server_are_enrolled_captured_and_dropped() {
    let _serial = serial();
    let bed = bed();
    let api = double(&bed);
    let (n1, n2) = kube_agents(&bed, &api, &[]);
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
    let redirected = || metric(&n1, "mesh_ebpf_redirected_connections_total", &[]);
    let redirected_before = redirected();
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
    eventually("n1 to count the redirected connection", || {
        redirected() == redirected_before + 1.0
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
    let redirected_before = redirected();
    let after = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(after.status, 200);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        redirected(),
        redirected_before,
        "a deleted pod's connections are not captured"
    );
    assert!(!serial_before.is_empty());
}

/// A new trust anchor and an issuer it signs, with names of their own: (anchor, issuer, key).
fn new_ca(name: &str) -> (String, String, String) {
    let params = |cn: String| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p
    };
    let anchor_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let anchor_params = params(format!("{name} root"));
    let anchor = anchor_params.self_signed(&anchor_key).unwrap();
    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = params(format!("{name} issuer"))
        .signed_by(&issuer_key, &Issuer::new(anchor_params, anchor_key))
        .unwrap();
    (anchor.pem(), issuer.pem(), issuer_key.serialize_pem())
}

/// `field` of the certificate `agent` holds for `identity` (from `/certs`).
fn cert_field(agent: &Agent, identity: &str, field: &str) -> String {
    let certs: serde_json::Value =
        serde_json::from_str(&agent.admin("/certs").expect("admin /certs").body).unwrap();
    let cert = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == identity)
        .unwrap_or_else(|| panic!("no certificate for {identity} in {certs}"));
    cert[field].as_str().unwrap_or_default().to_owned()
}

#[test]
fn identity_material_comes_from_the_cluster_and_rotates_without_a_restart() {
    let _serial = serial();
    let bed = bed();
    let api = double(&bed);
    api.modify("namespaces", "", "default", |o| {
        o["metadata"]["annotations"] = json!({"mesh-agent.io/inject": "enabled"});
    });
    // Linkerd's layout, in the `linkerd` namespace.
    let (anchor, issuer, key) = new_ca("first");
    let roots = |pem: &str| {
        config_map(
            "linkerd",
            "linkerd-identity-trust-roots",
            &[("ca-bundle.crt", pem)],
        )
    };
    let issuer_secret = |cert: &str, key: &str| {
        secret(
            "linkerd",
            "linkerd-identity-issuer",
            "kubernetes.io/tls",
            &[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())],
        )
    };
    api.put(roots(&anchor));
    api.put(issuer_secret(&issuer, &key));
    let (n1, n2) = kube_agents(&bed, &api, &["--identity-namespace", "linkerd"]);
    let client_id = spiffe("client");
    assert_eq!(cert_field(&n1, &client_id, "issuer"), "CN=first issuer");
    assert_eq!(cert_field(&n2, &spiffe("web"), "issuer"), "CN=first issuer");
    let got = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(got.status, 200);
    eventually("n2 to deliver client's request over mTLS", || {
        arrived_as(&n2, "client") == 1.0
    });

    // A rotation done in the wrong order: the new issuer before the anchors that trust it.
    // Refused (nothing could verify its certificates), the first issuer stays in force...
    let (anchor2, issuer2, key2) = new_ca("second");
    let serial_before = cert_field(&n1, &client_id, "serial");
    api.put(issuer_secret(&issuer2, &key2));
    eventually("n1 to refuse the untrusted issuer", || {
        n1.log_text()
            .contains("identity material in linkerd refused")
    });
    assert_eq!(cert_field(&n1, &client_id, "issuer"), "CN=first issuer");
    assert_eq!(cert_field(&n1, &client_id, "serial"), serial_before);
    // ...and taken as soon as the anchors bundle both roots: every certificate re-issued by
    // the second issuer, on both nodes, with no restart, and traffic still mTLS'd.
    api.put(roots(&format!("{anchor}{anchor2}")));
    eventually("both nodes on the second issuer", || {
        cert_field(&n1, &client_id, "issuer") == "CN=second issuer"
            && cert_field(&n2, &spiffe("web"), "issuer") == "CN=second issuer"
    });
    assert_ne!(cert_field(&n1, &client_id, "serial"), serial_before);
    let got = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(got.status, 200);
    eventually("n2 to deliver the next request over mTLS", || {
        arrived_as(&n2, "client") == 2.0
    });
    assert!(n1.pid().is_some() && n2.pid().is_some(), "no restart");
}

#[test]
fn pod_sandboxes_are_found_by_their_cgroup_even_when_recreated() {
    let _serial = serial();
    // `boxed` is laid out as containerd lays out a pod (systemd driver): the kubelet's cgroup
    // named after its UID, a sandbox process in a scope of its own; the API server gives the
    // UID. `client` is not (its cgroup is not the kubelet's): after a short grace it is found
    // the old way, by probing the node's namespaces.
    let uid = "7d6c1e0a-5b2f-4c3d-9e8f-0a1b2c3d4e5f";
    let bed = bed_with(vec![PodSpec::new("boxed", 0, "boxed").containerd(uid)]);
    let api = double(&bed);
    assert_eq!(
        api.get("pods", "default", "boxed").unwrap()["metadata"]["uid"],
        uid
    );
    api.modify("namespaces", "", "default", |o| {
        o["metadata"]["annotations"] = json!({"mesh-agent.io/inject": "enabled"});
    });
    let (n1, n2) = kube_agents(&bed, &api, &[]);
    let found = |how: &str| metric(&n1, "mesh_pod_sandboxes_found_total", &[("method", how)]);
    assert_eq!(found("cgroup"), 1.0, "boxed, by its cgroup");
    assert_eq!(found("scan"), 1.0, "client, without a UID");
    let got = fetch_from_pod(&bed, "boxed", WEB_SVC);
    assert_eq!(got.status, 200);
    eventually("n2 to deliver boxed's request over mTLS", || {
        arrived_as(&n2, "boxed") == 1.0
    });

    // The sandbox replaced (new network namespace and veth, same IP, a new sandbox process
    // in the pod's cgroup): found again by the cgroup, no scan of the node.
    let scans = || metric(&n1, "mesh_pod_netns_scans_total", &[]);
    let scans_before = scans();
    bed.recreate_pod("boxed").unwrap();
    eventually("boxed re-enrolled by its cgroup", || found("cgroup") == 2.0);
    assert_eq!(found("scan"), 1.0);
    assert_eq!(
        scans(),
        scans_before,
        "no namespace of the node was probed for it"
    );
    // (Counted as found just before it is enrolled again: until then the cluster IP, which
    // only the mesh serves here, is unreachable and the attempt reaches nothing.)
    eventually("boxed's connections captured again", || {
        let mut get = bed.pod_command("boxed", meshtest()).unwrap();
        get.args(["get", WEB_SVC, "/"]);
        output(get).status.success()
    });
    eventually("n2 to deliver boxed's next request over mTLS", || {
        arrived_as(&n2, "boxed") == 2.0
    });
}

#[test]
fn a_pod_behind_a_bridge_is_guarded_on_its_own_veth() {
    let _serial = serial();
    // `bridged` is attached as Flannel attaches pods: its veth is a port of a bridge, and the
    // node routes its address to the bridge. Its own veth is found from the node's side (the
    // veth whose peer is in its namespace), so the kernel's anti-spoofing guards it.
    let bed = bed_with(vec![PodSpec::new("bridged", 0, "bridged").bridged()]);
    let (_n1, n2) = agents(&bed);
    let got = fetch_from_pod(&bed, "bridged", WEB_SVC);
    assert_eq!(got.status, 200);
    eventually("n2 to deliver bridged's request over mTLS", || {
        arrived_as(&n2, "bridged") == 1.0
    });
    // Five datagrams from an address that is not its own, three from its own: only the three
    // arrive (without a guard on its veth, all eight would).
    let received = udp_from_forged_source(&bed, "bridged", "10.99.0.1", 5, 3);
    assert_eq!(
        received, 3,
        "forged datagrams from behind the bridge got through"
    );
}
