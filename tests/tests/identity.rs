//! Who called: process identity (exe, parents, cgroup → container, CI job from allow-listed
//! environment), and service tokens verified against a JWKS served over HTTP, with key
//! rotation and every failure reason, end to end through the agent with real processes in
//! their own cgroups. And the raw token never reaches the store, the exports or the logs.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use mcptrail::audit::Event;
use mcptrail::audit::record::{Process, Token, TokenFailure};
use mcptrail_tests::tokens::{jwk, now, sign};
use mcptrail_tests::*;
use nix::sys::signal::Signal;
use serde_json::json;

const ISS: &str = "https://id.test";
const CONTAINER_ID: &str = "4c1b2a3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// An issuer's JWKS endpoint: serves whatever set the test puts in, counting fetches.
struct JwksServer {
    port: u16,
    set: Arc<Mutex<serde_json::Value>>,
    fetches: Arc<Mutex<u32>>,
}

impl JwksServer {
    fn start(keys: Vec<serde_json::Value>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let set = Arc::new(Mutex::new(json!({ "keys": keys })));
        let fetches = Arc::new(Mutex::new(0));
        let (s, f) = (set.clone(), fetches.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                *f.lock().unwrap() += 1;
                let body = s.lock().unwrap().to_string();
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer { port, set, fetches }
    }

    fn serve(&self, keys: Vec<serde_json::Value>) {
        *self.set.lock().unwrap() = json!({ "keys": keys });
    }
}

fn policy(dir: &Path, jwks_port: u16) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"version = 1
name = "identity-test"

[identity]
parent_depth = 3
ci_env_extra = ["BATCH_JOB_ID"]
token_headers = ["authorization", "x-service-token"]

[[identity.issuers]]
issuer = "{ISS}"
audiences = ["mcp-gateway"]
jwks_url = "http://127.0.0.1:{jwks_port}/.well-known/jwks.json"
min_refresh_secs = 0
"#
        ),
    )
    .unwrap();
    path
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"iss": ISS, "sub": sub, "aud": ["mcp-gateway"], "exp": now() + 900, "iat": now(),
           "jti": format!("jti-{sub}"), "client_id": "ci-runner", "groups": ["ci", "deployers"]})
}

/// One POST from a new process; the token record of its request.
fn post(cgroup: &TestCgroup, state: &Path, port: u16, headers: &[String]) -> (u32, Token) {
    let mut cmd = cgroup.command("python3");
    cmd.arg(fixture("post_jsonrpc.py"))
        .arg("127.0.0.1")
        .arg(port.to_string());
    for h in headers {
        cmd.arg(format!("--header={h}"));
    }
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = wait_for_record(
        state,
        Duration::from_secs(10),
        "of the POST",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.method.as_deref() == Some("tools/list")),
    );
    let Event::Mcp(e) = rec.event else {
        unreachable!()
    };
    (pid, e.token.expect("the request's token is recorded"))
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

