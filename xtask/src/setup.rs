//! `cargo xtask setup`: everything the build and the tests need, installed idempotently.
//!
//! Each step checks first and does nothing when its part is already in place, so running it
//! before every build costs a few process spawns.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{output, run_checked};

/// Debian packages: libclang for RocksDB's bindings, and the real programs the tests drive
/// (`update-ca-certificates`, from ca-certificates, for `mcptrail ca install`; Prometheus and
/// its promtool, which scrape and check `/metrics`; dpkg-dev's `dpkg-shlibdeps` for the
/// package's dependencies; systemd's `systemd-analyze` for the unit).
const APT_PACKAGES: &[&str] = &[
    "libclang-dev",
    "curl",
    "iproute2",
    "python3",
    "ca-certificates",
    "prometheus",
    "dpkg-dev",
    "systemd",
];

/// The bpf-linker release this recipe is known to build.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The Python packages of the end-to-end tests, pinned: the official MCP SDK (server and
/// client), and for HTTP/2 the `h2` package (httpx's HTTP/2, the SDK client's) and hypercorn
/// (an ASGI server that speaks h2, for the SDK's server app); the official OTLP protobuf schema
/// for the test collector that receives the agent's export.
const PYTHON_PACKAGES: [&str; 4] = [
    "mcp==2.3.0",
    "h2==4.4.1",
    "hypercorn==0.18.0",
    "opentelemetry-proto==1.45.2",
];

/// The npm packages of the end-to-end tests, pinned: the official TypeScript MCP SDK (a
/// Node.js client in the TLS and HTTP/2 tests), and undici, whose fetch that client uses to
/// speak HTTP/2 (Node 20's bundled fetch does not offer h2).
const NPM_PACKAGES: [(&str, &str); 2] = [
    ("@modelcontextprotocol/sdk", "1.32.2"),
    ("undici", "7.30.2"),
];

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    mcp_sdk()?;
    ts_sdk()?;
    cargo_fuzz()?;
    Ok(())
}

/// cargo-fuzz, pinned, for the fuzz targets in fuzz/ (libFuzzer, built with nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.1";

fn cargo_fuzz() -> anyhow::Result<()> {
    let works = Command::new("cargo-fuzz")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    run_checked(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("installing cargo-fuzz")
}

/// The Python virtual environment with the MCP SDK, in ~/.local/share/mcptrail/venv (the
/// tests find it there).
fn mcp_sdk() -> anyhow::Result<()> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = PathBuf::from(home).join(".local/share/mcptrail/venv");
    let python = venv.join("bin/python");
    // Every pinned package at its version, or pip runs.
    let check = PYTHON_PACKAGES
        .iter()
        .map(|p| {
            let (name, version) = p.split_once("==").unwrap_or((p, ""));
            format!("m.version({name:?}) == {version:?}")
        })
        .collect::<Vec<_>>()
        .join(" and ");
    let installed = Command::new(&python)
        .args([
            "-c",
            &format!("import importlib.metadata as m, sys; sys.exit(0 if {check} else 1)"),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    if !python.exists() {
        run_checked(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )
    .context(
        "installing the MCP SDK, h2, hypercorn and opentelemetry-proto for the end-to-end tests",
    )
}

/// The TypeScript SDK in ~/.local/share/mcptrail/node (the tests put its node_modules on
/// NODE_PATH), with the machine's Node.js and npm.
fn ts_sdk() -> anyhow::Result<()> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = PathBuf::from(home).join(".local/share/mcptrail/node");
    let installed = NPM_PACKAGES.iter().all(|(name, version)| {
        std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["version"] == *version)
    });
    if installed {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    run_checked(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(NPM_PACKAGES.iter().map(|(n, v)| format!("{n}@{v}"))),
    )
    .context("installing the TypeScript MCP SDK and undici for the end-to-end tests (needs Node.js and npm)")
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing Debian packages: {}",
        missing.join(" ")
    );
    run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages (this needs root)")
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // Run outside any toolchain override that cargo set for us.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run_checked(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("the eBPF programs need a nightly toolchain")?;
    }
    let installed =
        output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run_checked(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !installed.lines().any(|l| l.starts_with("clippy")) {
        run_checked(rustup().args(["component", "add", "clippy", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// bpf-linker cannot be downloaded prebuilt here, so it is built against the nightly
/// toolchain's own LLVM: the folder it is linked against becomes its RUNPATH, and holds the
/// library under both the name the linker asks for and its own soname.
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let version = output(rustup().args(["run", "nightly", "rustc", "-vV"]))?;
    let major = llvm_major(&version)
        .with_context(|| format!("no LLVM version in `rustc +nightly -vV`:\n{version}"))?;
    let sysroot = output(rustup().args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(format!(".local/share/mcptrail/llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let soname = lib.file_name().context("libLLVM has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    }
    run_checked(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was built but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The toolchain's LLVM shared library, for example `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn find_libllvm(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM.so.")
            || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        {
            return Ok(entry.path());
        }
    }
    bail!(
        "no libLLVM shared library in {}; is the nightly toolchain complete?",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }
}
