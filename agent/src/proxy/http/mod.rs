//! HTTP/1.1 between a redirected client and its gateway, with MCP understood on the way.
//!
//! hyper serves the client and drives the gateway side (`gateway.rs`), so keep-alive, chunked
//! bodies, `Host` and every header pass as they came. Per request: the body is read (bounded)
//! and decoded (`body.rs`), a pure plan decides (`plan.rs`), the request's records are made
//! durable (`records.rs`), and the plan is carried out here: refused (`respond.rs`), held for
//! an operator, or forwarded (wire rules in `wire.rs`). The response streams to the client
//! through a tee (`tee.rs`) whose copy feeds the observer (`observe.rs`), so the audit never
//! delays the client's first byte.
#![forbid(unsafe_code)]

pub mod body;
pub mod gateway;
pub mod h2c;
mod observe;
mod park;
pub mod plan;
pub mod records;
pub mod respond;
pub mod tee;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use self::body::{BodyError, Encoding, Prefixed};
pub use self::gateway::Version;
use self::gateway::{BoxIo, Connect, Gateway, GatewayError, Io};
use self::plan::{Action, BodyView, Head, Plan, Refusal};
use self::records::{Conn, Cred};
use self::respond::ProxyBody;
use super::OnAuditFailure;
use super::correlate::session_key;
use crate::audit::record::{
    ApprovalEvent, Bytes as ByteCounts, Decision, DecisionAction, Direction, Event, HttpInfo,
    Process, Token, now_rfc3339,
};
use crate::identity::Caller;
use crate::mcp::{Kind, Message};
use crate::policy::access::Call;
use crate::policy::approvals::{Held, HeldItem};
use crate::policy::live::Active;

pub use self::records::ConnParts;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("serving the client failed: {0}")]
    Serve(String),
    #[error("the client's connection failed: {0}")]
    Connection(String),
    #[error(
        "the client was cut off (a flood of HTTP/2 resets or frames past the [http2] limits, or it stopped reading): {0}"
    )]
    CutOff(String),
}

/// How much of a body is read to find its messages: more than is kept, so that a big
/// argument still leaves its method, name and id in the record (its value then cut with a
/// marker), yet bounded, so that memory is too. A body past it cannot be checked: it gets the
/// policy's `unparsed` action.
pub fn parse_limit(capture_limit: usize) -> usize {
    capture_limit.saturating_mul(16).max(16 * 1024 * 1024)
}

/// How long a client may take to send a request's head.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most a client's HTTP/1.1 connection buffers: the largest request head it may send
/// (past it, 431), and the most read from its socket at once. hyper's read buffer grows with
/// the reads and keeps its size for the connection's life. 2,000 idle connections that had
/// carried 64 KiB calls held 138 KiB each at hyper's default (about 400 KiB), 109 KiB with
/// 64 KiB here, 14 KiB with 32 KiB (measured, 2026-12-01; 16 KiB calls: 66 KiB in all three).
const CLIENT_READ_BUF: usize = 32 * 1024;

/// The shortest interval between two looks at whether a client's gateway connection is idle.
const MIN_IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Serves `client` in `version` (HTTP/1.1, or HTTP/2 when the client opened with its
/// preface or agreed on `h2` by ALPN), forwarding every request to the gateway in
/// `upstream_version` (the same, except for an h2c client of a gateway that speaks only
/// HTTP/1.1), first over `upstream`, then over connections `connect` opens when the gateway
/// closes one. One server for both versions, so every request takes the same pipeline.
pub async fn serve<C: Io>(
    client: C,
    upstream: BoxIo,
    connect: Connect,
    conn: Arc<Conn>,
    version: Version,
    upstream_version: Version,
) -> Result<(), HttpError> {
    let gateway = Arc::new(Gateway::new(upstream, connect, upstream_version).await?);
    let served = match version {
        Version::Http1 => park::serve(client, conn, gateway).await,
        Version::Http2 => serve_http2(client, conn, gateway).await,
    };
    match served {
        Ok(()) => Ok(()),
        Err(e) => match e.downcast::<hyper::Error>() {
            // A client that hangs up between or in the middle of its own requests ends the
            // connection; every exchange it completed is already recorded.
            Ok(e) if e.is_incomplete_message() || e.is_canceled() => Ok(()),
            Ok(e) => Err(explain_serve(*e)),
            Err(e) => Err(HttpError::Connection(e.to_string())),
        },
    }
}

/// One request, in a task of its own: a client that hangs up (or resets the stream) does not
/// cancel the recording of what it already sent (hyper drops the service future). The
/// future this returns is the one hyper holds: if hyper drops it first, the client reset the
/// stream (or went away) before its answer, which the handler learns from `gone`.
fn exchange(
    conn: &Arc<Conn>,
    gateway: &Arc<Gateway>,
    req: Request<Incoming>,
    stream: Option<u32>,
) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + use<> {
    let (alive, gone) = tokio::sync::oneshot::channel::<()>();
    let task =
        conn.parts
            .tracker
            .clone()
            .spawn(handle(conn.clone(), gateway.clone(), req, stream, gone));
    async move {
        let _alive = alive;
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request handler failed");
            respond::handler_failed()
        })
    }
}

