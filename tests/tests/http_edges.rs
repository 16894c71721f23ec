//! The proxy's edges, as root through the real redirect: malformed JSON, a gateway that
//! hangs up mid-call, plain HTTP that is not MCP, and bytes that are not HTTP at all.
use std::process::{Command, Stdio};
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::Status;
use mcptrail_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn odd_server(port: u16, mode: &str) -> Reaped {
    let child = Command::new("python3")
        .arg(fixture("odd_server.py"))
        .arg(port.to_string())
        .arg(mode)
        .spawn()
        .unwrap();
    let server = Reaped(child);
    wait_listening(&format!("127.0.0.1:{port}"), WAIT);
    server
}

fn curl(cgroup: &TestCgroup, args: &[&str]) -> (u32, String) {
    let (pid, out) = output_with_pid(
        cgroup
            .command("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args),
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn malformed_json_is_relayed_unchanged_and_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("malformed");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let (pid, out) = curl(
        &cgroup,
        &[
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json, text/event-stream",
            "-d",
            "{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ",
            &url,
        ],
    );
    // The gateway's own answer reaches the client: the proxy did not swallow the request.
    let status = out.lines().last().unwrap();
    assert!(status.starts_with('4'), "status {status}: {out}");
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the malformed request",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.malformed.is_some()),
    );
    let Event::Mcp(e) = rec.event else {
        unreachable!()
    };
    assert!(e.malformed.unwrap().contains("not valid UTF-8 JSON"));
}

#[test]
fn a_gateway_that_hangs_up_gets_the_client_a_502_with_a_json_rpc_error() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = odd_server(port, "hangup");
    let cgroup = TestCgroup::new("hangup");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let (pid, out) = curl(
        &cgroup,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"jsonrpc":"2.0","id":"call-7","method":"tools/call","params":{"name":"add"}}"#,
            &format!("http://127.0.0.1:{port}/mcp"),
        ],
    );
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "502", "{out}");
    let err: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(err["id"], "call-7");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gateway")
    );

    let outcome = wait_for_record(
        &state,
        WAIT,
        "of the failed call",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.error.is_some()),
    );
    let Event::Mcp(o) = outcome.event else {
        unreachable!()
    };
    let request = records(&state)
        .into_iter()
        .find_map(|r| match r.event {
            Event::Mcp(e) if e.method.as_deref() == Some("tools/call") => Some(*e),
            _ => None,
        })
        .expect("the request was recorded before it was forwarded");
    assert_eq!(request.exchange, o.exchange);
    assert_eq!(request.name.as_deref(), Some("add"));
}

#[test]
fn plain_http_and_non_http_bytes_are_recorded_for_what_they_are() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("a.txt"), "plain").unwrap();
    let (web, echo) = (free_port(), free_port());
    let _web = http_server(site.path(), web);
    let _echo = odd_server(echo, "echo");
    let cgroup = TestCgroup::new("plain");
    let state = work.path().join("state");
    let _agent = Agent::start(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{web}"), format!("127.0.0.1:{echo}")],
    );

    let (pid, out) = curl(&cgroup, &[&format!("http://127.0.0.1:{web}/a.txt")]);
    assert_eq!(out, "plain\n200");
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the plain GET",
        |r| matches!(&r.event, Event::Http(e) if e.process.pid == pid),
    );
    let Event::Http(h) = rec.event else {
        unreachable!()
    };
    assert_eq!(
        (h.http.method.as_str(), h.http.path.as_str()),
        ("GET", "/a.txt")
    );
    assert_eq!(h.http.status, Some(200));
    assert_eq!(h.bytes.resp, 5);

    // Not HTTP: relayed byte for byte, recorded as a connection only.
    let probe = "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); s.sendall(b'\\x00hello, not http'); print(s.recv(100)); s.close()";
    let child = cgroup
        .command("python3")
        .args(["-c", probe, &echo.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let raw_pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "b'\\x00hello, not http'"
    );
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the raw connection",
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == raw_pid),
    );
    let Event::Connection(c) = rec.event else {
        unreachable!()
    };
    assert_eq!(c.outcome.status, Status::Closed);
    assert_eq!((c.bytes.req, c.bytes.resp), (16, 16));
    assert!(!records(&state).iter().any(|r| matches!(&r.event,
        Event::Http(e) if e.process.pid == raw_pid)));
}

