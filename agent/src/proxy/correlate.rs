//! Links answers to the requests they answer across HTTP exchanges and connections: a
//! response can arrive on another stream than its request (the legacy SSE transport, a GET
//! stream, a resumed stream), and a client answers a server's request with a POST of its own.
//! Keyed by session, the direction of the request, and its JSON-RPC id.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::audit::record::Direction;

/// Requests remembered at most; the oldest are forgotten first (their answers then get an
/// exchange of their own, and the records still show the id).
const CAPACITY: usize = 100_000;

type Key = (String, Direction, String);

#[derive(Default)]
pub struct Correlator {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    open: HashMap<Key, String>,
    order: VecDeque<Key>,
    /// SSE event ids already recorded, by session: a stream resumed with `Last-Event-ID`
    /// may replay what an earlier stream carried.
    seen: std::collections::HashSet<(String, String)>,
    seen_order: VecDeque<(String, String)>,
}

impl Correlator {
    /// Remembers that `exchange` is the request `id` sent in `direction` within `session`.
    pub fn open(&self, session: &str, direction: Direction, id: &str, exchange: &str) {
        let key = (session.to_owned(), direction, id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        if inner
            .open
            .insert(key.clone(), exchange.to_owned())
            .is_none()
        {
            inner.order.push_back(key);
        }
        while inner.order.len() > CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.open.remove(&old);
            }
        }
    }

    /// The exchange of the request in `request_direction` that an answer with `id` closes.
    pub fn close(&self, session: &str, request_direction: Direction, id: &str) -> Option<String> {
        let key = (session.to_owned(), request_direction, id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        let exchange = inner.open.remove(&key)?;
        if let Some(pos) = inner.order.iter().position(|k| *k == key) {
            inner.order.remove(pos);
        }
        Some(exchange)
    }
}

impl Correlator {
    /// The exchange of an open request, without closing it: a cancellation or a progress
    /// notification belongs to the request it is about, which goes on.
    pub fn related(&self, session: &str, request_direction: Direction, id: &str) -> Option<String> {
        let key = (session.to_owned(), request_direction, id.to_owned());
        let inner = self.inner.lock().expect("correlator lock poisoned");
        inner.open.get(&key).cloned()
    }

    /// True the first time an SSE event id is seen in a session, false for a replay.
    pub fn first_sight(&self, session: &str, event_id: &str) -> bool {
        let key = (session.to_owned(), event_id.to_owned());
        let mut inner = self.inner.lock().expect("correlator lock poisoned");
        if !inner.seen.insert(key.clone()) {
            return false;
        }
        inner.seen_order.push_back(key);
        while inner.seen_order.len() > CAPACITY {
            if let Some(old) = inner.seen_order.pop_front() {
                inner.seen.remove(&old);
            }
        }
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
