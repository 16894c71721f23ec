//! `mcptrail export`: ship the trail to a SIEM or log pipeline, at least once.
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::audit::{Reader, cef};

use super::filter::FilterArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line: the stored record plus its chain hash.
    Jsonl,
    /// ArcSight Common Event Format, one event per line.
    Cef,
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

    #[command(flatten)]
    pub filter: FilterArgs,
}

fn cursor_path(state_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("cursor names are letters, digits, `-` and `_`: `{name}` is not one");
    }
    Ok(state_dir.join("cursors").join(name))
}

fn read_cursor(path: &Path) -> anyhow::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().with_context(|| {
            format!(
                "the cursor {} is damaged; remove it to start over",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading the cursor {}", path.display())),
    }
}

/// Replaces the cursor atomically: a crash leaves the old value or the new one.
fn write_cursor(path: &Path, seq: u64) -> anyhow::Result<()> {
    let dir = path.parent().expect("cursor paths have a folder");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    writeln!(f, "{seq}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving the cursor to {}", path.display()))
}

pub fn run(state_dir: &Path, args: ExportArgs) -> anyhow::Result<()> {
    let filter = args.filter.build()?;
    let cursor = args
        .cursor
        .as_deref()
        .map(|name| cursor_path(state_dir, name))
        .transpose()?;
    let reader = Reader::open(state_dir)?;
    let next = match &cursor {
        Some(path) => read_cursor(path)? + 1,
        None => 1,
    };
    super::out::stream(
        &reader,
        next,
        args.follow,
        &filter,
        |r| match args.format {
            ExportFormat::Jsonl => r.to_json().to_string(),
            ExportFormat::Cef => cef::line(r),
        },
        |last| match &cursor {
            Some(path) => write_cursor(path, last),
            None => Ok(()),
        },
    )
}
