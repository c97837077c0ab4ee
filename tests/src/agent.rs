//! Running a real `mesh-agent` process in a testbed node.

use std::{
    fs::OpenOptions,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{http, netns, Testbed};

/// A binary of this workspace: `$MESH_AGENT_BIN` for the agent if set, else `name` in the
/// target directory the running executable was built into.
pub fn workspace_binary(name: &str) -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN").filter(|_| name == "mesh-agent") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        io::Error::other(format!(
            "{name} binary not found next to {}; build it first (`cargo build -p mesh-agent -p \
             mesh-agent-tests`, which `cargo xtask test` does)",
            exe.display()
        ))
    })
}

pub struct Agent {
    pub node: String,
    netns: String,
    pub node_ip: Ipv4Addr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent for `node` reading the testbed's manifests (or, with `--kube` among
    /// `extra_args`, the API server its `--kubeconfig` names).
    pub fn start(bed: &Testbed, node: &str, extra_args: &[&str]) -> io::Result<Agent> {
        Self::start_on(bed, node, extra_args, None)
    }

    /// Like [`Agent::start`], pinned to one CPU if `cpu` is given (benchmarks).
    pub fn start_on(
        bed: &Testbed,
        node: &str,
        extra_args: &[&str],
        cpu: Option<usize>,
    ) -> io::Result<Agent> {
        Self::spawn(bed, node, extra_args, cpu, &workspace_binary("mesh-agent")?)
    }

    /// Like [`Agent::start`], running the agent binary at `binary` (an upgrade).
    pub fn start_binary(
        bed: &Testbed,
        node: &str,
        extra_args: &[&str],
        binary: &std::path::Path,
    ) -> io::Result<Agent> {
        Self::spawn(bed, node, extra_args, None, binary)
    }

    fn spawn(
        bed: &Testbed,
        node: &str,
        extra_args: &[&str],
        cpu: Option<usize>,
        agent: &std::path::Path,
    ) -> io::Result<Agent> {
        let n = bed.node(node);
        let log = bed.dir.join(format!("agent-{node}.log"));
        let log_file = OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(agent);
        if !extra_args.contains(&"--log-level") {
            cmd.args(["--log-level", "info,mesh_agent=debug"]);
        }
        cmd.args(["run", "--node", node]);
        // From the testbed's manifests, unless the test points the agent at an API server.
        if !extra_args.contains(&"--kube") {
            cmd.arg("--manifests").arg(bed.manifests_dir());
        }
        cmd.args(["--node-address", &n.ip.to_string()])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if !extra_args
            .iter()
            .any(|a| ["--dev-ca", "--trust-anchors", "--identity-namespace"].contains(a))
        {
            let ca = Self::ensure_ca(bed, agent)?;
            cmd.arg("--trust-anchors")
                .arg(ca.join("ca.crt"))
                .arg("--issuer-cert")
                .arg(ca.join("issuer.crt"))
                .arg("--issuer-key")
                .arg(ca.join("issuer.key"));
        }
        netns::command_in(&mut cmd, &n.netns, None)?;
        if let Some(cpu) = cpu {
            netns::pin(&mut cmd, cpu);
        }
        let child = cmd.spawn()?;
        Ok(Agent {
            node: node.to_owned(),
            netns: n.netns.clone(),
            node_ip: n.ip,
            log,
            child: Some(child),
        })
    }

    /// The testbed's mesh CA (Linkerd's install model: anchor, issuer certificate and key in
    /// files), created on first use with `mesh-agent identity dev-ca`.
    pub fn ensure_ca(bed: &Testbed, agent: &std::path::Path) -> io::Result<PathBuf> {
        let dir = bed.dir.join("ca");
        if !dir.join("issuer.key").is_file() {
            let out = Command::new(agent)
                .args(["identity", "dev-ca", "--out"])
                .arg(&dir)
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "mesh-agent identity dev-ca: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        Ok(dir)
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.node_ip, port))
    }

    /// GET on one of the agent's ports, from inside the node's namespace.
    pub fn get(&self, port: u16, path: &str) -> io::Result<http::Response> {
        self.get_at(self.addr(port), path)
    }

    /// GET on the admin port (127.0.0.1:15000 inside the node's namespace).
    pub fn admin(&self, path: &str) -> io::Result<http::Response> {
        self.get_at(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000)),
            path,
        )
    }

    fn get_at(&self, addr: SocketAddr, path: &str) -> io::Result<http::Response> {
        let path = path.to_owned();
        netns::run_in(&self.netns, move || http::get(addr, &path))?
    }

    /// Waits until `/ready` answers 200 (every local pod enrolled).
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!(
                        "agent {} exited with {status} before becoming ready; log:\n{}",
                        self.node,
                        self.log_text()
                    )));
                }
            }
            if self.get(15021, "/ready").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "agent {} not ready after {timeout:?}; log:\n{}",
                    self.node,
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus exposition at `:15020/metrics`.
    pub fn metrics(&self) -> io::Result<String> {
        let r = self.get(15020, "/metrics")?;
        if r.status != 200 {
            return Err(io::Error::other(format!("/metrics answered {}", r.status)));
        }
        Ok(r.body)
    }

    /// One sample from `/metrics` (0 when the series does not exist yet).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> io::Result<f64> {
        Ok(http::metric_value(&self.metrics()?, name, labels).unwrap_or(0.0))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM (the agent drains what it carries, up to its `--drain-timeout`), then wait for
    /// the exit.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("agent already stopped"))?;
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait()
    }

    /// Sends SIGTERM (the agent drains) without waiting for it to exit.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits up to `limit` for the agent to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(io::Error::other("agent already stopped"));
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}
