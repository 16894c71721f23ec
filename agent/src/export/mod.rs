//! Shipping the trail to an OpenTelemetry collector (OTLP/HTTP logs), at least once.
//!
//! The exporter reads the trail itself (a RocksDB secondary instance, as `tail -f` does) after
//! a persisted cursor, sends a batch, and moves the cursor only once the collector took all of
//! it. Refusals are retried (429/502/503/504 with exponential backoff and jitter, honouring
//! `Retry-After`; anything else more slowly), never dropped; a batch the collector partly
//! rejects is split until the rejected records are alone, and those keep being retried. The
//! data plane never waits on any of this: it only appends to the trail.
#![forbid(unsafe_code)]

pub mod client;
pub mod cursor;
pub mod feed;
pub mod otlp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use crate::audit::Reader;
use client::{Client, Outcome};
use feed::{Item, Position};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the OTLP endpoint {endpoint:?}: {why}")]
    Endpoint { endpoint: String, why: String },
    #[error("the CA file {path}: {why}")]
    Ca { path: PathBuf, why: String },
    #[error("{0}")]
    Roots(#[from] crate::proxy::tls::TlsError),
    #[error("the headers file {path}: {why}")]
    Headers { path: PathBuf, why: String },
    #[error(
        "the headers file {path} is readable by others (mode {mode:o}): it holds credentials; run `chmod 600 {path}`"
    )]
    HeadersOpen { path: PathBuf, mode: u32 },
    #[error("the export cursor {path}: {why}")]
    Cursor { path: PathBuf, why: String },
    #[error("reading the trail: {0}")]
    Trail(#[from] crate::audit::AuditError),
    #[error(
        "the collector at {endpoint} refused the export: {why}. Fix the endpoint, the credentials sent to it (the headers file) or the collector; the next export resumes after the last batch the collector took, so nothing is skipped (the batch refused is sent again, and the collector may see some of its records twice)"
    )]
    Refused { endpoint: String, why: String },
}

