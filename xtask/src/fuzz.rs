//! `cargo xtask fuzz`: each fuzz target under `fuzz/fuzz_targets` (see `mesh_agent::fuzzing`)
//! runs under libFuzzer with AddressSanitizer for a while, from its seeds and the corpus it
//! grew before. A crash is copied into `fuzz/regressions/<target>/`, where the agent's unit
//! tests replay it from then on: commit it with the fix.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

/// cargo-fuzz, pinned.
const CARGO_FUZZ_VERSION: &str = "0.13.1";

pub fn run(root: &Path, seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let has_fuzz = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        let mut install = super::cargo();
        install.args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ]);
        super::step("cargo install cargo-fuzz", install)?;
    }
    let dir = root.join("fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .context("listing fuzz/fuzz_targets")?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .filter(|t| only.is_none_or(|o| o == t))
        .collect();
    targets.sort();
    if targets.is_empty() {
        bail!("no fuzz target {}", only.unwrap_or("at all"));
    }
    let mut report = Vec::new();
    for target in &targets {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let artifacts = dir.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let before = files(&artifacts);
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg("--fuzz-dir")
            .arg(&dir)
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            // The targets need no eBPF object.
            .env("MESH_AGENT_EBPF_STUB", "1")
            .current_dir(root);
        println!("==> fuzz {target} for {seconds} s");
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        if !status.success() {
            let kept: Vec<String> = files(&artifacts)
                .into_iter()
                .filter(|f| !before.contains(f))
                .map(|f| {
                    let to = dir.join("regressions").join(target).join(&f);
                    let _ = std::fs::copy(artifacts.join(&f), &to);
                    to.display().to_string()
                })
                .collect();
            bail!(
                "fuzz target {target} failed ({status}); the input is kept as {}: fix the bug and commit it",
                kept.join(", ")
            );
        }
        report.push(format!(
            "{target}: {seconds} s clean, corpus {} inputs",
            files(&corpus).len()
        ));
    }
    println!();
    for line in report {
        println!("{line}");
    }
    Ok(())
}

fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}
