//! The operator's commands on a real trail: filtered tail, show, stats, and export with a
//! cursor that resumes where it stopped, as JSON lines and CEF.
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail_tests::*;

/// `mcptrail` that must succeed.
fn ok(state: &std::path::Path, args: &[&str]) -> Output {
    let out = mcptrail(state, args);
    assert!(
        out.status.success(),
        "mcptrail {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn run_client(cgroup: &TestCgroup, port: u16) -> u32 {
    let child = cgroup
        .command(mcp_python().to_str().unwrap())
        .arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    pid
}

fn wait_calls(state: &std::path::Path, pid: u32, n: usize) {
    wait_for_record(state, Duration::from_secs(10), "of every answer", |_| {
        records(state)
            .iter()
            .filter(
                |r| matches!(&r.event, Event::Mcp(e) if e.process.pid == pid && e.result.is_some()),
            )
            .count()
            >= n
    });
}

#[test]
fn tail_filters_show_stats_and_export_with_a_cursor() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("operator");
    let state = work.path().join("state");
    let _agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let pid = run_client(&cgroup, port);
    // discover, tools/list, add, echo, resources/read, prompts/get: six answers.
    wait_calls(&state, pid, 6);

    let calls = lines(&ok(
        &state,
        &["tail", "-n", "100", "--method", "tools/call"],
    ));
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(
        calls
            .iter()
            .all(|l| l.contains("-> 127.0.0.1:") && l.contains("tools/call"))
    );
    let add = lines(&ok(&state, &["tail", "--tool", "a*", "--json"]));
    assert_eq!(add.len(), 1, "{add:#?}");
    let add: serde_json::Value = serde_json::from_str(&add[0]).unwrap();
    assert_eq!(add["name"], "add");
    assert_eq!(add["process"]["pid"], pid);
    let none = lines(&ok(&state, &["tail", "--pid", "1", "--kind", "mcp"]));
    assert!(none.is_empty(), "{none:#?}");
    let mine = lines(&ok(
        &state,
        &[
            "tail",
            "-n",
            "1000",
            "--pid",
            &pid.to_string(),
            "--exe",
            "*/python3*",
        ],
    ));
    assert!(mine.len() >= 12, "{mine:#?}");

    let seq = add["seq"].as_u64().unwrap().to_string();
    let shown: serde_json::Value =
        serde_json::from_slice(&ok(&state, &["show", &seq]).stdout).unwrap();
    assert_eq!(shown, add);
    let missing = Command::new(agent_bin())
        .arg("--state-dir")
        .arg(&state)
        .args(["show", "999999"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no record 999999"));

    let stats: serde_json::Value =
        serde_json::from_slice(&ok(&state, &["stats", "--json"]).stdout).unwrap();
    let total = records(&state).len() as u64;
    assert!(stats["records"].as_u64().unwrap() >= total, "{stats:#}");
    assert!(stats["by_kind"]["mcp"].as_u64().unwrap() >= 12, "{stats:#}");

    // A cursor exports everything once, then only what is new.
    let first = lines(&ok(&state, &["export", "--cursor", "siem"]));
    assert!(first.len() as u64 >= total, "{} < {total}", first.len());
    let again = lines(&ok(&state, &["export", "--cursor", "siem"]));
    assert!(again.is_empty(), "{again:#?}");
    let pid2 = run_client(&cgroup, port);
    wait_calls(&state, pid2, 6);
    let more = lines(&ok(&state, &["export", "--cursor", "siem"]));
    assert!(more.len() >= 12, "{more:#?}");
    let last_first: serde_json::Value = serde_json::from_str(first.last().unwrap()).unwrap();
    let first_more: serde_json::Value = serde_json::from_str(&more[0]).unwrap();
    assert_eq!(
        first_more["seq"].as_u64().unwrap(),
        last_first["seq"].as_u64().unwrap() + 1,
        "no record skipped or repeated"
    );
    let cef = lines(&ok(
        &state,
        &["export", "--format", "cef", "--method", "tools/call"],
    ));
    assert_eq!(cef.len(), 4, "{cef:#?}");
    assert!(
        cef.iter()
            .all(|l| l.starts_with("CEF:0|mcptrail|mcptrail|")),
        "{cef:#?}"
    );
    assert!(
        cef.iter().any(|l| l.contains("|tools/call add|")),
        "{cef:#?}"
    );
}
