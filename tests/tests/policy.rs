//! Policies end to end through the agent: access rules that deny and rate-limit with clear
//! JSON-RPC errors (and record the decision), and a policy file reloaded on change and on
//! SIGHUP, a bad file leaving the old policy in force.

use std::path::Path;
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::DecisionAction;
use mcptrail_tests::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// POSTs `body` from a new process in the cgroup; its pid and the JSON answer.
fn post(cgroup: &TestCgroup, port: u16, body: &Value, headers: &[String]) -> (u32, Value) {
    let mut cmd = cgroup.command("python3");
    cmd.arg(fixture("post_jsonrpc.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(format!("--body={body}"));
    for h in headers {
        cmd.arg(format!("--header={h}"));
    }
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let body = v["body"].as_str().unwrap();
    (
        pid,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

fn call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
}

fn hs_token(secret: &[u8], sub: &str) -> String {
    let now = mcptrail_tests::tokens::now();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"iss": "https://id.test", "sub": sub, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[test]
fn access_rules_deny_and_rate_limit_with_clear_errors() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("hs.secret");
    std::fs::write(&secret, "test-secret-for-hs256\n").unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
name = "access-test"

[[identity.issuers]]
issuer = "https://id.test"
hs_secret_file = "{}"

[access]
default = "allow"

[[access.rules]]
name = "no-prod-deploys"
action = "deny"
message = "deploys to prod need a human"
match = {{ tool = "deploy_prod*" }}

[[access.rules]]
name = "search-budget"
action = "rate_limit"
rate = {{ per = "sub", burst = 2, per_second = 0.01 }}
match = {{ tool = "search", token_verified = true }}

[[access.rules]]
name = "no-python-resources"
action = "deny"
match = {{ exe = "*python*", method = "resources/read" }}
"#,
            secret.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("policy-access");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    let alice = vec![format!(
        "Authorization: Bearer {}",
        hs_token(b"test-secret-for-hs256", "alice")
    )];
    let bob = vec![format!(
        "Authorization: Bearer {}",
        hs_token(b"test-secret-for-hs256", "bob")
    )];

    // Denied: a JSON-RPC error naming the rule and its message; the gateway never answers.
    let (pid, answer) = post(&cgroup, port, &call(1, "deploy_prod_eu"), &alice);
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["error"]["code"], -32001);
    let said = answer["error"]["message"].as_str().unwrap();
    assert!(
        said.contains("no-prod-deploys") && said.contains("need a human"),
        "{said}"
    );
    assert!(
        answer.get("result").is_none(),
        "the echo server would have answered: {answer}"
    );
    let recs = wait_mcp_records(&state, pid, 2);
    let req = recs.iter().find(|r| r.method.is_some()).unwrap();
    let d = req.decision.as_ref().unwrap();
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (DecisionAction::Deny, Some("no-prod-deploys"))
    );
    let out = recs.iter().find(|r| r.error.is_some()).unwrap();
    assert_eq!(
        out.exchange, req.exchange,
        "the refusal is the request's outcome"
    );

    // Allowed: through to the gateway, and the record says which way it went.
    let (pid, answer) = post(&cgroup, port, &call(2, "deploy_staging"), &alice);
    assert_eq!(answer["result"]["echo"]["name"], "deploy_staging");
    let recs = wait_mcp_records(&state, pid, 2);
    assert_eq!(
        recs[0].decision.as_ref().unwrap().action,
        DecisionAction::Allow
    );

    // Rate limit per token subject: two calls, then refused; another subject is unaffected.
    for i in 0..2 {
        let (_, a) = post(&cgroup, port, &call(10 + i, "search"), &alice);
        assert!(a.get("result").is_some(), "call {i}: {a}");
    }
    let (pid, limited) = post(&cgroup, port, &call(12, "search"), &alice);
    assert_eq!(limited["error"]["code"], -32002, "{limited}");
    assert!(
        limited["error"]["message"]
            .as_str()
            .unwrap()
            .contains("search-budget")
    );
    let (_, other) = post(&cgroup, port, &call(13, "search"), &bob);
    assert!(other.get("result").is_some(), "{other}");
    let recs = wait_mcp_records(&state, pid, 2);
    assert_eq!(
        recs[0].decision.as_ref().unwrap().action,
        DecisionAction::RateLimited
    );

    // A process condition: python may not read resources here.
    let read = json!({"jsonrpc": "2.0", "id": 20, "method": "resources/read", "params": {"uri": "file:///etc/hosts"}});
    let (_, a) = post(&cgroup, port, &read, &[]);
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-python-resources"),
        "{a}"
    );

    // A batch with one refused message is refused whole, each request answered.
    let batch = json!([call(30, "deploy_staging"), call(31, "deploy_prod_us")]);
    let (_, a) = post(&cgroup, port, &batch, &alice);
    let answers = a.as_array().unwrap_or_else(|| panic!("{a}"));
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|x| x["error"]["code"] == -32001), "{a}");

    // `tail --decision` finds them.
    let denied = tail(&state, &["--decision", "deny", "-n", "100"]);
    let lines = String::from_utf8_lossy(&denied.stdout);
    assert!(
        lines.contains("deny:no-prod-deploys") && lines.contains("deny:no-python-resources"),
        "{lines}"
    );
    assert!(!lines.contains("search-budget"), "{lines}");
    let limited = tail(&state, &["--decision", "rate_limited"]);
    assert!(String::from_utf8_lossy(&limited.stdout).contains("rate_limited:search-budget"));
    assert_verifies(&state);
}

