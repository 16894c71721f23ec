//! Checking an exported copy of the trail with no access to the host: JSON lines from `export
//! --format jsonl`, or the OTLP JSON an OpenTelemetry collector's file exporter writes, in any
//! order and with duplicates. Pure: lines in, a report out.
//!
//! Every record's hash is recomputed from its stored bytes and its `prev_hash`; consecutive
//! records must link; every checkpoint must carry a valid signature by the trail's key and
//! match the record it covers. The report names the gaps (missing sequence ranges), the
//! records after the last checkpoint, and every record that does not match.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use serde_json::Value;

use super::chain::{self, GENESIS, Hash};
use super::checkpoint::Checkpoint;
pub use super::verify::Problem;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    pub lines: u64,
    pub records: u64,
    pub duplicates: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Missing sequence ranges, inclusive, between the first record (or the anchor) and the
    /// last.
    pub gaps: Vec<(u64, u64)>,
    pub checkpoints_verified: u64,
    pub last_checkpoint: Option<u64>,
    /// Records after the newest verified checkpoint: chained, not yet signed.
    pub unsigned_tail: u64,
    pub anchor: Option<u64>,
    pub problems: Vec<Problem>,
}

impl ExportReport {
    /// Whole: no problem and no gap.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.gaps.is_empty()
    }
}

/// One thing found in the lines.
#[derive(Debug, Clone)]
enum Found {
    Record {
        seq: u64,
        stored: Vec<u8>,
        claimed: Option<String>,
    },
    Checkpoint(Checkpoint, bool),
}

/// A record line of `export --format jsonl` is the stored JSON with `,"hash":"<hex>"}` added:
/// take that off to get the stored bytes back.
fn from_jsonl(line: &str) -> Option<(Vec<u8>, String)> {
    let body = line.trim_end().strip_suffix("\"}")?;
    let at = body.rfind(",\"hash\":\"")?;
    let hash = &body[at + 9..];
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{}}}", &body[..at]).into_bytes(), hash.to_owned()))
}

/// A record or a checkpoint from one JSON text: a log record's body, or a JSON line.
fn classify(text: &[u8], claimed: Option<String>, out: &mut Vec<Found>) -> Result<(), String> {
    let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    match v["kind"].as_str() {
        Some(kind @ ("checkpoint" | "anchor")) if v.get("signature").is_some() => {
            let mut cp = v.clone();
            cp.as_object_mut().expect("an object").remove("kind");
            let cp: Checkpoint =
                serde_json::from_value(cp).map_err(|e| format!("a damaged {kind}: {e}"))?;
            out.push(Found::Checkpoint(cp, kind == "anchor"));
        }
        _ => {
            let seq = v["seq"].as_u64().ok_or("a record without a seq")?;
            out.push(Found::Record {
                seq,
                stored: text.to_vec(),
                claimed,
            });
        }
    }
    Ok(())
}

/// What one line holds: a JSON line of ours, or an OTLP JSON `ExportLogsServiceRequest`.
fn read_line(line: &str, out: &mut Vec<Found>) -> Result<(), String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(());
    }
    if let Some((stored, hash)) = from_jsonl(line) {
        return classify(&stored, Some(hash), out);
    }
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(resources) = v["resourceLogs"].as_array() else {
        // A checkpoint line, or a record without its hash.
        return classify(line.as_bytes(), None, out);
    };
    for rl in resources {
        for sl in rl["scopeLogs"].as_array().into_iter().flatten() {
            for lr in sl["logRecords"].as_array().into_iter().flatten() {
                let body = lr["body"]["stringValue"]
                    .as_str()
                    .ok_or("an OTLP log record without a string body")?;
                let claimed = lr["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "mcptrail.hash")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .map(str::to_owned);
                classify(body.as_bytes(), claimed, out)?;
            }
        }
    }
    Ok(())
}

