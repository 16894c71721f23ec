//! The audit trail: record schema, the RocksDB store with its hash chain, readers, rendering.
//!
//! One writer (the agent) appends; any number of readers (`mcptrail tail`) open the store as
//! RocksDB secondary instances, so reading never blocks the writer.
#![forbid(unsafe_code)]

pub mod cef;
pub mod chain;
pub mod checkpoint;
pub mod format;
pub mod index;
pub mod keys;
pub mod query;
pub mod reader;
pub mod record;
pub mod store;
pub mod verify;
pub mod verify_export;

use std::path::PathBuf;

pub use reader::{Reader, StoredRecord};
pub use record::{Event, Record};
pub use store::{AuditLog, Store, Watermark};

/// Name of the RocksDB folder inside the state directory.
pub const TRAIL_DIR: &str = "trail";
/// Column families: records by sequence number, and the chain hash of each.
pub const CF_RECORDS: &str = "records";
pub const CF_CHAIN: &str = "chain";
/// Signed checkpoints by the sequence number they cover.
pub const CF_CHECKPOINTS: &str = "checkpoints";
/// Small facts about the trail; `anchor` is the signed statement of the last retention cut.
pub const CF_META: &str = "meta";
pub const META_ANCHOR: &[u8] = b"anchor";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "no audit trail at {0}: start the agent with `mcptrail run` first, or point --state-dir (MCPTRAIL_STATE_DIR) at the agent's state directory"
    )]
    NoTrail(PathBuf),
    #[error(
        "cannot open the audit trail at {path}: {source}; check that you are root and that the disk is healthy"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot {what} the state directory {path}: {source}")]
    StateDir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "writing to the audit trail failed: {0}; the record was not stored (check free disk space and the agent's log)"
    )]
    Write(#[source] rocksdb::Error),
    #[error("reading the audit trail failed: {0}")]
    Read(#[source] rocksdb::Error),
    #[error("record {seq} is not valid JSON: {source}; run `mcptrail verify` to check the trail")]
    Corrupt {
        seq: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the trail's chain entry for record {0} is missing or malformed; run `mcptrail verify`"
    )]
    BadChain(u64),
    #[error("signing key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error(
        "the audit trail is closed after a write error and could not be reopened yet: free disk space or fix the state directory (see the agent's log); the agent retries at the next write"
    )]
    Closed,
    #[error("the audit writer could not store the record: {0}")]
    Rejected(String),
    #[error(
        "the audit writer has stopped; the agent is shutting down or its store failed (see the log)"
    )]
    WriterGone,
}

/// Sequence numbers are stored big-endian so that RocksDB's byte order is numeric order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}
