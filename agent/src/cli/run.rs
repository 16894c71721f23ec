//! `mcptrail run`: the agent.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Store;
use crate::audit::record::{AgentStart, AgentStop, Event, now_rfc3339};
use crate::intercept::{self, Interceptor, Target};
use crate::policy::Policy;
use crate::proxy::{self, Proxy};

pub const DEFAULT_LISTEN_PORT: u16 = 15811;

#[derive(Debug, Args)]
#[command(
    long_about = "Run the agent (as root). It loads the eBPF programs, attaches them to the cgroup \
v2 root (or --cgroup), and from then on every new TCP connection to a target is redirected to the \
local proxy, which relays it to the gateway and records it. Connections opened before the agent \
started are not redirected. Stop it with SIGINT or SIGTERM: the hooks are detached first, so \
traffic then goes direct (fail open)."
)]
pub struct RunArgs {
    /// Gateway to intercept: ADDR:PORT, *:PORT (any address on the port) or HOST:PORT
    /// (resolved at start). Repeat for several gateways.
    #[arg(
        long = "target",
        value_name = "HOST:PORT",
        default_value = "*:8811",
        value_parser = parse_target
    )]
    pub targets: Vec<Target>,

    /// Policy file; the default is the embedded policies/default.toml.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Port of the local proxy (on 127.0.0.1) that redirected connections land on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LISTEN_PORT)]
    pub listen_port: u16,

    /// Attach to this cgroup v2 folder instead of the cgroup2 root, so only processes below it
    /// are intercepted.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Seconds to wait for the gateway to accept a relayed connection.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,

    /// Seconds that open connections may go on after a stop signal before they are cut.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub shutdown_grace: u64,
}

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse()
        .map_err(|e: intercept::InterceptError| e.to_string())
}

pub fn run(state_dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`mcptrail run` must run as root: it loads eBPF programs and keeps a root-only trail in {}",
            state_dir.display()
        );
    }
    let policy = match &args.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::embedded_default()?,
    };
    let store = Store::open(state_dir)?;
    let head = store.head();
    let (audit, writer) = store.spawn_writer();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mcptrail")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args, policy, audit, head.seq));
    drop(runtime);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the audit writer thread panicked"))?;
    result
}

async fn serve(
    args: RunArgs,
    policy: Policy,
    audit: crate::audit::AuditLog,
    last_seq: u64,
) -> anyhow::Result<()> {
    let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, args.listen_port);
    let listener = proxy::bind(SocketAddr::V4(listen)).await?;
    let netns_cookie = crate::sys::netns_cookie(&listener)
        .context("reading the proxy socket's network namespace cookie (needs Linux 5.14+)")?;
    let cgroup = intercept::cgroup::resolve(args.cgroup.as_deref())?;
    let interceptor = Arc::new(Interceptor::start(intercept::Settings {
        targets: args.targets.clone(),
        proxy: listen,
        netns_cookie,
        cgroup: cgroup.clone(),
    })?);

    let targets: Vec<String> = args.targets.iter().map(ToString::to_string).collect();
    audit
        .append(Event::AgentStart(AgentStart {
            time: now_rfc3339(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            targets: targets.clone(),
            listen: listen.to_string(),
            cgroup: cgroup.display().to_string(),
            policy: policy.reference(),
        }))
        .await
        .context("recording the agent start")?;
    tracing::info!(
        listen = %listen,
        targets = %targets.join(","),
        cgroup = %cgroup.display(),
        policy = %policy.name,
        previous_records = last_seq,
        "mcptrail ready: new connections to the targets are redirected, relayed and recorded"
    );

    let stop_accepting = CancellationToken::new();
    let cut = CancellationToken::new();
    let tracker = TaskTracker::new();
    let proxy = Proxy::new(
        listener,
        interceptor.clone(),
        audit.clone(),
        proxy::Settings {
            connect_timeout: Duration::from_secs(args.connect_timeout),
            proc_root: PathBuf::from("/proc"),
        },
    )?;
    let server = tokio::spawn(proxy.serve(stop_accepting.clone(), cut.clone(), tracker.clone()));

    let reason = wait_for_stop_signal().await?;
    tracing::info!(
        reason,
        "stopping: detaching the hooks, draining connections"
    );
    let counters = interceptor.counters();
    interceptor.detach();
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
    audit
        .append(Event::AgentStop(AgentStop {
            time: now_rfc3339(),
            reason: reason.to_owned(),
            counters,
        }))
        .await
        .context("recording the agent stop")?;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
