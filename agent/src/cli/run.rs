//! `mcptrail run`: the agent.
use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{config, service};
use crate::audit::keys;
use crate::audit::record::{
    AgentStart, AgentStop, Event, PolicyChanged, TargetsChanged, now_rfc3339,
};
use crate::audit::store::{CheckpointPolicy, Durability, Retention};
use crate::audit::{AuditError, AuditLog, Store};
use crate::control::{self, Request};
use crate::identity::{self, fingerprint::Fingerprinter};
use crate::intercept::{self, FailMode, Interceptor, Target, bypass};
use crate::policy::Policy;
use crate::policy::approvals::{Approvals, Approver, Verdict};
use crate::policy::live::Live;
use crate::policy::tls::Mode;
use crate::process;
use crate::proxy::{self, OnAuditFailure, Proxy, Stats};

pub const DEFAULT_LISTEN_PORT: u16 = 15811;
/// How often the retention policy is applied.
const RETENTION_CHECK: Duration = Duration::from_secs(60);
/// How often freed heap memory goes back to the kernel (`sys::release_free_heap`).
const HEAP_TRIM: Duration = Duration::from_secs(10);
/// At most this many control-plane records wait for the trail to take writes again; past it
/// the oldest goes, so a trail that stays broken cannot grow the agent's memory.
const PENDING_MAX: usize = 256;
/// How often the waiting control-plane records are tried again.
const PENDING_RETRY: Duration = Duration::from_secs(1);
/// SO_MARK on the agent's upstream sockets: "mctr" in ASCII. Change it with --upstream-mark if
/// the host's policy routing already uses this value.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x6d63_7472;

/// `mcptrail run --help`.
pub const LONG_ABOUT: &str = "Run the agent (as root, or with the capabilities the packaged \
unit grants: CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH). Settings come \
from --config (default /etc/mcptrail/mcptrail.toml when it exists) under the flags given here. It loads the eBPF programs, attaches them \
to the cgroup v2 root (or --cgroup), and from then on every new TCP connection to a target is \
redirected to the local proxy, which attributes it (process, CI job, service token), applies the \
policy (masking, access rules, approvals, brokered credentials), relays it to the gateway and \
records it. Connections opened before the agent started are not redirected (`mcptrail status` \
lists them). SIGHUP re-reads --targets-file and re-resolves host names without touching open \
connections, and reloads --policy (which is also reloaded when the file changes; a file that \
does not load keeps the policy in force). SIGINT or SIGTERM \
stop it; with --fail-mode open (the default) the hooks go with it and traffic goes direct, with \
--fail-mode closed they stay pinned and calls are refused until an agent runs again.";

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Configuration file with any of these settings (see packaging/mcptrail.toml); a flag
    /// given here wins over it. Re-read on SIGHUP. [default: /etc/mcptrail/mcptrail.toml when
    /// it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Gateway to intercept: ADDR:PORT, [V6ADDR]:PORT, *:PORT (any address on the port) or
    /// HOST:PORT (resolved at start and every --resolve-interval). Repeat for several. With
    /// neither --target nor --targets-file, the target is *:8811.
    #[arg(long = "target", value_name = "HOST:PORT", value_parser = parse_target)]
    pub targets: Vec<Target>,

    /// File with more targets, one HOST:PORT per line (`#` comments); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub targets_file: Option<PathBuf>,

    /// Seconds between re-resolutions of host-name targets (0: only at start and on SIGHUP).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub resolve_interval: u64,

    /// Policy file (masking, access rules, identity, brokering); the default is the embedded
    /// policies/default.toml. Reloaded on SIGHUP and when it changes.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Port of the local proxy (127.0.0.1 and [::1]) that redirected connections land on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LISTEN_PORT)]
    pub listen_port: u16,

    /// Attach to this cgroup v2 folder instead of the cgroup2 root, so only processes below it
    /// are intercepted.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// SO_MARK put on the agent's own upstream sockets, which the hooks never redirect
    /// (decimal or 0x hex; 0 turns this loop guard off) [default: 0x6d637472]
    #[arg(
        long,
        value_name = "MARK",
        default_value_t = DEFAULT_UPSTREAM_MARK,
        hide_default_value = true,
        value_parser = parse_mark
    )]
    pub upstream_mark: u32,

    /// Entries in each kernel origin map (LRU): connections being redirected at once.
    #[arg(long, value_name = "N", default_value_t = agent_common::ORIGIN_MAX)]
    pub origin_map_size: u32,

    /// What happens to intercepted traffic while no agent runs: `open` lets it go direct
    /// (unaudited); `closed` keeps the redirect pinned in bpffs, so calls are refused until an
    /// agent runs again, and a restarted agent adopts the pinned programs.
    #[arg(long, value_enum, default_value_t = FailMode::Open)]
    pub fail_mode: FailMode,

    /// Remove records older than this many days (at a signed checkpoint, leaving a signed
    /// anchor so the rest still verifies). Default: keep everything.
    #[arg(long, value_name = "DAYS")]
    pub retain_days: Option<u64>,

    /// Keep the trail under this many MiB on disk, removing the oldest records first (same
    /// anchoring). Default: no limit.
    #[arg(long, value_name = "MIB")]
    pub retain_mb: Option<u64>,

    /// Sign a checkpoint of the trail after this many records...
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub checkpoint_every: u64,

    /// ...or this many seconds after the last one, whichever comes first (and at every stop).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub checkpoint_interval: u64,

    /// When a record counts as written. `sync`: a request's records are on disk (synced WAL,
    /// group-committed) before it is forwarded, and a response's before its last byte reaches
    /// the client. `buffered`: written at once (still before a response's last byte, so a
    /// killed agent loses nothing a client saw) and synced in the background every
    /// --buffered-window-ms; faster, but a host crash can lose that window.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    pub durability: DurabilityArg,

    /// When the trail cannot be written (a full disk, an I/O error): `block` refuses calls with
    /// a clear error so nothing unaudited passes; `pass` lets traffic through and counts and
    /// logs every lost record.
    #[arg(long, value_enum, default_value_t = OnAuditFailure::Block)]
    pub on_audit_failure: OnAuditFailure,

    /// Background sync period for `--durability buffered`, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub buffered_window_ms: u64,

    /// Bytes of each HTTP body kept in the trail; larger bodies are forwarded in full and
    /// recorded as truncated.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub capture_limit: usize,

    /// Threads that serve connections (0: one per core). Fewer threads cost less CPU per call
    /// at light load (a call handed between threads costs a wake-up), but cap the agent's
    /// throughput at that many cores: on a 2-core host, 1 took a third less CPU per call at
    /// 1,000 calls/s of 1 KiB and fell behind at 2,000 calls/s of 16 KiB (see BENCHMARKS.md).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// Seconds to wait for the gateway to accept a relayed connection.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,

    /// Seconds an HTTP/1.1 gateway connection may sit unused before it is closed while its
    /// client's connection stays open (checked every quarter of it, so it goes between ¾ and
    /// 1¼ of this after its last answer); the client's next request opens another. The
    /// client's connection, idle as long (at most 20 s), is parked: kept open with none of
    /// the proxy's HTTP buffers, and no gateway connection, until it sends again (0: neither; gateway connections are kept for as long as
    /// the clients'). An idle keep-alive client then costs the agent less memory, and the
    /// gateway no connection.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub upstream_idle: u64,

    /// How TLS connections to the targets are handled when no `[[tls.gateways]]` entry of
    /// the policy says: `terminate` decrypts them (clients are shown a leaf from the host CA,
    /// see `mcptrail ca`; the gateway's certificate is verified) so that the policy applies and
    /// the trail records every message; `passthrough` relays them untouched.
    #[arg(long, value_enum, default_value_t = Mode::Terminate)]
    pub tls_mode: Mode,

    /// More CA certificates (a PEM bundle) that gateways' certificates may chain to, besides
    /// the system's store. Repeat for several.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,

    /// Seconds that open connections may go on after a stop signal before they are cut.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub shutdown_grace: u64,

    /// Where Prometheus scrapes `/metrics` (ADDR:PORT); an empty value turns the endpoint off.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: MetricsListen,

    /// Ship the trail to this OpenTelemetry collector as OTLP/HTTP logs (`http(s)://HOST:PORT`),
    /// at least once: from the trail after a persisted cursor, retried until taken. The data
    /// plane never waits on it.
    #[arg(long, value_name = "URL")]
    pub export_otlp: Option<String>,

    /// `Name: value` lines the collector wants (an auth token), mode 0600.
    #[arg(long, value_name = "FILE")]
    pub export_otlp_headers_file: Option<PathBuf>,

    /// More CA certificates (PEM) for an https collector, besides the system's.
    #[arg(long, value_name = "FILE")]
    pub export_otlp_ca_file: Option<PathBuf>,

    /// The export's cursor in STATE_DIR/cursors (its lag is in `status` and /metrics).
    #[arg(long, value_name = "NAME", default_value = "otlp")]
    pub export_otlp_cursor: String,

    /// At most this many records per OTLP request.
    #[arg(long, value_name = "N", default_value_t = crate::export::DEFAULT_BATCH_RECORDS)]
    pub export_otlp_batch_records: usize,

    /// About this many bytes per OTLP request, before compression.
    #[arg(long, value_name = "BYTES", default_value_t = crate::export::DEFAULT_BATCH_BYTES)]
    pub export_otlp_batch_bytes: usize,
}

