//! `mcptrail export`: ship the trail to a SIEM or log pipeline, at least once: as JSON lines or
//! CEF on standard output, or as OTLP/HTTP logs to an OpenTelemetry collector.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::audit::{Reader, StoredRecord, cef};
use crate::export::cursor::Cursor;
use crate::export::feed::{self, Item};

use super::filter::FilterArgs;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line: the stored record with its chain `hash` at the end, and each
    /// signed checkpoint (`"kind":"checkpoint"`) and retention anchor (`"kind":"anchor"`), so
    /// `mcptrail verify --export` can check the lines away from this host.
    Jsonl,
    /// ArcSight Common Event Format, one event per record.
    Cef,
    /// OTLP/HTTP logs (protobuf, gzip) to --endpoint: one log record per record, checkpoint
    /// and anchor, with the OpenTelemetry semantic-convention attributes.
    Otlp,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,

    /// Resume after the last record this named cursor exported, and move it on as records
    /// are written out (at least once: after a crash, the last batch may come again).
    #[arg(long, value_name = "NAME")]
    pub cursor: Option<String>,

    /// Keep running and export new records as the agent writes them.
    #[arg(short, long)]
    pub follow: bool,

    /// With --format otlp: the collector, `http(s)://HOST:PORT` (the path defaults to
    /// /v1/logs).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,

    /// With --format otlp: a request header, `Name: value`. Repeat for several; for a
    /// credential, prefer --headers-file.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// With --format otlp: a file of `Name: value` lines (an auth token), mode 0600.
    #[arg(long, value_name = "FILE")]
    pub headers_file: Option<PathBuf>,

    /// With --format otlp over https: more CA certificates (PEM) besides the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// With --format otlp: at most this many records per request.
    #[arg(long, value_name = "N", default_value_t = crate::export::DEFAULT_BATCH_RECORDS)]
    pub batch_records: usize,

    /// With --format otlp: about this many bytes per request, before compression.
    #[arg(long, value_name = "BYTES", default_value_t = crate::export::DEFAULT_BATCH_BYTES)]
    pub batch_bytes: usize,

    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn run(state_dir: &Path, args: ExportArgs) -> anyhow::Result<()> {
    let cursor = match &args.cursor {
        Some(name) => Cursor::named(state_dir, name)?,
        None => Cursor::none(),
    };
    if args.format == ExportFormat::Otlp {
        return otlp(state_dir, args, cursor);
    }
    if args.endpoint.is_some() {
        bail!("--endpoint is for --format otlp");
    }
    let filter = args.filter.build()?;
    let reader = Reader::open(state_dir)?;
    let mut pos = cursor.load()?;
    let stdout = std::io::stdout();
    let mut with_anchor = true;
    loop {
        let (items, next) = feed::next_batch(
            &reader,
            pos,
            super::out::BATCH,
            usize::MAX,
            with_anchor,
            u64::MAX,
        )?;
        with_anchor = false;
        {
            let mut out = stdout.lock();
            for item in &items {
                let line = match (item, args.format) {
                    (Item::Record { raw, hash, seq }, format) => {
                        let stored = StoredRecord {
                            record: serde_json::from_slice(raw)
                                .with_context(|| format!("record {seq} does not parse"))?,
                            hash: hex::decode(hash)
                                .ok()
                                .and_then(|h| h.try_into().ok())
                                .with_context(|| format!("record {seq} has no chain hash"))?,
                        };
                        if !filter.matches(&stored.record) {
                            continue;
                        }
                        match format {
                            ExportFormat::Cef => cef::line(&stored),
                            _ => item.jsonl(),
                        }
                    }
                    (Item::Checkpoint { .. }, ExportFormat::Jsonl) => item.jsonl(),
                    (Item::Checkpoint { .. }, _) => continue,
                };
                if !super::out::line(&mut out, &line)? {
                    return Ok(());
                }
            }
            if !super::out::flush(&mut out)? {
                return Ok(());
            }
        }
        if next != pos {
            // Only once the lines are out: at least once.
            cursor.store(next)?;
            pos = next;
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        std::thread::sleep(super::out::FOLLOW_POLL);
        reader.catch_up()?;
    }
}

/// The settings of an OTLP exporter, from the command line or the agent's configuration.
pub fn otlp_settings(
    state_dir: &Path,
    endpoint: &str,
    headers: &[String],
    headers_file: Option<&Path>,
    ca_file: Option<&Path>,
    batch_records: usize,
    batch_bytes: usize,
) -> anyhow::Result<crate::export::Settings> {
    let mut all = Vec::new();
    for h in headers {
        all.extend(
            crate::export::parse_headers(h).map_err(|e| anyhow::anyhow!("--header {h:?}: {e}"))?,
        );
    }
    if let Some(f) = headers_file {
        all.extend(crate::export::read_headers(f)?);
    }
    if batch_records == 0 || batch_bytes == 0 {
        bail!("--batch-records and --batch-bytes must be at least 1");
    }
    let public_key = crate::audit::keys::local_public_key(state_dir)
        .map(|k| hex::encode(k.to_bytes()))
        .unwrap_or_default();
    Ok(crate::export::Settings {
        target: crate::export::client::Target::new(
            endpoint,
            all,
            ca_file,
            Duration::from_secs(30),
        )?,
        origin: crate::export::otlp::Origin {
            host: crate::audit::store::hostname(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            public_key,
        },
        batch_records,
        batch_bytes,
        poll: Duration::from_millis(200),
        // Another process's trail: its syncs are not seen from here.
        durable: None,
    })
}

fn otlp(state_dir: &Path, args: ExportArgs, cursor: Cursor) -> anyhow::Result<()> {
    if !args.filter.build()?.is_empty() {
        bail!(
            "filters do not apply to --format otlp: the central copy must hold every record to be checked (`mcptrail verify --export`)"
        );
    }
    let endpoint = args.endpoint.as_deref().context(
        "--format otlp needs --endpoint URL, for example --endpoint http://collector:4318",
    )?;
    let settings = otlp_settings(
        state_dir,
        endpoint,
        &args.headers,
        args.headers_file.as_deref(),
        args.ca_file.as_deref(),
        args.batch_records,
        args.batch_bytes,
    )?;
    let reader = Arc::new(Reader::open(state_dir)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        let pos = crate::export::run(reader, cursor, settings, args.follow, stop).await?;
        eprintln!(
            "exported through record {} (checkpoint {})",
            pos.record, pos.checkpoint
        );
        Ok(())
    })
}