#[test]
fn a_ci_job_in_a_container_is_attributed_with_its_verified_token() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(vec![jwk("rsa-1", Algorithm::RS256, "rsa-1")]);
    let policy = policy(work.path(), jwks.port);
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("identity-ci");
    let container = cgroup.child(&format!("docker-{CONTAINER_ID}.scope"));
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );

    let jwt = sign("rsa-1", Algorithm::RS256, "rsa-1", &claims("svc-build"));
    let mut cmd = container.command(mcp_python().to_str().unwrap());
    cmd.arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .arg("legacy")
        .arg(format!("--header=Authorization: Bearer {jwt}"))
        .envs([
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_RUN_ID", "4242"),
            ("GITHUB_JOB", "integration"),
            ("GITHUB_REPOSITORY", "acme/api"),
            ("GITHUB_REF", "refs/heads/main"),
            ("GITHUB_ACTOR", "octocat"),
            ("BATCH_JOB_ID", "b-7"),
            ("DEPLOY_PASSWORD", "not-for-the-trail"),
        ]);
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rec = wait_for_record(
        &state,
        Duration::from_secs(10),
        "of the add call",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.name.as_deref() == Some("add")),
    );
    let Event::Mcp(call) = rec.event else {
        unreachable!()
    };
    let p: &Process = &call.process;
    assert_eq!(p.enrichment_error, None);
    assert_eq!(p.user.as_deref(), Some("root"));
    assert!(
        p.exe.as_deref().is_some_and(|e| e.contains("python")),
        "{p:?}"
    );
    assert!(p.start_time.is_some());
    // `sh` exec'd the client, so its parent is this test process.
    assert_eq!(p.parents[0].pid, std::process::id(), "{:?}", p.parents);
    assert!(p.parents.len() <= 3);
    let cgroup_path = p.cgroup.as_deref().unwrap();
    assert!(
        cgroup_path.ends_with(&format!("/docker-{CONTAINER_ID}.scope")),
        "{cgroup_path}"
    );
    assert_eq!(
        p.unit.as_deref(),
        Some(format!("docker-{CONTAINER_ID}.scope").as_str())
    );
    let c = p.container.as_ref().expect("the container is named");
    assert_eq!(
        (c.runtime.as_str(), c.id.as_str()),
        ("docker", CONTAINER_ID)
    );
    let ci = p.ci.as_ref().expect("the CI job is named");
    assert_eq!(ci.provider.as_deref(), Some("github_actions"));
    assert_eq!(
        (ci.run.as_deref(), ci.job.as_deref()),
        (Some("4242"), Some("integration"))
    );
    assert_eq!(ci.repository.as_deref(), Some("acme/api"));
    assert_eq!(ci.actor.as_deref(), Some("octocat"));
    assert_eq!(ci.vars.get("BATCH_JOB_ID").map(String::as_str), Some("b-7"));

    let t = call.token.as_ref().expect("token recorded");
    assert!(t.verified, "{t:?}");
    assert_eq!(
        (t.iss.as_deref(), t.sub.as_deref()),
        (Some(ISS), Some("svc-build"))
    );
    assert_eq!(t.client_id.as_deref(), Some("ci-runner"));
    assert_eq!(t.claims["groups"], json!(["ci", "deployers"]));
    assert_eq!(t.kid.as_deref(), Some("rsa-1"));

    // Every request of the session carries the same identity; the token verified once.
    let all = mcp_records(&state, pid);
    assert!(all.len() > 6);
    assert!(
        all.iter()
            .filter(|e| e.token.is_some())
            .all(|e| e.token.as_ref().unwrap().fingerprint == t.fingerprint)
    );

    // Nothing outside the allowlist was read, and the token itself is nowhere.
    let dump = tail(&state, &["--json", "-n", "100000"]);
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(!text.contains("not-for-the-trail"));
    if let Some(line) = text.lines().find(|l| l.contains(&jwt)) {
        panic!(
            "the token is in a record: {}",
            line.replace(&jwt, "<TOKEN>")
        );
    }

    // `tail --sub` finds the subject's calls through the index, and only those.
    let by_sub = tail(&state, &["--sub", "svc-build", "-n", "1000"]);
    let lines = String::from_utf8_lossy(&by_sub.stdout);
    assert!(lines.lines().count() >= all.len() - 2, "{lines}");
    assert!(
        lines
            .lines()
            .all(|l| l.contains("sub=svc-build") && l.contains("ci=github_actions:4242")),
        "{lines}"
    );
    let none = tail(&state, &["--sub", "svc-nobody"]);
    assert_eq!(String::from_utf8_lossy(&none.stdout).trim(), "");
    drop(container);
}

