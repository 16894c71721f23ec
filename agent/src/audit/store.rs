//! The primary store and its appenders.
//!
//! Producers append on their own threads. Each queues its records; the first to find no write
//! under way leads and, under one lock, seals everything queued (sequence number, previous
//! hash, the chain's hash) and writes it as one RocksDB batch without a sync, so the
//! write-ahead log holds the chain in order; the others wait without holding their threads.
//! Nothing slower than that write (a sync, a signature, retention) happens under the lock,
//! and a broken store is reopened at most every `REOPEN_EVERY`. In sync mode the caller
//! then waits for the trail's thread, which syncs the WAL once for every record written before
//! it (group commit), so a caller is told its sequence number only once its record is durable.
//! The same thread signs the checkpoints that fall due, outside the lock. Retention runs on a
//! thread of its own: it touches only records below the head, and appends do not wait.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::chain::{self, GENESIS, Hash};
use super::checkpoint::Checkpoint;
use super::record::{Event, PreviousRun, Record, SCHEMA_VERSION, now_rfc3339};
use super::{
    AuditError, CF_CHAIN, CF_CHECKPOINTS, CF_META, CF_RECORDS, META_ANCHOR, TRAIL_DIR, key_seq,
    seq_key,
};

/// Least time between two attempts to reopen a broken store.
const REOPEN_EVERY: Duration = Duration::from_millis(200);
/// Requests to the trail's thread before a sync-mode append waits to queue its own.
const QUEUE_DEPTH: usize = 8192;

/// The last record in the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

impl Head {
    const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };
}

/// When to sign a checkpoint: after this many records, or this long after the last one,
/// whichever comes first (and always when asked, as at shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every_records: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_records: 1000,
            every: Duration::from_secs(60),
        }
    }
}

/// The RocksDB trail, opened read-write by the agent.
/// When a record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each group of records is on disk (synced WAL) before anyone is told it is written.
    Sync,
    /// Written to the WAL at once and synced in the background at least this often: faster,
    /// but a crash of the host (not just of the agent) can lose that window.
    Buffered(Duration),
}

/// How long and how much of the trail to keep; `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

/// The first sequence number to keep under `retention`, from the trail's record times
/// (oldest first, as `(seq, unix seconds)`) and its size on disk. Pure, for testing.
pub fn retention_cutoff(
    times: &[(u64, i64)],
    now: i64,
    size: u64,
    retention: &Retention,
) -> Option<u64> {
    let (first, last) = (times.first()?.0, times.last()?.0);
    let mut cutoff = first;
    if let Some(age) = retention.max_age {
        let oldest_kept = now - age.as_secs() as i64;
        // Everything before the first record young enough to keep.
        cutoff = times
            .iter()
            .find(|(_, t)| *t >= oldest_kept)
            .map_or(last + 1, |(s, _)| *s);
    }
    if retention.max_bytes.is_some_and(|max| size > max) {
        // Over the size: let the oldest quarter go (at least one record).
        cutoff = cutoff.max(first + ((last - first + 1) / 4).max(1));
    }
    (cutoff > first).then_some(cutoff)
}

pub struct Store {
    path: PathBuf,
    /// None after a write error until a reopen succeeds.
    db: Option<Arc<DB>>,
    /// A write failed: RocksDB refuses further writes until the store is reopened, which the
    /// next write tries (so that freeing disk space is enough to recover).
    broken: bool,
    /// When a reopen was last tried, while broken.
    reopen_tried: Option<Instant>,
    /// Least time between two reopen attempts.
    reopen_every: Duration,
    durability: Durability,
    head: Head,
    /// This host's name as a JSON string, as every record carries it.
    host_json: String,
    key: SigningKey,
    policy: CheckpointPolicy,
    /// Sequence number the newest checkpoint covers (0: none yet).
    checkpointed: u64,
    checkpointed_at: Instant,
    /// Retention running on a thread of its own, if it is; the thread answers whether its write
    /// failed (the store must then be reopened, as after a failed append).
    retention: Option<std::thread::JoinHandle<bool>>,
    watermark: Arc<Watermark>,
    #[cfg(test)]
    retention_hook: Option<RetentionHook>,
}

/// How far the trail is written, and how far it is known to be on disk (the WAL synced over
/// it). A reader that ships records elsewhere stops at the second: a record past it can still
/// be lost in a crash of the host, and the records written after the restart would then take
/// its sequence number, so the copy shipped would look like a record changed.
#[derive(Debug, Default)]
pub struct Watermark {
    written: AtomicU64,
    synced: AtomicU64,
}

impl Watermark {
    /// The newest record known to be on disk.
    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// A sync that began after `written` was read has finished.
    fn synced_through(&self, written: u64) {
        self.synced.fetch_max(written, Ordering::AcqRel);
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
}

/// Holds the next retention job at its start until the test lets it go.
#[cfg(test)]
struct RetentionHook {
    started: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// Makes the state directory (0700, root only) and returns the trail's folder in it.
pub fn prepare_state_dir(state_dir: &Path) -> Result<PathBuf, AuditError> {
    let err = |what, source| AuditError::StateDir {
        what,
        path: state_dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| err("create", e))?;
    // The folder may predate us with looser bits; the trail and keys are root-only.
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| err("restrict", e))?;
    Ok(state_dir.join(TRAIL_DIR))
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Memtables are the store's main memory. By default each of the ten column families may
    // hold 64 MB (two of them while one flushes): the benchmark saw the agent idle at 217 MiB
    // after a burst. One budget across all of them bounds it; past it the largest flushes.
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
    opts
}

/// Bytes of memtable (unflushed records and index entries) across all column families.
const MEMTABLE_BUDGET: usize = 32 << 20;

fn cf_descriptors() -> Vec<ColumnFamilyDescriptor> {
    let mut records = Options::default();
    records.set_compression_type(rocksdb::DBCompressionType::Lz4);
    vec![
        ColumnFamilyDescriptor::new(CF_RECORDS, records),
        ColumnFamilyDescriptor::new(CF_CHAIN, Options::default()),
        ColumnFamilyDescriptor::new(CF_CHECKPOINTS, Options::default()),
        ColumnFamilyDescriptor::new(CF_META, Options::default()),
    ]
    .into_iter()
    .chain(
        super::index::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(*cf, Options::default())),
    )
    .collect()
}

