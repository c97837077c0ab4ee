//! `cargo xtask setup`: installs or verifies everything a fresh Debian/Ubuntu machine needs,
//! one line per step. Safe to run again; it only acts on what is missing.

use std::process::Command;

use anyhow::{bail, Context as _};

/// Debian packages: LLVM 22 for bpf-linker, iproute2 for the testbed, curl for poking at it.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "curl",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The validator `tests/tests/deploy.rs` runs on the rendered `deploy/` manifests; it bundles
/// the Kubernetes OpenAPI schemas, so it needs no cluster.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed(pkg: &str) -> bool {
    quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn exec(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: running {cmd:?}"))?;
    if !status.success() {
        bail!("{what}: {cmd:?} failed ({status})");
    }
    Ok(())
}

/// What `bench` runs besides our binaries: the server, the load tools, bpftool for eBPF stats.
const BENCH_PACKAGES: &[&str] = &["nginx", "wrk", "iperf3", "bpftool"];

pub fn bench_tools() -> anyhow::Result<()> {
    packages(BENCH_PACKAGES)
}

/// `perf`, for `cargo xtask bench --profile`.
pub fn profile_tools() -> anyhow::Result<()> {
    packages(&["linux-perf"])
}

/// What `cargo xtask bench --instructions` counts with (callgrind and callgrind_control).
pub fn valgrind() -> anyhow::Result<()> {
    packages(&["valgrind"])
}

fn packages(wanted: &[&str]) -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages ({}) present", wanted.join(" "));
    } else {
        if !root {
            bail!("setup: missing packages {missing:?}; run as root so apt-get can install them");
        }
        println!("setup: installing {} with apt-get", missing.join(" "));
        exec(
            "apt-get update",
            Command::new("apt-get").arg("update").arg("-q"),
        )?;
        exec(
            "apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    packages(PACKAGES)?;

    let toolchains = quiet(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: rust nightly toolchain present");
    } else {
        println!("setup: installing the rust nightly toolchain");
        exec(
            "rustup toolchain install",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    let components = quiet(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src present");
    } else {
        println!("setup: adding rust-src to nightly (for -Z build-std=core)");
        exec(
            "rustup component add",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }

    let linker = quiet(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        exec(
            "cargo install bpf-linker",
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }

    deploy_tools()?;

    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.lines().any(|l| l.contains(" - cgroup2 ")) {
        println!("setup: cgroup v2 mounted");
    } else {
        bail!("setup: no cgroup v2 mount; mesh-agent attaches its programs to cgroup v2");
    }
    if !root {
        println!("setup: note: not root; `run` and `test` need root (namespaces, eBPF)");
    }
    Ok(())
}

/// What `tests/tests/deploy.rs` needs to check `deploy/` offline: `kubectl` (its built-in
/// kustomize renders the base) and `kubernetes-validate` for the machine's `python3`.
fn deploy_tools() -> anyhow::Result<()> {
    if quiet(Command::new("kubectl").args(["kustomize", "--help"])).is_some() {
        println!("setup: kubectl (with kustomize) present");
    } else {
        packages(&["kubernetes-client"])?;
    }

    let validator_version = || {
        quiet(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]))
            .map(|v| v.trim().to_owned())
    };
    if validator_version().as_deref() == Some(KUBERNETES_VALIDATE_VERSION) {
        println!("setup: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} present");
        return Ok(());
    }
    if quiet(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
        packages(&["python3-pip"])?;
    }
    let python = quiet(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))
        .unwrap_or_default();
    println!(
        "setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} with pip for {} \
         (Kubernetes schemas, to validate deploy/)",
        python.trim()
    );
    exec(
        "pip install kubernetes-validate",
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            // Debian's python3 is marked externally managed: pip then installs into
            // /usr/local, beside (not over) Debian's packages. Older pips ignore this.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    match validator_version() {
        Some(v) if v == KUBERNETES_VALIDATE_VERSION => Ok(()),
        other => bail!(
            "setup: after pip install, `python3 -m kubernetes_validate --version` gives {other:?}, \
             not {KUBERNETES_VALIDATE_VERSION}; is `python3` the interpreter pip installed into?"
        ),
    }
}
