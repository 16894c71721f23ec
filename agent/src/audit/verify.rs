//! Verifying the trail: every record against the chain, every checkpoint against its
//! signature and against the chain. Reports exactly where the trail breaks.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::AuditError;
use super::chain::{self, GENESIS, Hash};
use super::reader::Reader;
use super::record::Record;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The sequence number where the trail breaks.
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub records: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub checkpoints_verified: u64,
    /// The newest checkpoint that verified.
    pub last_checkpoint: Option<u64>,
    /// Records after the newest checkpoint: chained but not yet signed.
    pub unsigned_tail: u64,
    /// Retention removed every record up to this one; a signed anchor vouches for the cut.
    pub anchor: Option<u64>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks records `from..=to`. From 1, the first `prev_hash` must be the genesis hash; from
/// later on, the first record's own `prev_hash` is taken as given.
pub fn verify(
    reader: &Reader,
    from: u64,
    to: u64,
    key: &VerifyingKey,
) -> Result<Report, AuditError> {
    let from = from.max(1);
    let checkpoints = reader.checkpoints()?;
    let wanted: BTreeSet<u64> = checkpoints
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| (from..=to).contains(s))
        .collect();
    let mut report = Report::default();
    let mut computed_at: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut expected = from;
    let mut prev: Option<Hash> = (from == 1).then_some(GENESIS);
    // A retention cut: the trail now starts after the anchor, chained to its signed hash.
    match reader.anchor()? {
        None => {}
        Some(Err(e)) => {
            report_problem(
                &mut report.problems,
                from,
                format!("the retention anchor does not parse ({e})"),
            );
        }
        Some(Ok(anchor)) => match anchor.verify_anchor(key) {
            Err(why) => report_problem(
                &mut report.problems,
                anchor.seq,
                format!(
                    "the retention anchor at {} is not genuine: {why}",
                    anchor.seq
                ),
            ),
            Ok(hash) => {
                report.anchor = Some(anchor.seq);
                if expected <= anchor.seq + 1 {
                    expected = anchor.seq + 1;
                    prev = Some(hash);
                }
            }
        },
    }
    let mut problem = |seq: u64, what: String| report_problem(&mut report.problems, seq, what);

    let mut walk_err = None;
    reader.raw_range(expected, to, |entry| {
        let Some(seq) = entry.seq else {
            problem(expected, format!("a record is stored under a key that is not a sequence number ({})", hex::encode(&entry.key)));
            return true;
        };
        seen.insert(seq);
        if seq > expected {
            let what = if seq == expected + 1 {
                format!("record {expected} is missing (deleted)")
            } else {
                format!("records {expected} to {} are missing (deleted)", seq - 1)
            };
            problem(expected, what);
            // The record after a gap cannot chain to what is not there.
            prev = None;
        }
        expected = seq + 1;
        let record: Option<Record> = match serde_json::from_slice(&entry.bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                problem(seq, format!("record {seq} is not a valid record ({e})"));
                None
            }
        };
        let declared_prev: Option<Hash> = record
            .as_ref()
            .and_then(|r| hex::decode(&r.prev_hash).ok())
            .and_then(|h| h.try_into().ok());
        if let Some(r) = &record {
            if r.seq != seq {
                problem(seq, format!("the record stored as {seq} says it is record {} (moved, swapped or inserted)", r.seq));
            }
            if let Some(p) = prev
                && declared_prev != Some(p)
            {
                problem(seq, format!("record {seq} does not name record {}'s hash as its predecessor (a record before it was changed, removed or reordered)", seq - 1));
            }
        }
        let base = prev.or(declared_prev).unwrap_or(GENESIS);
        let hash = chain::link(&base, seq, &entry.bytes);
        match entry.chain.as_deref() {
            None => problem(seq, format!("record {seq} has no chain hash stored")),
            Some(stored) if stored != hash => problem(seq, format!("record {seq} was changed after it was written (its bytes do not match its chain hash)")),
            Some(_) => {}
        }
        prev = Some(hash);
        if wanted.contains(&seq) {
            computed_at.insert(seq, hash);
        }
        report.records += 1;
        report.first.get_or_insert(seq);
        report.last = Some(seq);
        true
    }).unwrap_or_else(|e| walk_err = Some(e));
    if let Some(e) = walk_err {
        return Err(e);
    }

    for seq in reader.chain_seqs(from, to)? {
        if !seen.contains(&seq) {
            report_problem(
                &mut report.problems,
                seq,
                format!(
                    "a chain hash is stored for record {seq}, but the record is gone (deleted)"
                ),
            );
        }
    }

    let last = report.last.unwrap_or(0);
    for (seq, cp) in checkpoints {
        if !(from..=to).contains(&seq) {
            continue;
        }
        let cp = match cp {
            Ok(cp) => cp,
            Err(e) => {
                report_problem(
                    &mut report.problems,
                    seq,
                    format!("the checkpoint at {seq} does not parse ({e})"),
                );
                continue;
            }
        };
        if cp.seq != seq {
            report_problem(
                &mut report.problems,
                seq,
                format!(
                    "the checkpoint stored at {seq} says it covers {} (moved or forged)",
                    cp.seq
                ),
            );
            continue;
        }
        let signed = match cp.verify(key) {
            Ok(h) => h,
            Err(why) => {
                report_problem(
                    &mut report.problems,
                    seq,
                    format!("the checkpoint at {seq} is not genuine: {why}"),
                );
                continue;
            }
        };
        if seq > last {
            report_problem(
                &mut report.problems,
                last + 1,
                format!(
                    "a signed checkpoint covers record {seq}, but the trail ends at {last}: records {} to {seq} were removed (truncated)",
                    last + 1
                ),
            );
            continue;
        }
        match computed_at.get(&seq) {
            Some(h) if *h == signed => {
                report.checkpoints_verified += 1;
                report.last_checkpoint = Some(seq);
            }
            Some(_) => report_problem(
                &mut report.problems,
                seq,
                format!(
                    "the checkpoint at {seq} signed another chain: records up to {seq} were changed, inserted or removed since"
                ),
            ),
            None => {} // the record itself is missing, already reported
        }
    }
    report.unsigned_tail =
        last.saturating_sub(report.last_checkpoint.unwrap_or(from.saturating_sub(1)));
    report.problems.sort_by_key(|p| p.seq);
    Ok(report)
}