/// An HTTP/2 client (by its preface, or `h2` agreed by ALPN): hyper's HTTP/2 server, every
/// stream through the same pipeline.
async fn serve_http2<C: Io>(
    client: C,
    conn: Arc<Conn>,
    gateway: Arc<Gateway>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let limits = conn.parts.policy.current().policy.http2;
    // Streams, counted in the order hyper takes them up (the order the client opened them),
    // so concurrent exchanges on one connection keep their own numbers.
    let streams = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let service = {
        let (conn, gateway) = (conn.clone(), gateway.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let stream = streams.fetch_add(1, Ordering::Relaxed).saturating_mul(2) + 1;
            let answer = exchange(&conn, &gateway, req, Some(stream));
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_frame_size(limits.max_frame_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.max_local_error_reset_streams)
        .keep_alive_interval(
            (limits.keep_alive_interval_secs > 0)
                .then(|| std::time::Duration::from_secs(limits.keep_alive_interval_secs)),
        )
        .keep_alive_timeout(std::time::Duration::from_secs(
            limits.keep_alive_interval_secs.max(1),
        ));
    let serving = builder.serve_connection(TokioIo::new(client), service);
    // The gateway may speak only HTTP/1.1 (an h2c client of such a gateway): its
    // connections are closed when unused, as an HTTP/1.1 client's are.
    let Some(idle) = conn.parts.upstream_idle else {
        return Ok(serving.await?);
    };
    tokio::pin!(serving);
    let mut check = tokio::time::interval((idle / 4).max(MIN_IDLE_CHECK));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut serving => return Ok(r?),
            _ = check.tick() => {
                if gateway.release_if_idle(idle) {
                    tracing::debug!(
                        client = %conn.connection.client,
                        "closed an idle gateway connection; the next request opens another"
                    );
                }
            }
        }
    }
}

/// A request the gateway never answered (it failed, or the client reset the stream first).
struct Unanswered<'a> {
    http: &'a HttpInfo,
    token: Option<&'a crate::audit::record::Token>,
    t0: Instant,
    req_bytes: u64,
    is_mcp: bool,
}

impl Unanswered<'_> {
    /// Its outcome: an `mcp` error record per exchange waiting (by request text), or the
    /// `http` record of a request that was not MCP.
    async fn record(
        &self,
        conn: &Conn,
        pending: &HashMap<String, String>,
        why: &str,
        client_closed: bool,
    ) {
        let mut events = Vec::with_capacity(pending.len() + 1);
        for exchange in pending.values() {
            let mut ev = conn.mcp_event(
                exchange.clone(),
                Direction::ServerToClient,
                self.http,
                self.token,
            );
            ev.message = Some(Kind::Error);
            ev.client_closed = client_closed;
            ev.error = Some(serde_json::json!({"mcptrail": why}));
            ev.elapsed_us = Some(self.t0.elapsed().as_micros() as u64);
            events.push(Event::Mcp(Box::new(ev)));
        }
        if !self.is_mcp {
            events.push(conn.http_event(
                self.http,
                self.token,
                ByteCounts {
                    req: self.req_bytes,
                    resp: 0,
                },
                self.t0,
                Some(why.to_owned()),
            ));
        }
        conn.record_all(events).await;
    }
}

