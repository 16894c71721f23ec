//! `mcptrail policy`: check a policy file, and try it on a message without traffic.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::identity::Caller;
use crate::policy::Policy;
use crate::policy::live::Active;
use crate::policy::masking::Scope;
use crate::proxy::http::plan::{Action, BodyView, Head, Plan};
use crate::proxy::http::plan_request;
use crate::proxy::http::records::{Cred, mask_message};

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
            // A fixed key: hashes here do not match the agent's (its key never leaves it).
            let active = Active::without_secrets(policy, [0; 32])?;
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
            let bytes = if input == Path::new("-") {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .context("reading standard input")?;
                b
            } else {
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?
            };
            // The same plan the proxy makes for a POST of this body.
            let body = if bytes.is_empty() {
                BodyView::Empty
            } else {
                BodyView::Read(bytes.into())
            };
            let plan = plan_request(
                &Head {
                    method: "POST",
                    content_type: Some("application/json"),
                    ..Default::default()
                },
                &body,
                &active,
                Caller {
                    process: &process,
                    token: token.as_ref(),
                },
                &destination,
            );
            print_plan(&active, plan);
            Ok(())
        }
    }
}

/// What the proxy would do, message by message, and the messages as they would be recorded.
fn print_plan(active: &Active, plan: Plan) {
    let action = match &plan.action {
        Action::Plain => "forwarded as plain HTTP (not MCP)".to_owned(),
        Action::Forward => "forwarded".to_owned(),
        Action::Hold(held) => format!(
            "held for an operator's approval ({} call{} listed together)",
            held.len(),
            if held.len() == 1 { "" } else { "s" }
        ),
        Action::Refuse(r) => {
            let d = r.decision();
            format!(
                "refused ({}{})",
                d.rule.as_deref().unwrap_or("the policy's default"),
                d.message.map(|m| format!(": {m}")).unwrap_or_default()
            )
        }
    };
    if let Some(why) = &plan.unreadable {
        println!("unreadable: {why}");
    }
    let mut fired = std::collections::BTreeSet::new();
    let mut wire = false;
    for (n, item) in plan.items.into_iter().enumerate() {
        let m = match item.message {
            Ok(m) => m,
            Err(e) => {
                println!("message {}: not JSON-RPC: {e}", n + 1);
                continue;
            }
        };
        if let Some(d) = &item.decision {
            println!(
                "decision for {}{}: {}{}{}",
                m.method.as_deref().unwrap_or("?"),
                m.name
                    .as_deref()
                    .or(m.uri.as_deref())
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default(),
                d.action.as_str(),
                d.rule.as_deref().map_or_else(
                    || " (the policy's default)".to_owned(),
                    |r| format!(" (rule {r})")
                ),
                d.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
        }
        // Wire rules are asked on a copy: does the forwarded message change too?
        for (v, scope) in [
            (&m.params, Scope::Params),
            (&m.result, Scope::Result),
            (&m.error, Scope::Error),
        ] {
            if let Some(v) = v {
                wire |= active.masker.mask_value_wire(&mut v.clone(), scope).wire;
            }
        }
        let (m, rules) = mask_message(
            active,
            Cred {
                token: None,
                raw: None,
            },
            usize::MAX,
            m,
        );
        fired.extend(rules);
        let mut shown = serde_json::Map::new();
        shown.insert("jsonrpc".into(), "2.0".into());
        for (k, v) in [
            ("id", m.id),
            ("method", m.method.map(Value::String)),
            ("params", m.params),
            ("result", m.result),
            ("error", m.error),
        ] {
            if let Some(v) = v {
                shown.insert(k.into(), v);
            }
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(shown)).expect("JSON values serialise")
        );
    }
    println!("the request: {action}");
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
}
