//! MCP through the proxy, end to end and as root, with the official Python SDK on both ends:
//! its server (Streamable HTTP, with SSE and with JSON responses) and its client, in a child
//! cgroup. Every JSON-RPC exchange must be in the trail, request and outcome linked.

use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::{Direction, McpEvent};
use mcptrail::mcp::Kind;
use mcptrail_tests::*;

fn run_client(cgroup: &TestCgroup, port: u16, case: &Case) -> (u32, serde_json::Value) {
    let path = if case.sse_transport { "sse" } else { "mcp" };
    let mut cmd = cgroup.command(mcp_python().to_str().unwrap());
    cmd.arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/{path}"))
        .arg(case.client_mode);
    if case.sse_transport {
        cmd.arg("--sse");
    }
    if case.sampling {
        cmd.arg("--sampling");
    }
    if case.modern {
        cmd.arg("--modern");
    }
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "the MCP client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, serde_json::from_slice(&out.stdout).unwrap())
}

fn outcome_of<'a>(records: &'a [McpEvent], request: &McpEvent) -> &'a McpEvent {
    records
        .iter()
        .find(|r| {
            r.direction == Direction::ServerToClient
                && r.exchange == request.exchange
                && matches!(r.message, Some(Kind::Response | Kind::Error))
        })
        .unwrap_or_else(|| panic!("no outcome for {request:#?}\nrecords: {records:#?}"))
}

/// How the SDK's client and server talk in one test.
struct Case<'a> {
    label: &'a str,
    server_args: &'a [&'a str],
    client_mode: &'a str,
    /// The first request: `server/discover` (2026-07-28) or `initialize` (handshake era).
    opening: &'a str,
    protocol_version: Option<&'a str>,
    response_type: &'a str,
    session: bool,
    /// The legacy HTTP+SSE transport (GET /sse, POST /messages/).
    sse_transport: bool,
    /// Also call a tool whose server asks the client's model (sampling).
    sampling: bool,
    /// 2026-07-28 only: an `input_required` round and a `subscriptions/listen` stream.
    modern: bool,
}