/// The metrics endpoint: loopback only unless the operator says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9811";

/// `--metrics-listen` / `[metrics] listen`: an address, or none (`""`) for no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(MetricsListen(None));
        }
        s.parse().map(|a| MetricsListen(Some(a))).map_err(|_| {
            format!(
                "`{s}` is not ADDR:PORT (for example 127.0.0.1:9811 or [::1]:9811); use \"\" to turn the metrics endpoint off"
            )
        })
    }
}

impl<'de> serde::Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl RunArgs {
    /// Every setting at its default, as `mcptrail run` with no flags has them.
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = super::Cli::command().get_matches_from(["mcptrail", "run"]);
        let run = matches
            .subcommand_matches("run")
            .expect("the run subcommand");
        RunArgs::from_arg_matches(run).expect("the defaults parse")
    }

    /// Checks the settings together, and the files they name, before anything is attached;
    /// returns a summary of what a run would use.
    pub fn check(&self) -> anyhow::Result<Vec<String>> {
        if self.origin_map_size == 0 {
            bail!("origin_map_size (--origin-map-size) must be at least 1");
        }
        if self.checkpoint_every == 0 || self.checkpoint_interval == 0 {
            bail!(
                "checkpoint_every and checkpoint_interval (--checkpoint-every, --checkpoint-interval) must be at least 1"
            );
        }
        if self.durability == DurabilityArg::Buffered && self.buffered_window_ms == 0 {
            bail!("buffered_window_ms (--buffered-window-ms) must be at least 1");
        }
        if self.listen_port == 0 {
            bail!("listen_port (--listen-port) must be a port from 1 to 65535");
        }
        let policy = match &self.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::embedded_default()?,
        };
        let targets = all_targets(self)?;
        if let Some(endpoint) = &self.export_otlp {
            crate::export::client::Target::new(
                endpoint,
                Vec::new(),
                self.export_otlp_ca_file.as_deref(),
                Duration::from_secs(1),
            )?;
            crate::export::cursor::Cursor::named(Path::new("/"), &self.export_otlp_cursor)?;
            if let Some(f) = &self.export_otlp_headers_file {
                crate::export::read_headers(f)?;
            }
        }
        for ca in &self.upstream_ca {
            std::fs::metadata(ca).with_context(|| {
                format!("the upstream CA bundle {} (--upstream-ca)", ca.display())
            })?;
        }
        Ok(vec![
            format!(
                "targets: {}",
                targets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("policy: {} ({})", policy.name, policy.source),
            format!(
                "proxy: 127.0.0.1:{} and [::1]:{}",
                self.listen_port, self.listen_port
            ),
            format!(
                "trail: durability {:?}, on audit failure {:?}, fail mode {}",
                self.durability, self.on_audit_failure, self.fail_mode
            )
            .to_lowercase(),
            format!(
                "metrics: {}",
                self.metrics_listen
                    .0
                    .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"))
            ),
            format!(
                "export: {}",
                self.export_otlp.as_deref().map_or_else(
                    || "off".to_owned(),
                    |e| format!("OTLP to {e} (cursor {})", self.export_otlp_cursor)
                )
            ),
        ])
    }
}

