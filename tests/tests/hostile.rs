//! A hostile caller on the host, through the real redirect: each way it might try to get a
//! denied call past the rules, or a secret into the trail in clear, is refused or masked, and
//! recorded. The policy denies `tools/call` of `deploy*`; the gateway is the JSON-RPC echo
//! server, which would answer with a `result` if anything reached it.

use std::path::Path;
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::{DecisionAction, McpEvent, Status};
use mcptrail_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

const POLICY_RULES: &str = r#"
[[access.rules]]
name = "no-deploys"
action = "deny"
message = "deploys need a human"
match = { method = "tools/call", tool = "deploy*" }
"#;

/// Runs `raw_client.py` from the cgroup with `request` (bytes) and the extra arguments; its
/// pid and what it printed (`{"status", "body"}`).
fn send(
    cgroup: &TestCgroup,
    port: u16,
    work: &Path,
    request: &[u8],
    extra: &[&str],
) -> (u32, Value) {
    let file = tempfile::NamedTempFile::new_in(work).unwrap();
    std::fs::write(file.path(), request).unwrap();
    let mut cmd = cgroup.command("python3");
    cmd.arg(fixture("raw_client.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(file.path())
        .args(extra);
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, serde_json::from_slice(&out.stdout).unwrap())
}

fn request(port: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\n{extra_headers}"
    )
    .into_bytes();
    if !extra_headers.contains("Content-Length") {
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

fn call(id: u64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

fn answer(out: &Value) -> Value {
    let body = out["body"].as_str().unwrap();
    serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
}

/// The request records of `pid` once `n` of its MCP records are in.
fn recorded(state: &Path, pid: u32, n: usize) -> Vec<McpEvent> {
    wait_mcp_records(state, pid, n)
}

fn assert_denied_by_rule(state: &Path, pid: u32, out: &Value, what: &str) {
    let a = answer(out);
    assert_eq!(a["error"]["code"], -32001, "{what}: {out}");
    assert!(
        a.get("result").is_none(),
        "{what}: the gateway answered: {out}"
    );
    let recs = recorded(state, pid, 2);
    let req = recs
        .iter()
        .find(|r| r.name.as_deref().is_some_and(|n| n.starts_with("deploy")))
        .unwrap_or_else(|| panic!("{what}: no record of the call: {recs:#?}"));
    let d = req.decision.as_ref().unwrap();
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (DecisionAction::Deny, Some("no-deploys")),
        "{what}"
    );
}

fn assert_refused_unread(state: &Path, pid: u32, out: &Value, what: &str, why: &str) {
    assert!(
        out["status"].as_str().unwrap().contains("400"),
        "{what}: {out}"
    );
    let a = answer(out);
    assert_eq!(a["error"]["code"], -32600, "{what}: {out}");
    assert!(
        a.get("result").is_none(),
        "{what}: the gateway answered: {out}"
    );
    let recs = recorded(state, pid, 1);
    let e = recs
        .iter()
        .find(|r| r.malformed.is_some())
        .unwrap_or_else(|| panic!("{what}: {recs:#?}"));
    assert!(
        e.malformed.as_ref().unwrap().contains(why),
        "{what}: {:?}",
        e.malformed
    );
    let d = e.decision.as_ref().unwrap();
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (DecisionAction::Deny, Some("[gateway] unparsed")),
        "{what}"
    );
}

#[test]
fn every_known_bypass_is_refused_or_masked_and_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    let default = std::fs::read_to_string(tests_dir().join("../policies/default.toml")).unwrap();
    std::fs::write(&policy, format!("{default}\n{POLICY_RULES}")).unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("hostile");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    let denied = call(1, "deploy_prod", json!({})).to_string();
    let plain = request(port, "application/json", "", denied.as_bytes());

    // The first byte, a pause, then the rest: still HTTP, still denied.
    let (pid, out) = send(&cgroup, port, work.path(), &plain, &["--mode=slow-first"]);
    assert_denied_by_rule(&state, pid, &out, "slow first byte");
    // One byte per segment.
    let (pid, out) = send(&cgroup, port, work.path(), &plain, &["--mode=bytewise"]);
    assert_denied_by_rule(&state, pid, &out, "one-byte segments");

    // gzip (Python's own) and brotli bodies are decoded for the rules.
    let head_only = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{denied}"
    );
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        head_only.as_bytes(),
        &["--gzip-body"],
    );
    assert_denied_by_rule(&state, pid, &out, "gzip body");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let br = runtime
        .block_on(mcptrail::proxy::http::body::encode(
            denied.clone().into(),
            &[mcptrail::proxy::http::body::Encoding::Br],
        ))
        .unwrap();
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(port, "application/json", "Content-Encoding: br\r\n", &br),
        &[],
    );
    assert_denied_by_rule(&state, pid, &out, "brotli body");

    // A batch with a bad element and the denied call: the call is seen and refused.
    let batch = json!([
        call(2, "add", json!({})),
        17,
        call(3, "deploy_prod", json!({}))
    ])
    .to_string();
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(port, "application/json", "", batch.as_bytes()),
        &[],
    );
    let a = answer(&out);
    let answers = a.as_array().unwrap_or_else(|| panic!("{out}"));
    assert!(
        answers.iter().all(|x| x["error"]["code"] == -32001),
        "{out}"
    );
    let recs = recorded(&state, pid, 5);
    assert!(recs.iter().any(|r| {
        r.malformed
            .as_deref()
            .is_some_and(|m| m.contains("element 2"))
    }));

    // A body over the parse limit (16 MiB by default): refused unread.
    let big = call(4, "deploy_prod", json!({"blob": "x".repeat(17 << 20)})).to_string();
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(port, "application/json", "", big.as_bytes()),
        &[],
    );
    assert_refused_unread(&state, pid, &out, "oversized body", "parse limit");

    // A non-JSON content type with a body that is not JSON.
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(port, "text/plain", "", b"deploy_prod now"),
        &[],
    );
    assert_refused_unread(&state, pid, &out, "non-JSON body", "JSON");
    // A coding the proxy does not read.
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(
            port,
            "application/json",
            "Content-Encoding: compress\r\n",
            denied.as_bytes(),
        ),
        &[],
    );
    assert_refused_unread(&state, pid, &out, "unknown coding", "compress");

    // A protocol switch: past it the proxy reads nothing, so a strict policy refuses it.
    let upgrade = format!(
        "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (pid, out) = send(&cgroup, port, work.path(), upgrade.as_bytes(), &[]);
    assert_refused_unread(&state, pid, &out, "an Upgrade", "switch protocols");

    // Numbers and argv: an allowed call whose card number is a JSON number, from a process
    // with secrets in its command line. Both are masked in the trail.
    let pay = call(5, "pay", json!({"card": 4111111111111111u64, "qty": 2})).to_string();
    let (pid, out) = send(
        &cgroup,
        port,
        work.path(),
        &request(port, "application/json", "", pay.as_bytes()),
        &[
            "AKIAIOSFODNN7EXAMPLE",
            "4111111111111111",
            "bob@example.com",
        ],
    );
    assert!(
        answer(&out).get("result").is_some(),
        "the allowed call went through: {out}"
    );
    let recs = recorded(&state, pid, 2);
    for r in &recs {
        let cmdline = r.process.cmdline.as_ref().unwrap().join(" ");
        for secret in [
            "AKIAIOSFODNN7EXAMPLE",
            "4111111111111111",
            "bob@example.com",
        ] {
            assert!(!cmdline.contains(secret), "{secret} in {cmdline}");
        }
        assert!(r.process.cmdline_redacted);
    }
    let req = recs.iter().find(|r| r.method.is_some()).unwrap();
    assert_eq!(
        req.params.as_ref().unwrap()["arguments"]["card"],
        "[MASKED:payment_card]1111"
    );
    let resp = recs.iter().find(|r| r.result.is_some()).unwrap();
    assert!(
        !resp
            .result
            .as_ref()
            .unwrap()
            .to_string()
            .contains("4111111111111111")
    );

    // Opaque bytes to the gateway: refused, recorded with what they were.
    let (pid, out) = send(&cgroup, port, work.path(), b"\x00\x01not http at all", &[]);
    assert_eq!(out["body"], "", "{out}");
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the opaque connection",
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
    );
    let Event::Connection(c) = rec.event else {
        unreachable!()
    };
    assert_eq!(c.outcome.status, Status::Refused);
    assert_eq!(c.protocol.as_deref(), Some("opaque"));

    // Nothing in the whole trail holds the argv secrets or the number in clear.
    let all = tail(&state, &["--json", "-n", "100000"]);
    let text = String::from_utf8_lossy(&all.stdout);
    for secret in [
        "AKIAIOSFODNN7EXAMPLE",
        "bob@example.com",
        "4111111111111111",
    ] {
        assert!(!text.contains(secret), "{secret} is in the trail");
    }
    assert_verifies(&state);
}
