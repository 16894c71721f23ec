//! mcptrail: audits MCP traffic on Linux hosts.
//!
//! The modules follow the data flow (see ARCHITECTURE.md): `intercept` loads the kernel
//! programs and finds each connection's origin, `process` turns an origin into a process
//! identity, `proxy` relays the traffic, `audit` keeps the hash-chained trail, `policy` loads
//! policy files, and `cli` is the command-line edge.
//!
//! Unsafe code is denied everywhere and allowed only in `sys`, the one FFI edge.
#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod control;
pub mod export;
pub mod identity;
pub mod intercept;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod proxy;
pub mod sys;