/// Each proxied connection holds two descriptors (the client's and the gateway's), so the
/// usual soft limit of 1,024 would refuse connections past about 500. The soft limit is
/// raised to the hard one (the unit sets `LimitNOFILE=65536`).
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    if limit < MIN_DESCRIPTORS {
        tracing::warn!(
            limit,
            connections = limit / 2,
            "the open-file limit allows only about this many proxied connections at once; raise it (LimitNOFILE= in the unit, or ulimit -n)"
        );
    }
}

/// Below this open-file limit the agent warns at start.
const MIN_DESCRIPTORS: u64 = 8192;

/// The runtime's worker threads for `--workers`: as asked, or one per core.
fn worker_threads(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse()
        .map_err(|e: intercept::InterceptError| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityArg {
    Sync,
    Buffered,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not a 32-bit number (decimal or 0x hex)"))
}

/// Where a run's settings came from: the configuration file (re-read on SIGHUP) under the
/// flags given on the command line.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// The flags as given, before the file filled them in.
    flags: RunArgs,
    explicit: config::Explicit,
    pub file: config::ConfigFile,
    /// The `[log]` section the agent started with (logging is set up once).
    log_in_force: config::Log,
}

impl ConfigSource {
    fn effective(&self) -> RunArgs {
        let mut args = self.flags.clone();
        self.file.apply(&mut args, &self.explicit);
        args
    }

    /// Reads the file again: the new settings, or why the file does not load.
    fn reload(&mut self) -> Result<RunArgs, config::ConfigError> {
        self.file = config::ConfigFile::load(&self.path)?;
        Ok(self.effective())
    }
}

/// A run's settings: the flags over the configuration file over the defaults.
#[derive(Debug, Clone)]
pub struct Configured {
    pub args: RunArgs,
    pub source: Option<ConfigSource>,
    /// Whether the metrics address was chosen (flag or file) rather than left at the default.
    pub metrics_explicit: bool,
}

impl Configured {
    pub fn new(flags: RunArgs, explicit: config::Explicit) -> anyhow::Result<Self> {
        let Some(path) = config::config_path(flags.config.as_deref()) else {
            return Ok(Configured {
                metrics_explicit: explicit.has("metrics_listen"),
                args: flags,
                source: None,
            });
        };
        let file = config::ConfigFile::load(&path)?;
        let metrics_explicit = explicit.has("metrics_listen") || file.metrics.listen.is_some();
        let source = ConfigSource {
            path,
            flags,
            explicit,
            log_in_force: file.log.clone(),
            file,
        };
        Ok(Configured {
            args: source.effective(),
            source: Some(source),
            metrics_explicit,
        })
    }

    /// The `[log]` section, when a file gave one.
    pub fn log(&self) -> config::Log {
        self.source
            .as_ref()
            .map(|s| s.file.log.clone())
            .unwrap_or_default()
    }
}

pub fn run(state_dir: &Path, configured: Configured) -> anyhow::Result<()> {
    let Configured {
        args,
        source,
        metrics_explicit,
    } = configured;
    raise_descriptor_limit();
    if let Some(src) = &source {
        tracing::info!(config = %src.path.display(), "settings read from the configuration file (flags given on the command line win)");
    }
    // Root, or a service granted exactly the capabilities it needs (packaging/mcptrail.service).
    super::privileges::check()?;
    // Read the policy and the targets file before anything is attached, so a bad file stops
    // the start.
    args.check()?;
    let policy = match &args.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::embedded_default()?,
    };
    let mut store = Store::open(state_dir)?;
    store.set_durability(match args.durability {
        DurabilityArg::Sync => Durability::Sync,
        DurabilityArg::Buffered => {
            tracing::warn!(
                window_ms = args.buffered_window_ms,
                "buffered durability: records are synced in the background; a host crash can lose the last window"
            );
            Durability::Buffered(Duration::from_millis(args.buffered_window_ms))
        }
    });
    store.set_checkpoint_policy(CheckpointPolicy {
        every_records: args.checkpoint_every,
        every: Duration::from_secs(args.checkpoint_interval),
    });
    let head = store.head();
    let previous_run = store.previous_run()?;
    if let Some(prev) = previous_run.as_ref().filter(|p| !p.ended_cleanly) {
        tracing::warn!(
            last_seq = prev.last_seq,
            last_record = prev.last_record_time.as_deref().unwrap_or("?"),
            "the previous run did not stop cleanly: traffic between its last record and now went direct, unaudited"
        );
    }
    let (audit, writer) = store.spawn_writer();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(args.workers))
        .enable_all()
        .thread_name("mcptrail")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(
        state_dir,
        Configured {
            args,
            source,
            metrics_explicit,
        },
        policy,
        audit,
        head.seq,
        previous_run,
    ));
    drop(runtime);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the audit trail thread panicked"))?;
    result
}

/// The target when none is given: the port MCP gateways commonly listen on, any address.
pub const DEFAULT_TARGET: &str = "*:8811";

/// The command-line targets plus those of the targets file, or the default when neither is
/// given.
pub(super) fn all_targets(args: &RunArgs) -> anyhow::Result<Vec<Target>> {
    let mut targets = args.targets.clone();
    if targets.is_empty() && args.targets_file.is_none() {
        targets.push(DEFAULT_TARGET.parse()?);
    }
    if let Some(path) = &args.targets_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the targets file {}", path.display()))?;
        let more = intercept::target::parse_targets_file(&text)
            .with_context(|| format!("in {}", path.display()))?;
        targets.extend(more);
    }
    Ok(targets)
}

