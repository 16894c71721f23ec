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
    /// the access decision for each message, the message as it would be recorded, and the
    /// masking rules that fired.
    Test {
        file: PathBuf,
        /// The message, as JSON (a file, or - for standard input).
        #[arg(long, value_name = "FILE.json")]
        input: PathBuf,
        /// The caller's executable, for access rules.
        #[arg(long, value_name = "PATH")]
        exe: Option<String>,
        /// The caller's uid.
        #[arg(long, value_name = "N", default_value_t = 0)]
        uid: u32,
        /// The subject of a (verified) service token the caller would send.
        #[arg(long, value_name = "SUB")]
        sub: Option<String>,
        /// The gateway, ADDR:PORT.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8811")]
        destination: String,
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
        PolicyCommand::Test {
            file,
            input,
            exe,
            uid,
            sub,
            destination,
        } => {
            let policy = Policy::load(&file)?;
            let access = crate::policy::access::Access::new(&policy.access)?;
            let process = crate::audit::record::Process {
                exe,
                uid,
                ..Default::default()
            };
            let token = sub.map(|s| crate::audit::record::Token {
                sub: Some(s),
                verified: true,
                ..Default::default()
            });
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
                let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
                let method = text("method");
                if method.is_some() {
                    let param = |k: &str| {
                        obj.get("params")
                            .and_then(|p| p.get(k))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    };
                    let (name, uri) = (param("name"), param("uri"));
                    let d = access.decide(&crate::policy::access::Call {
                        caller: crate::identity::Caller {
                            process: &process,
                            token: token.as_ref(),
                        },
                        method: method.as_deref(),
                        name: name.as_deref(),
                        uri: uri.as_deref(),
                        destination: &destination,
                    });
                    println!(
                        "decision for {}{}: {}{}{}",
                        method.as_deref().unwrap_or("?"),
                        name.or(uri).map(|n| format!(" {n}")).unwrap_or_default(),
                        d.action.as_str(),
                        d.rule.as_deref().map_or_else(
                            || " (the policy's default)".to_owned(),
                            |r| format!(" (rule {r})")
                        ),
                        d.message.map(|m| format!(": {m}")).unwrap_or_default()
                    );
                }
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