fn masking_policy(name: &str, with_rule: bool) -> String {
    let mut text = format!("version = 1\nname = \"{name}\"\n");
    if with_rule {
        text.push_str("[[masking.rules]]\nname = \"ticket\"\npattern = 'T-\\d{4}'\nexamples = [\"T-1234\"]\ncounterexamples = [\"T-12\"]\n");
    }
    text
}

fn policy_changes(state: &Path) -> Vec<mcptrail::audit::record::PolicyChanged> {
    records(state)
        .into_iter()
        .filter_map(|r| match r.event {
            Event::PolicyChanged(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn wait_changes(state: &Path, n: usize) -> Vec<mcptrail::audit::record::PolicyChanged> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = policy_changes(state);
        if c.len() >= n || std::time::Instant::now() > deadline {
            assert!(c.len() >= n, "{c:#?}");
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_policy_reloads_on_change_and_sighup_and_a_bad_file_keeps_the_old() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, masking_policy("first", true)).unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("policy-reload");
    let state = work.path().join("state");
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    let ticket = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "arguments": {"t": "see T-1234"}}});
    let recorded = |state: &Path| {
        let (pid, _) = post(&cgroup, port, &ticket, &[]);
        let recs = wait_mcp_records(state, pid, 1);
        recs[0].params.as_ref().unwrap()["arguments"]["t"].clone()
    };
    assert_eq!(recorded(&state), "see [MASKED:ticket]");

    // The file changes: the new policy is in force within the watch interval.
    std::fs::write(&policy, masking_policy("second", false)).unwrap();
    let changes = wait_changes(&state, 1);
    assert_eq!(
        (
            changes[0].trigger.as_str(),
            changes[0].in_force.name.as_str()
        ),
        ("file-change", "second")
    );
    assert!(changes[0].loaded);
    assert_eq!(recorded(&state), "see T-1234");

    // A broken file: the trail says why, and the old policy stays.
    // Padded, so that the SIGHUP step below can keep the file's size.
    let broken =
        "version = 1\nname = \"broken\"\n[[masking.rules]]\nname = \"bad\"\npattern = '(oops'\n";
    std::fs::write(
        &policy,
        format!("{broken}{}", "#".repeat(256 - broken.len())),
    )
    .unwrap();
    let changes = wait_changes(&state, 2);
    assert!(!changes[1].loaded);
    assert_eq!(changes[1].in_force.name, "second");
    let why = changes[1].error.as_deref().unwrap();
    assert!(why.contains("line 4") && why.contains("bad"), "{why}");
    assert_eq!(recorded(&state), "see T-1234");

    // SIGHUP reloads at once (the file's time and size are kept, so only the signal tells).
    let stamp = std::fs::metadata(&policy).unwrap();
    let mut text = masking_policy("third", true);
    let want = stamp.len() as usize;
    assert!(text.len() <= want, "{} > {want}", text.len());
    text.push_str(&"#".repeat(want - text.len()));
    std::fs::write(&policy, &text).unwrap();
    let f = std::fs::File::options().write(true).open(&policy).unwrap();
    f.set_modified(stamp.modified().unwrap()).unwrap();
    drop(f);
    agent.signal(Signal::SIGHUP);
    let changes = wait_changes(&state, 3);
    assert_eq!(
        (
            changes[2].trigger.as_str(),
            changes[2].in_force.name.as_str()
        ),
        ("SIGHUP", "third")
    );
    assert_eq!(recorded(&state), "see [MASKED:ticket]");
    assert_verifies(&state);
}

