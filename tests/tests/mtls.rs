//! Per-workload identity and mTLS between node agents (HBONE), end to end: real certificates,
//! real handshakes, real bytes on the simulated fabric. Run as root, serially.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_agent_tests::{
    capture::{contains, Capture},
    harness::*,
    netns, serial, PodSpec, Testbed,
};
use rcgen::{CertificateParams, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_SNI: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
const HBONE_N2: &str = "10.0.0.2:15008";

#[test]
fn cross_node_bytes_are_encrypted_on_the_fabric() {
    let _serial = serial();
    let bed = bed();
    let (_n1, n2) = agents(&bed);
    let marker = "/very-secret-marker-4f1c";

    // Everything n1 sends to or receives from the fabric, and the last hop: n2's agent delivers
    // inside web's own namespace (with the client's address), over web's loopback.
    let fabric = Capture::start("mt-fabric", "fab-n1").expect("capture fabric");
    let pod_link = Capture::start(&bed.pod("web").netns, "lo").expect("capture web's lo");
    let got = fetch_path(
        bed.pod_command("client", meshtest()).unwrap(),
        WEB_SVC,
        marker,
    );
    let fabric = fabric.finish().expect("fabric bytes");
    let pod_link = pod_link.finish().expect("veth bytes");

    assert_eq!(got.status, 200);
    assert!(got.body.contains(&format!("path={marker}")), "{}", got.body);
    // The hop n2 agent -> web pod is plaintext, so the capture method does see bodies...
    assert!(
        contains(&pod_link, marker.as_bytes()),
        "capture saw no plaintext on web's loopback"
    );
    assert!(contains(&pod_link, b"hello from web"));
    // ...and across the fabric there is traffic, but not one readable byte of it.
    assert!(
        fabric.len() > 2000,
        "only {} bytes captured on the fabric",
        fabric.len()
    );
    assert!(
        !contains(&fabric, marker.as_bytes()),
        "request path visible on the fabric"
    );
    assert!(
        !contains(&fabric, b"hello from web"),
        "response body visible on the fabric"
    );
    assert!(
        !contains(&fabric, b"GET /"),
        "request line visible on the fabric"
    );
    // The request was delivered by n2, having arrived over mTLS.
    eventually("n2 to record the request", || {
        metric(
            &n2,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", "200"),
            ],
        ) == 1.0
    });
}

#[test]
fn each_service_account_arrives_with_its_own_identity() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("robot", 0, "robot")]);
    let (n1, n2) = agents(&bed);

    assert_eq!(fetch_from_pod(&bed, "client", WEB_SVC).status, 200);
    assert_eq!(fetch_from_pod(&bed, "robot", WEB_SVC).status, 200);

    let from = |sa: &str| {
        metric(
            &n2,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                (
                    "source_principal",
                    &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
                ),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/web",
                ),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    eventually("n2 to record both requests", || {
        from("client") == 1.0 && from("robot") == 1.0
    });
    // The source workload travels as baggage for the destination's labels.
    assert_eq!(
        metric(
            &n2,
            "istio_requests_total",
            &[("reporter", "destination"), ("source_workload", "robot")]
        ),
        1.0
    );

    // n1 holds one certificate per service account; n2 saw exactly those on the wire.
    let serial_of =
        |sa: &str| cert_serial(&n1, &format!("spiffe://cluster.local/ns/default/sa/{sa}"));
    let (client_serial, robot_serial) = (serial_of("client"), serial_of("robot"));
    assert_ne!(client_serial, robot_serial);
    let log = n2.log_text();
    for (sa, serial) in [("client", &client_serial), ("robot", &robot_serial)] {
        let line = format!(
            "client_identity=spiffe://cluster.local/ns/default/sa/{sa} client_cert_serial={serial}"
        );
        assert!(log.contains(&line), "n2 did not log {line:?}:\n{log}");
    }
}

