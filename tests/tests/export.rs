//! The trail leaves the host: the agent exports live traffic as OTLP/HTTP logs to a receiver
//! that decodes them with the official protobuf schema (Python `opentelemetry-proto`), through
//! an outage, 503s with Retry-After, a partial success and a kill -9; every record arrives, the
//! received copy verifies with `mcptrail verify --export`, and a record changed, deleted or put
//! in another's place in it is reported exactly. `mcptrail export --format otlp` and the JSON
//! lines export verify the same way.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcptrail_tests::*;
use serde_json::Value;

struct Receiver {
    port: u16,
    out: PathBuf,
    control: PathBuf,
    child: Option<Reaped>,
    extra: Vec<String>,
}

impl Receiver {
    fn new(dir: &Path, name: &str) -> Receiver {
        Self::with(dir, name, &[])
    }

    /// With more receiver arguments (`--tls CERT KEY`, `--token T`).
    fn with(dir: &Path, name: &str, extra: &[&str]) -> Receiver {
        let mut r = Receiver {
            port: free_port(),
            out: dir.join(format!("{name}.jsonl")),
            control: dir.join(format!("{name}.control")),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let child = Command::new(mcp_python())
            .arg(fixture("otlp_receiver.py"))
            .arg(self.port.to_string())
            .arg(&self.out)
            .arg(&self.control)
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the OTLP receiver");
        self.child = Some(Reaped(child));
        wait_listening(&format!("127.0.0.1:{}", self.port), Duration::from_secs(10));
    }

    fn stop(&mut self) {
        self.child = None;
    }

    fn set(&self, mode: &str) {
        std::fs::write(&self.control, mode).unwrap();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every log record received, as (the OTLP JSON resource, the log record).
    fn received(&self) -> Vec<(Value, Value)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            for rl in v["resourceLogs"].as_array().unwrap() {
                for sl in rl["scopeLogs"].as_array().unwrap() {
                    for lr in sl["logRecords"].as_array().unwrap() {
                        out.push((rl["resource"].clone(), lr.clone()));
                    }
                }
            }
        }
        out
    }

    /// The record sequence numbers received (checkpoints left out).
    fn seqs(&self) -> BTreeSet<u64> {
        self.received()
            .iter()
            .filter(|(_, lr)| {
                attr(lr, "mcptrail.kind").is_some_and(|k| k != "checkpoint" && k != "anchor")
            })
            .filter_map(|(_, lr)| attr(lr, "mcptrail.seq")?.parse().ok())
            .collect()
    }

    /// Waits until every record of the trail in `state` has arrived.
    fn wait_for_all(&self, state: &Path, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let last = records(state).last().map_or(0, |r| r.seq);
            let got = self.seqs();
            if last > 0 && (1..=last).all(|s| got.contains(&s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "records 1..={last} did not all arrive within {within:?}; missing: {:?}",
                (1..=last).filter(|s| !got.contains(s)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An attribute of an OTLP JSON log record, as text (ints come as strings in OTLP JSON).
fn attr(lr: &Value, key: &str) -> Option<String> {
    let a = lr["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?;
    let v = &a["value"];
    v["stringValue"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| v["intValue"].as_str().map(str::to_owned))
        .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
}

fn verify_export(state: &Path, file: &Path, key: &Path) -> (bool, Value) {
    let out = mcptrail(
        state,
        &[
            "verify",
            "--export",
            file.to_str().unwrap(),
            "--pubkey",
            key.to_str().unwrap(),
            "--json",
        ],
    );
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout))),
    )
}

/// The received file with `edit` applied to its log records (as OTLP JSON lines).
fn edited(src: &Path, dst: &Path, mut edit: impl FnMut(&mut Vec<Value>)) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut all: Vec<Value> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for rl in v["resourceLogs"].as_array().unwrap() {
            for sl in rl["scopeLogs"].as_array().unwrap() {
                all.extend(sl["logRecords"].as_array().unwrap().iter().cloned());
            }
        }
    }
    edit(&mut all);
    let one = serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": all}]}]});
    std::fs::write(dst, format!("{one}\n")).unwrap();
}