/// The pending approvals, from `mcptrail approvals --json`, once there are `n`.
fn pending(state: &Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = mcptrail(state, &["approvals", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if list.len() >= n {
            return list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing waits: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn held_calls_wait_for_an_approver_who_is_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"version = 1
name = "approvals-test"

[[access.rules]]
name = "deploys"
action = "approve"
timeout_secs = 30
match = { tool = "deploy_*" }

[[access.rules]]
name = "impatient"
action = "approve"
timeout_secs = 1
match = { tool = "flaky_*" }
"#,
    )
    .unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("policy-approvals");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    std::thread::scope(|s| {
        // Approved: the call waits, then goes through.
        let client = s.spawn(|| post(&cgroup, port, &call(1, "deploy_api"), &[]));
        let list = pending(&state, 1);
        assert_eq!(
            (list[0]["rule"].as_str(), list[0]["name"].as_str()),
            (Some("deploys"), Some("deploy_api"))
        );
        assert_eq!(list[0]["destination"], format!("127.0.0.1:{port}"));
        let id = list[0]["id"].as_u64().unwrap().to_string();
        let listed = mcptrail(&state, &["approvals"]);
        assert!(String::from_utf8_lossy(&listed.stdout).contains("deploy_api"));
        let ok = mcptrail(&state, &["approve", &id, "--reason", "change ticket 42"]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let (pid, answer) = client.join().unwrap();
        assert_eq!(answer["result"]["echo"]["name"], "deploy_api", "{answer}");
        let recs = wait_mcp_records(&state, pid, 2);
        assert_eq!(
            recs[0].decision.as_ref().unwrap().action,
            DecisionAction::Held
        );
        // Deciding it twice is a clear error.
        let again = mcptrail(&state, &["approve", &id]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("no pending approval"));

        // Denied: the caller hears why, and from whom.
        let client = s.spawn(|| post(&cgroup, port, &call(2, "deploy_db"), &[]));
        let id = pending(&state, 1)[0]["id"].as_u64().unwrap().to_string();
        let no = mcptrail(&state, &["deny", &id, "--reason", "not during the freeze"]);
        assert!(
            no.status.success(),
            "{}",
            String::from_utf8_lossy(&no.stderr)
        );
        let (_, answer) = client.join().unwrap();
        let said = answer["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        assert!(
            said.contains("not during the freeze") && said.contains("root"),
            "{said}"
        );
    });

    // Nobody decides: denied when the rule's timeout passes.
    let (_, answer) = post(&cgroup, port, &call(3, "flaky_job"), &[]);
    let said = answer["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(said.contains("no approver decided within 1 s"), "{said}");

    // Every step is in the trail, with the approver.
    let approvals: Vec<_> = records(&state)
        .into_iter()
        .filter_map(|r| match r.event {
            Event::Approval(a) => Some(a),
            _ => None,
        })
        .collect();
    let outcomes: Vec<&str> = approvals.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "requested",
            "approved",
            "requested",
            "denied",
            "requested",
            "timed_out"
        ]
    );
    let approved = &approvals[1];
    let by = approved.approver.as_ref().unwrap();
    assert_eq!((by.uid, by.user.as_deref()), (0, Some("root")));
    assert_eq!(approved.reason.as_deref(), Some("change ticket 42"));
    assert!(approved.waited_ms.is_some());
    assert_verifies(&state);
}

#[test]
fn brokered_credentials_reach_the_gateway_and_nowhere_else() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let work = tempfile::tempdir().unwrap();
    let secrets = work.path().join("secrets.toml");
    std::fs::write(&secrets, "gateway = \"gw-S3cret-value-42\"\n").unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
name = "brokering-test"

[brokering]
secrets_file = "{}"

[[brokering.headers]]
destination = "127.0.0.1:{port}"
header = "authorization"
secret = "gateway"
format = "Bearer {{secret}}"
"#,
            secrets.display()
        ),
    )
    .unwrap();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("policy-brokering");
    let state = work.path().join("state");
    let mut agent = Agent::start_logging(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
        "debug",
    );
    // The caller sends its own (or no) credential; the gateway gets the brokered one.
    let (pid, answer) = post(
        &cgroup,
        port,
        &call(1, "x"),
        &["Authorization: Bearer caller-own".into()],
    );
    assert_eq!(
        answer["result"]["authorization"], "Bearer gw-S3cret-value-42",
        "{answer}"
    );
    let (_, answer) = post(&cgroup, port, &call(2, "x"), &[]);
    assert_eq!(
        answer["result"]["authorization"], "Bearer gw-S3cret-value-42",
        "{answer}"
    );
    let recs = wait_mcp_records(&state, pid, 2);
    assert_eq!(recs[0].http.brokered, ["authorization"]);
    // The gateway echoed the credential back; the record does not repeat it.
    let out = recs.iter().find(|r| r.result.is_some()).unwrap();
    assert_eq!(
        out.result.as_ref().unwrap()["authorization"],
        "Bearer [REDACTED:brokered]"
    );
    assert!(out.masked.contains(&"brokered".to_owned()));
    assert!(
        recs[0]
            .token
            .as_ref()
            .is_some_and(|t| t.scheme.as_deref() == Some("bearer"))
    );

    // A secrets file others can read is refused on reload; the old policy stays.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    agent.signal(Signal::SIGHUP);
    let changes = wait_changes(&state, 1);
    assert!(!changes[0].loaded);
    assert!(
        changes[0].error.as_deref().unwrap().contains("chmod 600"),
        "{:?}",
        changes[0].error
    );

    agent.stop();
    let mut haystacks = vec![
        ("agent log".to_owned(), agent.log().into_bytes()),
        (
            "export".to_owned(),
            mcptrail(&state, &["export", "--format", "jsonl"]).stdout,
        ),
    ];
    for entry in files_under(&state) {
        haystacks.push((entry.display().to_string(), std::fs::read(&entry).unwrap()));
    }
    for (name, hay) in haystacks {
        assert!(
            !contains_bytes(&hay, b"gw-S3cret-value-42"),
            "the brokered secret is in {name}"
        );
    }
}

