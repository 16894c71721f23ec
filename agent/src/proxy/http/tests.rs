//! The request pipeline in-process, with no root and no kernel: a client over
//! `tokio::io::duplex`, the proxy's connection path (`serve_client`: detection, then HTTP),
//! a stub gateway (a hyper server over more duplex pipes) and a real trail in a temporary
//! folder. Every path of the plan is driven here: forward, refuse, hold, unparsed, each
//! content coding, batches, and the ways a hostile client tries to get past the rules.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::body::{self as codec, Encoding};
use super::gateway::{BoxIo, Connect, Gateway};
use super::records::{Conn, ConnParts};
use super::respond;
use crate::audit::record::{
    Connection, DecisionAction, Direction, Event, McpEvent, Process, Record, Status,
};
use crate::audit::{AuditLog, Store};
use crate::identity::{IdentityConfig, Verifier, fingerprint::Fingerprinter};
use crate::mcp::Kind;
use crate::policy::Policy;
use crate::policy::approvals::{Approvals, Approver, Verdict};
use crate::policy::live::Live;
use crate::proxy::correlate::Correlator;
use crate::proxy::detect::Protocol;
use crate::proxy::{OnAuditFailure, ProxyError, Route, Stats, serve_client};

/// Access rules the hostile cases must not get past, on top of the default masking pack.
const RULES: &str = r#"
[[access.rules]]
name = "no-deploys"
action = "deny"
message = "deploys need a human"
match = { method = "tools/call", tool = "deploy*" }

[[access.rules]]
name = "ask-first"
action = "approve"
timeout_secs = 30
match = { tool = "release*" }
"#;

const WIRE_RULE: &str = r#"
[[masking.rules]]
name = "ticket"
pattern = 'T-\d{4}'
wire = true
examples = ["T-1234"]
counterexamples = ["T-12"]
"#;

/// The proxy's side of one connection: its protocol, when learnt, and how it ended.
type ConnTask = tokio::task::JoinHandle<crate::proxy::Served>;

/// What the stub gateway was sent.
#[derive(Clone, Debug)]
struct Seen {
    version: hyper::Version,
    headers: HeaderMap,
    /// As it came over the wire.
    body: Bytes,
    /// Decoded per its Content-Encoding, as a gateway would read it.
    decoded: Bytes,
}

type Answer = Arc<dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync>;

/// Answers every request with a JSON-RPC result per request id in the body.
fn echo() -> Answer {
    Arc::new(|seen: &Seen| {
        let ids: Vec<Value> = match serde_json::from_slice::<Value>(&seen.decoded) {
            Ok(Value::Array(items)) => items.iter().filter_map(|m| m.get("id").cloned()).collect(),
            Ok(one) => one.get("id").cloned().into_iter().collect(),
            Err(_) => Vec::new(),
        };
        let results: Vec<Value> = ids
            .into_iter()
            .map(|id| json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "ok"}]}}))
            .collect();
        let body = match results.len() {
            0 => {
                return Response::builder()
                    .status(202)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
            }
            1 => results[0].to_string(),
            _ => Value::Array(results).to_string(),
        };
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    })
}

struct Stub {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
    /// The gateway closes each connection after one answer (an HTTP/1.1 server may).
    close_each: bool,
    /// The gateway speaks TLS with this configuration.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Trailers after each response body.
    trailers: Option<HeaderMap>,
    /// The gateway speaks only HTTP/1.1 (else also h2 and h2c, as hyper's auto server does).
    http1_only: bool,
    /// Connections the proxy opened to the stub, and how many are still open.
    conns: Arc<StubConns>,
}

#[derive(Default)]
struct StubConns {
    opened: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicUsize,
}

impl StubConns {
    fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.opened.load(SeqCst), self.open.load(SeqCst))
    }
}

/// Counts one of the stub's connections closed when its server ends, however it ends.
struct Closes(Arc<StubConns>);