fn seq_of(lr: &Value) -> Option<u64> {
    if attr(lr, "mcptrail.kind").is_some_and(|k| k == "checkpoint" || k == "anchor") {
        return None;
    }
    attr(lr, "mcptrail.seq")?.parse().ok()
}

#[test]
fn live_traffic_reaches_the_collector_at_least_once_and_the_copy_verifies() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::new(work.path(), "collector");
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("export-otlp");
    let state = work.path().join("state");
    let args = [
        "--export-otlp",
        &receiver.url(),
        "--checkpoint-every",
        "7",
        "--export-otlp-batch-records",
        "16",
    ];
    let args: Vec<&str> = args.iter().map(|s| &**s).collect();
    let mut agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &args,
        false,
    );
    sdk_client(&cgroup, port);
    receiver.wait_for_all(&state, Duration::from_secs(20));
    // Caught up: `status` says so (the cursor's lag, records and seconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lag = agent.status()["export_lag"].clone();
        let otlp = lag
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["cursor"] == "otlp")
            .cloned();
        if otlp
            .as_ref()
            .is_some_and(|l| l["records"] == 0 && l["seconds"] == 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "export lag never reached 0: {lag}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The receiver goes away for a while: nothing is lost, the calls go on meanwhile.
    receiver.stop();
    sdk_client(&cgroup, port);
    std::thread::sleep(Duration::from_millis(1500));
    // It comes back answering 503 with Retry-After, then takes everything.
    receiver.set("503 1");
    receiver.start();
    sdk_client(&cgroup, port);
    std::thread::sleep(Duration::from_millis(1500));
    let during = receiver.seqs().len();
    receiver.set("ok");
    receiver.wait_for_all(&state, Duration::from_secs(30));
    assert!(
        receiver.seqs().len() > during,
        "nothing arrived after the 503s ended"
    );

    // A partial success: the exporter sends the batch again in halves; duplicates arrive.
    receiver.set("partial 1");
    sdk_client(&cgroup, port);
    std::thread::sleep(Duration::from_millis(1500));
    receiver.set("ok");
    receiver.wait_for_all(&state, Duration::from_secs(30));

    // kill -9 mid-export (the receiver is down, records wait): the next agent resumes at the
    // cursor and the stop record and final checkpoint follow.
    let first = agent.log();
    assert!(
        first.contains("not taking the batch now"),
        "no retry was logged:\n{first}"
    );
    assert!(
        first.contains("rejected part of a batch"),
        "no partial success was logged:\n{first}"
    );
    receiver.stop();
    sdk_client(&cgroup, port);
    agent.kill9();
    receiver.start();
    let mut agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &args,
        false,
    );
    sdk_client(&cgroup, port);
    assert!(agent.stop().success());
    receiver.wait_for_all(&state, Duration::from_secs(30));
    let log = agent.log();
    assert!(!log.contains("OTLP export stopped"), "{log}");

    // The received copy verifies against the key, away from the trail.
    let key = work.path().join("trail.pub");
    let out = mcptrail(&state, &["key", "export", "--out", key.to_str().unwrap()]);
    assert!(out.status.success());
    let (ok, report) = verify_export(&state, &receiver.out, &key);
    assert!(ok, "{report:#}");
    let last = records(&state).last().unwrap().seq;
    assert_eq!(report["records"], last);
    assert_eq!(report["first"], 1);
    assert!(report["duplicates"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        report["checkpoints_verified"].as_u64().unwrap() >= 3,
        "{report:#}"
    );
    assert_eq!(
        report["unsigned_tail"], 0,
        "the final checkpoint was exported: {report:#}"
    );

    // The attributes follow the conventions.
    let received = receiver.received();
    let (resource, call) = received
        .iter()
        .find(|(_, lr)| attr(lr, "mcp.method.name").as_deref() == Some("tools/call"))
        .expect("a tools/call log record");
    assert_eq!(attr(call, "mcptrail.kind").as_deref(), Some("mcp"));
    assert!(attr(call, "gen_ai.tool.name").is_some());
    assert!(attr(call, "jsonrpc.request.id").is_some());
    assert!(attr(call, "mcp.session.id").is_some() || attr(call, "mcp.protocol.version").is_some());
    assert_eq!(attr(call, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr(call, "server.port"), Some(port.to_string()));
    assert!(attr(call, "client.port").is_some());
    assert!(attr(call, "process.pid").is_some());
    assert!(attr(call, "process.executable.path").is_some_and(|e| e.contains("python")));
    assert!(attr(call, "process.command_line").is_some_and(|c| c.contains("mcp_client.py")));
    assert_eq!(attr(call, "user.id").as_deref(), Some("0"));
    assert_eq!(attr(call, "mcptrail.hash").map(|h| h.len()), Some(64));
    assert!(attr(call, "mcptrail.prev_hash").is_some());
    assert_eq!(call["severityText"], "INFO");
    let res = |k: &str| attr(resource, k);
    assert_eq!(res("service.name").as_deref(), Some("mcptrail"));
    assert!(res("host.name").is_some());
    assert!(res("service.version").is_some());
    let key_hex = std::fs::read_to_string(&key).unwrap();
    assert!(key_hex.contains(&res("mcptrail.public_key").unwrap()));
    assert!(
        call["body"]["stringValue"]
            .as_str()
            .unwrap()
            .starts_with("{\"v\":1,")
    );

    // Tampering with the copy is reported exactly.
    let copy = work.path().join("tampered.jsonl");
    let target = 5u64;
    edited(&receiver.out, &copy, |all| {
        for lr in all.iter_mut().filter(|lr| seq_of(lr) == Some(target)) {
            let body = lr["body"]["stringValue"].as_str().unwrap().to_owned();
            lr["body"]["stringValue"] =
                Value::String(body.replacen("\"host\":\"", "\"host\":\"x", 1));
        }
    });
    let (ok, report) = verify_export(&state, &copy, &key);
    assert!(!ok);
    let problems: Vec<u64> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert!(problems.contains(&target), "{report:#}");
    assert!(report["gaps"].as_array().unwrap().is_empty());

    edited(&receiver.out, &copy, |all| {
        all.retain(|lr| seq_of(lr) != Some(target))
    });
    let (ok, report) = verify_export(&state, &copy, &key);
    assert!(!ok);
    assert_eq!(
        report["gaps"],
        serde_json::json!([[target, target]]),
        "{report:#}"
    );
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report:#}"
    );

    edited(&receiver.out, &copy, |all| {
        // Records 3 and 4 trade places: each body under the other's attributes and number.
        let body = |all: &Vec<Value>, s| {
            all.iter().find(|lr| seq_of(lr) == Some(s)).unwrap()["body"].clone()
        };
        let (three, four) = (body(all, 3), body(all, 4));
        for lr in all.iter_mut() {
            match seq_of(lr) {
                Some(3) => lr["body"] = four.clone(),
                Some(4) => lr["body"] = three.clone(),
                _ => {}
            }
        }
    });
    let (ok, report) = verify_export(&state, &copy, &key);
    assert!(!ok, "{report:#}");
    let problems: BTreeSet<u64> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert!(problems.contains(&3) || problems.contains(&4), "{report:#}");
}