#[test]
fn tokens_verify_through_key_rotation_and_fail_with_their_reason_and_never_leak() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(vec![
        jwk("rsa-1", Algorithm::RS256, "rsa-1"),
        jwk("ed-1", Algorithm::EdDSA, "ed-1"),
        jwk("ec-1", Algorithm::ES256, "ec-1"),
    ]);
    let policy = policy(work.path(), jwks.port);
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("identity-tokens");
    let state = work.path().join("state");
    let mut agent = Agent::start_logging(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
        "debug",
    );
    let mut secrets = Vec::new();
    let mut check = |token: String, headers: Vec<String>, want: Option<TokenFailure>| -> Token {
        let (_, t) = post(&cgroup, &state, port, &headers);
        assert_eq!(t.reason, want, "{t:?}");
        assert_eq!(t.verified, want.is_none());
        secrets.push(token);
        t
    };

    let rsa = sign("rsa-1", Algorithm::RS256, "rsa-1", &claims("svc-a"));
    let a = check(rsa.clone(), bearer(&rsa), None);
    let ed = sign("ed-1", Algorithm::EdDSA, "ed-1", &claims("svc-ed"));
    check(ed.clone(), bearer(&ed), None);
    let es = sign("ec-1", Algorithm::ES256, "ec-1", &claims("svc-ec"));
    check(es.clone(), bearer(&es), None);
    // The same token again: same fingerprint; another token: another.
    let again = check(rsa.clone(), bearer(&rsa), None);
    assert_eq!(again.fingerprint, a.fingerprint);
    let rsa_b = sign("rsa-1", Algorithm::RS256, "rsa-1", &claims("svc-b"));
    assert_ne!(
        check(rsa_b.clone(), bearer(&rsa_b), None).fingerprint,
        a.fingerprint
    );

    // Rotation: a token from the next key fails until the issuer publishes it, then verifies
    // (the unknown kid makes the agent fetch the set again); the retired key stops verifying.
    let next = sign("rsa-2", Algorithm::RS256, "rsa-2", &claims("svc-a"));
    check(next.clone(), bearer(&next), Some(TokenFailure::UnknownKid));
    let fetched = *jwks.fetches.lock().unwrap();
    jwks.serve(vec![jwk("rsa-2", Algorithm::RS256, "rsa-2")]);
    std::thread::sleep(Duration::from_millis(2100)); // past the short retry cache of a failure
    check(next.clone(), bearer(&next), None);
    assert!(*jwks.fetches.lock().unwrap() > fetched);
    check(rsa.clone(), bearer(&rsa), Some(TokenFailure::UnknownKid));

    // Each failure, with its reason.
    let mut expired = claims("svc-old");
    expired["exp"] = json!(now() - 3600);
    let t = sign("rsa-2", Algorithm::RS256, "rsa-2", &expired);
    check(t.clone(), bearer(&t), Some(TokenFailure::Expired));
    let mut other_aud = claims("svc-x");
    other_aud["aud"] = json!("another-gateway");
    let t = sign("rsa-2", Algorithm::RS256, "rsa-2", &other_aud);
    check(t.clone(), bearer(&t), Some(TokenFailure::WrongAudience));
    let mut foreign = claims("svc-y");
    foreign["iss"] = json!("https://elsewhere");
    let t = sign("rsa-2", Algorithm::RS256, "rsa-2", &foreign);
    check(t.clone(), bearer(&t), Some(TokenFailure::UnknownIssuer));
    // Claims changed after signing.
    let good = sign("rsa-2", Algorithm::RS256, "rsa-2", &claims("svc-a"));
    let forged_claims = sign("rsa-2", Algorithm::RS256, "rsa-2", &claims("svc-admin"));
    let parts: Vec<&str> = good.split('.').collect();
    let forged = [parts[0], forged_claims.split('.').nth(1).unwrap(), parts[2]].join(".");
    check(
        forged.clone(),
        bearer(&forged),
        Some(TokenFailure::BadSignature),
    );
    let opaque = "sk-live-0123456789abcdefOPAQUE".to_owned();
    let t = check(
        opaque.clone(),
        vec![format!("X-Service-Token: {opaque}")],
        Some(TokenFailure::NotJwt),
    );
    assert_eq!(t.header, "x-service-token");
    let bad = "eyJhbGciOi.bm90LWpzb24.c2ln".to_owned();
    check(bad.clone(), bearer(&bad), Some(TokenFailure::Malformed));

    // The raw tokens are nowhere: not in the store's files, the exports, or the debug log.
    agent.stop();
    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in files_under(&state) {
        haystacks.push((entry.display().to_string(), std::fs::read(&entry).unwrap()));
    }
    for format in ["jsonl", "cef"] {
        let out = mcptrail(&state, &["export", "--format", format]);
        assert!(out.status.success());
        haystacks.push((format!("export {format}"), out.stdout));
    }
    haystacks.push((
        "tail --json".into(),
        tail(&state, &["--json", "-n", "100000"]).stdout,
    ));
    haystacks.push(("agent log".into(), agent.log().into_bytes()));
    assert!(agent.log().contains("DEBUG"), "the log was at debug level");
    // The gateway echoed each caller's Authorization header back: the records name the
    // token by fingerprint instead.
    let dump = String::from_utf8(tail(&state, &["--json", "-n", "100000"]).stdout).unwrap();
    assert!(
        dump.contains("Bearer [REDACTED:token "),
        "the echoed token was not scrubbed"
    );
    for secret in &secrets {
        // The whole token, and its signature on its own.
        let needles = [secret.as_str(), secret.rsplit('.').next().unwrap()];
        for (name, hay) in &haystacks {
            for needle in needles {
                assert!(
                    !contains_bytes(hay, needle.as_bytes()),
                    "a raw token ({}…) is in {name}",
                    &needle[..8.min(needle.len())]
                );
            }
        }
    }
    assert_verifies(&state);
}

#[test]
fn a_caller_gone_before_proc_is_read_keeps_its_kernel_identity() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("identity-gone");
    let container = cgroup.child(&format!("docker-{CONTAINER_ID}.scope"));
    let state = work.path().join("state");
    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);

    // With the agent stopped, the kernel still redirects and completes the handshake; the
    // caller sends its request and exits, and is reaped, before the agent can look at it.
    agent.signal(Signal::SIGSTOP);
    let mut cmd = container.command("python3");
    cmd.arg(fixture("post_jsonrpc.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg("--no-wait");
    let (pid, out) = output_with_pid(&mut cmd);
    agent.signal(Signal::SIGCONT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the caller is gone"
    );

    let rec = wait_for_record(
        &state,
        Duration::from_secs(10),
        "of the gone caller",
        |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid),
    );
    let Event::Mcp(e) = rec.event else {
        unreachable!()
    };
    let p = e.process;
    assert!(
        p.enrichment_error
            .as_deref()
            .is_some_and(|w| w.contains("exited")),
        "{p:?}"
    );
    assert_eq!(p.exe, None);
    assert!(p.comm.starts_with("python"), "{p:?}");
    assert_eq!((p.uid, p.user.as_deref()), (0, Some("root")));
    assert!(p.cgroup_id > 0);
    // Found from the kernel's cgroup id, since /proc had nothing left.
    assert!(
        p.cgroup
            .as_deref()
            .is_some_and(|c| c.ends_with(&format!("docker-{CONTAINER_ID}.scope"))),
        "{p:?}"
    );
    assert_eq!(p.container.map(|c| c.id).as_deref(), Some(CONTAINER_ID));
    drop(container);
}
