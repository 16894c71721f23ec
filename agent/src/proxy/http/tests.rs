//! The request pipeline in-process, with no root and no kernel: a client over
//! `tokio::io::duplex`, the proxy's connection path (`serve_client`: detection, then HTTP),
//! a stub gateway (a hyper server over more duplex pipes) and a real trail in a temporary
//! folder. Every path of the plan is driven here: forward, refuse, hold, unparsed, each
//! content coding, batches, and the ways a hostile client tries to get past the rules.

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
type ConnTask = tokio::task::JoinHandle<(Option<Protocol>, Result<(), ProxyError>)>;

/// What the stub gateway was sent.
#[derive(Clone, Debug)]
struct Seen {
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
}

impl Stub {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Stub {
            seen: Arc::default(),
            answer,
            close_each: false,
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A connection to the stub: one end of a pipe, a hyper server on the other.
    fn connect(self: &Arc<Self>) -> Connect {
        let stub = self.clone();
        Arc::new(move || {
            let stub = stub.clone();
            Box::pin(async move {
                let (ours, theirs) = tokio::io::duplex(1 << 16);
                tokio::spawn(async move {
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
                                headers: parts.headers,
                                body,
                                decoded,
                            };
                            let mut resp = (stub.answer)(&seen);
                            if stub.close_each {
                                resp.headers_mut()
                                    .insert("connection", "close".parse().unwrap());
                            }
                            stub.seen.lock().unwrap().push(seen);
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(theirs), service)
                        .await;
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
            _writer: writer,
        }
    }

    fn conn(&self, process: Process) -> Arc<Conn> {
        let n = self
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(Conn::new(
            ConnParts {
                audit: self.audit.clone(),
                on_failure: OnAuditFailure::Block,
                stats: self.stats.clone(),
                capture_limit: 1 << 20,
                tracker: self.tracker.clone(),
                correlator: Arc::new(Correlator::default()),
                hold_end: true,
                verifier: self.verifier.clone(),
                policy: self.live.clone(),
                approvals: self.approvals.clone(),
            },
            Arc::new(std::sync::RwLock::new(process)),
            Connection {
                client: "127.0.0.1:40000".into(),
                original_dst: "10.0.0.5:8811".into(),
                proxy: "127.0.0.1:15811".into(),
                target: None,
            },
            format!("t.{n}"),
        ))
    }

    /// Starts the proxy's connection path on a pipe; returns the client's end and the task.
    fn open(&self, process: Process) -> (tokio::io::DuplexStream, ConnTask) {
        let (client, proxy_side) = tokio::io::duplex(1 << 16);
        let gateway = self.live.current().gateway;
        let route = Route {
            connect: self.stub.connect(),
            connect_timeout: Duration::from_secs(5),
        };
        let conn = self.conn(process);
        let task = tokio::spawn(serve_client(proxy_side, route, gateway, conn));
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
        let (protocol, result) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the connection ends")
            .unwrap();
        drop(w);
        (reader.await.unwrap(), protocol, result)
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
    // TLS and h2c are not read yet, so they are refused the same way.
    for first in [
        &b"\x16\x03\x01\x00\x05\x01"[..],
        super::super::detect::H2_PREFACE,
    ] {
        let bytes = first.to_vec();
        let (_, protocol, result) = h
            .raw(Process::default(), |mut w| async move {
                w.write_all(&bytes).await.unwrap();
                w
            })
            .await;
        assert!(matches!(protocol, Some(Protocol::Tls | Protocol::H2)));
        assert_eq!(result.unwrap_err().outcome().status, Status::Refused);
    }
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

#[tokio::test]
async fn gateway_connections_do_not_pile_up_across_reconnects() {
    let stub = Arc::new(Stub {
        seen: Arc::default(),
        answer: echo(),
        close_each: true,
    });
    let connect = stub.connect();
    let first = connect().await.unwrap();
    let mut gateway = Gateway::new(first, connect).await.unwrap();
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
    assert!(
        gateway.live_tasks() <= 2,
        "{} connection tasks",
        gateway.live_tasks()
    );
}
