//! What an operator applies (`deploy/`), checked offline: the kustomize base renders and every
//! object passes the Kubernetes schemas (strict), the RBAC grants read access to exactly the
//! kinds the agent watches, the DaemonSet runs unprivileged with the documented capabilities,
//! and the Prometheus files point at the agent's metrics port. Each check is also run on a
//! broken copy, which it must reject. Unprivileged; needs `kubectl` and `kubernetes-validate`
//! (`cargo xtask setup` installs both).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use serde::Deserialize as _;
use serde_yaml::Value;

/// Kubernetes versions the base is validated against: the oldest deploy/README.md names and
/// the newest the pinned validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

/// The capabilities the DaemonSet adds, as deploy/README.md argues them.
const CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

/// (apiGroup, resource) of every kind `mesh-agent run --kube` reads cluster-wide.
const WATCHED: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
    ("policy.linkerd.io", "servers"),
    ("policy.linkerd.io", "authorizationpolicies"),
    ("policy.linkerd.io", "meshtlsauthentications"),
    ("policy.linkerd.io", "networkauthentications"),
    ("security.istio.io", "authorizationpolicies"),
    ("security.istio.io", "peerauthentications"),
    ("networking.istio.io", "virtualservices"),
    ("networking.istio.io", "destinationrules"),
];

/// (apiGroup, resource, name) of the identity objects, in the `linkerd` namespace.
const IDENTITY: &[(&str, &str, &str)] = &[
    ("", "configmaps", "linkerd-identity-trust-roots"),
    ("", "secrets", "linkerd-identity-issuer"),
];

const READ: &[&str] = &["get", "list", "watch"];

/// A control: what it breaks, and how.
type Break<'a, T> = (&'a str, &'a dyn Fn(&mut T));

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

/// `kubectl kustomize deploy/`, as `kubectl apply -k` would render it.
fn render() -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("running kubectl (on PATH? `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    docs.iter().filter(move |d| d["kind"] == kind)
}

fn the<'a>(docs: &'a [Value], kind: &'a str) -> &'a Value {
    let found: Vec<_> = of_kind(docs, kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().map(str_of).collect())
        .unwrap_or_default()
}

/// Runs kubernetes-validate (strict, every version in [`KUBERNETES_VERSIONS`]) on `yaml`.
/// Err carries the validator's report. A kind it has no schema for is an error too: every kind
/// in the base is a built-in one.
fn validate(yaml: &str) -> Result<(), String> {
    // A file, not stdin: the validator reads its input once per Kubernetes version.
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "mesh-agent-deploy-{}-{}.yaml",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, yaml).unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", version]);
    }
    let out = cmd
        .arg(&path)
        .output()
        .expect("running python3 -m kubernetes_validate (`cargo xtask setup` installs it)");
    let _ = std::fs::remove_file(&path);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed for python3; run `cargo xtask setup`"
    );
    if out.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(report)
    }
}

#[test]
fn base_renders_and_passes_the_kubernetes_schemas() {
    let docs = documents(&render());
    let kinds: BTreeSet<&str> = docs.iter().map(|d| str_of(&d["kind"])).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "Role",
            "RoleBinding",
            "ServiceAccount",
        ]),
        "the base renders exactly these kinds (the PodMonitor stays out: its CRD may be absent)"
    );
    if let Err(report) = validate(&to_yaml(&docs)) {
        panic!("deploy/ does not pass kubernetes-validate --strict:\n{report}");
    }

    // Controls: the same validator rejects a misspelt field and a wrong type.
    let breaks: [Break<Value>; 2] = [
        ("a misspelt field", &|ds| {
            ds["spec"]["template"]["spec"]["hostNetwrok"] = true.into()
        }),
        ("a number for a name", &|ds| {
            ds["spec"]["template"]["spec"]["priorityClassName"] = 5.into()
        }),
    ];
    for (what, break_it) in breaks {
        let mut broken = docs.clone();
        let ds = broken
            .iter_mut()
            .find(|d| d["kind"] == "DaemonSet")
            .unwrap();
        break_it(ds);
        let Err(report) = validate(&to_yaml(&broken)) else {
            panic!("kubernetes-validate accepted {what}");
        };
        assert!(report.contains("ERROR"), "{what}: {report}");
    }
}

/// One RBAC rule, as the checks below see it.
#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
    non_resource: bool,
}

fn rules(role: &Value) -> Vec<Rule> {
    let owned = |v: &Value| -> Vec<String> { strings(v).into_iter().map(str::to_owned).collect() };
    role["rules"]
        .as_sequence()
        .expect("a role with rules")
        .iter()
        .map(|r| Rule {
            groups: owned(&r["apiGroups"]),
            resources: owned(&r["resources"]),
            verbs: owned(&r["verbs"]),
            names: owned(&r["resourceNames"]),
            non_resource: !r["nonResourceURLs"].is_null(),
        })
        .collect()
}

