//! `mcptrail policy`: check a policy file, and try it on a message without traffic.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::policy::Policy;
use crate::policy::masking::Scope;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file: it parses, its rules compile, and every masking rule masks its
    /// `examples` and leaves its `counterexamples` alone. Errors name the line and column.
    Check { file: PathBuf },
    /// Show what a policy would do to a JSON-RPC message (or a batch) without any traffic:
    /// the message as it would be recorded, and the rules that fired.
    Test {
        file: PathBuf,
        /// The message, as JSON (a file, or - for standard input).
        #[arg(long, value_name = "FILE.json")]
        input: PathBuf,
    },
}

pub fn run(_state_dir: &Path, args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check { file } => {
            let policy = Policy::load(&file)?;
            let masker = policy.masker([0; 32])?;
            let cases = masker.check_examples(&policy.masking)?;
            println!(
                "OK: {} ({}): {} masking rules, {cases} examples and counterexamples hold; {} token issuers",
                policy.name,
                file.display(),
                masker.rule_count(),
                policy.identity.issuers.len(),
            );
            Ok(())
        }
        PolicyCommand::Test { file, input } => {
            let policy = Policy::load(&file)?;
            // A fixed key: hashes here do not match the agent's (its key never leaves it).
            let masker = policy.masker([0; 32])?;
            let text = if input == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&input)
                    .with_context(|| format!("reading {}", input.display()))?
            };
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", input.display()))?;
            let mut messages = match value {
                Value::Array(items) => items,
                one => vec![one],
            };
            let mut fired = std::collections::BTreeSet::new();
            let mut wire = false;
            for m in &mut messages {
                let Value::Object(obj) = m else {
                    anyhow::bail!("not a JSON-RPC message: {m}");
                };
                for (key, scope) in [
                    ("params", Scope::Params),
                    ("result", Scope::Result),
                    ("error", Scope::Error),
                ] {
                    if let Some(v) = obj.get_mut(key) {
                        let masked = masker.mask_value(v, scope);
                        wire |= masked.wire;
                        fired.extend(masked.rules);
                    }
                }
            }
            for m in &messages {
                println!("{}", serde_json::to_string_pretty(m)?);
            }
            if fired.is_empty() {
                println!("masked by: nothing");
            } else {
                println!(
                    "masked by: {}{}",
                    fired.into_iter().collect::<Vec<_>>().join(", "),
                    if wire {
                        " (a wire rule fired: the forwarded message changes too)"
                    } else {
                        " (recorded only; forwarded unchanged)"
                    }
                );
            }
            Ok(())
        }
    }
}
