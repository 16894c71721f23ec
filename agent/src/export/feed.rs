//! What an exporter sends, in order: the trail's records from a position on, as stored (the
//! exact bytes the chain hashes), with the signed checkpoints (and the retention anchor) that
//! cover them. A position is two sequence numbers, the last record and the last checkpoint
//! sent, so a checkpoint signed after its records went out still follows them.
#![forbid(unsafe_code)]

use crate::audit::checkpoint::Checkpoint;
use crate::audit::{AuditError, Reader};

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A record: its sequence number, the stored JSON, its chain hash (hex).
    Record {
        seq: u64,
        raw: Vec<u8>,
        hash: String,
    },
    /// A signed checkpoint, or (`anchor`) the signed anchor retention left.
    Checkpoint {
        checkpoint: Checkpoint,
        anchor: bool,
    },
}

impl Item {
    /// Bytes this item adds to a batch, near enough.
    pub fn size(&self) -> usize {
        match self {
            Item::Record { raw, .. } => raw.len() + 200,
            Item::Checkpoint { .. } => 400,
        }
    }

    /// The item as one JSON line of `export --format jsonl`: a record is its stored JSON with
    /// its `hash` added at the end (so `verify --export` gets the stored bytes back exactly);
    /// a checkpoint or anchor is its signed JSON with `kind`.
    pub fn jsonl(&self) -> String {
        match self {
            Item::Record { raw, hash, .. } => {
                let text = String::from_utf8_lossy(raw);
                let open = text.strip_suffix('}').unwrap_or(&text);
                format!("{open},\"hash\":\"{hash}\"}}")
            }
            Item::Checkpoint { checkpoint, anchor } => {
                let mut v = serde_json::to_value(checkpoint).expect("checkpoints serialise");
                v["kind"] = serde_json::Value::String(
                    if *anchor { "anchor" } else { "checkpoint" }.to_owned(),
                );
                v.to_string()
            }
        }
    }
}

/// Where an export stands: the last record and the last checkpoint it has sent (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub record: u64,
    pub checkpoint: u64,
}

/// The next items after `pos`: at most `max_items` records and about `max_bytes`, none past
/// `through`, then the checkpoints up to the last of them (with the anchor first when
/// `with_anchor`). Returns the items and the position after them.
pub fn next_batch(
    reader: &Reader,
    pos: Position,
    max_items: usize,
    max_bytes: usize,
    with_anchor: bool,
    through: u64,
) -> Result<(Vec<Item>, Position), AuditError> {
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = pos.record;
    if with_anchor && let Some(Ok(anchor)) = reader.anchor()? {
        items.push(Item::Checkpoint {
            checkpoint: anchor,
            anchor: true,
        });
    }
    let mut failed = None;
    reader.raw_range(pos.record + 1, through, |entry| {
        let Some(seq) = entry.seq else { return true };
        let Some(hash) = entry.chain.filter(|h| h.len() == 32) else {
            failed = Some(AuditError::BadChain(seq));
            return false;
        };
        let item = Item::Record {
            seq,
            raw: entry.bytes,
            hash: hex::encode(hash),
        };
        bytes += item.size();
        items.push(item);
        last = seq;
        items.len() < max_items && bytes < max_bytes
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut checkpoint = pos.checkpoint;
    for (seq, parsed) in reader.checkpoints_from(pos.checkpoint + 1)? {
        if seq > last {
            break;
        }
        checkpoint = seq;
        if let Ok(cp) = parsed {
            items.push(Item::Checkpoint {
                checkpoint: cp,
                anchor: false,
            });
        }
    }
    Ok((
        items,
        Position {
            record: last,
            checkpoint,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_line_ends_with_its_hash_and_keeps_the_stored_bytes_before_it() {
        let raw = br#"{"v":1,"seq":3,"kind":"mcp"}"#.to_vec();
        let item = Item::Record {
            seq: 3,
            raw: raw.clone(),
            hash: "ab".repeat(32),
        };
        let line = item.jsonl();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["hash"], "ab".repeat(32));
        assert_eq!(v["seq"], 3);
        let suffix = format!(",\"hash\":\"{}\"}}", "ab".repeat(32));
        assert_eq!(
            format!("{}}}", line.strip_suffix(&suffix).unwrap()).as_bytes(),
            &raw[..]
        );
    }
}