#[test]
fn mirror_headers_that_disagree_with_the_body_are_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("mismatch");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let (pid, _) = curl(
        &cgroup,
        &[
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json, text/event-stream",
            "-H",
            "mcp-protocol-version: 2026-07-28",
            "-H",
            "mcp-method: tools/call",
            "-H",
            "mcp-name: echo",
            "-d",
            r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#,
            &format!("http://127.0.0.1:{port}/mcp"),
        ],
    );
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the mismatched call",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.method.is_some()),
    );
    let Event::Mcp(e) = rec.event else {
        unreachable!()
    };
    assert_eq!(e.name.as_deref(), Some("add"));
    let why = e.header_mismatch.expect("the mismatch is recorded");
    assert!(
        why.contains("Mcp-Name is \"echo\" but the body names \"add\""),
        "{why}"
    );
}

/// Sends `head`, expects a status line starting with `expect`, then checks that raw bytes
/// written afterwards come back from the echoing gateway.
const SWITCH_PROBE: &str = "
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)
s.sendall(sys.argv[2].encode().decode('unicode_escape').encode())
data = b''
while b'\\r\\n\\r\\n' not in data:
    data += s.recv(4096)
head, rest = data.split(b'\\r\\n\\r\\n', 1)
print(head.split(b'\\r\\n')[0].decode())
s.sendall(b'raw bytes after the switch')
while len(rest) < 26:
    rest += s.recv(4096)
print(rest.decode())
";

#[test]
fn upgrades_and_connect_tunnels_are_relayed_after_the_switch() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = odd_server(port, "switch");
    let cgroup = TestCgroup::new("switch");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    for (head, status) in [
        (
            "GET /chat HTTP/1.1\\r\\nHost: gw\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n",
            "HTTP/1.1 101 Switching Protocols",
        ),
        (
            "CONNECT inner:443 HTTP/1.1\\r\\nHost: inner:443\\r\\n\\r\\n",
            "HTTP/1.1 200 Connection established",
        ),
    ] {
        let out = cgroup
            .command("python3")
            .args(["-c", SWITCH_PROBE, &port.to_string(), head])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = said.lines();
        assert_eq!(lines.next(), Some(status), "{said}");
        assert_eq!(lines.next(), Some("raw bytes after the switch"), "{said}");
    }
    // Both went through the proxy, not around it.
    let through = || {
        records(&state)
            .iter()
            .filter(|r| matches!(&r.event, Event::Connection(_)))
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while through() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            records(&state)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn big_bodies_pass_whole_and_are_recorded_cut_with_a_marker() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("bigbody");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--capture-limit", "65536"],
        false,
    );
    let big = "x".repeat(1024 * 1024);
    let body = work.path().join("body.json");
    std::fs::write(
        &body,
        format!(
            r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{big}"}}}}}}"#
        ),
    )
    .unwrap();
    let (pid, out) = curl(
        &cgroup,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", body.display()),
            &format!("http://127.0.0.1:{port}/mcp"),
        ],
    );
    let (answer, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "200");
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
    assert_eq!(
        answer["result"]["echo"]["arguments"]["text"]
            .as_str()
            .unwrap()
            .len(),
        big.len(),
        "forwarding is not bounded by capture"
    );

    let request = wait_for_record(
        &state,
        WAIT,
        "of the big call",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.method.is_some()),
    );
    let Event::Mcp(request) = request.event else {
        unreachable!()
    };
    assert_eq!(
        request.name.as_deref(),
        Some("echo"),
        "method and name survive the cut"
    );
    let params = request.params.unwrap();
    assert_eq!(params["mcptrail_truncated"], true, "{params}");
    assert!(params["bytes"].as_u64().unwrap() > 1024 * 1024);
    assert!(params["head"].as_str().unwrap().len() <= 65536);
    let outcome = wait_for_record(
        &state,
        WAIT,
        "of the big answer",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.result.is_some()),
    );
    let Event::Mcp(outcome) = outcome.event else {
        unreachable!()
    };
    assert_eq!(outcome.exchange, request.exchange);
    assert_eq!(outcome.result.unwrap()["mcptrail_truncated"], true);
}

