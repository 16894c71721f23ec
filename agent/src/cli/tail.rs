//! `mcptrail tail`: print the newest records, optionally following new ones.
use std::path::Path;

use clap::Args;

use crate::audit::{Reader, StoredRecord, format, query};

use super::filter::FilterArgs;

use super::out::BATCH;

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

    /// Colour the kind of each line: `auto` when standard output is a terminal.
    #[arg(long, value_enum, default_value_t = ColorWhen::Auto)]
    pub color: ColorWhen,

    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

/// How lines are printed.
#[derive(Clone, Copy)]
enum Style {
    Json,
    Plain,
    Colored,
}

pub fn run(state_dir: &Path, args: TailArgs) -> anyhow::Result<()> {
    let style = if args.json {
        Style::Json
    } else {
        match args.color {
            ColorWhen::Always => Style::Colored,
            ColorWhen::Never => Style::Plain,
            ColorWhen::Auto if std::io::IsTerminal::is_terminal(&std::io::stdout()) => {
                Style::Colored
            }
            ColorWhen::Auto => Style::Plain,
        }
    };
    let filter = args.filter.build()?;
    let reader = Reader::open(state_dir)?;
    let last = reader.last_seq()?.unwrap_or(0);
    let stdout = std::io::stdout();
    let next = if filter.is_empty() {
        last.saturating_sub(args.lines).saturating_add(1).max(1)
    } else {
        let mut newest: std::collections::VecDeque<StoredRecord> = Default::default();
        match query::candidates(&reader, &filter)? {
            // The indexes name the candidates: walk them from the newest.
            Some(seqs) => {
                for seq in seqs.into_iter().rev() {
                    if newest.len() as u64 >= args.lines {
                        break;
                    }
                    if let Some(r) = reader.get(seq)?
                        && filter.matches(&r.record)
                    {
                        newest.push_front(r);
                    }
                }
            }
            // No index narrows the filter: scan the trail once, keeping the last N.
            None => {
                let mut from = 1;
                loop {
                    let batch = reader.read_from(from, BATCH)?;
                    for r in batch.iter().filter(|r| filter.matches(&r.record)) {
                        newest.push_back(r.clone());
                        if newest.len() as u64 > args.lines {
                            newest.pop_front();
                        }
                    }
                    match batch.last() {
                        Some(r) if batch.len() == BATCH => from = r.record.seq + 1,
                        _ => break,
                    }
                }
            }
        }
        let mut out = stdout.lock();
        for r in &newest {
            if !super::out::line(&mut out, &render(r, style))? {
                return Ok(());
            }
        }
        last + 1
    };
    super::out::stream(
        &reader,
        next,
        args.follow,
        &filter,
        |r| render(r, style),
        |_| Ok(()),
    )
}

/// One record as a line in the chosen style.
fn render(r: &StoredRecord, style: Style) -> String {
    match style {
        Style::Json => r.to_json().to_string(),
        Style::Plain => format::line(r),
        Style::Colored => format::colored_line(r),
    }
}