/// Every rule read-only (exactly get, list, watch), nothing by wildcard or URL; returns what
/// the rules grant as (group, resource, name) with "" for "any name".
fn grants(rules: &[Rule]) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        if verbs != READ.iter().copied().collect() {
            return Err(format!("verbs {:?} are not exactly {READ:?}", rule.verbs));
        }
        if rule.non_resource {
            return Err("a nonResourceURLs rule".into());
        }
        let mut all = rule.groups.iter().chain(&rule.resources).chain(&rule.names);
        if let Some(wild) = all.find(|s| s.contains('*')) {
            return Err(format!("wildcard {wild:?} in {rule:?}"));
        }
        if rule.groups.is_empty() || rule.resources.is_empty() {
            return Err(format!("a rule without groups or resources: {rule:?}"));
        }
        for group in &rule.groups {
            for resource in &rule.resources {
                if rule.names.is_empty() {
                    granted.insert((group.clone(), resource.clone(), String::new()));
                }
                for name in &rule.names {
                    granted.insert((group.clone(), resource.clone(), name.clone()));
                }
            }
        }
    }
    Ok(granted)
}

fn check_cluster_rules(rules: &[Rule]) -> Result<(), String> {
    let granted = grants(rules)?;
    let want: BTreeSet<_> = WATCHED
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string(), String::new()))
        .collect();
    if granted != want {
        return Err(format!(
            "ClusterRole grants {:?} beyond the watched kinds and misses {:?}",
            granted.difference(&want).collect::<Vec<_>>(),
            want.difference(&granted).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

fn check_identity_rules(rules: &[Rule]) -> Result<(), String> {
    let granted = grants(rules)?;
    let want: BTreeSet<_> = IDENTITY
        .iter()
        .map(|(g, r, n)| (g.to_string(), r.to_string(), n.to_string()))
        .collect();
    if granted != want {
        return Err(format!(
            "identity Role grants {granted:?}, not exactly the two named objects {want:?}"
        ));
    }
    Ok(())
}

#[test]
fn rbac_reads_exactly_the_watched_kinds_and_the_two_identity_objects() {
    let docs = documents(&render());
    let cluster_role = the(&docs, "ClusterRole");
    assert!(
        cluster_role["aggregationRule"].is_null(),
        "no aggregation: it would pull in other roles' rules"
    );
    let cluster_rules = rules(cluster_role);
    check_cluster_rules(&cluster_rules).unwrap();

    let role = the(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "linkerd");
    let identity_rules = rules(role);
    check_identity_rules(&identity_rules).unwrap();

    // Both bound to the agent's service account, and only to it.
    let sa = the(&docs, "ServiceAccount");
    let subject = (
        str_of(&sa["metadata"]["name"]),
        str_of(&sa["metadata"]["namespace"]),
    );
    for (binding, role) in [
        (the(&docs, "ClusterRoleBinding"), cluster_role),
        (the(&docs, "RoleBinding"), role),
    ] {
        assert_eq!(binding["roleRef"]["kind"], role["kind"]);
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(
            binding["metadata"]["namespace"],
            role["metadata"]["namespace"]
        );
        let subjects = binding["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1, "{binding:?}");
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(
            (
                str_of(&subjects[0]["name"]),
                str_of(&subjects[0]["namespace"])
            ),
            subject
        );
    }

    // Controls: each way of granting too much, or too little, is caught.
    let edit = |rules: &[Rule], f: &dyn Fn(&mut Vec<Rule>)| {
        let mut rules = rules.to_vec();
        f(&mut rules);
        rules
    };
    let cluster_breaks: [Break<Vec<Rule>>; 6] = [
        ("create", &|r| r[0].verbs.push("create".into())),
        ("a wildcard verb", &|r| r[1].verbs = vec!["*".into()]),
        ("a wildcard resource", &|r| r[2].resources.push("*".into())),
        ("secrets cluster-wide", &|r| {
            r[0].resources.push("secrets".into())
        }),
        ("a missing kind", &|r| {
            r[5].resources.pop();
        }),
        ("no watch", &|r| r[3].verbs.retain(|v| v != "watch")),
    ];
    for (what, f) in cluster_breaks {
        assert!(
            check_cluster_rules(&edit(&cluster_rules, f)).is_err(),
            "ClusterRole check accepted {what}"
        );
    }
    let identity_breaks: [Break<Vec<Rule>>; 3] = [
        ("every secret", &|r| r[1].names.clear()),
        ("another name", &|r| r[1].names.push("other".into())),
        ("update", &|r| r[0].verbs.push("update".into())),
    ];
    for (what, f) in identity_breaks {
        assert!(
            check_identity_rules(&edit(&identity_rules, f)).is_err(),
            "identity Role check accepted {what}"
        );
    }
}

/// The capabilities deploy/README.md's table grants: rows `| `NAME` | yes | why |`.
fn documented_capabilities() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                ["", name, "yes", ..] => Some(name.trim_matches('`').to_owned()),
                _ => None,
            }
        })
        .collect()
}

