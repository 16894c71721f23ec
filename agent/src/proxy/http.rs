//! HTTP/1.1 between a redirected client and its gateway, with MCP understood on the way.
//!
//! hyper serves the client and drives one upstream connection per client connection, so
//! keep-alive, chunked bodies, `Host` and every header pass as they came. A request's
//! JSON-RPC messages are recorded before it is forwarded. The response streams through to the
//! client untouched while a copy of its bytes feeds the observer, which decodes JSON or SSE
//! and records each answer, server request and notification as it passes: the audit never
//! delays the client's first byte.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::OnAuditFailure;
use super::correlate::{Correlator, session_key};
use crate::audit::AuditLog;
use crate::audit::record::{
    ApprovalEvent, Bytes as ByteCounts, Connection, Decision, DecisionAction, Direction, Event,
    HttpEvent, HttpInfo, McpEvent, Process, Token, now_rfc3339,
};
use crate::identity::Caller;
use crate::mcp::{self, Kind, Message};
use crate::policy::access::Call;
use crate::policy::approvals::{Approvals, Held};
use crate::policy::live::Live;
use crate::policy::masking::Scope;

/// What every HTTP connection of the proxy shares.
#[derive(Clone)]
pub struct ConnParts {
    pub audit: AuditLog,
    pub on_failure: OnAuditFailure,
    pub stats: Arc<super::Stats>,
    pub capture_limit: usize,
    pub tracker: tokio_util::task::TaskTracker,
    pub correlator: Arc<Correlator>,
    pub hold_end: bool,
    pub verifier: Arc<crate::identity::Verifier>,
    pub policy: Arc<Live>,
    pub approvals: Arc<Approvals>,
}

/// A request's token record and its raw value, kept in memory for this exchange only so that
/// it can be scrubbed from what is recorded.
#[derive(Clone, Copy)]
struct Cred<'a> {
    token: Option<&'a Token>,
    raw: Option<&'a str>,
}

/// What every request on one connection shares.
pub struct Conn {
    pub audit: AuditLog,
    /// Shared with the connection's own record, which must see the same redactions.
    pub process: Arc<std::sync::RwLock<Process>>,
    pub connection: Connection,
    /// Bytes of a body kept for the record; forwarding is never bounded by it.
    pub capture_limit: usize,
    /// Prefix of this connection's exchange ids.
    pub id: String,
    requests: AtomicU64,
    /// Observers run here, so that a stopping agent waits for their records.
    tracker: tokio_util::task::TaskTracker,
    correlator: Arc<Correlator>,
    /// Sync durability: a response's last byte waits until its records are durable.
    pub hold_end: bool,
    on_failure: OnAuditFailure,
    stats: Arc<super::Stats>,
    verifier: Arc<crate::identity::Verifier>,
    policy: Arc<Live>,
    approvals: Arc<Approvals>,
}

impl Conn {
    pub fn new(
        parts: ConnParts,
        process: Arc<std::sync::RwLock<Process>>,
        connection: Connection,
        id: String,
    ) -> Self {
        Conn {
            audit: parts.audit,
            process,
            connection,
            capture_limit: parts.capture_limit,
            id,
            requests: AtomicU64::new(0),
            tracker: parts.tracker,
            correlator: parts.correlator,
            hold_end: parts.hold_end,
            on_failure: parts.on_failure,
            stats: parts.stats,
            verifier: parts.verifier,
            policy: parts.policy,
            approvals: parts.approvals,
        }
    }

    fn process(&self) -> Process {
        self.process.read().expect("process lock").clone()
    }

    /// Takes a request's raw token out of the recorded command line (a caller that passed
    /// it in argv, like `curl -H "Authorization: Bearer …"`), whatever its shape.
    fn redact_token(&self, raw: &str, fingerprint: &str) {
        let present = self
            .process
            .read()
            .expect("process lock")
            .cmdline
            .as_ref()
            .is_some_and(|args| args.iter().any(|a| a.contains(raw)));
        if present {
            let mut p = self.process.write().expect("process lock");
            let label = format!(
                "[REDACTED:token {}]",
                &fingerprint[..12.min(fingerprint.len())]
            );
            if let Some(args) = p.cmdline.as_mut()
                && crate::process::scrub::secret(args, raw, &label)
            {
                p.cmdline_redacted = true;
            }
        }
    }