#[test]
fn wire_rules_rewrite_what_the_gateway_gets_record_rules_do_not() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"version = 1
name = "wire-test"

[[masking.rules]]
name = "ticket"
pattern = 'T-\d{4}'
wire = true

[[masking.rules]]
name = "order"
pattern = 'O-\d{4}'

[[masking.rules]]
name = "customer_mail"
pattern = '[a-z]+@example\.com'
scope = ["headers"]
wire = true
"#,
    )
    .unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("policy-wire");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    let msg = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                     "params": {"name": "x", "arguments": {"t": "see T-1234 and O-5678 and café"}}});
    let (pid, answer) = post(&cgroup, port, &msg, &["X-Customer: bob@example.com".into()]);
    // A header-scoped wire rule rewrote the header the gateway got.
    assert_eq!(
        answer["result"]["headers"]["x-customer"], "[MASKED:customer_mail]",
        "{answer}"
    );
    // The gateway echoes what it got: the wire rule's match never reached it.
    assert_eq!(
        answer["result"]["echo"]["arguments"]["t"], "see [MASKED:ticket] and O-5678 and café",
        "{answer}"
    );
    let recs = wait_mcp_records(&state, pid, 2);
    let req = recs.iter().find(|r| r.method.is_some()).unwrap();
    assert!(req.wire_masked);
    assert_eq!(req.masked, ["order", "ticket"]);
    assert_eq!(
        req.params.as_ref().unwrap()["arguments"]["t"],
        "see [MASKED:ticket] and [MASKED:order] and café"
    );
}

