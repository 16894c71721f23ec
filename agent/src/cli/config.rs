//! The agent's configuration file (`mcptrail run --config FILE`, by default
//! `/etc/mcptrail/mcptrail.toml` when it exists) and `mcptrail config check`.
//!
//! The file holds every `run` setting under the flag's own name (`--retain-days` is
//! `[trail] retain_days`); a flag given on the command line wins over the file. Parsing is pure:
//! text in, settings or an error naming the line and column out.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::run::{DurabilityArg, MetricsListen, RunArgs};
use crate::intercept::{FailMode, Target};
use crate::policy::tls::Mode;
use crate::proxy::OnAuditFailure;

/// Where `mcptrail run` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/mcptrail/mcptrail.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// The file as written. Every key is optional; an unknown key is an error, so a typo cannot
/// silently leave a setting at its default.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub intercept: Intercept,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub trail: Trail,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub export: Export,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub otlp: Option<Otlp>,
}

/// `[export.otlp]`: the agent's own exporter to an OpenTelemetry collector.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    pub endpoint: Option<String>,
    pub headers_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cursor: Option<String>,
    pub batch_records: Option<usize>,
    pub batch_bytes: Option<usize>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intercept {
    pub targets: Option<Vec<Target>>,
    pub targets_file: Option<PathBuf>,
    pub resolve_interval: Option<u64>,
    pub cgroup: Option<PathBuf>,
    pub upstream_mark: Option<u32>,
    pub origin_map_size: Option<u32>,
    pub fail_mode: Option<FailMode>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub policy: Option<PathBuf>,
    pub listen_port: Option<u16>,
    pub connect_timeout: Option<u64>,
    pub upstream_idle: Option<u64>,
    pub capture_limit: Option<usize>,
    pub shutdown_grace: Option<u64>,
    pub workers: Option<usize>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trail {
    pub durability: Option<DurabilityArg>,
    pub buffered_window_ms: Option<u64>,
    pub on_audit_failure: Option<OnAuditFailure>,
    pub retain_days: Option<u64>,
    pub retain_mb: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub mode: Option<Mode>,
    pub upstream_ca: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `ADDR:PORT`, or `""` for no metrics endpoint.
    pub listen: Option<MetricsListen>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: Option<LogFormat>,
    /// A tracing filter (`info`, `debug`, `mcptrail=trace`); `MCPTRAIL_LOG` wins over it.
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line with the span fields, for journald and log shippers.
    Json,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses configuration text; errors name the line and column.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: source_name.to_owned(),
            message: crate::policy::describe_toml_error(text, &e),
        })?;
        if let Some(level) = &file.log.level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            return Err(ConfigError::Invalid {
                path: source_name.to_owned(),
                message: format!(
                    "[log] level {level:?} is not a tracing filter ({e}); write for example \"info\" or \"info,mcptrail=debug\""
                ),
            });
        }
        Ok(file)
    }

    /// Fills in `args` from the file, leaving alone every setting given on the command line
    /// (`explicit` holds those flags' ids).
    pub fn apply(&self, args: &mut RunArgs, explicit: &Explicit) {
        macro_rules! take {
            ($value:expr, $field:ident) => {
                if let Some(v) = &$value
                    && !explicit.has(stringify!($field))
                {
                    args.$field = v.clone();
                }
            };
        }
        macro_rules! take_some {
            ($value:expr, $field:ident) => {
                if let Some(v) = &$value
                    && !explicit.has(stringify!($field))
                {
                    args.$field = Some(v.clone());
                }
            };
        }
        let i = &self.intercept;
        take!(i.targets, targets);
        take_some!(i.targets_file, targets_file);
        take!(i.resolve_interval, resolve_interval);
        take_some!(i.cgroup, cgroup);
        take!(i.upstream_mark, upstream_mark);
        take!(i.origin_map_size, origin_map_size);
        take!(i.fail_mode, fail_mode);
        let p = &self.proxy;
        take_some!(p.policy, policy);
        take!(p.listen_port, listen_port);
        take!(p.connect_timeout, connect_timeout);
        take!(p.upstream_idle, upstream_idle);
        take!(p.capture_limit, capture_limit);
        take!(p.shutdown_grace, shutdown_grace);
        take!(p.workers, workers);
        let t = &self.trail;
        take!(t.durability, durability);
        take!(t.buffered_window_ms, buffered_window_ms);
        take!(t.on_audit_failure, on_audit_failure);
        take_some!(t.retain_days, retain_days);
        take_some!(t.retain_mb, retain_mb);
        take!(t.checkpoint_every, checkpoint_every);
        take!(t.checkpoint_interval, checkpoint_interval);
        take!(self.tls.mode, tls_mode);
        take!(self.tls.upstream_ca, upstream_ca);
        take!(self.metrics.listen, metrics_listen);
        if let Some(o) = &self.export.otlp {
            take_some!(o.endpoint, export_otlp);
            take_some!(o.headers_file, export_otlp_headers_file);
            take_some!(o.ca_file, export_otlp_ca_file);
            take!(o.cursor, export_otlp_cursor);
            take!(o.batch_records, export_otlp_batch_records);
            take!(o.batch_bytes, export_otlp_batch_bytes);
        }
    }
}