/// A connection hyper gave up on, in words an operator can act on: an HTTP/2 client cut off
/// for abuse is told apart (its connection is recorded as refused).
fn explain_serve(e: hyper::Error) -> HttpError {
    use std::error::Error as _;
    if crate::proxy::stall::is_stalled(&e) {
        return HttpError::CutOff(format!(
            "{e}: it read nothing the proxy sent it within `[gateway] stalled_client_secs`"
        ));
    }
    let h2 = e
        .source()
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    match h2 {
        Some(h2::Reason::ENHANCE_YOUR_CALM) => HttpError::CutOff(e.to_string()),
        Some(reason) => HttpError::Serve(format!("{e} (HTTP/2 {reason:?})")),
        None => HttpError::Serve(e.to_string()),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A request the client sent, in the ids (as JSON text and value) and exchanges its answers
/// belong to.
struct Pending {
    text: String,
    id: Value,
    exchange: String,
}

/// What the request side hands on: its records are written; the rest depends on the plan.
struct Recorded {
    pending: Vec<Pending>,
    ok: bool,
}

async fn handle(
    conn: Arc<Conn>,
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
    stream: Option<u32>,
    gone: tokio::sync::oneshot::Receiver<()>,
) -> Response<ProxyBody> {
    let t0 = Instant::now();
    let n = conn.requests.fetch_add(1, Ordering::Relaxed);
    let base = format!("{}.{n}", conn.id);
    let (mut parts, body) = req.into_parts();
    let mut http = HttpInfo {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |p| p.to_string()),
        session_id: header(&parts.headers, "mcp-session-id"),
        protocol_version: header(&parts.headers, "mcp-protocol-version"),
        mcp_method: header(&parts.headers, "mcp-method"),
        mcp_name: header(&parts.headers, "mcp-name"),
        version: Some(
            match parts.version {
                hyper::Version::HTTP_10 => "1.0",
                hyper::Version::HTTP_2 => "2",
                _ => "1.1",
            }
            .to_owned(),
        ),
        stream,
        upstream_version: (gateway.version() == Version::Http1
            && parts.version == hyper::Version::HTTP_2)
            .then(|| "1.1".to_owned()),
        ..Default::default()
    };
    // Verified once per token (cached by fingerprint); the raw value stays in memory for this
    // exchange only, to scrub it from what is recorded.
    let (token, raw_token) = match conn.parts.verifier.token(&parts.headers).await {
        Some((token, raw)) => {
            conn.redact_token(&raw.value, &token.fingerprint);
            (Some(token), Some(raw.value))
        }
        None => (None, None),
    };
    let active = conn.parts.policy.current();
    if active.masker.has_wire_rules() {
        wire::mask_header_values(
            &active.masker,
            &mut parts.headers,
            conn.parts.verifier.token_headers(),
        );
    }
    // The gateway credential, set by the agent: the caller never holds it.
    http.brokered = active
        .broker
        .apply(&conn.connection.original_dst, &mut parts.headers);
    let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    // Set when an HTTP/1.1 connection is served in rounds (`park.rs`): a switch is joined there.
    let switch = parts.extensions.remove::<park::Switch>();
    let is_connect = parts.method == Method::CONNECT;

    let limit = parse_limit(conn.capture_limit());
    let (raw, rest) = match body::read_prefix(body, limit).await {
        Ok(r) => r,
        Err(e) => {
            let error = BodyError::Read(e).to_string();
            records::mask_http(&active, &mut http);
            conn.record(conn.http_event(
                &http,
                token.as_ref(),
                ByteCounts::default(),
                t0,
                Some(error.clone()),
            ))
            .await;
            return respond::bad_request(&error);
        }
    };
    let req_bytes = raw.len() as u64;
    let codings = body::encodings(&parts.headers);
    let view = read_view(&raw, rest.is_some(), &codings, limit).await;
    let process = conn.process();
    let plan = plan_request(
        &Head {
            method: parts.method.as_str(),
            content_type: parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            mcp_method: http.mcp_method.as_deref(),
            mcp_name: http.mcp_name.as_deref(),
            switches_protocol: is_connect || parts.headers.contains_key(hyper::header::UPGRADE),
        },
        &view,
        &active,
        Caller {
            process: &process,
            token: token.as_ref(),
        },
        &conn.connection.original_dst,
    );
    count_calls(&plan);
    // Correlation uses the path as sent; the record keeps it masked.
    let session = session_key(http.session_id.as_deref(), &http.path);
    records::mask_http(&active, &mut http);
    let cred = Cred {
        token: token.as_ref(),
        raw: raw_token.as_deref(),
    };

    // Wire masking: what the gateway gets, when a `wire = true` rule matches a body read whole.
    let wire_body = match (&view, &plan.action) {
        (BodyView::Read(decoded), Action::Forward | Action::Hold(_))
            if active.masker.has_wire_rules() =>
        {
            wire::wire_rewrite(&active.masker, decoded)
        }
        _ => None,
    };
    let is_mcp = plan.action != Action::Plain;
    let batch = plan.batch;
    let action = plan.action.clone();
    let held = match &plan.action {
        Action::Hold(items) => held_calls(&plan, items),
        _ => Vec::new(),
    };
    // The request's records are durable before the gateway sees a byte of it. The messages
    // move into their records: no copy of the bodies.
    let recorded = record_request(
        &conn,
        &base,
        &http,
        cred,
        &session,
        plan,
        wire_body.is_some(),
    )
    .await;
    let ids: Vec<Value> = recorded.pending.iter().map(|p| p.id.clone()).collect();
    if !recorded.ok && conn.parts.on_failure == OnAuditFailure::Block {
        // Nothing unaudited reaches the gateway: the caller gets a clear error instead.
        conn.parts.stats.blocked.fetch_add(1, Ordering::Relaxed);
        return respond::audit_down(&ids, batch);
    }
    let held_since = Instant::now();
    let is_held = matches!(action, Action::Hold(_));
    let refusal = match action {
        Action::Refuse(r) => Some(r),
        Action::Hold(_) => Box::pin(hold_for_approval(
            &conn,
            held,
            &recorded.pending,
            &process,
            token.as_ref(),
            &base,
        ))
        .await
        .err()
        .map(Refusal::Policy),
        Action::Forward | Action::Plain => None,
    };
    // The agent's share: the wait for an operator's approval is not time the agent added.
    let waited = if is_held {
        held_since.elapsed()
    } else {
        std::time::Duration::ZERO
    };
    if let Some(refusal) = refusal {
        if matches!(refusal, Refusal::Unparsed(_)) {
            conn.parts
                .stats
                .unreadable_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(rest) = rest {
            body::drain(rest).await;
        }
        return Box::pin(refuse(
            &conn,
            &http,
            token.as_ref(),
            &session,
            recorded.pending,
            batch,
            &refusal,
            t0,
        ))
        .await;
    }

    let mut prefix = raw;
    if let Some(rewritten) = wire_body {
        let rewritten = match codings.as_deref() {
            Ok([]) | Err(_) => Ok(rewritten),
            Ok(c) => Box::pin(body::encode(rewritten, c)).await,
        };
        match rewritten {
            Ok(bytes) => {
                // The length changes with the rewrite; a chunked body is re-chunked by hyper.
                if parts.headers.contains_key(CONTENT_LENGTH) {
                    parts
                        .headers
                        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                }
                prefix = bytes;
            }
            // Never the unmasked original: a wire rule said it must not leave.
            Err(e) => return respond::bad_request(&e.to_string()),
        }
    }
    let body = Prefixed {
        prefix: (!prefix.is_empty()).then_some(prefix),
        rest,
    }
    .boxed_unsync();
    let upstream_req = Request::from_parts(parts, body);
    let pending: HashMap<String, String> = recorded
        .pending
        .into_iter()
        .map(|p| (p.text, p.exchange))
        .collect();
    // An HTTP/2 stream the client resets before its answer cancels the gateway's stream too
    // (dropping the call resets it). Over HTTP/1.1 the request is already on its way and the
    // connection is the client's alone: the answer is still awaited and recorded.
    crate::metrics::get()
        .request_added_seconds
        .observe(t0.elapsed().saturating_sub(waited).as_secs_f64());
    let sent = if stream.is_some() {
        tokio::select! {
            sent = gateway.send(upstream_req) => sent,
            _ = gone => {
                let why = "the client reset the stream before the gateway answered: the gateway's stream is cancelled";
                let scope = session.as_deref().unwrap_or(&conn.id);
                for id in pending.keys() {
                    conn.parts
                        .correlator
                        .close(scope, Direction::ClientToServer, id);
                }
                let unanswered = Unanswered { http: &http, token: token.as_ref(), t0, req_bytes, is_mcp };
                unanswered.record(&conn, &pending, why, true).await;
                return respond::handler_failed();
            }
        }
    } else {
        drop(gone);
        gateway.send(upstream_req).await
    };
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            let why = format!("the MCP gateway failed: {e}");
            tracing::warn!(conn = %conn.id, error = %e, "upstream request failed");
            let unanswered = Unanswered {
                http: &http,
                token: token.as_ref(),
                t0,
                req_bytes,
                is_mcp,
            };
            unanswered.record(&conn, &pending, &why, false).await;
            return respond::gateway_failed(&ids, batch, &why);
        }
    };
    let got_head = Instant::now();
    let first_byte_us = t0.elapsed().as_micros() as u64;
    http.status = Some(resp.status().as_u16());
    http.content_type = header(resp.headers(), CONTENT_TYPE.as_str());
    let mut resp = resp;
    // A protocol switch, or a tunnel the gateway agreed to: from here on, raw bytes.
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (is_connect && resp.status().is_success());
    if switched && let Some(client_upgrade) = client_upgrade {
        let upstream = hyper::upgrade::on(&mut resp);
        match switch {
            Some(switch) => switch.set(upstream),
            None => bridge_upgrade(client_upgrade, upstream, conn.id.clone()),
        }
    }
    let (rparts, rbody) = resp.into_parts();
    let resp_codings = body::encodings(&rparts.headers);
    let (tx, rx) = mpsc::unbounded_channel();
    let wire = is_mcp && active.masker.has_wire_rules();
    let response_type = http.content_type.clone().unwrap_or_default();
    let observed = observe::Observed {
        conn: conn.clone(),
        http,
        token,
        raw_token,
        base,
        pending,
        t0,
        first_byte_us,
        is_mcp,
        trailers_late: false,
        req_bytes,
        server_messages: 0,
        resp_bytes: 0,
        session,
        writer: None,
        client_closed: false,
        codings: resp_codings
            .as_ref()
            .map_or_else(|_| Vec::new(), Clone::clone),
        codings_error: resp_codings
            .as_ref()
            .err()
            .map(|e| format!("the response: {e}")),
    };
    conn.parts.tracker.spawn(observed.run(rx));
    let tee = tee::Tee::new(rbody, tx);
    let response = match (wire, resp_codings) {
        (true, Ok(codings)) => {
            Box::pin(wire_response(
                rparts,
                tee,
                &active,
                &response_type,
                &codings,
                limit,
            ))
            .await
        }
        // A coding the proxy cannot undo cannot be rewritten either: it passes as it came, and
        // the observer records that it could not be read.
        _ => Response::from_parts(rparts, tee.boxed_unsync()),
    };
    crate::metrics::get()
        .response_added_seconds
        .observe(got_head.elapsed().as_secs_f64());
    response
}