/// `Name: value` per line (`#` comments), for an auth token the collector wants. The file
/// holds credentials: it must be readable by its owner alone.
pub fn read_headers(path: &Path) -> Result<Vec<(HeaderName, HeaderValue)>, ExportError> {
    use std::os::unix::fs::MetadataExt as _;
    let err = |why: String| ExportError::Headers {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(ExportError::HeadersOpen {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse_headers(&text).map_err(err)
}

/// The text of a headers file, or `Name: value` given on the command line.
pub fn parse_headers(text: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected `Name: value`", n + 1))?;
        let name = HeaderName::try_from(name.trim())
            .map_err(|_| format!("line {}: {:?} is not a header name", n + 1, name.trim()))?;
        let mut value = HeaderValue::try_from(value.trim())
            .map_err(|_| format!("line {}: the value of {name} is not a header value", n + 1))?;
        value.set_sensitive(true);
        out.push((name, value));
    }
    Ok(out)
}

/// How long to wait before attempt `attempt` (1 = the first retry): doubling from `base` up to
/// `max`, with up to a quarter of jitter either way (`jitter` in 0..1), or what the collector
/// asked for (`Retry-After`), if longer, capped at 10 minutes.
pub fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    jitter: f64,
    asked: Option<Duration>,
) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(max);
    let spread = capped.as_secs_f64() * (0.75 + 0.5 * jitter.clamp(0.0, 1.0));
    let ours = Duration::from_secs_f64(spread);
    match asked {
        Some(a) => a.max(ours).min(Duration::from_secs(600)),
        None => ours,
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// An exporter's settings.
#[derive(Clone)]
pub struct Settings {
    pub target: client::Target,
    pub origin: otlp::Origin,
    /// At most this many records in one request...
    pub batch_records: usize,
    /// ...and about this many bytes (before compression).
    pub batch_bytes: usize,
    /// How often a caught-up exporter looks for new records.
    pub poll: Duration,
    /// The trail's watermark, when it is this process's: nothing past what is on disk leaves
    /// (see [`crate::audit::Watermark`]). `None` ships whatever the trail holds.
    pub durable: Option<Arc<crate::audit::Watermark>>,
}

/// How long an export that does not follow waits for the trail's next sync to cover records
/// it holds back (a buffered trail syncs every few milliseconds).
const DURABLE_WAIT: Duration = Duration::from_secs(2);

pub const DEFAULT_BATCH_RECORDS: usize = 512;
pub const DEFAULT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// First and longest waits: for the answers that mean "later" (429, 502, 503, 504, no
/// answer), and for every other refusal, which a person probably has to fix.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
const FAILED_BASE: Duration = Duration::from_secs(5);
const FAILED_MAX: Duration = Duration::from_secs(300);

/// Sends `items` until the collector has taken every one: a partial success splits the batch
/// and sends each half again, so the records it rejects end up alone and keep being retried.
/// Returns false when `stop` fired first. With `give_up`, a refusal that is not "later" (a 401,
/// a 400, a record rejected alone) ends the delivery with an error instead: an export run by
/// hand would otherwise wait forever on what a person has to fix. The agent's own exporter
/// keeps retrying, more slowly (nothing is dropped; the log and metrics say why).
async fn deliver(
    client: &mut Client,
    settings: &Settings,
    items: Vec<Item>,
    stop: &CancellationToken,
    give_up: bool,
) -> Result<bool, ExportError> {
    let refused = |client: &Client, why: String| ExportError::Refused {
        endpoint: client.endpoint(),
        why,
    };
    let m = crate::metrics::get();
    let mut queue = vec![items];
    while let Some(batch) = queue.pop() {
        let mut attempt = 0;
        loop {
            let observed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let request = otlp::request(&settings.origin, &batch, observed);
            let outcome = client.send(&request).await;
            let wait = match outcome {
                Outcome::Accepted => {
                    m.export_sent.inc_by(batch.len() as u64);
                    break;
                }
                Outcome::Partial { rejected, message } => {
                    m.export_rejected.inc_by(rejected.max(0) as u64);
                    tracing::warn!(
                        endpoint = %client.endpoint(),
                        rejected,
                        of = batch.len(),
                        message,
                        "the collector rejected part of a batch: sending it again in halves"
                    );
                    if batch.len() > 1 {
                        let mut first = batch;
                        let second = first.split_off(first.len() / 2);
                        // Stack: the first half goes first, keeping the order.
                        queue.push(second);
                        queue.push(first);
                        break;
                    }
                    if give_up {
                        return Err(refused(
                            client,
                            format!("it rejected a record on its own ({message})"),
                        ));
                    }
                    attempt += 1;
                    backoff(attempt, FAILED_BASE, FAILED_MAX, jitter(), None)
                }
                Outcome::Retry { why, after } => {
                    attempt += 1;
                    m.export_retries.with_label_values(&["retryable"]).inc();
                    let wait = backoff(attempt, RETRY_BASE, RETRY_MAX, jitter(), after);
                    tracing::warn!(endpoint = %client.endpoint(), attempt, wait_ms = wait.as_millis() as u64, %why, "the collector is not taking the batch now; retrying");
                    wait
                }
                Outcome::Failed { why } => {
                    if give_up {
                        return Err(refused(client, why));
                    }
                    attempt += 1;
                    m.export_retries.with_label_values(&["failed"]).inc();
                    let wait = backoff(attempt, FAILED_BASE, FAILED_MAX, jitter(), None);
                    tracing::error!(endpoint = %client.endpoint(), attempt, wait_ms = wait.as_millis() as u64, %why, "the collector refused the batch; retrying more slowly (nothing is dropped)");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return Ok(false),
            }
        }
    }
    Ok(true)
}

/// Exports from `cursor` on: until the trail is sent (or, with `follow`, until `stop`).
/// Without `follow`, a refusal a person has to fix ends it with [`ExportError::Refused`],
/// the cursor at the last batch the collector took.
pub async fn run(
    reader: Arc<Reader>,
    cursor: cursor::Cursor,
    settings: Settings,
    follow: bool,
    stop: CancellationToken,
) -> Result<Position, ExportError> {
    let mut client = Client::new(settings.target.clone());
    let mut pos = cursor.load()?;
    let mut with_anchor = true;
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        let (r, p, records, bytes) = (
            reader.clone(),
            pos,
            settings.batch_records,
            settings.batch_bytes,
        );
        let through = settings.durable.as_ref().map_or(u64::MAX, |w| w.synced());
        let (items, next, held) = tokio::task::spawn_blocking(move || {
            r.catch_up()?;
            let (items, next) = feed::next_batch(&r, p, records, bytes, with_anchor, through)?;
            // Only a run that ends when caught up waits for a sync (following, the next poll
            // sees it): no look at the trail's end otherwise.
            let held = !follow
                && r.last_seq()?
                    .is_some_and(|last| last > through.max(next.record));
            Ok::<_, ExportError>((items, next, held))
        })
        .await
        .expect("the trail reader does not panic")?;
        let moved = next != pos;
        if moved {
            if !deliver(&mut client, &settings, items, &stop, !follow).await? {
                return Ok(pos);
            }
            cursor.store(next)?;
            pos = next;
            with_anchor = false;
            held_since = None;
            continue;
        }
        if held {
            // Records are written but not yet on disk: wait for the sync that covers them.
            let since = *held_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < DURABLE_WAIT {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    _ = stop.cancelled() => return Ok(pos),
                }
            }
            tracing::warn!(
                through,
                "the trail has records not yet on disk after {DURABLE_WAIT:?}: they leave with the next export"
            );
        }
        if !follow {
            // Nothing new, but an anchor not yet sent goes out once.
            if with_anchor && !items.is_empty() {
                deliver(&mut client, &settings, items, &stop, true).await?;
            }
            return Ok(pos);
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = stop.cancelled() => return Ok(pos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector that answers every request with `status` (and `bad token`, or nothing for a
    /// 200), and counts them.
    async fn collector(status: u16) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            hyper::Response::builder().status(status).body(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"bad token")),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, seen)
    }

    fn stop_event(reason: &str) -> crate::audit::Event {
        crate::audit::Event::AgentStop(crate::audit::record::AgentStop {
            time: "2026-12-01T00:00:00Z".into(),
            reason: reason.into(),
            counters: Default::default(),
        })
    }

    /// A trail of two records, synced.
    fn trail(dir: &Path) -> (crate::audit::Store, Arc<Reader>) {
        let mut store = crate::audit::Store::open(dir).unwrap();
        store
            .append_group([stop_event("one"), stop_event("two")])
            .unwrap();
        (store, Arc::new(Reader::open(dir).unwrap()))
    }

    fn settings(url: &str) -> Settings {
        Settings {
            target: client::Target::new(url, Vec::new(), None, Duration::from_secs(5)).unwrap(),
            origin: otlp::Origin {
                host: "test".into(),
                version: "0".into(),
                public_key: "00".repeat(32),
            },
            batch_records: DEFAULT_BATCH_RECORDS,
            batch_bytes: DEFAULT_BATCH_BYTES,
            poll: Duration::from_millis(50),
            durable: None,
        }
    }

    #[tokio::test]
    async fn the_agents_trail_leaves_only_once_it_is_on_disk() {
        use crate::audit::store::Durability;
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = trail(dir.path());
        let mark = store.watermark();
        // Written, not yet synced: a crash of the host could still take these back.
        store.set_durability(Durability::Buffered(Duration::from_secs(3600)));
        store.append_group([stop_event("three")]).unwrap();
        reader.catch_up().unwrap();
        assert_eq!(reader.last_seq().unwrap(), Some(3));
        let (url, seen) = collector(200).await;
        let cursor = cursor::Cursor::named(dir.path(), "agent").unwrap();
        let mut with_mark = settings(&url);
        with_mark.durable = Some(mark.clone());
        let started = std::time::Instant::now();
        let first = run(
            reader.clone(),
            cursor.clone(),
            with_mark.clone(),
            false,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(first.record, 2, "only what was on disk left");
        assert!(
            started.elapsed() >= DURABLE_WAIT,
            "it waited for a sync first"
        );
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A synced append covers everything written before it.
        store.set_durability(Durability::Sync);
        store.append_group([stop_event("four")]).unwrap();
        assert_eq!(mark.synced(), 4);
        let second = run(reader, cursor, with_mark, false, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(second.record, 4);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_export_by_hand_ends_on_a_refusal_with_what_to_do_and_keeps_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, reader) = trail(dir.path());
        let (url, seen) = collector(401).await;
        let cursor = cursor::Cursor::named(dir.path(), "hand").unwrap();
        let run = run(
            reader,
            cursor.clone(),
            settings(&url),
            false,
            CancellationToken::new(),
        );
        let err = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("a refused export ends")
            .expect_err("a refused export is an error");
        let text = err.to_string();
        assert!(matches!(err, ExportError::Refused { .. }), "{text}");
        assert!(text.contains("401") && text.contains("bad token"), "{text}");
        assert!(text.contains("the next export resumes"), "{text}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(cursor.load().unwrap(), feed::Position::default());
    }

    #[tokio::test]
    async fn the_agents_exporter_keeps_retrying_a_refusal_until_it_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, reader) = trail(dir.path());
        let (url, seen) = collector(403).await;
        let cursor = cursor::Cursor::named(dir.path(), "agent").unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            reader,
            cursor.clone(),
            settings(&url),
            true,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "the exporter gave up");
        stop.cancel();
        let pos = task
            .await
            .unwrap()
            .expect("a stopped exporter is not an error");
        assert_eq!(pos, feed::Position::default());
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(cursor.load().unwrap(), feed::Position::default());
    }

    #[test]
    fn backoff_doubles_jitters_caps_and_honours_retry_after() {
        let b = Duration::from_millis(500);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(1, b, m, 0.5, None), Duration::from_millis(500));
        assert_eq!(backoff(2, b, m, 0.5, None), Duration::from_secs(1));
        assert_eq!(backoff(3, b, m, 0.5, None), Duration::from_secs(2));
        assert_eq!(backoff(30, b, m, 0.5, None), m);
        assert_eq!(backoff(1, b, m, 0.0, None), Duration::from_millis(375));
        assert_eq!(backoff(1, b, m, 1.0, None), Duration::from_millis(625));
        assert_eq!(
            backoff(1, b, m, 0.5, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(1, b, m, 0.5, Some(Duration::from_secs(86_400))),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn header_lines_parse_and_bad_ones_say_where() {
        let h =
            parse_headers("# the fleet's token\nAuthorization: Bearer abc\nX-Scope-OrgID: ci\n")
                .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "authorization");
        assert!(h[0].1.is_sensitive());
        assert!(
            parse_headers("no colon here")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(
            parse_headers("bad name: x")
                .unwrap_err()
                .contains("header name")
        );
    }
}
