//! `mcptrail stats`: how big the trail is and how fast it grows.
use std::collections::BTreeMap;
use std::path::Path;

use clap::Args;

use crate::audit::{Reader, TRAIL_DIR, query};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

const BATCH: usize = 1000;

pub fn run(state_dir: &Path, args: StatsArgs) -> anyhow::Result<()> {
    let reader = Reader::open(state_dir)?;
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut records, mut first, mut last) = (0u64, None, None);
    let mut from = 1;
    loop {
        let batch = reader.read_from(from, BATCH)?;
        for r in &batch {
            records += 1;
            *by_kind.entry(r.record.event.kind()).or_default() += 1;
            let t = query::parse_time(r.record.event.time()).ok();
            if first.is_none() {
                first = t;
            }
            last = t.or(last);
        }
        match batch.last() {
            Some(r) if batch.len() == BATCH => from = r.record.seq + 1,
            _ => break,
        }
    }
    let bytes = crate::audit::store::dir_size(&state_dir.join(TRAIL_DIR));
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    let rate = if span > 0.0 {
        records as f64 / span
    } else {
        0.0
    };
    let checkpoints = reader.checkpoints()?;
    let report = serde_json::json!({
        "records": records,
        "by_kind": by_kind,
        "first": first.map(|t| t.to_rfc3339()),
        "last": last.map(|t| t.to_rfc3339()),
        "records_per_second": rate,
        "disk_bytes": bytes,
        "checkpoints": checkpoints.len(),
        "last_checkpoint": checkpoints.last().map(|(s, _)| *s),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("records:      {records}");
    for (kind, n) in &by_kind {
        println!("  {kind:<14} {n}");
    }
    if let (Some(a), Some(b)) = (first, last) {
        println!("from:         {}", a.to_rfc3339());
        println!("to:           {}", b.to_rfc3339());
        println!("rate:         {rate:.2} records/s over {span:.0} s");
    }
    println!("on disk:      {:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    println!(
        "checkpoints:  {} (newest covers record {})",
        checkpoints.len(),
        checkpoints
            .last()
            .map_or("-".to_owned(), |(s, _)| s.to_string())
    );
    Ok(())
}
