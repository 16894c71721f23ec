//! The command-line edge: argument parsing, logging set-up, and one file per command.
//! `anyhow` is used here and nowhere else.
#![forbid(unsafe_code)]

mod approvals;
mod ca;
pub mod config;
mod detach;
mod doctor;
pub mod export;
mod filter;
mod key;
mod out;
mod policy;
mod privileges;
pub mod run;
mod service;
mod show;
mod stats;
mod status;
mod tail;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Where the agent keeps its trail and keys unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mcptrail";

#[derive(Debug, Parser)]
#[command(
    name = "mcptrail",
    version,
    about = "Audit MCP traffic on this host: which process, under which token, sent what, and what came back",
    long_about = "mcptrail redirects outbound connections to your MCP gateways through a local \
proxy with an eBPF program on the cgroup connect hooks, ties every connection to the calling \
process and every request to its service token, records every MCP message it carries (JSON-RPC \
over HTTP, JSON or SSE) masked by the policy, relays it (unchanged unless a policy says \
otherwise: a denied call, a wire masking rule, a brokered credential), and appends \
hash-chained records, signed at checkpoints, to a local RocksDB trail. No \
client needs to be reconfigured.\n\nStart the agent with `mcptrail run` (as root), read the trail \
with `mcptrail tail`, check it with `mcptrail verify`."
)]
pub struct Cli {
    /// State directory: the audit trail and keys live here (root only, mode 0700).
    #[arg(
        long,
        global = true,
        env = "MCPTRAIL_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// How log lines are written to stderr: `text`, or `json` (one object per line with the
    /// span fields, for journald and log shippers). For `run`, the configuration file's
    /// `[log] format` applies when this is not given.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<config::LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the redirect, serve the proxy, write the trail (root).
    #[command(long_about = run::LONG_ABOUT)]
    Run(run::RunArgs),
    /// Print the newest records of the trail; with -f, keep printing new ones as they arrive.
    Tail(tail::TailArgs),
    /// Ask the running agent what it does: programs, targets, counters, bypassing connections.
    Status(status::StatusArgs),
    /// Remove the hooks a fail-closed agent left pinned, so traffic goes direct again.
    Detach,
    /// Check the trail: every record against the hash chain, every signed checkpoint against
    /// its signature. Says OK with counts, or exactly where the trail breaks (exit status 1).
    Verify(verify::VerifyArgs),
    /// The checkpoint signing key.
    Key(key::KeyArgs),
    /// The host CA that TLS termination signs clients' leaves with: export, install in the
    /// system store, uninstall, rotate.
    Ca(ca::CaArgs),
    /// Check this host and the running agent: kernel and BPF, cgroup2, bpffs, capabilities,
    /// the state directory, disk, the host CA, the gateways, bypassing connections, failing
    /// TLS clients. One line per check with the fix; exit status 1 when one fails.
    Doctor(doctor::DoctorArgs),
    /// The agent's configuration file: check it as `run` would read it.
    Config(config::ConfigArgs),
    /// Check a policy file, or try it on a message without traffic.
    Policy(policy::PolicyArgs),
    /// List the calls held for approval: who asks for what, since when.
    Approvals(approvals::ListArgs),
    /// Let a held call through (root; recorded with who approved and why).
    Approve(approvals::DecideArgs),
    /// Refuse a held call: its client gets a JSON-RPC error with the reason.
    Deny(approvals::DecideArgs),
    /// Print one record in full.
    Show(show::ShowArgs),
    /// How big the trail is, what it holds, how fast it grows.
    Stats(stats::StatsArgs),
    /// Write the trail out as JSON lines or CEF for a SIEM or log pipeline; with --cursor,
    /// resume where the last export stopped (at least once), with -f keep following.
    Export(export::ExportArgs),
}

pub fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Run(args) => {
            let explicit = matches
                .subcommand_matches("run")
                .map(config::Explicit::from_matches)
                .unwrap_or_default();
            // The configuration file says how to log, so it is read before logging starts.
            match run::Configured::new(args, explicit) {
                Ok(configured) => {
                    let log = configured.log();
                    init_logging(
                        log.level.as_deref().unwrap_or("info"),
                        cli.log_format.or(log.format).unwrap_or_default(),
                    );
                    run::run(&cli.state_dir, configured)
                }
                Err(e) => {
                    init_logging("info", cli.log_format.unwrap_or_default());
                    Err(e)
                }
            }
        }
        command => {
            init_logging("warn", cli.log_format.unwrap_or_default());
            dispatch(&cli.state_dir, command)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcptrail: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(state_dir: &std::path::Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(_) => unreachable!("`run` is started by main"),
        Command::Tail(args) => tail::run(state_dir, args),
        Command::Status(args) => status::run(state_dir, args),
        Command::Detach => detach::run(state_dir),
        Command::Verify(args) => verify::run(state_dir, args),
        Command::Key(args) => key::run(state_dir, args),
        Command::Ca(args) => ca::run(state_dir, args),
        Command::Config(args) => config::run(args),
        Command::Doctor(args) => doctor::run(state_dir, args),
        Command::Policy(args) => policy::run(state_dir, args),
        Command::Approvals(args) => approvals::list(state_dir, args),
        Command::Approve(args) => approvals::decide(state_dir, args, true),
        Command::Deny(args) => approvals::decide(state_dir, args, false),
        Command::Show(args) => show::run(state_dir, args),
        Command::Stats(args) => stats::run(state_dir, args),
        Command::Export(args) => export::run(state_dir, args),
    }
}

/// Logs go to stderr; `MCPTRAIL_LOG` takes a tracing filter such as `debug` or
/// `mcptrail=trace` and wins over the configured level.
fn init_logging(default_level: &str, format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MCPTRAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["mcptrail", "run"]).unwrap();
        assert_eq!(cli.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let targets = run::all_targets(&args).unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].to_string(), "*:8811");
        assert_eq!(args.listen_port, run::DEFAULT_LISTEN_PORT);
    }

    #[test]
    fn repeated_targets_replace_the_default() {
        let cli = Cli::try_parse_from([
            "mcptrail",
            "--state-dir",
            "/tmp/x",
            "run",
            "--target",
            "10.0.0.5:8811",
            "--target",
            "*:9000",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let t: Vec<String> = args.targets.iter().map(|t| t.to_string()).collect();
        assert_eq!(t, ["10.0.0.5:8811", "*:9000"]);
    }

    #[test]
    fn bad_targets_are_rejected_at_parse_time() {
        let err = Cli::try_parse_from(["mcptrail", "run", "--target", "nope"]).unwrap_err();
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
    }
}