    /// Appends a record; false (counted as a loss, and logged) when the trail cannot take it.
    async fn record(&self, event: Event) -> bool {
        match self.audit.append(event).await {
            Ok(_) => true,
            Err(e) => {
                self.stats.audit_losses.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, conn = %self.id, "could not record an MCP exchange: it is missing from the trail");
                false
            }
        }
    }

    fn mcp_event(
        &self,
        exchange: String,
        direction: Direction,
        http: &HttpInfo,
        token: Option<&Token>,
    ) -> McpEvent {
        McpEvent {
            token: token.cloned(),
            ..McpEvent::new(
                exchange,
                direction,
                self.process(),
                self.connection.clone(),
                http.clone(),
            )
        }
    }

    fn message_event(
        &self,
        exchange: String,
        direction: Direction,
        http: &HttpInfo,
        cred: Cred<'_>,
        m: Message,
        batch: bool,
    ) -> McpEvent {
        let (token, raw_token) = (cred.token, cred.raw);
        // Masked before it is bounded: what is recorded never holds what a rule matched.
        let active = self.policy.current();
        let mut masked = std::collections::BTreeSet::new();
        let mut mask = |v: Option<Value>, scope: Scope| {
            v.map(|mut v| {
                masked.extend(active.masker.mask_value(&mut v, scope).rules);
                // Whatever the policy says: the gateway credential is never recorded.
                if active.broker.scrub(&mut v) {
                    masked.insert("brokered".to_owned());
                }
                // Nor the caller's own token, if it (or the gateway) put it in a message.
                if let (Some(raw), Some(t)) = (raw_token, token) {
                    let label = format!(
                        "[REDACTED:token {}]",
                        &t.fingerprint[..12.min(t.fingerprint.len())]
                    );
                    if crate::policy::masking::scrub_literal(&mut v, raw, &label) {
                        masked.insert("token".to_owned());
                    }
                }
                mcp::bounded(v, self.capture_limit)
            })
        };
        // Read before the values move into the masking (no copies of the bodies).
        let client_info = mcp::client_info(&m).map(|v| mcp::bounded(v, 4096));
        let params = mask(m.params, Scope::Params);
        let result = mask(m.result, Scope::Result);
        let error = mask(m.error, Scope::Error);
        McpEvent {
            client_info,
            message: Some(m.kind),
            jsonrpc_id: m.id,
            method: m.method,
            name: m.name,
            uri: m.uri,
            params,
            result,
            error,
            masked: masked.into_iter().collect(),
            batch,
            ..self.mcp_event(exchange, direction, http, token)
        }
    }
}

/// How much of a JSON body is read to find its messages: more than is kept, so that a big
/// argument still leaves its method, name and id in the record (its value then cut with a
/// marker), yet bounded, so that memory is too. Bodies past it are forwarded unparsed.
pub fn parse_limit(capture_limit: usize) -> usize {
    capture_limit.saturating_mul(16).max(16 * 1024 * 1024)
}

/// Bytes that begin an HTTP/1.x request line. Anything else is relayed raw.
pub fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS
        .iter()
        .any(|m| first.len() >= m.len() && first.starts_with(m))
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The gateway side of one client connection. Starts on the connection the proxy opened;
/// when the gateway closes it between requests (as HTTP/1.1 servers may), the next request
/// goes over a new one.
struct Upstream {
    dst: SocketAddr,
    mark: u32,
    sender: Option<hyper::client::conn::http1::SendRequest<ProxyBody>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Upstream {
    async fn attach<U>(&mut self, io: U) -> Result<(), String>
    where
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "gateway connection ended with an error");
            }
        }));
        self.sender = Some(sender);
        Ok(())
    }

    async fn send(&mut self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, String> {
        for _ in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                let io = super::upstream::connect(self.dst, self.mark)
                    .await
                    .map_err(|e| format!("reconnecting to {}: {e}", self.dst))?;
                self.attach(io).await?;
            }
            let sender = self.sender.as_mut().expect("attached above");
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection was gone already; try once more on a new one.
                    Some(unsent) => {
                        req = unsent;
                        self.sender = None;
                    }
                    None => return Err(e.into_error().to_string()),
                },
            }
        }
        Err("the gateway closed every connection offered".into())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves HTTP/1.1 on `client`, forwarding every request to the gateway at `dst`, first over
