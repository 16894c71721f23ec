//! Compiles the kernel programs (agent-ebpf) for the BPF target with nightly and bpf-linker,
//! so that the object is embedded in the `mcptrail` binary: one file is all that is deployed.
//! `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("the workspace has no agent-ebpf package"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // aya-build watches agent-ebpf's folder; the shared types live in agent-common.
    if let Some(workspace) = root_dir.parent() {
        println!("cargo:rerun-if-changed={}", workspace.join("agent-common"));
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