impl Store {
    /// Opens (creating if needed) the trail under `state_dir`, and finds the chain head.
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = prepare_state_dir(state_dir)?;
        let db = DB::open_cf_descriptors(&db_options(), &path, cf_descriptors())
            .map_err(|source| AuditError::Open { path, source })?;
        let head = read_head(&db)?;
        let checkpointed = last_key(&db, CF_CHECKPOINTS)?.unwrap_or(0);
        // A trail from before the indexes: they cover what is written from now on.
        let meta = db.cf_handle(CF_META).expect("meta CF opened");
        if db
            .get_cf(&meta, super::index::META_INDEXED_FROM)
            .map_err(AuditError::Read)?
            .is_none()
        {
            db.put_cf(
                &meta,
                super::index::META_INDEXED_FROM,
                (head.seq + 1).to_be_bytes(),
            )
            .map_err(AuditError::Write)?;
        }
        Ok(Store {
            path: state_dir.join(TRAIL_DIR),
            db: Some(Arc::new(db)),
            broken: false,
            reopen_tried: None,
            reopen_every: REOPEN_EVERY,
            durability: Durability::Sync,
            head,
            host_json: serde_json::to_string(&hostname()).expect("strings serialise"),
            key: super::keys::load_or_create(state_dir)?,
            policy: CheckpointPolicy::default(),
            checkpointed,
            checkpointed_at: Instant::now(),
            retention: None,
            // What an open finds is on disk: recovery replays the WAL into tables it flushes
            // (RocksDB's default, `avoid_flush_during_recovery` off).
            watermark: Arc::new(Watermark {
                written: AtomicU64::new(head.seq),
                synced: AtomicU64::new(head.seq),
            }),
            #[cfg(test)]
            retention_hook: None,
        })
    }

    /// The open database; `Closed` after a write error until a reopen succeeds.
    fn db(&self) -> Result<&DB, AuditError> {
        self.db.as_deref().ok_or(AuditError::Closed)
    }

    /// After a failed write: close and reopen the store, finding the head again. If the open
    /// fails the store stays closed and `broken`, and a write after `reopen_every` tries again.
    fn recover(&mut self) -> Result<(), AuditError> {
        self.reap_retention();
        if !self.broken {
            return Ok(());
        }
        if self.retention.is_some() {
            // The job's handle keeps RocksDB's LOCK, so a reopen now would fail; the first
            // write after the job ends reopens instead.
            return Err(AuditError::Closed);
        }
        // Appenders run on the runtime's workers and hold the store's lock: while the disk
        // stays full, one open per interval, and every other write fails at once.
        if self
            .reopen_tried
            .is_some_and(|at| at.elapsed() < self.reopen_every)
        {
            return Err(AuditError::Closed);
        }
        self.reopen_tried = Some(Instant::now());
        // Closed before opening again: RocksDB allows one primary per folder.
        self.db = None;
        let db = DB::open_cf_descriptors(&db_options(), &self.path, cf_descriptors()).map_err(
            |source| AuditError::Open {
                path: self.path.clone(),
                source,
            },
        )?;
        self.head = read_head(&db)?;
        self.watermark
            .written
            .store(self.head.seq, Ordering::Release);
        self.checkpointed = last_key(&db, CF_CHECKPOINTS)?.unwrap_or(0);
        self.db = Some(Arc::new(db));
        self.broken = false;
        self.spawn_syncer();
        tracing::warn!(head = self.head.seq, "the audit trail is writable again");
        Ok(())
    }

    /// Writes a batch, remembering a failure so that the next write reopens the store.
    fn write(&mut self, batch: WriteBatch, sync: bool) -> Result<(), AuditError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        let started = Instant::now();
        let r = self.db()?.write_opt(batch, &wo).map_err(AuditError::Write);
        let took = started.elapsed().as_secs_f64();
        let m = crate::metrics::get();
        m.group_write_seconds.observe(took);
        if sync {
            m.fsync_seconds.observe(took);
        }
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// In buffered mode, a thread that syncs the WAL every window while this store is open.
    fn spawn_syncer(&self) {
        let Durability::Buffered(window) = self.durability else {
            return;
        };
        // Holds only a weak handle: when the store closes (or reopens), this one ends.
        let Some(db) = self.db.as_ref().map(Arc::downgrade) else {
            return;
        };
        let watermark = self.watermark.clone();
        let spawned = std::thread::Builder::new()
            .name("audit-wal-sync".into())
            .spawn(move || {
                let mut synced_at = 0;
                while let Some(db) = db.upgrade() {
                    let started = Instant::now();
                    let seq = db.latest_sequence_number();
                    let written = watermark.written();
                    let synced = db.flush_wal(true);
                    if synced.is_ok() {
                        watermark.synced_through(written);
                    }
                    // An idle window's sync writes nothing: it would only crowd the histogram.
                    if seq != synced_at {
                        synced_at = seq;
                        crate::metrics::get()
                            .fsync_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    if let Err(e) = synced {
                        tracing::error!(error = %e, "syncing the audit WAL failed");
                    }
                    drop(db);
                    std::thread::sleep(window);
                }
            });
        // This runs at a reopen (on an appender's thread), which must not panic: records still go
        // to the WAL, synced only when RocksDB flushes.
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit WAL sync thread");
        }
    }

    pub fn set_durability(&mut self, durability: Durability) {
        self.durability = durability;
    }

    pub fn set_checkpoint_policy(&mut self, policy: CheckpointPolicy) {
        self.policy = policy;
    }

    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    fn checkpoint_due(&self, head: &Head) -> bool {
        head.seq > self.checkpointed
            && (head.seq - self.checkpointed >= self.policy.every_records
                || self.checkpointed_at.elapsed() >= self.policy.every)
    }

    fn put_checkpoint(&self, batch: &mut WriteBatch, head: &Head) -> Result<(), AuditError> {
        let cf = self
            .db()?
            .cf_handle(CF_CHECKPOINTS)
            .expect("checkpoints CF opened");
        let cp = Checkpoint::sign(&self.key, head.seq, &head.hash, now_rfc3339());
        batch.put_cf(
            &cf,
            seq_key(head.seq),
            serde_json::to_vec(&cp).expect("checkpoints serialise"),
        );
        Ok(())
    }

    /// Removes the records that `retention` lets go, up to the newest checkpoint before its
    /// cutoff, and leaves a signed anchor so that the rest still verifies. Returns how many
    /// records went. On this thread: the agent's trail thread runs it on one of its own
    /// (`start_retention`).
    pub fn retain(&mut self, retention: &Retention) -> Result<u64, AuditError> {
        self.retain_at(retention, chrono::Utc::now().timestamp())
    }

    /// `retain` as if it were `now` (unix seconds).
    pub fn retain_at(&mut self, retention: &Retention, now: i64) -> Result<u64, AuditError> {
        self.recover()?;
        let r = retain_in(self.db()?, &self.path, &self.key, retention, now);
        if matches!(r, Err(AuditError::Write(_))) {
            self.broken = true;
        }
        r
    }

    /// Applies `retention` on a thread of its own, which answers `done`: its reads, range
    /// deletes, anchor and compaction all lie below the head, so appends go on meanwhile.
    fn start_retention(
        &mut self,
        retention: Retention,
        done: oneshot::Sender<Result<u64, String>>,
    ) {
        if let Err(e) = self.recover() {
            let _ = done.send(Err(e.to_string()));
            return;
        }
        // One job at a time. A request while one runs is answered at once with nothing removed
        // rather than queued behind it: the next check (every minute) takes what is left.
        if self.retention.is_some() || retention == Retention::default() {
            let _ = done.send(Ok(0));
            return;
        }
        let Some(db) = self.db.clone() else {
            let _ = done.send(Err(AuditError::Closed.to_string()));
            return;
        };
        let (path, key) = (self.path.clone(), self.key.clone());
        let now = chrono::Utc::now().timestamp();
        #[cfg(test)]
        let hook = self.retention_hook.take();
        // `done` is handed over once the thread runs, so that a failure to start it can still
        // be answered here.
        let (hand, take) = std::sync::mpsc::sync_channel::<oneshot::Sender<_>>(1);
        let spawned = std::thread::Builder::new()
            .name("audit-retention".into())
            .spawn(move || {
                let Ok(done) = take.recv() else {
                    return false;
                };
                #[cfg(test)]
                if let Some(hook) = hook {
                    let _ = hook.started.send(());
                    let _ = hook.release.blocking_recv();
                }
                let r = retain_in(&db, &path, &key, &retention, now);
                let write_failed = matches!(r, Err(AuditError::Write(_)));
                let _ = done.send(r.map_err(|e| e.to_string()));
                write_failed
            });
        match spawned {
            Ok(job) => {
                let _ = hand.send(done);
                self.retention = Some(job);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the audit retention thread");
                let _ = done.send(Err(format!("cannot start the retention thread: {e}")));
            }
        }
    }

    /// Takes in a retention job that has ended, if there is one.
    fn reap_retention(&mut self) {
        if self.retention.as_ref().is_some_and(|job| job.is_finished()) {
            self.join_retention();
        }
    }

    /// Waits for the retention job, if one runs; one whose write failed leaves the store to be
    /// reopened, as a failed append does.
    fn join_retention(&mut self) {
        let Some(job) = self.retention.take() else {
            return;
        };
        match job.join() {
            Ok(write_failed) => self.broken |= write_failed,
            // Its batch was written whole or not at all; the trail is as it was or cut.
            Err(_) => tracing::error!("the audit retention thread panicked"),
        }
    }

    /// Signs a checkpoint of the head now, if anything was written since the last one.
    pub fn checkpoint_now(&mut self) -> Result<(), AuditError> {
        self.recover()?;
        if self.head.seq <= self.checkpointed {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let head = self.head;
        self.put_checkpoint(&mut batch, &head)?;
        self.write(batch, true)?;
        self.checkpointed = head.seq;
        self.checkpointed_at = Instant::now();
        Ok(())
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// The newest record, if the trail has any.
    pub fn last_record(&self) -> Result<Option<Record>, AuditError> {
        if self.head.seq == 0 {
            return Ok(None);
        }
        let db = self.db()?;
        let records = db.cf_handle(CF_RECORDS).expect("records CF opened");
        let bytes = db
            .get_cf(&records, seq_key(self.head.seq))
            .map_err(AuditError::Read)?
            .ok_or(AuditError::BadChain(self.head.seq))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AuditError::Corrupt {
                seq: self.head.seq,
                source,
            })
    }

    /// How the previous run ended, judged from the last record.
    pub fn previous_run(&self) -> Result<Option<PreviousRun>, AuditError> {
        Ok(self.last_record()?.map(|r| PreviousRun {
            ended_cleanly: matches!(r.event, Event::AgentStop(_)),
            last_seq: r.seq,
            last_record_time: Some(r.event.time().to_owned()),
        }))
    }

    /// Seals and durably writes a group of events; returns their sequence numbers. A
    /// checkpoint that falls due is signed after the group, on this thread.
    pub fn append_group(
        &mut self,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<Vec<u64>, AuditError> {
        let encoded: Vec<Encoded> = events.into_iter().map(|e| Encoded::new(&e)).collect();
        let appended = self.append_encoded(&encoded, self.durability == Durability::Sync)?;
        if appended.checkpoint_due {
            self.checkpoint_now()?;
        }
        Ok(appended.seqs)
    }

    /// The bytes of record `seq`: the header fields, then the event's own fields. The same
    /// bytes as serialising a [`Record`] (a unit test holds them to it).
    fn record_bytes(&self, seq: u64, prev: &Hash, event: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(event.len() + self.host_json.len() + 120);
        let _ = write!(
            out,
            "{{\"v\":{SCHEMA_VERSION},\"seq\":{seq},\"host\":{},\"prev_hash\":\"{}\",",
            self.host_json,
            hex::encode(prev)
        );
        // An event is a JSON object that starts with its `kind`: splice its fields in.
        out.extend_from_slice(&event[1..]);
        out
    }

    /// Seals a group of encoded events and writes them in one batch (synced when `sync`);
    /// returns their sequence numbers. Only the chain's parts are done here: encoding happened
    /// on the callers' threads. A checkpoint that falls due is only reported: signing it is not
    /// the appender's work.
    fn append_encoded(&mut self, events: &[Encoded], sync: bool) -> Result<Appended, AuditError> {
        self.recover()?;
        let db = self.db()?;
        let records = db.cf_handle(CF_RECORDS).expect("records CF opened");
        let chain_cf = db.cf_handle(CF_CHAIN).expect("chain CF opened");
        let mut batch = WriteBatch::default();
        let mut head = self.head;
        let mut seqs = Vec::with_capacity(events.len());
        for event in events {
            let seq = head.seq + 1;
            let bytes = self.record_bytes(seq, &head.hash, &event.json);
            let hash = chain::link(&head.hash, seq, &bytes);
            batch.put_cf(&records, seq_key(seq), &bytes);
            batch.put_cf(&chain_cf, seq_key(seq), hash);
            for (cf, prefix) in &event.index {
                let cf = db.cf_handle(cf).expect("index CFs opened");
                batch.put_cf(&cf, super::index::key_with_seq(prefix, seq), []);
            }
            head = Head { seq, hash };
            seqs.push(seq);
        }
        self.write(batch, sync)?;
        // Only advance once written: a failed batch leaves no gap in the chain.
        self.head = head;
        self.watermark.written.store(head.seq, Ordering::Release);
        if sync {
            self.watermark.synced_through(head.seq);
        }
        Ok(Appended {
            seqs,
            checkpoint_due: self.checkpoint_due(&head),
        })
    }

    /// A write on `db` failed outside the lock: the store must be reopened, unless it already
    /// was (then `db` is the old instance and the new one is fine).
    fn mark_broken(&mut self, db: &Arc<DB>) {
        if self.db.as_ref().is_some_and(|open| Arc::ptr_eq(open, db)) {
            self.broken = true;
        }
    }

    /// The open database, shared: for work done outside the appenders' lock (syncing the WAL,
    /// writing a checkpoint).
    fn db_shared(&self) -> Result<Arc<DB>, AuditError> {
        self.db.clone().ok_or(AuditError::Closed)
    }

    /// How far the trail is on disk, for readers that ship it elsewhere.
    pub fn watermark(&self) -> Arc<Watermark> {
        self.watermark.clone()
    }

    /// Hands the store to the trail's own thread and returns the handle that producers clone.
    /// Producers seal and write their records themselves, one at a time under a lock (so the
    /// write-ahead log holds the chain in order); the thread syncs the WAL for them in sync
    /// mode (one fsync for everything written before it), signs the checkpoints that fall due,
    /// and starts retention. It ends when the last handle is dropped.
    pub fn spawn_writer(self) -> (AuditLog, std::thread::JoinHandle<()>) {
        self.spawn_syncer();
        let sync = self.durability == Durability::Sync;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let healthy = Arc::new(AtomicBool::new(true));
        let store = Arc::new(Mutex::new(self));
        let checkpoint_asked = Arc::new(AtomicBool::new(false));
        let syncs = Arc::new(AtomicU64::new(0));
        let handle = std::thread::Builder::new()
            .name("audit-trail".into())
            .spawn({
                let (store, healthy, asked, syncs) = (
                    store.clone(),
                    healthy.clone(),
                    checkpoint_asked.clone(),
                    syncs.clone(),
                );
                move || trail_loop(&store, rx, &healthy, &asked, &syncs)
            })
            .expect("spawning the audit trail thread");
        (
            AuditLog {
                shared: Arc::new(Shared {
                    store,
                    tx,
                    healthy,
                    sync,
                    checkpoint_asked,
                    syncs,
                    queue: Mutex::new(Queue::default()),
                }),
            },
            handle,
        )
    }
}

/// What an append wrote.
struct Appended {
    seqs: Vec<u64>,
    /// The head is past the checkpoint policy's count or age.
    checkpoint_due: bool,
}

/// The store (or the append queue) behind its lock. A panic while the store's was held leaves
/// the head as it was (it moves only after a write), and the queue is a list of senders, so a
/// poisoned lock still guards a consistent value.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the trail's thread or a leading caller answered.
async fn answer<T>(wait: oneshot::Receiver<Result<T, String>>) -> Result<T, AuditError> {
    match wait.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) => Err(AuditError::Rejected(msg)),
        Err(_) => Err(AuditError::WriterGone),
    }
}

