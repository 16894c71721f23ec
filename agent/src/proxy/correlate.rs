//! Links answers to the requests they answer across HTTP exchanges and connections: a
//! response can arrive on another stream than its request (the legacy SSE transport, a GET
//! stream, a resumed stream), and a client answers a server's request with a POST of its own.
//! Keyed by session, the direction of the request, and its JSON-RPC id.
#![forbid(unsafe_code)]

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use crate::audit::record::Direction;

/// Requests remembered at most; the least recently used are forgotten first (their answers
/// then get an exchange of their own, and the records still show the id). SSE event ids are
/// bounded the same way, in a table of their own.
const CAPACITY: usize = 100_000;

type Key = (String, Direction, String);

pub struct Correlator {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Open requests, least recently used evicted first when full: every operation on it
    /// (insert, lookup, close, eviction) is O(1).
    open: LruCache<Key, String>,
    /// SSE event ids already recorded, by session: a stream resumed with `Last-Event-ID`
    /// may replay what an earlier stream carried.
    seen: LruCache<(String, String), ()>,
}

impl Default for Correlator {
    fn default() -> Self {
        Correlator::with_capacity(CAPACITY)
    }
}

impl Correlator {
    /// A correlator that remembers at most `capacity` open requests and `capacity` SSE event
    /// ids (at least one of each).
    pub fn with_capacity(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Correlator {
            inner: Mutex::new(Inner {
                // `sparse`: the tables grow as they fill instead of taking room for every
                // entry up front.
                open: LruCache::sparse(cap),
                seen: LruCache::sparse(cap),
            }),
        }
    }

