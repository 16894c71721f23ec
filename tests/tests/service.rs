//! The agent as a service on a real host: its configuration file (and SIGHUP re-reading it),
//! Prometheus metrics checked by promtool and scraped by a real Prometheus, JSON logs that
//! hold no secret, and the systemd notifications (`Type=notify`) it sends.
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mcptrail::audit::Event;
use mcptrail_tests::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// `GET http://ADDR/PATH` with curl (from the test's own cgroup: never redirected).
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
            url,
        ])
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

/// The value of the sample `series` (name and labels exactly as the text format prints them).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_the_calls() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let metrics_port = free_port();
    let config = work.path().join("mcptrail.toml");
    std::fs::write(
        &config,
        format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let cgroup = TestCgroup::new("service-metrics");
    let state = work.path().join("state");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--config", config.to_str().unwrap()],
        false,
    );
    sdk_client(&cgroup, port);
    sdk_client(&cgroup, port);
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let (code, text) = get(&url);
    assert_eq!(code, 200, "{text}");

    // The SDK client calls `add` and `echo` each run: 4 tools/call, all allowed.
    let calls = sample(
        &text,
        "mcptrail_calls_total{decision=\"allow\",method=\"tools/call\"}",
    );
    assert_eq!(calls, Some(4.0), "{text}");
    assert!(
        sample(&text, "mcptrail_kernel_events_total{event=\"redirected\"}").unwrap() >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "mcptrail_records_written_total{kind=\"mcp\"}").unwrap() >= 8.0,
        "{text}"
    );
    assert!(sample(&text, "mcptrail_record_append_seconds_count").unwrap() >= 8.0);
    assert!(sample(&text, "mcptrail_trail_fsync_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "mcptrail_request_added_seconds_count").unwrap() >= 4.0);
    assert!(sample(&text, "mcptrail_response_added_seconds_count").unwrap() >= 4.0);
    assert_eq!(sample(&text, "mcptrail_origin_misses_total"), Some(0.0));
    assert_eq!(sample(&text, "mcptrail_approvals_pending"), Some(0.0));
    assert_eq!(sample(&text, "mcptrail_bypassing_connections"), Some(0.0));
    assert!(text.contains("mcptrail_build_info{version=\""), "{text}");

    // promtool's own checks: the format, and the naming conventions (units, `_total`).
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool (Debian's prometheus package; `cargo xtask setup`)");
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(&format!("http://127.0.0.1:{metrics_port}/")).0, 404);

    // A real Prometheus scrapes the agent; its query API then shows the calls.
    let prom_port = free_port();
    let prom_config = work.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mcptrail\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=sum(mcptrail_calls_total%7Bmethod%3D%22tools%2Fcall%22%7D)"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = Command::new("curl")
            .args(["-sS", "--max-time", "5", &query])
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<Value>(&answer.stdout)
            && let Some(value) = v["data"]["result"][0]["value"][1].as_str()
        {
            break value.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the agent's calls: {}",
            String::from_utf8_lossy(&answer.stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, "4", "Prometheus's tools/call total");
}

fn targets_changes(state: &Path) -> Vec<mcptrail::audit::record::TargetsChanged> {
    records(state)
        .into_iter()
        .filter_map(|r| match r.event {
            Event::TargetsChanged(t) => Some(t),
            _ => None,
        })
        .collect()
}

#[test]
fn the_config_file_sets_the_run_and_sighup_rereads_what_can_change() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let _a = jsonrpc_echo(port_a);
    let _b = jsonrpc_echo(port_b);
    let config = work.path().join("mcptrail.toml");
    let write = |text: String| std::fs::write(&config, text).unwrap();
    write(format!(
        "[intercept]\ntargets = [\"127.0.0.1:{port_a}\"]\n[metrics]\nlisten = \"\"\n[trail]\ncheckpoint_every = 5\n"
    ));
    let out = mcptrail(work.path(), &["config", "check", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("targets: 127.0.0.1:{port_a}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cgroup = TestCgroup::new("service-config");
    let state = work.path().join("state");
    // No --target: the file's targets apply.
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[],
        &["--config", config.to_str().unwrap()],
        false,
    );
    let status = agent.status();
    assert_eq!(
        status["targets"][0]["target"],
        format!("127.0.0.1:{port_a}")
    );
    assert!(agent.log().contains("metrics=off"), "{}", agent.log());

    // A changed file: the targets move at SIGHUP; a changed checkpoint period waits for a
    // restart, and the log says so.
    write(format!(
        "[intercept]\ntargets = [\"127.0.0.1:{port_b}\"]\n[metrics]\nlisten = \"\"\n[trail]\ncheckpoint_every = 9\n"
    ));
    agent.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !targets_changes(&state)
        .iter()
        .any(|t| t.entries == [format!("127.0.0.1:{port_b}")])
    {
        assert!(
            Instant::now() < deadline,
            "no targets change:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("checkpoint_every") && l.contains("next start")),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.status()["targets"][0]["target"],
        format!("127.0.0.1:{port_b}")
    );

    // A file that no longer parses keeps everything in force, and says where it is wrong.
    write("[intercept]\ntargets = [\"127.0.0.1:1\"]\nbogus = 1\n".to_owned());
    agent.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("does not load") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log().contains("line 3, column 1"), "{}", agent.log());
    assert_eq!(
        agent.status()["targets"][0]["target"],
        format!("127.0.0.1:{port_b}")
    );
    let out = mcptrail(work.path(), &["config", "check", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3, column 1") && err.contains("bogus"),
        "{err}"
    );
}

#[test]
fn the_json_debug_log_holds_no_token_brokered_secret_or_masked_value() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let work = tempfile::tempdir().unwrap();
    let hs = work.path().join("hs.secret");
    std::fs::write(&hs, "service-config-hs-secret\n").unwrap();
    let secrets = work.path().join("secrets.toml");
    std::fs::write(&secrets, "gateway = \"gw-Br0kered-9f3c1a\"\n").unwrap();
    for f in [&hs, &secrets] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
name = "log-secrets"

[[identity.issuers]]
issuer = "https://id.test"
hs_secret_file = "{}"

[brokering]
secrets_file = "{}"

[[brokering.headers]]
destination = "127.0.0.1:{port}"
header = "x-gateway-key"
secret = "gateway"

[[masking.rules]]
name = "ticket"
pattern = 'TKT-\d{{8}}'
"#,
            hs.display(),
            secrets.display()
        ),
    )
    .unwrap();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("service-logs");
    let state = work.path().join("state");
    let mut agent = Agent::start_logging(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--log-format",
            "json",
            "--metrics-listen",
            "",
        ],
        false,
        "debug",
    );
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"iss": "https://id.test", "sub": "svc-logs", "exp": tokens::now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"service-config-hs-secret"),
    )
    .unwrap();
    let masked = "TKT-20261201";
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "file_ticket", "arguments": {"ticket": masked}}});
    let out = cgroup
        .command("python3")
        .arg(fixture("post_jsonrpc.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(format!("--body={body}"))
        .arg(format!("--header=Authorization: Bearer {token}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway got the brokered key and the call as sent (a record rule masks the trail,
    // not the wire).
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("gw-Br0kered-9f3c1a"), "{answer}");
    assert!(answer.contains(masked), "{answer}");
    let rec = wait_for_record(
        &state,
        Duration::from_secs(10),
        "of the answer",
        |r| matches!(&r.event, Event::Mcp(e) if e.result.is_some()),
    );
    let Event::Mcp(rec) = rec.event else {
        unreachable!()
    };
    assert!(
        rec.masked.contains(&"ticket".to_owned()),
        "{:?}",
        rec.masked
    );
    assert!(rec.token.as_ref().is_some_and(|t| t.verified));
    agent.stop();

    let log = agent.log();
    let mut lines = 0;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(
        log.contains("\"level\":\"DEBUG\""),
        "the log was at debug level"
    );
    assert!(lines > 10, "{log}");
    let signature = token.rsplit('.').next().unwrap();
    for (what, needle) in [
        ("the token", token.as_str()),
        ("the token's signature", signature),
        ("the brokered secret", "gw-Br0kered-9f3c1a"),
        ("the masked value", masked),
        ("the HS secret", "service-config-hs-secret"),
    ] {
        assert!(!log.contains(needle), "{what} is in the debug log:\n{log}");
    }
}

#[test]
fn systemd_is_told_ready_watchdog_and_stopping() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let socket_path = work.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let port = free_port();
    let cgroup = TestCgroup::new("service-notify");
    let state = work.path().join("state");
    let mut agent = Agent::start_env(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--metrics-listen", ""],
        false,
        "info",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
        &[],
    );
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // READY comes once the agent is ready: its programs attached (status lists them).
    assert_eq!(next().trim(), "READY=1");
    assert!(!agent.status()["programs"].as_array().unwrap().is_empty());
    // WATCHDOG_PID is not set, so the pings are for this process (the agent's own pid).
    assert_eq!(next().trim(), "WATCHDOG=1");
    assert_eq!(next().trim(), "WATCHDOG=1");
    let status = agent.stop();
    assert!(status.success());
    let mut rest = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        if rest.last().is_some_and(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}

/// The capabilities the packaged unit grants (`AmbientCapabilities=`), read from the unit.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(tests_dir().join("../packaging/mcptrail.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities in the unit")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `setpriv` as a non-root uid with exactly `caps` (effective, ambient and bounding).
fn setpriv(uid: u32, caps: &[String]) -> Vec<String> {
    let mut set = "-all".to_owned();
    for c in caps {
        set.push_str(",+");
        set.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    [
        "setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_owned(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--".to_owned(),
    ]
    .to_vec()
}

/// A uid no account on the host has: the service user of the test.
const AGENT_UID: u32 = 61811;

#[test]
fn a_non_root_agent_with_exactly_the_units_capabilities_audits_end_to_end() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let caps = unit_capabilities();
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_NET_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_DAC_READ_SEARCH"
        ]
    );
    let work = tempfile::tempdir().unwrap();
    // The state directory belongs to the service user, as systemd's StateDirectory= makes it.
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(AGENT_UID.into()), Some(AGENT_UID.into())).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Root-only files the agent must read: the policy and the brokered secret.
    let port = free_port();
    let secrets = work.path().join("secrets.toml");
    std::fs::write(&secrets, "gateway = \"gw-least-privilege\"\n").unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\nname = \"least-privilege\"\n\n[brokering]\nsecrets_file = \"{}\"\n\n\
             [[brokering.headers]]\ndestination = \"127.0.0.1:{port}\"\nheader = \"x-gateway-key\"\nsecret = \"gateway\"\n",
            secrets.display()
        ),
    )
    .unwrap();
    for f in [&secrets, &policy] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("service-caps");
    let extra = ["--policy", policy.to_str().unwrap(), "--metrics-listen", ""];
    let mut agent = Agent::start_env(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &extra,
        false,
        "info",
        &[],
        &setpriv(AGENT_UID, &caps),
    );
    let uid = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap();
    assert_eq!(
        uid,
        AGENT_UID.to_string(),
        "the agent runs as the service user"
    );

    // A real SDK client, as root, in a CI job: attributed in full, brokered, recorded.
    let out = cgroup
        .command(mcp_python().to_str().unwrap())
        .arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_RUN_ID", "4242")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = wait_for_record(
        &state,
        Duration::from_secs(10),
        "of a tools/call",
        |r| matches!(&r.event, Event::Mcp(e) if e.method.as_deref() == Some("tools/call")),
    );
    let Event::Mcp(call) = rec.event else {
        unreachable!()
    };
    let p = &call.process;
    assert_eq!(p.enrichment_error, None, "{p:?}");
    assert!(
        p.exe.as_deref().is_some_and(|e| e.contains("python")),
        "{p:?}"
    );
    assert!(!p.parents.is_empty(), "{p:?}");
    let ci = p.ci.as_ref().unwrap_or_else(|| panic!("no CI job: {p:?}"));
    assert_eq!(ci.run.as_deref(), Some("4242"));
    assert_eq!(call.http.brokered, ["x-gateway-key"]);
    assert!(agent.stop().success(), "{}", agent.log());
    assert_verifies(&state);

    // Without any one of them, the agent refuses to start and says which and why; and with
    // that check skipped, the kernel (or /proc, or a root-only file) shows each is needed.
    let run_without = |missing: &str, unchecked: bool| -> Output {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let wrapper = setpriv(AGENT_UID, &fewer);
        Command::new("timeout")
            .arg("20")
            .args(&wrapper)
            .arg(agent_bin())
            .arg("--state-dir")
            .arg(&state)
            .args(["run", "--cgroup"])
            .arg(&cgroup.path)
            .args(["--target", &format!("127.0.0.1:{port}")])
            .args(["--listen-port", &free_port().to_string()])
            .args(extra)
            .env(UNCHECKED, if unchecked { "1" } else { "0" })
            .output()
            .unwrap()
    };
    for missing in &caps {
        let out = run_without(missing, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without {missing}: {err}");
        assert!(
            err.contains(&format!("lacks {missing} (")) && err.contains("AmbientCapabilities="),
            "without {missing}: {err}"
        );
    }
    for (missing, refusal) in [
        ("CAP_BPF", "failed to create map"),
        ("CAP_PERFMON", "BPF_PROG_LOAD"),
        ("CAP_NET_ADMIN", "Operation not permitted"),
        ("CAP_DAC_READ_SEARCH", "cannot read the policy file"),
    ] {
        let out = run_without(missing, true);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(124), "ran without {missing}: {err}");
        assert!(!out.status.success(), "started without {missing}: {err}");
        assert!(err.contains(refusal), "without {missing}: {err}");
    }
    // Without CAP_SYS_PTRACE the agent runs, but cannot say which executable called.
    let fewer: Vec<String> = caps
        .iter()
        .filter(|c| *c != "CAP_SYS_PTRACE")
        .cloned()
        .collect();
    let agent = Agent::start_env(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &extra,
        false,
        "info",
        &[(UNCHECKED, "1")],
        &setpriv(AGENT_UID, &fewer),
    );
    let out = cgroup
        .command("python3")
        .arg(fixture("post_jsonrpc.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(r#"--body={"jsonrpc":"2.0","id":9,"method":"ping"}"#)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = wait_for_record(
        &state,
        Duration::from_secs(10),
        "of the ping",
        |r| matches!(&r.event, Event::Mcp(e) if e.method.as_deref() == Some("ping")),
    );
    let Event::Mcp(ping) = rec.event else {
        unreachable!()
    };
    assert_eq!(ping.process.exe, None);
    assert!(
        ping.process
            .enrichment_error
            .as_deref()
            .is_some_and(|e| e.contains("Permission denied")),
        "{:?}",
        ping.process
    );
    drop(agent);
}