/// Signs a checkpoint of the head, if anything was written since the last one, holding the
/// appenders' lock only to read the head and to note what was signed: the signature, the
/// write and its sync happen while appends go on.
fn checkpoint_shared(store: &Mutex<Store>) -> Result<(), AuditError> {
    let (head, key, db, watermark) = {
        let mut s = lock(store);
        s.recover()?;
        if s.head.seq <= s.checkpointed {
            return Ok(());
        }
        (s.head, s.key.clone(), s.db_shared()?, s.watermark.clone())
    };
    // The sync below covers every record written before it.
    let synced = watermark.written();
    let cp = Checkpoint::sign(&key, head.seq, &head.hash, now_rfc3339());
    let cf = db.cf_handle(CF_CHECKPOINTS).expect("checkpoints CF opened");
    let written = db
        .put_cf(
            &cf,
            seq_key(head.seq),
            serde_json::to_vec(&cp).expect("checkpoints serialise"),
        )
        .and_then(|()| db.flush_wal(true))
        .map_err(AuditError::Write);
    let mut s = lock(store);
    match written {
        Ok(()) => {
            watermark.synced_through(synced);
            if head.seq > s.checkpointed {
                s.checkpointed = head.seq;
                s.checkpointed_at = Instant::now();
            }
            Ok(())
        }
        Err(e) => {
            s.mark_broken(&db);
            Err(e)
        }
    }
}

