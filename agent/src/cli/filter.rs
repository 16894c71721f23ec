//! The record filters `tail` and `export` share.
use clap::Args;

use crate::audit::query::{self, Filter};

#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only records at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records at or before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only records of this process id.
    #[arg(long, value_name = "N")]
    pub pid: Option<u32>,
    /// Only records of processes whose executable matches this glob (`*/python3*`).
    #[arg(long, value_name = "GLOB")]
    pub exe: Option<String>,
    /// Only MCP messages with this method (`tools/call`).
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Only MCP messages naming a tool or prompt that matches this glob.
    #[arg(long, value_name = "GLOB")]
    pub tool: Option<String>,
    /// Only records of this kind (`mcp`, `http`, `connection`, `refused`, `agent_start`, ...).
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// Only requests whose service token states this subject (`sub` claim; the record says
    /// whether the token verified).
    #[arg(long, value_name = "SUB")]
    pub sub: Option<String>,
    /// Only messages with this access decision: `allow`, `deny` or `rate_limited` (refused
    /// calls also have an outcome record with the decision).
    #[arg(long, value_name = "D", value_parser = ["allow", "deny", "rate_limited"])]
    pub decision: Option<String>,
}

impl FilterArgs {
    pub fn build(&self) -> Result<Filter, query::QueryError> {
        Ok(Filter {
            since: self.since.as_deref().map(query::parse_time).transpose()?,
            until: self.until.as_deref().map(query::parse_time).transpose()?,
            pid: self.pid,
            exe: self.exe.as_deref().map(query::parse_glob).transpose()?,
            method: self.method.clone(),
            tool: self.tool.as_deref().map(query::parse_glob).transpose()?,
            kind: self.kind.clone(),
            sub: self.sub.clone(),
            decision: self.decision.clone(),
        })
    }
}
