//! `cargo xtask run --kind NAME`: the agent on every node of an existing kind cluster, against
//! its API server, for development (operators use `deploy/`).
//!
//! Checks first, changes after: without `kind`, a reachable Docker engine or the cluster, it
//! says what is missing and changes nothing. Then it builds the agent (release), creates the
//! identity material in Linkerd's layout if the cluster has none (`mesh-agent identity
//! dev-ca`), and on each node container: copies the binary and the cluster's internal
//! kubeconfig in, stops an agent already running there, and starts the new one in the
//! background (`--kube`, identity from the cluster, log in /var/log/mesh-agent.log).

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(name: &str, root: &Path) -> anyhow::Result<()> {
    // Everything that could stop us, before anything is changed.
    if !on_path("kind") {
        bail!(
            "run --kind: `kind` is not installed (https://kind.sigs.k8s.io); nothing was changed"
        );
    }
    if !on_path("kubectl") {
        bail!("run --kind: `kubectl` is not installed (`cargo xtask setup` installs it); nothing was changed");
    }
    if let Err(e) = output(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]))
    {
        bail!("run --kind: no Docker engine to reach ({e}); nothing was changed");
    }
    let clusters = output(Command::new("kind").arg("get").arg("clusters"))?;
    if !clusters.lines().any(|c| c.trim() == name) {
        bail!("run --kind: no kind cluster named {name} (have: {}); create it with `kind create cluster --name {name}`; nothing was changed", clusters.split_whitespace().collect::<Vec<_>>().join(", "));
    }
    let nodes = output(Command::new("kind").args(["get", "nodes", "--name", name]))?;
    let nodes: Vec<&str> = nodes.split_whitespace().collect();
    let context = format!("kind-{name}");
    let kubectl = |args: &[&str]| {
        let mut cmd = Command::new("kubectl");
        cmd.args(["--context", &context]).args(args);
        cmd
    };

    super::step("build the agent (release)", {
        let mut cmd = super::cargo();
        cmd.args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
        ]);
        cmd
    })?;
    let agent = root.join("target/release/mesh-agent");
    let work = root.join("target/kind").join(name);
    std::fs::create_dir_all(&work)?;

    // Identity in Linkerd's layout, unless the cluster has it (Linkerd installed, or a
    // previous run).
    if output(&mut kubectl(&[
        "-n",
        "linkerd",
        "get",
        "secret",
        "linkerd-identity-issuer",
    ]))
    .is_err()
    {
        println!("kind: creating a development trust anchor and issuer in namespace linkerd");
        let ca = work.join("ca");
        output(
            Command::new(&agent)
                .args(["identity", "dev-ca", "--out"])
                .arg(&ca),
        )?;
        let _ = output(&mut kubectl(&["create", "namespace", "linkerd"]));
        let file = |f: &str| ca.join(f).display().to_string();
        output(&mut kubectl(&[
            "-n",
            "linkerd",
            "create",
            "configmap",
            "linkerd-identity-trust-roots",
            &format!("--from-file=ca-bundle.crt={}", file("ca.crt")),
        ]))?;
        output(&mut kubectl(&[
            "-n",
            "linkerd",
            "create",
            "secret",
            "tls",
            "linkerd-identity-issuer",
            &format!("--cert={}", file("issuer.crt")),
            &format!("--key={}", file("issuer.key")),
        ]))?;
    }

    let kubeconfig = work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        output(Command::new("kind").args(["get", "kubeconfig", "--internal", "--name", name]))?,
    )?;
    for node in &nodes {
        let address = output(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            node,
        ]))?;
        let address = address.trim();
        let node_name = output(Command::new("docker").args(["exec", node, "hostname"]))?;
        let node_name = node_name.trim();
        // Only the agent a previous run started (its pid file): a DaemonSet's agent on the
        // same node is not ours to stop.
        let stop = "[ -f /run/mesh-agent-dev.pid ] && kill $(cat /run/mesh-agent-dev.pid); rm -f /run/mesh-agent-dev.pid; true";
        output(Command::new("docker").args(["exec", node, "sh", "-c", stop]))?;
        output(Command::new("docker").args(["exec", node, "mkdir", "-p", "/etc/mesh-agent"]))?;
        output(
            Command::new("docker")
                .arg("cp")
                .arg(&agent)
                .arg(format!("{node}:/usr/local/bin/mesh-agent")),
        )?;
        output(
            Command::new("docker")
                .arg("cp")
                .arg(&kubeconfig)
                .arg(format!("{node}:/etc/mesh-agent/kubeconfig")),
        )?;
        let start = format!(
            "nohup /usr/local/bin/mesh-agent run --kube --kubeconfig /etc/mesh-agent/kubeconfig \
             --node {node_name} --node-address {address} >/var/log/mesh-agent.log 2>&1 & \
             echo $! >/run/mesh-agent-dev.pid"
        );
        output(Command::new("docker").args(["exec", node, "sh", "-c", &start]))?;
        println!("kind: agent started on {node} ({address}); log: docker exec {node} cat /var/log/mesh-agent.log");
    }
    println!(
        "kind: enrol a namespace with `kubectl --context {context} annotate namespace NS \
         mesh-agent.io/inject=enabled`; metrics: docker exec NODE curl -s NODE_ADDRESS:15020/metrics"
    );
    Ok(())
}