/// Syncs the WAL: everything written before this call is then on disk.
fn sync_wal(store: &Mutex<Store>) -> Result<(), AuditError> {
    let (db, watermark) = {
        let s = lock(store);
        (s.db_shared()?, s.watermark.clone())
    };
    let written = watermark.written();
    let started = Instant::now();
    let r = db.flush_wal(true).map_err(AuditError::Write);
    if r.is_ok() {
        watermark.synced_through(written);
    }
    crate::metrics::get()
        .fsync_seconds
        .observe(started.elapsed().as_secs_f64());
    if r.is_err() {
        lock(store).mark_broken(&db);
    }
    r
}

/// Retention's work, on whichever thread runs it. It reads and writes only below the head,
/// so appends go on meanwhile.
fn retain_in(
    db: &DB,
    path: &Path,
    signing_key: &SigningKey,
    retention: &Retention,
    now: i64,
) -> Result<u64, AuditError> {
    if retention.max_age.is_none() && retention.max_bytes.is_none() {
        return Ok(0);
    }
    let records = db.cf_handle(CF_RECORDS).expect("records CF opened");
    let time_of = |key: &[u8], value: &[u8]| {
        let seq = key_seq(key)?;
        let rec = serde_json::from_slice::<Record>(value).ok()?;
        let t = chrono::DateTime::parse_from_rfc3339(rec.event.time())
            .map(|t| t.timestamp())
            .unwrap_or(0);
        Some((seq, t))
    };
    // Only the part that may go is read, oldest first, up to the first record young enough
    // to keep (the cutoff); then the newest record, for the span. Retention runs every
    // minute, so its cost follows what it removes, not the size of the trail.
    let oldest_kept = retention.max_age.map(|age| now - age.as_secs() as i64);
    let mut times = Vec::new();
    for item in db.iterator_cf(&records, IteratorMode::Start) {
        let (key, value) = item.map_err(AuditError::Read)?;
        let Some((seq, t)) = time_of(&key, &value) else {
            continue;
        };
        times.push((seq, t));
        if oldest_kept.is_none_or(|o| t >= o) {
            break;
        }
    }
    if let Some(item) = db.iterator_cf(&records, IteratorMode::End).next() {
        let (key, value) = item.map_err(AuditError::Read)?;
        if let Some(newest) = time_of(&key, &value)
            && times.last().is_some_and(|l| l.0 < newest.0)
        {
            times.push(newest);
        }
    }
    let size = dir_size(path);
    let Some(cutoff) = retention_cutoff(&times, now, size, retention) else {
        return Ok(0);
    };
    tracing::info!(
        cutoff,
        size,
        records = times.last().map_or(0, |l| l.0) - times.first().map_or(0, |f| f.0) + 1,
        "retention: records before the cutoff may go"
    );
    // The cut goes at a signed checkpoint: the anchor then vouches for a hash that was signed
    // while the records it covers still existed.
    let checkpoints = db.cf_handle(CF_CHECKPOINTS).expect("checkpoints CF opened");
    let mut anchor_at = None;
    for item in db.iterator_cf(
        &checkpoints,
        IteratorMode::From(&seq_key(cutoff), rocksdb::Direction::Reverse),
    ) {
        let (key, value) = item.map_err(AuditError::Read)?;
        let Some(seq) = key_seq(&key) else { continue };
        if seq >= cutoff {
            continue;
        }
        if let Ok(cp) = serde_json::from_slice::<Checkpoint>(&value) {
            anchor_at = Some(cp);
            break;
        }
    }
    let Some(cp) = anchor_at else {
        return Ok(0);
    };
    let hash: Hash = hex::decode(&cp.hash)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or(AuditError::BadChain(cp.seq))?;
    let anchor = Checkpoint::sign_anchor(signing_key, cp.seq, &hash, now_rfc3339());
    let chain_cf = db.cf_handle(CF_CHAIN).expect("chain CF opened");
    let meta = db.cf_handle(CF_META).expect("meta CF opened");
    let (from, to) = (seq_key(0), seq_key(cp.seq + 1));
    let mut batch = WriteBatch::default();
    // Counted here, where every record that goes is read: with only a size limit, `times`
    // holds just the oldest and the newest.
    let mut removed = 0u64;
    // Index entries of the records that go.
    for item in db.iterator_cf(&records, IteratorMode::Start) {
        let (key, value) = item.map_err(AuditError::Read)?;
        if key_seq(&key).is_none_or(|s| s > cp.seq) {
            break;
        }
        removed += 1;
        if let Ok(rec) = serde_json::from_slice::<Record>(&value) {
            for (cf, key) in super::index::entries(&rec) {
                let cf = db.cf_handle(cf).expect("index CFs opened");
                batch.delete_cf(&cf, key);
            }
        }
    }
    batch.delete_range_cf(&records, from, to);
    batch.delete_range_cf(&chain_cf, from, to);
    batch.delete_range_cf(&checkpoints, from, to);
    batch.put_cf(
        &meta,
        META_ANCHOR,
        serde_json::to_vec(&anchor).expect("anchors serialise"),
    );
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).map_err(AuditError::Write)?;
    // Give the space back now rather than at the next compaction. Not exclusive: an exclusive
    // one holds off the automatic compactions, so the level-0 files of the records appended
    // meanwhile pile up, and past RocksDB's triggers it slows the appenders down.
    let mut compact = rocksdb::CompactOptions::default();
    compact.set_exclusive_manual_compaction(false);
    for name in [CF_RECORDS, CF_CHAIN] {
        let cf = db.cf_handle(name).expect("CF opened");
        db.compact_range_cf_opt(&cf, None::<&[u8]>, Some(&to), &compact);
    }
    tracing::info!(
        removed,
        through = cp.seq,
        "retention removed old records; a signed anchor keeps the rest verifiable"
    );
    Ok(removed)
}

