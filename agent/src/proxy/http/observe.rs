//! The response observer: from the copy of a response's bytes (JSON or SSE, decoded per
//! `Content-Encoding`), records each answer, server request and notification as it passes,
//! linked to the requests they belong to; and the outcome of requests left unanswered.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::io::{ReaderStream, StreamReader};

use super::super::correlate::session_key;
use super::body::{self, Encoding};
use super::records::{Conn, Cred};
use super::tee::Chunk;
use super::{param, parse_limit};
use crate::audit::record::{Bytes as ByteCounts, Direction, Event, HttpInfo, Token};
use crate::mcp::{self, Kind};

/// Records what a response carried, from the copy of its bytes.
pub struct Observed {
    pub conn: Arc<Conn>,
    pub http: HttpInfo,
    pub token: Option<Token>,
    /// The caller's raw token, to scrub from the response's records; memory only.
    pub raw_token: Option<String>,
    pub base: String,
    /// Request id (as JSON text) to exchange id, for requests still waiting for an answer.
    pub pending: HashMap<String, String>,
    pub t0: Instant,
    pub first_byte_us: u64,
    pub is_mcp: bool,
    /// Trailers came after the records of the messages: an HTTP record carries them.
    pub trailers_late: bool,
    pub req_bytes: u64,
    /// Messages the server started (requests, notifications) seen so far.
    pub server_messages: u64,
    /// Response body bytes seen (for the `http` record).
    pub resp_bytes: u64,
    /// The MCP session, for answers that belong to requests sent on other exchanges.
    pub session: Option<String>,
    /// Records in the order the messages came, written by a task of their own so that
    /// decoding (and linking answers to requests) never waits for a write to be durable.
    pub(super) writer: Option<mpsc::UnboundedSender<Out>>,
    /// The client closed the response before it ended.
    pub client_closed: bool,
    /// The response's `Content-Encoding`, undone before decoding.
    pub codings: Vec<Encoding>,
    /// Why the response's coding cannot be undone, when it cannot.
    pub codings_error: Option<String>,
}

/// Most records the writer task takes into one write.
const WRITE_GROUP: usize = 256;

/// What the observer hands its writer task.
pub(super) enum Out {
    Record(Box<Event>),
    Flush(oneshot::Sender<()>),
}

impl Observed {
    /// The response's trailers into the exchange's HTTP details, values masked like the
    /// rest of what is recorded.
    fn trailers(&mut self, trailers: &hyper::HeaderMap) {
        self.http.trailers = trailers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let active = self.conn.parts.policy.current();
        let mut fired = std::collections::BTreeSet::new();
        active
            .masker
            .mask_recorded_strings(self.http.trailers.values_mut(), &mut fired);
    }

    /// Queues a record; the writer task appends them in order.
    fn emit(&self, event: Event) {
        if let Some(w) = &self.writer {
            let _ = w.send(Out::Record(Box::new(event)));
        }
    }