async fn serve(
    state_dir: &Path,
    configured: Configured,
    policy: Policy,
    audit: AuditLog,
    last_seq: u64,
    previous_run: Option<crate::audit::record::PreviousRun>,
) -> anyhow::Result<()> {
    let Configured {
        args,
        source,
        metrics_explicit,
    } = configured;
    let listen4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, args.listen_port);
    let mut listeners = vec![proxy::bind(SocketAddr::V4(listen4)).await?];
    // IPv6 is optional: a host without ::1 still gets IPv4 interception, and the kernel side
    // is told not to redirect IPv6 destinations it could not deliver.
    match proxy::bind(SocketAddr::new(
        Ipv6Addr::LOCALHOST.into(),
        args.listen_port,
    ))
    .await
    {
        Ok(l) => listeners.push(l),
        Err(e) => {
            tracing::warn!(error = %e, "no IPv6 listener: IPv6 destinations will not be redirected")
        }
    }
    let proxy_v6 = listeners.len() == 2;
    // Before anything is attached: a port in use stops the start with nothing to undo.
    let metrics_listener = match args.metrics_listen.0 {
        None => None,
        Some(addr) => match crate::metrics::endpoint::bind(addr).await {
            Ok(l) => Some(l),
            // An address the operator chose must work; the default one is taken on a host
            // that runs a second agent (or a test suite), and auditing matters more than it.
            Err(e) if !metrics_explicit => {
                tracing::warn!(error = %e, "no metrics endpoint: the default address is taken");
                None
            }
            Err(e) => return Err(e.into()),
        },
    };
    crate::metrics::get().trail_head.set(last_seq as i64);
    let netns_cookie = crate::sys::netns_cookie(&listeners[0])
        .context("reading the proxy socket's network namespace cookie (needs Linux 5.14+)")?;
    let cgroup = intercept::cgroup::resolve(args.cgroup.as_deref())?;
    let targets = all_targets(&args)?;
    let interceptor = Arc::new(Interceptor::start(intercept::Settings {
        targets: targets.clone(),
        proxy: listen4,
        proxy_v6,
        netns_cookie,
        cgroup: cgroup.clone(),
        mark: args.upstream_mark,
        origin_map_size: args.origin_map_size,
        fail_mode: args.fail_mode,
        state_dir: state_dir.to_path_buf(),
    })?);

    let listen: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let target_specs: Vec<String> = targets.iter().map(ToString::to_string).collect();
    audit
        .append(Event::AgentStart(AgentStart {
            time: now_rfc3339(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            targets: target_specs.clone(),
            listen: listen.join(","),
            cgroup: cgroup.display().to_string(),
            policy: policy.reference(),
            previous_run,
        }))
        .await
        .context("recording the agent start")?;

    let identity = &policy.identity;
    let identifier = Arc::new(process::Identifier::new(process::Settings {
        proc_root: PathBuf::from("/proc"),
        cgroup_root: intercept::cgroup::cgroup2_root(),
        parent_depth: identity.parent_depth,
        env_allow: process::env_allowlist(identity.ci_env.as_deref(), &identity.ci_env_extra),
    }));
    let fingerprint_key = keys::load_or_create_fingerprint_key(state_dir)?;
    // The host key also keys the masking `hash` action: equal values correlate on this host.
    let live = Arc::new(Live::new(policy.clone(), fingerprint_key)?);
    let approvals = Arc::new(Approvals::default());
    let verifier = Arc::new(
        identity::Verifier::new(identity, Fingerprinter::new(fingerprint_key))
            .await
            .context("setting up service token verification (the policy's [identity] section)")?,
    );

    let stop_accepting = CancellationToken::new();
    let cut = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(every) = verifier.refresh_interval() {
        let verifier = verifier.clone();
        let stop = cut.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => verifier.refresh_all().await,
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    let tls = Arc::new(
        proxy::tls::TlsContext::new(
            state_dir,
            args.tls_mode,
            &args.upstream_ca,
            &policy.tls.ca_name_constraints,
        )
        .context(
            "setting up TLS termination (the host CA and the roots gateways are checked against)",
        )?,
    );
    let proxy = Proxy::new(
        listeners,
        interceptor.clone(),
        audit.clone(),
        proxy::Settings {
            connect_timeout: Duration::from_secs(args.connect_timeout),
            upstream_idle: (args.upstream_idle > 0)
                .then(|| Duration::from_secs(args.upstream_idle)),
            identifier,
            verifier: verifier.clone(),
            policy: live.clone(),
            approvals: approvals.clone(),
            mark: args.upstream_mark,
            capture_limit: args.capture_limit,
            on_audit_failure: args.on_audit_failure,
            tls: Some(tls),
        },
        tracker.clone(),
    )?;
    let stats = proxy.stats();
    let server = tokio::spawn(proxy.serve(stop_accepting.clone(), cut.clone(), tracker.clone()));

    let status = Arc::new(StatusSource {
        interceptor: interceptor.clone(),
        stats: stats.clone(),
        started: now_rfc3339(),
        started_at: Instant::now(),
        listen: listen.clone(),
        mark: args.upstream_mark,
        fail_mode: args.fail_mode,
        pins: intercept::pins::instance_dir(state_dir),
        cursors: crate::export::cursor::dir(state_dir),
    });
    let metrics_at = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = metrics_listener {
        let status = status.clone();
        let approvals = approvals.clone();
        let cursors = crate::export::cursor::dir(state_dir);
        tokio::spawn(crate::metrics::endpoint::serve(
            listener,
            Arc::new(move || status.scrape(approvals.list().len() as u64, &cursors)),
            stop_accepting.clone(),
        ));
    }
    let exporter = match &args.export_otlp {
        Some(endpoint) => Some(start_export(state_dir, &args, endpoint, audit.watermark())?),
        None => None,
    };
    control::serve(
        state_dir,
        move |req, peer| match req {
            Request::Status => Ok(status.report()),
            Request::Approvals => Ok(serde_json::to_value(approvals.list()).expect("JSON")),
            Request::Approve { id, reason } => decide(&approvals, id, true, reason, peer),
            Request::Deny { id, reason } => decide(&approvals, id, false, reason, peer),
        },
        stop_accepting.clone(),
    )?;

    // Before saying ready: a stop signal that comes right after must find its handler, or
    // the default action would kill the agent without its stop record.
    let signals = Signals::install()?;
    tracing::info!(
        listen = %listen.join(","),
        targets = %target_specs.join(","),
        cgroup = %cgroup.display(),
        policy = %policy.name,
        previous_records = last_seq,
        metrics = %metrics_at.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
        "mcptrail ready: new connections to the targets are redirected, relayed and recorded"
    );
    service::ready();
    let watchdog = service::watchdog(cut.clone());

    let reason = supervise(
        args.clone(),
        source,
        &interceptor,
        &audit,
        &live,
        &stats,
        signals,
    )
    .await?;
    service::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!(
        reason,
        "stopping: detaching the hooks, draining connections"
    );
    interceptor.detach();
    let mut counters = interceptor.counters();
    stop_accepting.cancel();
    let _ = server.await;
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(args.shutdown_grace), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "connections still open after the grace period; cutting them"
        );
        cut.cancel();
        tracker.wait().await;
    }
    counters.extend(stats.snapshot());
    audit
        .append(Event::AgentStop(AgentStop {
            time: now_rfc3339(),
            reason: reason.to_owned(),
            counters,
        }))
        .await
        .context("recording the agent stop")?;
    audit
        .checkpoint()
        .await
        .context("signing the final checkpoint")?;
    if let Some(exporter) = exporter {
        exporter.finish().await;
    }
    Ok(())
}

