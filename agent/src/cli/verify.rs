//! `mcptrail verify`: check the trail's chain and signed checkpoints.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::audit::{Reader, keys, verify};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// First record to check (the first record's own prev_hash is then taken as given).
    #[arg(long, value_name = "SEQ", default_value_t = 1)]
    pub from: u64,

    /// Last record to check (default: the newest).
    #[arg(long, value_name = "SEQ")]
    pub to: Option<u64>,

    /// Public key to check checkpoints against (as `mcptrail key export` wrote it). Without
    /// it, the key in the state directory is used, which proves nothing against someone who
    /// could replace both: keep an exported copy elsewhere and pass it here.
    #[arg(long, value_name = "FILE")]
    pub pubkey: Option<PathBuf>,

    /// Check an exported copy instead of the trail here: JSON lines of `export --format
    /// jsonl`, or the OTLP JSON a collector's file exporter wrote (`-` for standard input), in
    /// any order, with duplicates. Needs --pubkey: the copy is checked with no access to the
    /// host.
    #[arg(long, value_name = "FILE", requires = "pubkey")]
    pub export: Option<PathBuf>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn export(path: &Path, key: &ed25519_dalek::VerifyingKey, json: bool) -> anyhow::Result<()> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let report = crate::audit::verify_export::verify_lines(text.lines(), key);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let range = |r: &Option<u64>| r.map_or("-".into(), |s| s.to_string());
        println!(
            "{}: {} records ({}..{}) in {} lines, {} duplicates; {} signed checkpoints verified, newest covers record {}; {} newer records not yet signed",
            if report.ok() { "OK" } else { "BROKEN" },
            report.records,
            range(&report.first),
            range(&report.last),
            report.lines,
            report.duplicates,
            report.checkpoints_verified,
            range(&report.last_checkpoint),
            report.unsigned_tail,
        );
        if let Some(anchor) = report.anchor {
            println!(
                "    records up to {anchor} were removed by retention; a signed anchor vouches for the cut"
            );
        }
        for (from, to) in &report.gaps {
            if from == to {
                println!("  missing: record {from}");
            } else {
                println!("  missing: records {from}..{to}");
            }
        }
        for p in &report.problems {
            println!("  record {}: {}", p.seq, p.what);
        }
    }
    if !report.ok() {
        bail!("the exported copy does not verify");
    }
    Ok(())
}

pub fn run(state_dir: &Path, args: VerifyArgs) -> anyhow::Result<()> {
    let key = match &args.pubkey {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the public key {}", path.display()))?;
            keys::parse_public_key(&text)
                .map_err(|e| anyhow::anyhow!("the public key {}: {e}", path.display()))?
        }
        None => keys::local_public_key(state_dir)?,
    };
    if let Some(path) = &args.export {
        return export(path, &key, args.json);
    }
    let reader = Reader::open(state_dir)?;
    let report = verify::verify(&reader, args.from, args.to.unwrap_or(u64::MAX), &key)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok() {
        println!(
            "OK: {} records ({}..{}), {} signed checkpoints verified, newest covers record {}; {} newer records chained but not yet signed",
            report.records,
            report.first.map_or("-".into(), |s| s.to_string()),
            report.last.map_or("-".into(), |s| s.to_string()),
            report.checkpoints_verified,
            report
                .last_checkpoint
                .map_or("none".into(), |s| s.to_string()),
            report.unsigned_tail,
        );
        if let Some(anchor) = report.anchor {
            println!(
                "    records up to {anchor} were removed by retention; a signed anchor vouches for the cut"
            );
        }
    } else {
        println!(
            "BROKEN: the trail breaks at record {} ({} problems in {} records checked):",
            report.problems[0].seq,
            report.problems.len(),
            report.records
        );
        for p in &report.problems {
            println!("  record {}: {}", p.seq, p.what);
        }
    }
    if !report.ok() {
        bail!("the trail does not verify");
    }
    Ok(())
}