    pub async fn run(mut self, rx: mpsc::UnboundedReceiver<Chunk>) {
        let (writer, mut queue) = mpsc::unbounded_channel::<Out>();
        self.writer = Some(writer.clone());
        let conn = self.conn.clone();
        let written = self.conn.parts.tracker.spawn(async move {
            let (mut taken, mut group, mut flushes) = (Vec::new(), Vec::new(), Vec::new());
            // What queued while the last write was under way goes as one write: an SSE
            // answer's events wait for one sync, not one each.
            while queue.recv_many(&mut taken, WRITE_GROUP).await > 0 {
                for out in taken.drain(..) {
                    match out {
                        Out::Record(event) => group.push(*event),
                        Out::Flush(done) => flushes.push(done),
                    }
                }
                conn.record_all(std::mem::take(&mut group)).await;
                // Everything queued before is written (durably, in sync mode).
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        let end = self.observe(rx).await;
        self.finish();
        if let Some(release) = end {
            // The client's last byte waits for these records.
            let (done, flushed) = oneshot::channel();
            let _ = writer.send(Out::Flush(done));
            let _ = flushed.await;
            let _ = release.send(());
        }
        // Closing the queue lets the writer finish; wait so the connection's own record
        // comes after its messages'.
        drop(writer);
        self.writer = None;
        let _ = written.await;
    }

    /// Decodes the response until it ends; returns the end's release, when the body holds
    /// its last byte until the records are written.
    async fn observe(&mut self, rx: mpsc::UnboundedReceiver<Chunk>) -> Option<oneshot::Sender<()>> {
        let mut end = None;
        // A coding the proxy cannot undo: the bytes are only counted, whatever they are.
        let unreadable = self.codings_error.take();
        let sse = unreadable.is_none()
            && self
                .http
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream"));
        let json = self
            .http
            .content_type
            .as_deref()
            .is_some_and(|c| c.contains("json"));
        if sse {
            // Shared with the stream adapter, which must be 'static to sit under a decoder.
            let end_slot = Arc::new(std::sync::Mutex::new(None));
            let trailers_slot = Arc::new(std::sync::Mutex::new(None));
            let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (slot, gone_slot, trailers) =
                (end_slot.clone(), gone.clone(), trailers_slot.clone());
            let counted = UnboundedReceiverStream::new(rx).filter_map(move |c| match c {
                Chunk::Trailers(t) => {
                    *trailers.lock().expect("trailers slot") = Some(t);
                    None
                }
                other => Some(other),
            });
            let counted = counted.map_while(move |c| match c {
                Chunk::Data(b) => Some(Ok::<Bytes, std::io::Error>(b)),
                Chunk::Trailers(_) => None,
                Chunk::End(release) => {
                    *slot.lock().expect("end slot") = Some(release);
                    None
                }
                Chunk::ClientGone => {
                    gone_slot.store(true, Ordering::Relaxed);
                    None
                }
            });
            let bytes: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> =
                if self.codings.is_empty() {
                    Box::pin(counted)
                } else {
                    Box::pin(ReaderStream::new(body::decoding_reader(
                        StreamReader::new(counted),
                        &self.codings,
                    )))
                };
            let mut events = sse_stream::SseByteStream::new(bytes);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        let Some(data) = event.data.filter(|d| !d.is_empty()) else {
                            continue;
                        };
                        // A stream resumed with Last-Event-ID can replay events an earlier
                        // stream carried: they are in the trail already.
                        if let (Some(id), Some(session)) = (&event.id, &self.session)
                            && !self.conn.parts.correlator.first_sight(session, id)
                        {
                            continue;
                        }
                        if event.event.as_deref() == Some("endpoint") {
                            // Legacy HTTP+SSE: the stream names the URL to POST to, and with
                            // it the session its answers belong to.
                            if let Some(s) = session_key(None, &data) {
                                self.session = Some(s);
                            }
                            continue;
                        }
                        self.messages(data.as_bytes()).await;
                    }
                    Err(e) => {
                        self.malformed(format!("broken SSE stream: {e}"));
                        break;
                    }
                }
            }
            self.client_closed |= gone.load(Ordering::Relaxed);
            end = end_slot.lock().expect("end slot").take();
            // Trailers come after the last event, whose record is written: the exchange's
            // HTTP record carries them (see `finish`).
            if let Some(t) = trailers_slot.lock().expect("trailers slot").take() {
                self.trailers(&t);
                self.trailers_late = true;
            }
        } else {
            let mut rx = rx;
            let mut captured = BytesMut::new();
            let mut truncated = false;
            while let Some(chunk) = rx.recv().await {
                let chunk = match chunk {
                    Chunk::Data(b) => b,
                    // Before the end, and before the body's records: they carry them.
                    Chunk::Trailers(t) => {
                        self.trailers(&t);
                        continue;
                    }
                    Chunk::End(release) => {
                        end = Some(release);
                        break;
                    }
                    Chunk::ClientGone => {
                        self.client_closed = true;
                        break;
                    }
                };
                self.resp_bytes += chunk.len() as u64;
                if captured.len() + chunk.len() <= parse_limit(self.conn.capture_limit()) {
                    captured.extend_from_slice(&chunk);
                } else {
                    truncated = true;
                }
            }
            if let Some(why) = unreadable {
                if self.is_mcp {
                    self.malformed(format!("{why}; relayed, not parsed"));
                }
            } else if json && !captured.is_empty() {
                let limit = parse_limit(self.conn.capture_limit());
                if truncated {
                    self.malformed(format!(
                        "the response is larger than the parse limit ({limit} bytes); relayed, not parsed"
                    ));
                } else {
                    match body::decode(captured.freeze(), &self.codings, limit).await {
                        Ok(decoded) => self.messages(&decoded).await,
                        Err(e) => self.malformed(format!("{e}; relayed, not parsed")),
                    }
                }
            }
        }
        end
    }

    /// The records due when the response is over: the HTTP record of a non-MCP exchange, or
    /// an outcome for every request left unanswered.
    fn finish(&mut self) {
        if !self.is_mcp || self.trailers_late {
            let e = self.conn.http_event(
                &self.http,
                self.token.as_ref(),
                ByteCounts {
                    req: self.req_bytes,
                    resp: self.resp_bytes,
                },
                self.t0,
                None,
            );
            self.emit(e);
            if !self.is_mcp {
                return;
            }
        }
        let status = self.http.status.unwrap_or(0);
        // 202 Accepted: the answers come on another stream; the correlator links them.
        if status == 202 {
            return;
        }
        // Requests the response ended without answering: say so rather than lose them.
        let unanswered: Vec<(String, String)> = self.pending.drain().collect();
        for (id, _) in &unanswered {
            self.conn
                .parts
                .correlator
                .close(self.scope(), Direction::ClientToServer, id);
        }
        let unanswered: Vec<String> = unanswered.into_iter().map(|(_, ex)| ex).collect();
        for exchange in unanswered {
            let mut e = self.conn.mcp_event(
                exchange,
                Direction::ServerToClient,
                &self.http,
                self.token.as_ref(),
            );
            e.message = Some(Kind::Error);
            e.error = Some(if self.client_closed {
                e.client_closed = true;
                serde_json::json!({
                    "mcptrail": "the client closed the response stream before an answer: the request is cancelled (2026-07-28), or the subscription ended"
                })
            } else {
                serde_json::json!({
                    "mcptrail": format!("the response (HTTP {status}) ended without an answer to this request")
                })
            });
            e.elapsed_us = Some(self.t0.elapsed().as_micros() as u64);
            self.emit(Event::Mcp(Box::new(e)));
        }
    }