/// `upstream`.
pub async fn serve<C, U>(
    client: C,
    upstream: U,
    dst: SocketAddr,
    mark: u32,
    conn: Arc<Conn>,
) -> Result<(), String>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut gateway = Upstream {
        dst,
        mark,
        sender: None,
        tasks: Vec::new(),
    };
    gateway.attach(upstream).await?;
    let gateway = Arc::new(tokio::sync::Mutex::new(gateway));
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        let gateway = gateway.clone();
        // A task of its own: a client that hangs up does not cancel the recording of what
        // it already sent (hyper drops the service future when the connection goes).
        let task = conn.tracker.clone().spawn(handle(conn, gateway, req));
        async move {
            Ok::<_, std::convert::Infallible>(task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a request handler failed");
                text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "mcptrail: the proxy failed on this request (see the agent's log)\n".into(),
                )
            }))
        }
    });
    match hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        // No half-close: a client's EOF ends the connection, and dropping a response stream
        // is how closing it cancels (2026-07-28) and ends a listen subscription; what the
        // client sent is recorded anyway (its handler is a task of its own).
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades()
        .await
    {
        Ok(()) => Ok(()),
        // A client that hangs up between or in the middle of its own requests ends the
        // connection; every exchange it completed is already recorded.
        Err(e) if e.is_incomplete_message() || e.is_canceled() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn is_json(headers: &HeaderMap) -> bool {
    header(headers, CONTENT_TYPE.as_str()).is_some_and(|c| c.contains("json"))
}

async fn handle(
    conn: Arc<Conn>,
    gateway: Arc<tokio::sync::Mutex<Upstream>>,
    req: Request<Incoming>,
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
        ..Default::default()
    };
    // Verified once per token (cached by fingerprint); the raw value goes no further.
    // The raw token stays in memory for this exchange only: to scrub it from what is recorded.
    let (token, raw_token) = match conn.verifier.token(&parts.headers).await {
        Some((token, raw)) => {
            conn.redact_token(&raw.value, &token.fingerprint);
            (Some(token), Some(raw.value))
        }
        None => (None, None),
    };
    let active = conn.policy.current();
    // Header-scoped masking: the URL as recorded, and (wire rules) header values forwarded.
    let mut url = Value::String(std::mem::take(&mut http.path));
    active.masker.mask_value(&mut url, Scope::Headers);
    http.path = match url {
        Value::String(s) => s,
        other => other.to_string(),
    };
    if active.masker.has_wire_rules() {
        mask_header_values(
            &active.masker,
            &mut parts.headers,
            conn.verifier.token_headers(),
        );
    }
    // The gateway credential, set by the agent: the caller never holds it.
    http.brokered = active
        .broker
        .apply(&conn.connection.original_dst, &mut parts.headers);
    let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let is_connect = parts.method == Method::CONNECT;
    let (mut prefix, rest) = match read_prefix(body, parse_limit(conn.capture_limit)).await {
        Ok(r) => r,
        Err(e) => {
            let error = format!("reading the request body failed: {e}");
            conn.record(http_event(
                &conn,
                &http,
                token.as_ref(),
                0,
                0,
                t0,
                Some(error.clone()),
            ))
            .await;
            return text_response(StatusCode::BAD_REQUEST, error);
        }
    };
    let req_bytes = prefix.len() as u64;
    let session = session_key(http.session_id.as_deref(), &http.path);

    // The request's messages are durable before the gateway sees a byte of them.
    let mut recorded = true;
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut single_id: Option<Value> = None;
    let mut is_mcp = false;
    // Wire masking: what the gateway gets, when a `wire = true` rule matches a complete body.
    let wire_body = (parts.method == Method::POST
        && rest.is_none()
        && is_json(&parts.headers)
        && active.masker.has_wire_rules())
    .then(|| wire_rewrite(&active.masker, &prefix))
    .flatten();
    // Access rules: one policy for the whole request, decided per message the client sent.
    let caller_process = conn.process();
    let mut refused: Option<Decision> = None;
    // The first message held for approval: its decision, exchange, method and name.
    let mut held: Option<(Decision, String, Option<String>, Option<String>)> = None;
    let mut in_batch = false;
    if parts.method == Method::POST {
        if rest.is_some() {
            if is_json(&parts.headers) {
                is_mcp = true;
                let mut e = conn.mcp_event(
                    format!("{base}.0"),
                    Direction::ClientToServer,
                    &http,
                    token.as_ref(),
                );
                e.malformed = Some(format!(
                    "the body is larger than the parse limit ({} bytes); forwarded, not parsed",
                    parse_limit(conn.capture_limit)
                ));
                recorded &= conn.record(Event::Mcp(Box::new(e))).await;
            }
        } else {
            match mcp::parse(&prefix) {
                Ok((messages, batch)) => {
                    is_mcp = true;
                    in_batch = batch;
                    if !batch && messages[0].kind == Kind::Request {
                        single_id = messages[0].id.clone();
                    }
                    for (i, m) in messages.into_iter().enumerate() {
                        let mut exchange = format!("{base}.{i}");
                        // Without a session, links reach as far as this connection.
                        let scope = session.as_deref().unwrap_or(&conn.id);
                        match (m.kind, &m.id, &session) {
                            (Kind::Request, Some(id), _) => {
                                pending.insert(id.to_string(), exchange.clone());
                                conn.correlator.open(
                                    scope,
                                    Direction::ClientToServer,
                                    &id.to_string(),
                                    &exchange,
                                );
                                if let Some(token) = progress_token(&m) {
                                    conn.correlator.open_progress(scope, &token, &exchange);
                                }
                            }
                            // A cancellation belongs to the request it cancels.
                            (Kind::Notification, _, _)
                                if m.method.as_deref() == Some("notifications/cancelled") =>
                            {
                                if let Some(ex) = param(&m, "requestId").and_then(|id| {
                                    conn.correlator
                                        .related(scope, Direction::ClientToServer, &id)
                                }) {
                                    exchange = ex;
                                }
                            }
                            // The client answering a request the server sent earlier.
                            (Kind::Response | Kind::Error, Some(id), Some(session)) => {
                                if let Some(ex) = answered(&conn, session, &id.to_string()).await {
                                    exchange = ex;
                                }
                            }
                            _ => {}
                        }
                        let decision =
                            matches!(m.kind, Kind::Request | Kind::Notification).then(|| {
                                active.access.decide(&Call {
                                    caller: Caller {
                                        process: &caller_process,
                                        token: token.as_ref(),
                                    },
                                    method: m.method.as_deref(),
                                    name: m.name.as_deref(),
                                    uri: m.uri.as_deref(),
                                    destination: &conn.connection.original_dst,
                                })
                            });
                        match &decision {
                            Some(d)
                                if matches!(
                                    d.action,
                                    DecisionAction::Deny | DecisionAction::RateLimited
                                ) && refused.is_none() =>
                            {
                                refused = Some(d.clone());
                            }
                            Some(d) if d.action == DecisionAction::Held && held.is_none() => {
                                held = Some((
                                    d.clone(),
                                    exchange.clone(),
                                    m.method.clone(),
                                    m.name.clone(),
                                ));
                            }
                            _ => {}
                        }
                        // A retry of an `input_required` round joins its logical call.
                        let retry = (m.kind == Kind::Request)
                            .then(|| mcp::request_state(&m))
                            .flatten()
                            .and_then(|state| conn.correlator.retry(&state));
                        if let Some((logical, round)) = &retry {
                            conn.correlator.note_round(&exchange, logical, *round);
                        }
                        let mismatch = if batch {
                            None
                        } else {
                            header_mismatch(&http, &m)
                        };
                        let mut e = conn.message_event(
                            exchange,
                            Direction::ClientToServer,
                            &http,
                            Cred {
                                token: token.as_ref(),
                                raw: raw_token.as_deref(),
                            },
                            m,
                            batch,
                        );
                        e.header_mismatch = mismatch;
                        e.decision = decision;
                        e.wire_masked = wire_body.is_some();
                        if let Some((logical, round)) = retry {
                            e.logical_call = Some(logical);
                            e.round = Some(round);
                        }
                        recorded &= conn.record(Event::Mcp(Box::new(e))).await;
                    }
                }
                Err(err) if is_json(&parts.headers) => {
                    is_mcp = true;
                    let mut e = conn.mcp_event(
                        format!("{base}.0"),
                        Direction::ClientToServer,
                        &http,
                        token.as_ref(),
                    );
                    e.malformed = Some(err.to_string());
                    recorded &= conn.record(Event::Mcp(Box::new(e))).await;
                }
                Err(_) => {}
            }
        }
    }
    if !recorded && conn.on_failure == OnAuditFailure::Block {
        // Nothing unaudited reaches the gateway: the caller gets a clear error instead.
        conn.stats.blocked.fetch_add(1, Ordering::Relaxed);
        let why = "mcptrail: the audit trail cannot be written (see the agent's log), so this call was not forwarded";
        return match single_id {
            Some(id) => Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(CONTENT_TYPE, "application/json")
                .body(full(mcp::error_body(&id, why)))
                .expect("static response parts"),
            None => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        };
    }

    // Refused by a rule, or held for an operator who then says no (or never answers).
    let refusal = match (refused, held) {
        (Some(decision), _) => Some(decision),
        (None, Some((decision, exchange, method, name))) => {
            let call = HeldCall {
                decision: &decision,
                exchange,
                method,
                name,
                process: &caller_process,
                token: token.as_ref(),
            };
            hold_for_approval(&conn, call).await.err()
        }
        (None, None) => None,
    };
    if let Some(refusal) = refusal {
        return refuse_by_policy(
            &conn,
            &http,
            token.as_ref(),
            &session,
            pending,
            in_batch,
            refusal,
            t0,
        )
        .await;
    }

    if let Some(rewritten) = wire_body {
        // The length changes with the rewrite; a chunked body is re-chunked by hyper.
        if parts.headers.contains_key(CONTENT_LENGTH) {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
        }
        prefix = rewritten;
    }
    let body = Prefixed {
        prefix: (!prefix.is_empty()).then_some(prefix),
        rest,
    }
    .boxed();
    let upstream_req = Request::from_parts(parts, body);
    let sent = gateway.lock().await.send(upstream_req).await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            let why = format!("the MCP gateway failed: {e}");
            tracing::warn!(conn = %conn.id, error = %e, "upstream request failed");
            for exchange in pending.values() {
                let mut ev = conn.mcp_event(
                    exchange.clone(),
                    Direction::ServerToClient,
                    &http,
                    token.as_ref(),
                );
                ev.message = Some(Kind::Error);
                ev.error = Some(serde_json::json!({"mcptrail": why}));
                ev.elapsed_us = Some(t0.elapsed().as_micros() as u64);
                conn.record(Event::Mcp(Box::new(ev))).await;
            }
            if !is_mcp {
                conn.record(http_event(
                    &conn,
                    &http,
                    token.as_ref(),
                    req_bytes,
                    0,
                    t0,
                    Some(why.clone()),
                ))
                .await;
            }
            return match single_id {
                Some(id) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .header(CONTENT_TYPE, "application/json")
                    .body(full(mcp::error_body(&id, &format!("mcptrail: {why}"))))
                    .expect("static response parts"),
                None => text_response(StatusCode::BAD_GATEWAY, format!("mcptrail: {why}\n")),
            };
        }
    };
    let first_byte_us = t0.elapsed().as_micros() as u64;
    http.status = Some(resp.status().as_u16());
    http.content_type = header(resp.headers(), CONTENT_TYPE.as_str());
    let mut resp = resp;
    // A protocol switch, or a tunnel the gateway agreed to: from here on, raw bytes.
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (is_connect && resp.status().is_success());
    if switched && let Some(client_upgrade) = client_upgrade {
        bridge_upgrade(
            client_upgrade,
            hyper::upgrade::on(&mut resp),
            conn.id.clone(),
        );
    }
    let (mut rparts, rbody) = resp.into_parts();
    let (tx, rx) = mpsc::unbounded_channel();
    let wire = is_mcp && active.masker.has_wire_rules();
    let response_type = http.content_type.clone().unwrap_or_default();
    let observed = Observed {
        conn: conn.clone(),
        http,
        token,
        raw_token,
        base,
        pending,
        t0,
        first_byte_us,
        is_mcp,
        req_bytes,
        server_messages: 0,
        resp_bytes: 0,
        session,
        writer: None,
        client_closed: false,
    };
    conn.tracker.spawn(observed.run(rx));
    let tee = Tee::new(rbody, tx, conn.hold_end);
    if wire && response_type.starts_with("text/event-stream") {
        // Event by event: each event's data masked, the stream re-framed.
        return Response::from_parts(rparts, wire_sse(tee, active.clone()));
    }
    if wire && response_type.contains("json") {
        // The whole body first: its length changes when a rule matches.
        return match tee.collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                let body = match wire_rewrite(&active.masker, &bytes) {
                    Some(rewritten) => {
                        rparts
                            .headers
                            .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                        rparts.headers.remove(hyper::header::TRANSFER_ENCODING);
                        rewritten
                    }
                    None => bytes,
                };
                Response::from_parts(rparts, full(body))
            }
            Err(e) => text_response(
                StatusCode::BAD_GATEWAY,
                format!("mcptrail: the gateway's response broke off: {e}\n"),
            ),
        };
    }
    Response::from_parts(rparts, tee.boxed())
}

