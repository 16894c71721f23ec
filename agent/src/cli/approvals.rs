//! `mcptrail approvals`, `approve` and `deny`: the calls held for a person, and deciding them.
use std::path::Path;

use clap::Args;

use crate::control::{self, Request};
use crate::policy::approvals::Held;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print them as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The id `mcptrail approvals` shows.
    pub id: u64,
    /// Why; it is recorded, and a denied caller is told.
    #[arg(long)]
    pub reason: Option<String>,
}

pub fn list(state_dir: &Path, args: ListArgs) -> anyhow::Result<()> {
    let v = control::request(state_dir, &Request::Approvals)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let held: Vec<Held> = serde_json::from_value(v)?;
    if held.is_empty() {
        println!("nothing waits for approval");
    }
    for h in held {
        println!(
            "{id}  since {since} (times out after {t} s)  rule {rule}\n    pid {pid} {exe}{sub}{ci} -> {dst}: {what}",
            id = h.id,
            since = h.since,
            t = h.timeout_secs,
            rule = h.rule,
            pid = h.pid,
            exe = h.exe.as_deref().unwrap_or("?"),
            sub = h
                .sub
                .as_deref()
                .map(|s| format!(" sub={s}"))
                .unwrap_or_default(),
            ci =
                h.ci.as_deref()
                    .map(|c| format!(" ci={c}"))
                    .unwrap_or_default(),
            dst = h.destination,
            what = [h.method.as_deref(), h.name.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" "),
        );
        // A batch: every call the one decision covers.
        for c in h.calls.iter().skip(1) {
            println!(
                "    and {} (rule {})",
                [c.method.as_deref(), c.name.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" "),
                c.rule
            );
        }
    }
    Ok(())
}

pub fn decide(state_dir: &Path, args: DecideArgs, approve: bool) -> anyhow::Result<()> {
    let req = if approve {
        Request::Approve {
            id: args.id,
            reason: args.reason,
        }
    } else {
        Request::Deny {
            id: args.id,
            reason: args.reason,
        }
    };
    let v = control::request(state_dir, &req)?;
    let held: Held = serde_json::from_value(v)?;
    println!(
        "{} {}: pid {} {}",
        if approve { "approved" } else { "denied" },
        held.id,
        held.pid,
        held.name.or(held.method).unwrap_or_default()
    );
    Ok(())
}