    /// Remembers that `exchange` is the request `id` sent in `direction` within `session`.
    /// Opening it again replaces the exchange and makes it the most recently used.
    pub fn open(&self, session: &str, direction: Direction, id: &str, exchange: &str) {
        let key = (session.to_owned(), direction, id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        inner.open.put(key, exchange.to_owned());
    }

    /// The exchange of the request in `request_direction` that an answer with `id` closes.
    pub fn close(&self, session: &str, request_direction: Direction, id: &str) -> Option<String> {
        let key = (session.to_owned(), request_direction, id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        inner.open.pop(&key)
    }
}

impl Correlator {
    /// The exchange of an open request, without closing it: a cancellation or a progress
    /// notification belongs to the request it is about, which goes on.
    pub fn related(&self, session: &str, request_direction: Direction, id: &str) -> Option<String> {
        let key = (session.to_owned(), request_direction, id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        // `get`, not `peek`: a notification about a request shows it is still in progress, so
        // it counts as a use and keeps the entry from being the next one evicted. A long
        // call that keeps reporting progress is then not forgotten behind a burst of short
        // ones. (What is refreshed is the entry looked up, e.g. the progress token's, not
        // the request id's entry as well.)
        inner.open.get(&key).cloned()
    }

    /// True the first time an SSE event id is seen in a session, false for a replay.
    pub fn first_sight(&self, session: &str, event_id: &str) -> bool {
        let key = (session.to_owned(), event_id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        // A replay refreshes the id: a stream being resumed may be resumed again.
        if inner.seen.promote(&key) {
            return false;
        }
        inner.seen.put(key, ());
        true
    }

    /// Remembers the request that asked for progress under `token`.
    pub fn open_progress(&self, session: &str, token: &str, exchange: &str) {
        self.open(
            session,
            Direction::ClientToServer,
            &progress_key(token),
            exchange,
        );
    }

    /// The request a progress notification with `token` reports on.
    pub fn progress(&self, session: &str, token: &str) -> Option<String> {
        self.related(session, Direction::ClientToServer, &progress_key(token))
    }
}

impl Correlator {
    /// Remembers that a retry echoing `state` continues the logical call `logical`, as round
    /// `round`. `requestState` is minted by the server and opaque, so it links across
    /// connections and sessions alike.
    pub fn open_retry(&self, state: &str, logical: &str, round: u32) {
        self.open(
            "",
            Direction::ClientToServer,
            &format!("retry:{state}"),
            &format!("{round}#{logical}"),
        );
    }

    /// The logical call and round a retry echoing `state` continues.
    pub fn retry(&self, state: &str) -> Option<(String, u32)> {
        let v = self.close("", Direction::ClientToServer, &format!("retry:{state}"))?;
        split_round(&v)
    }

    /// Remembers that the request of `exchange` is round `round` of `logical`.
    pub fn note_round(&self, exchange: &str, logical: &str, round: u32) {
        self.open(
            "",
            Direction::ClientToServer,
            &format!("round:{exchange}"),
            &format!("{round}#{logical}"),
        );
    }

    /// The logical call and round of the request of `exchange`, if it was a retry.
    pub fn round_of(&self, exchange: &str) -> Option<(String, u32)> {
        let v = self.close("", Direction::ClientToServer, &format!("round:{exchange}"))?;
        split_round(&v)
    }
}

fn split_round(v: &str) -> Option<(String, u32)> {
    let (round, logical) = v.split_once('#')?;
    Some((logical.to_owned(), round.parse().ok()?))
}

/// Progress tokens share the table with request ids; the prefix keeps them apart (a request
/// id, as JSON text, never starts with it).
fn progress_key(token: &str) -> String {
    format!("progress:{token}")
}

/// The session a request belongs to: `Mcp-Session-Id`, or the `session_id`/`sessionId` query
/// parameter of the legacy HTTP+SSE transport's message endpoint.
pub fn session_key(session_header: Option<&str>, path: &str) -> Option<String> {
    if let Some(s) = session_header {
        return Some(s.to_owned());
    }
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        matches!(k, "session_id" | "sessionId").then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_close_their_requests_once() {
        let c = Correlator::default();
        c.open("s1", Direction::ClientToServer, "7", "ex-7");
        assert_eq!(
            c.close("s2", Direction::ClientToServer, "7"),
            None,
            "other session"
        );
        assert_eq!(
            c.close("s1", Direction::ServerToClient, "7"),
            None,
            "other direction"
        );
        assert_eq!(
            c.close("s1", Direction::ClientToServer, "7").as_deref(),
            Some("ex-7")
        );
        assert_eq!(c.close("s1", Direction::ClientToServer, "7"), None);
    }

    #[test]
    fn progress_and_cancellation_find_their_request_without_closing_it() {
        let c = Correlator::default();
        c.open("s", Direction::ClientToServer, "3", "ex-3");
        c.open_progress("s", "\"tok\"", "ex-3");
        assert_eq!(c.progress("s", "\"tok\"").as_deref(), Some("ex-3"));
        assert_eq!(
            c.related("s", Direction::ClientToServer, "3").as_deref(),
            Some("ex-3")
        );
        assert_eq!(
            c.close("s", Direction::ClientToServer, "3").as_deref(),
            Some("ex-3")
        );
        assert_eq!(c.progress("other", "\"tok\""), None);
    }

    #[test]
    fn replayed_events_are_told_apart_per_session() {
        let c = Correlator::default();
        assert!(c.first_sight("s1", "ev-1"));
        assert!(!c.first_sight("s1", "ev-1"), "a replay after Last-Event-ID");
        assert!(c.first_sight("s2", "ev-1"), "another session");
        assert!(c.first_sight("s1", "ev-2"));
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_used_request() {
        let c = Correlator::with_capacity(3);
        let d = Direction::ClientToServer;
        c.open("s", d, "1", "ex-1");
        c.open("s", d, "2", "ex-2");
        c.open("s", d, "3", "ex-3");
        // A notification about 1 keeps it in use; 2 is now the least recently used.
        assert_eq!(c.related("s", d, "1").as_deref(), Some("ex-1"));
        c.open("s", d, "4", "ex-4");
        assert_eq!(c.related("s", d, "2"), None, "the least recently used goes");
        assert_eq!(c.close("s", d, "1").as_deref(), Some("ex-1"));
        assert_eq!(c.close("s", d, "3").as_deref(), Some("ex-3"));
        assert_eq!(c.close("s", d, "4").as_deref(), Some("ex-4"));
    }

    #[test]
    fn a_closed_request_is_gone_and_frees_its_place() {
        let c = Correlator::with_capacity(2);
        let d = Direction::ServerToClient;
        c.open("s", d, "1", "ex-1");
        c.open("s", d, "2", "ex-2");
        assert_eq!(c.close("s", d, "1").as_deref(), Some("ex-1"));
        assert_eq!(c.related("s", d, "1"), None);
        assert_eq!(c.close("s", d, "1"), None);
        // The closed entry's place is free: opening another evicts nothing.
        c.open("s", d, "3", "ex-3");
        assert_eq!(c.related("s", d, "2").as_deref(), Some("ex-2"));
        assert_eq!(c.related("s", d, "3").as_deref(), Some("ex-3"));
        assert_eq!(c.inner.lock().unwrap().open.len(), 2);
    }

    #[test]
    fn retries_and_rounds_are_taken_once() {
        let c = Correlator::with_capacity(4);
        c.open_retry("st", "call-1", 2);
        c.note_round("ex-9", "call-1", 2);
        assert_eq!(c.retry("st"), Some(("call-1".to_owned(), 2)));
        assert_eq!(c.retry("st"), None);
        assert_eq!(c.round_of("ex-9"), Some(("call-1".to_owned(), 2)));
        assert_eq!(c.round_of("ex-9"), None);
    }

    #[test]
    fn seen_event_ids_are_bounded_least_recently_used_first() {
        let c = Correlator::with_capacity(2);
        assert!(c.first_sight("s", "ev-1"));
        assert!(c.first_sight("s", "ev-2"));
        // A replay of ev-1 refreshes it; ev-2 is the least recently used.
        assert!(!c.first_sight("s", "ev-1"));
        assert!(c.first_sight("s", "ev-3"));
        assert!(!c.first_sight("s", "ev-1"), "still remembered");
        assert!(c.first_sight("s", "ev-2"), "forgotten, so new again");
    }

    #[test]
    fn sessions_come_from_the_header_or_the_legacy_query() {
        assert_eq!(session_key(Some("abc"), "/mcp").as_deref(), Some("abc"));
        assert_eq!(
            session_key(None, "/messages/?session_id=f00d").as_deref(),
            Some("f00d")
        );
        assert_eq!(
            session_key(None, "/m?x=1&sessionId=42").as_deref(),
            Some("42")
        );
        assert_eq!(session_key(None, "/mcp"), None);
    }
}