/// Counts the client's requests and notifications by method and what the access rules said.
fn count_calls(plan: &Plan) {
    let calls = &crate::metrics::get().calls;
    for item in &plan.items {
        let Ok(m) = &item.message else { continue };
        if !matches!(m.kind, Kind::Request | Kind::Notification) {
            continue;
        }
        let method = crate::metrics::method_label(m.method.as_deref().unwrap_or(""));
        let decision = item.decision.as_ref().map_or("none", |d| d.action.as_str());
        calls.with_label_values(&[method, decision]).inc();
    }
}

/// The plan for a request under the policy in force, for `caller` calling `destination` (the
/// gateway as records show it). The proxy and `mcptrail policy test` both decide here.
pub fn plan_request(
    head: &Head<'_>,
    body: &BodyView,
    active: &Active,
    caller: Caller<'_>,
    destination: &str,
) -> Plan {
    plan::plan(head, body, active.gateway.unparsed, |m| {
        active.access.decide(&Call {
            caller,
            method: m.method.as_deref(),
            name: m.name.as_deref(),
            uri: m.uri.as_deref(),
            destination,
        })
    })
}

/// The body as the plan sees it: empty, read and decoded, or why it could not be.
async fn read_view(
    raw: &bytes::Bytes,
    more: bool,
    codings: &Result<Vec<Encoding>, BodyError>,
    limit: usize,
) -> BodyView {
    if more {
        return BodyView::Unreadable(
            BodyError::TooLarge {
                limit,
                decoded: false,
            }
            .to_string(),
        );
    }
    if raw.is_empty() {
        return BodyView::Empty;
    }
    match codings {
        Err(e) => BodyView::Unreadable(e.to_string()),
        Ok(c) if c.is_empty() => BodyView::Read(raw.clone()),
        Ok(c) => match body::decode(raw.clone(), c, limit).await {
            Ok(decoded) => BodyView::Read(decoded),
            Err(e) => BodyView::Unreadable(e.to_string()),
        },
    }
}