impl Drop for Closes {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Stub {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Stub {
            seen: Arc::default(),
            answer,
            close_each: false,
            tls: None,
            trailers: None,
            http1_only: false,
            conns: Arc::default(),
        })
    }

    /// A gateway that speaks only HTTP/1.1.
    fn http1_only(answer: Answer) -> Arc<Self> {
        let mut stub = Arc::into_inner(Stub::new(answer)).expect("just made");
        stub.http1_only = true;
        Arc::new(stub)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A connection to the stub: one end of a pipe, a hyper server on the other.
    fn connect(self: &Arc<Self>) -> Connect {
        let stub = self.clone();
        Arc::new(move || {
            let stub = stub.clone();
            let stub_tls = stub.tls.clone();
            let http1_only = stub.http1_only;
            Box::pin(async move {
                let (ours, theirs) = tokio::io::duplex(1 << 16);
                stub.conns
                    .opened
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                stub.conns
                    .open
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let closes = Closes(stub.conns.clone());
                tokio::spawn(async move {
                    let _closes = closes;
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let stub = stub.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let codings = codec::encodings(&parts.headers).unwrap_or_default();
                            let decoded = codec::decode(body.clone(), &codings, 64 << 20)
                                .await
                                .unwrap_or_default();
                            let seen = Seen {
                                version: parts.version,
                                headers: parts.headers,
                                body,
                                decoded,
                            };
                            // A call to the `slow` tool takes its time: the calls beside it
                            // on an HTTP/2 connection must not wait for it.
                            if String::from_utf8_lossy(&seen.decoded).contains("\"slow\"") {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            let mut resp = (stub.answer)(&seen);
                            if stub.close_each {
                                resp.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                            }
                            stub.seen.lock().unwrap().push(seen);
                            let trailers = stub.trailers.clone();
                            let resp = resp.map(|b| match trailers {
                                None => b.boxed_unsync(),
                                Some(t) => {
                                    b.with_trailers(async move { Some(Ok(t)) }).boxed_unsync()
                                }
                            });
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let io: BoxIo = match &stub_tls {
                        None => Box::new(theirs),
                        Some(config) => {
                            match tokio_rustls::TlsAcceptor::from(config.clone())
                                .accept(theirs)
                                .await
                            {
                                Ok(tls) => Box::new(tls),
                                Err(_) => return,
                            }
                        }
                    };
                    // HTTP/1.1 or HTTP/2, whichever the proxy opens with, as real gateways do.
                    let mut server = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    if http1_only {
                        server = server.http1_only();
                    }
                    let _ = server.serve_connection(TokioIo::new(io), service).await;
                });
                Ok(Box::new(ours) as BoxIo)
            })
        })
    }
}

struct Harness {
    dir: tempfile::TempDir,
    audit: AuditLog,
    live: Arc<Live>,
    approvals: Arc<Approvals>,
    stub: Arc<Stub>,
    verifier: Arc<Verifier>,
    stats: Arc<Stats>,
    tracker: tokio_util::task::TaskTracker,
    connections: std::sync::atomic::AtomicU64,
    /// TLS termination, when the test turns it on.
    tls: Option<Arc<crate::proxy::tls::TlsContext>>,
    h2c: Arc<crate::proxy::http::h2c::H2cProbe>,
    /// The connections' `upstream_idle`.
    upstream_idle: Option<Duration>,
    /// The connections' `header_timeout`.
    header_timeout: Duration,
    _writer: std::thread::JoinHandle<()>,
}

impl Harness {
    async fn new(policy_extra: &str, answer: Answer) -> Self {
        Self::with_stub(policy_extra, Stub::new(answer)).await
    }

    async fn with_stub(policy_extra: &str, stub: Arc<Stub>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (audit, writer) = Store::open(dir.path()).unwrap().spawn_writer();
        let text = format!("{}\n{policy_extra}", crate::policy::EMBEDDED_DEFAULT);
        let policy = Policy::parse(&text, "test.toml").unwrap();
        let live = Arc::new(Live::new(policy, [5; 32]).unwrap());
        let verifier = Arc::new(
            Verifier::new(&IdentityConfig::default(), Fingerprinter::new([6; 32]))
                .await
                .unwrap(),
        );
        Harness {
            dir,
            audit,
            live,
            approvals: Arc::default(),
            stub,
            verifier,
            stats: Arc::default(),
            tracker: tokio_util::task::TaskTracker::new(),
            connections: Default::default(),
            tls: None,
            h2c: Arc::default(),
            upstream_idle: None,
            header_timeout: super::HEADER_READ_TIMEOUT,
            _writer: writer,
        }
    }

    fn conn(&self, process: Process) -> Conn {
        let n = self
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Conn::new(
            ConnParts {
                audit: self.audit.clone(),
                on_failure: OnAuditFailure::Block,
                stats: self.stats.clone(),
                capture_limit: 1 << 20,
                tracker: self.tracker.clone(),
                correlator: Arc::new(Correlator::default()),
                verifier: self.verifier.clone(),
                policy: self.live.clone(),
                approvals: self.approvals.clone(),
                upstream_idle: self.upstream_idle,
                header_timeout: self.header_timeout,
            },
            Arc::new(std::sync::RwLock::new(process)),
            Connection {
                client: "127.0.0.1:40000".into(),
                original_dst: "10.0.0.5:8811".into(),
                proxy: "127.0.0.1:15811".into(),
                target: None,
                tls: None,
            },
            format!("t.{n}"),
        )
    }

    /// Starts the proxy's connection path on a pipe; returns the client's end and the task.
    fn open(&self, process: Process) -> (tokio::io::DuplexStream, ConnTask) {
        let (client, proxy_side) = tokio::io::duplex(1 << 16);
        let route = Route {
            dst: "10.0.0.5:8811".parse().unwrap(),
            connect: self.stub.connect(),
            connect_timeout: Duration::from_secs(5),
            tls: self.tls.clone(),
            h2c: self.h2c.clone(),
        };
        let conn = self.conn(process);
        let task = tokio::spawn(serve_client(proxy_side, route, self.live.current(), conn));
        (client, task)
    }

    /// One request over a fresh connection, with hyper as the client.
    async fn send(&self, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        let (client, _task) = self.open(Process::default());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(connection);
        let resp = sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    }

    /// Raw bytes over a fresh connection, written as `write` likes; the whole answer back.
    async fn raw<F, Fut>(
        &self,
        process: Process,
        write: F,
    ) -> (Vec<u8>, Option<Protocol>, Result<(), ProxyError>)
    where
        F: FnOnce(tokio::io::WriteHalf<tokio::io::DuplexStream>) -> Fut,
        Fut: std::future::Future<Output = tokio::io::WriteHalf<tokio::io::DuplexStream>>,
    {
        let (client, task) = self.open(process);
        let (mut r, w) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
            out
        });
        let w = write(w).await;
        let served = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the connection ends")
            .unwrap();
        drop(w);
        (reader.await.unwrap(), served.protocol, served.result)
    }

    fn records(&self) -> Vec<Record> {
        let reader = crate::audit::reader::Reader::open(self.dir.path()).unwrap();
        reader
            .read_from(1, 100_000)
            .unwrap()
            .into_iter()
            .map(|r| r.record)
            .collect()
    }

    fn mcp(&self) -> Vec<McpEvent> {
        self.records()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Mcp(e) => Some(*e),
                _ => None,
            })
            .collect()
    }

    /// Waits (bounded) until the trail holds what `pred` looks for.
    async fn wait_mcp(&self, what: &str, pred: impl Fn(&[McpEvent]) -> bool) -> Vec<McpEvent> {
        for _ in 0..200 {
            let got = self.mcp();
            if pred(&got) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the trail never held {what}: {:#?}", self.mcp());
    }
}

fn post(body: impl Into<Bytes>) -> hyper::http::request::Builder {
    let _ = &body;
    Request::post("/mcp")
        .header("host", "10.0.0.5:8811")
        .header(CONTENT_TYPE, "application/json")
        .header("accept", "application/json, text/event-stream")
}

fn call(id: u64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

fn json_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

async fn encoded(value: &Value, codings: &[Encoding]) -> Bytes {
    codec::encode(Bytes::from(value.to_string()), codings)
        .await
        .unwrap()
}

fn coding_header(codings: &[Encoding]) -> String {
    codings
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn an_allowed_call_is_recorded_forwarded_and_answered() {
    let h = Harness::new(RULES, echo()).await;
    let body = call(1, "add", json!({"a": 1, "b": 2})).to_string();
    let (status, _, resp) = h
        .send(post(body.clone()).body(Full::new(body.into())).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_body(&resp)["result"]["content"][0]["text"], "ok");
    assert_eq!(h.stub.seen().len(), 1);
    let recs = h
        .wait_mcp("the answer", |r| {
            r.iter().any(|e| e.direction == Direction::ServerToClient)
        })
        .await;
    let req = recs
        .iter()
        .find(|e| e.direction == Direction::ClientToServer)
        .unwrap();
    assert_eq!(req.name.as_deref(), Some("add"));
    assert_eq!(req.decision.as_ref().unwrap().action, DecisionAction::Allow);
    let ans = recs
        .iter()
        .find(|e| e.direction == Direction::ServerToClient)
        .unwrap();
    assert_eq!(
        (ans.exchange.as_str(), ans.message),
        (req.exchange.as_str(), Some(Kind::Response))
    );
}

#[tokio::test]
async fn a_denied_call_never_reaches_the_gateway() {
    let h = Harness::new(RULES, echo()).await;
    let body = call(4, "deploy_prod", json!({})).to_string();
    let (status, _, resp) = h
        .send(post(body.clone()).body(Full::new(body.into())).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_body(&resp);
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!(4), json!(respond::CODE_DENIED))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deploys need a human")
    );
    assert!(h.stub.seen().is_empty(), "nothing was forwarded");
    let recs = h.wait_mcp("the refusal", |r| r.len() == 2).await;
    assert!(
        recs.iter()
            .all(|e| e.decision.as_ref().unwrap().action == DecisionAction::Deny)
    );
}

#[tokio::test]
async fn every_content_coding_is_read_for_the_rules() {
    for codings in [
        vec![Encoding::Gzip],
        vec![Encoding::Deflate],
        vec![Encoding::Br],
        vec![Encoding::Zstd],
        vec![Encoding::Gzip, Encoding::Br],
    ] {
        let h = Harness::new(RULES, echo()).await;
        let denied = encoded(&call(1, "deploy_prod", json!({})), &codings).await;
        let (_, _, resp) = h
            .send(
                post(denied.clone())
                    .header(CONTENT_ENCODING, coding_header(&codings))
                    .body(Full::new(denied))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            json_body(&resp)["error"]["code"],
            respond::CODE_DENIED,
            "{codings:?}"
        );
        assert!(
            h.stub.seen().is_empty(),
            "{codings:?}: the denied call was forwarded"
        );
        // An allowed one goes on as it came, and its record is the decoded message, masked.
        let allowed = encoded(
            &call(2, "pay", json!({"card": "4111 1111 1111 1111"})),
            &codings,
        )
        .await;
        let (status, _, _) = h
            .send(
                post(allowed.clone())
                    .header(CONTENT_ENCODING, coding_header(&codings))
                    .body(Full::new(allowed.clone()))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let seen = h.stub.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].body, allowed,
            "{codings:?}: forwarded byte for byte"
        );
        let recs = h
            .wait_mcp("the paid call", |r| {
                r.iter().any(|e| e.name.as_deref() == Some("pay"))
            })
            .await;
        let pay = recs
            .iter()
            .find(|e| e.name.as_deref() == Some("pay"))
            .unwrap();
        assert_eq!(
            pay.params.as_ref().unwrap()["arguments"]["card"],
            "[MASKED:payment_card]1111"
        );
    }
}

#[tokio::test]
async fn unknown_and_broken_codings_and_bombs_are_refused() {
    let h = Harness::new(RULES, echo()).await;
    let plain = call(1, "add", json!({})).to_string();
    let bomb = codec::encode(Bytes::from(vec![b' '; 40 << 20]), &[Encoding::Gzip])
        .await
        .unwrap();
    for (coding, body) in [
        ("compress", Bytes::from(plain.clone())),
        ("gzip", Bytes::from(plain.clone())),
        ("gzip", bomb),
    ] {
        let (status, _, resp) = h
            .send(
                post(body.clone())
                    .header(CONTENT_ENCODING, coding)
                    .body(Full::new(body))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{coding}");
        let v = json_body(&resp);
        assert_eq!(v["error"]["code"], respond::CODE_INVALID_REQUEST);
    }
    assert!(h.stub.seen().is_empty());
    assert_eq!(h.stats.snapshot()["refused_unreadable"], 3);
    let recs = h.wait_mcp("three refusals", |r| r.len() == 3).await;
    for e in &recs {
        let d = e.decision.as_ref().unwrap();
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (DecisionAction::Deny, Some(super::plan::UNPARSED_RULE))
        );
        assert!(
            e.malformed.as_ref().unwrap().contains("refused"),
            "{:?}",
            e.malformed
        );
    }
    assert!(recs[0].malformed.as_ref().unwrap().contains("\"compress\""));
    assert!(recs[2].malformed.as_ref().unwrap().contains("parse limit"));
}

#[tokio::test]
async fn what_cannot_be_read_is_refused_under_rules_and_forwarded_without() {
    let cases: Vec<(&str, Bytes)> = vec![
        (
            "application/json",
            Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\""),
        ),
        ("text/plain", Bytes::from_static(b"deploy_prod please")),
        ("application/json", Bytes::from(vec![b'['; 1]).slice(..)),
    ];
    let h = Harness::new(RULES, echo()).await;
    for (ct, body) in &cases {
        let (status, _, _) = h
            .send(
                post(body.clone())
                    .header(CONTENT_TYPE, *ct)
                    .body(Full::new(body.clone()))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ct} {body:?}");
    }
    assert!(h.stub.seen().is_empty());
    // A policy that refuses nothing records and forwards them.
    let h = Harness::new("", echo()).await;
    for (ct, body) in &cases {
        h.send(
            post(body.clone())
                .header(CONTENT_TYPE, *ct)
                .body(Full::new(body.clone()))
                .unwrap(),
        )
        .await;
    }
    assert_eq!(h.stub.seen().len(), cases.len());
    // Told to, a strict policy forwards them too.
    let h = Harness::new(
        &format!("{RULES}\n[gateway]\nunparsed = \"forward\"\n"),
        echo(),
    )
    .await;
    let (ct, body) = &cases[0];
    h.send(
        post(body.clone())
            .header(CONTENT_TYPE, *ct)
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(h.stub.seen().len(), 1);
}

#[tokio::test]
async fn a_body_over_the_parse_limit_is_refused_unread() {
    let h = Harness::new(RULES, echo()).await;
    // The harness's capture limit is 1 MiB; the parse limit is 16 MiB.
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "deploy_prod", "arguments": {"blob": "x".repeat(17 << 20)}}})
    .to_string();
    let (status, _, resp) = h
        .send(post(big.clone()).body(Full::new(big.into())).unwrap())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&resp).contains("parse limit"));
    assert!(h.stub.seen().is_empty());
}

