//! `cargo xtask bench --instructions`: the instructions each agent runs per request, counted by
//! valgrind's callgrind, cross-node, HTTP per request and the opaque (L4) relay. Unlike time,
//! the count hardly moves with the load of a shared machine, so it shows a change of a few
//! percent that the timed figures' noise hides; `callgrind_annotate` on the kept profiles says
//! where the instructions go.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use mesh_agent_tests::Agent;
use serde_json::{json, Value};

use super::{output_text, wrk_requests, Bench, Scenario, NODE_CPU};

/// How long wrk runs while the agents' instructions are counted (and before, uncounted, so
/// that connections, tunnels and pools are up and every code path has been run once).
const COUNTED_SECS: u32 = 4;
const WARMUP_SECS: u32 = 2;
/// Start-up under valgrind is tens of times slower (aya parses the kernel's BTF).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run(root: &Path) -> anyhow::Result<()> {
    let (mut bench, agent_bin) = Bench::up(true, false, root)?;
    bench.start_servers(&agent_bin)?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    // The agents run under callgrind with counting off until the load starts.
    let wrapper = dir.join("callgrind-agent.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no \
             --callgrind-out-file={}/callgrind-%p.out {} \"$@\"\n",
            dir.display(),
            agent_bin.display()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    // SAFETY (edition 2021: safe): no thread of ours reads the environment meanwhile.
    std::env::set_var("MESH_AGENT_BIN", &wrapper);
    let mut result = serde_json::Map::new();
    for scenario in [Scenario::MeshCross, Scenario::MeshCrossL4] {
        println!("==> {} (agents under callgrind)", scenario.name());
        let counted = bench.count_instructions(scenario, &dir)?;
        for (node, per_request, profile) in &counted {
            println!(
                "    {node}: {per_request:.0} instructions per request (profile {})",
                profile.display()
            );
        }
        let by_node: serde_json::Map<String, Value> = counted
            .into_iter()
            .map(|(node, n, _)| (node.to_owned(), json!(n)))
            .collect();
        result.insert(scenario.key().to_owned(), Value::Object(by_node));
    }
    let out = dir.join("instructions.json");
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(result))?)?;
    println!("wrote {}", out.display());
    Ok(())
}

impl Bench {
    /// Starts both agents under callgrind for `scenario`, loads them uncounted, then counts
    /// their instructions for one throughput run; returns each node's instructions per
    /// request and the profile kept.
    fn count_instructions(
        &self,
        scenario: Scenario,
        dir: &Path,
    ) -> anyhow::Result<Vec<(&'static str, f64, PathBuf)>> {
        self.declare_opaque(scenario == Scenario::MeshCrossL4)?;
        self.set_policy(false)?;
        let mut agents = Vec::new();
        for (i, node) in ["n1", "n2"].into_iter().enumerate() {
            let mut agent =
                Agent::start_on(&self.bed, node, &["--log-level", "warn"], Some(NODE_CPU[i]))?;
            agent.wait_ready(READY_TIMEOUT)?;
            agents.push((node, agent));
        }
        let wrk = |secs: u32| -> anyhow::Result<f64> {
            let mut wrk = self.pod_cmd("a", "wrk")?;
            wrk.args([
                "-t2",
                "-c16",
                &format!("-d{secs}s"),
                &format!("http://{}:8080/", self.b),
            ]);
            Ok(wrk_requests(&output_text(wrk)?))
        };
        wrk(WARMUP_SECS)?;
        let pids: Vec<(&'static str, u32)> = agents
            .iter()
            .filter_map(|(node, a)| Some((*node, a.pid()?)))
            .collect();
        for (_, pid) in &pids {
            callgrind_control(&["-i", "on"], *pid)?;
        }
        let requests = wrk(COUNTED_SECS)?;
        let mut counted = Vec::new();
        for (node, pid) in pids {
            callgrind_control(&["-d"], pid)?;
            callgrind_control(&["-i", "off"], pid)?;
            // The first dump of the process: callgrind-<pid>.out.1.
            let profile = dir.join(format!("callgrind-{pid}.out.1"));
            let text = std::fs::read_to_string(&profile)
                .with_context(|| format!("reading {}", profile.display()))?;
            let total: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("totals:"))
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("no totals in {}", profile.display()))?;
            anyhow::ensure!(requests > 0.0, "wrk sent no request through the agents");
            let kept = dir.join(format!("callgrind-{}-{node}.out", scenario.key()));
            std::fs::rename(&profile, &kept)?;
            counted.push((node, total / requests, kept));
        }
        drop(agents);
        // What callgrind wrote of each process besides the dump (nothing counted).
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let per_pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("callgrind-"))
                .and_then(|n| n.split_once(".out"))
                .is_some_and(|(pid, _)| pid.parse::<u32>().is_ok());
            if per_pid {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(counted)
    }
}

/// `callgrind_control ARGS PID`: switches counting on or off, or dumps the counts so far.
fn callgrind_control(args: &[&str], pid: u32) -> anyhow::Result<()> {
    let mut cmd = Command::new("callgrind_control");
    cmd.args(args).arg(pid.to_string());
    output_text(cmd).map(|_| ())
}