/// Writes the records of a request's messages, linking each to what it answers or belongs
/// to; returns the requests owed an answer.
async fn record_request(
    conn: &Conn,
    base: &str,
    http: &HttpInfo,
    cred: Cred<'_>,
    session: &Option<String>,
    plan: Plan,
    wire_masked: bool,
) -> Recorded {
    let mut out = Recorded {
        pending: Vec::new(),
        ok: true,
    };
    if plan.action == Action::Plain {
        return out;
    }
    let refused = match &plan.action {
        Action::Refuse(r) => Some(r.decision()),
        _ => None,
    };
    let unparsed_decision = match &plan.action {
        Action::Refuse(r @ Refusal::Unparsed(_)) => Some(r.decision()),
        _ => None,
    };
    if let Some(why) = &plan.unreadable {
        let mut e = conn.mcp_event(
            format!("{base}.0"),
            Direction::ClientToServer,
            http,
            cred.token,
        );
        e.malformed = Some(match &refused {
            Some(_) => format!("{why}; refused, not forwarded"),
            None => format!("{why}; forwarded, not checked"),
        });
        e.decision = unparsed_decision.clone();
        out.ok &= conn.record(Event::Mcp(Box::new(e))).await;
        return out;
    }
    // Without a session, links reach as far as this connection.
    let scope = session.as_deref().unwrap_or(&conn.id).to_owned();
    let batch = plan.batch;
    // A batch's records go as one write: the request waits for one sync, not one each.
    let mut events = Vec::with_capacity(plan.items.len());
    for (i, item) in plan.items.into_iter().enumerate() {
        let exchange = format!("{base}.{i}");
        let m = match item.message {
            Ok(m) => m,
            Err(err) => {
                let mut e = conn.mcp_event(exchange, Direction::ClientToServer, http, cred.token);
                let why = if batch {
                    format!("element {} of the batch: {err}", i + 1)
                } else {
                    err.to_string()
                };
                e.malformed = Some(match &refused {
                    Some(_) => format!("{why}; refused, not forwarded"),
                    None => format!("{why}; forwarded, not checked"),
                });
                e.batch = batch;
                e.decision = unparsed_decision.clone();
                events.push(Event::Mcp(Box::new(e)));
                continue;
            }
        };
        let exchange = link_request(conn, &scope, session, &m, exchange, &mut out.pending).await;
        // A retry of an `input_required` round joins its logical call.
        let retry = (m.kind == Kind::Request)
            .then(|| crate::mcp::request_state(&m))
            .flatten()
            .and_then(|state| conn.parts.correlator.retry(&state));
        if let Some((logical, round)) = &retry {
            conn.parts.correlator.note_round(&exchange, logical, *round);
        }
        let mut e = conn.message_event(exchange, Direction::ClientToServer, http, cred, m, batch);
        e.header_mismatch = item.header_mismatch;
        e.decision = item.decision;
        e.wire_masked = wire_masked;
        if let Some((logical, round)) = retry {
            e.logical_call = Some(logical);
            e.round = Some(round);
        }
        events.push(Event::Mcp(Box::new(e)));
    }
    out.ok &= conn.record_all(events).await;
    out
}