#[tokio::test]
async fn a_bad_batch_element_does_not_hide_a_denied_call() {
    let h = Harness::new(RULES, echo()).await;
    let batch = json!([
        call(1, "add", json!({})),
        42,
        call(3, "deploy_prod", json!({}))
    ])
    .to_string();
    let (_, _, resp) = h
        .send(post(batch.clone()).body(Full::new(batch.into())).unwrap())
        .await;
    let v = json_body(&resp);
    let answers = v.as_array().expect("a batch answer");
    assert_eq!(answers.len(), 2, "each request id is answered: {v}");
    assert!(
        answers
            .iter()
            .all(|a| a["error"]["code"] == respond::CODE_DENIED)
    );
    assert!(h.stub.seen().is_empty());
    let recs = h.wait_mcp("the batch", |r| r.len() == 5).await;
    assert_eq!(
        recs.iter().filter(|e| e.malformed.is_some()).count(),
        1,
        "the bad element has its own record"
    );
    assert!(
        recs.iter()
            .any(|e| e.name.as_deref() == Some("deploy_prod"))
    );
    // Without a denied call, the bad element refuses the batch on its own.
    let batch = json!([call(5, "add", json!({})), "junk"]).to_string();
    let (status, _, resp) = h
        .send(post(batch.clone()).body(Full::new(batch.into())).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_body(&resp);
    assert_eq!(v[0]["error"]["code"], respond::CODE_INVALID_REQUEST);
    assert!(
        v[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("element 2 of the batch")
    );
    assert!(h.stub.seen().is_empty());
}

#[tokio::test]
async fn every_held_call_of_a_batch_waits_for_one_decision() {
    let h = Harness::new(RULES, echo()).await;
    let batch = json!([
        call(1, "release_a", json!({})),
        call(2, "add", json!({})),
        call(3, "release_b", json!({}))
    ])
    .to_string();
    let approvals = h.approvals.clone();
    let decide = tokio::spawn(async move {
        for _ in 0..400 {
            if let Some(held) = approvals.list().first() {
                let names: Vec<_> = held.calls.iter().map(|c| c.name.clone().unwrap()).collect();
                assert_eq!(names, ["release_a", "release_b"]);
                approvals
                    .decide(
                        held.id,
                        Verdict {
                            approved: true,
                            approver: Approver {
                                uid: 0,
                                user: None,
                                pid: None,
                            },
                            reason: None,
                        },
                    )
                    .unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("nothing was held");
    });
    let (_, _, resp) = h
        .send(post(batch.clone()).body(Full::new(batch.into())).unwrap())
        .await;
    decide.await.unwrap();
    assert_eq!(json_body(&resp).as_array().unwrap().len(), 3);
    assert_eq!(h.stub.seen().len(), 1, "approved, then forwarded");
    let recs = h.records();
    assert!(
        recs.iter()
            .any(|r| matches!(&r.event, Event::Approval(a) if a.outcome == "approved"))
    );
}

#[tokio::test]
async fn a_slow_or_split_request_line_is_still_http() {
    let h = Harness::new(RULES, echo()).await;
    let body = call(7, "deploy_prod", json!({})).to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The first byte, a pause past what a peek-once sniffer waited, then the rest.
    let bytes = request.clone().into_bytes();
    let (out, protocol, _) = h
        .raw(Process::default(), |mut w| async move {
            w.write_all(&bytes[..1]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            w.write_all(&bytes[1..]).await.unwrap();
            w
        })
        .await;
    assert_eq!(protocol, Some(Protocol::Http1));
    assert!(
        String::from_utf8_lossy(&out).contains("\"code\":-32001"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // One byte at a time.
    let bytes = request.into_bytes();
    let (out, protocol, _) = h
        .raw(Process::default(), |mut w| async move {
            for b in &bytes {
                w.write_all(std::slice::from_ref(b)).await.unwrap();
                w.flush().await.unwrap();
            }
            w
        })
        .await;
    assert_eq!(protocol, Some(Protocol::Http1));
    assert!(String::from_utf8_lossy(&out).contains("\"code\":-32001"));
    assert!(h.stub.seen().is_empty());
}

#[tokio::test]
async fn a_request_head_past_the_client_buffer_is_refused_with_431_and_one_within_it_passes() {
    let h = Harness::new("", echo()).await;
    let head = |pad: usize| {
        let body = call(1, "add", json!({})).to_string();
        format!(
            "POST /mcp HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Pad: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            "a".repeat(pad),
            body.len()
        )
        .into_bytes()
    };
    // Within the client buffer (32 KiB): forwarded and answered.
    let small = head(24 * 1024);
    let (out, _, _) = h
        .raw(Process::default(), |mut w| async move {
            w.write_all(&small).await.unwrap();
            w
        })
        .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(h.stub.seen().len(), 1);
    // Past it: refused by the proxy, never forwarded.
    let big = head(40 * 1024);
    let (out, _, result) = h
        .raw(Process::default(), |mut w| async move {
            let _ = w.write_all(&big).await;
            w
        })
        .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(result.is_err(), "the connection ends with the error");
    assert_eq!(h.stub.seen().len(), 1);
}

#[tokio::test]
async fn opaque_bytes_are_refused_under_rules_and_relayed_without() {
    let h = Harness::new(RULES, echo()).await;
    let (out, protocol, result) = h
        .raw(Process::default(), |mut w| async move {
            w.write_all(b"\x00\x01binary").await.unwrap();
            w
        })
        .await;
    assert_eq!(protocol, Some(Protocol::Opaque));
    assert!(out.is_empty());
    let err = result.unwrap_err();
    assert_eq!(err.outcome().status, Status::Refused);
    assert!(err.to_string().contains("opaque = \"relay\""), "{err}");
    // TLS with no host CA to terminate it is refused the same way (h2c is served: see the
    // http2 tests).
    let (_, protocol, result) = h
        .raw(Process::default(), |mut w| async move {
            w.write_all(b"\x16\x03\x01\x00\x05\x01").await.unwrap();
            w
        })
        .await;
    assert_eq!(protocol, Some(Protocol::Tls));
    assert_eq!(result.unwrap_err().outcome().status, Status::Refused);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_first_line_is_refused() {
    let h = Harness::new(
        &format!("{RULES}\n[gateway]\nfirst_bytes_timeout_secs = 1\n"),
        echo(),
    )
    .await;
    let (_, protocol, result) = h
        .raw(Process::default(), |mut w| async move {
            w.write_all(b"POS").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            w
        })
        .await;
    assert_eq!(protocol, None);
    let outcome = result.unwrap_err().outcome();
    assert_eq!(outcome.status, Status::Refused);
    assert!(outcome.detail.unwrap().contains("3 bytes"));
    assert!(h.stub.seen().is_empty());
}

#[tokio::test]
async fn numbers_urls_and_the_callers_argv_are_masked_in_the_record() {
    let h = Harness::new(RULES, echo()).await;
    let body = call(1, "pay", json!({"card": 4111111111111111u64, "qty": 2})).to_string();
    let req = Request::post("/mcp?mail=bob@example.com")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    h.send(req).await;
    let recs = h.wait_mcp("the call", |r| !r.is_empty()).await;
    let e = &recs[0];
    assert_eq!(
        e.params.as_ref().unwrap()["arguments"]["card"],
        "[MASKED:payment_card]1111"
    );
    assert_eq!(e.params.as_ref().unwrap()["arguments"]["qty"], 2);
    assert!(!e.http.path.contains("bob@example.com"), "{}", e.http.path);
    // Forwarded unchanged: no wire rule fired.
    assert!(String::from_utf8_lossy(&h.stub.seen()[0].body).contains("4111111111111111"));
}

#[tokio::test]
async fn a_wire_rule_rewrites_a_compressed_body_and_re_encodes_it() {
    let h = Harness::new(WIRE_RULE, echo()).await;
    let body = encoded(
        &call(1, "file", json!({"ticket": "T-1234"})),
        &[Encoding::Gzip],
    )
    .await;
    let (status, _, _) = h
        .send(
            post(body.clone())
                .header(CONTENT_ENCODING, "gzip")
                .body(Full::new(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let seen = &h.stub.seen()[0];
    assert_eq!(seen.headers[CONTENT_ENCODING], "gzip");
    let decoded = codec::decode(seen.body.clone(), &[Encoding::Gzip], 1 << 20)
        .await
        .unwrap();
    let v = json_body(&decoded);
    assert_eq!(v["params"]["arguments"]["ticket"], "[MASKED:ticket]");
    assert_eq!(
        seen.headers["content-length"],
        seen.body.len().to_string().as_str()
    );
}

#[tokio::test]
async fn a_compressed_response_is_decoded_for_the_record() {
    let gz = encoded(
        &json!({"jsonrpc": "2.0", "id": 1, "result": {"mail": "bob@example.com"}}),
        &[Encoding::Gzip],
    )
    .await;
    let answer: Answer = Arc::new(move |_: &Seen| {
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_ENCODING, "gzip")
            .body(Full::new(gz.clone()))
            .unwrap()
    });
    let h = Harness::new(RULES, answer).await;
    let body = call(1, "whoami", json!({})).to_string();
    let (_, headers, resp) = h
        .send(post(body.clone()).body(Full::new(body.into())).unwrap())
        .await;
    assert_eq!(headers[CONTENT_ENCODING], "gzip", "passed on as it came");
    assert!(!resp.is_empty());
    let recs = h
        .wait_mcp("the answer", |r| {
            r.iter().any(|e| e.direction == Direction::ServerToClient)
        })
        .await;
    let ans = recs
        .iter()
        .find(|e| e.direction == Direction::ServerToClient)
        .unwrap();
    assert_eq!(ans.message, Some(Kind::Response), "{ans:?}");
    assert!(
        ans.result.as_ref().unwrap()["mail"]
            .as_str()
            .unwrap()
            .starts_with("[HASH:email:")
    );
}

/// A keep-alive client on a fresh connection through the proxy (hyper's HTTP/1.1 client).
async fn keep_alive_client(
    h: &Harness,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    ConnTask,
) {
    let (client, task) = h.open(Process::default());
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .unwrap();
    tokio::spawn(connection);
    (sender, task)
}

fn mcp_call(id: u64, tool: &str) -> Request<Full<Bytes>> {
    let body = call(id, tool, json!({})).to_string();
    post(body.clone()).body(Full::new(body.into())).unwrap()
}

#[tokio::test]
async fn an_unused_gateway_connection_is_closed_and_the_next_request_opens_another() {
    let mut h = Harness::new("", echo()).await;
    h.upstream_idle = Some(Duration::from_millis(500));
    let (mut client, _task) = keep_alive_client(&h).await;
    let resp = client.send_request(mcp_call(1, "add")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    assert_eq!(h.stub.conns.counts(), (1, 1), "(opened, open)");
    // Unused for more than the idle time: closed, the client's connection still open.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.stub.conns.counts().1 > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.stub.conns.counts(),
        (1, 0),
        "the gateway connection was closed"
    );
    assert!(!client.is_closed(), "the client's connection stays open");
    // The next request goes over a new gateway connection, recorded like the first.
    let resp = client.send_request(mcp_call(2, "add")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"id\":2"),
        "{body:?}"
    );
    assert_eq!(h.stub.conns.counts(), (2, 1));
    let answers = h
        .wait_mcp("both answers", |r| {
            r.iter()
                .filter(|e| e.direction == Direction::ServerToClient)
                .count()
                == 2
        })
        .await;
    assert_eq!(
        answers.len(),
        4,
        "two requests and their answers: {answers:?}"
    );
}

/// A gateway that answers every call with a result of one text item, `text`.
fn text_answer(text: String) -> Answer {
    Arc::new(move |_: &Seen| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}});
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    })
}

#[tokio::test]
async fn a_gateway_connection_in_the_middle_of_an_exchange_is_kept() {
    // An 8 MiB answer: several times what the pipes and buffers between the gateway and a
    // client that does not read it yet hold (about 1 MiB), so the gateway connection is
    // still mid-answer while the client waits.
    let answer = text_answer("x".repeat(8 << 20));
    let mut h = Harness::new("", answer).await;
    h.upstream_idle = Some(Duration::from_millis(30));
    let (mut client, _task) = keep_alive_client(&h).await;
    // The gateway takes 400 ms to answer `slow`: many idle periods with the request out.
    let resp = client.send_request(mcp_call(1, "slow")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The answer's head is here, its body not read for many idle periods.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.stub.conns.counts(), (1, 1), "open, mid-answer");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).expect("the whole answer");
    let text = answer["result"]["content"][0]["text"].as_str().unwrap();
    assert_eq!(text.len(), 8 << 20);
    assert_eq!(
        h.stub.conns.counts().0,
        1,
        "one gateway connection throughout"
    );
}

/// Waits until `n` of the harness's client connections are parked.
async fn parked(h: &Harness, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.stats.parked.load(Ordering::Relaxed) != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} parked, not {n}",
            h.stats.parked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_idle_client_connection_is_parked_and_served_again_on_the_same_connection() {
    let mut h = Harness::new("", echo()).await;
    h.upstream_idle = Some(Duration::from_millis(40));
    let (mut client, _task) = keep_alive_client(&h).await;
    for id in 1..=3 {
        let resp = client.send_request(mcp_call(id, "add")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers().get(hyper::header::CONNECTION).is_none(),
            "keep-alive as before: {:?}",
            resp.headers()
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(&format!("\"id\":{id}")),
            "{body:?}"
        );
        // Idle: parked, its gateway connection closed, the client's connection open.
        parked(&h, 1).await;
        assert_eq!(h.stub.conns.counts().1, 0, "no gateway connection held");
        assert!(!client.is_closed());
    }
    // One client connection throughout; each call recorded as usual.
    let answers = h
        .wait_mcp("three answers", |r| {
            r.iter()
                .filter(|e| e.direction == Direction::ServerToClient)
                .count()
                == 3
        })
        .await;
    assert_eq!(answers.len(), 6, "{answers:?}");
    // A client that closes while parked ends its connection.
    drop(client);
    parked(&h, 0).await;
}

#[tokio::test]
async fn an_answer_that_takes_many_idle_periods_is_not_cut_and_keeps_its_connection() {
    let mut h = Harness::new("", echo()).await;
    h.upstream_idle = Some(Duration::from_millis(30));
    let (mut client, _task) = keep_alive_client(&h).await;
    // The gateway takes 400 ms to answer `slow`: more than ten idle periods with the
    // request out and no answer's head yet.
    let resp = client.send_request(mcp_call(1, "slow")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get(hyper::header::CONNECTION).is_none(),
        "not told to close: {:?}",
        resp.headers()
    );
    resp.into_body().collect().await.unwrap();
    assert_eq!(h.stats.parked.load(Ordering::Relaxed), 0, "not while busy");
    let resp = client.send_request(mcp_call(2, "add")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A raw HTTP/1.1 call of `tools/call` with `id`.
fn raw_call(id: u64) -> String {
    let body = call(id, "add", json!({})).to_string();
    format!(
        "POST /mcp HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the answer to `id` is in, failing on a close or after 5 s.
async fn read_answer(r: &mut tokio::io::ReadHalf<tokio::io::DuplexStream>, id: u64) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let want = format!("\"id\":{id}");
    while !String::from_utf8_lossy(&answer).contains(&want) {
        let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_head_that_spans_a_park_is_read_whole_and_a_trickled_one_times_out() {
    let mut h = Harness::new("", echo()).await;
    h.upstream_idle = Some(Duration::from_millis(20));
    let (client, task) = h.open(Process::default());
    let (mut r, mut w) = tokio::io::split(client);
    w.write_all(raw_call(1).as_bytes()).await.unwrap();
    read_answer(&mut r, 1).await;
    parked(&h, 1).await;
    let parks = || h.stats.parks.load(Ordering::Relaxed);
    let kept_alive = |answer: &str| !answer.to_ascii_lowercase().contains("connection: close");
    // Woken by the first part of a head, the rest sent after several idle periods: the
    // round that serves it is not parked before it has (that would end keep-alive).
    let second = raw_call(2);
    let (first, rest) = second.split_at(20);
    w.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    w.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_answer(&mut r, 2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(kept_alive(&answer), "{answer}");
    // The next head begun and paused as long, in a round that has served: that round is
    // parked with the part in hand, which the next round reads first, without waiting.
    let before = parks();
    let third = raw_call(3);
    let (first, rest) = third.split_at(20);
    w.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        parks(),
        before + 1,
        "parked once, with the head's part in hand"
    );
    assert_eq!(h.stats.parked.load(Ordering::Relaxed), 0, "not waiting");
    w.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_answer(&mut r, 3).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(kept_alive(&answer), "{answer}");
    w.write_all(raw_call(4).as_bytes()).await.unwrap();
    read_answer(&mut r, 4).await;
    drop((r, w));
    task.await.unwrap();
    // A head begun and never finished is not kept alive by parks: each would start a new
    // round, and with it hyper's clock for the head, were a round with part of a head in
    // hand parked again. Here that clock is 300 ms, fifteen idle periods.
    h.header_timeout = Duration::from_millis(300);
    let (client, task) = h.open(Process::default());
    let (mut r, mut w) = tokio::io::split(client);
    w.write_all(raw_call(3).as_bytes()).await.unwrap();
    read_answer(&mut r, 3).await;
    parked(&h, 1).await;
    w.write_all(b"POST /mcp HT").await.unwrap();
    let t = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut out))
        .await
        .expect("the connection ended by the head's timeout")
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    let served = task.await.unwrap();
    assert!(served.result.is_err(), "{:?}", served.result);
    drop(w);
}

#[tokio::test]
async fn a_slow_reader_gets_the_whole_answer_before_its_connection_is_closed_or_parked() {
    // 80 KiB: more than the pipe to the client holds (64 KiB), less than that and hyper's
    // buffer (32 KiB): hyper holds the answer's end while the client does not read, over
    // many idle checks. (hyper itself moves a connection on only once that end is flushed;
    // `park.rs` also waits for it, for the answers hyper moves on from unflushed.)
    let answer = text_answer("y".repeat(80 << 10));
    let mut h = Harness::new("", answer).await;
    h.upstream_idle = Some(Duration::from_millis(20));
    for close in [true, false] {
        let (client, task) = h.open(Process::default());
        let (mut r, mut w) = tokio::io::split(client);
        let request = raw_call(1);
        let request = if close {
            request.replacen("Host: gw\r\n", "Host: gw\r\nConnection: close\r\n", 1)
        } else {
            request
        };
        w.write_all(request.as_bytes()).await.unwrap();
        // Not read for many idle periods.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf))
                .await
                .expect("the rest of the answer")
                .unwrap();
            out.extend_from_slice(&buf[..n]);
            if n == 0 || (!close && out.ends_with(b"}}")) {
                break;
            }
        }
        let text = String::from_utf8_lossy(&out);
        let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
        let answer: Value = serde_json::from_str(body).expect("the whole answer");
        assert_eq!(
            answer["result"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .len(),
            80 << 10,
            "close: {close}"
        );
        if close {
            task.await.unwrap();
        } else {
            // Kept alive: the next call is answered on it.
            w.write_all(raw_call(2).as_bytes()).await.unwrap();
            let mut more = vec![0u8; 1 << 16];
            let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut more))
                .await
                .expect("an answer")
                .unwrap();
            assert!(String::from_utf8_lossy(&more[..n]).starts_with("HTTP/1.1 200"));
        }
    }
}

#[tokio::test]
async fn a_reconnect_waits_no_longer_than_the_connect_timeout() {
    let never: Connect = Arc::new(|| Box::pin(std::future::pending()));
    let connect = super::gateway::timed(never, Duration::from_millis(50));
    let t = std::time::Instant::now();
    let e = match connect().await {
        Err(e) => e,
        Ok(_) => panic!("a gateway that never accepts gave a connection"),
    };
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(e.to_string().contains("--connect-timeout"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn gateway_connections_do_not_pile_up_across_reconnects() {
    let stub = Arc::new(Stub {
        seen: Arc::default(),
        answer: echo(),
        close_each: true,
        tls: None,
        trailers: None,
        http1_only: false,
        conns: Arc::default(),
    });
    let connect = stub.connect();
    let first = connect().await.unwrap();
    let gateway = Gateway::new(first, connect, super::Version::Http1)
        .await
        .unwrap();
    for i in 0..20 {
        let body = call(i, "add", json!({})).to_string();
        let req = Request::post("/mcp")
            .header(CONTENT_TYPE, "application/json")
            .body(respond::full(body))
            .unwrap();
        let resp = gateway.send(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        // Let the closed connection's task see its end.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stub.seen().len(), 20);
    let live = gateway.live_tasks().await;
    assert!(live <= 2, "{live} connection tasks");
}

/// TLS through the same pipeline: a gateway with its own CA, the proxy terminating with a
/// host CA of its own (or passing through), a rustls client.
mod tls {
    use super::*;
    use crate::policy::tls::Mode;
    use crate::proxy::tls::TlsContext;
    use rustls::pki_types::ServerName;

    struct Pki {
        /// The gateway's CA, as a PEM file the proxy may be told to trust.
        ca_file: std::path::PathBuf,
        ca_der: rustls::pki_types::CertificateDer<'static>,
        gateway: Arc<rustls::ServerConfig>,
        _dir: tempfile::TempDir,
    }

    /// A CA and a gateway certificate for `gw.test` and 10.0.0.5 signed by it.
    fn pki() -> Pki {
        pki_with(rustls::DEFAULT_VERSIONS)
    }

    fn pki_with(versions: &[&'static rustls::SupportedProtocolVersion]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["gw.test".to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.5".parse().unwrap()));
        let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
        let ca_file = dir.path().join("gateway-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pki {
            ca_file,
            ca_der: ca.der().clone(),
            gateway: Arc::new(config),
            _dir: dir,
        }
    }

    async fn harness(policy_extra: &str, pki: &Pki, trust_gateway: bool) -> Harness {
        let stub = Arc::new(Stub {
            seen: Arc::default(),
            answer: echo(),
            close_each: false,
            tls: Some(pki.gateway.clone()),
            trailers: None,
            http1_only: false,
            conns: Arc::default(),
        });
        let mut h = Harness::with_stub(&format!("{RULES}\n{policy_extra}"), stub).await;
        let extra = if trust_gateway {
            vec![pki.ca_file.clone()]
        } else {
            Vec::new()
        };
        h.tls = Some(Arc::new(
            TlsContext::new(h.dir.path(), Mode::Terminate, &extra, &[]).unwrap(),
        ));
        h
    }

    fn roots(der: &rustls::pki_types::CertificateDer<'static>) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        r.add(der.clone()).unwrap();
        r
    }

    fn host_ca(h: &Harness) -> rustls::pki_types::CertificateDer<'static> {
        h.tls.as_ref().unwrap().ca.der().clone()
    }

    /// One call over TLS: the answer (or why the handshake failed) and how the proxy saw it.
    async fn call_over_tls(
        h: &Harness,
        process: Process,
        name: ServerName<'static>,
        trusted: rustls::RootCertStore,
        body: Value,
    ) -> (Result<Value, String>, crate::proxy::Served) {
        let (answer, served) = call_with(h, process, name, client_config(trusted), body).await;
        (answer.map(|(v, _)| v), served)
    }

    fn client_config(trusted: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(trusted)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// One call over TLS with the client's own configuration (whose sessions it may resume):
    /// the answer and how the client's handshake went, and how the proxy saw it.
    async fn call_with(
        h: &Harness,
        process: Process,
        name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
        body: Value,
    ) -> (
        Result<(Value, Option<rustls::HandshakeKind>), String>,
        crate::proxy::Served,
    ) {
        let (client, task) = h.open(process);
        let answer = async {
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, client)
                .await
                .map_err(|e| e.to_string())?;
            let kind = tls.get_ref().1.handshake_kind();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let text = body.to_string();
            let resp = sender
                .send_request(
                    post(text.clone())
                        .header("connection", "close")
                        .body(Full::new(Bytes::from(text)))
                        .unwrap(),
                )
                .await
                .map_err(|e| e.to_string())?;
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            Ok((json_body(&bytes), kind))
        }
        .await;
        let served = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the connection ends")
            .unwrap();
        (answer, served)
    }

    /// The first `tls_failure` record of the trail.
    fn tls_failure(h: &Harness) -> Box<crate::audit::record::TlsFailureEvent> {
        h.records()
            .into_iter()
            .find_map(|r| match r.event {
                Event::TlsFailure(f) => Some(f),
                _ => None,
            })
            .expect("a tls_failure record")
    }

    fn gw() -> ServerName<'static> {
        ServerName::try_from("gw.test").unwrap()
    }

    #[tokio::test]
    async fn terminated_calls_go_through_the_same_pipeline() {
        let pki = pki();
        let h = harness("", &pki, true).await;
        let ca = roots(&host_ca(&h));
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            ca.clone(),
            call(1, "add", json!({})),
        )
        .await;
        assert_eq!(answer.unwrap()["result"]["content"][0]["text"], "ok");
        assert!(served.result.is_ok(), "{:?}", served.result.err());
        let tls = served.tls.unwrap();
        assert_eq!(
            (tls.mode.as_str(), tls.sni.as_deref()),
            ("terminate", Some("gw.test"))
        );
        assert_eq!(tls.alpn.as_deref(), Some("http/1.1"));
        let up = tls.upstream.unwrap();
        assert!(
            up.verified && up.issuer.contains("gateway test CA"),
            "{up:?}"
        );
        assert!(up.sans.contains(&"gw.test".to_owned()));
        // The rules hold inside TLS as outside.
        let (answer, _) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            ca,
            call(2, "deploy_prod", json!({})),
        )
        .await;
        assert_eq!(answer.unwrap()["error"]["code"], respond::CODE_DENIED);
        assert_eq!(
            h.stub.seen().len(),
            1,
            "only the allowed call reached the gateway"
        );
        let recs = h.wait_mcp("the calls", |r| r.len() >= 3).await;
        let e = recs
            .iter()
            .find(|e| e.name.as_deref() == Some("add"))
            .unwrap();
        assert_eq!(
            e.connection.tls.as_ref().unwrap().sni.as_deref(),
            Some("gw.test")
        );
    }

    #[tokio::test]
    async fn an_untrusted_gateway_refuses_the_client_and_is_recorded() {
        let pki = pki();
        let h = harness("", &pki, false).await;
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            roots(&host_ca(&h)),
            call(1, "add", json!({})),
        )
        .await;
        assert!(
            answer.is_err(),
            "the handshake must not complete: {answer:?}"
        );
        assert!(matches!(served.result, Err(ProxyError::Tls(_))));
        assert!(h.stub.seen().is_empty());
        let failure = tls_failure(&h);
        assert_eq!(failure.side, "upstream");
        assert!(
            failure.reason.contains("--upstream-ca"),
            "{}",
            failure.reason
        );
    }

    #[tokio::test]
    async fn a_client_that_does_not_trust_the_host_ca_is_named_in_status() {
        let pki = pki();
        let h = harness("", &pki, true).await;
        let process = Process {
            exe: Some("/usr/bin/old-client".into()),
            pid: 77,
            ..Default::default()
        };
        // It trusts the gateway's own CA, as it did before mcptrail.
        let (answer, served) = call_over_tls(
            &h,
            process,
            gw(),
            roots(&pki.ca_der),
            call(1, "add", json!({})),
        )
        .await;
        assert!(answer.is_err());
        assert!(matches!(served.result, Err(ProxyError::Tls(_))));
        let clients = h.stats.tls_clients.lock().unwrap().clone();
        let entry = clients
            .get("/usr/bin/old-client")
            .expect("named by its executable");
        assert_eq!((entry.count, entry.last_pid), (1, 77));
        let failure = tls_failure(&h);
        assert_eq!(failure.side, "client");
        assert!(
            failure.reason.contains("mcptrail ca install"),
            "{}",
            failure.reason
        );
    }

    #[tokio::test]
    async fn tls_1_2_and_1_3_gateways_are_both_terminated() {
        for (versions, want) in [
            (&[&rustls::version::TLS12][..], "TLSv1.2"),
            (&[&rustls::version::TLS13][..], "TLSv1.3"),
        ] {
            let pki = pki_with(versions);
            let h = harness("", &pki, true).await;
            let (answer, served) = call_over_tls(
                &h,
                Process::default(),
                gw(),
                roots(&host_ca(&h)),
                call(1, "add", json!({})),
            )
            .await;
            assert_eq!(answer.unwrap()["id"], 1, "{want}");
            let tls = served.tls.unwrap();
            assert_eq!(tls.version.as_deref(), Some(want));
            assert!(tls.cipher.unwrap().starts_with("TLS_"), "an IANA name");
        }
    }

    #[tokio::test]
    async fn a_gateway_that_wants_a_client_certificate_gets_the_configured_one() {
        use std::os::unix::fs::PermissionsExt as _;
        let mut pki = pki();
        // The gateway now asks for a client certificate signed by its client CA.
        let client_ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let client_ca = rcgen::CertifiedIssuer::self_signed(params, client_ca_key).unwrap();
        let agent_key = rcgen::KeyPair::generate().unwrap();
        let agent_cert = rcgen::CertificateParams::new(vec!["mcptrail-agent".to_owned()])
            .unwrap()
            .signed_by(&agent_key, &client_ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("agent.pem"), dir.path().join("agent.key"));
        std::fs::write(&cert_file, agent_cert.pem()).unwrap();
        std::fs::write(&key_file, agent_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(client_ca.der())),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(pki.gateway.cert_resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        pki.gateway = Arc::new(config);
        let entry = format!(
            "[[tls.gateways]]\ndestination = \"10.0.0.5:*\"\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        );
        let h = harness(&entry, &pki, true).await;
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            roots(&host_ca(&h)),
            call(1, "add", json!({})),
        )
        .await;
        assert_eq!(answer.unwrap()["id"], 1, "{:?}", served.result.err());
        assert_eq!(h.stub.seen().len(), 1);
        // A key others can read is refused, with the command that fixes it.
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            roots(&host_ca(&h)),
            call(2, "add", json!({})),
        )
        .await;
        assert!(answer.is_err());
        let err = served.result.unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    /// The gateway's configuration asking for client certificates from a CA of its own:
    /// required, or optional (`allow_unauthenticated`).
    fn wanting_client_certificates(
        pki: &mut Pki,
        versions: &[&'static rustls::SupportedProtocolVersion],
        optional: bool,
    ) {
        let client_ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let client_ca = rcgen::CertifiedIssuer::self_signed(params, client_ca_key).unwrap();
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(client_ca.der())),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let verifier = if optional {
            builder.allow_unauthenticated().build().unwrap()
        } else {
            builder.build().unwrap()
        };
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(pki.gateway.cert_resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        pki.gateway = Arc::new(config);
    }

    #[tokio::test]
    async fn a_gateway_requiring_a_client_certificate_none_configured_refuses_at_the_handshake() {
        // TLS 1.2 refuses inside the handshake; TLS 1.3 only after it, with an alert: both
        // must refuse the client at its handshake with a record that says what to configure,
        // not take it on and answer its first call with a 502.
        for versions in [
            &[&rustls::version::TLS12][..],
            &[&rustls::version::TLS13][..],
        ] {
            let mut pki = pki_with(versions);
            wanting_client_certificates(&mut pki, versions, false);
            let h = harness("", &pki, true).await;
            let (answer, served) = call_over_tls(
                &h,
                Process::default(),
                gw(),
                roots(&host_ca(&h)),
                call(1, "add", json!({})),
            )
            .await;
            assert!(answer.is_err(), "{versions:?}: {answer:?}");
            assert!(
                matches!(served.result, Err(ProxyError::Tls(_))),
                "{versions:?}"
            );
            assert!(h.stub.seen().is_empty());
            let failure = tls_failure(&h);
            assert_eq!(failure.side, "upstream");
            assert!(
                failure.reason.contains("client_cert_file")
                    && failure.reason.contains("passthrough"),
                "{versions:?}: {}",
                failure.reason
            );
        }
    }

    #[tokio::test]
    async fn a_gateway_for_which_a_client_certificate_is_optional_is_reached_without_one() {
        for versions in [
            &[&rustls::version::TLS12][..],
            &[&rustls::version::TLS13][..],
        ] {
            let mut pki = pki_with(versions);
            wanting_client_certificates(&mut pki, versions, true);
            let h = harness("", &pki, true).await;
            let (answer, served) = call_over_tls(
                &h,
                Process::default(),
                gw(),
                roots(&host_ca(&h)),
                call(1, "add", json!({})),
            )
            .await;
            assert_eq!(
                answer.unwrap()["id"],
                1,
                "{versions:?}: {:?}",
                served.result.err()
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_reconnects_resumes_its_session() {
        let pki = pki();
        let h = harness("", &pki, true).await;
        let config = client_config(roots(&host_ca(&h)));
        let mut kinds = Vec::new();
        for id in 1..=3 {
            let (answer, served) = call_with(
                &h,
                Process::default(),
                gw(),
                config.clone(),
                call(id, "add", json!({})),
            )
            .await;
            let (value, kind) = answer.unwrap();
            assert_eq!(value["id"], id);
            // Every connection's record names the gateway's certificate, resumed or not, and
            // says whether the proxy's session with the gateway was resumed.
            let upstream = served.tls.unwrap().upstream.unwrap();
            assert!(upstream.verified && upstream.sans.contains(&"gw.test".to_owned()));
            kinds.push((kind, upstream.resumed));
        }
        assert_eq!(kinds[0], (Some(rustls::HandshakeKind::Full), false));
        assert_eq!(
            kinds[2],
            (Some(rustls::HandshakeKind::Resumed), true),
            "{kinds:?}"
        );
        assert_eq!(h.stub.seen().len(), 3);
    }

    #[tokio::test]
    async fn a_hello_that_never_ends_is_a_recorded_failure() {
        let pki = pki();
        let h = harness("[gateway]\nfirst_bytes_timeout_secs = 1\n", &pki, true).await;
        // A TLS record header announcing 512 bytes, then nothing.
        let (_, protocol, result) = h
            .raw(Process::default(), |mut w| async move {
                w.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                w
            })
            .await;
        assert_eq!(protocol, Some(Protocol::Tls));
        assert!(matches!(result, Err(ProxyError::Tls(_))));
        let failure = tls_failure(&h);
        assert_eq!(failure.side, "client");
        assert!(
            failure.reason.contains("did not arrive"),
            "{}",
            failure.reason
        );
    }

    #[tokio::test]
    async fn a_client_without_sni_gets_a_leaf_for_the_address() {
        let pki = pki();
        let h = harness("", &pki, true).await;
        let ip = ServerName::IpAddress("10.0.0.5".parse::<std::net::IpAddr>().unwrap().into());
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            ip,
            roots(&host_ca(&h)),
            call(1, "add", json!({})),
        )
        .await;
        assert_eq!(answer.unwrap()["id"], 1);
        assert_eq!(served.tls.unwrap().sni, None);
    }

    #[tokio::test]
    async fn a_passed_through_gateway_is_relayed_untouched_with_its_hello_recorded() {
        let pki = pki();
        let h = harness(
            "[[tls.gateways]]\ndestination = \"10.0.0.5:*\"\nmode = \"passthrough\"\n",
            &pki,
            false,
        )
        .await;
        // The client trusts the gateway itself: nothing in between re-signs.
        let (answer, served) = call_over_tls(
            &h,
            Process::default(),
            gw(),
            roots(&pki.ca_der),
            call(1, "deploy_prod", json!({})),
        )
        .await;
        assert_eq!(
            answer.unwrap()["result"]["content"][0]["text"],
            "ok",
            "passthrough cannot apply the rules: that is what it means"
        );
        let tls = served.tls.unwrap();
        assert_eq!(tls.mode, "passthrough");
        assert_eq!(tls.sni.as_deref(), Some("gw.test"));
        assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
        assert!(tls.cipher.unwrap().starts_with("TLS_"), "an IANA name");
        assert!(tls.upstream.is_none());
    }
}

/// HTTP/2: h2c with prior knowledge and h2 by ALPN, through the same pipeline; streams
/// multiplexed, each its own exchange; the limits that cut off abusive clients.
mod http2 {
    use super::*;
    use hyper::client::conn::http2::SendRequest;

    /// An HTTP/2 client (prior knowledge) on a fresh connection to the proxy.
    async fn h2c(
        h: &Harness,
    ) -> (
        SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<crate::proxy::Served>,
    ) {
        let (client, task) = h.open(Process::default());
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(client),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        (sender, task)
    }

    fn h2_post(body: &Value) -> Request<Full<Bytes>> {
        Request::post("http://10.0.0.5:8811/mcp")
            .header(CONTENT_TYPE, "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    async fn answer(
        mut sender: SendRequest<Full<Bytes>>,
        body: Value,
    ) -> (Value, std::time::Instant) {
        let resp = sender.send_request(h2_post(&body)).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (json_body(&bytes), std::time::Instant::now())
    }

    #[tokio::test]
    async fn concurrent_streams_are_separate_exchanges_and_none_waits_for_another() {
        let h = Harness::new(RULES, echo()).await;
        let (sender, task) = h2c(&h).await;
        let start = std::time::Instant::now();
        let slow = tokio::spawn(answer(sender.clone(), call(1, "slow", json!({}))));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let fast = tokio::spawn(answer(sender.clone(), call(2, "add", json!({}))));
        let denied = tokio::spawn(answer(sender.clone(), call(3, "deploy-prod", json!({}))));
        let (fast, fast_at) = fast.await.unwrap();
        let (denied, _) = denied.await.unwrap();
        let (slow, slow_at) = slow.await.unwrap();
        assert_eq!(fast["id"], 2);
        assert_eq!(slow["id"], 1);
        assert_eq!(denied["error"]["code"], -32001, "{denied}");
        // The stub holds the slow call 400 ms: the fast one, sent after it on the same
        // connection, is answered first (no head-of-line blocking in the proxy).
        assert!(fast_at < slow_at, "the fast call waited for the slow one");
        assert!(fast_at - start < Duration::from_millis(350));
        drop(sender);
        let served = task.await.unwrap();
        assert!(served.result.is_ok(), "{:?}", served.result.err());
        assert_eq!(served.protocol, Some(Protocol::H2));
        // Forwarded in HTTP/2, the denied call not at all.
        let seen = h.stub.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.version == hyper::Version::HTTP_2));
        // Each stream is its own exchange, request and answer linked, with its stream.
        let mcp = h.mcp();
        let mut streams = std::collections::BTreeSet::new();
        for id in 1..=3 {
            let of_id: Vec<&McpEvent> = mcp
                .iter()
                .filter(|e| e.jsonrpc_id == Some(json!(id)))
                .collect();
            assert_eq!(of_id.len(), 2, "request and answer of {id}");
            assert_eq!(of_id[0].exchange, of_id[1].exchange);
            assert!(of_id.iter().all(|e| e.http.version.as_deref() == Some("2")));
            let stream = of_id[0].http.stream.expect("a stream number");
            assert_eq!(of_id[1].http.stream, Some(stream));
            streams.insert(stream);
        }
        assert_eq!(streams, [1, 3, 5].into_iter().collect());
    }

    #[tokio::test]
    async fn a_stream_the_client_resets_cancels_the_gateways_and_is_recorded() {
        let h = Harness::new("", echo()).await;
        let (mut sender, task) = h2c(&h).await;
        // The stub takes 400 ms over `slow`; the client gives up (resets) after 100 ms.
        let call_it = sender.send_request(h2_post(&call(1, "slow", json!({}))));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call_it)
                .await
                .is_err()
        );
        // The connection goes on: another stream is answered.
        let (value, _) = answer(sender.clone(), call(2, "add", json!({}))).await;
        assert_eq!(value["id"], 2);
        tokio::time::sleep(Duration::from_millis(600)).await;
        // The gateway's stream was reset too: the stub never finished the slow call.
        let seen = h.stub.seen();
        assert_eq!(
            seen.len(),
            1,
            "only the second call reached the gateway's end"
        );
        let mcp = h.mcp();
        let request = mcp
            .iter()
            .find(|e| e.jsonrpc_id == Some(json!(1)))
            .expect("the reset call is recorded");
        let closed = mcp
            .iter()
            .find(|e| e.exchange == request.exchange && e.direction == Direction::ServerToClient)
            .expect("the reset call has an outcome");
        assert!(closed.client_closed, "{closed:?}");
        drop(sender);
        task.await.unwrap().result.unwrap();
    }

    #[tokio::test]
    async fn an_h2c_client_of_an_http1_gateway_is_served_in_http2_and_forwarded_in_http1() {
        let stub = Stub::http1_only(echo());
        let h = Harness::with_stub(RULES, stub).await;
        let (sender, task) = h2c(&h).await;
        let slow = tokio::spawn(answer(sender.clone(), call(3, "slow", json!({}))));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (a, b) = tokio::join!(
            answer(sender.clone(), call(1, "add", json!({}))),
            answer(sender.clone(), call(2, "deploy-prod", json!({}))),
        );
        let (slow, slow_at) = slow.await.unwrap();
        assert_eq!(a.0["id"], 1);
        assert_eq!(b.0["error"]["code"], -32001);
        assert_eq!(slow["id"], 3);
        // Each stream has an HTTP/1.1 connection of its own while its answer runs: the slow
        // call holds up nothing.
        assert!(a.1 < slow_at, "the fast call waited for the slow one");
        drop(sender);
        task.await.unwrap().result.unwrap();
        let seen = h.stub.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.version == hyper::Version::HTTP_11));
        assert_eq!(seen[0].headers["host"], "10.0.0.5:8811");
        let mcp = h.mcp();
        assert!(mcp.iter().all(|e| e.http.version.as_deref() == Some("2")));
        let forwarded = mcp.iter().find(|e| e.jsonrpc_id == Some(json!(1))).unwrap();
        assert_eq!(forwarded.http.upstream_version.as_deref(), Some("1.1"));
    }

    #[tokio::test]
    async fn an_unused_pooled_gateway_connection_waits_for_a_stream_still_in_flight() {
        let stub = Stub::http1_only(echo());
        let mut h = Harness::with_stub(RULES, stub).await;
        h.upstream_idle = Some(Duration::from_millis(40));
        let (sender, _task) = h2c(&h).await;
        // The slow call's connection is out of the pool while the gateway thinks (400 ms);
        // the fast call's is back in it, unused, for many idle periods meanwhile.
        let slow = tokio::spawn(answer(sender.clone(), call(1, "slow", json!({}))));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (fast, _) = answer(sender.clone(), call(2, "add", json!({}))).await;
        assert!(fast["result"].is_object(), "{fast}");
        let (slow, _) = slow.await.unwrap();
        assert_eq!(slow["id"], 1);
        assert!(
            slow.get("error").is_none() && slow["result"].is_object(),
            "the slow call was answered by the gateway: {slow}"
        );
        // The first connection, the h2c probe's (which asked whether the gateway speaks
        // HTTP/2) and the fast call's: the slow call's was never taken from it.
        assert_eq!(h.stub.conns.counts().0, 3, "(opened, open)");
        // Both unused now: closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while h.stub.conns.counts().1 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(h.stub.conns.counts(), (3, 0));
    }

    #[tokio::test]
    async fn http1_records_say_their_version_and_no_stream() {
        let h = Harness::new("", echo()).await;
        let text = call(1, "add", json!({})).to_string();
        let (status, _, _) = h
            .send(
                post(text.clone())
                    .body(Full::new(Bytes::from(text)))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let mcp = h.mcp();
        assert!(
            mcp.iter()
                .all(|e| e.http.version.as_deref() == Some("1.1") && e.http.stream.is_none())
        );
        assert_eq!(h.stub.seen()[0].version, hyper::Version::HTTP_11);
    }

    #[tokio::test]
    async fn response_trailers_are_recorded_masked() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        trailers.insert("x-contact", "ops-lead@example.com".parse().unwrap());
        let stub = Arc::new(Stub {
            seen: Arc::default(),
            answer: echo(),
            close_each: false,
            tls: None,
            trailers: Some(trailers),
            http1_only: false,
            conns: Arc::default(),
        });
        let h = Harness::with_stub("", stub).await;
        let (sender, task) = h2c(&h).await;
        let (value, _) = answer(sender, call(7, "add", json!({}))).await;
        assert_eq!(value["id"], 7);
        task.await.unwrap().result.unwrap();
        let answer = h
            .mcp()
            .into_iter()
            .find(|e| e.direction == Direction::ServerToClient)
            .unwrap();
        // The answer itself, not a "client closed" outcome: the trailers were the end the
        // records held, and the observer saw that end.
        assert_eq!(answer.message, Some(Kind::Response), "{answer:?}");
        assert!(!answer.client_closed);
        assert_eq!(answer.http.trailers["x-checksum"], "abc123");
        let contact = &answer.http.trailers["x-contact"];
        assert!(!contact.contains("ops-lead@example.com"), "{contact}");
    }

    /// Raw HTTP/2 frames: the preface and an empty SETTINGS, then `frames`.
    fn frames(rest: &[(u8, u8, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            out.push(kind);
            out.push(flags);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        };
        frame(4, 0, 0, &[]);
        for (kind, flags, stream, payload) in rest {
            frame(*kind, *flags, *stream, payload);
        }
        out
    }

    /// A request head, HPACK-encoded from the static table: GET http://gw/ .
    const HEAD: [u8; 7] = [0x82, 0x86, 0x84, 0x01, 0x02, b'g', b'w'];

    #[tokio::test]
    async fn a_rapid_reset_flood_is_cut_off_and_other_connections_go_on() {
        let h = Harness::new("", echo()).await;
        // Open a stream and reset it at once, 500 times (CVE-2023-44487).
        let mut flood = Vec::new();
        for i in 0..500u32 {
            let stream = 2 * i + 1;
            flood.push((1u8, 0x5u8, stream, HEAD.to_vec()));
            flood.push((3, 0, stream, 8u32.to_be_bytes().to_vec()));
        }
        let bytes = frames(&flood);
        let (out, protocol, result) = h
            .raw(Process::default(), |mut w| async move {
                let _ = w.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                w
            })
            .await;
        assert_eq!(protocol, Some(Protocol::H2));
        let err = result.expect_err("cut off");
        assert!(
            matches!(err, ProxyError::Http(super::super::HttpError::CutOff(_))),
            "{err}"
        );
        assert_eq!(err.outcome().status, crate::audit::record::Status::Refused);
        // It was told why: a GOAWAY (type 7) with ENHANCE_YOUR_CALM (0xb).
        assert!(
            out.windows(2).any(|w| w == [7, 0]) && out.windows(4).any(|w| w == [0, 0, 0, 0xb]),
            "no GOAWAY in {} bytes",
            out.len()
        );
        // Another client on the same proxy is served as before.
        let (sender, task) = h2c(&h).await;
        let (value, _) = answer(sender, call(1, "add", json!({}))).await;
        assert_eq!(value["id"], 1);
        task.await.unwrap().result.unwrap();
    }

    #[tokio::test]
    async fn a_settings_flood_from_a_client_that_never_reads_is_cut_off() {
        // SETTINGS frames, each owed an ACK, from a client that reads nothing: the proxy
        // stops reading once it cannot write the ACKs (memory stays bounded), and once its
        // writes have waited `stalled_client_secs`, ends the connection.
        let h = Harness::new("[gateway]\nstalled_client_secs = 2\n", echo()).await;
        let flood: Vec<_> = (0..100_000)
            .map(|_| (4u8, 0u8, 0u32, vec![0, 3, 0, 0, 0, 100]))
            .collect();
        let bytes = frames(&flood);
        let (client, task) = h.open(Process::default());
        let (_unread, mut w) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&bytes).await;
            w
        });
        let served = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the flooding connection is cut off")
            .unwrap();
        assert_eq!(served.protocol, Some(Protocol::H2));
        let err = served.result.expect_err("cut off");
        assert!(
            matches!(err, ProxyError::Http(super::super::HttpError::CutOff(_))),
            "{err}"
        );
        assert!(err.to_string().contains("stalled_client_secs"), "{err}");
        assert_eq!(err.outcome().status, crate::audit::record::Status::Refused);
        writer.abort();
        // Others are served meanwhile and after.
        let (sender, task) = h2c(&h).await;
        let (value, _) = answer(sender, call(1, "add", json!({}))).await;
        assert_eq!(value["id"], 1);
        task.await.unwrap().result.unwrap();
    }

    #[tokio::test]
    async fn a_continuation_flood_is_cut_off() {
        let h = Harness::new("", echo()).await;
        // A request head that never ends: HEADERS without END_HEADERS, then CONTINUATION
        // frames of padding-like literal headers, far past max_header_list_size.
        let mut flood = vec![(1u8, 0x1u8, 1u32, HEAD.to_vec())];
        let mut literal = vec![0x00, 0x7f, 0x00];
        let name = vec![b'x'; 127];
        literal.splice(2..2, name);
        literal.extend([0x7f, 0x81, 0x7f]);
        literal.extend(vec![b'v'; 127 + 255]);
        for _ in 0..2000 {
            flood.push((9, 0, 1, literal.clone()));
        }
        let bytes = frames(&flood);
        let (_, protocol, result) = h
            .raw(Process::default(), |mut w| async move {
                let _ = w.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                w
            })
            .await;
        assert_eq!(protocol, Some(Protocol::H2));
        let err = result.expect_err("cut off");
        assert!(matches!(err, ProxyError::Http(_)), "{err}");
        assert!(h.stub.seen().is_empty());
    }

    #[tokio::test]
    async fn h2_by_alpn_when_the_gateway_agrees() {
        use crate::policy::tls::Mode;
        use crate::proxy::tls::TlsContext;
        use rustls::pki_types::ServerName;
        // A gateway with a certificate from its own CA, offering h2 and http/1.1.
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["gw.test".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut gateway = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        gateway.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let stub = Arc::new(Stub {
            seen: Arc::default(),
            answer: echo(),
            close_each: false,
            tls: Some(Arc::new(gateway)),
            trailers: None,
            http1_only: false,
            conns: Arc::default(),
        });
        let mut h = Harness::with_stub(RULES, stub).await;
        h.tls = Some(Arc::new(
            TlsContext::new(h.dir.path(), Mode::Terminate, &[ca_file], &[]).unwrap(),
        ));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(h.tls.as_ref().unwrap().ca.der().clone()).unwrap();
        for (offer, want) in [
            (vec![b"h2".to_vec(), b"http/1.1".to_vec()], "h2"),
            (vec![b"http/1.1".to_vec()], "http/1.1"),
        ] {
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            config.alpn_protocols = offer;
            let (client, task) = h.open(Process::default());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("gw.test").unwrap(), client)
                .await
                .unwrap();
            let agreed = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            assert_eq!(agreed.as_deref(), Some(want));
            let body = call(1, "add", json!({}));
            let value = if want == "h2" {
                let (sender, connection) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    TokioIo::new(tls),
                )
                .await
                .unwrap();
                tokio::spawn(connection);
                let mut req = h2_post(&body);
                *req.uri_mut() = "https://gw.test/mcp".parse().unwrap();
                let (v, _) = answer_req(sender, req).await;
                v
            } else {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let text = body.to_string();
                let resp = sender
                    .send_request(
                        post(text.clone())
                            .header("connection", "close")
                            .body(Full::new(Bytes::from(text)))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                json_body(&resp.into_body().collect().await.unwrap().to_bytes())
            };
            assert_eq!(value["id"], 1);
            let served = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(served.tls.unwrap().alpn.as_deref(), Some(want));
        }
        let seen = h.stub.seen();
        assert_eq!(seen[0].version, hyper::Version::HTTP_2);
        assert_eq!(seen[1].version, hyper::Version::HTTP_11);
    }

    async fn answer_req(
        mut sender: SendRequest<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> (Value, StatusCode) {
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (json_body(&bytes), status)
    }
}
