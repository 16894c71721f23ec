//! Compiles the kernel programs (agent-ebpf) for the BPF target with nightly and bpf-linker,
//! so that the object is embedded in the `mcptrail` binary: one file is all that is deployed.
//! `cargo xtask setup` installs what this needs.
//!
//! The watched folders are given relative to this package: cargo stores them so, and a target
//! directory shared between clones (as CI does) then checks the current clone's sources rather
//! than those of whichever clone built last, which would embed a stale object.
use anyhow::Context as _;
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../agent-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: "../agent-ebpf",
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