/// Links a message the client sent: a request opens an exchange that its answer closes (and
/// its progress reports join); a cancellation joins the request it cancels; an answer to a
/// server's request joins that request's exchange. Returns the exchange it belongs to.
async fn link_request(
    conn: &Conn,
    scope: &str,
    session: &Option<String>,
    m: &Message,
    exchange: String,
    pending: &mut Vec<Pending>,
) -> String {
    let correlator = &conn.parts.correlator;
    match (m.kind, &m.id, session) {
        (Kind::Request, Some(id), _) => {
            let text = id.to_string();
            correlator.open(scope, Direction::ClientToServer, &text, &exchange);
            if let Some(token) = progress_token(m) {
                correlator.open_progress(scope, &token, &exchange);
            }
            pending.push(Pending {
                text,
                id: id.clone(),
                exchange: exchange.clone(),
            });
            exchange
        }
        (Kind::Notification, _, _) if m.method.as_deref() == Some("notifications/cancelled") => {
            param(m, "requestId")
                .and_then(|id| correlator.related(scope, Direction::ClientToServer, &id))
                .unwrap_or(exchange)
        }
        (Kind::Response | Kind::Error, Some(id), Some(session)) => {
            answered(conn, session, &id.to_string())
                .await
                .unwrap_or(exchange)
        }
        _ => exchange,
    }
}

