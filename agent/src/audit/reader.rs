//! Read-only access to the trail while the agent writes it.
//!
//! A reader opens the store as a RocksDB secondary instance: it never takes the primary's lock
//! and never blocks its writes, and `catch_up` replays what the primary wrote since.
#![forbid(unsafe_code)]

use std::path::Path;

use rocksdb::{DB, Direction, IteratorMode, Options};

use super::chain::Hash;
use super::checkpoint::Checkpoint;
use super::record::Record;
use super::{
    AuditError, CF_CHAIN, CF_CHECKPOINTS, CF_META, CF_RECORDS, META_ANCHOR, TRAIL_DIR, key_seq,
    seq_key,
};

/// A record as stored, with its chain hash.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub record: Record,
    pub hash: Hash,
}

impl StoredRecord {
    /// The record as one JSON object, with its `hash` added.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.record).expect("records always serialise");
        v["hash"] = serde_json::Value::String(hex::encode(self.hash));
        v
    }
}

/// A checkpoint by the sequence number it is stored under, or why it does not parse.
pub type StoredCheckpoint = (u64, Result<Checkpoint, String>);

/// One stored record, uninterpreted.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub key: Vec<u8>,
    /// The key as a sequence number, if it is one.
    pub seq: Option<u64>,
    pub bytes: Vec<u8>,
    /// The stored chain hash, if any.
    pub chain: Option<Vec<u8>>,
}

pub struct Reader {
    db: DB,
    // The secondary keeps its own info log here; it lives as long as the reader.
    _scratch: tempfile::TempDir,
}