/// The DaemonSet's pod spec problems, or none.
fn check_daemonset(ds: &Value) -> Result<(), String> {
    let pod = &ds["spec"]["template"]["spec"];
    let mut problems = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            problems.push(what.to_owned());
        }
    };
    want(pod["hostNetwork"] == true, "hostNetwork: true");
    want(pod["hostPID"] == true, "hostPID: true");
    want(
        pod["dnsPolicy"] == "ClusterFirstWithHostNet",
        "dnsPolicy: ClusterFirstWithHostNet",
    );
    want(
        pod["priorityClassName"] == "system-node-critical",
        "priorityClassName: system-node-critical",
    );
    want(
        pod["tolerations"].as_sequence().is_some_and(|t| {
            t.iter()
                .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null())
        }),
        "a toleration `operator: Exists` (every taint)",
    );
    want(
        ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
            && ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 1
            && ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 0,
        "RollingUpdate, maxSurge 1, maxUnavailable 0 (the new agent takes over from the old)",
    );
    want(
        pod["securityContext"]["privileged"] != true,
        "no privileged pod",
    );

    let containers = pod["containers"].as_sequence().cloned().unwrap_or_default();
    let init = pod["initContainers"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    want(containers.len() == 1, "one container");
    for c in containers.iter().chain(&init) {
        let sc = &c["securityContext"];
        want(sc["privileged"] != true, "no `privileged: true`");
        let dropped = strings(&sc["capabilities"]["drop"]);
        want(dropped == ["ALL"], "capabilities.drop: [ALL]");
        let add: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
        want(
            add == CAPABILITIES.iter().copied().collect(),
            &format!("capabilities.add exactly {CAPABILITIES:?}, found {add:?}"),
        );
        // The API server rejects these for an unprivileged container; the schema does not.
        want(
            sc["allowPrivilegeEscalation"] != false || !add.contains("SYS_ADMIN"),
            "allowPrivilegeEscalation unset (false is refused with SYS_ADMIN)",
        );
        for mount in c["volumeMounts"].as_sequence().into_iter().flatten() {
            want(
                mount["mountPropagation"] != "Bidirectional",
                "no Bidirectional mount (privileged containers only)",
            );
        }
    }
    let Some(agent) = containers.first() else {
        return Err("no container".into());
    };
    let probe = |name: &str, path: &str| {
        let get = &agent[name]["httpGet"];
        get["path"] == path && get["port"] == 15021
    };
    want(
        probe("readinessProbe", "/ready"),
        "readinessProbe GET :15021/ready",
    );
    want(
        probe("livenessProbe", "/live"),
        "livenessProbe GET :15021/live",
    );
    let args = strings(&agent["args"]);
    for arg in [
        "run",
        "--kube",
        "--node-name=$(NODE_NAME)",
        "--node-address=$(NODE_IP)",
    ] {
        want(args.contains(&arg), &format!("argument {arg}"));
    }
    for (var, field) in [("NODE_NAME", "spec.nodeName"), ("NODE_IP", "status.hostIP")] {
        want(
            agent["env"].as_sequence().is_some_and(|env| {
                env.iter()
                    .any(|e| e["name"] == var && e["valueFrom"]["fieldRef"]["fieldPath"] == field)
            }),
            &format!("env {var} from {field}"),
        );
    }
    want(
        agent["ports"].as_sequence().is_none_or(|p| p.is_empty()),
        "no declared ports (with hostNetwork they are host ports: the surge pod would not fit)",
    );
    for arg in [
        "--pin-dir=/sys/fs/bpf/mesh-agent",
        "--handover-socket=/run/mesh-agent/handover.sock",
        "--linger-after-handover",
    ] {
        want(args.contains(&arg), &format!("argument {arg}"));
    }
    want(
        !agent["resources"]["requests"]["memory"].is_null()
            && !agent["resources"]["limits"]["memory"].is_null(),
        "memory request and limit",
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The list above is the one the agent's watchers use.
#[test]
fn the_rbac_list_is_what_the_agent_watches() {
    let mut ours: Vec<(&str, &str)> = WATCHED.to_vec();
    let mut agent: Vec<(&str, &str)> = mesh_agent::source::kube::WATCHED.to_vec();
    ours.sort_unstable();
    agent.sort_unstable();
    assert_eq!(ours, agent);
    let identity = [
        mesh_agent::source::cluster_identity::TRUST_ROOTS,
        mesh_agent::source::cluster_identity::ISSUER,
    ];
    assert_eq!(IDENTITY.iter().map(|i| i.2).collect::<Vec<_>>(), identity);
}

#[test]
fn daemonset_runs_unprivileged_with_the_documented_capabilities() {
    let docs = documents(&render());
    let ds = the(&docs, "DaemonSet");
    check_daemonset(ds).unwrap();

    // The agent's own parser accepts its arguments (the downward-API variables as the kubelet
    // expands them), in Kubernetes mode with the identity from the cluster.
    use clap::Parser as _;
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&container["args"]).into_iter().map(|a| {
        a.replace("$(NODE_NAME)", "node-1")
            .replace("$(NODE_IP)", "10.0.0.1")
    });
    let cli =
        mesh_agent::cli::Cli::try_parse_from(std::iter::once("mesh-agent".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("the DaemonSet's args do not parse: {e}"));
    let mesh_agent::cli::Command::Run(run) = cli.command else {
        panic!("the DaemonSet does not run `mesh-agent run`")
    };
    assert!(run.kube, "Kubernetes mode");
    assert!(run.manifests.is_none() && run.trust_anchors.is_none() && run.dev_ca.is_none());
    assert_eq!(run.identity_namespace, "linkerd");
    let mounted = |path: &str| {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == path && m["readOnly"] != true)
    };
    assert!(
        mounted(run.host_proc.to_str().unwrap()),
        "--host-proc names a writable mount"
    );

    let documented = documented_capabilities();
    assert_eq!(
        documented,
        CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        "deploy/README.md's capability table grants these"
    );

    // Controls: each loosening is caught.
    let breaks: [Break<Value>; 7] = [
        ("privileged", &|d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] =
                true.into()
        }),
        ("an extra capability", &|d| {
            let caps = &mut d["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["capabilities"]["add"];
            caps.as_sequence_mut().unwrap().push("SYS_MODULE".into());
        }),
        ("no drop ALL", &|d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                ["drop"] = Value::Sequence(vec![])
        }),
        ("no hostPID", &|d| {
            d["spec"]["template"]["spec"]["hostPID"] = false.into()
        }),
        ("readiness elsewhere", &|d| {
            d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
                8080.into()
        }),
        ("no toleration", &|d| {
            d["spec"]["template"]["spec"]["tolerations"] = Value::Sequence(vec![])
        }),
        ("a Bidirectional mount", &|d| {
            d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"] =
                "Bidirectional".into()
        }),
    ];
    for (what, f) in breaks {
        let mut broken = ds.clone();
        f(&mut broken);
        assert!(
            check_daemonset(&broken).is_err(),
            "DaemonSet check accepted {what}"
        );
    }
}