/// `mcptrail export --format otlp` of the trail in `state` to `url`, with the cursor `ship`.
fn ship(state: &Path, url: &str) -> std::process::Output {
    mcptrail(
        state,
        &[
            "export",
            "--format",
            "otlp",
            "--endpoint",
            url,
            "--cursor",
            "ship",
        ],
    )
}

#[test]
fn the_export_command_ships_otlp_and_json_lines_that_verify() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _echo = jsonrpc_echo(port);
    let cgroup = TestCgroup::new("export-cli");
    let state = work.path().join("state");
    let mut agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--checkpoint-every", "3"],
        false,
    );
    for id in 0..4 {
        let out = cgroup
            .command("python3")
            .arg(fixture("post_jsonrpc.py"))
            .arg("127.0.0.1")
            .arg(port.to_string())
            .arg(format!(
                r#"--body={{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"t"}}}}"#
            ))
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    assert!(agent.stop().success());
    let key = work.path().join("trail.pub");
    assert!(
        mcptrail(&state, &["key", "export", "--out", key.to_str().unwrap()])
            .status
            .success()
    );

    let receiver = Receiver::new(work.path(), "cli");
    let out = ship(&state, &receiver.url());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, report) = verify_export(&state, &receiver.out, &key);
    assert!(ok, "{report:#}");
    assert_eq!(report["records"], records(&state).len());
    // The cursor moved to the end: a second run sends nothing new.
    let before = std::fs::read_to_string(&receiver.out)
        .unwrap()
        .lines()
        .count();
    let out = ship(&state, &receiver.url());
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&receiver.out)
            .unwrap()
            .lines()
            .count(),
        before
    );
    // Filters would leave holes in the central copy: refused.
    let out = mcptrail(
        &state,
        &[
            "export",
            "--format",
            "otlp",
            "--endpoint",
            &receiver.url(),
            "--kind",
            "mcp",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("filters do not apply"));

    // Over HTTPS, checked against a CA file, with a bearer token from a root-only file.
    let pki = TestPki::new(work.path());
    let secure = Receiver::with(
        work.path(),
        "https",
        &[
            "--tls",
            pki.cert.to_str().unwrap(),
            pki.key.to_str().unwrap(),
            "--token",
            "fleet-token-7d1",
        ],
    );
    let headers = work.path().join("otlp-headers");
    std::fs::write(&headers, "Authorization: Bearer fleet-token-7d1\n").unwrap();
    let https = format!("https://localhost:{}", secure.port);
    let export = |extra: &[&str]| {
        let mut args = vec!["export", "--format", "otlp", "--endpoint", https.as_str()];
        args.extend_from_slice(extra);
        mcptrail(&state, &args)
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&headers, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = export(&[
            "--headers-file",
            headers.to_str().unwrap(),
            "--ca-file",
            pki.ca.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
        std::fs::set_permissions(&headers, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Without the token the collector answers 401: the export stops at once, says what to fix
    // and moves no cursor; the run with it below sends everything.
    let out = export(&["--ca-file", pki.ca.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the export") && err.contains("401") && err.contains("headers file"),
        "{err}"
    );
    let out = export(&[
        "--headers-file",
        headers.to_str().unwrap(),
        "--ca-file",
        pki.ca.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, report) = verify_export(&state, &secure.out, &key);
    assert!(ok, "{report:#}");
    assert_eq!(report["records"], records(&state).len());

    // JSON lines, checkpoints included, verify too; a line dropped is a gap.
    let lines = work.path().join("trail.jsonl");
    let out = mcptrail(&state, &["export", "--format", "jsonl"]);
    assert!(out.status.success());
    std::fs::write(&lines, &out.stdout).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"kind\":\"checkpoint\""), "{text}");
    let (ok, report) = verify_export(&state, &lines, &key);
    assert!(ok, "{report:#}");
    let dropped: String = text
        .lines()
        .filter(|l| !l.starts_with("{\"v\":1,\"seq\":2,"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&lines, dropped).unwrap();
    let (ok, report) = verify_export(&state, &lines, &key);
    assert!(!ok);
    assert_eq!(report["gaps"], serde_json::json!([[2, 2]]));
}