/// Accepts any server certificate: these probes test the server's checks, not ours.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_config(cert: Option<ClientCert>) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A leaf for `spiffe_id` signed by `issuer`, valid from `not_before` to `not_after`.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    issuer_der: &CertificateDer<'static>,
    spiffe_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> ClientCert {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, issuer).unwrap();
    (
        vec![cert.der().clone(), issuer_der.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// The testbed's real issuer (what the agents mint with).
fn testbed_issuer(bed: &Testbed) -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let dir = bed.dir.join("ca");
    let pem = std::fs::read_to_string(dir.join("issuer.crt")).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer.key")).unwrap()).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    (Issuer::from_ca_cert_pem(&pem, key).unwrap(), der)
}

/// A CA nobody in the mesh trusts.
fn foreign_issuer() -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.der().clone())
}

/// Connects to n2's HBONE port from n1, completes the TLS handshake as far as the client can
/// tell, sends the HTTP/2 preface and reports whether the server talked back (accepted).
fn probe(cert: Option<ClientCert>) -> Result<usize, String> {
    netns::run_in("mt-n1", move || {
        let mut sock = TcpStream::connect(HBONE_N2).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = ServerName::try_from(WEB_SNI).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(client_config(cert)), name)
            .map_err(|e| e.to_string())?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf) {
            Ok(0) => Err("closed".to_owned()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.to_string()),
        }
    })
    .expect("probe thread")
}

#[test]
fn hbone_refuses_foreign_expired_and_missing_client_certificates() {
    let _serial = serial();
    let bed = bed();
    let (_n1, n2) = agents(&bed);
    let (issuer, issuer_der) = testbed_issuer(&bed);
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // Control: a certificate from the real issuer is accepted (the server speaks HTTP/2).
    let good = leaf(&issuer, &issuer_der, CLIENT_ID, now - hour, now + hour);
    assert!(
        probe(Some(good)).is_ok(),
        "a valid client certificate was refused"
    );

    let (foreign, foreign_der) = foreign_issuer();
    let cases = [
        (
            "foreign anchor",
            Some(leaf(
                &foreign,
                &foreign_der,
                CLIENT_ID,
                now - hour,
                now + hour,
            )),
        ),
        (
            "expired",
            Some(leaf(
                &issuer,
                &issuer_der,
                CLIENT_ID,
                now - 2 * hour,
                now - hour,
            )),
        ),
        (
            "other trust domain",
            Some(leaf(
                &issuer,
                &issuer_der,
                "spiffe://evil.example/ns/default/sa/client",
                now - hour,
                now + hour,
            )),
        ),
        ("no certificate", None),
    ];
    for (what, cert) in cases {
        let result = probe(cert);
        assert!(
            result.is_err(),
            "{what}: the HBONE port accepted it ({result:?})"
        );
    }
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "handshake")]
        ),
        4.0
    );
    // Nothing reached the pod: web served no request at all.
    let stats = fetch_path(
        bed.pod_command("web", meshtest()).unwrap(),
        "127.0.0.1:8080",
        "/stats",
    );
    assert_eq!(stats.body, "requests=0\n");
}

/// Sends CONNECT `target` over a valid mTLS connection to n2 and returns the status.
fn connect_status(bed: &Testbed, target: &str) -> u16 {
    connect_all(bed, &[(target, None)])[0]
}

/// Sends each CONNECT (target, `forwarded` header) in turn on one mTLS connection to n2 as
/// CLIENT_ID, keeping every accepted tunnel open, and returns the statuses.
fn connect_all(bed: &Testbed, requests: &[(&str, Option<&str>)]) -> Vec<u16> {
    let requests: Vec<(String, Option<String>)> = requests
        .iter()
        .map(|(t, f)| (t.to_string(), f.map(str::to_owned)))
        .collect();
    let (issuer, issuer_der) = testbed_issuer(bed);
    let now = SystemTime::now();
    let cert = leaf(
        &issuer,
        &issuer_der,
        CLIENT_ID,
        now - Duration::from_secs(60),
        now + Duration::from_secs(600),
    );
    netns::run_in("mt-n1", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(HBONE_N2).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(Some(cert))))
                .connect(ServerName::try_from(WEB_SNI).unwrap(), tcp)
                .await
                .unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut statuses = Vec::new();
            let mut tunnels = Vec::new();
            for (target, forwarded) in requests {
                let mut req = hyper::Request::builder()
                    .method(hyper::Method::CONNECT)
                    .uri(target);
                if let Some(f) = forwarded {
                    req = req.header("forwarded", f);
                }
                let req = req
                    .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                    .unwrap();
                send.ready().await.unwrap();
                let resp = send.send_request(req).await.unwrap();
                statuses.push(resp.status().as_u16());
                if resp.status() == hyper::StatusCode::OK {
                    tunnels.push(hyper::upgrade::on(resp).await.unwrap());
                }
            }
            statuses
        })
    })
    .unwrap()
}