fn exercise(case: Case) {
    let Case {
        label,
        server_args: extra,
        opening,
        protocol_version,
        response_type,
        session,
        sse_transport,
        sampling,
        modern,
        ..
    } = case;
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, extra);
    let cgroup = TestCgroup::new(label);
    let state = work.path().join("state");
    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);

    let (pid, out) = run_client(&cgroup, port, &case);
    assert_eq!(
        out["tools"],
        serde_json::json!(["add", "deploy", "echo", "summarize", "touch_tools"])
    );
    assert_eq!(out["add"], serde_json::json!(["42"]));

    // The outcome of the last call is recorded shortly after the client has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let all = loop {
        let all = mcp_records(&state, pid);
        let last = if sampling {
            "tools/call"
        } else {
            "prompts/get"
        };
        let done = all
            .iter()
            .filter(|r| r.method.as_deref() == Some(last))
            .filter(|r| !sampling || r.name.as_deref() == Some("summarize"))
            .any(|req| {
                all.iter()
                    .any(|o| o.exchange == req.exchange && o.direction == Direction::ServerToClient)
            });
        // The listen stream's end is recorded when the client closes it.
        let listen_closed = !modern || all.iter().any(|r| r.client_closed);
        if done && listen_closed || std::time::Instant::now() > deadline {
            break all;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let find = |method: &str| {
        all.iter()
            .find(|r| {
                r.direction == Direction::ClientToServer && r.method.as_deref() == Some(method)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {method} request in {all:#?}\nagent log:\n{}",
                    agent.log()
                )
            })
    };

    let open = find(opening);
    assert_eq!(open.message, Some(Kind::Request));
    let open_out = outcome_of(&all, open);
    assert_eq!(open_out.message, Some(Kind::Response));
    assert!(open_out.first_byte_us.is_some());
    assert!(
        open_out
            .result
            .as_ref()
            .unwrap()
            .to_string()
            .contains("mcptrail-test-server"),
        "{open_out:#?}"
    );
    if opening == "initialize" {
        let initialized = find("notifications/initialized");
        assert_eq!(initialized.message, Some(Kind::Notification));
    }

    let calls: Vec<&McpEvent> = all
        .iter()
        .filter(|r| r.method.as_deref() == Some("tools/call"))
        .collect();
    assert_eq!(
        calls.len(),
        2 + usize::from(sampling) + if modern { 3 } else { 0 },
        "{all:#?}"
    );
    let add = calls
        .iter()
        .find(|c| c.name.as_deref() == Some("add"))
        .unwrap();
    assert_eq!(
        add.params.as_ref().unwrap()["arguments"],
        serde_json::json!({"a": 2, "b": 40})
    );
    let add_out = outcome_of(&all, add);
    assert_eq!(add_out.jsonrpc_id, add.jsonrpc_id);
    assert_eq!(add_out.result.as_ref().unwrap()["content"][0]["text"], "42");

    // The default policy masks the card number in what is recorded, both ways; the client
    // still got its own text back (masking is not on the wire by default).
    let echo = calls
        .iter()
        .find(|c| c.name.as_deref() == Some("echo"))
        .unwrap();
    assert_eq!(
        echo.params.as_ref().unwrap()["arguments"]["text"],
        "card [MASKED:payment_card]1111"
    );
    assert_eq!(echo.masked, ["payment_card"]);
    let echo_out = outcome_of(&all, echo);
    assert!(
        echo_out
            .result
            .as_ref()
            .unwrap()
            .to_string()
            .contains("card [MASKED:payment_card]1111"),
        "{echo_out:#?}"
    );
    assert!(
        !echo_out
            .result
            .as_ref()
            .unwrap()
            .to_string()
            .contains("4111 1111")
    );
    assert_eq!(out["echo"], serde_json::json!(["card 4111 1111 1111 1111"]));

    let read = find("resources/read");
    assert_eq!(read.uri.as_deref(), Some("config://build"));
    assert!(outcome_of(&all, read).result.is_some());
    let prompt = find("prompts/get");
    assert_eq!(prompt.name.as_deref(), Some("review"));

    if sampling {
        // The server asks the client's model in the middle of the call; the client's answer
        // comes back in a POST of its own and is linked to the server's request.
        let ask = all
            .iter()
            .find(|r| {
                r.direction == Direction::ServerToClient
                    && r.method.as_deref() == Some("sampling/createMessage")
            })
            .unwrap_or_else(|| panic!("no sampling request in {all:#?}"));
        assert_eq!(ask.message, Some(Kind::Request));
        let answer = all
            .iter()
            .find(|r| r.direction == Direction::ClientToServer && r.exchange == ask.exchange)
            .unwrap_or_else(|| panic!("the client's answer is not linked: {all:#?}"));
        assert_eq!(answer.message, Some(Kind::Response));
        assert_eq!(
            answer.result.as_ref().unwrap()["model"],
            "canned-test-model"
        );
        assert_eq!(out["progress"], serde_json::json!([0.5]));
        let progress = all
            .iter()
            .find(|r| r.method.as_deref() == Some("notifications/progress"))
            .unwrap_or_else(|| panic!("no progress notification in {all:#?}"));
        assert_eq!(progress.direction, Direction::ServerToClient);
        assert_eq!(progress.message, Some(Kind::Notification));
        let summarize = calls
            .iter()
            .find(|c| c.name.as_deref() == Some("summarize"))
            .unwrap();
        assert_eq!(
            progress.exchange, summarize.exchange,
            "progress is linked to the call it reports on"
        );
        let done = outcome_of(&all, summarize);
        assert_eq!(
            done.result.as_ref().unwrap()["content"][0]["text"],
            "a short summary"
        );
    }
    if modern {
        // `_meta` says who the client is, on every request.
        let info = add
            .client_info
            .as_ref()
            .unwrap_or_else(|| panic!("{add:#?}"));
        assert!(info["name"].is_string(), "{info}");
        // An `input_required` round: the retry is linked to the first request.
        let deploys: Vec<&&McpEvent> = calls
            .iter()
            .filter(|c| c.name.as_deref() == Some("deploy"))
            .collect();
        assert_eq!(deploys.len(), 2, "{all:#?}");
        let first_out = outcome_of(&all, deploys[0]);
        assert_eq!(
            first_out.result.as_ref().unwrap()["resultType"],
            "input_required"
        );
        assert_eq!(deploys[0].logical_call, None);
        assert_eq!(
            deploys[1].logical_call.as_deref(),
            Some(deploys[0].exchange.as_str()),
            "{:#?}",
            deploys[1]
        );
        assert_eq!(deploys[1].round, Some(1));
        assert_eq!(
            outcome_of(&all, deploys[1]).result.as_ref().unwrap()["content"][0]["text"],
            "deployed to staging"
        );
        assert_eq!(out["deploy"], serde_json::json!(["deployed to staging"]));
        // A listen stream: its frames belong to the listen request, and the client closing
        // the stream is its end.
        let listen = find("subscriptions/listen");
        let changed = all
            .iter()
            .find(|r| r.method.as_deref() == Some("notifications/tools/list_changed"))
            .unwrap_or_else(|| panic!("no list_changed event in {all:#?}"));
        assert_eq!(changed.exchange, listen.exchange);
        assert_eq!(out["listen_event"], "ToolsListChanged");
        let end = all
            .iter()
            .find(|r| r.exchange == listen.exchange && r.client_closed)
            .unwrap_or_else(|| {
                let mine: Vec<_> = all
                    .iter()
                    .filter(|r| r.exchange == listen.exchange)
                    .map(|r| {
                        (
                            r.direction,
                            r.message,
                            r.method.clone(),
                            r.error.clone(),
                            r.http.status,
                            r.http.content_type.clone(),
                        )
                    })
                    .collect();
                panic!("no client-closed end for the listen stream: {mine:#?}")
            });
        assert_eq!(end.message, Some(Kind::Error));
    }
    let add_http = &add_out.http;
    assert!(
        add_http
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with(response_type)),
        "{add_http:?}"
    );
    assert_eq!(add_http.status, Some(200));
    assert_eq!(add.http.protocol_version.as_deref(), protocol_version);
    assert_eq!(add.http.session_id.is_some(), session, "{add:#?}");
    if opening == "server/discover" {
        // 2026-07-28 mirrors the method and name in headers; they agree with the body.
        assert_eq!(add.http.mcp_method.as_deref(), Some("tools/call"));
        assert_eq!(add.http.mcp_name.as_deref(), Some("add"));
    }
    assert!(all.iter().all(|r| r.header_mismatch.is_none()), "{all:#?}");
    if sse_transport {
        // Posted to the session's message endpoint, answered on the GET stream.
        assert!(
            add.http.path.starts_with("/messages/?session_id="),
            "{add:#?}"
        );
        assert_eq!(
            (add_out.http.method.as_str(), add_out.http.path.as_str()),
            ("GET", "/sse")
        );
    }
    for r in &all {
        assert!(r.process.comm.starts_with("python"), "{}", r.process.comm);
        if !sse_transport {
            // POSTs, and the GET stream a handshake-era client opens for the server's messages.
            assert!(["POST", "GET"].contains(&r.http.method.as_str()), "{r:#?}");
            assert_eq!(r.http.path, "/mcp");
        }
        assert!(r.malformed.is_none(), "{r:#?}");
        assert_eq!(r.connection.original_dst, format!("127.0.0.1:{port}"));
    }
    // The connection itself is recorded too, when it closes.
    let connections = records(&state)
        .into_iter()
        .filter(|r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid))
        .count();
    assert!(connections >= 1);
}