/// The agent's own OTLP exporter: a task that follows the trail until the stop, then one last
/// pass (bounded in time) so the stop record and the final checkpoint leave with it.
struct Exporter {
    follow: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    again: Box<dyn FnOnce(CancellationToken) -> tokio::task::JoinHandle<()> + Send>,
}

/// How long the last pass at a stop may take.
const EXPORT_FINAL: Duration = Duration::from_secs(10);

impl Exporter {
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.follow.await;
        let last = CancellationToken::new();
        let pass = (self.again)(last.clone());
        if tokio::time::timeout(EXPORT_FINAL, pass).await.is_err() {
            last.cancel();
            tracing::warn!(
                "the collector did not take the last records within {EXPORT_FINAL:?}: they go at the next start (the cursor did not move)"
            );
        }
    }
}

fn start_export(
    state_dir: &Path,
    args: &RunArgs,
    endpoint: &str,
    durable: Arc<crate::audit::Watermark>,
) -> anyhow::Result<Exporter> {
    let mut settings = super::export::otlp_settings(
        state_dir,
        endpoint,
        &[],
        args.export_otlp_headers_file.as_deref(),
        args.export_otlp_ca_file.as_deref(),
        args.export_otlp_batch_records,
        args.export_otlp_batch_bytes,
    )?;
    // The agent's own trail: nothing leaves before it is on disk here.
    settings.durable = Some(durable);
    let cursor = crate::export::cursor::Cursor::named(state_dir, &args.export_otlp_cursor)?;
    let reader = Arc::new(crate::audit::Reader::open(state_dir)?);
    let spawn = {
        let (reader, cursor, settings) = (reader.clone(), cursor.clone(), settings.clone());
        move |follow: bool, stop: CancellationToken| {
            let (reader, cursor, settings) = (reader.clone(), cursor.clone(), settings.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::export::run(reader, cursor, settings, follow, stop).await {
                    tracing::error!(error = %e, "the OTLP export stopped");
                }
            })
        }
    };
    tracing::info!(endpoint, cursor = %args.export_otlp_cursor, "exporting the trail as OTLP logs");
    let stop = CancellationToken::new();
    let follow = spawn(true, stop.clone());
    Ok(Exporter {
        follow,
        stop,
        again: Box::new(move |token| spawn(false, token)),
    })
}

/// An operator's decision on a held call, from the control socket. Only root may decide
/// (the socket is root's alone; this says so if that ever changes).
fn decide(
    approvals: &Approvals,
    id: u64,
    approved: bool,
    reason: Option<String>,
    peer: control::Peer,
) -> Result<serde_json::Value, String> {
    if peer.uid != 0 {
        return Err(format!(
            "only root may decide approvals (you are uid {})",
            peer.uid
        ));
    }
    let approver = Approver {
        uid: peer.uid,
        user: nix::unistd::User::from_uid(peer.uid.into())
            .ok()
            .flatten()
            .map(|u| u.name),
        pid: peer.pid,
    };
    let held = approvals
        .decide(
            id,
            Verdict {
                approved,
                approver,
                reason,
            },
        )
        .map_err(|e| e.to_string())?;
    Ok(serde_json::to_value(held).expect("JSON"))
}

/// How often the policy file's modification time and size are looked at.
const POLICY_WATCH: Duration = Duration::from_secs(1);

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Loads the policy file again and swaps it in whole; a file that does not load leaves the
/// old policy in force. Either way the returned record says what happened; the caller writes
/// it with [`record_control`], so a trail that refuses it does not undo or stop the change.
fn reload_policy(path: Option<&Path>, trigger: &str, live: &Live) -> Event {
    let loaded = match path {
        Some(path) => Policy::load(path),
        None => Policy::embedded_default(),
    };
    let outcome = loaded.and_then(|p| {
        let reference = p.reference();
        if p.identity != live.current().policy.identity {
            tracing::warn!(
                "the policy's [identity] section changed: it takes effect at the next start"
            );
        }
        live.replace(p).map(|()| reference)
    });
    let (policy, error) = match outcome {
        Ok(reference) => {
            tracing::info!(trigger, policy = %reference.name, sha256 = %reference.sha256, "policy reloaded");
            (Some(reference), None)
        }
        Err(e) => {
            tracing::error!(trigger, error = %e, "the policy file does not load; the previous policy stays in force");
            (None, Some(e.to_string()))
        }
    };
    Event::PolicyChanged(PolicyChanged {
        time: now_rfc3339(),
        trigger: trigger.to_owned(),
        in_force: live.current().policy.reference(),
        loaded: policy.is_some(),
        error,
    })
}

/// Control-plane records the trail refused, oldest first, waiting to be written late.
#[derive(Debug)]
struct PendingRecords {
    queue: VecDeque<Event>,
    max: usize,
    /// Records pushed out by the bound: they will never be in the trail.
    dropped: u64,
}