fn last_key(db: &DB, cf: &str) -> Result<Option<u64>, AuditError> {
    let cf = db.cf_handle(cf).expect("column family opened");
    match db.iterator_cf(&cf, IteratorMode::End).next() {
        None => Ok(None),
        Some(Err(e)) => Err(AuditError::Read(e)),
        Some(Ok((key, _))) => Ok(key_seq(&key)),
    }
}

fn read_head(db: &DB) -> Result<Head, AuditError> {
    let chain_cf = db.cf_handle(CF_CHAIN).expect("chain CF opened");
    let mut it = db.iterator_cf(&chain_cf, IteratorMode::End);
    match it.next() {
        None => Ok(Head::EMPTY),
        Some(Err(e)) => Err(AuditError::Read(e)),
        Some(Ok((key, value))) => {
            let seq = key_seq(&key).ok_or(AuditError::BadChain(0))?;
            let hash: Hash = value[..]
                .try_into()
                .map_err(|_| AuditError::BadChain(seq))?;
            Ok(Head { seq, hash })
        }
    }
}

/// Bytes of the files directly in `dir` (RocksDB keeps its files flat).
pub fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// An event made ready for the trail by the thread that produced it: its JSON and its index
/// keys. At saturation the old single writer thread was the agent's busiest; serialising on the
/// producers' threads leaves it only the chain, and frees each event where it was allocated.
pub struct Encoded {
    json: Vec<u8>,
    index: Vec<(&'static str, Vec<u8>)>,
}

impl Encoded {
    pub fn new(event: &Event) -> Self {
        Encoded {
            json: serde_json::to_vec(event).expect("events always serialise"),
            index: super::index::prefixes(event),
        }
    }
}

/// What the appenders ask of the trail's thread.
enum Request {
    /// Answer once the WAL is synced (everything written before the request is covered).
    Sync(oneshot::Sender<Result<(), String>>),
    /// A checkpoint fell due at an append; nobody waits for it.
    CheckpointDue,
    Checkpoint(oneshot::Sender<Result<(), String>>),
    Retain(Retention, oneshot::Sender<Result<u64, String>>),
}

/// The trail's thread: group fsyncs in sync mode, checkpoints and retention jobs.
fn trail_loop(
    store: &Mutex<Store>,
    mut rx: mpsc::Receiver<Request>,
    healthy: &AtomicBool,
    checkpoint_asked: &AtomicBool,
    sync_count: &AtomicU64,
) {
    let mut syncs: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    let mut checkpoints: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut checkpoint_due = false;
        let mut next = Some(first);
        // Everything queued so far: one fsync answers every sync request among it.
        while let Some(req) = next.take() {
            match req {
                Request::Sync(done) => syncs.push(done),
                Request::CheckpointDue => {
                    checkpoint_asked.store(false, Ordering::Relaxed);
                    checkpoint_due = true;
                }
                Request::Checkpoint(done) => checkpoints.push(done),
                Request::Retain(retention, done) => lock(store).start_retention(retention, done),
            }
            next = rx.try_recv().ok();
        }
        if !syncs.is_empty() {
            let r = sync_wal(store).map_err(|e| e.to_string());
            sync_count.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &r {
                healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, records = syncs.len(), "syncing the audit trail failed");
            }
            for done in syncs.drain(..) {
                let _ = done.send(r.clone());
            }
        }
        // A due checkpoint may have been signed since it was asked for (appends go on asking
        // until the signature is recorded): sign again only if it is still due.
        let checkpoint_due = checkpoint_due && {
            let s = lock(store);
            s.checkpoint_due(&s.head)
        };
        if checkpoint_due || !checkpoints.is_empty() {
            let r = checkpoint_shared(store).map_err(|e| e.to_string());
            // An idle trail reopens here (the agent asks for a checkpoint on a timer), and
            // with nothing to append this is the write that says whether it could.
            healthy.store(r.is_ok(), Ordering::Relaxed);
            if let Err(e) = &r {
                tracing::error!(error = %e, "signing an audit checkpoint failed");
            }
            for done in checkpoints.drain(..) {
                let _ = done.send(r.clone());
            }
        }
    }
    let mut store = lock(store);
    // A running retention job ends first: its handle would keep the store open past the
    // trail's thread, and the process may exit under it.
    store.join_retention();
    // Flushing on the way out keeps the next open fast; the WAL already made it durable.
    let written = store.watermark.written();
    match store.db() {
        Ok(db) => match db.flush_wal(true) {
            Ok(()) => store.watermark.synced_through(written),
            Err(e) => tracing::warn!(error = %e, "flushing the audit WAL at shutdown failed"),
        },
        Err(e) => tracing::warn!(error = %e, "the audit trail is closed at shutdown"),
    }
}