impl Reader {
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = state_dir.join(TRAIL_DIR);
        if !path.join("CURRENT").exists() {
            return Err(AuditError::NoTrail(path));
        }
        let scratch = tempfile::Builder::new()
            .prefix("mcptrail-reader-")
            .tempdir()
            .map_err(|source| AuditError::StateDir {
                what: "make a scratch folder for reading",
                path: std::env::temp_dir(),
                source,
            })?;
        let mut opts = Options::default();
        // Secondaries must keep every table file open to follow the primary's compactions.
        opts.set_max_open_files(-1);
        // A trail written by an older agent may lack newer column families: open what exists.
        let present =
            DB::list_cf(&Options::default(), &path).map_err(|source| AuditError::Open {
                path: path.clone(),
                source,
            })?;
        let cfs: Vec<&str> = [CF_RECORDS, CF_CHAIN, CF_CHECKPOINTS, CF_META]
            .into_iter()
            .chain(super::index::ALL)
            .filter(|cf| present.iter().any(|p| p == cf))
            .collect();
        let db = DB::open_cf_as_secondary(&opts, path.as_path(), scratch.path(), cfs)
            .map_err(|source| AuditError::Open { path, source })?;
        Ok(Reader {
            db,
            _scratch: scratch,
        })
    }

    /// Picks up what the agent wrote since the last call.
    pub fn catch_up(&self) -> Result<(), AuditError> {
        self.db
            .try_catch_up_with_primary()
            .map_err(AuditError::Read)
    }

    /// Sequence number of the newest record, if any.
    pub fn last_seq(&self) -> Result<Option<u64>, AuditError> {
        let cf = self.db.cf_handle(CF_RECORDS).expect("records CF opened");
        match self.db.iterator_cf(&cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(Err(e)) => Err(AuditError::Read(e)),
            Some(Ok((k, _))) => Ok(key_seq(&k)),
        }
    }

    /// Every stored record from `from` to `to` (inclusive) as raw entries, in key order, with
    /// its chain hash if one is stored. For verification: nothing is interpreted here.
    pub fn raw_range(
        &self,
        from: u64,
        to: u64,
        mut each: impl FnMut(RawEntry) -> bool,
    ) -> Result<(), AuditError> {
        let records = self.db.cf_handle(CF_RECORDS).expect("records CF opened");
        let chain = self.db.cf_handle(CF_CHAIN).expect("chain CF opened");
        let start = seq_key(from);
        for item in self
            .db
            .iterator_cf(&records, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(AuditError::Read)?;
            let seq = key_seq(&key);
            if seq.is_some_and(|s| s > to) {
                break;
            }
            let hash = self
                .db
                .get_cf(&chain, &key)
                .map_err(AuditError::Read)?
                .map(|h| h.to_vec());
            if !each(RawEntry {
                key: key.to_vec(),
                seq,
                bytes: value.to_vec(),
                chain: hash,
            }) {
                break;
            }
        }
        Ok(())
    }

    /// Sequence numbers present in the chain column family, from `from` to `to`.
    pub fn chain_seqs(&self, from: u64, to: u64) -> Result<Vec<u64>, AuditError> {
        let chain = self.db.cf_handle(CF_CHAIN).expect("chain CF opened");
        let start = seq_key(from);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&chain, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, _) = item.map_err(AuditError::Read)?;
            match key_seq(&key) {
                Some(s) if s > to => break,
                Some(s) => out.push(s),
                None => {}
            }
        }
        Ok(out)
    }

    /// Every checkpoint, in order; entries that do not parse are returned as errors in place.
    pub fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, AuditError> {
        let Some(cf) = self.db.cf_handle(CF_CHECKPOINTS) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, IteratorMode::Start) {
            let (key, value) = item.map_err(AuditError::Read)?;
            let seq = key_seq(&key).unwrap_or(0);
            out.push((
                seq,
                serde_json::from_slice(&value).map_err(|e| e.to_string()),
            ));
        }
        Ok(out)
    }

    /// The checkpoints from sequence number `from` on, in order (what an exporter has not
    /// sent yet); entries that do not parse are returned as errors in place.
    pub fn checkpoints_from(&self, from: u64) -> Result<Vec<StoredCheckpoint>, AuditError> {
        let Some(cf) = self.db.cf_handle(CF_CHECKPOINTS) else {
            return Ok(Vec::new());
        };
        let start = seq_key(from);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(AuditError::Read)?;
            let seq = key_seq(&key).unwrap_or(0);
            out.push((
                seq,
                serde_json::from_slice(&value).map_err(|e| e.to_string()),
            ));
        }
        Ok(out)
    }

    /// The signed retention anchor, if retention ever removed records; Err when it does not
    /// parse.
    pub fn anchor(&self) -> Result<Option<Result<Checkpoint, String>>, AuditError> {
        let Some(cf) = self.db.cf_handle(CF_META) else {
            return Ok(None);
        };
        Ok(self
            .db
            .get_cf(&cf, META_ANCHOR)
            .map_err(AuditError::Read)?
            .map(|v| serde_json::from_slice(&v).map_err(|e| e.to_string())))
    }

    /// The first sequence number the indexes cover, if the trail has indexes.
    pub fn indexed_from(&self) -> Result<Option<u64>, AuditError> {
        let Some(meta) = self.db.cf_handle(CF_META) else {
            return Ok(None);
        };
        if self.db.cf_handle(super::index::CF_IDX_TIME).is_none() {
            return Ok(None);
        }
        Ok(self
            .db
            .get_cf(&meta, super::index::META_INDEXED_FROM)
            .map_err(AuditError::Read)?
            .and_then(|v| key_seq(&v)))
    }

    /// Sequence numbers in index `cf` whose keys lie in `[start, end)`, in key order.
    pub fn index_seqs(&self, cf: &str, start: &[u8], end: &[u8]) -> Result<Vec<u64>, AuditError> {
        let Some(cf) = self.db.cf_handle(cf) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&cf, IteratorMode::From(start, Direction::Forward))
        {
            let (key, _) = item.map_err(AuditError::Read)?;
            if &key[..] >= end {
                break;
            }
            if let Some(seq) = super::index::seq_of(&key) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// One record by sequence number.
    pub fn get(&self, seq: u64) -> Result<Option<StoredRecord>, AuditError> {
        Ok(self
            .read_from(seq, 1)?
            .into_iter()
            .next()
            .filter(|r| r.record.seq == seq))
    }

    /// Up to `limit` records with sequence numbers from `from` on, in order.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredRecord>, AuditError> {
        let records = self.db.cf_handle(CF_RECORDS).expect("records CF opened");
        let chain = self.db.cf_handle(CF_CHAIN).expect("chain CF opened");
        let start = seq_key(from);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&records, IteratorMode::From(&start, Direction::Forward))
            .take(limit)
        {
            let (key, value) = item.map_err(AuditError::Read)?;
            let seq = key_seq(&key).ok_or(AuditError::BadChain(0))?;
            let record: Record = serde_json::from_slice(&value)
                .map_err(|source| AuditError::Corrupt { seq, source })?;
            let hash = self
                .db
                .get_cf(&chain, &key)
                .map_err(AuditError::Read)?
                .and_then(|h| Hash::try_from(&h[..]).ok())
                .ok_or(AuditError::BadChain(seq))?;
            out.push(StoredRecord { record, hash });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain;
    use crate::audit::record::{AgentStop, Event, now_rfc3339};
    use crate::audit::store::Store;

    fn stop(reason: &str) -> Event {
        Event::AgentStop(AgentStop {
            time: now_rfc3339(),
            reason: reason.into(),
            counters: Default::default(),
        })
    }

    #[test]
    fn missing_trail_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Reader::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("mcptrail run"), "{err}");
    }

    #[test]
    fn follows_the_writer_and_sees_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.append_group([stop("one")]).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        assert_eq!(reader.last_seq().unwrap(), Some(1));

        store.append_group([stop("two"), stop("three")]).unwrap();
        assert_eq!(reader.last_seq().unwrap(), Some(1), "not caught up yet");
        reader.catch_up().unwrap();
        assert_eq!(reader.last_seq().unwrap(), Some(3));

        let all = reader.read_from(1, 10).unwrap();
        assert_eq!(all.len(), 3);
        let mut prev = chain::GENESIS;
        for r in &all {
            assert_eq!(r.record.prev_hash, hex::encode(prev));
            let stored = serde_json::to_vec(&r.record).unwrap();
            assert_eq!(chain::link(&prev, r.record.seq, &stored), r.hash);
            prev = r.hash;
        }
        assert_eq!(reader.read_from(3, 10).unwrap().len(), 1);
        assert_eq!(all[2].to_json()["hash"], hex::encode(all[2].hash));
    }
}