    /// The session, or this connection when there is none (as in 2026-07-28).
    fn scope(&self) -> &str {
        self.session.as_deref().unwrap_or(&self.conn.id)
    }

    async fn messages(&mut self, bytes: &[u8]) {
        match mcp::parse_each(bytes) {
            Ok(mcp::Parsed { items, batch }) => {
                for (i, item) in items.into_iter().enumerate() {
                    let m = match item {
                        Ok(m) => m,
                        Err(e) => {
                            self.malformed(if batch {
                                format!("element {} of the batch: {e}", i + 1)
                            } else {
                                e.to_string()
                            });
                            continue;
                        }
                    };
                    let exchange = match (m.kind, &m.id) {
                        (Kind::Response | Kind::Error, Some(id)) => {
                            let id = id.to_string();
                            let here = self.pending.remove(&id);
                            let elsewhere = self.conn.parts.correlator.close(
                                self.scope(),
                                Direction::ClientToServer,
                                &id,
                            );
                            here.or(elsewhere)
                                .unwrap_or_else(|| format!("{}.a{}", self.base, i))
                        }
                        // Frames of a `subscriptions/listen` stream belong to the listen request.
                        (Kind::Notification, _)
                            if mcp::subscription_id(&m).is_some_and(|id| {
                                self.pending.contains_key(&id)
                                    || self
                                        .conn
                                        .parts
                                        .correlator
                                        .related(self.scope(), Direction::ClientToServer, &id)
                                        .is_some()
                            }) =>
                        {
                            let id = mcp::subscription_id(&m).expect("checked above");
                            self.pending.get(&id).cloned().unwrap_or_else(|| {
                                self.conn
                                    .parts
                                    .correlator
                                    .related(self.scope(), Direction::ClientToServer, &id)
                                    .expect("checked above")
                            })
                        }
                        // Progress reports on the request that asked for it.
                        (Kind::Notification, _)
                            if m.method.as_deref() == Some("notifications/progress")
                                && param(&m, "progressToken")
                                    .and_then(|t| {
                                        self.conn.parts.correlator.progress(self.scope(), &t)
                                    })
                                    .is_some() =>
                        {
                            let token = param(&m, "progressToken").expect("checked above");
                            self.conn
                                .parts
                                .correlator
                                .progress(self.scope(), &token)
                                .expect("checked above")
                        }
                        _ => {
                            self.server_messages += 1;
                            let exchange = format!("{}.s{}", self.base, self.server_messages);
                            if let (Kind::Request, Some(id), Some(session)) =
                                (m.kind, &m.id, &self.session)
                            {
                                self.conn.parts.correlator.open(
                                    session,
                                    Direction::ServerToClient,
                                    &id.to_string(),
                                    &exchange,
                                );
                            }
                            exchange
                        }
                    };
                    // An answer asking for more input: its retry (echoing the state) continues
                    // this logical call.
                    if let Some(Some(state)) = mcp::input_required(&m) {
                        let (logical, round) = self
                            .conn
                            .parts
                            .correlator
                            .round_of(&exchange)
                            .unwrap_or_else(|| (exchange.clone(), 0));
                        self.conn
                            .parts
                            .correlator
                            .open_retry(&state, &logical, round + 1);
                    }
                    let mut e = self.conn.message_event(
                        exchange,
                        Direction::ServerToClient,
                        &self.http,
                        Cred {
                            token: self.token.as_ref(),
                            raw: self.raw_token.as_deref(),
                        },
                        m,
                        batch,
                    );
                    e.first_byte_us = Some(self.first_byte_us);
                    e.elapsed_us = Some(self.t0.elapsed().as_micros() as u64);
                    self.emit(Event::Mcp(Box::new(e)));
                }
            }
            Err(err) => self.malformed(err.to_string()),
        }
    }

    fn malformed(&self, why: String) {
        let mut e = self.conn.mcp_event(
            format!("{}.m", self.base),
            Direction::ServerToClient,
            &self.http,
            self.token.as_ref(),
        );
        e.malformed = Some(why);
        e.elapsed_us = Some(self.t0.elapsed().as_micros() as u64);
        self.emit(Event::Mcp(Box::new(e)));
    }
}