/// What every handle shares; dropping the last one ends the trail's thread.
struct Shared {
    store: Arc<Mutex<Store>>,
    tx: mpsc::Sender<Request>,
    /// False since the last write failed (for example a full disk), until one succeeds.
    healthy: Arc<AtomicBool>,
    /// Sync durability: an append returns once the trail's thread has synced the WAL.
    sync: bool,
    /// A `CheckpointDue` is queued and not yet taken.
    checkpoint_asked: Arc<AtomicBool>,
    /// WAL syncs the trail's thread made for sync-mode appends.
    syncs: Arc<AtomicU64>,
    /// Appends waiting for the leading caller to write them.
    queue: Mutex<Queue>,
}

/// Appends waiting to be written, and whether a caller is writing.
#[derive(Default)]
struct Queue {
    pending: Vec<Queued>,
    leading: bool,
}

/// One caller's records, and where to answer with their sequence numbers.
struct Queued {
    events: Vec<Encoded>,
    done: oneshot::Sender<Result<Vec<u64>, String>>,
}

/// The caller (or, under load, the task) that writes for everyone while it leads. Dropped
/// while it leads, it writes what is left, so no waiting caller is stranded.
struct Leading {
    shared: Arc<Shared>,
    ended: bool,
}

impl Leading {
    async fn run(mut self) {
        while self.next() {
            // Between groups, the worker's other tasks run: under sustained load a leader
            // would otherwise hold its thread.
            tokio::task::yield_now().await;
        }
        self.ended = true;
    }

    /// True when more is queued (and the lead is kept); false, giving it up, when not.
    fn keep_leading(&self) -> bool {
        let mut q = lock(&self.shared.queue);
        if q.pending.is_empty() {
            q.leading = false;
            return false;
        }
        true
    }

    /// Writes the next group; false, giving up the lead, when nothing is queued.
    fn next(&self) -> bool {
        let group = {
            let mut q = lock(&self.shared.queue);
            if q.pending.is_empty() {
                q.leading = false;
                return false;
            }
            std::mem::take(&mut q.pending)
        };
        self.shared.write_group(group);
        true
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if !self.ended {
            while self.next() {}
        }
    }
}

impl Shared {
    /// Seals and writes the queued appends as one batch and answers each.
    fn write_group(&self, group: Vec<Queued>) {
        let mut events = Vec::new();
        let mut answers = Vec::with_capacity(group.len());
        for q in group {
            answers.push((q.events.len(), q.done));
            events.extend(q.events);
        }
        let appended = lock(&self.store).append_encoded(&events, false);
        match appended {
            Ok(appended) => {
                if appended.checkpoint_due && !self.checkpoint_asked.swap(true, Ordering::Relaxed) {
                    // Not waited for: if the queue is full the next append asks again.
                    if self.tx.try_send(Request::CheckpointDue).is_err() {
                        self.checkpoint_asked.store(false, Ordering::Relaxed);
                    }
                }
                let mut seqs = appended.seqs.into_iter();
                for (n, done) in answers {
                    let _ = done.send(Ok(seqs.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, records = events.len(), "audit write failed");
                let msg = e.to_string();
                for (_, done) in answers {
                    let _ = done.send(Err(msg.clone()));
                }
            }
        }
    }
}

/// A cheap, cloneable handle for appending to the trail from async code.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

impl AuditLog {
    /// How far the trail is on disk (see [`Watermark`]).
    pub fn watermark(&self) -> Arc<Watermark> {
        lock(&self.shared.store).watermark()
    }

    /// Whether the last write to the trail succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// How many times the WAL was synced for sync-mode appends (each sync answers every
    /// append written before it).
    pub fn wal_syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Appends one event and waits until it is durable; returns its sequence number.
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        let seqs = self.append_all(vec![event]).await?;
        Ok(seqs[0])
    }

    /// Appends events as one batch, consecutive in the trail, and waits until they are
    /// durable; returns their sequence numbers.
    pub async fn append_all(&self, events: Vec<Event>) -> Result<Vec<u64>, AuditError> {
        let started = Instant::now();
        let kinds: Vec<&'static str> = events.iter().map(Event::kind).collect();
        let encoded: Vec<Encoded> = events.iter().map(Encoded::new).collect();
        drop(events);
        let result = self.write(encoded).await;
        let m = crate::metrics::get();
        match &result {
            Ok(seqs) => {
                m.append_seconds.observe(started.elapsed().as_secs_f64());
                for kind in kinds {
                    m.records_written.with_label_values(&[kind]).inc();
                }
                // Appends finish in any order; the head only moves forward.
                if let Some(&last) = seqs.last()
                    && (last as i64) > m.trail_head.get()
                {
                    m.trail_head.set(last as i64);
                }
            }
            Err(_) => {
                for kind in kinds {
                    m.records_failed.with_label_values(&[kind]).inc();
                }
            }
        }
        result
    }

    /// Seals and writes on a caller's thread: the first caller to find no write under way
    /// leads, and writes everything queued meanwhile as one batch, under the lock that keeps
    /// the chain in the WAL's order; the others wait without holding their threads. At light
    /// load each caller writes its own records (no thread is woken); under load the writes
    /// group, as the old writer thread grouped them, without its two wake-ups per record. In
    /// sync mode the fsync, which is longer, happens on the trail's thread, once for every
    /// record written before it.
    async fn write(&self, encoded: Vec<Encoded>) -> Result<Vec<u64>, AuditError> {
        let shared = &*self.shared;
        let (done, wait) = oneshot::channel();
        let lead = {
            let mut q = lock(&shared.queue);
            q.pending.push(Queued {
                events: encoded,
                done,
            });
            !std::mem::replace(&mut q.leading, true)
        };
        if lead {
            let mut leading = Leading {
                shared: self.shared.clone(),
                ended: false,
            };
            // The group that holds this caller's own records.
            leading.next();
            if leading.keep_leading() {
                // What queued meanwhile is led on by a task of its own, so that this caller
                // is not held behind other callers' records.
                tokio::spawn(leading.run());
            } else {
                leading.ended = true;
            }
        }
        let seqs = answer(wait).await?;
        if shared.sync {
            let (done, wait) = oneshot::channel();
            shared
                .tx
                .send(Request::Sync(done))
                .await
                .map_err(|_| AuditError::WriterGone)?;
            answer(wait).await?;
        }
        shared.healthy.store(true, Ordering::Relaxed);
        Ok(seqs)
    }

    /// Applies the retention policy; returns how many records went.
    pub async fn retain(&self, retention: Retention) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.shared
            .tx
            .send(Request::Retain(retention, done))
            .await
            .map_err(|_| AuditError::WriterGone)?;
        answer(wait).await
    }

