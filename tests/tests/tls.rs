//! HTTPS gateways through the real redirect: the official MCP SDK's server served over TLS
//! (uvicorn, with a certificate from a test CA), reached by host name; the agent terminates
//! TLS with its host CA, checks the gateway against the roots it was given, and the same
//! rules and records apply as over plain HTTP. Clients that do not trust the host CA, a
//! gateway the agent cannot verify, an SNI-less client and passthrough are covered too.

use std::path::{Path, PathBuf};

use std::process::Output;
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::{Connection, McpEvent, Status};
use mcptrail_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// An HTTPS MCP gateway (the official SDK's server behind a test CA's certificate), and the
/// folder the test works in.
struct Gateway {
    work: tempfile::TempDir,
    pki: TestPki,
    port: u16,
    _server: Reaped,
}

impl Gateway {
    fn start() -> Gateway {
        require_root();
        let work = tempfile::tempdir().unwrap();
        let pki = TestPki::new(work.path());
        let port = free_port();
        let _server = https_mcp_server(port, &pki);
        Gateway {
            work,
            pki,
            port,
            _server,
        }
    }
}

fn curl(cgroup: &TestCgroup, args: &[&str]) -> (u32, Output) {
    output_with_pid(
        cgroup
            .command("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args),
    )
}

fn deny_policy(work: &Path, extra: &str) -> PathBuf {
    let default = std::fs::read_to_string(tests_dir().join("../policies/default.toml")).unwrap();
    let path = work.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            "{default}\n[[access.rules]]\nname = \"no-deploys\"\naction = \"deny\"\nmatch = {{ tool = \"deploy*\" }}\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn tls_of(c: &Connection) -> &mcptrail::audit::record::Tls {
    c.tls.as_ref().expect("the record says how TLS was handled")
}

#[test]
fn https_gateways_are_terminated_checked_and_held_to_the_rules() {
    let Gateway {
        work,
        pki,
        port,
        _server,
    } = Gateway::start();
    let cgroup = TestCgroup::new("tls-terminate");
    let state = work.path().join("state");
    let policy = deny_policy(work.path(), "");
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &[
            "--upstream-ca",
            pki.ca.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ],
        false,
    );
    let host_ca = export_host_ca(&state, work.path());

    // The official SDK's client, trusting the host CA the way httpx reads it.
    let (pid, out) = output_with_pid(
        cgroup
            .command(mcp_python().to_str().unwrap())
            .env("SSL_CERT_FILE", &host_ca)
            .arg(fixture("mcp_client.py"))
            .arg(format!("https://localhost:{port}/mcp")),
    );
    assert!(
        out.status.success(),
        "the SDK client over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<McpEvent> = wait_mcp_records(&state, pid, 4);
    let call = recs
        .iter()
        .find(|r| r.name.as_deref() == Some("add"))
        .expect("the tool call is recorded in clear");
    let tls = tls_of(&call.connection);
    assert_eq!(
        (tls.mode.as_str(), tls.sni.as_deref()),
        ("terminate", Some("localhost"))
    );
    let up = tls.upstream.as_ref().unwrap();
    assert!(
        up.verified && up.issuer.contains("mcptrail test gateway CA"),
        "{up:?}"
    );
    assert!(
        recs.iter().any(|r| r.name.as_deref() == Some("echo")
            && r.params
                .as_ref()
                .is_some_and(|p| p.to_string().contains("[MASKED:payment_card]"))),
        "masking applies inside TLS"
    );

    // The official TypeScript SDK's client (Node's fetch), trusting the host CA through
    // NODE_EXTRA_CA_CERTS: its calls go through, and the denied one is refused.
    let (pid, out) = output_with_pid(
        cgroup
            .command("node")
            .env("NODE_PATH", ts_sdk_modules())
            .env("NODE_EXTRA_CA_CERTS", &host_ca)
            .arg(fixture("ts_client.cjs"))
            .arg(format!("https://localhost:{port}/mcp")),
    );
    assert!(
        out.status.success(),
        "the TypeScript client over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["add"][0], "42", "{said}");
    assert!(
        said["denied"].as_str().unwrap().contains("no-deploys"),
        "{said}"
    );
    let recs = wait_mcp_records(&state, pid, 6);
    let deploy = recs
        .iter()
        .find(|r| r.name.as_deref() == Some("deploy") && r.decision.is_some())
        .expect("the denied call is recorded");
    assert_eq!(tls_of(&deploy.connection).mode, "terminate");

    // A denied call, from curl trusting the host CA: refused by the proxy, never forwarded.
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"deploy","arguments":{"env":"prod"}}}"#;
    let (_, out) = curl(
        &cgroup,
        &[
            "--cacert",
            host_ca.to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json, text/event-stream",
            "-d",
            body,
            &format!("https://localhost:{port}/mcp"),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("-32001") && said.contains("no-deploys"),
        "{said}"
    );

    // No SNI (an address): the leaf names the address.
    let (_, out) = curl(
        &cgroup,
        &[
            "--cacert",
            host_ca.to_str().unwrap(),
            &format!("https://127.0.0.1:{port}/mcp"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client that trusts only the gateway's own CA (not the host CA): its handshake fails,
    // the trail says so with its executable, and status names it.
    let (pid, out) = curl(
        &cgroup,
        &[
            "--cacert",
            pki.ca.to_str().unwrap(),
            &format!("https://localhost:{port}/mcp"),
        ],
    );
    assert!(
        !out.status.success(),
        "curl must not trust the proxy's leaf"
    );
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the failed client handshake",
        |r| matches!(&r.event, Event::TlsFailure(f) if f.process.pid == pid),
    );
    let Event::TlsFailure(f) = rec.event else {
        unreachable!()
    };
    assert_eq!(f.side, "client");
    assert!(
        f.process
            .exe
            .as_deref()
            .is_some_and(|e| e.ends_with("curl"))
    );
    let status = agent.status();
    let failures = status["tls_client_failures"].as_object().unwrap();
    assert!(failures.keys().any(|k| k.ends_with("curl")), "{status:#}");
    drop(agent);
    assert_verifies(&state);
}

#[test]
fn an_unverifiable_gateway_is_refused_and_passthrough_relays_untouched() {
    let Gateway {
        work,
        pki,
        port,
        _server,
    } = Gateway::start();

    // Without the gateway's CA the agent cannot verify it: the client is refused, never
    // relayed unverified.
    let cgroup = TestCgroup::new("tls-untrusted");
    let state = work.path().join("state");
    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let host_ca = export_host_ca(&state, work.path());
    let (pid, out) = curl(
        &cgroup,
        &[
            "--cacert",
            host_ca.to_str().unwrap(),
            &format!("https://localhost:{port}/mcp"),
        ],
    );
    assert!(!out.status.success());
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the refused gateway",
        |r| matches!(&r.event, Event::TlsFailure(f) if f.process.pid == pid),
    );
    let Event::TlsFailure(f) = rec.event else {
        unreachable!()
    };
    assert_eq!(f.side, "upstream");
    assert!(f.reason.contains("UnknownIssuer"), "{}", f.reason);
    drop(agent);

    // Passthrough: the client talks to the gateway itself; the record says what the hellos
    // chose.
    let cgroup = TestCgroup::new("tls-passthrough");
    let state = work.path().join("state-pass");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--tls-mode", "passthrough"],
        false,
    );
    let (pid, out) = curl(
        &cgroup,
        &[
            "--cacert",
            pki.ca.to_str().unwrap(),
            &format!("https://localhost:{port}/mcp"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = wait_for_record(
        &state,
        WAIT,
        "of the passed-through connection",
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
    );
    let Event::Connection(c) = rec.event else {
        unreachable!()
    };
    assert_eq!(c.outcome.status, Status::Closed, "{:?}", c.outcome.detail);
    let tls = tls_of(&c.connection);
    assert_eq!(tls.mode, "passthrough");
    assert_eq!(tls.sni.as_deref(), Some("localhost"));
    assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
    assert!(tls.cipher.as_deref().is_some_and(|c| c.starts_with("TLS")));
}

#[test]
fn ca_install_makes_the_system_store_trust_terminated_gateways() {
    let Gateway {
        work,
        pki,
        port,
        _server,
    } = Gateway::start();
    let cgroup = TestCgroup::new("tls-ca-install");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--upstream-ca", pki.ca.to_str().unwrap()],
        false,
    );
    // Whatever happens below, the host's store is left as it was.
    struct Uninstall(PathBuf);
    impl Drop for Uninstall {
        fn drop(&mut self) {
            let _ = mcptrail(&self.0, &["ca", "uninstall"]);
        }
    }
    let _undo = Uninstall(state.clone());
    let url = format!("https://localhost:{port}/mcp");
    // curl with the system store only: before the install it does not trust the proxy.
    let system = ["--cacert", "/etc/ssl/certs/ca-certificates.crt"];
    let (_, before) = curl(&cgroup, &[&system[..], &[url.as_str()]].concat());
    assert!(!before.status.success(), "trusted before the install?");
    let out = mcptrail(&state, &["ca", "install"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("NODE_EXTRA_CA_CERTS") && said.contains("SSL_CERT_FILE"),
        "{said}"
    );
    let (_, after) = curl(&cgroup, &[&system[..], &[url.as_str()]].concat());
    assert!(
        after.status.success(),
        "not trusted after the install: {}",
        String::from_utf8_lossy(&after.stderr)
    );
    let out = mcptrail(&state, &["ca", "uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, gone) = curl(&cgroup, &[&system[..], &[url.as_str()]].concat());
    assert!(!gone.status.success(), "still trusted after the uninstall");
}