/// The gateway's response with the wire rules applied: a JSON body read whole (its length
/// changes when a rule matches), an SSE stream re-framed event by event.
async fn wire_response(
    mut rparts: hyper::http::response::Parts,
    tee: tee::Tee,
    active: &Arc<Active>,
    response_type: &str,
    codings: &[Encoding],
    limit: usize,
) -> Response<ProxyBody> {
    if response_type.starts_with("text/event-stream") {
        if codings.is_empty() {
            return Response::from_parts(
                rparts,
                wire::wire_sse(tee.into_data_stream(), active.clone()),
            );
        }
        // Decoded for the rules and sent on decoded: an event stream cannot be re-encoded
        // event by event without holding events back.
        rparts.headers.remove(CONTENT_ENCODING);
        rparts.headers.remove(CONTENT_LENGTH);
        let encoded = tee
            .into_data_stream()
            .map(|r| r.map_err(std::io::Error::other));
        let decoded = tokio_util::io::ReaderStream::new(body::decoding_reader(
            tokio_util::io::StreamReader::new(encoded),
            codings,
        ));
        return Response::from_parts(rparts, wire::wire_sse(decoded, active.clone()));
    }
    if !response_type.contains("json") {
        return Response::from_parts(rparts, tee.boxed_unsync());
    }
    // Bounded: a wire rule forbids passing on what it has not read, so a body past the
    // parse limit is refused rather than buffered without end.
    let bytes = match http_body_util::Limited::new(tee, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return respond::response_broke_off(&e.to_string()),
    };
    let rewritten = match body::decode(bytes.clone(), codings, limit).await {
        Ok(decoded) => wire::wire_rewrite(&active.masker, &decoded),
        // Not readable: the observer records why; the bytes go as they came.
        Err(_) => None,
    };
    let body = match rewritten {
        Some(r) => match body::encode(r, codings).await {
            Ok(encoded) => {
                rparts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(encoded.len()));
                rparts.headers.remove(hyper::header::TRANSFER_ENCODING);
                encoded
            }
            Err(e) => return respond::response_broke_off(&e.to_string()),
        },
        None => bytes,
    };
    Response::from_parts(rparts, respond::full(body))
}

/// A call the rules held, as the approver sees it.
struct HeldCall {
    index: usize,
    id: Option<Value>,
    method: Option<String>,
    name: Option<String>,
    decision: Decision,
}

fn held_calls(plan: &Plan, items: &[usize]) -> Vec<HeldCall> {
    items
        .iter()
        .filter_map(|&index| {
            let item = plan.items.get(index)?;
            let m = item.message.as_ref().ok()?;
            Some(HeldCall {
                index,
                id: m.id.clone(),
                method: m.method.clone(),
                name: m.name.clone().or_else(|| m.uri.clone()),
                decision: item.decision.clone()?,
            })
        })
        .collect()
}

/// Holds the request's held calls (all of them, listed together) until an operator decides
/// or the shortest of their rules' timeouts passes; `Ok` when approved, else the refusal to
/// answer with. Each step is an `approval` record.
async fn hold_for_approval(
    conn: &Conn,
    held: Vec<HeldCall>,
    pending: &[Pending],
    process: &Process,
    token: Option<&Token>,
    base: &str,
) -> Result<(), Decision> {
    let timeout = held
        .iter()
        .filter_map(|c| c.decision.timeout_secs)
        .min()
        .unwrap_or(crate::policy::access::DEFAULT_APPROVAL_TIMEOUT_SECS);
    let calls: Vec<HeldItem> = held
        .into_iter()
        .map(|c| HeldItem {
            // The exchange the request's records carry (a request opens its own).
            exchange: c
                .id
                .as_ref()
                .and_then(|id| pending.iter().find(|p| &p.id == id))
                .map_or_else(|| format!("{base}.{}", c.index), |p| p.exchange.clone()),
            method: c.method,
            name: c.name,
            rule: c.decision.rule.unwrap_or_default(),
        })
        .collect();
    let Some(first) = calls.first() else {
        return Ok(());
    };
    let rule = first.rule.clone();
    let held = Held {
        id: 0,
        since: now_rfc3339(),
        timeout_secs: timeout,
        rule: rule.clone(),
        exchange: first.exchange.clone(),
        pid: process.pid,
        exe: process.exe.clone(),
        sub: token.filter(|t| t.verified).and_then(|t| t.sub.clone()),
        ci: process.ci.as_ref().map(|ci| {
            format!(
                "{}:{}",
                ci.provider.as_deref().unwrap_or("ci"),
                ci.run.as_deref().or(ci.job.as_deref()).unwrap_or("-")
            )
        }),
        method: first.method.clone(),
        name: first.name.clone(),
        destination: conn.connection.original_dst.clone(),
        calls: if calls.len() > 1 {
            calls.clone()
        } else {
            Vec::new()
        },
    };
    let (id, verdict) = conn.parts.approvals.hold(held.clone());
    let held = Held { id, ..held };
    let event = |outcome: &str, approver, reason, waited_ms| {
        Event::Approval(ApprovalEvent {
            time: now_rfc3339(),
            id,
            outcome: outcome.to_owned(),
            held: held.clone(),
            approver,
            reason,
            waited_ms,
        })
    };
    conn.record(event("requested", None, None, None)).await;
    tracing::warn!(
        id,
        rule = %rule,
        pid = held.pid,
        calls = calls.len(),
        what = held.name.as_deref().or(held.method.as_deref()).unwrap_or("?"),
        "a call waits for approval: `mcptrail approve {id}` or `mcptrail deny {id}`"
    );
    let t0 = Instant::now();
    let decided = tokio::time::timeout(std::time::Duration::from_secs(timeout), verdict).await;
    let waited = Some(t0.elapsed().as_millis() as u64);
    match decided {
        Ok(Ok(v)) if v.approved => {
            conn.record(event("approved", Some(v.approver), v.reason, waited))
                .await;
            Ok(())
        }
        Ok(Ok(v)) => {
            let who = v
                .approver
                .user
                .clone()
                .unwrap_or_else(|| format!("uid {}", v.approver.uid));
            let message = match &v.reason {
                Some(r) => format!("an approver ({who}) denied it: {r}"),
                None => format!("an approver ({who}) denied it"),
            };
            conn.record(event("denied", Some(v.approver), v.reason, waited))
                .await;
            Err(Decision {
                action: DecisionAction::Deny,
                rule: Some(rule),
                message: Some(message),
                timeout_secs: None,
            })
        }
        Ok(Err(_)) | Err(_) => {
            conn.parts.approvals.forget(id);
            let why = format!("no approver decided within {timeout} s");
            conn.record(event("timed_out", None, Some(why.clone()), waited))
                .await;
            Err(Decision {
                action: DecisionAction::Deny,
                rule: Some(rule),
                message: Some(why),
                timeout_secs: None,
            })
        }
    }
}