/// Two calls on one keep-alive connection from a real client, through the redirect, with a
/// pause longer than `--upstream-idle` between them: the agent closes its gateway connection
/// in the pause, the second call opens another, and both exchanges are in the trail.
#[test]
fn an_idle_keep_alive_client_loses_its_gateway_connection_and_its_next_call_goes_through() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("upstream-idle");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--upstream-idle", "1"],
        false,
    );
    // One connection (http.client keeps it alive), two initialize requests, a pause between
    // them until the test says go (a line on stdin).
    let script = format!(
        r#"
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", {port})
def call(i):
    body = json.dumps({{"jsonrpc": "2.0", "id": i, "method": "initialize", "params": {{
        "protocolVersion": "2025-06-18", "capabilities": {{}},
        "clientInfo": {{"name": "idle-test", "version": "1"}}}}}})
    c.request("POST", "/mcp", body, {{"content-type": "application/json",
        "accept": "application/json, text/event-stream"}})
    r = c.getresponse()
    r.read()
    print("call", i, r.status, flush=True)
call(1)
sys.stdin.readline()
call(2)
"#
    );
    let mut client = cgroup
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = client.id();
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "call 1 200");
    // The agent's socket to the gateway (the client's own was redirected to the agent).
    let to_gateway = || {
        let out = Command::new("ss")
            .args(["-Htn", "state", "established"])
            .arg(format!("( dport = :{port} )"))
            .output()
            .expect("ss (iproute2)");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(to_gateway(), 1, "the call's gateway connection, kept alive");
    // Closed by the agent within 1¼ s; uvicorn itself would close it only after 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while to_gateway() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(to_gateway(), 0, "the idle gateway connection was closed");
    std::io::Write::write_all(client.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "call 2 200", "the next call went through");
    assert!(client.wait().unwrap().success());
    let recs = wait_mcp_records(&state, pid, 4);
    let answered: Vec<_> = recs
        .iter()
        .filter(|e| e.direction == mcptrail::audit::record::Direction::ServerToClient)
        .collect();
    assert_eq!(answered.len(), 2, "both answers recorded: {recs:#?}");
    // One client connection throughout.
    assert!(
        recs.iter()
            .all(|e| e.connection.client == recs[0].connection.client)
    );
}

/// A request head past the 32 KiB a client connection may buffer, through the redirect: 431,
/// nothing forwarded, and the connection's record says why.
#[test]
fn an_oversized_request_head_gets_431_and_a_record_that_says_why() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("big-head");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let pad = format!("x-pad: {}", "a".repeat(40 * 1024));
    let url = format!("http://127.0.0.1:{port}/mcp");
    let (pid, out) = curl(
        &cgroup,
        &[
            "-H",
            &pad,
            "-H",
            "content-type: application/json",
            "-d",
            "{}",
            &url,
        ],
    );
    assert_eq!(out.lines().last(), Some("431"), "{out}");
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the connection",
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
    );
    let Event::Connection(c) = rec.event else {
        unreachable!()
    };
    let detail = c.outcome.detail.unwrap_or_default();
    assert!(detail.contains("too large"), "{detail}");
    assert!(
        mcp_records(&state, pid).is_empty(),
        "nothing of it was forwarded or recorded as a request"
    );
}