impl PendingRecords {
    fn new(max: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            // With no room at all there would be nothing to retry, and `push` counts a drop
            // only when it has something to drop.
            max: max.max(1),
            dropped: 0,
        }
    }

    /// Queues `event` behind the others; returns the oldest one if the bound pushed it out.
    fn push(&mut self, event: Event) -> Option<Event> {
        let out = if self.queue.len() >= self.max {
            self.dropped += 1;
            self.queue.pop_front()
        } else {
            None
        };
        self.queue.push_back(event);
        out
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn iter(&self) -> impl Iterator<Item = &Event> {
        self.queue.iter()
    }

    /// Writes the waiting records oldest first. A record leaves the queue only once `write`
    /// has stored it; the first failure stops the drain with that record still first, so
    /// the trail keeps the order things happened in.
    async fn drain<E>(
        &mut self,
        mut write: impl AsyncFnMut(&Event) -> Result<u64, E>,
    ) -> Result<(), E> {
        while let Some(event) = self.queue.front() {
            let seq = write(event).await?;
            let event = self.queue.pop_front().expect("the front record is there");
            tracing::warn!(
                seq,
                kind = event.kind(),
                time = event.time(),
                record = %describe(&event),
                still_waiting = self.queue.len(),
                "a control-plane record was recorded late, now that the trail takes writes again; its time is when it happened"
            );
        }
        Ok(())
    }
}

/// Writes the waiting control-plane records, oldest first, through the audit log.
async fn write_pending(audit: &AuditLog, pending: &mut PendingRecords) -> Result<(), AuditError> {
    // The queue keeps the event: the trail takes it by value, so each attempt gets a copy.
    pending
        .drain(async |event: &Event| audit.append(event.clone()).await)
        .await
}

/// A control-plane record in words, for a log line saying it is missing from the trail.
fn describe(event: &Event) -> String {
    match event {
        Event::PolicyChanged(p) => format!(
            "policy_changed ({}, at {}): policy {} (sha256 {}) in force, new file loaded: {}",
            p.trigger, p.time, p.in_force.name, p.in_force.sha256, p.loaded
        ),
        Event::TargetsChanged(t) => format!(
            "targets_changed ({}, at {}): {} added, {} removed, in force: {}",
            t.trigger,
            t.time,
            t.added,
            t.removed,
            t.entries.join(",")
        ),
        other => format!("{} (at {})", other.kind(), other.time()),
    }
}

/// What traffic does while the trail refuses writes, by `--on-audit-failure`.
fn while_unhealthy(mode: OnAuditFailure) -> &'static str {
    match mode {
        OnAuditFailure::Block => "calls are refused until the trail takes writes again",
        OnAuditFailure::Pass => "traffic goes on and every lost record is counted",
    }
}

/// Writes a control-plane record (a policy or targets change). A trail that refuses it does
/// not stop the agent: the change has already taken effect, and with `--on-audit-failure
/// block` the proxy refuses traffic while the trail is unhealthy, so nothing unaudited passes
/// under it; with `pass` traffic flows and the loss is counted. The record is counted in
/// `audit_losses`, logged, and kept to be written late, in order, once the trail recovers.
async fn record_control(
    audit: &AuditLog,
    event: Event,
    pending: &mut PendingRecords,
    stats: &Stats,
    on_failure: OnAuditFailure,
) {
    // Older refused records go first; while they still fail, the new one queues behind them
    // untried, since writing it now would put it before them in the trail.
    let outcome = match write_pending(audit, pending).await {
        Ok(()) => audit.append(event.clone()).await.map(|_seq| ()),
        Err(e) => Err(e),
    };
    let Err(error) = outcome else {
        return;
    };
    // Counted once, here: a retry that fails again is the same missing record.
    stats.audit_losses.fetch_add(1, Ordering::Relaxed);
    let missing = describe(&event);
    let dropped = pending.push(event);
    tracing::error!(
        error = %error,
        %missing,
        waiting = pending.len(),
        on_audit_failure = ?on_failure,
        meanwhile = while_unhealthy(on_failure),
        "could not record a control-plane event: it is missing from the trail until a retry writes it"
    );
    if let Some(old) = dropped {
        tracing::error!(
            missing = %describe(&old),
            dropped_total = pending.dropped(),
            max_waiting = PENDING_MAX,
            "too many control-plane records wait for the trail: the oldest is dropped and will never be in it"
        );
    }
}

/// A last try at the waiting control-plane records, before the stop record.
async fn flush_at_stop(audit: &AuditLog, pending: &mut PendingRecords) {
    if let Err(e) = write_pending(audit, pending).await {
        tracing::error!(
            error = %e,
            count = pending.len(),
            "stopping with control-plane records the trail never took"
        );
        for event in pending.iter() {
            tracing::error!(missing = %describe(event), "never recorded");
        }
    }
}

/// The retention policy the settings ask for.
fn retention(args: &RunArgs) -> Retention {
    Retention {
        max_age: args.retain_days.map(|d| Duration::from_secs(d * 86_400)),
        max_bytes: args.retain_mb.map(|m| m * 1024 * 1024),
    }
}

/// On SIGHUP: reads the configuration file again and takes what can change at run time
/// (`config::LIVE_SETTINGS`) into `args`; says which other settings changed and wait for a
/// restart. A file that no longer loads keeps every setting in force.
fn reread_config(src: &mut ConfigSource, args: &mut RunArgs) {
    let new = match src.reload() {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "the configuration file does not load; every setting stays as it is");
            return;
        }
    };
    let mut restart: Vec<String> = config::restart_needed(args, &new)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if src.file.log != src.log_in_force {
        restart.push("log".to_owned());
    }
    if new.check().is_err() {
        // The targets file or the policy it names does not load: the loops below say why and
        // keep what is in force.
        tracing::warn!("the re-read configuration names a file that does not load");
    }
    args.targets = new.targets;
    args.targets_file = new.targets_file;
    args.resolve_interval = new.resolve_interval;
    args.policy = new.policy;
    args.retain_days = new.retain_days;
    args.retain_mb = new.retain_mb;
    tracing::info!(config = %src.path.display(), applied = config::LIVE_SETTINGS.join(","), "configuration re-read");
    if !restart.is_empty() {
        tracing::warn!(
            settings = restart.join(","),
            "these settings changed in the configuration file and take effect at the next start"
        );
    }
}

