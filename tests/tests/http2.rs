//! HTTP/2 through the real redirect: the official MCP SDK's server app served by hypercorn
//! (h2 by ALPN over TLS, and h2c with prior knowledge in plaintext), the official Python SDK
//! client speaking HTTP/2 (httpx with `h2`), and curl. Every call goes through the same rules,
//! masking and records as over HTTP/1.1, and the records say which version and stream.

use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::McpEvent;
use mcptrail_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// The Python SDK's client over HTTP/2 (`mcp_client.py --http2`), trusting the host CA: its
/// pid and what it printed.
fn sdk_client_h2(
    cgroup: &TestCgroup,
    host_ca: &std::path::Path,
    url: &str,
) -> (u32, serde_json::Value) {
    let (pid, out) = output_with_pid(
        cgroup
            .command(mcp_python().to_str().unwrap())
            .env("SSL_CERT_FILE", host_ca)
            .arg(fixture("mcp_client.py"))
            .arg(url)
            .arg("--http2"),
    );
    assert!(
        out.status.success(),
        "the SDK client over HTTP/2 to {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn sdk_clients_over_h2_and_h2c_are_held_to_the_rules_and_recorded_per_stream() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(work.path());
    let (tls_port, plain_port) = (free_port(), free_port());
    // Gateways that speak only HTTP/1.1 (uvicorn), over TLS and in plaintext.
    let (tls_h1_port, plain_h1_port) = (free_port(), free_port());
    let _tls_h1_server = https_mcp_server(tls_h1_port, &pki);
    let _plain_h1_server = mcp_server(plain_h1_port, &[]);
    let _tls_server = mcp_server(
        tls_port,
        &[
            "--certfile",
            pki.cert.to_str().unwrap(),
            "--keyfile",
            pki.key.to_str().unwrap(),
            "--http2",
        ],
    );
    let _plain_server = mcp_server(plain_port, &["--http2"]);
    let default = std::fs::read_to_string(tests_dir().join("../policies/default.toml")).unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{default}\n[[access.rules]]\nname = \"no-deploys\"\naction = \"deny\"\nmatch = {{ tool = \"deploy*\" }}\n"
        ),
    )
    .unwrap();
    let cgroup = TestCgroup::new("http2");
    let state = work.path().join("state");
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[
            format!("127.0.0.1:{tls_port}"),
            format!("127.0.0.1:{plain_port}"),
            format!("127.0.0.1:{tls_h1_port}"),
            format!("127.0.0.1:{plain_h1_port}"),
        ],
        &[
            "--upstream-ca",
            pki.ca.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ],
        false,
    );
    let host_ca = export_host_ca(&state, work.path());

    // The SDK client over HTTPS, offering h2: the agent offers the gateway h2, the gateway
    // takes it, and the client gets h2 from the agent.
    for (url, alpn) in [
        (format!("https://localhost:{tls_port}/mcp"), Some("h2")),
        (format!("http://127.0.0.1:{plain_port}/mcp"), None),
    ] {
        let (pid, said) = sdk_client_h2(&cgroup, &host_ca, &url);
        assert_eq!(
            said["http_versions"],
            serde_json::json!(["HTTP/2"]),
            "{said}"
        );
        assert_eq!(said["add"][0], "42", "{said}");
        let recs: Vec<McpEvent> = wait_mcp_records(&state, pid, 8);
        assert!(
            recs.iter()
                .all(|r| r.http.version.as_deref() == Some("2") && r.http.stream.is_some()),
            "every record of {url} says HTTP/2 and its stream"
        );
        let add = recs
            .iter()
            .filter(|r| r.name.as_deref() == Some("add") || r.jsonrpc_id.is_some())
            .find(|r| r.name.as_deref() == Some("add"))
            .expect("the tool call is recorded");
        // Request and answer share an exchange and a stream.
        let answer = recs
            .iter()
            .find(|r| r.exchange == add.exchange && r.direction != add.direction)
            .expect("the answer is linked to its call");
        assert_eq!(answer.http.stream, add.http.stream);
        assert_eq!(
            add.connection.tls.as_ref().and_then(|t| t.alpn.as_deref()),
            alpn,
            "{url}"
        );
        assert!(
            recs.iter().any(|r| r.name.as_deref() == Some("echo")
                && r.params
                    .as_ref()
                    .is_some_and(|p| p.to_string().contains("[MASKED:payment_card]"))),
            "masking applies over HTTP/2"
        );
        // The connection's own record says it spoke h2c (plaintext) or TLS.
        let conn = wait_for_record(
            &state,
            WAIT,
            "of the HTTP/2 connection",
            |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
        );
        let Event::Connection(c) = conn.event else {
            unreachable!()
        };
        assert_eq!(
            c.protocol.as_deref(),
            Some(if alpn.is_some() { "tls" } else { "h2c" })
        );
    }

    // The official TypeScript SDK's client, fetching through undici with h2 allowed: h2 by
    // ALPN, its calls recorded as HTTP/2, the denied one refused.
    let (pid, out) = output_with_pid(
        cgroup
            .command("node")
            .env("NODE_PATH", ts_sdk_modules())
            .env("NODE_EXTRA_CA_CERTS", &host_ca)
            .arg(fixture("ts_client.cjs"))
            .arg(format!("https://localhost:{tls_port}/mcp"))
            .arg("--http2"),
    );
    assert!(
        out.status.success(),
        "the TypeScript client over h2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["alpn"], serde_json::json!(["h2"]), "{said}");
    assert_eq!(said["add"][0], "42", "{said}");
    assert!(
        said["denied"].as_str().unwrap().contains("no-deploys"),
        "{said}"
    );
    let recs = wait_mcp_records(&state, pid, 6);
    assert!(recs.iter().all(|r| r.http.version.as_deref() == Some("2")));

    // Gateways that speak only HTTP/1.1 behind HTTP/2 clients: over TLS the client is offered
    // only what the gateway chose (HTTP/1.1); in plaintext (h2c, prior knowledge) the client
    // is served in HTTP/2 and each stream goes to the gateway as an HTTP/1.1 request.
    for (url, client_version, upstream_version) in [
        (
            format!("https://localhost:{tls_h1_port}/mcp"),
            "HTTP/1.1",
            None,
        ),
        (
            format!("http://127.0.0.1:{plain_h1_port}/mcp"),
            "HTTP/2",
            Some("1.1"),
        ),
    ] {
        let (pid, said) = sdk_client_h2(&cgroup, &host_ca, &url);
        assert_eq!(
            said["http_versions"],
            serde_json::json!([client_version]),
            "{said}"
        );
        assert_eq!(said["add"][0], "42", "{said}");
        let recs = wait_mcp_records(&state, pid, 8);
        let add = recs
            .iter()
            .find(|r| r.name.as_deref() == Some("add"))
            .expect("the call is recorded");
        assert_eq!(
            add.http.upstream_version.as_deref(),
            upstream_version,
            "{url}"
        );
    }

    // curl with prior knowledge, in plaintext: a denied call refused in HTTP/2.
    let (_, out) = output_with_pid(
        cgroup
            .command("curl")
            .args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
            .args(["-w", "\n%{http_version}"])
            .args(["-H", "content-type: application/json"])
            .args(["-H", "accept: application/json, text/event-stream"])
            .args([
                "-d",
                r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"deploy","arguments":{}}}"#,
            ])
            .arg(format!("http://127.0.0.1:{plain_port}/mcp")),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("-32001") && said.trim_end().ends_with('2'),
        "{said}"
    );

    // A denied call from curl over h2 (ALPN): refused by the proxy, never forwarded.
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"deploy","arguments":{"env":"prod"}}}"#;
    let (pid, out) = output_with_pid(
        cgroup
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--http2",
                "-w",
                "\n%{http_version}",
            ])
            .args(["--cacert", host_ca.to_str().unwrap()])
            .args(["-H", "content-type: application/json"])
            .args(["-H", "accept: application/json, text/event-stream"])
            .args(["-d", body])
            .arg(format!("https://localhost:{tls_port}/mcp")),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("-32001") && said.contains("no-deploys") && said.trim_end().ends_with('2'),
        "{said}"
    );
    let denied = wait_for_record(
        &state,
        WAIT,
        "of the denied call",
        |r| matches!(&r.event, Event::Mcp(m) if m.process.pid == pid && m.decision.is_some()),
    );
    let Event::Mcp(m) = denied.event else {
        unreachable!()
    };
    assert_eq!(m.http.version.as_deref(), Some("2"));
    drop(agent);
    assert_verifies(&state);
}