/// A refused request: nothing reaches the gateway; every request in it gets a JSON-RPC error
/// (a batch is refused whole), recorded as its outcome.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    conn: &Conn,
    http: &HttpInfo,
    token: Option<&Token>,
    session: &Option<String>,
    pending: Vec<Pending>,
    batch: bool,
    refusal: &Refusal,
    t0: Instant,
) -> Response<ProxyBody> {
    let ids: Vec<Value> = pending.iter().map(|p| p.id.clone()).collect();
    let refused = respond::refusal(refusal, &ids, batch);
    let decision = refusal.decision();
    let scope = session.as_deref().unwrap_or(&conn.id).to_owned();
    for p in pending {
        conn.parts
            .correlator
            .close(&scope, Direction::ClientToServer, &p.text);
        let mut e = conn.mcp_event(p.exchange, Direction::ServerToClient, http, token);
        e.message = Some(Kind::Error);
        e.jsonrpc_id = Some(p.id);
        e.error = Some(refused.error.clone());
        e.decision = Some(decision.clone());
        e.elapsed_us = Some(t0.elapsed().as_micros() as u64);
        conn.record(Event::Mcp(Box::new(e))).await;
    }
    refused.response
}

/// WebSocket and other upgrades: once the gateway switched protocols and the client got the
/// 101, the two raw streams are joined and relayed as they are.
fn bridge_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    conn: String,
) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%conn, error = %e, "upgraded stream ended with an error");
                }
            }
            Err(e) => tracing::warn!(%conn, error = %e, "protocol upgrade failed"),
        }
    });
}

/// The exchange of the server request a client's answer closes. The observer of the stream
/// that carried the request registers it as soon as it sees the bytes, which is before the
/// client can have read them; a few short waits cover a scheduler that ran the client's POST
/// first anyway.
async fn answered(conn: &Conn, session: &str, id: &str) -> Option<String> {
    for wait_ms in [0u64, 2, 5, 10, 20] {
        if wait_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        }
        if let Some(ex) = conn
            .parts
            .correlator
            .close(session, Direction::ServerToClient, id)
        {
            return Some(ex);
        }
    }
    None
}

/// A parameter as JSON text (ids and tokens may be strings or numbers).
fn param(m: &Message, key: &str) -> Option<String> {
    m.params.as_ref()?.get(key).map(Value::to_string)
}

/// `params._meta.progressToken` of a request that wants progress reports.
fn progress_token(m: &Message) -> Option<String> {
    m.params
        .as_ref()?
        .get("_meta")?
        .get("progressToken")
        .map(Value::to_string)
}