/// HBONE connections from n1's agent to n2's, as the kernel lists them.
fn hbone_connections(bed: &Testbed) -> usize {
    let ss = output({
        let mut c = bed.node_command("n1", "ss").unwrap();
        c.args(["-Htn", "state", "established", "dst", HBONE_N2]);
        c
    });
    String::from_utf8_lossy(&ss.stdout).lines().count()
}

#[test]
fn busy_traffic_to_a_peer_is_spread_over_a_connection_per_proxy_thread() {
    let _serial = serial();
    let bed = bed();
    let (_n1, n2) = agents_with(&bed, &["--worker-threads", "3"]);
    let web_ip = bed.pod("web").ip.to_string();
    let before = arrived_as(&n2, "client");
    let mut hold = bed.pod_command("client", meshtest()).unwrap();
    hold.args(["hold", &format!("{web_ip}:9090"), "6", "60"])
        .stdout(std::process::Stdio::null());
    bed.spawn(hold).unwrap();
    eventually("six tunnels to arrive", || {
        arrived_as(&n2, "client") == before + 6.0
    });
    // Tunnels opened while every connection carried one brought siblings, up to one per
    // proxy thread, and no further.
    eventually("three HBONE connections from n1 to n2", || {
        hbone_connections(&bed) == 3
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(hbone_connections(&bed), 3);
}

#[test]
fn hbone_caps_tunnels_per_connection_and_checks_the_forwarded_client() {
    let _serial = serial();
    let bed = bed();
    // One proxy thread: a sibling connection is then opened only when one is full.
    let (n1, n2) = agents_with(
        &bed,
        &["--max-streams-per-connection", "3", "--worker-threads", "1"],
    );
    let client_ip = bed.pod("client").ip.to_string();
    let web_ip = bed.pod("web").ip.to_string();
    let own = format!("for={client_ip}");
    let other = format!("for={web_ip}");
    // Three tunnels fit; the fourth on the same connection is refused, not queued.
    let statuses = connect_all(
        &bed,
        &[
            (WEB_POD, Some(&own)),
            (WEB_POD, Some(&own)),
            (WEB_POD, None),
            (WEB_POD, Some(&own)),
        ],
    );
    assert_eq!(statuses, [200, 200, 200, 503]);
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "stream_limit")]
        ),
        1.0
    );
    // A peer claiming to speak for a pod of another identity is refused.
    assert_eq!(connect_all(&bed, &[(WEB_POD, Some(&other))]), [403]);
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "forwarded_mismatch")]
        ),
        1.0
    );

    // The agents' own pool opens a sibling connection instead of hitting the cap: five long
    // connections from one pod all get through, over two HBONE connections. (Opaque ones, to
    // the echo port: idle HTTP connections would open no tunnel until they send a request.)
    let before = arrived_as(&n2, "client");
    let mut hold = bed.pod_command("client", meshtest()).unwrap();
    hold.args(["hold", &format!("{web_ip}:9090"), "5", "60"])
        .stdout(std::process::Stdio::null());
    bed.spawn(hold).unwrap();
    eventually("five more tunnels to arrive", || {
        arrived_as(&n2, "client") == before + 5.0
    });
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "stream_limit")]
        ),
        1.0
    );
    assert_eq!(
        hbone_connections(&bed),
        2,
        "HBONE connections from n1 to n2"
    );
    assert_eq!(
        metric(
            &n1,
            "mesh_tcp_connections_opened_total",
            &[("source_workload", "client")]
        ),
        5.0
    );
}

