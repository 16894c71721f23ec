//! `mcptrail status`: what the running agent is doing.
use std::path::Path;

use clap::Args;

use crate::control::{self, Request};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(state_dir: &Path, args: StatusArgs) -> anyhow::Result<()> {
    let s = control::request(state_dir, &Request::Status)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "mcptrail {} running as pid {} since {} ({} s)",
        s["version"].as_str().unwrap_or("?"),
        s["pid"],
        s["started"].as_str().unwrap_or("?"),
        s["uptime_secs"]
    );
    println!("  cgroup:     {}", s["cgroup"].as_str().unwrap_or("?"));
    println!("  listening:  {}", join(&s["listen"]));
    match s["fail_mode"].as_str() {
        Some("closed") => println!(
            "  fail mode:  closed (hooks pinned in {}; while no agent runs, calls are refused){}",
            s["pin_dir"].as_str().unwrap_or("?"),
            if s["adopted_pinned_programs"] == true {
                "; adopted from the previous run"
            } else {
                ""
            }
        ),
        other => println!(
            "  fail mode:  {} (when the agent stops, traffic goes direct)",
            other.unwrap_or("?")
        ),
    }
    println!("  programs:");
    for p in s["programs"].as_array().into_iter().flatten() {
        println!("    {} (id {})", p["name"].as_str().unwrap_or("?"), p["id"]);
    }
    println!("  targets:");
    for t in s["targets"].as_array().into_iter().flatten() {
        println!(
            "    {:<28} {}",
            t["entry"].as_str().unwrap_or("?"),
            t["target"].as_str().unwrap_or("?")
        );
    }
    for section in ["kernel_counters", "proxy_counters"] {
        println!("  {}:", section.replace('_', " "));
        for (k, v) in s[section].as_object().into_iter().flatten() {
            println!("    {k:<22} {v}");
        }
    }
    let bypassing = s["bypassing"].as_array().cloned().unwrap_or_default();
    if bypassing.is_empty() {
        println!("  no established connection to a target bypasses the proxy");
    } else {
        println!(
            "  {} established connection(s) to targets bypass the proxy (opened before it started):",
            bypassing.len()
        );
        for b in &bypassing {
            println!(
                "    {} -> {} (inode {})",
                b["local"].as_str().unwrap_or("?"),
                b["remote"].as_str().unwrap_or("?"),
                b["inode"]
            );
        }
    }
    Ok(())
}

fn join(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
