//! `cargo xtask`: set-up, build, the testbed demo and the test suite.

mod bench;
mod demo;
mod fuzz;
mod kind;
mod setup;

use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install or verify what building and testing need (idempotent).
    Setup,
    /// Build the agent (with its eBPF programs) and the test workloads.
    Build,
    /// Bring up a simulated two-node cluster with demo workloads and agents; Ctrl-C ends it.
    Run {
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long, conflicts_with = "kind")]
        duration: Option<u64>,
        /// Instead: start the agent on every node of the existing kind cluster NAME, against
        /// its API server (needs kind and a Docker engine; checks before changing anything).
        #[arg(long, value_name = "NAME")]
        kind: Option<String>,
    },
    /// Format check, clippy, unit tests and the privileged integration tests (serially).
    Test,
    /// Measure what the mesh costs against no mesh and a sidecar pair (release build).
    Bench {
        /// A short run (one repetition, one rate) for local iteration: under two minutes.
        #[arg(long)]
        quick: bool,
        /// Also sample both agents with `perf` during a second cross-node throughput run (HTTP
        /// and opaque): profiles with call stacks (target/bench/profile-*.txt), flat ones at a
        /// higher rate (profile-flat-*.txt), and each agent's system calls per request.
        #[arg(long)]
        profile: bool,
        /// Instead: the desired state of a large cluster (10k Services / 50k endpoints / 20k
        /// Pods): apply times, memory, idle CPU, and request latency while it churns.
        #[arg(long, conflicts_with_all = ["quick", "profile"])]
        scale: bool,
        /// Instead: Kubernetes mode at cluster scale (5k Pods / 2k Services / 10k endpoints
        /// from the API server double): time to the first snapshot and memory.
        #[arg(long, conflicts_with_all = ["quick", "profile", "scale"])]
        kube_scale: bool,
        /// Instead: SECS seconds at ~1000 req/s (keep-alive, new connections, streams) with
        /// each agent's RSS, descriptors, threads and map entries sampled every 10 s;
        /// writes target/bench/soak.json and soak.svg.
        #[arg(long, value_name = "SECS", conflicts_with_all = ["quick", "profile", "scale", "kube_scale"])]
        soak: Option<u64>,
        /// Instead: the instructions each agent runs per request (valgrind's callgrind),
        /// cross-node, HTTP and opaque: a figure the machine's load hardly moves, for A/B
        /// runs of small changes; writes target/bench/instructions.json and the profiles
        /// (callgrind-*.out, for callgrind_annotate).
        #[arg(long, conflicts_with_all = ["quick", "profile", "scale", "kube_scale", "soak"])]
        instructions: bool,
    },
    /// Run each fuzz target (fuzz/fuzz_targets) under libFuzzer; a crash is kept under
    /// fuzz/regressions, which the unit tests replay.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Manage the simulated cluster by hand.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Create the demo topology and leave it running (no agents).
    Up,
    /// Remove the testbed.
    Down,
    /// Remove anything a crashed run left behind (namespaces, processes, cgroups).
    Clean,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            build()
        }
        Cmd::Run {
            kind: Some(name), ..
        } => kind::run(&name, &workspace_root()),
        Cmd::Run { duration, .. } => {
            setup::run()?;
            build()?;
            demo::run(duration)
        }
        Cmd::Test => {
            setup::run()?;
            test()
        }
        Cmd::Bench {
            quick,
            profile,
            scale,
            kube_scale,
            soak,
            instructions,
        } => {
            setup::run()?;
            setup::bench_tools()?;
            if profile {
                setup::profile_tools()?;
            }
            if instructions {
                setup::valgrind()?;
            }
            let mut cmd = cargo();
            cmd.args([
                "build",
                "--release",
                "-p",
                "mesh-agent",
                "-p",
                "mesh-agent-tests",
                "--bins",
                "--example",
                "route_select",
                "--example",
                "authorize",
            ]);
            step("build release binaries", cmd)?;
            if scale {
                return bench::scale::run(&workspace_root());
            }
            if kube_scale {
                return bench::kube_scale::run(&workspace_root());
            }
            if let Some(secs) = soak {
                return bench::soak::run(&workspace_root(), secs);
            }
            if instructions {
                return bench::instructions::run(&workspace_root());
            }
            bench::run(quick, profile, &workspace_root())
        }
        Cmd::Fuzz { seconds, target } => {
            setup::run()?;
            fuzz::run(&workspace_root(), seconds, target.as_deref())
        }
        Cmd::Testbed { action } => match action {
            TestbedAction::Up => demo::testbed_up(),
            TestbedAction::Down | TestbedAction::Clean => {
                mesh_agent_tests::clean().context("cleaning the testbed")?;
                println!("testbed: removed");
                Ok(())
            }
        },
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn step(what: &str, mut cmd: Command) -> anyhow::Result<()> {
    println!("==> {what}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-agent-tests",
        "--bins",
    ]);
    step("build mesh-agent (with eBPF) and meshtest", cmd)
}

fn test() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    // The stub object keeps clippy independent of the nightly eBPF build.
    clippy
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("MESH_AGENT_EBPF_STUB", "1");
    step("cargo clippy -D warnings", clippy)?;
    // The eBPF crate only builds for the BPF target, with nightly.
    let mut clippy_ebpf = Command::new("rustup");
    clippy_ebpf.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "mesh-agent-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);
    step("cargo clippy -D warnings (eBPF programs)", clippy_ebpf)?;
    build()?;
    let mut tests = cargo();
    // Privileged tests share kernel state: one at a time.
    tests.args(["test", "--", "--test-threads=1"]);
    step("unit and integration tests", tests)?;
    if std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(mesh_agent_tests::testbed::PREFIX)
        })
    {
        bail!("tests left testbed namespaces behind (see /run/netns); teardown is broken");
    }
    println!("==> all tests passed");
    Ok(())
}