/// The variable that skips the agent's capability check (agent/src/cli/privileges.rs).
const UNCHECKED: &str = "MCPTRAIL_UNCHECKED_CAPABILITIES";

#[test]
fn doctor_checks_the_host_and_the_agent_and_fails_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (live, dead) = (free_port(), free_port());
    let _echo = jsonrpc_echo(live);
    let config = work.path().join("mcptrail.toml");
    std::fs::write(
        &config,
        format!(
            "[intercept]\ntargets = [\"127.0.0.1:{live}\", \"127.0.0.1:{dead}\"]\n[trail]\nretain_mb = 64\n"
        ),
    )
    .unwrap();
    let state = work.path().join("state");
    let doctor = || {
        let out = mcptrail(
            &state,
            &[
                "doctor",
                "--config",
                config.to_str().unwrap(),
                "--connect-timeout",
                "1",
            ],
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let line = |report: &str, start: &str| -> String {
        report
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in\n{report}"))
            .to_owned()
    };

    // No agent yet: that is the failure, with the fix.
    let (passed, report) = doctor();
    assert!(!passed, "{report}");
    for ok in [
        "ok   kernel",
        "ok   cgroup2",
        "ok   bpffs",
        "ok   capabilities",
    ] {
        line(&report, ok);
    }
    assert!(
        line(&report, "FAIL agent").contains("not running"),
        "{report}"
    );
    assert!(report.contains("systemctl start mcptrail"), "{report}");
    assert!(
        line(&report, &format!("ok   gateway        127.0.0.1:{live}")).contains("accepts"),
        "{report}"
    );
    assert!(
        line(&report, &format!("FAIL gateway        127.0.0.1:{dead}")).contains("unreachable"),
        "{report}"
    );

    let cgroup = TestCgroup::new("service-doctor");
    let _agent = Agent::start_with(
        &state,
        &cgroup,
        &[],
        &["--config", config.to_str().unwrap(), "--metrics-listen", ""],
        false,
    );
    let (_, report) = doctor();
    assert!(
        line(&report, "ok   agent").contains("running: pid"),
        "{report}"
    );
    line(&report, "ok   bypassing");
    assert!(
        line(&report, "ok   state dir").contains("mode 0700"),
        "{report}"
    );
    assert!(
        line(&report, "ok   disk").contains("of its 64 MiB"),
        "{report}"
    );

    // A connection to a target from outside the watched cgroup goes around the agent.
    let around = std::net::TcpStream::connect(("127.0.0.1", live)).unwrap();
    // A state directory others can read.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (passed, report) = doctor();
    assert!(!passed);
    assert!(
        line(&report, "FAIL bypassing").contains("1 connection"),
        "{report}"
    );
    assert!(
        line(&report, "FAIL state dir").contains("mode 0755"),
        "{report}"
    );
    assert!(
        report.contains(&format!("fix: `chmod 700 {}`", state.display())),
        "{report}"
    );
    drop(around);
}
