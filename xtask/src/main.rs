//! `cargo xtask`: mcptrail's developer tasks.
//!
//! `setup` installs, idempotently, everything a fresh machine needs to build the project;
//! `run` and `test` call it first, so the README's two commands are the whole set-up.
#![forbid(unsafe_code)]

mod dist;
mod setup;
mod test;

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mcptrail's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs: Debian packages, nightly rust-src, bpf-linker.
    Setup,
    /// Set up if needed, then build the mcptrail binary (with its embedded eBPF object).
    Build,
    /// Set up, build, and run the agent on its embedded default (root). Extra arguments go to
    /// `mcptrail run`, for example `cargo xtask run -- --target 10.0.0.5:8811`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting and clippy, build, and run every test, the root eBPF ones
    /// included, then the demo.
    Test,
    /// Set up, build, and run the benchmarks (root): each compares against the direct path in
    /// the same run and reports ratios. See BENCHMARKS.md.
    Bench {
        /// A smoke run (under 2 minutes once built): fewer rounds, one rate, one payload.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, then run the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer, nightly): each for
    /// SECONDS, or only TARGET. Crashes land in fuzz/artifacts/TARGET.
    Fuzz {
        target: Option<String>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Set up, then build the release package: TARGET/dist/mcptrail_VERSION_ARCH.deb and a
    /// tarball with the same files (binary with its eBPF object, unit, default configuration,
    /// README).
    Dist,
    /// Set up, build, and show mcptrail at work (root): a real MCP server, the agent on a
    /// child cgroup of its own, a real MCP client, the trail they leave, and its verification.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build()?;
            Ok(())
        }
        Task::Run { args } => {
            setup::run()?;
            let bin = build()?;
            eprintln!(
                "xtask: starting {} run {}; read the trail with `{} tail -f`",
                bin.display(),
                args.join(" "),
                bin.display()
            );
            // exec, so that Ctrl-C and SIGTERM reach the agent itself and it can shut down
            // cleanly instead of being orphaned by this wrapper.
            let err = Command::new(&bin).arg("run").args(&args).exec();
            Err(err).with_context(|| format!("starting {}", bin.display()))
        }
        Task::Test => {
            setup::run()?;
            test::run()
        }
        Task::Fuzz { target, seconds } => {
            setup::run()?;
            let targets: Vec<&str> = match &target {
                Some(t) => vec![t.as_str()],
                None => FUZZ_TARGETS.to_vec(),
            };
            for t in targets {
                fuzz(t, seconds)?;
            }
            Ok(())
        }
        Task::Bench { quick } => {
            setup::run()?;
            build()?;
            // The connect() benchmark measures the kernel programs: the debug agent is fine.
            let rounds = std::ffi::OsStr::new(if quick { "3" } else { "9" });
            run_tests_bin("bench-connect", false, &[], &[("BENCH_ROUNDS", rounds)])?;
            run_tests_bin("bench-mask", true, &[], &[])?;
            // Calls through the agent: the release agent, as it would run in production.
            run_checked(cargo().args(["build", "--release", "--package", "mcptrail"]))?;
            let agent = target_dir().join("release").join("mcptrail");
            let args: &[&str] = if quick { &["--quick"] } else { &[] };
            run_tests_bin(
                "bench-mcp",
                true,
                args,
                &[("MCPTRAIL_BIN", agent.as_os_str())],
            )
        }
        Task::Dist => {
            setup::run()?;
            dist::run().map(|_| ())
        }
        Task::Demo => {
            setup::run()?;
            build()?;
            run_tests_bin("demo", false, &[], &[])
        }
    }
}

/// Builds and runs one of the tests crate's programs (they drive the real agent binary);
/// `release` for CPU-bound benchmarks, where a debug build would measure the wrong thing.
fn run_tests_bin(
    name: &str,
    release: bool,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--package", "mcptrail-tests", "--bin", name]);
    if release {
        build.arg("--release");
    }
    run_checked(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    // The program finds its fixtures through MCPTRAIL_TESTS_DIR (mcptrail_tests::tests_dir).
    // CARGO_MANIFEST_DIR, which `cargo run` set for this xtask process, names xtask/, not the
    // tests crate: it is not passed on.
    run_checked(
        Command::new(target_dir().join(profile).join(name))
            .args(args)
            .env_remove("CARGO_MANIFEST_DIR")
            .env("MCPTRAIL_TESTS_DIR", workspace_root().join("tests"))
            .envs(env.iter().copied()),
    )
}

/// The fuzz targets of fuzz/Cargo.toml.
pub const FUZZ_TARGETS: [&str; 4] = [
    "jsonrpc_classify",
    "sse_decode",
    "request_plan",
    "mask_candidates",
];

/// Runs one fuzz target for `seconds`, from its committed seeds (fuzz/seeds/TARGET) and the
/// corpus it has grown (fuzz/corpus/TARGET, not committed).
pub fn fuzz(target: &str, seconds: u64) -> anyhow::Result<()> {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["run", "nightly", "cargo", "fuzz", "run", target])
        .arg(&corpus)
        .arg(root.join("fuzz/seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"));
    if target == "mask_candidates" {
        // Inputs past the prefilter's 16 KiB chunks, where a window can straddle two.
        cmd.arg("-max_len=40000");
    }
    run_checked(&mut cmd)
}

/// The workspace root (xtask lives one folder below it). `cargo run` sets CARGO_MANIFEST_DIR
/// for the run, which is right even when a shared target directory holds an xtask binary
/// compiled in another clone (its compile-time value would name that clone).
fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// The target directory cargo uses for this workspace (honours CARGO_TARGET_DIR).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command, failing with its command line when it fails.
fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its standard output, trimmed; fails with its standard error.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the agent (debug profile, shared with the tests) and returns the binary's path.
fn build() -> anyhow::Result<PathBuf> {
    run_checked(cargo().args(["build", "--package", "mcptrail", "--bin", "mcptrail"]))?;
    debug_agent()
}

/// Builds every target `cargo test --workspace` and the clippy pass build, the agent's
/// binary among them, and returns its path. Cargo unifies the features of build
/// dependencies and proc-macros over the packages a command names, so the agent built alone
/// (`build`) gets a RocksDB build script of its own, and RocksDB's C++ is compiled a second
/// time on a fresh machine (15 minutes on two cores); built with the same packages as the
/// test run, it is compiled once.
fn build_for_tests() -> anyhow::Result<PathBuf> {
    run_checked(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
    ]))?;
    debug_agent()
}

fn debug_agent() -> anyhow::Result<PathBuf> {
    let bin = target_dir().join("debug").join("mcptrail");
    if !bin.exists() {
        bail!("the build finished but {} is missing", bin.display());
    }
    Ok(bin)
}