fn report_problem(problems: &mut Vec<Problem>, seq: u64, what: String) {
    problems.push(Problem { seq, what });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::Checkpoint;
    use crate::audit::record::{AgentStop, Event, now_rfc3339};
    use crate::audit::store::{CheckpointPolicy, Store};
    use crate::audit::{CF_CHAIN, CF_CHECKPOINTS, CF_RECORDS, TRAIL_DIR, seq_key};
    use rocksdb::{DB, Options};
    use std::path::Path;
    use std::time::Duration;

    fn stop(i: u64) -> Event {
        Event::AgentStop(AgentStop {
            time: now_rfc3339(),
            reason: format!("r{i}"),
            counters: Default::default(),
        })
    }

    /// A trail of 20 records with checkpoints at 10 and 20.
    fn trail() -> (tempfile::TempDir, VerifyingKey) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_checkpoint_policy(CheckpointPolicy {
            every_records: 10,
            every: Duration::from_secs(3600),
        });
        for i in 0..20 {
            store.append_group([stop(i)]).unwrap();
        }
        let key = store.public_key();
        (dir, key)
    }

    /// The trail opened straight through RocksDB, every column family, as an attacker would.
    fn raw(dir: &Path) -> DB {
        let path = dir.join(TRAIL_DIR);
        let cfs = DB::list_cf(&Options::default(), &path).unwrap();
        DB::open_cf(&Options::default(), &path, cfs).unwrap()
    }

    fn check(dir: &Path, key: &VerifyingKey) -> Report {
        let reader = Reader::open(dir).unwrap();
        verify(&reader, 1, u64::MAX, key).unwrap()
    }

    fn get(db: &DB, cf: &str, seq: u64) -> Vec<u8> {
        db.get_cf(&db.cf_handle(cf).unwrap(), seq_key(seq))
            .unwrap()
            .unwrap()
    }

    fn put(db: &DB, cf: &str, seq: u64, v: &[u8]) {
        db.put_cf(&db.cf_handle(cf).unwrap(), seq_key(seq), v)
            .unwrap();
    }

    fn del(db: &DB, cf: &str, seq: u64) {
        db.delete_cf(&db.cf_handle(cf).unwrap(), seq_key(seq))
            .unwrap();
    }

    fn first_problem(r: &Report) -> &Problem {
        r.problems
            .first()
            .unwrap_or_else(|| panic!("no problem found: {r:?}"))
    }

    #[test]
    fn an_untouched_trail_verifies() {
        let (dir, key) = trail();
        let r = check(dir.path(), &key);
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.records, r.checkpoints_verified), (20, 2));
        assert_eq!(r.last_checkpoint, Some(20));
        assert_eq!(r.unsigned_tail, 0);
    }

    #[test]
    fn a_modified_record_is_found() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            let bytes = String::from_utf8(get(&db, CF_RECORDS, 7)).unwrap();
            put(&db, CF_RECORDS, 7, bytes.replace("r6", "r9").as_bytes());
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 7);
        assert!(p.what.contains("changed after it was written"), "{p:?}");
    }

    #[test]
    fn a_deleted_record_is_found() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            del(&db, CF_RECORDS, 5);
            del(&db, CF_CHAIN, 5);
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 5);
        assert!(p.what.contains("record 5 is missing"), "{p:?}");
    }

    #[test]
    fn swapped_records_are_found() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            let (a, b) = (get(&db, CF_RECORDS, 3), get(&db, CF_RECORDS, 4));
            let (ca, cb) = (get(&db, CF_CHAIN, 3), get(&db, CF_CHAIN, 4));
            put(&db, CF_RECORDS, 3, &b);
            put(&db, CF_RECORDS, 4, &a);
            put(&db, CF_CHAIN, 3, &cb);
            put(&db, CF_CHAIN, 4, &ca);
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 3);
        assert!(p.what.contains("says it is record 4"), "{p:?}");
    }

    /// The careful forger: inserts a record and rewrites everything after it so that the
    /// chain is consistent again. Only the signed checkpoint can tell.
    #[test]
    fn an_inserted_record_with_a_recomputed_chain_is_caught_by_the_checkpoint() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            let mut records: Vec<Record> = (1..=20)
                .map(|s| serde_json::from_slice(&get(&db, CF_RECORDS, s)).unwrap())
                .collect();
            let mut forged = records[5].clone();
            forged.event = stop(99);
            records.insert(5, forged);
            let mut prev = GENESIS;
            for (i, r) in records.iter_mut().enumerate() {
                let seq = i as u64 + 1;
                r.seq = seq;
                r.prev_hash = hex::encode(prev);
                let bytes = serde_json::to_vec(r).unwrap();
                prev = chain::link(&prev, seq, &bytes);
                put(&db, CF_RECORDS, seq, &bytes);
                put(&db, CF_CHAIN, seq, &prev);
            }
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 10, "{r:?}");
        assert!(p.what.contains("signed another chain"), "{p:?}");
    }

    #[test]
    fn a_truncated_tail_is_found() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            for s in 15..=20 {
                del(&db, CF_RECORDS, s);
                del(&db, CF_CHAIN, s);
            }
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 15);
        assert!(p.what.contains("truncated"), "{p:?}");
    }

    #[test]
    fn a_forged_checkpoint_is_found() {
        let (dir, key) = trail();
        {
            let db = raw(dir.path());
            // Signed by another key over the real hash...
            let hash: Hash = get(&db, CF_CHAIN, 10).try_into().unwrap();
            let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
            let mut cp = Checkpoint::sign(&other, 10, &hash, now_rfc3339());
            // ...and passed off as ours.
            cp.public_key = hex::encode(key.to_bytes());
            put(&db, CF_CHECKPOINTS, 10, &serde_json::to_vec(&cp).unwrap());
        }
        let r = check(dir.path(), &key);
        let p = first_problem(&r);
        assert_eq!(p.seq, 10);
        assert!(p.what.contains("not genuine"), "{p:?}");
    }

    #[test]
    fn verifying_against_another_key_fails() {
        let (dir, _) = trail();
        let other = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let r = check(dir.path(), &other);
        assert!(first_problem(&r).what.contains("signed by key"), "{r:?}");
    }

    #[test]
    fn retention_leaves_a_trail_that_still_verifies_and_a_cut_that_cannot_be_faked() {
        let (dir, key) = trail();
        {
            let mut store = Store::open(dir.path()).unwrap();
            // Keep nothing older than an hour: everything is younger, so nothing goes...
            let young = crate::audit::store::Retention {
                max_age: Some(Duration::from_secs(3600)),
                max_bytes: None,
            };
            assert_eq!(store.retain(&young).unwrap(), 0);
            // ...and over a size of 1 byte the oldest quarter (up to 5) would go, but a cut
            // needs a checkpoint before it...
            let small = crate::audit::store::Retention {
                max_age: None,
                max_bytes: Some(1),
            };
            assert_eq!(
                store.retain(&small).unwrap(),
                0,
                "no checkpoint before record 6"
            );
            store.set_checkpoint_policy(CheckpointPolicy {
                every_records: 5,
                every: Duration::from_secs(3600),
            });
            for i in 0..10 {
                store.append_group([stop(100 + i)]).unwrap();
            }
            // 30 records, checkpoints at 10, 20, 25, 30: the oldest quarter ends before 8,
            // and there is no checkpoint to cut at before it.
            assert_eq!(store.retain(&small).unwrap(), 0);
            let old = crate::audit::store::Retention {
                max_age: Some(Duration::from_secs(0)),
                max_bytes: None,
            };
            // An hour from now everything is older than 0 s: cut at the newest checkpoint, 30.
            let later = chrono::Utc::now().timestamp() + 3600;
            assert_eq!(store.retain_at(&old, later).unwrap(), 30);
            for i in 0..3 {
                store.append_group([stop(200 + i)]).unwrap();
            }
            store.checkpoint_now().unwrap();
        }
        let r = check(dir.path(), &key);
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.anchor, r.first, r.records), (Some(30), Some(31), 3));
        // The removed records' index entries went with them.
        let reader = Reader::open(dir.path()).unwrap();
        let timed = reader
            .index_seqs(crate::audit::index::CF_IDX_TIME, &[0; 8], &[0xff; 8])
            .unwrap();
        assert_eq!(timed, [31, 32, 33]);

        // Cutting more than the anchor says is a gap...
        {
            let db = raw(dir.path());
            del(&db, CF_RECORDS, 31);
            del(&db, CF_CHAIN, 31);
        }
        assert!(
            first_problem(&check(dir.path(), &key))
                .what
                .contains("record 31 is missing")
        );
        // ...and an anchor re-signed by anyone else does not verify.
        {
            let db = raw(dir.path());
            let other = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
            let mut forged = Checkpoint::sign_anchor(&other, 31, &[0; 32], now_rfc3339());
            forged.public_key = hex::encode(key.to_bytes());
            db.put_cf(
                &db.cf_handle(crate::audit::CF_META).unwrap(),
                crate::audit::META_ANCHOR,
                serde_json::to_vec(&forged).unwrap(),
            )
            .unwrap();
        }
        let r = check(dir.path(), &key);
        assert!(
            r.problems
                .iter()
                .any(|p| p.what.contains("retention anchor at 31 is not genuine")),
            "{r:?}"
        );
    }

    #[test]
    fn a_range_verifies_from_its_first_record() {
        let (dir, key) = trail();
        let reader = Reader::open(dir.path()).unwrap();
        let r = verify(&reader, 12, 20, &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            (r.records, r.first, r.checkpoints_verified),
            (9, Some(12), 1)
        );
    }
}