/// The signals the agent answers, installed before it says it is ready.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

/// Runs until a stop signal; meanwhile reloads targets on SIGHUP and re-resolves names.
/// After the start, nothing the trail refuses ends it: control-plane records wait in a
/// bounded queue and are written late (see [`record_control`]).
async fn supervise(
    mut args: RunArgs,
    mut source: Option<ConfigSource>,
    interceptor: &Arc<Interceptor>,
    audit: &AuditLog,
    live: &Live,
    stats: &Stats,
    signals: Signals,
) -> anyhow::Result<&'static str> {
    // The policy file is also watched: a change takes effect without a signal.
    let mut watch = tokio::time::interval(POLICY_WATCH);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policy_stamp = args.policy.as_deref().and_then(file_stamp);
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let period = Duration::from_secs(args.resolve_interval.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = Duration::from_secs(args.checkpoint_interval);
    let mut sign = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    sign.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(RETENTION_CHECK);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trim = tokio::time::interval(HEAP_TRIM);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = PendingRecords::new(PENDING_MAX);
    let mut retry = tokio::time::interval(PENDING_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let on_failure = args.on_audit_failure;
    let reason = loop {
        let trigger = tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let old_policy = args.policy.clone();
                if let Some(src) = &mut source {
                    reread_config(src, &mut args);
                    if args.resolve_interval != 0 {
                        let period = Duration::from_secs(args.resolve_interval);
                        tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                if args.policy.is_some() || old_policy.is_some() {
                    policy_stamp = args.policy.as_deref().and_then(file_stamp);
                    // The new policy is in force whether or not the trail takes the record.
                    let event = reload_policy(args.policy.as_deref(), "SIGHUP", live);
                    record_control(audit, event, &mut pending, stats, on_failure).await;
                }
                "SIGHUP"
            }
            _ = watch.tick(), if args.policy.is_some() => {
                let path = args.policy.as_deref().expect("checked");
                let stamp = file_stamp(path);
                if stamp != policy_stamp {
                    policy_stamp = stamp;
                    let event = reload_policy(Some(path), "file-change", live);
                    record_control(audit, event, &mut pending, stats, on_failure).await;
                }
                continue;
            }
            // Each try is also a write that lets the store recover and report healthy again.
            _ = retry.tick(), if !pending.is_empty() => {
                if let Err(e) = write_pending(audit, &mut pending).await {
                    tracing::debug!(
                        error = %e,
                        waiting = pending.len(),
                        "the trail still refuses writes; control-plane records keep waiting"
                    );
                }
                continue;
            }
            _ = trim.tick() => {
                // Off the runtime's threads: with a large heap the walk takes milliseconds.
                let _ = tokio::task::spawn_blocking(crate::sys::release_free_heap).await;
                continue;
            }
            _ = tick.tick(), if args.resolve_interval > 0 => "re-resolve",
            _ = prune.tick(), if retention(&args) != Retention::default() => {
                if let Err(e) = audit.retain(retention(&args)).await {
                    tracing::error!(error = %e, "applying the retention policy failed");
                }
                continue;
            }
            _ = sign.tick() => {
                // An idle trail gets its newest records signed too.
                if let Err(e) = audit.checkpoint().await {
                    tracing::error!(error = %e, "signing a checkpoint failed");
                }
                continue;
            }
        };
        let targets = match all_targets(&args) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    trigger,
                    "keeping the current targets"
                );
                continue;
            }
        };
        let i = interceptor.clone();
        let change = match tokio::task::spawn_blocking(move || i.set_targets(&targets)).await {
            Ok(change) => change,
            Err(e) => {
                // A panic in one target change is no reason to stop auditing the others.
                tracing::error!(
                    error = %e,
                    trigger,
                    "changing the targets panicked; keeping the current targets"
                );
                continue;
            }
        };
        match change {
            Ok(change) => {
                tracing::info!(
                    trigger,
                    added = change.added,
                    removed = change.removed,
                    total = change.total,
                    "targets updated"
                );
                if change.added + change.removed > 0 || trigger == "SIGHUP" {
                    // The kernel map has changed already; a refused record does not undo it.
                    let entries = interceptor.installed().iter().map(|i| i.entry()).collect();
                    let event = Event::TargetsChanged(TargetsChanged {
                        time: now_rfc3339(),
                        trigger: trigger.to_owned(),
                        entries,
                        added: change.added,
                        removed: change.removed,
                    });
                    record_control(audit, event, &mut pending, stats, on_failure).await;
                }
            }
            Err(e) => tracing::error!(error = %e, trigger, "keeping the current targets"),
        }
    };
    flush_at_stop(audit, &mut pending).await;
    Ok(reason)
}

/// How far each export cursor (`STATE_DIR/cursors/NAME`, moved by `mcptrail export
/// --cursor NAME`) is behind the trail's head `head`.
fn export_lag(cursors: &Path, head: u64) -> Vec<crate::metrics::ExportLag> {
    let Ok(entries) = std::fs::read_dir(cursors) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Cursor names have no dot; `NAME.tmp` is one being replaced.
        if name.contains('.') {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(at) = crate::export::cursor::parse(&text).map(|p| p.record) else {
            continue;
        };
        let records = head.saturating_sub(at);
        let seconds = if records == 0 {
            0
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs())
        };
        out.push(crate::metrics::ExportLag {
            cursor: name,
            records,
            seconds,
        });
    }
    out.sort_by(|a, b| a.cursor.cmp(&b.cursor));
    out
}

/// What `mcptrail status` is told.
struct StatusSource {
    interceptor: Arc<Interceptor>,
    stats: Arc<Stats>,
    started: String,
    started_at: Instant,
    listen: Vec<String>,
    mark: u32,
    fail_mode: FailMode,
    pins: PathBuf,
    cursors: PathBuf,
}

impl StatusSource {
    /// Established connections to the targets that did not come through the agent.
    fn bypassing(&self) -> Vec<bypass::TcpSocket> {
        let keys: Vec<_> = self.interceptor.installed().iter().map(|i| i.key).collect();
        bypass::bypassing(
            &bypass::read_tcp_tables(),
            &keys,
            &bypass::own_socket_inodes(),
        )
    }