/// An SSE response with the wire rules applied to each event's JSON data, re-framed as
/// `event:`/`id:`/`retry:`/`data:` lines. Comments (keep-alives) are not passed on; a stream
/// that stops decoding ends there (the observer records why).
fn wire_sse(tee: Tee, active: Arc<crate::policy::live::Active>) -> ProxyBody {
    let events = sse_stream::SseStream::new(tee);
    let frames = events.map_while(|event| event.ok()).map(move |mut event| {
        if let Some(data) = &event.data
            && let Some(rewritten) = wire_rewrite(&active.masker, data.as_bytes())
        {
            event.data = Some(String::from_utf8_lossy(&rewritten).into_owned());
        }
        Ok::<_, hyper::Error>(hyper::body::Frame::data(encode_sse(&event)))
    });
    http_body_util::StreamBody::new(frames).boxed()
}

/// One SSE event block. The decoder guarantees no line breaks in `event` and `id`.
fn encode_sse(event: &sse_stream::Sse) -> Bytes {
    let mut s = String::new();
    if let Some(e) = &event.event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    if let Some(id) = &event.id {
        s.push_str("id: ");
        s.push_str(id);
        s.push('\n');
    }
    if let Some(retry) = event.retry {
        s.push_str(&format!("retry: {retry}\n"));
    }
    if let Some(data) = &event.data {
        for line in data.split('\n') {
            s.push_str("data: ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push('\n');
    Bytes::from(s)
}

/// Rewrites forwarded header values that a `wire` rule with the `headers` scope matches; the
/// caller's token headers are left to the token handling.
fn mask_header_values(
    masker: &crate::policy::masking::Masker,
    headers: &mut HeaderMap,
    token_headers: &[String],
) {
    let names: Vec<hyper::header::HeaderName> = headers.keys().cloned().collect();
    for name in names {
        if token_headers.iter().any(|t| t == name.as_str()) {
            continue;
        }
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        let mut changed = false;
        let mut rewritten = Vec::with_capacity(values.len());
        for value in values {
            let Ok(text) = value.to_str() else {
                rewritten.push(value);
                continue;
            };
            let mut v = Value::String(text.to_owned());
            if masker
                .mask_value_wire(&mut v, Scope::Headers)
                .rules
                .is_empty()
            {
                rewritten.push(value);
                continue;
            }
            match v.as_str().and_then(|s| HeaderValue::from_str(s).ok()) {
                Some(new) => {
                    rewritten.push(new);
                    changed = true;
                }
                None => rewritten.push(value),
            }
        }
        if changed {
            headers.remove(&name);
            for v in rewritten {
                headers.append(name.clone(), v);
            }
        }
    }
}

/// The body with the wire rules applied to every message's params, result and error, or
/// `None` when no wire rule matched (the body then goes as it came, byte for byte).
fn wire_rewrite(masker: &crate::policy::masking::Masker, body: &[u8]) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut fired = false;
    let mut each = |m: &mut Value| {
        if let Value::Object(obj) = m {
            for (key, scope) in [
                ("params", Scope::Params),
                ("result", Scope::Result),
                ("error", Scope::Error),
            ] {
                if let Some(v) = obj.get_mut(key) {
                    fired |= !masker.mask_value_wire(v, scope).rules.is_empty();
                }
            }
        }
    };
    match &mut value {
        Value::Array(items) => items.iter_mut().for_each(&mut each),
        one => each(one),
    }
    fired.then(|| Bytes::from(serde_json::to_vec(&value).expect("JSON values serialise")))
}

struct HeldCall<'a> {
    decision: &'a Decision,
    exchange: String,
    method: Option<String>,
    name: Option<String>,
    process: &'a Process,
    token: Option<&'a Token>,
}

/// Holds a call until an operator decides or the rule's timeout passes; `Ok` when approved,
/// else the refusal to answer with. Each step is an `approval` record.
async fn hold_for_approval(conn: &Conn, call: HeldCall<'_>) -> Result<(), Decision> {
    let rule = call.decision.rule.clone().unwrap_or_default();
    let timeout = call
        .decision
        .timeout_secs
        .unwrap_or(crate::policy::access::DEFAULT_APPROVAL_TIMEOUT_SECS);
    let held = Held {
        id: 0,
        since: now_rfc3339(),
        timeout_secs: timeout,
        rule: rule.clone(),
        exchange: call.exchange,
        pid: call.process.pid,
        exe: call.process.exe.clone(),
        sub: call
            .token
            .filter(|t| t.verified)
            .and_then(|t| t.sub.clone()),
        ci: call.process.ci.as_ref().map(|ci| {
            format!(
                "{}:{}",
                ci.provider.as_deref().unwrap_or("ci"),
                ci.run.as_deref().or(ci.job.as_deref()).unwrap_or("-")
            )
        }),
        method: call.method,
        name: call.name,
        destination: conn.connection.original_dst.clone(),
    };
    let (id, verdict) = conn.approvals.hold(held.clone());
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
            conn.approvals.forget(id);
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

/// A request the access rules refused: nothing reaches the gateway; every request in it gets
/// a JSON-RPC error naming the rule (a batch is refused whole), recorded as its outcome.
#[allow(clippy::too_many_arguments)]
async fn refuse_by_policy(
    conn: &Conn,
    http: &HttpInfo,
    token: Option<&Token>,
    session: &Option<String>,
    pending: HashMap<String, String>,
    batch: bool,
    decision: Decision,
    t0: Instant,
) -> Response<ProxyBody> {
    let rule = decision.rule.as_deref().map_or_else(
        || "the policy's default".to_owned(),
        |r| format!("policy rule {r:?}"),
    );
    let (code, mut message) = match decision.action {
        DecisionAction::RateLimited => (
            -32002,
            format!("mcptrail: rate limit of {rule} exceeded; try again later"),
        ),
        _ => (-32001, format!("mcptrail: denied by {rule}")),
    };
    if let Some(m) = &decision.message {
        message.push_str(": ");
        message.push_str(m);
    }
    if batch {
        message.push_str(" (the whole batch was refused)");
    }
    let scope = session.as_deref().unwrap_or(&conn.id).to_owned();
    let mut errors = Vec::new();
    for (id_text, exchange) in &pending {
        conn.correlator
            .close(&scope, Direction::ClientToServer, id_text);
        let id: Value = serde_json::from_str(id_text).unwrap_or(Value::Null);
        let error = serde_json::json!({"code": code, "message": message});
        let mut e = conn.mcp_event(exchange.clone(), Direction::ServerToClient, http, token);
        e.message = Some(Kind::Error);
        e.jsonrpc_id = Some(id.clone());
        e.error = Some(error.clone());
        e.decision = Some(decision.clone());
        e.elapsed_us = Some(t0.elapsed().as_micros() as u64);
        conn.record(Event::Mcp(Box::new(e))).await;
        errors.push(serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error}));
    }
    let body = match (batch, errors.len()) {
        // Only notifications: nothing to answer in JSON-RPC.
        (_, 0) => return text_response(StatusCode::FORBIDDEN, format!("{message}\n")),
        (false, _) => errors.swap_remove(0),
        (true, _) => Value::Array(errors),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(&body).expect("JSON values serialise"),
        ))
        .expect("static response parts")
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