#[test]
fn hbone_refuses_connect_to_anything_but_its_own_enrolled_pods() {
    let _serial = serial();
    let bed = bed_with(vec![PodSpec::new("db", 1, "db")]);
    let (_n1, n2) = agents(&bed);
    // Control: web on n2 is served (and the identity in SNI matches it).
    assert_eq!(connect_status(&bed, WEB_POD), 200);
    // db is an enrolled pod of n2 too, but the connection was made for web's identity: a
    // certificate check for one workload must not open a tunnel to another.
    let db = format!("{}:8080", bed.pod("db").ip);
    assert_eq!(connect_status(&bed, &db), 400);
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "identity_mismatch")]
        ),
        1.0
    );
    // client lives on n1, not n2.
    assert_eq!(connect_status(&bed, "10.1.1.2:8080"), 503);
    // Not a pod at all.
    assert_eq!(connect_status(&bed, "10.9.9.9:80"), 503);
    // The node itself.
    assert_eq!(connect_status(&bed, "10.0.0.2:15000"), 503);
    assert_eq!(
        metric(
            &n2,
            "mesh_inbound_refused_total",
            &[("reason", "not_local")]
        ),
        3.0
    );
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() {
    let _serial = serial();
    let bed = bed();
    let (n1, n2) = agents_with(&bed, &["--cert-lifetime", "20s"]);
    // The first certificates were issued just before the agents became ready.
    let started = std::time::Instant::now();
    let first = fetch_from_pod(&bed, "client", WEB_POD);
    assert_eq!(first.status, 200);

    let source = [("reporter", "source")];
    let sent_before = metric(&n1, "mesh_tcp_sent_bytes_total", &source);
    // One connection streams through the tunnel for 25 s: across at least two renewals.
    let mut stream = bed.pod_command("client", meshtest()).unwrap();
    stream
        .args(["stream", "10.1.2.2:9090", "25"])
        .stdout(std::process::Stdio::piped());
    let streamer = stream.spawn().expect("start stream");

    let serial_now = || cert_serial(&n1, CLIENT_ID);
    let before = serial_now();
    eventually_for(
        "the client certificate to renew",
        Duration::from_secs(20),
        || serial_now() != before,
    );
    let after = serial_now();
    // Renewal comes at half life (10 s after issuance), not at once and not late.
    let renewed = started.elapsed();
    assert!(
        renewed >= Duration::from_secs(8) && renewed <= Duration::from_secs(14),
        "renewed {renewed:?} after the agents became ready"
    );
    // Byte counters are live: the open stream's bytes show before it ends.
    let live = metric(&n1, "mesh_tcp_sent_bytes_total", &source) - sent_before;
    assert!(
        live >= 500.0,
        "only {live} bytes counted while the stream is open"
    );
    assert_eq!(
        metric(&n1, "mesh_tcp_connections_closed_total", &source),
        1.0,
        "the stream must still be open"
    );
    // A new connection after the renewal presents the new certificate to n2.
    assert_eq!(fetch_from_pod(&bed, "client", WEB_POD).status, 200);

    let out = streamer.wait_with_output().expect("stream");
    assert!(
        out.status.success(),
        "stream broke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("echoed=")
        .expect("echoed=")
        .parse()
        .expect("count");
    assert!(echoed >= 150, "only {echoed} lines echoed in 25 s");

    let log = n2.log_text();
    for serial in [&before, &after] {
        let line = format!("client_identity={CLIENT_ID} client_cert_serial={serial}");
        assert!(
            log.contains(&line),
            "n2 never saw certificate {serial}:\n{log}"
        );
    }
}

#[test]
fn dev_ca_agents_trust_each_other() {
    let _serial = serial();
    let bed = bed();
    let dir = bed.dir.join("dev-ca");
    let dir_arg = dir.to_string_lossy().into_owned();
    let (_n1, n2) = agents_with(&bed, &["--dev-ca", &dir_arg]);
    // Two throwaway anchors, one per agent, and no private key on disk.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["anchor-n1.pem", "anchor-n2.pem"]);
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{f} holds a key");
    }
    let got = fetch_from_pod(&bed, "client", WEB_SVC);
    assert_eq!(got.status, 200);
    eventually(
        "n2 to record the request from the client's identity",
        || {
            metric(
                &n2,
                "istio_requests_total",
                &[("reporter", "destination"), ("source_principal", CLIENT_ID)],
            ) == 1.0
        },
    );
}