    /// What Prometheus is told at a scrape, besides what the data plane counts itself.
    fn scrape(&self, approvals_pending: u64, cursors: &Path) -> crate::metrics::Scrape {
        let head = crate::metrics::get().trail_head.get().max(0) as u64;
        crate::metrics::Scrape {
            kernel: self.interceptor.counters().into_iter().collect(),
            proxy: self.stats.snapshot().into_iter().collect(),
            approvals_pending,
            bypassing: self.bypassing().len() as u64,
            targets: self.interceptor.installed().len() as u64,
            export_lag: export_lag(cursors, head),
        }
    }

    fn report(&self) -> serde_json::Value {
        let installed = self.interceptor.installed();
        let bypassing = self.bypassing();
        let stats = self.interceptor.program_stats();
        let programs: Vec<_> = self
            .interceptor
            .programs()
            .iter()
            .map(|p| {
                let (runs, ns) = stats.get(&p.id).copied().unwrap_or_default();
                serde_json::json!({"name": p.name, "id": p.id, "run_count": runs, "run_time_ns": ns})
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "started": self.started,
            "uptime_secs": self.started_at.elapsed().as_secs(),
            "cgroup": self.interceptor.cgroup().display().to_string(),
            "listen": self.listen,
            "fail_mode": self.fail_mode,
            "adopted_pinned_programs": self.interceptor.adopted(),
            "pin_dir": (self.fail_mode == FailMode::Closed).then(|| self.pins.display().to_string()),
            "upstream_mark": format!("{:#x}", self.mark),
            "programs": programs,
            "targets": installed.iter().map(|i| serde_json::json!({
                "target": i.target.to_string(),
                "entry": i.entry(),
            })).collect::<Vec<_>>(),
            "kernel_counters": self.interceptor.counters(),
            "proxy_counters": self.stats.snapshot(),
            // Clients whose TLS handshakes failed (most likely: they do not trust the host CA).
            "tls_client_failures": *self.stats.tls_clients.lock().expect("tls clients lock"),
            // Each export cursor's distance from the trail's head.
            "export_lag": export_lag(
                &self.cursors,
                crate::metrics::get().trail_head.get().max(0) as u64,
            )
            .iter()
            .map(|l| serde_json::json!({"cursor": l.cursor, "records": l.records, "seconds": l.seconds}))
            .collect::<Vec<_>>(),
            "bypassing": bypassing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_decimal_and_hex() {
        assert_eq!(parse_mark("0x6d637472"), Ok(DEFAULT_UPSTREAM_MARK));
        assert_eq!(parse_mark("42"), Ok(42));
        assert!(parse_mark("0xZZ").unwrap_err().contains("32-bit"));
    }

    #[test]
    fn workers_are_as_asked_or_one_per_core() {
        assert_eq!(worker_threads(3), 3);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(worker_threads(0), cores);
    }

    /// A targets change told apart by `added`, with a time of its own.
    fn change(n: usize) -> Event {
        Event::TargetsChanged(TargetsChanged {
            time: format!("2026-01-01T00:00:{n:02}Z"),
            trigger: "SIGHUP".to_owned(),
            entries: vec!["10.0.0.1:8811".to_owned()],
            added: n,
            removed: 0,
        })
    }

    fn number(event: &Event) -> usize {
        match event {
            Event::TargetsChanged(t) => t.added,
            other => panic!("not a test record: {other:?}"),
        }
    }

    #[test]
    fn waiting_records_keep_their_order() {
        let mut pending = PendingRecords::new(3);
        for n in 0..3 {
            assert!(pending.push(change(n)).is_none());
        }
        assert_eq!(pending.iter().map(number).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(pending.dropped(), 0);
    }

    #[test]
    fn past_the_bound_the_oldest_waiting_record_is_dropped_and_counted() {
        let mut pending = PendingRecords::new(3);
        let dropped: Vec<_> = (0..5)
            .filter_map(|n| pending.push(change(n)))
            .map(|e| number(&e))
            .collect();
        assert_eq!(dropped, [0, 1]);
        assert_eq!(pending.dropped(), 2);
        assert_eq!(pending.len(), 3);
        assert_eq!(pending.iter().map(number).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[test]
    fn a_zero_bound_still_keeps_the_newest_record() {
        let mut pending = PendingRecords::new(0);
        assert!(pending.push(change(0)).is_none());
        assert_eq!(pending.push(change(1)).as_ref().map(number), Some(0));
        assert_eq!(pending.iter().map(number).collect::<Vec<_>>(), [1]);
    }

    #[tokio::test]
    async fn a_drain_stops_at_the_first_refusal_and_resumes_in_order() {
        let mut pending = PendingRecords::new(PENDING_MAX);
        for n in 0..4 {
            pending.push(change(n));
        }
        let mut written = Vec::new();
        let mut room = 2;
        let result = pending
            .drain(async |e: &Event| -> Result<u64, &'static str> {
                if room == 0 {
                    return Err("disk full");
                }
                room -= 1;
                written.push(number(e));
                Ok(written.len() as u64)
            })
            .await;
        assert_eq!(result, Err("disk full"));
        assert_eq!(written, [0, 1]);
        // The refused record stays first, so nothing newer can overtake it.
        assert_eq!(pending.iter().map(number).collect::<Vec<_>>(), [2, 3]);

        let mut times = Vec::new();
        let result = pending
            .drain(async |e: &Event| -> Result<u64, &'static str> {
                times.push(e.time().to_owned());
                Ok(0)
            })
            .await;
        assert_eq!(result, Ok(()));
        // Written late, each still says when it happened.
        assert_eq!(times, ["2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"]);
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn an_empty_queue_drains_without_writing() {
        let mut pending = PendingRecords::new(PENDING_MAX);
        let mut calls = 0;
        let result = pending
            .drain(async |_: &Event| -> Result<u64, &'static str> {
                calls += 1;
                Ok(0)
            })
            .await;
        assert_eq!(result, Ok(()));
        assert_eq!(calls, 0);
    }
}