/// Where the 2026-07-28 mirror headers say something else than the body.
fn header_mismatch(http: &HttpInfo, m: &Message) -> Option<String> {
    let mut problems = Vec::new();
    if let Some(h) = &http.mcp_method
        && m.method.as_deref() != Some(h.as_str())
    {
        problems.push(format!(
            "Mcp-Method is {h:?} but the body's method is {:?}",
            m.method.as_deref().unwrap_or("")
        ));
    }
    let body_name = m.name.as_deref().or(m.uri.as_deref());
    if let Some(h) = &http.mcp_name
        && body_name != Some(h.as_str())
    {
        problems.push(format!(
            "Mcp-Name is {h:?} but the body names {:?}",
            body_name.unwrap_or("")
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

fn http_event(
    conn: &Conn,
    http: &HttpInfo,
    token: Option<&Token>,
    req: u64,
    resp: u64,
    t0: Instant,
    error: Option<String>,
) -> Event {
    Event::Http(Box::new(HttpEvent {
        time: now_rfc3339(),
        process: conn.process(),
        connection: conn.connection.clone(),
        http: http.clone(),
        token: token.cloned(),
        bytes: ByteCounts { req, resp },
        elapsed_us: t0.elapsed().as_micros() as u64,
        error,
    }))
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(text))
        .expect("static response parts")
}

/// Reads a body until it ends or passes `limit` bytes; returns what was read and, when the
/// body goes on, the rest of it.
async fn read_prefix(
    mut body: Incoming,
    limit: usize,
) -> Result<(Bytes, Option<Incoming>), hyper::Error> {
    let mut buf = BytesMut::new();
    while buf.len() <= limit {
        match body.frame().await {
            None => return Ok((buf.freeze(), None)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
    Ok((buf.freeze(), Some(body)))
}

/// A request body already partly read: the prefix, then the rest as it comes.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Option<Incoming>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let Some(rest) = self.rest.as_ref() else {
            return SizeHint::with_exact(prefix);
        };
        let inner = rest.size_hint();
        let mut hint = SizeHint::new();
        // Upper first: SizeHint refuses a lower bound above the current upper one.
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(inner.lower() + prefix);
        hint
    }
}

/// The response body on its way to the client, with a copy of every data frame sent to the
/// observer. The channel is unbounded so that the client never waits on the audit, with one
/// exception when `hold_end` is set (sync durability): the body's last byte (the frame that
/// completes a known length, or the end of a chunked or streamed body) is held until the
/// observer has durably recorded what the response carried. Nothing the client fully saw is
/// then missing from the trail, and only the end waits.
struct Tee {
    inner: Incoming,
    tx: Option<mpsc::UnboundedSender<Chunk>>,
    hold_end: bool,
    /// Body bytes still to come, when the length is known.
    remaining: Option<u64>,
    /// The final frame, waiting for the release.
    held: Option<Frame<Bytes>>,
    release: Option<oneshot::Receiver<()>>,
    /// The end was announced to the observer (and released, if it was held).
    ended: bool,
}

impl Tee {
    fn new(inner: Incoming, tx: mpsc::UnboundedSender<Chunk>, hold_end: bool) -> Self {
        let remaining = inner.size_hint().exact();
        Tee {
            inner,
            tx: Some(tx),
            hold_end,
            remaining,
            held: None,
            release: None,
            ended: false,
        }
    }

    /// Tells the observer the body is over; with `hold_end`, arranges to wait for it.
    fn announce_end(&mut self) {
        self.ended = true;
        let Some(tx) = self.tx.take() else {
            return;
        };
        if self.hold_end {
            let (release, wait) = oneshot::channel();
            if tx.send(Chunk::End(release)).is_ok() {
                self.release = Some(wait);
            }
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end: the client is gone (and with it, the upstream stream).
        if !self.ended
            && let Some(tx) = self.tx.take()
        {
            let _ = tx.send(Chunk::ClientGone);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(wait) = self.release.as_mut() {
            // A gone observer (Err) releases too: the client must never hang on the audit.
            let _ = std::task::ready!(Pin::new(wait).poll(cx));
            self.release = None;
            return Poll::Ready(self.held.take().map(Ok));
        }
        if self.ended && self.remaining == Some(0) {
            return Poll::Ready(None);
        }
        match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if let Some(tx) = &self.tx {
                        let _ = tx.send(Chunk::Data(data.clone()));
                    }
                    if let Some(remaining) = self.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(len);
                        if *remaining == 0 && !self.ended {
                            self.announce_end();
                            if self.release.is_some() {
                                self.held = Some(frame);
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                if !self.ended {
                    self.announce_end();
                    if self.release.is_some() {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                self.tx = None;
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_none() && self.release.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records what a response carried, from the copy of its bytes.
struct Observed {
    conn: Arc<Conn>,
    http: HttpInfo,
    token: Option<Token>,
    /// The caller's raw token, to scrub from the response's records; memory only.
    raw_token: Option<String>,
    base: String,
    /// Request id (as JSON text) to exchange id, for requests still waiting for an answer.
    pending: HashMap<String, String>,
    t0: Instant,
    first_byte_us: u64,
    is_mcp: bool,
    req_bytes: u64,
    /// Messages the server started (requests, notifications) seen so far.
    server_messages: u64,
    /// Response body bytes seen (for the `http` record).
    resp_bytes: u64,
    /// The MCP session, for answers that belong to requests sent on other exchanges.
    session: Option<String>,
    /// Records in the order the messages came, written by a task of their own so that
    /// decoding (and linking answers to requests) never waits for a write to be durable.
    writer: Option<mpsc::UnboundedSender<Out>>,
    /// The client closed the response before it ended.
    client_closed: bool,
}

/// What the tee hands the observer: the response's bytes, then its end, which waits to be
/// released when the body holds its last byte for the records (sync durability).
enum Chunk {
    Data(Bytes),
    End(oneshot::Sender<()>),
    /// The client went away before the body ended (hyper dropped it).
    ClientGone,
}

/// What the observer hands its writer task.
enum Out {
    Record(Box<Event>),
    Flush(oneshot::Sender<()>),
}

impl Observed {
    /// Queues a record; the writer task appends them in order.
    fn emit(&self, event: Event) {
        if let Some(w) = &self.writer {
            let _ = w.send(Out::Record(Box::new(event)));
        }
    }

    async fn run(mut self, rx: mpsc::UnboundedReceiver<Chunk>) {
        let (writer, mut queue) = mpsc::unbounded_channel::<Out>();
        self.writer = Some(writer.clone());
        let conn = self.conn.clone();
        let written = self.conn.tracker.spawn(async move {
            while let Some(out) = queue.recv().await {
                match out {
                    Out::Record(event) => {
                        conn.record(*event).await;
                    }
                    // Everything queued before is written (durably, in sync mode).
                    Out::Flush(done) => {
                        let _ = done.send(());
                    }
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
        let sse = self
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
            let end_slot = &mut end;
            let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let gone_slot = gone.clone();
            let counted = UnboundedReceiverStream::new(rx).map_while(move |c| match c {
                Chunk::Data(b) => Some(Ok::<Bytes, std::convert::Infallible>(b)),
                Chunk::End(release) => {
                    *end_slot = Some(release);
                    None
                }
                Chunk::ClientGone => {
                    gone_slot.store(true, Ordering::Relaxed);
                    None
                }
            });
            let mut events = sse_stream::SseByteStream::new(counted);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        let Some(data) = event.data.filter(|d| !d.is_empty()) else {
                            continue;
                        };
                        // A stream resumed with Last-Event-ID can replay events an earlier
                        // stream carried: they are in the trail already.
                        if let (Some(id), Some(session)) = (&event.id, &self.session)
                            && !self.conn.correlator.first_sight(session, id)
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
        } else {
            let mut rx = rx;
            let mut captured = BytesMut::new();
            let mut truncated = false;
            while let Some(chunk) = rx.recv().await {
                let chunk = match chunk {
                    Chunk::Data(b) => b,
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
                if captured.len() + chunk.len() <= parse_limit(self.conn.capture_limit) {
                    captured.extend_from_slice(&chunk);
                } else {
                    truncated = true;
                }
            }
            if json && !captured.is_empty() {
                if truncated {
                    self.malformed(format!(
                        "the response is larger than the parse limit ({} bytes); relayed, not parsed",
                        parse_limit(self.conn.capture_limit)
                    ));
                } else {
                    self.messages(&captured).await;
                }
            }
        }
        end
    }

    /// The records due when the response is over: the HTTP record of a non-MCP exchange, or
    /// an outcome for every request left unanswered.
    fn finish(&mut self) {
        if !self.is_mcp {
            let e = http_event(
                &self.conn,
                &self.http,
                self.token.as_ref(),
                self.req_bytes,
                self.resp_bytes,
                self.t0,
                None,
            );
            self.emit(e);
            return;
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
        match mcp::parse(bytes) {
            Ok((messages, batch)) => {
                for (i, m) in messages.into_iter().enumerate() {
                    let exchange = match (m.kind, &m.id) {
                        (Kind::Response | Kind::Error, Some(id)) => {
                            let id = id.to_string();
                            let here = self.pending.remove(&id);
                            let elsewhere = self.conn.correlator.close(
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
                                        .correlator
                                        .related(self.scope(), Direction::ClientToServer, &id)
                                        .is_some()
                            }) =>
                        {
                            let id = mcp::subscription_id(&m).expect("checked above");
                            self.pending.get(&id).cloned().unwrap_or_else(|| {
                                self.conn
                                    .correlator
                                    .related(self.scope(), Direction::ClientToServer, &id)
                                    .expect("checked above")
                            })
                        }
                        // Progress reports on the request that asked for it.
                        (Kind::Notification, _)
                            if m.method.as_deref() == Some("notifications/progress")
                                && param(&m, "progressToken")
                                    .and_then(|t| self.conn.correlator.progress(self.scope(), &t))
                                    .is_some() =>
                        {
                            let token = param(&m, "progressToken").expect("checked above");
                            self.conn
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
                                self.conn.correlator.open(
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
                            .correlator
                            .round_of(&exchange)
                            .unwrap_or_else(|| (exchange.clone(), 0));
                        self.conn.correlator.open_retry(&state, &logical, round + 1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_headers_are_compared_with_the_body() {
        let (m, _) = mcp::parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}"#,
        )
        .unwrap();
        let mut http = HttpInfo {
            mcp_method: Some("tools/call".into()),
            mcp_name: Some("add".into()),
            ..Default::default()
        };
        assert_eq!(header_mismatch(&http, &m[0]), None);
        http.mcp_name = Some("rm_rf".into());
        let why = header_mismatch(&http, &m[0]).unwrap();
        assert!(why.contains("Mcp-Name is \"rm_rf\""), "{why}");
        http.mcp_method = Some("tools/list".into());
        assert!(
            header_mismatch(&http, &m[0])
                .unwrap()
                .contains("Mcp-Method")
        );
        let none = HttpInfo::default();
        assert_eq!(
            header_mismatch(&none, &m[0]),
            None,
            "no headers, nothing to compare"
        );
    }

    #[test]
    fn http_is_told_from_other_bytes() {
        assert!(looks_like_http(b"POST /mcp HTTP/1.1\r\n"));
        assert!(looks_like_http(b"GET / HTTP/1.0"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"POS"));
    }
}
