//! Builds the eBPF programs (mesh-agent-ebpf) with the nightly toolchain and embeds them.
//!
//! Set `MESH_AGENT_EBPF_STUB=1` to write an empty object instead: `cargo check` and clippy then
//! need neither nightly nor bpf-linker. A binary built that way refuses to start.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=MESH_AGENT_EBPF_STUB");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or(anyhow!("OUT_DIR not set"))?);
    if env::var_os("MESH_AGENT_EBPF_STUB").is_some_and(|v| v != "0") {
        fs::write(out_dir.join("mesh-agent"), []).context("writing the eBPF stub")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or(anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let ebpf_dir = manifest_dir.join("../mesh-agent-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or(anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