/// Runs tests/fixtures/mcp_call.py in the cgroup: the SDK's client calling `tool`, once per
/// argument object.
fn sdk_call(cgroup: &TestCgroup, port: u16, tool: &str, calls: &[Value]) -> (u32, Vec<Value>) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = calls.iter().map(Value::to_string).collect();
    std::fs::write(file.path(), lines.join("\n")).unwrap();
    let mut cmd = cgroup.command(mcp_python().to_str().unwrap());
    cmd.arg(fixture("mcp_call.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .arg(tool)
        .arg(format!("--args-file={}", file.path().display()));
    let (pid, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, serde_json::from_slice(&out.stdout).unwrap())
}

/// The default pack and every access action, with the official SDK's client and server.
#[test]
fn every_default_rule_and_every_action_with_the_sdk() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // The embedded default (its 27 detectors) plus access rules.
    let mut text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"),
    )
    .unwrap();
    text.push_str(
        r#"
[access]
[[access.rules]]
name = "no-summaries"
action = "deny"
message = "no summaries today"
match = { tool = "summarize" }

[[access.rules]]
name = "add-budget"
action = "rate_limit"
rate = { per = "rule", burst = 1, per_second = 0.001 }
match = { tool = "add" }

[[access.rules]]
name = "touch-needs-a-human"
action = "approve"
timeout_secs = 30
match = { tool = "touch_tools" }
"#,
    );
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, text).unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("policy-sdk");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--policy", policy.to_str().unwrap()],
        false,
    );

    // Every example of every pattern rule, through the SDK's echo tool: the client gets its
    // text back, and the trail has it masked by that rule, both ways.
    let pack = mcptrail::policy::Policy::embedded_default().unwrap();
    let mut cases = Vec::new();
    for rule in pack.masking.iter().filter(|r| r.pattern.is_some()) {
        for example in &rule.examples {
            cases.push((rule.name.clone(), example.clone()));
        }
    }
    assert!(cases.len() >= 35, "{}", cases.len());
    let args: Vec<Value> = cases.iter().map(|(_, t)| json!({"text": t})).collect();
    let (pid, answers) = sdk_call(&cgroup, port, "echo", &args);
    for ((_, text), answer) in cases.iter().zip(&answers) {
        assert_eq!(
            answer["text"][0],
            text.as_str(),
            "the client sees its own text"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let recs = loop {
        let recs = mcp_records(&state, pid);
        let outcomes = recs
            .iter()
            .filter(|r| r.result.is_some() && r.method.is_none())
            .count();
        if outcomes >= cases.len() + 2 || std::time::Instant::now() > deadline {
            break recs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (rule, text) in &cases {
        let call = recs
            .iter()
            .find(|r| {
                r.name.as_deref() == Some("echo") && r.masked.contains(rule) && r.params.is_some()
            })
            .unwrap_or_else(|| panic!("no call masked by {rule} ({text:?})"));
        let recorded = call.params.as_ref().unwrap()["arguments"]["text"].to_string();
        assert!(recorded.contains(&format!(":{rule}")), "{rule}: {recorded}");
    }
    let dump = String::from_utf8(tail(&state, &["--json", "-n", "100000"]).stdout).unwrap();
    for (rule, text) in &cases {
        // The secret part is gone from the whole trail (the requests and the echoed results).
        let secret = text.split_whitespace().max_by_key(|w| w.len()).unwrap();
        if secret.len() >= 12 && !["hunter22", "s3cr3t!"].contains(&secret) {
            assert!(!dump.contains(secret), "{rule}: {secret} is in the trail");
        }
    }

    // Deny: the SDK's client gets the rule's message.
    let (_, a) = sdk_call(&cgroup, port, "summarize", &[json!({"text": "t"})]);
    let said = a[0]["error"].as_str().unwrap_or_else(|| panic!("{a:?}"));
    assert!(said.contains("no summaries today"), "{said}");
    // Rate limit: one call, then refused.
    let (_, a) = sdk_call(
        &cgroup,
        port,
        "add",
        &[json!({"a": 1, "b": 2}), json!({"a": 3, "b": 4})],
    );
    assert_eq!(a[0]["text"][0], "3", "{a:?}");
    assert!(
        a[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("add-budget"),
        "{a:?}"
    );
    // Approve: held until an operator says yes.
    std::thread::scope(|s| {
        let client = s.spawn(|| sdk_call(&cgroup, port, "touch_tools", &[json!({})]));
        let id = pending(&state, 1)[0]["id"].as_u64().unwrap().to_string();
        assert!(mcptrail(&state, &["approve", &id]).status.success());
        let (_, a) = client.join().unwrap();
        assert_eq!(a[0]["text"][0], "touched", "{a:?}");
    });
    assert_verifies(&state);
}

/// Wire rules on what the gateway sends back: a JSON response (its length changes) and an SSE
/// stream (re-framed), which the official SDK's client must still read.
#[test]
fn wire_rules_rewrite_responses_json_and_sse() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"version = 1
name = "wire-responses"

[[masking.rules]]
name = "card_out"
pattern = '4111 1111 1111 1111'
scope = ["result"]
wire = true
"#,
    )
    .unwrap();
    let (echo_port, sdk_port) = (free_port(), free_port());
    let _echo = jsonrpc_echo(echo_port);
    let _server = mcp_server(sdk_port, &[]);
    let cgroup = TestCgroup::new("policy-wire-out");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[
            format!("127.0.0.1:{echo_port}"),
            format!("127.0.0.1:{sdk_port}"),
        ],
        &["--policy", policy.to_str().unwrap()],
        false,
    );
    // JSON: the request goes as it is (the rule is for results), the answer comes back masked.
    let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "x", "arguments": {"t": "4111 1111 1111 1111"}}});
    let (_, answer) = post(&cgroup, echo_port, &msg, &[]);
    assert_eq!(
        answer["result"]["echo"]["arguments"]["t"], "[MASKED:card_out]",
        "{answer}"
    );
    // SSE (the SDK's server in the handshake era streams its answers): still a valid stream.
    let mut cmd = cgroup.command(mcp_python().to_str().unwrap());
    cmd.arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{sdk_port}/mcp"))
        .arg("legacy");
    let (_, out) = output_with_pid(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["echo"], json!(["card [MASKED:card_out]"]), "{out}");
    assert_eq!(
        out["add"],
        json!(["42"]),
        "the other calls are untouched: {out}"
    );
}