fn hex_hash(text: &str) -> Option<Hash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// Checks exported `lines` against the trail's public key.
pub fn verify_lines<'a>(lines: impl Iterator<Item = &'a str>, key: &VerifyingKey) -> ExportReport {
    let mut report = ExportReport::default();
    let mut found = Vec::new();
    for (n, line) in lines.enumerate() {
        report.lines += 1;
        if let Err(why) = read_line(line, &mut found) {
            report.problems.push(Problem {
                seq: 0,
                what: format!("line {}: {why}", n + 1),
            });
        }
    }
    let mut records: BTreeMap<u64, (Vec<u8>, Option<String>)> = BTreeMap::new();
    let mut checkpoints: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    let mut anchor: Option<Checkpoint> = None;
    for f in found {
        match f {
            Found::Record {
                seq,
                stored,
                claimed,
            } => match records.get(&seq) {
                Some((bytes, _)) if *bytes == stored => report.duplicates += 1,
                Some(_) => report.problems.push(Problem {
                    seq,
                    what: "two different records with this sequence number".into(),
                }),
                None => {
                    records.insert(seq, (stored, claimed));
                }
            },
            Found::Checkpoint(cp, true) => anchor = Some(cp),
            Found::Checkpoint(cp, false) => {
                checkpoints.insert(cp.seq, cp);
            }
        }
    }
    report.records = records.len() as u64;
    report.first = records.keys().next().copied();
    report.last = records.keys().next_back().copied();

    // The anchor vouches for the cut retention made: the chain may start after it.
    let mut start = 1;
    let mut anchored: Option<Hash> = None;
    if let Some(a) = &anchor {
        match a.verify_anchor(key) {
            Ok(h) => {
                report.anchor = Some(a.seq);
                start = a.seq + 1;
                anchored = Some(h);
            }
            Err(why) => report.problems.push(Problem {
                seq: a.seq,
                what: format!("the retention anchor does not verify: {why}"),
            }),
        }
    }

    // Each record's own hash, and its link to the one before when that one is here.
    let mut computed: BTreeMap<u64, Hash> = BTreeMap::new();
    for (&seq, (stored, claimed)) in &records {
        let v: Value = serde_json::from_slice(stored).unwrap_or(Value::Null);
        let Some(prev) = v["prev_hash"].as_str().and_then(hex_hash) else {
            report.problems.push(Problem {
                seq,
                what: "no prev_hash".into(),
            });
            continue;
        };
        let hash = chain::link(&prev, seq, stored);
        if let Some(c) = claimed
            && hex_hash(c) != Some(hash)
        {
            report.problems.push(Problem {
                seq,
                what: "the record does not match its hash: it was changed".into(),
            });
        }
        let expected_prev = if seq == start {
            Some(anchored.unwrap_or(GENESIS))
        } else {
            computed.get(&(seq - 1)).copied()
        };
        let checkable = seq == start || computed.contains_key(&(seq - 1));
        if checkable && expected_prev != Some(prev) {
            report.problems.push(Problem {
                seq,
                what: format!(
                    "the record does not follow record {}: it, or the one before, was changed or put in another's place",
                    seq - 1
                ),
            });
        }
        computed.insert(seq, hash);
    }

    // Gaps from the first sequence number the copy should hold (1, or just past a verified
    // anchor) to the last it holds.
    let mut expect = start;
    for &seq in records.keys() {
        if seq > expect {
            report.gaps.push((expect, seq - 1));
        }
        expect = expect.max(seq + 1);
    }

    for (&seq, cp) in &checkpoints {
        match cp.verify(key) {
            Err(why) => report.problems.push(Problem {
                seq,
                what: format!("the checkpoint does not verify: {why}"),
            }),
            Ok(h) => match computed.get(&seq) {
                Some(c) if *c == h => {
                    report.checkpoints_verified += 1;
                    report.last_checkpoint = Some(seq);
                }
                Some(_) => report.problems.push(Problem {
                    seq,
                    what: "the signed checkpoint does not match the record at its sequence number"
                        .into(),
                }),
                // The record it signs is not in the copy: the gap report names it.
                None => {
                    report.checkpoints_verified += 1;
                    report.last_checkpoint = Some(seq);
                }
            },
        }
    }
    report.unsigned_tail = match report.last_checkpoint {
        Some(c) => records.range(c + 1..).count() as u64,
        None => records.len() as u64,
    };
    report.problems.sort_by_key(|p| p.seq);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    /// A little trail of `n` records, as `export --format jsonl` writes it, with a checkpoint
    /// over record `signed`.
    fn trail(n: u64, signed: u64, key: &SigningKey) -> Vec<String> {
        let mut prev = GENESIS;
        let mut lines = Vec::new();
        for seq in 1..=n {
            let stored = format!(
                "{{\"v\":1,\"seq\":{seq},\"host\":\"h\",\"prev_hash\":\"{}\",\"kind\":\"agent_stop\",\"n\":{seq}}}",
                hex::encode(prev)
            );
            let hash = chain::link(&prev, seq, stored.as_bytes());
            let item = crate::export::feed::Item::Record {
                seq,
                raw: stored.into_bytes(),
                hash: hex::encode(hash),
            };
            lines.push(item.jsonl());
            if seq == signed {
                let cp = Checkpoint::sign(key, seq, &hash, "2026-12-01T00:00:00Z".into());
                lines.push(
                    crate::export::feed::Item::Checkpoint {
                        checkpoint: cp,
                        anchor: false,
                    }
                    .jsonl(),
                );
            }
            prev = hash;
        }
        lines
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn a_whole_copy_in_any_order_with_duplicates_verifies() {
        let k = key();
        let mut lines = trail(10, 8, &k);
        lines.reverse();
        lines.push(lines[3].clone());
        let r = verify_lines(lines.iter().map(String::as_str), &k.verifying_key());
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.records, 10);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.last_checkpoint, Some(8));
        assert_eq!(r.unsigned_tail, 2);
    }

    #[test]
    fn a_deleted_record_is_a_gap_and_a_changed_one_is_named() {
        let k = key();
        let lines = trail(10, 10, &k);
        let without: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| !l.contains("\"seq\":4,"))
            .collect();
        let r = verify_lines(without.into_iter(), &k.verifying_key());
        assert_eq!(r.gaps, [(4, 4)]);
        assert!(r.problems.is_empty(), "{r:?}");

        let changed: Vec<String> = lines
            .iter()
            .map(|l| {
                l.replace("\"n\":6}", "\"n\":66}")
                    .replace("\"n\":6,", "\"n\":66,")
            })
            .collect();
        let r = verify_lines(changed.iter().map(String::as_str), &k.verifying_key());
        assert!(!r.ok());
        assert!(
            r.problems
                .iter()
                .any(|p| p.seq == 6 && p.what.contains("changed")),
            "{r:?}"
        );
    }

    #[test]
    fn swapped_records_and_a_forged_checkpoint_are_caught() {
        let k = key();
        let lines = trail(6, 6, &k);
        // Record 3's content under sequence number 4 and the other way round.
        let three = lines
            .iter()
            .find(|l| l.contains("\"seq\":3,"))
            .unwrap()
            .clone();
        let four = lines
            .iter()
            .find(|l| l.contains("\"seq\":4,"))
            .unwrap()
            .clone();
        let swapped: Vec<String> = lines
            .iter()
            .map(|l| {
                if *l == three {
                    three.replace("\"seq\":3,", "\"seq\":4,")
                } else if *l == four {
                    four.replace("\"seq\":4,", "\"seq\":3,")
                } else {
                    l.clone()
                }
            })
            .collect();
        let r = verify_lines(swapped.iter().map(String::as_str), &k.verifying_key());
        assert!(r.problems.iter().any(|p| p.seq == 3), "{r:?}");
        assert!(r.problems.iter().any(|p| p.seq == 4), "{r:?}");

        let other = SigningKey::from_bytes(&[9u8; 32]);
        let r = verify_lines(lines.iter().map(String::as_str), &other.verifying_key());
        assert!(
            r.problems
                .iter()
                .any(|p| p.what.contains("checkpoint does not verify"))
        );
    }
}
