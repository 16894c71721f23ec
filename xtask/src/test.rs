//! `cargo xtask test`: formatting, lints (host and BPF), build, every test, and the demo.
use anyhow::bail;

use crate::{cargo, run_checked, run_tests_bin};

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask test must run as root: the integration tests load eBPF programs and make cgroups and network namespaces"
        );
    }
    run_checked(cargo().args(["fmt", "--all", "--check"]))?;
    run_checked(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs only build for the BPF target, with nightly.
    let mut nightly = std::process::Command::new("rustup");
    nightly
        .current_dir(crate::workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["run", "nightly", "cargo"]);
    run_checked(nightly.args([
        "clippy",
        "--package",
        "agent-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The fuzz targets, briefly: they build, and a few seconds of fuzzing find nothing new.
    for target in crate::FUZZ_TARGETS {
        crate::fuzz(target, 10)?;
    }
    let bin = crate::build_for_tests()?;
    // The package the tests install into a scratch root (tests/tests/package.rs).
    let dist = crate::dist::run()?;
    run_checked(
        cargo()
            .args(["test", "--workspace", "--exclude", "agent-ebpf"])
            .env("MCPTRAIL_BIN", &bin)
            .env("MCPTRAIL_DEB", &dist.deb)
            .env("MCPTRAIL_TARBALL", &dist.tarball),
    )?;
    // The demo, exactly as `cargo xtask demo` starts it (a few seconds): the README's first
    // look cannot break unnoticed. The tests above find their fixtures through cargo test's
    // CARGO_MANIFEST_DIR, the demo through what run_tests_bin sets.
    run_tests_bin("demo", false, &[], &[])?;
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