#[test]
fn prometheus_files_target_the_metrics_port() {
    let docs = documents(&render());
    let ds = the(&docs, "DaemonSet");
    let template = &ds["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );

    let dir = deploy_dir().join("prometheus");
    let scrape: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("scrape-config.yaml")).unwrap())
            .expect("scrape-config.yaml is YAML");
    let jobs = scrape["scrape_configs"].as_sequence().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["kubernetes_sd_configs"][0]["role"], "pod");
    let keeps: Vec<(Vec<&str>, &str)> = job["relabel_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| (strings(&r["source_labels"]), str_of(&r["regex"])))
        .collect();
    let label = str_of(&template["metadata"]["labels"]["app.kubernetes.io/name"]);
    assert!(
        keeps.contains(&(
            vec!["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
            label
        )),
        "keeps only the agent's pods: {keeps:?}"
    );
    // The pod declares no ports: its address is given the metrics port.
    let to_metrics_port = |rules: &Value, from: &str, to: &str| {
        rules.as_sequence().is_some_and(|rules| {
            rules.iter().any(|r| {
                strings(&r[from]) == ["__meta_kubernetes_pod_ip"]
                    && r[to] == "__address__"
                    && r["replacement"] == "${1}:15020"
            })
        })
    };
    assert!(
        to_metrics_port(&job["relabel_configs"], "source_labels", "target_label"),
        "scrapes the pod's address on port 15020"
    );

    let monitor: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("podmonitor.yaml")).unwrap())
            .expect("podmonitor.yaml is YAML");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    assert_eq!(
        monitor["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            &template["metadata"]["labels"][k], v,
            "the PodMonitor selects the agent's pods"
        );
    }
    let endpoints = monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["path"], "/metrics");
    assert!(
        to_metrics_port(&endpoints[0]["relabelings"], "sourceLabels", "targetLabel"),
        "the PodMonitor scrapes the pod's address on port 15020"
    );
}
