//! `mcptrail tail`: print the newest records, optionally following new ones.
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::audit::{Reader, format};

/// How often `-f` looks for new records; well under the 100 ms a user would notice.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const BATCH: usize = 1000;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// How many of the newest records to print first (0: none, only follow).
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 10)]
    pub lines: u64,

    /// Keep running and print records as the agent writes them.
    #[arg(short, long)]
    pub follow: bool,

    /// One JSON object per line (the stored record plus its chain `hash`).
    #[arg(long)]
    pub json: bool,
}

pub fn run(state_dir: &Path, args: TailArgs) -> anyhow::Result<()> {
    let reader = Reader::open(state_dir)?;
    let last = reader.last_seq()?.unwrap_or(0);
    let mut next = last.saturating_sub(args.lines).saturating_add(1).max(1);
    let stdout = std::io::stdout();
    loop {
        let batch = reader.read_from(next, BATCH)?;
        let mut out = stdout.lock();
        for r in &batch {
            let line = if args.json {
                r.to_json().to_string()
            } else {
                format::line(r)
            };
            if let Err(e) = writeln!(out, "{line}") {
                // The reader went away (a closed pipe): that is a normal end for tail.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e).context("writing to stdout");
            }
            next = r.record.seq + 1;
        }
        if let Err(e) = out.flush() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e).context("writing to stdout");
        }
        drop(out);
        if batch.len() == BATCH {
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        reader.catch_up()?;
    }
}
