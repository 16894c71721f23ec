//! A full disk under the trail, for real: the state directory on a small tmpfs that the test
//! fills while the agent runs. With `--on-audit-failure block` calls get a clear error and
//! nothing reaches the gateway unaudited; with `pass` they go through and every lost record
//! is counted.
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use mcptrail_tests::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }

    /// Writes zeros until the file system refuses more.
    fn fill(&self) {
        // Appends: after a failed write the store reopens and may give space back, which
        // the next fill takes again.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.0.join("filler"))
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn client(cgroup: &TestCgroup, port: u16) -> std::process::Output {
    let (_, out) = output_with_pid(
        cgroup
            .command(mcp_python().to_str().unwrap())
            .arg(fixture("mcp_client.py"))
            .arg(format!("http://127.0.0.1:{port}/mcp")),
    );
    out
}

/// One `tools/list` POST from a new process: its pid and the status line it got.
fn post(cgroup: &TestCgroup, port: u16) -> (u32, String, String) {
    let (pid, out) = output_with_pid(
        cgroup
            .command("python3")
            .arg(fixture("post_jsonrpc.py"))
            .arg("127.0.0.1")
            .arg(port.to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        pid,
        v["status"].as_str().unwrap().to_owned(),
        v["body"].as_str().unwrap().to_owned(),
    )
}

/// What happened while the disk was full.
struct Full {
    /// Status line and body of the call whose record could not be written (block), or of
    /// the last call (pass).
    failed: Option<(String, String)>,
    /// Pids of the calls that got a 200 while the disk was full.
    passed: Vec<u32>,
    status: serde_json::Value,
    recovered: bool,
    state: PathBuf,
    _disk: Tmpfs,
    _work: tempfile::TempDir,
}

/// Runs the scenario: calls before, while and after the disk is full. A failed write makes
/// the store reopen, which can give back the space RocksDB had set aside for its log, so
/// calls are made one at a time until one meets the failure (block: its 503; pass: a loss
/// counted), and those that got through are checked against the trail.
fn run(mode: &str, label: &str) -> Full {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &["--json-response"]);
    // Single POSTs go to a plain JSON-RPC echo server: no session needed.
    let echo_port = free_port();
    let _echo = jsonrpc_echo(echo_port);
    let cgroup = TestCgroup::new(label);
    let disk = Tmpfs::new(work.path().join("disk"), "32m");
    let state = disk.0.join("state");
    let policy = work.path().join("policy.toml");
    let default = std::fs::read_to_string(tests_dir().join("../policies/default.toml")).unwrap();
    std::fs::write(&policy, &default).unwrap();
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{echo_port}"),
        ],
        &[
            "--on-audit-failure",
            mode,
            "--policy",
            policy.to_str().unwrap(),
        ],
        false,
    );
    let before = client(&cgroup, port);
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let mut failed = None;
    let mut passed = Vec::new();
    for _ in 0..20 {
        disk.fill();
        let (pid, status_line, body) = post(&cgroup, echo_port);
        let losses = agent.status()["proxy_counters"]["audit_losses"]
            .as_u64()
            .unwrap();
        if status_line.contains(" 200 ") {
            passed.push(pid);
        }
        if mode == "block" && !status_line.contains(" 200 ") || mode == "pass" && losses > 0 {
            failed = Some((status_line, body));
            break;
        }
    }
    // A policy reload (and the target re-read SIGHUP also does) while the trail cannot take
    // its record: the agent goes on, and the record is written once there is room.
    std::fs::write(
        &policy,
        format!("{default}\n# reloaded while the disk was full\n"),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = agent.status();
    // Room again: the store reopens on its next write, and calls flow (and are recorded).
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let recovered = (0..5).any(|_| {
        let ok = client(&cgroup, port).status.success();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        ok
    });
    if recovered {
        wait_for_record(
            &state,
            std::time::Duration::from_secs(15),
            "of the policy reload made while the disk was full",
            |r| {
                matches!(&r.event, mcptrail::audit::Event::PolicyChanged(p)
                    if p.trigger == "SIGHUP" && p.loaded)
            },
        );
    }
    drop(agent);
    if recovered {
        assert_verifies(&state);
    }
    Full {
        failed,
        passed,
        status,
        recovered,
        state,
        _disk: disk,
        _work: work,
    }
}

#[test]
fn a_full_disk_blocks_calls_with_a_clear_error() {
    let full = run("block", "disk-block");
    assert!(
        full.recovered,
        "calls stayed blocked after the disk had room again"
    );
    let (status_line, body) = full.failed.expect("a call met the full disk");
    assert!(status_line.contains(" 503 "), "{status_line}");
    assert!(body.contains("audit trail cannot be written"), "{body}");
    // A request whose record failed gets a JSON-RPC error; a connection made while the
    // trail is known to be down gets a plain 503 before any request is read.
    assert!(
        body.contains("\"jsonrpc\"") || body.starts_with("mcptrail: "),
        "a clear error: {body}"
    );
    assert!(
        full.status["proxy_counters"]["blocked_by_audit_failure"]
            .as_u64()
            .unwrap()
            >= 1,
        "{:#}",
        full.status
    );
    // Nothing unaudited: every call that got through while the disk was full is recorded.
    let all = records(&full.state);
    for pid in &full.passed {
        assert!(
            all.iter().any(
                |r| matches!(&r.event, mcptrail::audit::Event::Mcp(e) if e.process.pid == *pid)
            ),
            "call of pid {pid} got through unaudited"
        );
    }
}

#[test]
fn a_full_disk_lets_calls_pass_and_counts_the_losses() {
    let full = run("pass", "disk-pass");
    assert!(full.recovered);
    let (status_line, _) = full.failed.expect("a record was lost to the full disk");
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(
        full.status["proxy_counters"]["audit_losses"]
            .as_u64()
            .unwrap()
            >= 1,
        "{:#}",
        full.status
    );
    assert_eq!(full.status["proxy_counters"]["blocked_by_audit_failure"], 0);
}