/// The `run` flags given on the command line, by clap id (the field's name): the settings the
/// configuration file does not override.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explicit(BTreeSet<String>);

impl Explicit {
    pub fn from_matches(matches: &clap::ArgMatches) -> Self {
        Explicit(
            matches
                .ids()
                .filter(|id| {
                    matches.value_source(id.as_str())
                        == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_owned())
                .collect(),
        )
    }

    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// Which configuration file a run reads: `--config`, else the default path when it exists.
pub fn config_path(given: Option<&Path>) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.to_path_buf()),
        None => Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG)),
    }
}

/// The settings a SIGHUP applies to the running agent; every other one takes effect at the
/// next start.
pub const LIVE_SETTINGS: &[&str] = &[
    "targets",
    "targets_file",
    "resolve_interval",
    "policy",
    "retain_days",
    "retain_mb",
];

/// The settings a SIGHUP does not apply: the list, and the comparison, from one list of
/// fields, so they cannot drift apart.
macro_rules! restart_settings {
    ($($field:ident),* $(,)?) => {
        /// The settings that take effect only at the next start.
        pub const RESTART_SETTINGS: &[&str] = &[$(stringify!($field)),*];

        /// The settings that differ between `old` and `new` and need a restart to take effect.
        pub fn restart_needed(old: &RunArgs, new: &RunArgs) -> Vec<&'static str> {
            let mut out = Vec::new();
            $(if old.$field != new.$field { out.push(stringify!($field)); })*
            out
        }
    };
}