    /// Signs a checkpoint of everything written so far (nothing if nothing is new).
    pub async fn checkpoint(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.shared
            .tx
            .send(Request::Checkpoint(done))
            .await
            .map_err(|_| AuditError::WriterGone)?;
        answer(wait).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{AgentStop, now_rfc3339};
    use std::os::unix::fs::MetadataExt;

    fn stop(reason: &str) -> Event {
        Event::AgentStop(AgentStop {
            time: now_rfc3339(),
            reason: reason.into(),
            counters: Default::default(),
        })
    }

    #[test]
    fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head(), Head::EMPTY);
        assert_eq!(store.append_group([stop("a"), stop("b")]).unwrap(), [1, 2]);
        let head = store.head();
        drop(store);

        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head(), head, "head is recovered from the chain");
        let prev = store.previous_run().unwrap().unwrap();
        assert!(prev.ended_cleanly);
        assert_eq!(prev.last_seq, 2);
        assert_eq!(store.append_group([stop("c")]).unwrap(), [3]);
    }

    #[test]
    fn retention_cutoffs() {
        let times: Vec<(u64, i64)> = (1..=8).map(|s| (s, 1000 + s as i64 * 100)).collect();
        let keep_all = Retention::default();
        assert_eq!(retention_cutoff(&times, 5000, 10, &keep_all), None);
        // Records older than 350 s at now=1800: times 1100..1400 are older than 1450.
        let age = Retention {
            max_age: Some(Duration::from_secs(350)),
            max_bytes: None,
        };
        assert_eq!(retention_cutoff(&times, 1800, 10, &age), Some(5));
        // Too big: the oldest quarter goes.
        let size = Retention {
            max_age: None,
            max_bytes: Some(100),
        };
        assert_eq!(retention_cutoff(&times, 1800, 1000, &size), Some(3));
        assert_eq!(retention_cutoff(&times, 1800, 50, &size), None);
        assert_eq!(retention_cutoff(&[], 0, 0, &size), None);
    }

    #[test]
    fn state_dir_is_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        let _store = Store::open(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_distinct_consecutive_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = Store::open(dir.path()).unwrap().spawn_writer();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(stop(&i.to_string())).await
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        drop(log);
        writer.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_appends_share_fsyncs_and_keep_the_chain_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_durability(Durability::Sync);
        let key = store.public_key();
        let (log, writer) = store.spawn_writer();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for j in 0..10 {
                    let group = vec![stop(&format!("{i}.{j}.a")), stop(&format!("{i}.{j}.b"))];
                    let got = log.append_all(group).await.unwrap();
                    assert_eq!(got[1], got[0] + 1, "a group is consecutive");
                    seqs.extend(got);
                }
                seqs
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1280).collect::<Vec<_>>());
        let syncs = log.wal_syncs();
        assert!(syncs >= 1, "sync mode syncs the WAL");
        assert!(
            syncs < 640,
            "64 concurrent writers share fsyncs: {syncs} syncs for 640 appends"
        );
        drop(log);
        writer.join().unwrap();
        let reader = crate::audit::Reader::open(dir.path()).unwrap();
        let r = crate::audit::verify::verify(&reader, 1, u64::MAX, &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.last, Some(1280));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_dropped_while_it_leads_writes_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = Store::open(dir.path()).unwrap().spawn_writer();
        // Two callers' records queued behind a leader that is then dropped (its future
        // cancelled) before it wrote them.
        let mut waits = Vec::new();
        {
            let mut q = lock(&log.shared.queue);
            q.leading = true;
            for name in ["a", "b"] {
                let (done, wait) = oneshot::channel();
                q.pending.push(Queued {
                    events: vec![Encoded::new(&stop(name))],
                    done,
                });
                waits.push(wait);
            }
        }
        drop(Leading {
            shared: log.shared.clone(),
            ended: false,
        });
        let mut seqs = Vec::new();
        for wait in waits {
            let answered = tokio::time::timeout(Duration::from_secs(30), answer(wait))
                .await
                .expect("a waiting caller was stranded");
            seqs.extend(answered.unwrap());
        }
        assert_eq!(seqs, [1, 2]);
        assert!(!lock(&log.shared.queue).leading, "the lead is given up");
        assert_eq!(log.append(stop("c")).await.unwrap(), 3);
        drop(log);
        writer.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_appends_do_not_wait_for_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_durability(Durability::Buffered(Duration::from_millis(10)));
        let (log, writer) = store.spawn_writer();
        for i in 0..20 {
            log.append(stop(&i.to_string())).await.unwrap();
        }
        assert_eq!(log.wal_syncs(), 0);
        drop(log);
        writer.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_that_fall_due_are_signed_by_the_trail_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_checkpoint_policy(CheckpointPolicy {
            every_records: 5,
            every: Duration::from_secs(3600),
        });
        let key = store.public_key();
        let (log, writer) = store.spawn_writer();
        for i in 0..23 {
            log.append(stop(&i.to_string())).await.unwrap();
        }
        // The due checkpoints are signed while appends go on; closing waits for them.
        drop(log);
        writer.join().unwrap();
        let reader = crate::audit::Reader::open(dir.path()).unwrap();
        let r = crate::audit::verify::verify(&reader, 1, u64::MAX, &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert!(r.checkpoints_verified >= 1, "{r:?}");
        assert!(
            r.unsigned_tail < 5,
            "a checkpoint followed the last due point: {r:?}"
        );
    }

    /// A store of two records as a write error leaves it when the reopen after it failed:
    /// closed, to be reopened at the next write. With it, a second handle on its folder that
    /// keeps RocksDB's LOCK, so that the store's reopen really fails, as on a disk still full.
    fn closed_store(state_dir: &Path) -> (Store, DB) {
        let mut store = Store::open(state_dir).unwrap();
        assert_eq!(store.append_group([stop("a"), stop("b")]).unwrap(), [1, 2]);
        store.broken = true;
        store.db = None;
        // Every write tries to reopen; `reopens_are_spaced` tests the spacing.
        store.reopen_every = Duration::ZERO;
        let blocker =
            DB::open_cf_descriptors(&db_options(), &store.path, cf_descriptors()).unwrap();
        (store, blocker)
    }

    #[test]
    fn the_watermark_moves_past_a_record_only_once_a_sync_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.append_group([stop("synced")]).unwrap();
        let mark = store.watermark();
        assert_eq!(mark.synced(), 1, "a synced append is on disk");
        store.set_durability(Durability::Buffered(Duration::from_secs(3600)));
        store.append_group([stop("a"), stop("b")]).unwrap();
        assert_eq!((mark.written(), mark.synced()), (3, 1));
        let store = Mutex::new(store);
        sync_wal(&store).unwrap();
        assert_eq!(mark.synced(), 3);
        drop(store);
        // Reopened, the trail holds what was on disk.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.watermark().synced(), 3);
    }

    #[test]
    fn a_failed_reopen_is_an_error_and_the_next_write_tries_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, blocker) = closed_store(dir.path());
        assert!(matches!(
            store.append_group([stop("c")]),
            Err(AuditError::Open { .. })
        ));
        assert!(matches!(
            store.checkpoint_now(),
            Err(AuditError::Open { .. })
        ));
        assert!(matches!(store.last_record(), Err(AuditError::Closed)));
        let all = Retention {
            max_age: Some(Duration::ZERO),
            max_bytes: None,
        };
        assert!(store.retain(&all).is_err());
        assert_eq!(
            store.head().seq,
            2,
            "a failed write does not advance the head"
        );
        drop(blocker);
        assert_eq!(store.append_group([stop("d")]).unwrap(), [3]);
        assert_eq!(store.last_record().unwrap().map(|r| r.seq), Some(3));
    }

    #[test]
    fn reopens_are_spaced_and_writes_between_them_fail_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, blocker) = closed_store(dir.path());
        store.reopen_every = Duration::from_millis(300);
        assert!(matches!(
            store.append_group([stop("c")]),
            Err(AuditError::Open { .. })
        ));
        drop(blocker);
        // Within the interval: no open is tried, even though one would now succeed.
        assert!(matches!(
            store.append_group([stop("d")]),
            Err(AuditError::Closed)
        ));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(store.append_group([stop("e")]).unwrap(), [3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_reports_a_failed_reopen_and_recovers_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blocker) = closed_store(dir.path());
        let (log, writer) = store.spawn_writer();
        assert!(log.append(stop("c")).await.is_err());
        assert!(!log.healthy());
        assert!(log.checkpoint().await.is_err());
        assert!(!log.healthy());
        drop(blocker);
        assert_eq!(
            log.append(stop("d")).await.unwrap(),
            3,
            "no gap for the failed one"
        );
        assert!(log.healthy());
        drop(log);
        writer.join().expect("the writer does not panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_shuts_down_with_the_trail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _blocker) = closed_store(dir.path());
        let (log, writer) = store.spawn_writer();
        assert!(log.append(stop("c")).await.is_err());
        drop(log);
        writer.join().expect("the writer does not panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_go_on_while_retention_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_checkpoint_policy(CheckpointPolicy {
            every_records: 5,
            every: Duration::from_secs(3600),
        });
        for i in 0..20 {
            store.append_group([stop(&i.to_string())]).unwrap();
        }
        let key = store.public_key();
        let (started, started_wait) = oneshot::channel();
        let (release, release_wait) = oneshot::channel();
        store.retention_hook = Some(RetentionHook {
            started,
            release: release_wait,
        });
        let (log, writer) = store.spawn_writer();
        // Over the size, the oldest quarter (up to 5) goes: the cut is at the checkpoint at 5.
        let small = Retention {
            max_age: None,
            max_bytes: Some(1),
        };
        let retain = tokio::spawn({
            let log = log.clone();
            async move { log.retain(small).await }
        });
        started_wait.await.unwrap();
        // The job is held until it is released below, so an append that waited for it would
        // never finish: the timeout turns that into a failure instead of a hang.
        let during = tokio::time::timeout(Duration::from_secs(60), log.append(stop("during")))
            .await
            .expect("the append waited for retention");
        assert_eq!(during.unwrap(), 21);
        tokio::time::timeout(Duration::from_secs(60), log.checkpoint())
            .await
            .expect("the checkpoint waited for retention")
            .unwrap();
        // A second request while the job runs is answered at once, with nothing removed.
        assert_eq!(log.retain(small).await.unwrap(), 0);
        release.send(()).unwrap();
        assert_eq!(retain.await.unwrap().unwrap(), 5);
        assert_eq!(log.append(stop("after")).await.unwrap(), 22);
        drop(log);
        writer.join().unwrap();
        let reader = crate::audit::Reader::open(dir.path()).unwrap();
        let r = crate::audit::verify::verify(&reader, 1, u64::MAX, &key).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.anchor, r.first, r.last), (Some(5), Some(6), Some(22)));
    }
}
