//! `mcptrail show SEQ`: one record in full.
use std::path::Path;

use anyhow::bail;
use clap::Args;

use crate::audit::Reader;

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Sequence number of the record (the `#N` that `tail` prints).
    pub seq: u64,
}

pub fn run(state_dir: &Path, args: ShowArgs) -> anyhow::Result<()> {
    let reader = Reader::open(state_dir)?;
    match reader.read_from(args.seq, 1)?.into_iter().next() {
        Some(r) if r.record.seq == args.seq => {
            println!("{}", serde_json::to_string_pretty(&r.to_json())?);
            Ok(())
        }
        _ => bail!(
            "no record {} in the trail (it holds records 1 to {})",
            args.seq,
            reader.last_seq()?.unwrap_or(0)
        ),
    }
}