#[test]
fn protocol_2026_07_28_stateless_discover() {
    exercise(Case {
        label: "mcp-modern",
        server_args: &[],
        client_mode: "auto",
        opening: "server/discover",
        protocol_version: Some("2026-07-28"),
        response_type: "application/json",
        session: false,
        sse_transport: false,
        sampling: false,
        modern: true,
    });
}

#[test]
fn handshake_era_with_sessions_sse_responses_and_a_server_request() {
    exercise(Case {
        label: "mcp-sse",
        server_args: &[],
        client_mode: "legacy",
        opening: "initialize",
        protocol_version: Some("2025-11-25"),
        response_type: "text/event-stream",
        session: true,
        sse_transport: false,
        sampling: true,
        modern: false,
    });
}

#[test]
fn handshake_era_with_json_responses() {
    exercise(Case {
        label: "mcp-json",
        server_args: &["--json-response"],
        client_mode: "legacy",
        opening: "initialize",
        protocol_version: Some("2025-11-25"),
        response_type: "application/json",
        session: true,
        sse_transport: false,
        sampling: false,
        modern: false,
    });
}

#[test]
fn legacy_http_and_sse_transport_with_a_server_request() {
    exercise(Case {
        label: "mcp-legacy-sse",
        server_args: &["--transport", "sse"],
        client_mode: "legacy",
        opening: "initialize",
        protocol_version: None,
        response_type: "text/event-stream",
        session: false,
        sse_transport: true,
        sampling: true,
        modern: false,
    });
}