restart_settings!(
    listen_port,
    cgroup,
    upstream_mark,
    origin_map_size,
    fail_mode,
    checkpoint_every,
    checkpoint_interval,
    durability,
    on_audit_failure,
    buffered_window_ms,
    capture_limit,
    connect_timeout,
    upstream_idle,
    tls_mode,
    upstream_ca,
    shutdown_grace,
    workers,
    metrics_listen,
    export_otlp,
    export_otlp_headers_file,
    export_otlp_ca_file,
    export_otlp_cursor,
    export_otlp_batch_records,
    export_otlp_batch_bytes,
);

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file as `mcptrail run` would read it: syntax and unknown keys
    /// (with line and column), values, and the files it names (policy, targets file, CA
    /// bundles). Exit status 1 when anything is wrong.
    Check {
        /// The file [default: /etc/mcptrail/mcptrail.toml]
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file } => {
            check(file.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG)))
        }
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let file = ConfigFile::load(path)?;
    let mut args = RunArgs::defaults();
    args.config = Some(path.to_path_buf());
    file.apply(&mut args, &Explicit::default());
    let summary = args
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    println!("{}: OK", path.display());
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, String> {
        ConfigFile::parse(text, "test.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn the_packaged_config_parses_and_names_every_setting() {
        let text = include_str!("../../../packaging/mcptrail.toml");
        parse(text).unwrap();
        // Every key of the file format appears in the commented example, so it documents them.
        let key_line = regex::Regex::new(r"^# ([a-z_]+ = .*)$").unwrap();
        let uncommented: String = text
            .lines()
            .filter(|l| !l.starts_with('#') || key_line.is_match(l))
            .map(|l| key_line.replace(l, "$1").into_owned())
            .collect::<Vec<_>>()
            .join("\n");
        let all: ConfigFile = toml::from_str(&uncommented).expect(
            "packaging/mcptrail.toml with every `# key = value` line uncommented still parses",
        );
        let i = &all.intercept;
        assert!(i.targets.is_some() && i.targets_file.is_some() && i.resolve_interval.is_some());
        assert!(i.cgroup.is_some() && i.upstream_mark.is_some() && i.origin_map_size.is_some());
        assert!(i.fail_mode.is_some());
        let p = &all.proxy;
        assert!(p.policy.is_some() && p.listen_port.is_some() && p.connect_timeout.is_some());
        assert!(p.capture_limit.is_some() && p.shutdown_grace.is_some());
        assert!(p.workers.is_some() && p.upstream_idle.is_some());
        let t = &all.trail;
        assert!(t.durability.is_some() && t.buffered_window_ms.is_some());
        assert!(t.on_audit_failure.is_some() && t.retain_days.is_some() && t.retain_mb.is_some());
        assert!(t.checkpoint_every.is_some() && t.checkpoint_interval.is_some());
        assert!(all.tls.mode.is_some() && all.tls.upstream_ca.is_some());
        assert!(all.metrics.listen.is_some());
        assert!(all.log.format.is_some() && all.log.level.is_some());
        let o = all.export.otlp.as_ref().expect("[export.otlp]");
        assert!(o.endpoint.is_some() && o.headers_file.is_some() && o.ca_file.is_some());
        assert!(o.cursor.is_some() && o.batch_records.is_some() && o.batch_bytes.is_some());
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_column() {
        let err = parse("[trail]\nretain_days = 30\nretian_mb = 5\n").unwrap_err();
        assert!(err.contains("line 3, column 1"), "{err}");
        assert!(err.contains("retian_mb"), "{err}");
        let err = parse("[trial]\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert!(err.contains("trial"), "{err}");
    }

    #[test]
    fn bad_values_name_their_place() {
        let err = parse("[intercept]\ntargets = [\"10.0.0.5:8811\", \"nope\"]\n").unwrap_err();
        assert!(err.contains("line 2, column 11"), "{err}");
        assert!(err.contains("`nope`"), "{err}");
        assert!(err.contains("HOST:PORT"), "{err}");
        let err = parse("[trail]\ndurability = \"eventually\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("sync"), "{err}");
        let err = parse("[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse("[log]\nlevel = \"debug,=[\"\n").unwrap_err();
        assert!(err.contains("[log] level"), "{err}");
    }

    fn run_args(argv: &[&str]) -> (RunArgs, Explicit) {
        use clap::{CommandFactory, FromArgMatches};
        let mut full = vec!["mcptrail", "run"];
        full.extend_from_slice(argv);
        let matches = crate::cli::Cli::command().get_matches_from(full);
        let sub = matches.subcommand_matches("run").unwrap();
        let args = RunArgs::from_arg_matches(sub).unwrap();
        (args, Explicit::from_matches(sub))
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = parse(
            "[intercept]\ntargets = [\"10.0.0.9:9000\"]\nfail_mode = \"closed\"\n\
             [proxy]\nlisten_port = 16000\n[trail]\nretain_days = 7\ndurability = \"buffered\"\n\
             [metrics]\nlisten = \"\"\n",
        )
        .unwrap();
        let (mut args, explicit) = run_args(&["--listen-port", "17000", "--retain-days", "3"]);
        file.apply(&mut args, &explicit);
        assert_eq!(args.listen_port, 17000);
        assert_eq!(args.retain_days, Some(3));
        assert_eq!(args.fail_mode, FailMode::Closed);
        assert_eq!(args.durability, DurabilityArg::Buffered);
        assert_eq!(args.metrics_listen, MetricsListen(None));
        let t: Vec<String> = args.targets.iter().map(ToString::to_string).collect();
        assert_eq!(t, ["10.0.0.9:9000"]);
        // A default the file leaves alone stays the default.
        assert_eq!(args.checkpoint_every, 1000);

        let (mut args, explicit) = run_args(&["--target", "10.1.1.1:8811"]);
        file.apply(&mut args, &explicit);
        let t: Vec<String> = args.targets.iter().map(ToString::to_string).collect();
        assert_eq!(t, ["10.1.1.1:8811"], "--target replaces the file's targets");
    }

    #[test]
    fn every_run_setting_is_either_live_or_waits_for_a_restart() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let ids: BTreeSet<String> = run
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .filter(|id| !["config", "help", "state_dir", "log_format"].contains(&id.as_str()))
            .collect();
        let live: BTreeSet<String> = LIVE_SETTINGS.iter().map(|s| s.to_string()).collect();
        let restart: BTreeSet<String> = RESTART_SETTINGS.iter().map(|s| s.to_string()).collect();
        assert!(live.is_disjoint(&restart));
        let both: BTreeSet<String> = live.union(&restart).cloned().collect();
        assert_eq!(
            ids, both,
            "a `run` flag that SIGHUP neither applies nor reports"
        );
    }

    #[test]
    fn a_changed_file_says_what_needs_a_restart() {
        let (old, explicit) = run_args(&[]);
        let mut new = RunArgs::defaults();
        parse("[proxy]\nlisten_port = 1\n[trail]\nretain_days = 2\n[intercept]\ntargets = [\"*:1\"]\n")
            .unwrap()
            .apply(&mut new, &explicit);
        assert_eq!(restart_needed(&old, &new), ["listen_port"]);
        for live in LIVE_SETTINGS {
            assert!(!restart_needed(&old, &new).contains(live));
        }
    }
}
