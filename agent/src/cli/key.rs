//! `mcptrail key`: the checkpoint signing key.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::audit::keys;

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print the public key that checkpoints are signed with (64 hex digits), or write it to
    /// a file; keep a copy off the host and pass it to `mcptrail verify --pubkey`.
    Export {
        /// Write the key to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(state_dir: &Path, args: KeyArgs) -> anyhow::Result<()> {
    match args.command {
        KeyCommand::Export { out } => {
            let key = keys::local_public_key(state_dir).context(
                "no signing key yet: it is made when the agent first runs (`mcptrail run`)",
            )?;
            let text = format!("{}\n", hex::encode(key.to_bytes()));
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}