#[test]
fn policy_check_and_test_without_traffic() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml");
    let out = mcptrail(state, &["policy", "check", default.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("27 masking rules"),
        "{said}"
    );

    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\nname = \"bad\"\n\n[[masking.rules]]\nname = \"digits\"\npattern = '\\d+'\ncounterexamples = [\"room 42\"]\n").unwrap();
    let out = mcptrail(state, &["policy", "check", bad.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("line 5") && said.contains("\"room 42\" should be left alone"),
        "{said}"
    );

    let mut policy = std::fs::read_to_string(&default).unwrap();
    policy.push_str("\n[[access.rules]]\nname = \"no-deploys\"\naction = \"deny\"\nmatch = { tool = \"deploy_*\" }\n");
    let file = work.path().join("p.toml");
    std::fs::write(&file, policy).unwrap();
    let input = work.path().join("msg.json");
    std::fs::write(&input, r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deploy_prod","arguments":{"card":"4111 1111 1111 1111"}}}"#).unwrap();
    let out = mcptrail(
        state,
        &[
            "policy",
            "test",
            file.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("decision for tools/call deploy_prod: deny (rule no-deploys)"),
        "{said}"
    );
    assert!(
        said.contains("[MASKED:payment_card]1111") && said.contains("masked by: payment_card"),
        "{said}"
    );
}
